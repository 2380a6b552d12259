//! What the runtime needs to be told: who it is, which queues it serves and how wide, how
//! leases are kept alive, and how maintenance and the webhook executor behave.
//!
//! Every field has a default that works for a single embedded process; the binary fills
//! them from `KEEL_*` settings. [`RuntimeConfig::validate`] reports every inconsistent field
//! at once so the binary can refuse to start (exit 78) before any I/O.

use std::fmt;
use std::time::Duration;

use keel_core::{QueueName, WorkerId};
use keel_resilience::{BreakerConfig, Chaos};

/// How the runtime runs jobs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Recorded as the lease owner of every job this process runs, so an operator can see
    /// who ran (or is stuck running) a job, and a rescued job's error names the worker that
    /// stopped renewing it. Must be unique per process: the default combines host name,
    /// process id and a random suffix.
    pub worker_id: WorkerId,
    /// The queues this process runs and how many jobs of each may run at once. Concurrency
    /// is a per-queue semaphore, so one slow queue cannot take the workers of another.
    pub queues: Vec<QueueConfig>,
    /// Most jobs each queue's dispatcher leases ahead of its free slots into a local
    /// buffer, so a slot that frees up takes its next job from memory instead of waiting
    /// for a lease round trip. Within this cap the buffer follows the queue's pace (jobs
    /// started per second × the lease round trip, with a margin): dozens for short jobs, one
    /// for long ones. Buffered jobs are leased: heartbeats keep their leases alive, a cancel
    /// removes them, and at shutdown they are released without using an attempt. `None`
    /// (the default): [`RuntimeConfig::DEFAULT_PREFETCH_CAP`]. `Some(0)` turns prefetch
    /// off: a job is leased only for a free slot.
    pub prefetch: Option<usize>,
    /// How long a lease lasts without a heartbeat. It bounds how long a job stays stuck
    /// after its worker dies (it is rescued once the lease lapses), so keep it short; but
    /// long enough that a few missed heartbeats (a slow database) do not lose healthy leases.
    pub lease_for: Duration,
    /// How often leases of running jobs are extended. Must be well below `lease_for`
    /// (a third or less) so that one failed heartbeat does not let a lease lapse.
    pub heartbeat_every: Duration,
    /// How often an idle dispatcher looks for work on its own. Only a fallback: enqueues on
    /// this process wake the dispatcher at once, so this bounds the pickup latency of jobs
    /// enqueued elsewhere (another replica, a promoted retry) without a cross-process wakeup.
    pub poll_interval: Duration,
    /// How long running jobs may take to finish on shutdown before they are cancelled and
    /// released back to the queue (G6). Keep it below the orchestrator's kill timeout.
    pub shutdown_grace: Duration,
    /// Promotion, rescue and cleanup.
    pub maintenance: MaintenanceConfig,
    /// How long the maintenance leader's term lasts unless renewed. Only the leader runs
    /// maintenance and cron; it renews every third of this, and steps down on its own as
    /// soon as a renewal fails or is overdue (each campaign is bounded by a quarter of it),
    /// so it never acts on a term it cannot prove. When a leader dies, the others take over
    /// once its term lapses: this bounds how long promotion, rescue and cron pause. Shorter
    /// means faster takeover and more campaign writes (one per replica per third of it).
    pub leader_ttl: Duration,
    /// Longest the cron loop sleeps between two looks at the schedules. It wakes for the
    /// next tick of any schedule it knows; this bounds how long a schedule created or
    /// changed meanwhile (on any replica) goes unnoticed.
    pub cron_refresh: Duration,
    /// The built-in `webhook` executor.
    pub webhook: WebhookConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_id: default_worker_id(),
            queues: vec![QueueConfig {
                name: QueueName::default(),
                concurrency: QueueConfig::DEFAULT_CONCURRENCY,
            }],
            prefetch: None,
            lease_for: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            maintenance: MaintenanceConfig::default(),
            leader_ttl: Self::DEFAULT_LEADER_TTL,
            cron_refresh: Duration::from_secs(1),
            webhook: WebhookConfig::default(),
        }
    }
}

/// One queue this process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue to lease from.
    pub name: QueueName,
    /// Most jobs of this queue running at once in this process (the size of its worker
    /// pool). Bounded ([`QueueConfig::MAX_CONCURRENCY`]) so memory stays bounded (G5).
    pub concurrency: usize,
}

