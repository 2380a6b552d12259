//! The runtime's metrics: names, label sets and descriptions in one place, so dashboards
//! and the code cannot drift apart.
//!
//! Labels come from bounded sets only: `queue` (the queues served here, and `other` for the
//! rest; see [`crate::Catalog`]), `kind` (registered job kinds; any other kind is labelled
//! `other`), `outcome` ([`Outcome`]) and `step`. Never ids or error strings (§6).
//!
//! The binary installs the Prometheus recorder; without one, every macro here is a no-op.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_core::{JobKind, QueueName};
use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

/// Jobs whose run ended here, by queue, kind and [`Outcome`].
pub const JOBS_FINISHED: &str = "keel_jobs_finished_total";
/// Time a handler ran, by queue and kind (histogram, seconds).
pub const JOB_DURATION: &str = "keel_job_duration_seconds";
/// Time from a job's `run_at` to the start of its attempt, by queue (histogram, seconds):
/// how far behind the workers are.
pub const JOB_WAIT: &str = "keel_job_wait_seconds";
/// Jobs running right now, by queue (gauge).
pub const WORKERS_BUSY: &str = "keel_workers_busy";
/// Jobs leased ahead and waiting in this process for a worker slot, by queue (gauge).
pub const JOBS_PREFETCHED: &str = "keel_jobs_prefetched";
/// Jobs leased by this process, by queue.
pub const JOBS_LEASED: &str = "keel_jobs_leased_total";
/// Leases found lost while their job still ran here (rescued elsewhere or revoked): each is
/// a possible duplicate run (G2), by queue.
pub const LEASE_LOST: &str = "keel_jobs_lease_lost_total";
/// Failed store calls of the runtime's loops, by `op` (lease, heartbeat, complete, fail,
/// release, promote, rescue, delete_finished, delete_idempotency_keys, delete_old_ticks,
/// campaign, resign, list_schedules, enqueue_ticks).
pub const STORE_ERRORS: &str = "keel_runtime_store_errors_total";
/// Jobs made available by the promoter, by queue.
pub const MAINTENANCE_PROMOTED: &str = "keel_maintenance_promoted_total";
/// Jobs rescued from expired leases, by queue and the state they moved to.
pub const MAINTENANCE_RESCUED: &str = "keel_maintenance_rescued_total";
/// Runs that may repeat work already done (G2), by queue: a rescued job that will run
/// again after its lease expired, when the worker that held it may have done some or all of
/// the work before it died or lost touch. The only way Keel runs a job twice.
pub const DUPLICATE_RUNS: &str = "keel_jobs_duplicate_runs_total";
/// Items per batched store write, by operation: `complete`, or `lease` (jobs per lease).
pub const STORE_BATCH_SIZE: &str = "keel_store_batch_size";
/// Rows deleted by retention, by `what` (jobs, idempotency_keys, schedule_ticks).
pub const MAINTENANCE_DELETED: &str = "keel_maintenance_deleted_total";
/// Vacuums or analyses Keel ran itself, by `table` (`jobs`, `idempotency_keys`): only when
/// the database's autovacuum is off (see `MaintenanceStore::vacuum`).
pub const MAINTENANCE_VACUUMS: &str = "keel_maintenance_vacuums_total";
/// Webhook attempts by `outcome`: what the receiver answered (`success`, `redirect`,
/// `client_error`, `throttled` = 429, `server_error`), how the exchange failed (`timeout`,
/// `connect_error`, `network_error`, `injected` by chaos, `refused` by the SSRF guard), or
/// why no request was sent (`circuit_open`, `rate_limited`, `host_busy`). Never labelled by
/// host: job authors choose hosts, so they are unbounded.
pub const WEBHOOK_REQUESTS: &str = "keel_webhook_requests_total";
/// Webhook hosts whose circuit breaker is not closed (open, or half-open awaiting its
/// probes) (gauge).
pub const WEBHOOK_HOSTS_OPEN: &str = "keel_webhook_hosts_open";
/// Webhook hosts whose protection state (breaker, limits) is kept in memory (gauge); at
/// most the configured `max_hosts`, plus hosts with a request in flight.
pub const WEBHOOK_HOSTS_TRACKED: &str = "keel_webhook_hosts_tracked";

/// 1 while this replica is the maintenance leader, else 0 (gauge). Summed over replicas it
/// should be 1, and 0 only briefly, while a dead leader's term lapses.
pub const LEADER: &str = "keel_leader";
/// Leadership changes of this replica, by `change`: `acquired` or `lost` (a failed or
/// overdue renewal, a term taken over, a fenced write refused, or shutdown).
pub const LEADER_CHANGES: &str = "keel_leader_changes_total";
/// Cron ticks handled by the leader, by `outcome`: `enqueued` (its job was inserted now) or
/// `skipped` (the tick had been enqueued before, or the schedule was paused or deleted
/// meanwhile).
pub const CRON_TICKS: &str = "keel_cron_ticks_total";
/// Time from a cron tick to the insert of its job (histogram, seconds): how late the
/// leader is, including leader handovers and caught-up ticks.
pub const CRON_LATENESS: &str = "keel_cron_tick_lateness_seconds";

