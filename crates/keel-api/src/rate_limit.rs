//! Per-tenant and per-API-key rate limits: token buckets (GCRA, from `governor`), answered
//! with `429`, `Retry-After` and the IETF draft `RateLimit-*` headers.
//!
//! - Every tenant has a bucket: its override from `tenant_rate_limits`, else the default
//!   `rate_limit`; with neither, the tenant is not limited. One tenant's flood then cannot
//!   take the capacity every other tenant shares (the admission limit is global).
//! - With `api_key_rate_limit`, every API key also has a bucket of its own, keyed by the
//!   key's digest (never the key), so one leaked or runaway key of a tenant cannot spend
//!   the whole tenant's budget. A request must pass both; the key's bucket is asked first,
//!   and a token it spends on a request the tenant's bucket then refuses is not returned
//!   (the key was used, after all).
//!
//! **Which tenant.** The layer runs before the body is read (refusing must stay cheap), so
//! it keys by the caller's tenant: the API key's tenant when keys are configured, else
//! `default`. Without API keys every caller therefore shares the `default` tenant's
//! bucket, whatever tenant its jobs name — a server without keys has no way to tell callers
//! apart that a caller could not forge.
//!
//! **Memory.** The tenant and key buckets live in keyed maps. Their keys come from the
//! configured API keys (or the single `default` tenant), so they are bounded by the
//! configuration; still, [`RateLimits::retain_recent`] — called by the binary on its gauge
//! period — drops every bucket that has refilled completely (indistinguishable from a fresh
//! one), so idle tenants hold no memory either.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use keel_core::TenantId;
use keel_resilience::{RequestScope, Step};

use crate::auth::{Caller, KeyDigest};
use crate::error::{ApiError, RATELIMIT_LIMIT, RATELIMIT_REMAINING, retry_after_secs};
use crate::state::ApiState;

/// One rate: `requests` per `per`, with room for a burst of `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests replenished per period.
    pub requests: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// Bucket size: how many requests may arrive at once after a quiet spell.
    pub burst: NonZeroU32,
}

impl Rate {
    /// The most requests a rate may allow per second: beyond it the replenish interval would
    /// round to zero nanoseconds.
    pub const MAX_PER_SECOND: u32 = 1_000_000;

    /// Parses `N/s`, `N/m` or `N/h`, optionally followed by `:BURST` (e.g. `50/s:100`). The
    /// burst defaults to `N`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let (n, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not RATE/UNIT[:BURST] (e.g. 200/s or 50/s:100)"))?;
        let requests = n
            .trim()
            .parse::<NonZeroU32>()
            .map_err(|_| format!("{s:?}: {n:?} is not a whole number of requests above 0"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m or h)")),
        };
        if u128::from(requests.get()) * 1_000_000_000 / per.as_nanos()
            > u128::from(Self::MAX_PER_SECOND)
        {
            return Err(format!(
                "{s:?} is more than {} requests per second",
                Self::MAX_PER_SECOND
            ));
        }
        let burst = match burst {
            None => requests,
            Some(b) => b
                .trim()
                .parse::<NonZeroU32>()
                .map_err(|_| format!("{s:?}: burst {b:?} is not a whole number above 0"))?,
        };
        Ok(Rate {
            requests,
            per,
            burst,
        })
    }

    fn quota(&self) -> Quota {
        // `parse` caps the rate so that the interval is at least a microsecond.
        let interval = self.per / self.requests.get();
        Quota::with_period(interval)
            .unwrap_or_else(|| Quota::per_second(self.requests))
            .allow_burst(self.burst)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            60 => "m",
            3600 => "h",
            _ => "s",
        };
        write!(f, "{}/{unit}:{}", self.requests, self.burst)
    }
}

/// Parses `TENANT=RATE[,…]`, e.g. `acme=50/s:100,other=10/s:20`. Every bad entry is listed.
pub fn parse_tenant_rates(s: &str) -> Result<BTreeMap<TenantId, Rate>, String> {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((tenant, rate)) = item.split_once('=') else {
            errors.push(format!("{item:?} is not TENANT=RATE (e.g. acme=50/s:100)"));
            continue;
        };
        let tenant = match TenantId::parse(tenant.trim()) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        match Rate::parse(rate) {
            Ok(r) => {
                if out.insert(tenant.clone(), r).is_some() {
                    errors.push(format!("tenant {tenant} is listed twice"));
                }
            }
            Err(e) => errors.push(format!("tenant {tenant}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("; "))
    }
}

/// Which rate limits apply. [`Default`] limits nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// The bucket of every tenant without an override; `None` leaves them unlimited.
    pub tenant_default: Option<Rate>,
    /// Tenants with a bucket of their own size.
    pub tenants: BTreeMap<TenantId, Rate>,
    /// The bucket of every API key, on top of its tenant's; `None` for no per-key limit.
    pub per_key: Option<Rate>,
}

impl RateLimitConfig {
    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.tenant_default.is_some() || !self.tenants.is_empty() || self.per_key.is_some()
    }
}