impl QueueConfig {
    /// Workers per queue unless configured: enough to overlap I/O-bound jobs on a small
    /// machine without flooding the database with leases.
    pub const DEFAULT_CONCURRENCY: usize = 8;
    /// Largest accepted concurrency per queue.
    pub const MAX_CONCURRENCY: usize = 10_000;
}

/// Promotion of due jobs, rescue of expired leases and deletion of old rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Time between two maintenance passes. It bounds how late a scheduled or retried job
    /// starts (promotion) and how long an expired lease goes unnoticed (rescue).
    pub interval: Duration,
    /// Most rows one store call touches; a pass repeats a step while its batch comes back
    /// full, so a backlog drains in short transactions rather than one long one.
    pub batch: u32,
    /// Finished jobs (completed, discarded, cancelled) are deleted this long after they
    /// finished, so the table does not grow without bound while results stay readable for
    /// a while.
    pub retention: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            batch: 1000,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// The `webhook` executor: who it may call, how it identifies and signs, and how it
/// protects each receiver (and Keel) from the other.
///
/// Protection is per target host (scheme, host and port of the URL): a circuit breaker, a
/// concurrency limit and an optional rate limit. Each host has its own, so a failing or slow
/// receiver is refused, queued or slowed down without touching jobs to any other host.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Allow targets that resolve to loopback, private, link-local and other internal
    /// addresses. Off by default (G8): a job author must not be able to make Keel call the
    /// cloud metadata service or an internal admin port (SSRF). Turn on for local
    /// development and tests.
    pub allow_private: bool,
    /// The `User-Agent` header sent, so receivers can identify (and allow-list) Keel.
    pub user_agent: String,
    /// Signs every request the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`) so a receiver can tell Keel's calls from forgeries and replays.
    /// `None`: requests are not signed.
    pub signing_secret: Option<SigningSecret>,
    /// When a host's circuit opens and how it recovers. A host that keeps failing (5xx,
    /// 429, timeouts, connection errors) gets no requests while open: its jobs fail at once
    /// and retry when the breaker will let a probe through, instead of each holding a worker
    /// for a full timeout against a receiver that is down.
    pub breaker: BreakerConfig,
    /// Most requests in flight to one host from this process. Protects a receiver from a
    /// burst of queued jobs, and bounds how many workers one slow host can hold.
    pub host_concurrency: usize,
    /// Requests per second allowed to one host, with a burst; `None` (the default) is no
    /// limit. For receivers that publish a quota, so Keel stays under it instead of
    /// collecting 429s.
    pub host_rate: Option<HostRateLimit>,
    /// Longest a job waits for a free slot under its host's concurrency limit or a token
    /// from its rate limit (and never past the job's own timeout). A waiting job holds a
    /// worker of its queue, so this bounds how long a saturated host can keep workers from
    /// jobs to other hosts; past it the attempt fails as retryable.
    pub host_wait: Duration,
    /// Most hosts whose protection state is kept. Job authors choose URLs, so the set of
    /// hosts is unbounded; past this many, hosts idle the longest are forgotten first (G5).
    pub max_hosts: usize,
    /// A host unused this long is forgotten when room is needed, whatever its age rank.
    pub host_idle: Duration,
    /// Longest delay a receiver's `Retry-After` may impose on a job; larger values are
    /// capped, so a buggy or hostile receiver cannot park jobs for days.
    pub max_retry_after: Duration,
    /// Fault injection for webhook requests (latency, error rate), off by default. An
    /// injected error is a failed attempt like a connection error, and counts against the
    /// host's breaker.
    pub chaos: Chaos,
}

impl WebhookConfig {
    /// Default requests in flight per host: enough for a healthy receiver to keep up with a
    /// busy queue, small enough that one host cannot take hundreds of connections.
    pub const DEFAULT_HOST_CONCURRENCY: usize = 32;
    /// Largest accepted `host_concurrency`.
    pub const MAX_HOST_CONCURRENCY: usize = 10_000;
    /// Default number of hosts tracked.
    pub const DEFAULT_MAX_HOSTS: usize = 10_000;
    /// Largest accepted `max_hosts` (each tracked host costs a few hundred bytes).
    pub const MAX_MAX_HOSTS: usize = 1_000_000;

