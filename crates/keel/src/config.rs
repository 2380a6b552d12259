//! Keel's configuration: defaults, an optional TOML file, `KEEL_*` environment variables and
//! command-line flags, in rising order of precedence (a flag beats its env var, which beats
//! the file, which beats the default).
//!
//! Everything arrives as text and is validated in one pass before any network or database
//! I/O, so a misconfigured deployment hears about *every* bad field in one message and exits
//! with code 78 (`EX_CONFIG`) instead of failing on the first one, being fixed, and failing
//! on the next. Secrets (the database password, API key digests) never appear in `Debug`
//! output or in `/debug/config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use keel_api::admin::AdminToken;
use keel_api::rate_limit::parse_tenant_rates;
use keel_api::{ApiKey, Rate, Role};
use keel_core::{QueueName, TenantId, WorkerId};
use keel_resilience::{AdaptiveLimitConfig, ChaosSettings, StoreGuardConfig};
use keel_runtime::{HostRateLimit, QueueConfig, SigningSecret};
use keel_store::DatabaseUrl;
use serde::Serialize;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default: what log pipelines ingest).
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// The `serve` settings as given (flags and env, through clap). Every field is optional text
/// so that parsing problems are collected by [`Config::resolve`] rather than reported one at
/// a time by the argument parser.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the flag names with `_`).
    #[arg(long, env = "KEEL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// API listener address. Non-loopback addresses require API keys.
    #[arg(long, env = "KEEL_ADDR", value_name = "HOST:PORT")]
    pub addr: Option<String>,
    /// Admin listener address (/debug/*: profiles, task dumps, config, chaos), or `off` for
    /// none. Keep it on loopback; a non-loopback address requires --admin-token.
    #[arg(long, env = "KEEL_ADMIN_ADDR", value_name = "HOST:PORT|off")]
    pub admin_addr: Option<String>,
    /// Bearer token every admin request must present (Authorization: Bearer <token>), at
    /// least 16 characters; required to put the admin listener on a non-loopback address.
    #[arg(
        long,
        env = "KEEL_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Where jobs are stored: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    #[arg(long, env = "KEEL_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// At startup, keep retrying an unreachable database this long (0s: fail at once).
    #[arg(long, env = "KEEL_DATABASE_WAIT", value_name = "DURATION")]
    pub database_wait: Option<String>,
    /// Deadline of every API request, e.g. 2s or 500ms.
    #[arg(long, env = "KEEL_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,
    /// How long shutdown waits for in-flight requests and running jobs before releasing them.
    #[arg(long, env = "KEEL_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// After SIGTERM, keep accepting requests this long while /readyz answers 503, so load
    /// balancers stop routing here before the listener closes (part of the grace period).
    #[arg(long, env = "KEEL_SHUTDOWN_DELAY", value_name = "DURATION")]
    pub shutdown_delay: Option<String>,
    /// Once a request's head starts arriving, all of it must within this (slowloris guard).
    #[arg(long, env = "KEEL_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// An API connection idle this long between requests is closed.
    #[arg(long, env = "KEEL_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// API connections served at once; more get an immediate 503.
    #[arg(long, env = "KEEL_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<String>,
    /// Log format: json or pretty.
    #[arg(long, env = "KEEL_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or keel=debug,info.
    #[arg(long, env = "KEEL_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Queues this process runs, with their concurrency: NAME:N[,NAME:N…].
    #[arg(long, env = "KEEL_QUEUES", value_name = "LIST")]
    pub queues: Option<String>,
    /// Most jobs each queue leases ahead of its free worker slots (the buffer follows the
    /// queue's pace up to this): auto (256) or N (0 turns prefetch off).
    #[arg(long, env = "KEEL_PREFETCH", value_name = "auto|N")]
    pub prefetch: Option<String>,
    /// Postgres pool: most connections.
    #[arg(long, env = "KEEL_DB_POOL_MAX", value_name = "N")]
    pub db_pool_max: Option<String>,
    /// Postgres pool: connections kept open when idle.
    #[arg(long, env = "KEEL_DB_POOL_MIN_IDLE", value_name = "N")]
    pub db_pool_min_idle: Option<String>,
    /// Postgres pool: connections older than this are replaced.
    #[arg(long, env = "KEEL_DB_POOL_MAX_LIFETIME", value_name = "DURATION")]
    pub db_pool_max_lifetime: Option<String>,
    /// Postgres pool: longest wait for a free connection.
    #[arg(long, env = "KEEL_DB_ACQUIRE_TIMEOUT", value_name = "DURATION")]
    pub db_acquire_timeout: Option<String>,
    /// How long finished jobs are kept before deletion.
    #[arg(long, env = "KEEL_RETENTION", value_name = "DURATION")]
    pub retention: Option<String>,
    /// How long an Idempotency-Key is remembered.
    #[arg(long, env = "KEEL_IDEMPOTENCY_TTL", value_name = "DURATION")]
    pub idempotency_ttl: Option<String>,
    /// Longest an external worker's lease may wait for a job (a longer `wait` is cut to
    /// it), up to 30s.
    #[arg(long, env = "KEEL_MAX_LEASE_WAIT", value_name = "DURATION")]
    pub max_lease_wait: Option<String>,
    /// Largest accepted request body, bytes.
    #[arg(long, env = "KEEL_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<String>,
    /// Largest accepted job args, bytes of JSON.
    #[arg(long, env = "KEEL_MAX_ARGS_BYTES", value_name = "BYTES")]
    pub max_args_bytes: Option<String>,
    /// API keys as TENANT=SHA256HEX[:operator][,…] (hash a key with `keel hash-key`); an
    /// operator key may act for any tenant and pause or resume queues.
    #[arg(long, env = "KEEL_API_KEYS", value_name = "LIST")]
    pub api_keys: Option<String>,
    /// Serve a non-loopback address without API keys (anyone who can connect can do anything).
    #[arg(long, env = "KEEL_INSECURE_NO_AUTH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_no_auth: Option<String>,
    /// Let the webhook executor call private and loopback addresses.
    #[arg(long, env = "KEEL_WEBHOOK_ALLOW_PRIVATE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub webhook_allow_private: Option<String>,
    /// Webhook requests in flight to one host at once (default 32); more wait up to
    /// --webhook-host-wait, then the attempt fails and is retried later.
    #[arg(long, env = "KEEL_WEBHOOK_HOST_CONCURRENCY", value_name = "N")]
    pub webhook_host_concurrency: Option<String>,
    /// Longest a webhook job waits for its host's concurrency or rate limit (default 5s).
    #[arg(long, env = "KEEL_WEBHOOK_HOST_WAIT", value_name = "DURATION")]
    pub webhook_host_wait: Option<String>,
    /// Rate limit per webhook host, e.g. 50/s or 50/s:100 (with a burst); off (default) =
    /// unlimited.
    #[arg(long, env = "KEEL_WEBHOOK_HOST_RATE_LIMIT", value_name = "RATE")]
    pub webhook_host_rate_limit: Option<String>,
    /// Sign webhook requests (Standard Webhooks: webhook-id, webhook-timestamp,
    /// webhook-signature) with this whsec_<base64> secret.
    #[arg(
        long,
        env = "KEEL_WEBHOOK_SIGNING_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_signing_secret: Option<String>,
    /// How long a lease lasts without a heartbeat before the job is rescued.
    #[arg(long, env = "KEEL_LEASE_TIMEOUT", value_name = "DURATION")]
    pub lease_timeout: Option<String>,
    /// How often running jobs' leases are renewed (must be under the lease timeout).
    #[arg(long, env = "KEEL_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// Fallback poll interval of idle dispatchers (wakeups are immediate; this bounds a missed one).
    #[arg(long, env = "KEEL_POLL_INTERVAL", value_name = "DURATION")]
    pub poll_interval: Option<String>,
    /// How often maintenance (promote, rescue, retention) runs.
    #[arg(long, env = "KEEL_MAINTENANCE_INTERVAL", value_name = "DURATION")]
    pub maintenance_interval: Option<String>,
    /// Name of this process in leases and logs (default: host-pid).
    #[arg(long, env = "KEEL_WORKER_ID", value_name = "ID")]
    pub worker_id: Option<String>,
    /// Term of the maintenance leader (promotion, rescue, retention, cron) unless renewed:
    /// when the leader dies, another replica takes over after at most this long.
    #[arg(long, env = "KEEL_LEADER_TTL", value_name = "DURATION")]
    pub leader_ttl: Option<String>,
    /// Jobs kept in the read cache of GET /v1/jobs/{id} and /result (0 turns it off).
    #[arg(long, env = "KEEL_JOB_CACHE_CAPACITY", value_name = "N")]
    pub job_cache_capacity: Option<String>,
    /// Admission control: the concurrency limit of /v1 requests before anything is learned
    /// (default 256, kept between the min and the max).
    #[arg(long, env = "KEEL_ADMISSION_LIMIT_INITIAL", value_name = "N")]
    pub admission_limit_initial: Option<String>,
    /// Admission control: the limit never adapts below this (default 32, or the max if lower).
    #[arg(long, env = "KEEL_ADMISSION_LIMIT_MIN", value_name = "N")]
    pub admission_limit_min: Option<String>,
    /// Admission control: hard cap on /v1 requests in flight; above the adaptive limit
    /// requests get 503 with Retry-After at once (default 2048).
    #[arg(long, env = "KEEL_ADMISSION_LIMIT_MAX", value_name = "N")]
    pub admission_limit_max: Option<String>,
    /// Admission control: how long a request above the limit may wait for a slot before it
    /// is shed (default 250ms; 0 sheds at once).
    #[arg(long, env = "KEEL_ADMISSION_MAX_WAIT", value_name = "DURATION")]
    pub admission_max_wait: Option<String>,
    /// Refuse enqueues with 503 while more jobs than this wait to run (0 = no cap).
    #[arg(long, env = "KEEL_MAX_QUEUE_BACKLOG", value_name = "JOBS")]
    pub max_queue_backlog: Option<String>,
    /// Default rate limit of each tenant, e.g. 200/s, 600/m or 200/s:400 (with a burst);
    /// off = unlimited (default).
    #[arg(long, env = "KEEL_RATE_LIMIT", value_name = "RATE")]
    pub rate_limit: Option<String>,
    /// Burst of the default rate limit: requests a quiet tenant may send at once (default:
    /// the rate's count).
    #[arg(long, env = "KEEL_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<String>,
    /// Per-tenant rate limits overriding the default: TENANT=RATE[:BURST][,…], e.g.
    /// acme=50/s:100,other=10/s.
    #[arg(long, env = "KEEL_TENANT_RATE_LIMITS", value_name = "LIST")]
    pub tenant_rate_limits: Option<String>,
    /// Rate limit of each API key, on top of its tenant's, e.g. 100/s:200; off (default) =
    /// keys share their tenant's limit.
    #[arg(long, env = "KEEL_API_KEY_RATE_LIMIT", value_name = "RATE")]
    pub api_key_rate_limit: Option<String>,
    /// Store calls in flight at once (the database bulkhead); callers beyond it wait no
    /// longer than their deadline, then get 503 (default 512).
    #[arg(long, env = "KEEL_STORE_MAX_IN_FLIGHT", value_name = "N")]
    pub store_max_in_flight: Option<String>,
    /// Fault injection at startup: DEP.SETTING=VALUE[,…] with DEP one of auth, store_read,
    /// store_write, webhook and SETTING latency_ms or error_rate, e.g.
    /// auth.latency_ms=3000,store_write.error_rate=0.5. Change it while running with
    /// PUT /debug/chaos on the admin listener.
    #[arg(long, env = "KEEL_CHAOS", value_name = "FAULTS")]
    pub chaos: Option<String>,
    /// Chaos switch from the seed: authentication takes 3 s (past the default 2 s deadline).
    #[arg(long, env = "SLOW_AUTH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub slow_auth: Option<String>,
    /// Chaos switch from the seed: every store call fails as "connection refused".
    #[arg(long, env = "DB_FAILURE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub db_failure: Option<String>,
}

