//! Text → value, one parser per kind of setting. Each parser also enforces the bounds that
//! concern its value alone (a positive duration, a count in range); bounds that relate two
//! settings are in [`validate`](super::validate). Messages name what was expected, because
//! they are all an operator sees of a refused deployment.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use keel_api::admin::AdminToken;
use keel_api::{ApiKey, Rate, Role};
use keel_core::{QueueName, TenantId, WorkerId};
use keel_resilience::ChaosSettings;
use keel_runtime::{HostRateLimit, QueueConfig, SigningSecret};
use keel_store::{DatabaseUrl, Pooler};

use super::LogFormat;

/// The highest admission limit accepted: far above what one process can serve, low enough
/// that a typo cannot turn the cap off.
pub(super) const MAX_ADMISSION_LIMIT: usize = 1_000_000;

/// Parses a duration like `500ms`, `2s`, `5m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d, e.g. 2s)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number followed by a unit (e.g. 2s)"))?;
    let per = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m, h or d)"
            ));
        }
    };
    per.checked_mul(u32::try_from(n).map_err(|_| format!("{s:?} is too large"))?)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A duration above zero: for timeouts and periods, where zero would mean "never" or "spin".
pub(super) fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

/// An external worker's longest lease wait: positive, and within the protocol's own cap.
pub(super) fn lease_wait(s: &str) -> Result<Duration, String> {
    let d = positive_duration(s)?;
    if d > keel_api::worker_in::MAX_WAIT {
        return Err("must be at most 30s (the protocol's longest wait)".to_owned());
    }
    Ok(d)
}

/// The leader's term: long enough to outlast the round trips that renew it.
pub(super) fn leader_ttl(s: &str) -> Result<Duration, String> {
    let d = positive_duration(s)?;
    if d < Duration::from_millis(500) {
        return Err(format!(
            "must be at least 500ms (a term must outlast a few database round trips), got {s:?}"
        ));
    }
    Ok(d)
}

/// How long a request may wait for an admission slot: at most a minute, since it waits
/// inside its deadline anyway.
pub(super) fn admission_wait(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_secs(60) {
        return Err("must be at most 60s (a request waits inside its deadline)".to_owned());
    }
    Ok(d)
}

/// `true`/`false` and the usual spellings (`1`, `yes`, `on`…); empty is false, as an env
/// variable set to nothing reads.
pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (use true or false)")),
    }
}

/// A whole number in `min..=max`, as whatever integer type the setting holds.
pub(super) fn count<T: TryFrom<usize>>(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<T, String> {
    move |s| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| format!("must be a whole number in {min}..={max}, got {s:?}"))
    }
}

/// `IP:PORT`.
pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP:PORT address (e.g. 127.0.0.1:8080)"))
}

/// `IP:PORT`, or `off` for a listener switched off.
pub(super) fn addr_or_off(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse_addr(s).map(Some)
    }
}

/// `none` or `transaction`.
pub(super) fn pooler(s: &str) -> Result<Pooler, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "none" | "session" => Ok(Pooler::None),
        "transaction" => Ok(Pooler::Transaction),
        other => Err(format!(
            "{other:?} is not a pooler mode: none (Postgres itself, or a session-mode pooler) or transaction"
        )),
    }
}

/// A Postgres URL (`postgres://…`), kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresUrl(pub String);

/// A Postgres URL; blank for none.
pub(super) fn postgres_url(s: &str) -> Result<Option<PostgresUrl>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    match DatabaseUrl::parse(s)? {
        DatabaseUrl::Postgres(url) => Ok(Some(PostgresUrl(url))),
        DatabaseUrl::Sqlite(_) => Err("must be a postgres:// URL".to_owned()),
    }
}

/// A file path; blank for none.
pub(super) fn optional_path(s: &str) -> Result<Option<PathBuf>, String> {
    let s = s.trim();
    Ok((!s.is_empty()).then(|| PathBuf::from(s)))
}

/// The admin token; empty for none.
pub(super) fn admin_token(s: &str) -> Result<Option<AdminToken>, String> {
    if s.is_empty() {
        Ok(None)
    } else {
        AdminToken::parse(s).map(Some)
    }
}

/// The webhook signing secret; blank for none.
pub(super) fn signing_secret(s: &str) -> Result<Option<SigningSecret>, String> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        SigningSecret::parse(s).map(Some)
    }
}