    /// A host's breaker unless configured: opens after 5 failures in a row or half of at
    /// least 20 calls in 10 s, stays open 30 s (a receiver that is down is rarely back
    /// within seconds, and every refused job spends an attempt), then closes after 3
    /// successful probes.
    pub fn default_breaker() -> BreakerConfig {
        BreakerConfig {
            open_for: Duration::from_secs(30),
            ..BreakerConfig::default()
        }
    }

    /// Checks every field; reports every problem at once. Also part of
    /// [`RuntimeConfig::validate`]; the executor itself corrects bad values rather than fail.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut errors = Vec::new();
        self.check(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(errors))
        }
    }

    /// Adds one message per bad field to `errors`, each prefixed with `webhook.`.
    fn check(&self, errors: &mut Vec<String>) {
        if let Err(e) = self.breaker.validate() {
            errors.push(format!("webhook.breaker: {e}"));
        }
        if self.host_concurrency == 0 || self.host_concurrency > Self::MAX_HOST_CONCURRENCY {
            errors.push(format!(
                "webhook.host_concurrency must be 1..={}, got {}",
                Self::MAX_HOST_CONCURRENCY,
                self.host_concurrency
            ));
        }
        if let Some(rate) = self.host_rate
            && (rate.per_second == 0 || rate.burst == 0)
        {
            errors.push(format!(
                "webhook.host_rate: per_second and burst must be at least 1, got {} and {}",
                rate.per_second, rate.burst
            ));
        }
        if self.host_wait.is_zero() {
            errors.push("webhook.host_wait must be above zero".to_owned());
        }
        if self.max_hosts == 0 || self.max_hosts > Self::MAX_MAX_HOSTS {
            errors.push(format!(
                "webhook.max_hosts must be 1..={}, got {}",
                Self::MAX_MAX_HOSTS,
                self.max_hosts
            ));
        }
        if self.host_idle.is_zero() {
            errors.push("webhook.host_idle must be above zero".to_owned());
        }
        if self.max_retry_after.is_zero() {
            errors.push("webhook.max_retry_after must be above zero".to_owned());
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            user_agent: format!("keel/{}", env!("CARGO_PKG_VERSION")),
            signing_secret: None,
            breaker: Self::default_breaker(),
            host_concurrency: Self::DEFAULT_HOST_CONCURRENCY,
            host_rate: None,
            host_wait: Duration::from_secs(5),
            max_hosts: Self::DEFAULT_MAX_HOSTS,
            host_idle: Duration::from_secs(600),
            max_retry_after: Duration::from_secs(3600),
            chaos: Chaos::default(),
        }
    }
}

/// A token bucket for the requests to one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests allowed at once after a quiet spell (the bucket's size).
    pub burst: u32,
}

/// The key the webhook executor signs requests with: the `whsec_<base64>` form of the
/// Standard Webhooks specification, which receivers' libraries accept as is. Its `Debug`
/// never shows the key, so a logged config cannot leak it (G8).
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret {
    key: Vec<u8>,
}

impl SigningSecret {
    /// The prefix of the textual form.
    pub const PREFIX: &'static str = "whsec_";
    /// Shortest key accepted, in bytes (the specification asks for 24 to 64).
    pub const MIN_BYTES: usize = 24;
    /// Longest key accepted, in bytes.
    pub const MAX_BYTES: usize = 64;

    /// Parses `whsec_<base64 of 24 to 64 random bytes>`; the prefix may be left out, as
    /// receivers' libraries allow. The error says what is wrong without echoing the secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let encoded = text.trim();
        let encoded = encoded.strip_prefix(Self::PREFIX).unwrap_or(encoded);
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| {
                format!(
                    "the webhook signing secret must be {}<base64>, and its base64 does not decode",
                    Self::PREFIX
                )
            })?;
        if !(Self::MIN_BYTES..=Self::MAX_BYTES).contains(&key.len()) {
            return Err(format!(
                "the webhook signing secret must decode to {} to {} bytes, got {}",
                Self::MIN_BYTES,
                Self::MAX_BYTES,
                key.len()
            ));
        }
        Ok(Self { key })
    }

    /// The HMAC key (the decoded bytes).
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }
}

