//! Every setting of `keel serve`, declared once: what `--help`, the environment, the TOML
//! file, [`Config`], `/debug/config` and the README's table all derive from (see
//! [`declare`](super::declare) for what each part of a declaration does).
//!
//! Adding a setting is one declaration here plus its use (usually in
//! [`components`](super::components)); a check against other settings goes in
//! [`validate`](super::validate).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use keel_api::admin::AdminToken;
use keel_api::rate_limit::parse_tenant_rates;
use keel_api::{ApiKey, Rate};
use keel_core::{TenantId, WorkerId};
use keel_resilience::ChaosSettings;
use keel_runtime::{HostRateLimit, QueueConfig, SigningSecret};
use keel_store::{DatabaseUrl, Pooler};

use super::LogFormat;
use super::declare::{SettingDoc, settings};
use super::parse::{
    MAX_ADMISSION_LIMIT, PostgresUrl, addr_or_off, admin_token, admission_wait, backlog, burst,
    chaos, count, default_worker_id, host_rate, leader_ttl, lease_wait, log_filter, log_format,
    optional_path, parse_addr, parse_api_keys, parse_bool, parse_duration, parse_queues, pooler,
    positive_duration, postgres_url, prefetch, rate_or_off, signing_secret, worker_id,
};

settings! {
    /// API listener address. Non-loopback addresses require API keys.
    addr: SocketAddr = "127.0.0.1:8080",
        env "KEEL_ADDR", value "HOST:PORT", parse parse_addr;
    /// gRPC listener address (keel.v1, health, reflection), or `off` for none. Like the API,
    /// a non-loopback address requires API keys.
    grpc_addr: Option<SocketAddr> = "127.0.0.1:50051",
        env "KEEL_GRPC_ADDR", value "HOST:PORT|off", parse addr_or_off;
    /// Admin listener address (/debug/*: profiles, task dumps, config, chaos), or `off` for
    /// none. Keep it on loopback; a non-loopback address requires --admin-token.
    admin_addr: Option<SocketAddr> = "127.0.0.1:9000",
        env "KEEL_ADMIN_ADDR", value "HOST:PORT|off", parse addr_or_off;
    /// Bearer token every admin request must present (Authorization: Bearer <token>), at
    /// least 16 characters; required to put the admin listener on a non-loopback address.
    admin_token: Option<AdminToken> = "",
        env "KEEL_ADMIN_TOKEN", value "TOKEN", parse admin_token, secret;
    /// PEM certificate chain (the server's certificate first) to serve HTTPS and gRPC over
    /// TLS on every listener; needs tls_key. Unset (default): plaintext.
    tls_cert: Option<PathBuf> = "",
        env "KEEL_TLS_CERT", value "PATH", parse optional_path;
    /// PEM private key of tls_cert's first certificate (PKCS#8, PKCS#1 or SEC1).
    tls_key: Option<PathBuf> = "",
        env "KEEL_TLS_KEY", value "PATH", parse optional_path;
    /// How often the TLS files are checked for changes; a changed pair is served from the
    /// next handshake on (a rotated certificate needs no restart).
    tls_reload_interval: Duration = "30s",
        env "KEEL_TLS_RELOAD_INTERVAL", value "DURATION", parse positive_duration;
    /// Where jobs are stored: sqlite://PATH or postgres://USER@HOST:PORT/DB.
    database_url: DatabaseUrl = "sqlite://keel.db",
        env "KEEL_DATABASE_URL", value "URL", parse DatabaseUrl::parse, secret;
    /// What sits between Keel and Postgres: none (Postgres itself, or a session-mode
    /// pooler) or transaction (PgBouncer's pool_mode = transaction: no startup options, no
    /// named prepared statements, no session state; set statement_timeout on the role).
    database_pooler: Pooler = "none",
        env "KEEL_DATABASE_POOLER", value "none|transaction", parse pooler;
    /// Postgres URL for LISTEN/NOTIFY wakeups when database_url goes through a transaction
    /// pooler: straight to Postgres, past it. Unset behind such a pooler: wakeups fall back
    /// to polling (poll_interval).
    database_listen_url: Option<PostgresUrl> = "",
        env "KEEL_DATABASE_LISTEN_URL", value "URL", parse postgres_url, secret;
    /// At startup, keep retrying an unreachable database this long (0s: fail at once).
    database_wait: Duration = "30s",
        env "KEEL_DATABASE_WAIT", value "DURATION", parse parse_duration;
    /// Deadline of every API request, e.g. 2s or 500ms.
    request_timeout: Duration = "2s",
        env "KEEL_REQUEST_TIMEOUT", value "DURATION", parse positive_duration;
    /// How long shutdown waits for in-flight requests and running jobs before releasing them.
    shutdown_grace: Duration = "30s",
        env "KEEL_SHUTDOWN_GRACE", value "DURATION", parse parse_duration;
    /// After SIGTERM, keep accepting requests this long while /readyz answers 503, so load
    /// balancers stop routing here before the listener closes (part of the grace period).
    shutdown_delay: Duration = "0s",
        env "KEEL_SHUTDOWN_DELAY", value "DURATION", parse parse_duration;
    /// Once a request's head starts arriving, all of it must within this (slowloris guard).
    header_read_timeout: Duration = "10s",
        env "KEEL_HEADER_READ_TIMEOUT", value "DURATION", parse positive_duration;
    /// An API connection idle this long between requests is closed.
    idle_timeout: Duration = "60s",
        env "KEEL_IDLE_TIMEOUT", value "DURATION", parse positive_duration;
    /// API connections served at once; more get an immediate 503.
    max_connections: usize = "10000",
        env "KEEL_MAX_CONNECTIONS", value "N", parse count(1, 1_000_000);
    /// Log format: json or pretty.
    log_format: LogFormat = "json",
        env "KEEL_LOG_FORMAT", value "FORMAT", parse log_format;
    /// Log filter, e.g. info or keel=debug,info.
    log_level: String = "info",
        env "KEEL_LOG_LEVEL", value "FILTER", parse log_filter;
    /// Queues this process runs, with their concurrency: NAME:N[,NAME:N…].
    queues: Vec<QueueConfig> = "default:8",
        env "KEEL_QUEUES", value "LIST", parse parse_queues;
    /// Most jobs each queue leases ahead of its free worker slots (the buffer follows the
    /// queue's pace up to this): auto (256) or N (0 turns prefetch off).
    prefetch: Option<usize> = "auto",
        env "KEEL_PREFETCH", value "auto|N", parse prefetch;
    /// Postgres pool: most connections.
    db_pool_max: usize = "16",
        env "KEEL_DB_POOL_MAX", value "N", parse count(1, 10_000);
    /// Postgres pool: connections kept open when idle.
    db_pool_min_idle: usize = "2",
        env "KEEL_DB_POOL_MIN_IDLE", value "N", parse count(0, 10_000);
    /// Postgres pool: connections older than this are replaced.
    db_pool_max_lifetime: Duration = "30m",
        env "KEEL_DB_POOL_MAX_LIFETIME", value "DURATION", parse positive_duration;
    /// Postgres pool: longest wait for a free connection.
    db_acquire_timeout: Duration = "5s",
        env "KEEL_DB_ACQUIRE_TIMEOUT", value "DURATION", parse positive_duration;
    /// How long finished jobs are kept before deletion.
    retention: Duration = "7d",
        env "KEEL_RETENTION", value "DURATION", parse positive_duration;
    /// How long an Idempotency-Key is remembered.
    idempotency_ttl: Duration = "24h",
        env "KEEL_IDEMPOTENCY_TTL", value "DURATION", parse positive_duration;
    /// Longest an external worker's lease may wait for a job (a longer `wait` is cut to
    /// it), up to 30s.
    max_lease_wait: Duration = "30s",
        env "KEEL_MAX_LEASE_WAIT", value "DURATION", parse lease_wait;
    /// Largest accepted request body, bytes.
    max_body_bytes: usize = "2097152",
        env "KEEL_MAX_BODY_BYTES", value "BYTES", parse count(1024, 64 << 20);
    /// Largest accepted job args, bytes of JSON.
    max_args_bytes: usize = "1048576",
        env "KEEL_MAX_ARGS_BYTES", value "BYTES",
        parse count(2, keel_core::NewJob::DEFAULT_MAX_ARGS_BYTES);
    /// API keys as TENANT=SHA256HEX[:operator][,…] (hash a key with `keel hash-key`); an
    /// operator key may act for any tenant and pause or resume queues.
    api_keys: Vec<ApiKey> = "",
        env "KEEL_API_KEYS", value "LIST", parse parse_api_keys, secret;
    /// Serve a non-loopback address without API keys (anyone who can connect can do anything).
    insecure_no_auth: bool = "false",
        env "KEEL_INSECURE_NO_AUTH", value "BOOL", parse parse_bool, switch;
    /// Let the webhook executor call private and loopback addresses.
    webhook_allow_private: bool = "false",
        env "KEEL_WEBHOOK_ALLOW_PRIVATE", value "BOOL", parse parse_bool, switch;
    /// Webhook requests in flight to one host at once (default 32); more wait up to
    /// --webhook-host-wait, then the attempt fails and is retried later.
    webhook_host_concurrency: usize = "32",
        env "KEEL_WEBHOOK_HOST_CONCURRENCY", value "N", parse count(1, 10_000);
    /// Longest a webhook job waits for its host's concurrency or rate limit (default 5s).
    webhook_host_wait: Duration = "5s",
        env "KEEL_WEBHOOK_HOST_WAIT", value "DURATION", parse positive_duration;
    /// Rate limit per webhook host, e.g. 50/s or 50/s:100 (with a burst); off (default) =
    /// unlimited.
    webhook_host_rate_limit: Option<HostRateLimit> = "off",
        env "KEEL_WEBHOOK_HOST_RATE_LIMIT", value "RATE", parse host_rate;
    /// Sign webhook requests (Standard Webhooks: webhook-id, webhook-timestamp,
    /// webhook-signature) with this whsec_<base64> secret.
    webhook_signing_secret: Option<SigningSecret> = "",
        env "KEEL_WEBHOOK_SIGNING_SECRET", value "SECRET", parse signing_secret, secret;
    /// How long a lease lasts without a heartbeat before the job is rescued.
    lease_timeout: Duration = "30s",
        env "KEEL_LEASE_TIMEOUT", value "DURATION", parse positive_duration;
    /// How often running jobs' leases are renewed (must be under the lease timeout).
    heartbeat_interval: Duration = "10s",
        env "KEEL_HEARTBEAT_INTERVAL", value "DURATION", parse positive_duration;
    /// Fallback poll interval of idle dispatchers (wakeups are immediate; this bounds a missed one).
    poll_interval: Duration = "1s",
        env "KEEL_POLL_INTERVAL", value "DURATION", parse positive_duration;
    /// How often maintenance (promote, rescue, retention) runs.
    maintenance_interval: Duration = "1s",
        env "KEEL_MAINTENANCE_INTERVAL", value "DURATION", parse positive_duration;
    /// Name of this process in leases and logs (default: host-pid).
    worker_id: WorkerId = (default_worker_id()) shown "host-pid",
        env "KEEL_WORKER_ID", value "ID", parse worker_id;
    /// Term of the maintenance leader (promotion, rescue, retention, cron) unless renewed:
    /// when the leader dies, another replica takes over after at most this long.
    leader_ttl: Duration = "5s",
        env "KEEL_LEADER_TTL", value "DURATION", parse leader_ttl;
    /// Jobs kept in the read cache of GET /v1/jobs/{id} and /result (0 turns it off).
    job_cache_capacity: u64 = "10000",
        env "KEEL_JOB_CACHE_CAPACITY", value "N", parse count(0, 10_000_000);
    /// Admission control: the concurrency limit of /v1 requests before anything is learned
    /// (default 256, kept between the min and the max).
    admission_limit_initial: u32 = "256",
        env "KEEL_ADMISSION_LIMIT_INITIAL", value "N", parse count(1, MAX_ADMISSION_LIMIT);
    /// Admission control: the limit never adapts below this (default 32, or the max if lower).
    admission_limit_min: u32 = "32",
        env "KEEL_ADMISSION_LIMIT_MIN", value "N", parse count(1, MAX_ADMISSION_LIMIT);
    /// Admission control: hard cap on /v1 requests in flight; above the adaptive limit
    /// requests get 503 with Retry-After at once (default 2048).
    admission_limit_max: u32 = "2048",
        env "KEEL_ADMISSION_LIMIT_MAX", value "N", parse count(1, MAX_ADMISSION_LIMIT);
    /// Admission control: how long a request above the limit may wait for a slot before it
    /// is shed (default 250ms; 0 sheds at once).
    admission_max_wait: Duration = "250ms",
        env "KEEL_ADMISSION_MAX_WAIT", value "DURATION", parse admission_wait;
    /// Refuse enqueues with 503 while more jobs than this wait to run (0 = no cap).
    max_queue_backlog: u64 = "0",
        env "KEEL_MAX_QUEUE_BACKLOG", value "JOBS", parse backlog;
    /// How often queue depths are counted: the backlog --max-queue-backlog compares with, and
    /// the keel_queue_depth gauges. Shorter notices a growing backlog sooner; each count reads
    /// the unfinished jobs' indexes.
    queue_depth_interval: Duration = "5s",
        env "KEEL_QUEUE_DEPTH_INTERVAL", value "DURATION", parse positive_duration;
    /// Default rate limit of each tenant, e.g. 200/s, 600/m or 200/s:400 (with a burst);
    /// off = unlimited (default).
    rate_limit: Option<Rate> = "off",
        env "KEEL_RATE_LIMIT", value "RATE", parse rate_or_off;
    /// Burst of the default rate limit: requests a quiet tenant may send at once (default:
    /// the rate's count).
    rate_limit_burst: Option<NonZeroU32> = "",
        env "KEEL_RATE_LIMIT_BURST", value "N", parse burst;
    /// Per-tenant rate limits overriding the default: TENANT=RATE[:BURST][,…], e.g.
    /// acme=50/s:100,other=10/s.
    tenant_rate_limits: BTreeMap<TenantId, Rate> = "",
        env "KEEL_TENANT_RATE_LIMITS", value "LIST", parse parse_tenant_rates;
    /// Rate limit of each API key, on top of its tenant's, e.g. 100/s:200; off (default) =
    /// keys share their tenant's limit.
    api_key_rate_limit: Option<Rate> = "off",
        env "KEEL_API_KEY_RATE_LIMIT", value "RATE", parse rate_or_off;
    /// Store calls in flight at once (the database bulkhead); callers beyond it wait no
    /// longer than their deadline, then get 503 (default 512).
    store_max_in_flight: usize = "512",
        env "KEEL_STORE_MAX_IN_FLIGHT", value "N", parse count(1, 100_000);
    /// Fault injection at startup: DEP.SETTING=VALUE[,…] with DEP one of auth, store_read,
    /// store_write, webhook and SETTING latency_ms or error_rate, e.g.
    /// auth.latency_ms=3000,store_write.error_rate=0.5. Change it while running with
    /// PUT /debug/chaos on the admin listener.
    chaos: ChaosSettings = "",
        env "KEEL_CHAOS", value "FAULTS", parse chaos;
    /// Chaos switch from the seed: authentication takes 3 s (past the default 2 s deadline).
    slow_auth: bool = "false",
        env "SLOW_AUTH", value "BOOL", parse parse_bool, switch;
    /// Chaos switch from the seed: every store call fails as "connection refused".
    db_failure: bool = "false",
        env "DB_FAILURE", value "BOOL", parse parse_bool, switch;
}