/// How a job's run in this process ended: the `outcome` label of [`JOBS_FINISHED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Recorded as completed.
    Completed,
    /// Recorded as a failed attempt with attempts left.
    Retryable,
    /// Recorded as failed for good (permanent error or attempts exhausted).
    Discarded,
    /// The job was cancelled by a user while it ran; its outcome was dropped.
    Cancelled,
    /// The lease was gone when the outcome was written (rescued after it expired): the
    /// outcome was dropped and the job may run (or have run) again elsewhere.
    LeaseLost,
    /// Given back unfinished at shutdown; the attempt does not count.
    Released,
    /// The outcome could not be written (the store kept failing); the lease will expire
    /// and the job will be rescued.
    Unrecorded,
}

impl Outcome {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Retryable => "retryable",
            Outcome::Discarded => "discarded",
            Outcome::Cancelled => "cancelled",
            Outcome::LeaseLost => "lease_lost",
            Outcome::Released => "released",
            Outcome::Unrecorded => "unrecorded",
        }
    }
}

/// Registers descriptions and units with the installed recorder. Call once after installing
/// it; calling again is harmless. [`crate::Runtime::start`] calls it too.
pub fn describe_metrics() {
    describe_counter!(
        JOBS_FINISHED,
        "Jobs whose run ended in this process, by outcome."
    );
    describe_histogram!(JOB_DURATION, Unit::Seconds, "Time a job's handler ran.");
    describe_histogram!(
        JOB_WAIT,
        Unit::Seconds,
        "Time from a job's run_at to its start."
    );
    describe_gauge!(WORKERS_BUSY, "Jobs running now.");
    describe_gauge!(
        JOBS_PREFETCHED,
        "Jobs leased ahead and waiting in this process for a worker slot."
    );
    describe_counter!(JOBS_LEASED, "Jobs leased by this process.");
    describe_counter!(
        LEASE_LOST,
        "Leases lost while their job still ran here (possible duplicate runs)."
    );
    describe_counter!(
        STORE_ERRORS,
        "Failed store calls of the runtime loops, by operation."
    );
    describe_counter!(
        MAINTENANCE_PROMOTED,
        "Scheduled and retryable jobs made available."
    );
    describe_counter!(
        MAINTENANCE_RESCUED,
        "Running jobs rescued after their lease expired."
    );
    describe_counter!(
        DUPLICATE_RUNS,
        "Rescued jobs that will run again although an earlier run may have done the work."
    );
    describe_counter!(MAINTENANCE_DELETED, "Rows deleted by retention.");
    describe_counter!(
        MAINTENANCE_VACUUMS,
        "Vacuums or analyses of a job table Keel ran because autovacuum is off."
    );
    describe_counter!(
        WEBHOOK_REQUESTS,
        "Webhook attempts by outcome, including those refused before any request."
    );
    describe_gauge!(
        WEBHOOK_HOSTS_OPEN,
        "Webhook hosts whose circuit breaker is open or half-open."
    );
    describe_gauge!(
        WEBHOOK_HOSTS_TRACKED,
        "Webhook hosts whose breaker and limits are kept in memory."
    );
    describe_gauge!(
        LEADER,
        "1 while this replica is the maintenance leader, else 0."
    );
    describe_counter!(
        LEADER_CHANGES,
        "Leadership changes of this replica (change = acquired | lost)."
    );
    describe_counter!(
        CRON_TICKS,
        "Cron ticks handled by the leader (outcome = enqueued | skipped)."
    );
    describe_histogram!(
        CRON_LATENESS,
        Unit::Seconds,
        "Time from a cron tick to the insert of its job."
    );
    describe_histogram!(
        STORE_BATCH_SIZE,
        Unit::Count,
        "Items per batched store write (op = complete | lease)."
    );
}

/// The series a queue's jobs update as they start and end, resolved once per queue served
/// here rather than once per job. Resolving a series through the recorder builds its label
/// set, hashes it and looks it up in the registry; at four series per noop job that was
/// about a ninth of Keel's own CPU while it drained a backlog on Postgres (`perf`, `keel
/// bench --workloads w1`), CPU the database on the same cores could have used. Each series
/// is still registered on first use, as the macros do, so `/metrics` shows the same series
/// at the same moments.
pub(crate) struct QueueMetrics {
    queue: String,
    wait: OnceLock<Histogram>,
    busy: OnceLock<Gauge>,
    prefetched: OnceLock<Gauge>,
    /// By registered kind; every other kind shares `other`.
    kinds: HashMap<JobKind, KindMetrics>,
    other: KindMetrics,
}

