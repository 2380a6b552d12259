//! What the runtime needs to be told: who it is, which queues it serves and how wide, how
//! leases are kept alive, and how maintenance and the webhook executor behave.
//!
//! Every field has a default that works for a single embedded process; the binary fills
//! them from `KEEL_*` settings. [`RuntimeConfig::validate`] reports every inconsistent field
//! at once so the binary can refuse to start (exit 78) before any I/O.

use std::fmt;
use std::time::Duration;

use keel_core::{QueueName, WorkerId};

/// How the runtime runs jobs. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Recorded as the lease owner of every job this process runs, so an operator can see
    /// who ran (or is stuck running) a job, and a rescued job's error names the worker that
    /// stopped renewing it. Must be unique per process: the default combines host name,
    /// process id and a random suffix.
    pub worker_id: WorkerId,
    /// The queues this process runs and how many jobs of each may run at once. Concurrency
    /// is a per-queue semaphore, so one slow queue cannot take the workers of another.
    pub queues: Vec<QueueConfig>,
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
            lease_for: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            maintenance: MaintenanceConfig::default(),
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

/// The `webhook` executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Allow targets that resolve to loopback, private, link-local and other internal
    /// addresses. Off by default (G8): a job author must not be able to make Keel call the
    /// cloud metadata service or an internal admin port (SSRF). Turn on for local
    /// development and tests.
    pub allow_private: bool,
    /// The `User-Agent` header sent, so receivers can identify (and allow-list) Keel.
    pub user_agent: String,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            user_agent: format!("keel/{}", env!("CARGO_PKG_VERSION")),
        }
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
            ..RuntimeConfig::default()
        };
        let errs = c.validate().unwrap_err().0;
        for needle in [
            "concurrency",
            "twice",
            "heartbeat_every",
            "poll_interval",
            "batch",
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