/// Effective, validated configuration.
#[derive(Clone, Serialize)]
pub struct Config {
    /// API listener.
    pub addr: SocketAddr,
    /// Admin listener; `None` when switched off.
    pub admin_addr: Option<SocketAddr>,
    /// Admin bearer token, if any (shown only as redacted).
    #[serde(serialize_with = "admin_token_redacted")]
    pub admin_token: Option<AdminToken>,
    /// Job store.
    #[serde(serialize_with = "redacted_url")]
    pub database_url: DatabaseUrl,
    /// How long startup retries an unreachable database.
    #[serde(with = "duration_text")]
    pub database_wait: Duration,
    /// Per-request deadline.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Shutdown grace period.
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
    /// How long the API keeps accepting after the signal, with readiness failing, before
    /// its listener closes (counted in the grace period).
    #[serde(with = "duration_text")]
    pub shutdown_delay: Duration,
    /// From a request head's first byte to its last, at most.
    #[serde(with = "duration_text")]
    pub header_read_timeout: Duration,
    /// Keep-alive idle timeout of API connections.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// Cap on API connections.
    pub max_connections: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directives.
    pub log_level: String,
    /// Queues run here.
    #[serde(serialize_with = "queues_text")]
    pub queues: Vec<QueueConfig>,
    /// Most jobs leased ahead per queue; `None` = the runtime's default cap.
    pub prefetch: Option<usize>,
    /// Postgres pool: most connections.
    pub db_pool_max: usize,
    /// Postgres pool: warm idle connections.
    pub db_pool_min_idle: usize,
    /// Postgres pool: connection lifetime.
    #[serde(with = "duration_text")]
    pub db_pool_max_lifetime: Duration,
    /// Postgres pool: acquire timeout.
    #[serde(with = "duration_text")]
    pub db_acquire_timeout: Duration,
    /// Finished-job retention.
    #[serde(with = "duration_text")]
    pub retention: Duration,
    /// Idempotency key lifetime.
    #[serde(with = "duration_text")]
    pub idempotency_ttl: Duration,
    /// Longest wait of an external worker's lease.
    #[serde(with = "duration_text")]
    pub max_lease_wait: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest job args.
    pub max_args_bytes: usize,
    /// API keys (digests only), each scoped to a tenant.
    #[serde(serialize_with = "keys_redacted")]
    pub api_keys: Vec<ApiKey>,
    /// Serve non-loopback without keys.
    pub insecure_no_auth: bool,
    /// Webhooks may target private addresses.
    pub webhook_allow_private: bool,
    /// Webhook requests in flight per host.
    pub webhook_host_concurrency: usize,
    /// Longest wait for a host's concurrency or rate limit.
    #[serde(with = "duration_text")]
    pub webhook_host_wait: Duration,
    /// Requests per second (and burst) per webhook host, if limited.
    #[serde(serialize_with = "host_rate_text")]
    pub webhook_host_rate_limit: Option<HostRateLimit>,
    /// The webhook signing secret, if any (shown only as redacted).
    #[serde(serialize_with = "secret_redacted")]
    pub webhook_signing_secret: Option<SigningSecret>,
    /// Lease duration.
    #[serde(with = "duration_text")]
    pub lease_timeout: Duration,
    /// Heartbeat period.
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// Dispatcher poll fallback.
    #[serde(with = "duration_text")]
    pub poll_interval: Duration,
    /// Maintenance period.
    #[serde(with = "duration_text")]
    pub maintenance_interval: Duration,
    /// This process's worker id.
    pub worker_id: WorkerId,
    /// Maintenance leader's term.
    #[serde(with = "duration_text")]
    pub leader_ttl: Duration,
    /// Job read cache entries (0 = off).
    pub job_cache_capacity: u64,
    /// Admission control: starting concurrency limit.
    pub admission_limit_initial: u32,
    /// Admission control: lowest limit.
    pub admission_limit_min: u32,
    /// Admission control: highest limit (hard cap on requests in flight).
    pub admission_limit_max: u32,
    /// Admission control: longest wait for a slot.
    #[serde(with = "duration_text")]
    pub admission_max_wait: Duration,
    /// Enqueues refused above this many waiting jobs; 0 = no cap.
    pub max_queue_backlog: u64,
    /// Default per-tenant rate (burst included), if any.
    #[serde(serialize_with = "rate_text")]
    pub rate_limit: Option<Rate>,
    /// Per-tenant overrides.
    #[serde(serialize_with = "tenant_rates_text")]
    pub tenant_rate_limits: BTreeMap<TenantId, Rate>,
    /// Per-API-key rate, if any.
    #[serde(serialize_with = "rate_text")]
    pub api_key_rate_limit: Option<Rate>,
    /// Database bulkhead size.
    pub store_max_in_flight: usize,
    /// Faults from `KEEL_CHAOS` (the seed switches are applied on top, see
    /// [`Config::chaos_settings`]).
    pub chaos: ChaosSettings,
    /// `SLOW_AUTH`.
    pub slow_auth: bool,
    /// `DB_FAILURE`.
    pub db_failure: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The JSON form is already redacted; reuse it so Debug can never leak more.
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => f.write_str("Config { .. }"),
        }
    }
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<(String, String)>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for (field, msg) in &self.0 {
            writeln!(f, "  {field}: {msg}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

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

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (use true or false)")),
    }
}