/// `json` or `pretty`.
pub(super) fn log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        other => Err(format!("{other:?} is not json or pretty")),
    }
}

/// A `tracing` filter, checked now so a typo is a config error rather than silence.
pub(super) fn log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?} is not a valid filter: {e}"))
}

/// `NAME:CONCURRENCY[,…]`, each queue once.
pub(super) fn parse_queues(s: &str) -> Result<Vec<QueueConfig>, String> {
    let mut out: Vec<QueueConfig> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, n) = item
            .split_once(':')
            .ok_or_else(|| format!("{item:?} must be NAME:CONCURRENCY, e.g. default:8"))?;
        let name = QueueName::parse(name).map_err(|e| e.to_string())?;
        let concurrency: usize = n
            .parse()
            .ok()
            .filter(|c| (1..=10_000).contains(c))
            .ok_or_else(|| format!("concurrency of {name} must be 1..=10000, got {n:?}"))?;
        if out.iter().any(|q| q.name == name) {
            return Err(format!("queue {name} is listed twice"));
        }
        out.push(QueueConfig { name, concurrency });
    }
    Ok(out)
}

/// `auto` (`None`: the runtime's default cap) or a number up to the runtime's maximum.
pub(super) fn prefetch(s: &str) -> Result<Option<usize>, String> {
    match s {
        "auto" => Ok(None),
        n => count(0, keel_runtime::RuntimeConfig::MAX_PREFETCH)(n)
            .map(Some)
            .map_err(|e| format!("must be auto or a number: {e}")),
    }
}

/// `TENANT=SHA256HEX[:ROLE],…`: each key's tenant, digest and role (`tenant` by default,
/// or `operator`).
pub(super) fn parse_api_keys(s: &str) -> Result<Vec<ApiKey>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (tenant, rest) = item.split_once('=').ok_or_else(|| {
            "each entry must be TENANT=SHA256HEX[:operator] (see `keel hash-key`)".to_owned()
        })?;
        let tenant = TenantId::parse(tenant).map_err(|e| e.to_string())?;
        let (hex_digest, role) = match rest.split_once(':') {
            Some((digest, role)) => (digest, Role::parse(role)?),
            None => (rest, Role::Tenant),
        };
        let bytes = hex::decode(hex_digest)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!("the key digest for tenant {tenant} must be 64 hex characters (SHA-256)")
            })?;
        out.push(ApiKey {
            tenant,
            sha256: bytes,
            role,
        });
    }
    Ok(out)
}

/// `off` (or nothing) for no limit, else a [`Rate`].
pub(super) fn rate_or_off(s: &str) -> Result<Option<Rate>, String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    Rate::parse(s).map(Some)
}

/// A burst size above zero; blank for the rate's own.
pub(super) fn burst(s: &str) -> Result<Option<NonZeroU32>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim()
        .parse::<NonZeroU32>()
        .map(Some)
        .map_err(|_| format!("must be a whole number above 0, got {s:?}"))
}

/// A per-host webhook rate: `N/s[:BURST]` (per second only: hosts are limited in
/// requests per second), or `off`.
pub(super) fn host_rate(s: &str) -> Result<Option<HostRateLimit>, String> {
    let Some(rate) = rate_or_off(s)? else {
        return Ok(None);
    };
    if rate.per != Duration::from_secs(1) {
        return Err(format!(
            "{s:?}: give a webhook host's rate per second (N/s[:BURST])"
        ));
    }
    Ok(Some(HostRateLimit {
        per_second: rate.requests.get(),
        burst: rate.burst.get(),
    }))
}

/// A whole number of jobs, 0 for no cap.
pub(super) fn backlog(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("must be a whole number of jobs (0 = no cap), got {s:?}"))
}

/// `DEP.SETTING=VALUE[,…]`, every bad entry named.
pub(super) fn chaos(s: &str) -> Result<ChaosSettings, String> {
    ChaosSettings::parse(s).map_err(|errors| errors.join("; "))
}

/// A worker id as leases and logs carry it.
pub(super) fn worker_id(s: &str) -> Result<WorkerId, String> {
    WorkerId::parse(s).map_err(|e| e.to_string())
}

/// `host-pid`: unique among the processes sharing a database as long as hosts are, and
/// telling an operator where a lease is held. The host name is cut to the characters a
/// worker id allows.
pub(super) fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keel".to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}-{}", std::process::id())
}