/// The series of one (queue, kind label) pair.
pub(crate) struct KindMetrics {
    queue: String,
    kind: String,
    duration: OnceLock<Histogram>,
    finished: Finished,
}

/// One [`JOBS_FINISHED`] series per [`Outcome`].
#[derive(Default)]
struct Finished {
    completed: OnceLock<Counter>,
    retryable: OnceLock<Counter>,
    discarded: OnceLock<Counter>,
    cancelled: OnceLock<Counter>,
    lease_lost: OnceLock<Counter>,
    released: OnceLock<Counter>,
    unrecorded: OnceLock<Counter>,
}

impl Finished {
    fn of(&self, outcome: Outcome) -> &OnceLock<Counter> {
        match outcome {
            Outcome::Completed => &self.completed,
            Outcome::Retryable => &self.retryable,
            Outcome::Discarded => &self.discarded,
            Outcome::Cancelled => &self.cancelled,
            Outcome::LeaseLost => &self.lease_lost,
            Outcome::Released => &self.released,
            Outcome::Unrecorded => &self.unrecorded,
        }
    }
}

impl QueueMetrics {
    /// The series of `queue`, whose jobs of `kinds` have handlers here.
    pub(crate) fn new(queue: &QueueName, kinds: impl IntoIterator<Item = JobKind>) -> Self {
        let queue = queue.to_string();
        let kinds = kinds
            .into_iter()
            .map(|k| {
                let label = k.to_string();
                (k, KindMetrics::new(&queue, label))
            })
            .collect();
        Self {
            other: KindMetrics::new(&queue, crate::catalog::OTHER.to_owned()),
            queue,
            wait: OnceLock::new(),
            busy: OnceLock::new(),
            prefetched: OnceLock::new(),
            kinds,
        }
    }

    /// The series of jobs of `kind`: its own if a handler is registered for it, else the
    /// shared [`crate::catalog::OTHER`] ones, so kinds submitted by clients cannot grow the
    /// label set without bound.
    pub(crate) fn kind(&self, kind: &JobKind) -> &KindMetrics {
        self.kinds.get(kind).unwrap_or(&self.other)
    }

    /// [`JOB_WAIT`]: how long after its `run_at` a job started.
    pub(crate) fn job_wait(&self, seconds: f64) {
        self.wait
            .get_or_init(|| histogram!(JOB_WAIT, "queue" => self.queue.clone()))
            .record(seconds.max(0.0));
    }

    /// [`JOBS_PREFETCHED`]: jobs leased ahead and waiting for a slot.
    pub(crate) fn prefetched(&self, n: usize) {
        self.prefetched
            .get_or_init(|| gauge!(JOBS_PREFETCHED, "queue" => self.queue.clone()))
            .set(n as f64);
    }

    fn busy(&self) -> &Gauge {
        self.busy
            .get_or_init(|| gauge!(WORKERS_BUSY, "queue" => self.queue.clone()))
    }
}

impl KindMetrics {
    fn new(queue: &str, kind: String) -> Self {
        Self {
            queue: queue.to_owned(),
            kind,
            duration: OnceLock::new(),
            finished: Finished::default(),
        }
    }

    /// [`JOB_DURATION`]: how long the handler ran.
    pub(crate) fn job_duration(&self, d: Duration) {
        self.duration
            .get_or_init(|| {
                histogram!(JOB_DURATION, "queue" => self.queue.clone(), "kind" => self.kind.clone())
            })
            .record(d.as_secs_f64());
    }

    /// [`JOBS_FINISHED`]: how the run ended.
    pub(crate) fn job_finished(&self, outcome: Outcome) {
        self.finished
            .of(outcome)
            .get_or_init(|| {
                counter!(
                    JOBS_FINISHED,
                    "queue" => self.queue.clone(),
                    "kind" => self.kind.clone(),
                    "outcome" => outcome.as_str()
                )
            })
            .increment(1);
    }
}

pub(crate) fn jobs_leased(queue: &QueueName, n: usize) {
    counter!(JOBS_LEASED, "queue" => queue.to_string()).increment(n as u64);
}

pub(crate) fn lease_lost(queue: &QueueName) {
    counter!(LEASE_LOST, "queue" => queue.to_string()).increment(1);
}

pub(crate) fn store_batch(op: &'static str, n: usize) {
    histogram!(STORE_BATCH_SIZE, "op" => op).record(n as f64);
}

pub(crate) fn store_error(op: &'static str) {
    counter!(STORE_ERRORS, "op" => op).increment(1);
}

/// `queue` is a label from the catalog: promotion and rescue touch every queue in the
/// database, not only the ones served here.
pub(crate) fn promoted(queue: &str, n: u64) {
    counter!(MAINTENANCE_PROMOTED, "queue" => queue.to_owned()).increment(n);
}