fn parse_queues(s: &str) -> Result<Vec<QueueConfig>, String> {
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

/// `TENANT=SHA256HEX[:ROLE],…`: each key's tenant, digest and role (`tenant` by default,
/// or `operator`).
fn parse_api_keys(s: &str) -> Result<Vec<ApiKey>, String> {
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

/// The highest admission limit accepted: far above what one process can serve, low enough
/// that a typo cannot turn the cap off.
const MAX_ADMISSION_LIMIT: usize = 1_000_000;

/// `off` (or nothing) for no limit, else a [`Rate`]; also says whether the text named a
/// burst (`RATE:BURST`), which `rate_limit_burst` must not contradict.
fn parse_optional_rate(s: &str) -> Result<(Option<Rate>, bool), String> {
    let s = s.trim();
    if s.is_empty() || s.eq_ignore_ascii_case("off") {
        return Ok((None, false));
    }
    Rate::parse(s).map(|r| (Some(r), s.contains(':')))
}

/// A per-host webhook rate: `N/s[:BURST]` (per second only: hosts are limited in
/// requests per second), or `off`.
fn parse_host_rate(s: &str) -> Result<Option<HostRateLimit>, String> {
    let (rate, _) = parse_optional_rate(s)?;
    let Some(rate) = rate else { return Ok(None) };
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

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP:PORT address (e.g. 127.0.0.1:8080)"))
}

fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("must be a whole number in {min}..={max}, got {s:?}"))
}

/// Reads the TOML file into `name → text` pairs, refusing unknown keys (a typo must not be
/// silently ignored).
fn read_file(path: &PathBuf, errors: &mut Vec<(String, String)>) -> BTreeMap<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => file_settings(&text, &path.display().to_string(), errors),
        Err(e) => {
            errors.push((
                "config".into(),
                format!("cannot read {}: {e}", path.display()),
            ));
            BTreeMap::new()
        }
    }
}

/// A config file's text (read from `origin`, named in messages) as `name → text` pairs.
fn file_settings(
    text: &str,
    origin: &str,
    errors: &mut Vec<(String, String)>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            errors.push(("config".into(), format!("{origin} is not valid TOML: {e}")));
            return out;
        }
    };
    for (key, value) in table {
        if !FIELDS.contains(&key.as_str()) {
            errors.push((
                format!("config:{key}"),
                format!("unknown setting in {origin}"),
            ));
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                errors.push((
                    format!("config:{key}"),
                    format!("unsupported value {other}"),
                ));
                continue;
            }
        };
        out.insert(key, text);
    }
    out
}

