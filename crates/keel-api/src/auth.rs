//! API-key authentication and tenant scoping (G8).
//!
//! With keys configured, every `/v1` request must present `Authorization: Bearer <key>`.
//! The key is hashed and compared with the configured digests in constant time; the
//! plaintext is neither stored nor logged. A tenant key's tenant then scopes the request: a
//! body naming another tenant is refused (`403`), another tenant's jobs are invisible
//! (`404`, so their existence is not revealed), the queue listing counts only its own jobs,
//! and queues (shared by every tenant) cannot be paused or resumed (`403`). An operator key
//! ([`Role::Operator`]) may do all of that for any tenant, as every caller may when
//! authentication is off (loopback only, G8). docs/security.md tells the whole model.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_core::TenantId;
use keel_resilience::{Dependency, RequestScope, Step};

use crate::config::{Role, digests_equal, hash_api_key};
use crate::error::ApiError;
use crate::state::ApiState;

/// Who is calling: the tenant their API key acts for and whether it may act for others
/// (an operator key, or anyone when authentication is off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's own tenant (`None` when authentication is off).
    own: Option<TenantId>,
    /// Whether every tenant's jobs and the shared queues are the caller's business.
    operator: bool,
}

impl Caller {
    /// A caller bound to `tenant` (a tenant key).
    pub fn tenant(tenant: TenantId) -> Self {
        Self {
            own: Some(tenant),
            operator: false,
        }
    }

    /// An operator key of `tenant`: acts for `tenant` unless a request names another.
    pub fn operator(tenant: TenantId) -> Self {
        Self {
            own: Some(tenant),
            operator: true,
        }
    }

    /// A caller with no restriction at all (authentication disabled).
    pub fn unrestricted() -> Self {
        Self {
            own: None,
            operator: true,
        }
    }

    /// The tenant a request acts for: the one it names (a tenant key may only name its
    /// own), or else the caller's own (or `default` when authentication is off).
    pub fn tenant_for(&self, named: Option<TenantId>) -> Result<TenantId, ApiError> {
        match (&self.own, named) {
            (Some(own), Some(named)) if !self.operator && *own != named => {
                Err(ApiError::Forbidden(format!(
                    "this API key may not act for tenant {:?}",
                    named.as_str()
                )))
            }
            (_, Some(named)) => Ok(named),
            (Some(own), None) => Ok(own.clone()),
            (None, None) => Ok(TenantId::default()),
        }
    }

    /// Whether the caller may see a job of `tenant`.
    pub fn may_see(&self, tenant: &TenantId) -> bool {
        self.scope().is_none_or(|own| own == tenant)
    }

    /// The tenant every read must be filtered to, if any (none for an operator).
    pub fn scope(&self) -> Option<&TenantId> {
        if self.operator {
            None
        } else {
            self.own.as_ref()
        }
    }

    /// Refuses (`403`) unless the caller may pause and resume queues: every tenant's jobs
    /// share a queue, so stopping one is an operator's decision, never a tenant's.
    pub fn require_operator(&self, doing: &str) -> Result<(), ApiError> {
        if self.operator {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{doing} affects every tenant's jobs in it: it needs an operator key \
                 (KEEL_API_KEYS entry ending in :operator)"
            )))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Fail closed: a route that forgot the auth layer answers 500 rather than serving
        // every tenant.
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("the auth layer did not run for this route"))
    }
}

/// The digest of the API key a request was authenticated with, for the per-key rate limit.
/// Only present when keys are configured; the plaintext key is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyDigest(pub(crate) [u8; 32]);

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    bearer(headers.get(header::AUTHORIZATION)?.to_str().ok()?)
}

/// The token of an `Authorization` value `Bearer <token>` (HTTP header or gRPC metadata).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// On `/v1` tenant routes only, after admission and before the rate limit (which needs the
/// tenant): resolves the [`Caller`] or answers `401` with `WWW-Authenticate: Bearer`.
/// Inside the deadline so a slow check is bounded, and inside the body limit so nothing
/// large is buffered for it.
///
/// Marks the request as in the `auth` step, then applies the chaos faults of the `auth`
/// dependency (`SLOW_AUTH`) before checking the key, whether or not keys are configured —
/// the seed's experiment runs without keys. An injected failure is a `503` "authentication
/// unavailable", as a real outage of an auth backend would be.
pub(crate) async fn authenticate(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    RequestScope::enter_current(Step::Auth);
    match resolve_caller(&state, bearer_token(req.headers())).await {
        Ok((caller, digest)) => {
            if let Some(digest) = digest {
                req.extensions_mut().insert(digest);
            }
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Who is calling, from the bearer token a request presented: the check every transport
/// runs before its handler (the HTTP layer above, the gRPC services). Applies the chaos
/// faults of the `auth` dependency (`SLOW_AUTH`) first, whether or not keys are configured;
/// returns the key's digest for the per-key rate limit when keys are configured.
pub(crate) async fn resolve_caller(
    state: &ApiState,
    token: Option<&str>,
) -> Result<(Caller, Option<KeyDigest>), ApiError> {
    if let Err(fault) = state.chaos.inject(Dependency::Auth).await {
        return Err(ApiError::Unavailable {
            detail: "authentication is unavailable; retry shortly".to_owned(),
            retry_after_secs: 1,
            cause: Some(Box::new(fault)),
        });
    }
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return Ok((Caller::unrestricted(), None));
    }
    let token = token.ok_or(ApiError::Unauthorized)?;
    let digest = hash_api_key(token);
    // Compare with every key, without stopping at the first match.
    let mut found = None;
    for key in keys {
        if digests_equal(&digest, &key.sha256) && found.is_none() {
            found = Some((key.tenant.clone(), key.role));
        }
    }
    let (tenant, role) = found.ok_or(ApiError::Unauthorized)?;
    let caller = match role {
        Role::Tenant => Caller::tenant(tenant),
        Role::Operator => Caller::operator(tenant),
    };
    Ok((caller, Some(KeyDigest(digest))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn tenant_scoping() {
        let acme = TenantId::parse("acme").unwrap();
        let other = TenantId::parse("other").unwrap();
        let c = Caller::tenant(acme.clone());
        assert_eq!(c.tenant_for(None).unwrap(), acme);
        assert_eq!(c.tenant_for(Some(acme.clone())).unwrap(), acme);
        assert!(matches!(
            c.tenant_for(Some(other.clone())),
            Err(ApiError::Forbidden(_))
        ));
        assert!(c.may_see(&acme) && !c.may_see(&other));
        assert!(c.require_operator("pausing a queue").is_err());
        let open = Caller::unrestricted();
        assert_eq!(open.tenant_for(None).unwrap(), TenantId::default());
        assert!(open.may_see(&other));
        let ops = Caller::operator(acme.clone());
        assert_eq!(ops.tenant_for(None).unwrap(), acme);
        assert_eq!(ops.tenant_for(Some(other.clone())).unwrap(), other);
        assert!(ops.may_see(&other) && ops.scope().is_none());
        assert!(ops.require_operator("pausing a queue").is_ok());
    }
}