impl std::str::FromStr for SigningSecret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

/// Every problem found in a [`RuntimeConfig`], one message per field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig(pub Vec<String>);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for InvalidConfig {}

impl RuntimeConfig {
    /// Default [`RuntimeConfig::leader_ttl`]: maintenance and cron pause at most this long
    /// after a leader dies.
    pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(5);
    /// Shortest accepted [`RuntimeConfig::leader_ttl`]: a term must outlast a few database
    /// round trips and the scheduling jitter of a busy machine, or a healthy leader would
    /// keep stepping down.
    pub const MIN_LEADER_TTL: Duration = Duration::from_millis(500);
    /// Most jobs a queue buffers unless [`RuntimeConfig::prefetch`] says otherwise.
    pub const DEFAULT_PREFETCH_CAP: usize = 256;
    /// Largest accepted [`RuntimeConfig::prefetch`] (memory stays bounded, G5).
    pub const MAX_PREFETCH: usize = 10_000;

    /// The most jobs a queue's dispatcher may hold leased ahead of its free slots.
    pub fn prefetch_cap(&self) -> usize {
        self.prefetch
            .unwrap_or(Self::DEFAULT_PREFETCH_CAP)
            .min(Self::MAX_PREFETCH)
    }

    /// Checks the fields against each other and their bounds; reports every problem at once.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut errors = Vec::new();
        if self.queues.is_empty() {
            errors.push("queues: at least one queue must be configured".to_owned());
        }
        for (i, q) in self.queues.iter().enumerate() {
            if q.concurrency == 0 || q.concurrency > QueueConfig::MAX_CONCURRENCY {
                errors.push(format!(
                    "queues[{i}] ({}): concurrency must be 1..={}, got {}",
                    q.name,
                    QueueConfig::MAX_CONCURRENCY,
                    q.concurrency
                ));
            }
            if self.queues[..i].iter().any(|p| p.name == q.name) {
                errors.push(format!("queues[{i}]: queue {} is listed twice", q.name));
            }
        }
        if let Some(n) = self.prefetch
            && n > Self::MAX_PREFETCH
        {
            errors.push(format!(
                "prefetch must be 0..={}, got {n}",
                Self::MAX_PREFETCH
            ));
        }
        if self.lease_for < Duration::from_secs(1) {
            errors.push(format!(
                "lease_for must be at least 1 s, got {} ms",
                self.lease_for.as_millis()
            ));
        }
        if self.heartbeat_every.is_zero() || self.heartbeat_every >= self.lease_for {
            errors.push(format!(
                "heartbeat_every ({} ms) must be above zero and below lease_for ({} ms)",
                self.heartbeat_every.as_millis(),
                self.lease_for.as_millis()
            ));
        }
        if self.poll_interval.is_zero() {
            errors.push("poll_interval must be above zero".to_owned());
        }
        if self.maintenance.interval.is_zero() {
            errors.push("maintenance.interval must be above zero".to_owned());
        }
        if self.maintenance.batch == 0 {
            errors.push("maintenance.batch must be at least 1".to_owned());
        }
        if self.leader_ttl < Self::MIN_LEADER_TTL {
            errors.push(format!(
                "leader_ttl must be at least {} ms, got {} ms",
                Self::MIN_LEADER_TTL.as_millis(),
                self.leader_ttl.as_millis()
            ));
        }
        if self.cron_refresh.is_zero() {
            errors.push("cron_refresh must be above zero".to_owned());
        }
        self.webhook.check(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(errors))
        }
    }

    /// A copy safe to run with even if [`RuntimeConfig::validate`] was skipped: zero or
    /// inconsistent values are replaced (and logged) rather than spinning a loop or letting
    /// every lease lapse.
    pub(crate) fn normalized(mut self) -> Self {
        if let Err(e) = self.validate() {
            tracing::warn!(problems = %e, "runtime configuration is inconsistent; adjusting it");
        }
        let mut seen: Vec<QueueName> = Vec::new();
        self.queues.retain(|q| {
            let fresh = !seen.contains(&q.name);
            seen.push(q.name.clone());
            fresh
        });
        for q in &mut self.queues {
            q.concurrency = q.concurrency.clamp(1, QueueConfig::MAX_CONCURRENCY);
        }
        self.lease_for = self.lease_for.max(Duration::from_secs(1));
        if self.heartbeat_every.is_zero() || self.heartbeat_every >= self.lease_for {
            self.heartbeat_every = self.lease_for / 3;
        }
        if self.poll_interval.is_zero() {
            self.poll_interval = Duration::from_secs(1);
        }
        if self.maintenance.interval.is_zero() {
            self.maintenance.interval = MaintenanceConfig::default().interval;
        }
        self.maintenance.batch = self.maintenance.batch.max(1);
        self.leader_ttl = self.leader_ttl.max(Self::MIN_LEADER_TTL);
        if self.cron_refresh.is_zero() {
            self.cron_refresh = Duration::from_secs(1);
        }
        self
    }
}