/// Setting names, as flags use them with `_` (and the TOML file uses them).
const FIELDS: &[&str] = &[
    "addr",
    "admin_addr",
    "admin_token",
    "database_url",
    "database_wait",
    "request_timeout",
    "shutdown_grace",
    "shutdown_delay",
    "header_read_timeout",
    "idle_timeout",
    "max_connections",
    "log_format",
    "log_level",
    "queues",
    "prefetch",
    "db_pool_max",
    "db_pool_min_idle",
    "db_pool_max_lifetime",
    "db_acquire_timeout",
    "retention",
    "idempotency_ttl",
    "max_lease_wait",
    "max_body_bytes",
    "max_args_bytes",
    "api_keys",
    "insecure_no_auth",
    "webhook_allow_private",
    "webhook_host_concurrency",
    "webhook_host_wait",
    "webhook_host_rate_limit",
    "webhook_signing_secret",
    "lease_timeout",
    "heartbeat_interval",
    "poll_interval",
    "maintenance_interval",
    "worker_id",
    "leader_ttl",
    "job_cache_capacity",
    "admission_limit_initial",
    "admission_limit_min",
    "admission_limit_max",
    "admission_max_wait",
    "max_queue_backlog",
    "rate_limit",
    "rate_limit_burst",
    "tenant_rate_limits",
    "api_key_rate_limit",
    "store_max_in_flight",
    "chaos",
    "slow_auth",
    "db_failure",
];

/// One place to read a setting: the flag/env value, else the file's, else the default.
struct Sources<'a> {
    args: BTreeMap<&'static str, Option<&'a String>>,
    file: BTreeMap<String, String>,
    errors: Vec<(String, String)>,
}

impl Sources<'_> {
    fn get<T>(
        &mut self,
        name: &'static str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self
            .args
            .get(name)
            .copied()
            .flatten()
            .cloned()
            .or_else(|| self.file.get(name).cloned())
            .unwrap_or_else(|| default.to_owned());
        match parse(&raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push((name.to_owned(), e));
                None
            }
        }
    }
}