fn keyed<K: Clone + std::hash::Hash + Eq>(rate: &Rate) -> Keyed<K> {
    RateLimiter::keyed(rate.quota()).with_middleware()
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

struct Buckets {
    tenant_default: Option<Keyed<TenantId>>,
    tenants: HashMap<TenantId, Direct>,
    per_key: Option<Keyed<[u8; 32]>>,
    clock: DefaultClock,
    /// The tenant of callers without one (no API keys), made once rather than per request.
    default_tenant: TenantId,
}

/// What a bucket said yes with: its size and what is left (the `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Allowance {
    limit: u32,
    remaining: u32,
}

/// What a bucket said no with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    limit: u32,
    retry_after: Duration,
}

/// The rate limiters of one API; clones share them. Free when no limit is configured.
#[derive(Clone, Default)]
pub struct RateLimits {
    buckets: Option<Arc<Buckets>>,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits")
            .field("enabled", &self.buckets.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Buckets for `config` (none when it limits nothing). Registers
    /// `keel_requests_shed_total{reason="rate_limit"}` at zero when limits are on.
    pub fn new(config: &RateLimitConfig) -> Self {
        if !config.is_enabled() {
            return Self::default();
        }
        metrics::counter!("keel_requests_shed_total", "reason" => "rate_limit").increment(0);
        Self {
            buckets: Some(Arc::new(Buckets {
                tenant_default: config.tenant_default.as_ref().map(keyed),
                tenants: config
                    .tenants
                    .iter()
                    .map(|(t, r)| (t.clone(), RateLimiter::direct(r.quota()).with_middleware()))
                    .collect(),
                per_key: config.per_key.as_ref().map(keyed),
                clock: DefaultClock::default(),
                default_tenant: TenantId::default(),
            })),
        }
    }

    /// Whether any limit is configured.
    pub fn is_enabled(&self) -> bool {
        self.buckets.is_some()
    }

    /// Forgets every keyed bucket that has refilled completely, and returns the memory. The
    /// binary calls it on its gauge period so the keyed maps stay bounded (see the module
    /// documentation).
    pub fn retain_recent(&self) {
        if let Some(b) = &self.buckets {
            if let Some(l) = &b.tenant_default {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(l) = &b.per_key {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }

    /// Takes one token from the key's bucket, then from the tenant's (`default` when the
    /// caller has none). `Ok(None)` when no bucket applies; otherwise the tighter of the two
    /// allowances, or the refusal.
    pub(crate) fn check(
        &self,
        tenant: Option<&TenantId>,
        key: Option<&[u8; 32]>,
    ) -> Result<Option<Allowance>, Refusal> {
        let Some(b) = &self.buckets else {
            return Ok(None);
        };
        let tenant = tenant.unwrap_or(&b.default_tenant);
        let refused = |n: NotUntil<_>| Refusal {
            limit: n.quota().burst_size().get(),
            retry_after: n.wait_time_from(b.clock.now()),
        };
        let allowed = |s: governor::middleware::StateSnapshot| Allowance {
            limit: s.quota().burst_size().get(),
            remaining: s.remaining_burst_capacity(),
        };
        let by_key = match (&b.per_key, key) {
            (Some(l), Some(k)) => Some(l.check_key(k).map(allowed).map_err(refused)?),
            _ => None,
        };
        let by_tenant = match b.tenants.get(tenant) {
            Some(l) => Some(l.check().map(allowed).map_err(refused)?),
            None => match &b.tenant_default {
                Some(l) => Some(l.check_key(tenant).map(allowed).map_err(refused)?),
                None => None,
            },
        };
        Ok(match (by_key, by_tenant) {
            (Some(k), Some(t)) => Some(if k.remaining < t.remaining { k } else { t }),
            (k, t) => k.or(t),
        })
    }
}

/// Takes one token for a request of `tenant` (the caller's scope) made with `key`: `429`
/// (counted in `keel_requests_shed_total{reason="rate_limit"}`) when a bucket is empty. The
/// step every transport runs after authentication (the HTTP layer below, the gRPC
/// services); `None` when no limit is on.
pub(crate) fn charge(
    state: &ApiState,
    tenant: Option<&TenantId>,
    key: Option<&KeyDigest>,
) -> Result<Option<Allowance>, ApiError> {
    if !state.rate_limits.is_enabled() {
        return Ok(None);
    }
    RequestScope::enter_current(Step::RateLimit);
    state
        .rate_limits
        .check(tenant, key.map(|k| &k.0))
        .map_err(|refusal| {
            metrics::counter!("keel_requests_shed_total", "reason" => "rate_limit").increment(1);
            ApiError::RateLimited {
                limit: refusal.limit,
                retry_after_secs: retry_after_secs(refusal.retry_after),
            }
        })
}

/// Last layer of the `/v1` tenant routes before the handler: after authentication, which
/// names the tenant and the key. Refuses with `429` (counted in
/// `keel_requests_shed_total{reason="rate_limit"}`); on the way through it marks the request
/// as in the `validate` step — the handler's extractors read and check the body next — and
/// adds `RateLimit-Limit` and `RateLimit-Remaining` to the response when limits are on.
pub(crate) async fn limit_rate(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let key = req.extensions().get::<KeyDigest>();
    let tenant = req.extensions().get::<Caller>().and_then(Caller::scope);
    let allowance = match charge(&state, tenant, key) {
        Ok(a) => a,
        Err(refused) => return refused.into_response(),
    };
    RequestScope::enter_current(Step::Validate);
    let mut resp = next.run(req).await;
    if let Some(a) = allowance {
        let headers = resp.headers_mut();
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(a.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(a.remaining));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn rates_parse_with_an_optional_burst() {
        let r = Rate::parse("200/s").unwrap();
        assert_eq!(
            (r.requests, r.per, r.burst),
            (nz(200), Duration::from_secs(1), nz(200))
        );
        let r = Rate::parse(" 50/m:100 ").unwrap();
        assert_eq!(
            (r.requests, r.per, r.burst),
            (nz(50), Duration::from_secs(60), nz(100))
        );
        assert_eq!(r.to_string(), "50/m:100");
        for bad in ["200", "0/s", "x/s", "10/d", "10/s:0", "10/s:x", "2000000/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tenant_rates_list_every_bad_entry() {
        let ok = parse_tenant_rates("acme=50/s:100, other=10/s").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[&TenantId::parse("other").unwrap()].burst, nz(10));
        let err =
            parse_tenant_rates("acme=5/x,bad tenant=1/s,nope,acme2=1/s,acme2=2/s").unwrap_err();
        assert_eq!(err.matches("; ").count(), 3, "{err}");
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn buckets_refuse_past_the_burst_and_say_when_to_come_back() {
        let acme = TenantId::parse("acme").unwrap();
        let limits = RateLimits::new(&RateLimitConfig {
            tenant_default: Some(Rate::parse("1/m:2").unwrap()),
            tenants: BTreeMap::from([(acme.clone(), Rate::parse("1/h:1").unwrap())]),
            per_key: None,
        });
        let other = TenantId::default();
        let first = limits.check(Some(&other), None).unwrap().unwrap();
        assert_eq!(
            first,
            Allowance {
                limit: 2,
                remaining: 1
            }
        );
        // A caller without a tenant (no API keys) shares the `default` tenant's bucket.
        assert_eq!(limits.check(None, None).unwrap().unwrap().remaining, 0);
        let refused = limits.check(Some(&other), None).unwrap_err();
        assert_eq!(refused.limit, 2);
        assert!(
            refused.retry_after > Duration::from_secs(50)
                && refused.retry_after <= Duration::from_secs(60),
            "{refused:?}"
        );
        // The override is a bucket of its own.
        assert_eq!(limits.check(Some(&acme), None).unwrap().unwrap().limit, 1);
        assert!(limits.check(Some(&acme), None).is_err());
        limits.retain_recent();
        assert!(
            limits.check(Some(&other), None).is_err(),
            "a used bucket is kept"
        );
    }

    #[test]
    fn a_key_bucket_applies_on_top_of_its_tenant() {
        let limits = RateLimits::new(&RateLimitConfig {
            tenant_default: Some(Rate::parse("100/s").unwrap()),
            tenants: BTreeMap::new(),
            per_key: Some(Rate::parse("1/h").unwrap()),
        });
        let t = TenantId::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ok = limits.check(Some(&t), Some(&a)).unwrap().unwrap();
        assert_eq!(
            ok,
            Allowance {
                limit: 1,
                remaining: 0
            },
            "the tighter bucket is shown"
        );
        assert!(limits.check(Some(&t), Some(&a)).is_err());
        assert!(
            limits.check(Some(&t), Some(&b)).is_ok(),
            "another key has its own bucket"
        );
        assert!(
            limits.check(Some(&t), None).is_ok(),
            "no key, no key bucket"
        );
    }

    #[test]
    fn no_config_no_buckets() {
        let limits = RateLimits::new(&RateLimitConfig::default());
        assert!(!limits.is_enabled());
        assert_eq!(limits.check(None, None), Ok(None));
    }
}