/// `<host>-<pid>-<random>`: readable in `lease_owner`, and unique even when two processes
/// share a host name and (in containers) a pid.
pub fn default_worker_id() -> WorkerId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    let host = host.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let host = if host.is_empty() { "keel" } else { host };
    let suffix: u32 = rand::random();
    WorkerId::parse(format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        suffix & 0xff_ffff
    ))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = RuntimeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.queues[0].name.as_str(), "default");
        assert_eq!(c.queues[0].concurrency, 8);
        assert!(c.heartbeat_every < c.lease_for);
    }

    #[test]
    fn webhook_problems_are_reported_with_the_others() {
        let c = RuntimeConfig {
            poll_interval: Duration::ZERO,
            webhook: WebhookConfig {
                breaker: BreakerConfig {
                    failure_rate: 2.0,
                    ..WebhookConfig::default_breaker()
                },
                host_concurrency: 0,
                host_rate: Some(HostRateLimit {
                    per_second: 0,
                    burst: 10,
                }),
                host_wait: Duration::ZERO,
                max_hosts: 0,
                host_idle: Duration::ZERO,
                max_retry_after: Duration::ZERO,
                ..WebhookConfig::default()
            },
            ..RuntimeConfig::default()
        };
        let errs = c.validate().unwrap_err().0;
        for needle in [
            "poll_interval",
            "webhook.breaker: failure_rate",
            "webhook.host_concurrency",
            "webhook.host_rate",
            "webhook.host_wait",
            "webhook.max_hosts",
            "webhook.host_idle",
            "webhook.max_retry_after",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        assert_eq!(c.webhook.validate().unwrap_err().0.len(), 7);
        WebhookConfig::default().validate().unwrap();
    }

    #[test]
    fn the_signing_secret_never_shows_in_debug_output() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let c = WebhookConfig {
            signing_secret: Some(secret.parse().unwrap()),
            ..WebhookConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("SigningSecret(<redacted>)"), "{shown}");
        assert!(!shown.contains("MfKQ9r8G"), "{shown}");
    }

    #[test]
    fn worker_ids_are_unique_and_valid() {
        let a = default_worker_id();
        let b = default_worker_id();
        assert_ne!(a, b);
        assert!(a.as_str().contains(&std::process::id().to_string()), "{a}");
    }

    #[test]
    fn validation_reports_every_problem() {
        let q = QueueName::parse("a").unwrap();
        let c = RuntimeConfig {
            queues: vec![
                QueueConfig {
                    name: q.clone(),
                    concurrency: 0,
                },
                QueueConfig {
                    name: q,
                    concurrency: 1,
                },
            ],
            heartbeat_every: Duration::from_secs(60),
            poll_interval: Duration::ZERO,
            maintenance: MaintenanceConfig {
                batch: 0,
                ..MaintenanceConfig::default()
            },
            leader_ttl: Duration::from_millis(10),
            cron_refresh: Duration::ZERO,
            ..RuntimeConfig::default()
        };
        let errs = c.validate().unwrap_err().0;
        for needle in [
            "concurrency",
            "twice",
            "heartbeat_every",
            "poll_interval",
            "batch",
            "leader_ttl",
            "cron_refresh",
        ] {
            assert!(
                errs.iter().any(|e| e.contains(needle)),
                "{needle}: {errs:?}"
            );
        }
        let fixed = c.normalized();
        fixed.validate().unwrap();
    }
}
