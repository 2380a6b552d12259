//! What the HTTP API needs to know that is not in the store or the runtime: its limits and
//! who may call it.

use std::fmt;
use std::time::Duration;

use keel_core::{NewJob, TenantId};
use keel_resilience::AdaptiveLimitConfig;
use sha2::{Digest, Sha256};

use crate::job_cache::JobCacheConfig;
use crate::rate_limit::RateLimitConfig;

/// Limits and credentials of the HTTP API. Built by the binary from its validated config;
/// [`Default`] is what `keel serve` uses when nothing is configured.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The deadline of every request (G7): auth, validation, store work and the response must
    /// all fit in it, or the client gets `504` and the work done on its behalf is dropped.
    /// A client may ask for less with `Request-Timeout: <ms>`, never for more, so one slow
    /// caller cannot hold a connection and a store slot longer than the operator allows.
    pub request_timeout: Duration,
    /// Largest request body accepted, in bytes (`413` beyond it). Bounds the memory one
    /// request can pin (G5); set a little above `max_args_bytes` so a job whose `args` are at
    /// the limit still fits with its envelope.
    pub max_body_bytes: usize,
    /// Largest serialised `args` of one job, in bytes (`422` beyond it). The store keeps args
    /// in the job row, so this bounds row size.
    pub max_args_bytes: usize,
    /// How long an `Idempotency-Key` is remembered (G3). Within this window a retried
    /// enqueue returns the original response instead of creating a second job.
    pub idempotency_ttl: Duration,
    /// Longest an external worker's lease waits for a job; a longer `wait` is cut to it
    /// (`KEEL_MAX_LEASE_WAIT`, at most [`crate::worker_in::MAX_WAIT`]).
    pub max_lease_wait: Duration,
    /// Accepted API keys, each bound to one tenant. Empty means no authentication: every
    /// caller may act for any tenant. The binary allows that only on a loopback listener
    /// (G8).
    pub api_keys: Vec<ApiKey>,
    /// Bounds of the adaptive concurrency limit on the `/v1` routes (G5). `max` is a hard
    /// cap on requests in flight; `min` keeps a latency blip from shutting the door.
    pub admission: AdaptiveLimitConfig,
    /// Enqueues are refused with `503` while more jobs than this wait to run (available,
    /// scheduled and retryable, over every queue); 0 turns the cap off. Bounds the backlog
    /// a flood can build faster than workers drain it.
    pub max_queue_backlog: u64,
    /// Per-tenant and per-key rate limits; the default limits nothing.
    pub rate_limits: RateLimitConfig,
    /// The read cache of `GET /v1/jobs/{id}` and `/result` (capacity, time to live by
    /// state): many clients polling one job cost the database one read per key.
    pub job_cache: JobCacheConfig,
    /// How often `POST /v1/process` re-reads the job it waits on, in case the job's event
    /// was missed (published by another replica without cross-replica events, or lost to a
    /// lagging receiver). Events answer first; this bounds how late a missed one can make
    /// the answer, at one read per waiter per period.
    pub process_poll: Duration,
}

impl ApiConfig {
    /// Body limit of the default config: 1 MiB of args plus 64 KiB for the rest of the job.
    pub const DEFAULT_MAX_BODY_BYTES: usize = NewJob::DEFAULT_MAX_ARGS_BYTES + 64 * 1024;
    /// [`ApiConfig::process_poll`] by default.
    pub const DEFAULT_PROCESS_POLL: Duration = Duration::from_millis(250);
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(2),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_args_bytes: NewJob::DEFAULT_MAX_ARGS_BYTES,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            max_lease_wait: crate::worker_in::MAX_WAIT,
            api_keys: Vec::new(),
            admission: AdaptiveLimitConfig::default(),
            max_queue_backlog: 0,
            rate_limits: RateLimitConfig::default(),
            job_cache: JobCacheConfig::default(),
            process_poll: Self::DEFAULT_PROCESS_POLL,
        }
    }
}

/// What a key may do beyond its tenant's own jobs (docs/security.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Acts for its tenant only: its jobs, its schedules, its own counts in the queue
    /// listing. Queues are shared by every tenant, so it may not pause or resume one.
    #[default]
    Tenant,
    /// Runs the service: acts for any tenant it names (its own by default), sees every
    /// tenant's jobs and counts, and pauses and resumes queues.
    Operator,
}

impl Role {
    /// `tenant` or `operator`, as written after the digest in `KEEL_API_KEYS`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tenant" => Ok(Role::Tenant),
            "operator" => Ok(Role::Operator),
            other => Err(format!("{other:?} is not a role (tenant or operator)")),
        }
    }

    /// The name `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Operator => "operator",
        }
    }
}

/// One accepted API key: the SHA-256 digest of the key, the tenant it acts for and its
/// role. Only the digest is kept, so a memory dump, a config echo or a log line cannot
/// reveal a usable key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Requests made with this key act for this tenant (an operator key may name another).
    pub tenant: TenantId,
    /// SHA-256 of the key as the client sends it (see [`hash_api_key`]).
    pub sha256: [u8; 32],
    /// What the key may do beyond its tenant's jobs.
    pub role: Role,
}

impl ApiKey {
    /// The tenant key for `tenant` whose plaintext is `key` (hashed at once, never kept).
    pub fn new(tenant: TenantId, key: &str) -> Self {
        Self {
            tenant,
            sha256: hash_api_key(key),
            role: Role::Tenant,
        }
    }

    /// The same key with `role`.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }
}

impl fmt::Debug for ApiKey {
    // The digest is not the key, but there is no reason to print it either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("tenant", &self.tenant)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// The digest an [`ApiKey`] stores for a plaintext key. Requests are authenticated by
/// hashing the presented key the same way and comparing digests in constant time.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares two digests without an early exit, so the time taken does not tell an attacker
/// how many leading bytes of a guess were right.
pub(crate) fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_compare_by_value() {
        let a = hash_api_key("secret");
        assert!(digests_equal(&a, &hash_api_key("secret")));
        assert!(!digests_equal(&a, &hash_api_key("secreT")));
    }

    #[test]
    fn debug_hides_the_digest() {
        let key = ApiKey::new(TenantId::default(), "k");
        let shown = format!("{key:?}");
        assert!(!shown.contains("sha256"), "{shown}");
        assert!(shown.contains("default"));
    }

    #[test]
    fn default_body_limit_fits_max_args() {
        let c = ApiConfig::default();
        assert!(c.max_body_bytes > c.max_args_bytes);
        assert_eq!(c.request_timeout, Duration::from_secs(2));
    }
}