fn default_worker_id() -> String {
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

impl Config {
    /// Merges the file (if any), env and flags, and validates everything, returning every
    /// problem at once.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let file = args
            .config
            .as_ref()
            .map(|p| read_file(p, &mut errors))
            .unwrap_or_default();
        Self::resolve_sources(args, file, errors)
    }

    /// The settings of a config file's text alone, with no flags or environment: what
    /// `--config` reads, callable without a file (the config fuzz target and its proptest
    /// twin).
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let file = file_settings(text, "the config file", &mut errors);
        Self::resolve_sources(&ServeArgs::default(), file, errors)
    }

    fn resolve_sources(
        args: &ServeArgs,
        file: BTreeMap<String, String>,
        errors: Vec<(String, String)>,
    ) -> Result<Self, ConfigErrors> {
        // `Sources::get` returns `None` only after recording an error, and the relation
        // checks record one whenever they leave a value unset, so with no errors every value
        // is present.
        const PARSED: &str = "a setting that failed to parse always records an error";
        let a = args;
        let mut s = Sources {
            args: BTreeMap::from([
                ("addr", a.addr.as_ref()),
                ("admin_addr", a.admin_addr.as_ref()),
                ("admin_token", a.admin_token.as_ref()),
                ("database_url", a.database_url.as_ref()),
                ("database_wait", a.database_wait.as_ref()),
                ("request_timeout", a.request_timeout.as_ref()),
                ("shutdown_grace", a.shutdown_grace.as_ref()),
                ("shutdown_delay", a.shutdown_delay.as_ref()),
                ("header_read_timeout", a.header_read_timeout.as_ref()),
                ("idle_timeout", a.idle_timeout.as_ref()),
                ("max_connections", a.max_connections.as_ref()),
                ("log_format", a.log_format.as_ref()),
                ("log_level", a.log_level.as_ref()),
                ("queues", a.queues.as_ref()),
                ("prefetch", a.prefetch.as_ref()),
                ("db_pool_max", a.db_pool_max.as_ref()),
                ("db_pool_min_idle", a.db_pool_min_idle.as_ref()),
                ("db_pool_max_lifetime", a.db_pool_max_lifetime.as_ref()),
                ("db_acquire_timeout", a.db_acquire_timeout.as_ref()),
                ("retention", a.retention.as_ref()),
                ("idempotency_ttl", a.idempotency_ttl.as_ref()),
                ("max_lease_wait", a.max_lease_wait.as_ref()),
                ("max_body_bytes", a.max_body_bytes.as_ref()),
                ("max_args_bytes", a.max_args_bytes.as_ref()),
                ("api_keys", a.api_keys.as_ref()),
                ("insecure_no_auth", a.insecure_no_auth.as_ref()),
                ("webhook_allow_private", a.webhook_allow_private.as_ref()),
                (
                    "webhook_host_concurrency",
                    a.webhook_host_concurrency.as_ref(),
                ),
                ("webhook_host_wait", a.webhook_host_wait.as_ref()),
                (
                    "webhook_host_rate_limit",
                    a.webhook_host_rate_limit.as_ref(),
                ),
                ("webhook_signing_secret", a.webhook_signing_secret.as_ref()),
                ("lease_timeout", a.lease_timeout.as_ref()),
                ("heartbeat_interval", a.heartbeat_interval.as_ref()),
                ("poll_interval", a.poll_interval.as_ref()),
                ("maintenance_interval", a.maintenance_interval.as_ref()),
                ("worker_id", a.worker_id.as_ref()),
                ("leader_ttl", a.leader_ttl.as_ref()),
                ("job_cache_capacity", a.job_cache_capacity.as_ref()),
                (
                    "admission_limit_initial",
                    a.admission_limit_initial.as_ref(),
                ),
                ("admission_limit_min", a.admission_limit_min.as_ref()),
                ("admission_limit_max", a.admission_limit_max.as_ref()),
                ("admission_max_wait", a.admission_max_wait.as_ref()),
                ("max_queue_backlog", a.max_queue_backlog.as_ref()),
                ("rate_limit", a.rate_limit.as_ref()),
                ("rate_limit_burst", a.rate_limit_burst.as_ref()),
                ("tenant_rate_limits", a.tenant_rate_limits.as_ref()),
                ("api_key_rate_limit", a.api_key_rate_limit.as_ref()),
                ("store_max_in_flight", a.store_max_in_flight.as_ref()),
                ("chaos", a.chaos.as_ref()),
                ("slow_auth", a.slow_auth.as_ref()),
                ("db_failure", a.db_failure.as_ref()),
            ]),
            file,
            errors,
        };
        let positive = |d: Duration| {
            if d.is_zero() {
                Err("must be greater than zero".to_owned())
            } else {
                Ok(d)
            }
        };
        let dur = |s: &str| parse_duration(s).and_then(positive);
        let addr = s.get("addr", "127.0.0.1:8080", parse_addr);
        let admin_addr = s.get("admin_addr", "127.0.0.1:9000", |v| {
            if v.trim().eq_ignore_ascii_case("off") {
                Ok(None)
            } else {
                parse_addr(v).map(Some)
            }
        });
        let admin_token = s.get("admin_token", "", |v| {
            if v.is_empty() {
                Ok(None)
            } else {
                AdminToken::parse(v).map(Some)
            }
        });
        let database_url = s.get("database_url", "sqlite://keel.db", DatabaseUrl::parse);
        let database_wait = s.get("database_wait", "30s", parse_duration);
        let request_timeout = s.get("request_timeout", "2s", dur);
        let shutdown_grace = s.get("shutdown_grace", "30s", parse_duration);
        let shutdown_delay = s.get("shutdown_delay", "0s", parse_duration);
        let header_read_timeout = s.get("header_read_timeout", "10s", dur);
        let idle_timeout = s.get("idle_timeout", "60s", dur);
        let max_connections = s.get("max_connections", "10000", |v| parse_count(v, 1, 1_000_000));
        let log_format = s.get("log_format", "json", |v| match v {
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            other => Err(format!("{other:?} is not json or pretty")),
        });
        let log_level = s.get("log_level", "info", |v| {
            tracing_subscriber::EnvFilter::try_new(v)
                .map(|_| v.to_owned())
                .map_err(|e| format!("{v:?} is not a valid filter: {e}"))
        });
        let queues = s.get("queues", "default:8", parse_queues);
        let prefetch = s.get("prefetch", "auto", |v| match v {
            "auto" => Ok(None),
            n => parse_count(n, 0, keel_runtime::RuntimeConfig::MAX_PREFETCH)
                .map(Some)
                .map_err(|e| format!("must be auto or a number: {e}")),
        });
        let db_pool_max = s.get("db_pool_max", "16", |v| parse_count(v, 1, 10_000));
        let db_pool_min_idle = s.get("db_pool_min_idle", "2", |v| parse_count(v, 0, 10_000));
        let db_pool_max_lifetime = s.get("db_pool_max_lifetime", "30m", dur);
        let db_acquire_timeout = s.get("db_acquire_timeout", "5s", dur);
        let retention = s.get("retention", "7d", dur);
        let idempotency_ttl = s.get("idempotency_ttl", "24h", dur);
        let max_lease_wait = s.get("max_lease_wait", "30s", |v| {
            let d = dur(v)?;
            if d > keel_api::worker_in::MAX_WAIT {
                return Err("must be at most 30s (the protocol's longest wait)".to_owned());
            }
            Ok(d)
        });
        let max_body_bytes = s.get("max_body_bytes", "2097152", |v| {
            parse_count(v, 1024, 64 << 20)
        });
        let max_args_bytes = s.get("max_args_bytes", "1048576", |v| {
            parse_count(v, 2, keel_core::NewJob::DEFAULT_MAX_ARGS_BYTES)
        });
        let api_keys = s.get("api_keys", "", parse_api_keys);
        let insecure_no_auth = s.get("insecure_no_auth", "false", parse_bool);
        let webhook_allow_private = s.get("webhook_allow_private", "false", parse_bool);
        let webhook_host_concurrency = s.get("webhook_host_concurrency", "32", |v| {
            parse_count(v, 1, 10_000)
        });
        let webhook_host_wait = s.get("webhook_host_wait", "5s", dur);
        let webhook_host_rate_limit = s.get("webhook_host_rate_limit", "off", parse_host_rate);
        let webhook_signing_secret = s.get("webhook_signing_secret", "", |v| {
            if v.trim().is_empty() {
                Ok(None)
            } else {
                SigningSecret::parse(v).map(Some)
            }
        });
        let lease_timeout = s.get("lease_timeout", "30s", dur);
        let heartbeat_interval = s.get("heartbeat_interval", "10s", dur);
        let poll_interval = s.get("poll_interval", "1s", dur);
        let maintenance_interval = s.get("maintenance_interval", "1s", dur);
        let default_id = default_worker_id();
        let worker_id = s.get("worker_id", &default_id, |v| {
            WorkerId::parse(v).map_err(|e| e.to_string())
        });
        let leader_ttl = s.get("leader_ttl", "5s", |v| {
            let d = dur(v)?;
            if d < Duration::from_millis(500) {
                return Err(format!(
                    "must be at least 500ms (a term must outlast a few database round trips), got {v:?}"
                ));
            }
            Ok(d)
        });
        let job_cache_capacity = s.get("job_cache_capacity", "10000", |v| {
            parse_count(v, 0, 10_000_000).map(|n| n as u64)
        });
        // Empty means "not set": the admission bounds left unset follow the ones that are.
        let limit = |v: &str| -> Result<Option<u32>, String> {
            if v.trim().is_empty() {
                return Ok(None);
            }
            parse_count(v, 1, MAX_ADMISSION_LIMIT).map(|n| Some(n as u32))
        };
        let admission_limit_initial = s.get("admission_limit_initial", "", limit);
        let admission_limit_min = s.get("admission_limit_min", "", limit);
        let admission_limit_max = s.get("admission_limit_max", "", limit);
        let admission_max_wait = s.get("admission_max_wait", "250ms", |v| {
            parse_duration(v).and_then(|d| {
                if d > Duration::from_secs(60) {
                    Err("must be at most 60s (a request waits inside its deadline)".to_owned())
                } else {
                    Ok(d)
                }
            })
        });
        let max_queue_backlog = s.get("max_queue_backlog", "0", |v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("must be a whole number of jobs (0 = no cap), got {v:?}"))
        });
        let rate_limit = s.get("rate_limit", "off", parse_optional_rate);
        let rate_limit_burst = s.get("rate_limit_burst", "", |v| {
            if v.trim().is_empty() {
                return Ok(None);
            }
            v.trim()
                .parse::<NonZeroU32>()
                .map(Some)
                .map_err(|_| format!("must be a whole number above 0, got {v:?}"))
        });
        let tenant_rate_limits = s.get("tenant_rate_limits", "", parse_tenant_rates);
        let api_key_rate_limit = s.get("api_key_rate_limit", "off", parse_optional_rate);
        let default_in_flight = StoreGuardConfig::default().max_in_flight.to_string();
        let store_max_in_flight = s.get("store_max_in_flight", &default_in_flight, |v| {
            parse_count(v, 1, 100_000)
        });
        let chaos = s.get("chaos", "", |v| {
            ChaosSettings::parse(v).map_err(|errors| errors.join("; "))
        });
        let slow_auth = s.get("slow_auth", "false", parse_bool);
        let db_failure = s.get("db_failure", "false", parse_bool);
        let mut errors = s.errors;

        // Relations between fields, checked only when both sides parsed.
        if let (Some(delay), Some(grace)) = (shutdown_delay, shutdown_grace)
            && delay > Duration::ZERO
            && delay >= grace
        {
            errors.push((
                "shutdown_delay".into(),
                format!(
                    "must be shorter than shutdown_grace ({grace:?}): the delay is spent inside the grace period"
                ),
            ));
        }
        if let (Some(hb), Some(lease)) = (heartbeat_interval, lease_timeout)
            && hb >= lease
        {
            errors.push((
                "heartbeat_interval".into(),
                format!("must be shorter than lease_timeout ({lease:?}), or leases lapse between heartbeats"),
            ));
        }
        if let (Some(min), Some(max)) = (db_pool_min_idle, db_pool_max)
            && min > max
        {
            errors.push((
                "db_pool_min_idle".into(),
                format!("must not exceed db_pool_max ({max})"),
            ));
        }
        if let (Some(args), Some(body)) = (max_args_bytes, max_body_bytes)
            && args > body
        {
            errors.push((
                "max_args_bytes".into(),
                format!("must not exceed max_body_bytes ({body})"),
            ));
        }
        if let (Some(addr), Some(keys), Some(insecure)) = (addr, &api_keys, insecure_no_auth)
            && !addr.ip().is_loopback()
            && keys.is_empty()
            && !insecure
        {
            errors.push((
                "addr".into(),
                format!(
                    "refusing to listen on non-loopback {addr} without API keys: set KEEL_API_KEYS, or pass --insecure-no-auth to accept the risk"
                ),
            ));
        }
        // A token that failed to parse is reported under admin_token, not here too.
        if let (Some(Some(admin)), Some(None)) = (admin_addr, &admin_token)
            && !admin.ip().is_loopback()
        {
            errors.push((
                "admin_addr".into(),
                format!("refusing to put the admin listener on non-loopback {admin} without a token: it serves profiles, task dumps, configuration and the chaos switches; set KEEL_ADMIN_TOKEN (every admin request must then send Authorization: Bearer <token>), or keep it on 127.0.0.1 or ::1"),
            ));
        }

        // The admission bounds: defaults follow the bounds that were given, so setting only
        // the max (say 100) does not leave the default initial limit (256) above it.
        let mut admission = None;
        if let (Some(initial), Some(min), Some(max)) = (
            admission_limit_initial,
            admission_limit_min,
            admission_limit_max,
        ) {
            let d = AdaptiveLimitConfig::default();
            let max_v = max.unwrap_or(d.max.max(min.unwrap_or(0)));
            let min_v = min.unwrap_or(d.min.min(max_v));
            let initial_v = initial.unwrap_or(d.initial.clamp(min_v.min(max_v), max_v));
            if min_v > max_v {
                errors.push((
                    "admission_limit_min".into(),
                    format!("must not exceed admission_limit_max ({max_v})"),
                ));
            } else if !(min_v..=max_v).contains(&initial_v) {
                errors.push((
                    "admission_limit_initial".into(),
                    format!("must lie between admission_limit_min ({min_v}) and admission_limit_max ({max_v})"),
                ));
            } else {
                admission = Some((initial_v, min_v, max_v));
            }
        }
        let mut rate = None;
        if let (Some((rate_v, explicit_burst)), Some(burst)) = (rate_limit, rate_limit_burst) {
            match (rate_v, burst) {
                (None, Some(_)) => errors.push((
                    "rate_limit_burst".into(),
                    "needs rate_limit (a burst of what?)".to_owned(),
                )),
                (Some(_), Some(_)) if explicit_burst => errors.push((
                    "rate_limit_burst".into(),
                    "rate_limit already names a burst (RATE:BURST); give it in one place"
                        .to_owned(),
                )),
                (Some(r), Some(b)) => rate = Some(Some(Rate { burst: b, ..r })),
                (r, None) => rate = Some(r),
            }
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let (admission_limit_initial, admission_limit_min, admission_limit_max) =
            admission.expect(PARSED);
        Ok(Self {
            addr: addr.expect(PARSED),
            admin_addr: admin_addr.expect(PARSED),
            admin_token: admin_token.expect(PARSED),
            database_url: database_url.expect(PARSED),
            database_wait: database_wait.expect(PARSED),
            request_timeout: request_timeout.expect(PARSED),
            shutdown_grace: shutdown_grace.expect(PARSED),
            shutdown_delay: shutdown_delay.expect(PARSED),
            header_read_timeout: header_read_timeout.expect(PARSED),
            idle_timeout: idle_timeout.expect(PARSED),
            max_connections: max_connections.expect(PARSED),
            log_format: log_format.expect(PARSED),
            log_level: log_level.expect(PARSED),
            queues: queues.expect(PARSED),
            prefetch: prefetch.expect(PARSED),
            db_pool_max: db_pool_max.expect(PARSED),
            db_pool_min_idle: db_pool_min_idle.expect(PARSED),
            db_pool_max_lifetime: db_pool_max_lifetime.expect(PARSED),
            db_acquire_timeout: db_acquire_timeout.expect(PARSED),
            retention: retention.expect(PARSED),
            idempotency_ttl: idempotency_ttl.expect(PARSED),
            max_lease_wait: max_lease_wait.expect(PARSED),
            max_body_bytes: max_body_bytes.expect(PARSED),
            max_args_bytes: max_args_bytes.expect(PARSED),
            api_keys: api_keys.expect(PARSED),
            insecure_no_auth: insecure_no_auth.expect(PARSED),
            webhook_allow_private: webhook_allow_private.expect(PARSED),
            webhook_host_concurrency: webhook_host_concurrency.expect(PARSED),
            webhook_host_wait: webhook_host_wait.expect(PARSED),
            webhook_host_rate_limit: webhook_host_rate_limit.expect(PARSED),
            webhook_signing_secret: webhook_signing_secret.expect(PARSED),
            lease_timeout: lease_timeout.expect(PARSED),
            heartbeat_interval: heartbeat_interval.expect(PARSED),
            poll_interval: poll_interval.expect(PARSED),
            maintenance_interval: maintenance_interval.expect(PARSED),
            worker_id: worker_id.expect(PARSED),
            leader_ttl: leader_ttl.expect(PARSED),
            job_cache_capacity: job_cache_capacity.expect(PARSED),
            admission_limit_initial,
            admission_limit_min,
            admission_limit_max,
            admission_max_wait: admission_max_wait.expect(PARSED),
            max_queue_backlog: max_queue_backlog.expect(PARSED),
            rate_limit: rate.expect(PARSED),
            tenant_rate_limits: tenant_rate_limits.expect(PARSED),
            api_key_rate_limit: api_key_rate_limit.expect(PARSED).0,
            store_max_in_flight: store_max_in_flight.expect(PARSED),
            chaos: chaos.expect(PARSED),
            slow_auth: slow_auth.expect(PARSED),
            db_failure: db_failure.expect(PARSED),
        })
    }
}