/// `queue` is a label from the catalog, as for [`promoted`].
pub(crate) fn rescued(queue: &str, state: keel_core::JobState) {
    counter!(MAINTENANCE_RESCUED, "queue" => queue.to_owned(), "state" => state.as_str())
        .increment(1);
    if !state.is_finished() {
        counter!(DUPLICATE_RUNS, "queue" => queue.to_owned()).increment(1);
    }
}

pub(crate) fn deleted(what: &'static str, n: u64) {
    counter!(MAINTENANCE_DELETED, "what" => what).increment(n);
}

pub(crate) fn vacuumed(table: &str) {
    counter!(MAINTENANCE_VACUUMS, "table" => table.to_owned()).increment(1);
}

pub(crate) fn leader(leading: bool) {
    gauge!(LEADER).set(if leading { 1.0 } else { 0.0 });
}

pub(crate) fn leader_change(change: &'static str) {
    counter!(LEADER_CHANGES, "change" => change).increment(1);
}

pub(crate) fn cron_ticks(outcome: &'static str, n: usize) {
    if n > 0 {
        counter!(CRON_TICKS, "outcome" => outcome).increment(n as u64);
    }
}

pub(crate) fn cron_lateness(seconds: f64) {
    histogram!(CRON_LATENESS).record(seconds.max(0.0));
}

pub(crate) fn webhook_request(outcome: &'static str) {
    counter!(WEBHOOK_REQUESTS, "outcome" => outcome).increment(1);
}

pub(crate) fn webhook_hosts_open(n: usize) {
    gauge!(WEBHOOK_HOSTS_OPEN).set(n as f64);
}

pub(crate) fn webhook_hosts_tracked(n: usize) {
    gauge!(WEBHOOK_HOSTS_TRACKED).set(n as f64);
}

/// Counts one running job in [`WORKERS_BUSY`] for as long as it lives, so the gauge comes
/// back down however the run ends.
pub(crate) struct BusyGuard {
    metrics: Arc<QueueMetrics>,
}

impl BusyGuard {
    pub(crate) fn new(metrics: &Arc<QueueMetrics>) -> Self {
        metrics.busy().increment(1.0);
        Self {
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.metrics.busy().decrement(1.0);
    }
}

/// Displays an error with its whole `source()` chain ("leasing jobs: connection reset"),
/// since the top-level message alone often only says what was being attempted.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Logs a failed store call of a runtime loop: transient failures (the database blinked)
/// at warn, anything else at error, since it needs an operator.
pub(crate) fn report_store_error(what: &str, e: &keel_core::StoreError) {
    if e.is_transient() {
        tracing::warn!(error = %ErrorChain(e), "{what} failed");
    } else {
        tracing::error!(error = %ErrorChain(e), "{what} failed");
    }
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    fn kind(s: &str) -> JobKind {
        JobKind::parse(s).expect("valid kind")
    }

    /// The cached series are the ones the macros made: same names and labels, registered on
    /// first use, kinds without a handler counted as `other`.
    #[test]
    fn queue_metrics_label_and_count_as_the_macros_did() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let queue = QueueName::parse("q1").expect("valid queue");
            let m = Arc::new(QueueMetrics::new(&queue, [kind("echo")]));
            assert!(
                !handle.render().contains("keel_"),
                "nothing is registered before it is used:\n{}",
                handle.render()
            );
            m.kind(&kind("echo")).job_finished(Outcome::Completed);
            m.kind(&kind("echo")).job_duration(Duration::from_millis(5));
            m.kind(&kind("made-up")).job_finished(Outcome::Discarded);
            m.kind(&kind("also-made-up"))
                .job_finished(Outcome::Discarded);
            m.job_wait(-1.0);
            m.prefetched(3);
            let busy = BusyGuard::new(&m);
            let during = handle.render();
            drop(busy);
            let after = handle.render();
            for line in [
                r#"keel_jobs_finished_total{queue="q1",kind="echo",outcome="completed"} 1"#,
                r#"keel_jobs_finished_total{queue="q1",kind="other",outcome="discarded"} 2"#,
                r#"keel_job_duration_seconds_count{queue="q1",kind="echo"} 1"#,
                r#"keel_job_wait_seconds_count{queue="q1"} 1"#,
                r#"keel_jobs_prefetched{queue="q1"} 3"#,
                r#"keel_workers_busy{queue="q1"} 0"#,
            ] {
                assert!(after.lines().any(|l| l == line), "{line} in:\n{after}");
            }
            assert!(
                during
                    .lines()
                    .any(|l| l == r#"keel_workers_busy{queue="q1"} 1"#),
                "{during}"
            );
            assert!(!after.contains(r#"kind="made-up""#), "{after}");
        });
    }
}