impl Config {
    /// The faults to start with: `KEEL_CHAOS`, with the seed's `SLOW_AUTH` and `DB_FAILURE`
    /// switches applied on top.
    pub fn chaos_settings(&self) -> ChaosSettings {
        self.chaos
            .with_seed_switches(self.slow_auth, self.db_failure)
    }

    /// The adaptive limit's settings (bounds from the config, tuning from the defaults).
    pub fn admission_limit(&self) -> AdaptiveLimitConfig {
        AdaptiveLimitConfig {
            initial: self.admission_limit_initial,
            min: self.admission_limit_min,
            max: self.admission_limit_max,
            max_wait: self.admission_max_wait,
            ..AdaptiveLimitConfig::default()
        }
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn database_url_kind(&self) -> &'static str {
        match self.database_url {
            DatabaseUrl::Sqlite(_) => "sqlite",
            DatabaseUrl::Postgres(_) => "postgres",
        }
    }
}

fn redacted_url<S: serde::Serializer>(url: &DatabaseUrl, s: S) -> Result<S::Ok, S::Error> {
    match url {
        DatabaseUrl::Sqlite(p) => s.serialize_str(&format!("sqlite://{}", p.display())),
        DatabaseUrl::Postgres(u) => s.serialize_str(&redact_password(u)),
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

fn keys_redacted<S: serde::Serializer>(keys: &[ApiKey], s: S) -> Result<S::Ok, S::Error> {
    let tenants: Vec<String> = keys
        .iter()
        .map(|k| match k.role {
            Role::Tenant => format!("{}=***", k.tenant),
            role => format!("{}=***:{}", k.tenant, role.as_str()),
        })
        .collect();
    tenants.serialize(s)
}

fn queues_text<S: serde::Serializer>(queues: &[QueueConfig], s: S) -> Result<S::Ok, S::Error> {
    let text: Vec<String> = queues
        .iter()
        .map(|q| format!("{}:{}", q.name, q.concurrency))
        .collect();
    s.serialize_str(&text.join(","))
}

fn rate_text<S: serde::Serializer>(rate: &Option<Rate>, s: S) -> Result<S::Ok, S::Error> {
    match rate {
        Some(r) => s.serialize_str(&r.to_string()),
        None => s.serialize_str("off"),
    }
}

fn host_rate_text<S: serde::Serializer>(
    rate: &Option<HostRateLimit>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match rate {
        Some(r) => s.serialize_str(&format!("{}/s:{}", r.per_second, r.burst)),
        None => s.serialize_str("off"),
    }
}

fn admin_token_redacted<S: serde::Serializer>(
    token: &Option<AdminToken>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match token {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

fn secret_redacted<S: serde::Serializer>(
    secret: &Option<SigningSecret>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("***"),
        None => s.serialize_none(),
    }
}

fn tenant_rates_text<S: serde::Serializer>(
    rates: &BTreeMap<TenantId, Rate>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let text: BTreeMap<&str, String> = rates
        .iter()
        .map(|(t, r)| (t.as_str(), r.to_string()))
        .collect();
    text.serialize(s)
}

/// Durations shown as whole milliseconds with a unit, e.g. `2000ms`.
mod duration_text {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("2").unwrap_err().contains("no unit"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("2w").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("99999999999s")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn defaults_are_valid_and_safe() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert!(c.addr.ip().is_loopback());
        assert!(c.admin_addr.is_some_and(|a| a.ip().is_loopback()));
        assert_eq!(c.database_url, DatabaseUrl::Sqlite("keel.db".into()));
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert_eq!(c.queues[0].name.as_str(), "default");
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let args = ServeArgs {
            addr: Some("nope".into()),
            request_timeout: Some("fast".into()),
            queues: Some("default:0".into()),
            log_format: Some("xml".into()),
            database_url: Some("mysql://x".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "addr",
                "database_url",
                "request_timeout",
                "log_format",
                "queues"
            ]
        );
        let text = err.to_string();
        assert!(text.contains("5 problems"), "{text}");
    }

    #[test]
    fn public_bind_needs_keys_or_explicit_insecurity() {
        let public = ServeArgs {
            addr: Some("0.0.0.0:8080".into()),
            ..Default::default()
        };
        let err = Config::resolve(&public).unwrap_err();
        assert!(err.to_string().contains("without API keys"), "{err}");
        let insecure = ServeArgs {
            insecure_no_auth: Some("true".into()),
            ..public.clone()
        };
        assert!(Config::resolve(&insecure).is_ok());
        let keyed = ServeArgs {
            api_keys: Some(format!("acme={}", "ab".repeat(32))),
            ..public
        };
        assert_eq!(Config::resolve(&keyed).unwrap().api_keys.len(), 1);
    }

    #[test]
    fn admin_listener_can_be_switched_off() {
        let c = Config::resolve(&ServeArgs {
            admin_addr: Some("off".into()),
            ..ServeArgs::default()
        })
        .unwrap();
        assert_eq!(c.admin_addr, None);
        assert_eq!(
            serde_json::to_value(&c).unwrap()["admin_addr"],
            serde_json::Value::Null
        );
        let err = Config::resolve(&ServeArgs {
            admin_addr: Some("of".into()),
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert_eq!(err.0[0].0, "admin_addr", "{err}");
    }

    #[test]
    fn admin_listener_stays_on_loopback() {
        let args = ServeArgs {
            admin_addr: Some("0.0.0.0:9000".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].0, "admin_addr", "{err}");
        assert!(err.0[0].1.contains("KEEL_ADMIN_TOKEN"), "{err}");
    }

    #[test]
    fn a_public_admin_listener_needs_a_token_and_hides_it() {
        let token = "an-admin-token-of-some-length";
        let args = ServeArgs {
            admin_addr: Some("0.0.0.0:9000".into()),
            admin_token: Some(token.into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert!(c.admin_token.is_some());
        let shown = serde_json::to_value(&c).unwrap();
        assert_eq!(shown["admin_token"], "***");
        assert!(!format!("{c:?}").contains(token));
        // A bad token is reported as such, once, even on a public address.
        let weak = ServeArgs {
            admin_token: Some("short".into()),
            ..args
        };
        let err = Config::resolve(&weak).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["admin_token"], "{err}");
        // On loopback, no token is needed and none is shown.
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap()["admin_token"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let args = ServeArgs {
            database_url: Some("postgres://keel:hunter2@db:5432/keel".into()),
            api_keys: Some(format!("acme={}", "cd".repeat(32))),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains(&"cd".repeat(32)), "{shown}");
        assert!(shown.contains("keel:***@db"), "{shown}");
    }

    #[test]
    fn file_values_sit_under_flags_and_typos_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keel.toml");
        std::fs::write(
            &path,
            "request_timeout = \"5s\"\nqueues = [\"a:2\", \"b:3\"]\nretention = \"1d\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            retention: Some("2d".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(
            c.retention,
            Duration::from_secs(2 * 86_400),
            "the flag wins"
        );
        assert_eq!(c.queues.len(), 2);
        std::fs::write(&path, "request_timeot = \"5s\"\n").unwrap();
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.to_string().contains("request_timeot"), "{err}");
    }

    #[test]
    fn protection_defaults_limit_nothing_but_concurrency() {
        let c = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.admission_limit(), AdaptiveLimitConfig::default());
        assert_eq!(c.max_queue_backlog, 0);
        assert_eq!(c.rate_limit, None);
        assert!(c.tenant_rate_limits.is_empty());
        assert_eq!(c.api_key_rate_limit, None);
        assert_eq!(
            c.store_max_in_flight,
            StoreGuardConfig::default().max_in_flight
        );
        assert!(!c.chaos_settings().is_active());
        let shown = serde_json::to_value(&c).unwrap();
        assert_eq!(shown["rate_limit"], "off");
        assert_eq!(shown["admission_limit_max"], 2048);
        assert_eq!(shown["chaos"]["auth"]["latency_ms"], 0);
    }

    #[test]
    fn every_bad_protection_setting_is_reported_at_once() {
        let args = ServeArgs {
            admission_limit_initial: Some("0".into()),
            admission_limit_min: Some("many".into()),
            max_queue_backlog: Some("-1".into()),
            rate_limit: Some("fast".into()),
            rate_limit_burst: Some("0".into()),
            tenant_rate_limits: Some("acme=1/d".into()),
            api_key_rate_limit: Some("5".into()),
            store_max_in_flight: Some("0".into()),
            chaos: Some("db.latency_ms=1".into()),
            slow_auth: Some("maybe".into()),
            db_failure: Some("sure".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "admission_limit_initial",
                "admission_limit_min",
                "max_queue_backlog",
                "rate_limit",
                "rate_limit_burst",
                "tenant_rate_limits",
                "api_key_rate_limit",
                "store_max_in_flight",
                "chaos",
                "slow_auth",
                "db_failure",
            ],
            "{err}"
        );
    }

    #[test]
    fn admission_bounds_follow_the_ones_given_and_must_be_ordered() {
        let only_max = ServeArgs {
            admission_limit_max: Some("100".into()),
            ..Default::default()
        };
        let l = Config::resolve(&only_max).unwrap().admission_limit();
        assert_eq!((l.initial, l.min, l.max), (100, 32, 100));
        assert!(l.validate().is_ok());
        let tiny = ServeArgs {
            admission_limit_max: Some("1".into()),
            ..Default::default()
        };
        let l = Config::resolve(&tiny).unwrap().admission_limit();
        assert_eq!((l.initial, l.min, l.max), (1, 1, 1));

        let crossed = ServeArgs {
            admission_limit_min: Some("50".into()),
            admission_limit_max: Some("10".into()),
            ..Default::default()
        };
        let err = Config::resolve(&crossed).unwrap_err();
        assert_eq!(err.0[0].0, "admission_limit_min", "{err}");
        let outside = ServeArgs {
            admission_limit_initial: Some("5".into()),
            admission_limit_min: Some("10".into()),
            ..Default::default()
        };
        let err = Config::resolve(&outside).unwrap_err();
        assert_eq!(err.0[0].0, "admission_limit_initial", "{err}");
    }

    #[test]
    fn rate_limits_take_a_burst_in_one_place() {
        let args = ServeArgs {
            rate_limit: Some("200/s".into()),
            rate_limit_burst: Some("400".into()),
            tenant_rate_limits: Some("acme=50/s:100,other=10/s:20".into()),
            api_key_rate_limit: Some("off".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.rate_limit.unwrap().to_string(), "200/s:400");
        assert_eq!(c.tenant_rate_limits.len(), 2);
        let shown = serde_json::to_value(&c).unwrap();
        assert_eq!(shown["tenant_rate_limits"]["acme"], "50/s:100");

        let twice = ServeArgs {
            rate_limit: Some("200/s:300".into()),
            ..args.clone()
        };
        let err = Config::resolve(&twice).unwrap_err();
        assert_eq!(err.0[0].0, "rate_limit_burst", "{err}");
        let orphan = ServeArgs {
            rate_limit: None,
            ..args
        };
        let err = Config::resolve(&orphan).unwrap_err();
        assert!(err.to_string().contains("needs rate_limit"), "{err}");
    }

    #[test]
    fn the_seed_switches_add_to_keel_chaos() {
        let args = ServeArgs {
            chaos: Some("webhook.error_rate=0.5".into()),
            slow_auth: Some("true".into()),
            db_failure: Some("1".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        let chaos = c.chaos_settings();
        assert_eq!(chaos.auth.latency_ms, ChaosSettings::SLOW_AUTH_MS);
        assert_eq!(chaos.store_write.error_rate, 1.0);
        assert_eq!(chaos.webhook.error_rate, 0.5);
    }

    #[test]
    fn heartbeat_must_be_shorter_than_the_lease() {
        let args = ServeArgs {
            heartbeat_interval: Some("30s".into()),
            lease_timeout: Some("30s".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert_eq!(err.0[0].0, "heartbeat_interval");
    }

    /// The proptest twin of the `config` fuzz target: any file text is taken, or refused
    /// with at least one reason, never a panic. Lines are built from the real setting names
    /// and values near what each parser expects.
    mod twin {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|i| i.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
                prop::sample::select(vec![
                    "\"0s\"",
                    "\"1ms\"",
                    "\"30s\"",
                    "\"5m\"",
                    "\"off\"",
                    "\"0.0.0.0:0\"",
                    "\"[::1]:8080\"",
                    "\"sqlite://x.db\"",
                    "\"postgres://u@h/d\"",
                    "\"default:4,bulk:0\"",
                    "\"a=00\"",
                    "\"10/s:5\"",
                    "\"json\"",
                    "[\"a\", 1]",
                    "{ a = 1 }",
                    "1.5",
                    "1979-05-27T07:32:00Z",
                ])
                .prop_map(str::to_owned),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_config_file_is_taken_or_refused_with_reasons(
                lines in prop::collection::vec(
                    (
                        prop_oneof![
                            prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
                            "[a-z_]{1,12}",
                        ],
                        value(),
                    ),
                    0..8,
                ),
                junk in "[ -~\n]{0,40}",
            ) {
                let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                for text in [text.as_str(), junk.as_str()] {
                    if let Err(e) = Config::from_toml(text) {
                        prop_assert!(!e.0.is_empty(), "refused without a reason: {text:?}");
                    }
                }
            }
        }
    }
}
