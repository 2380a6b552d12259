//! The contract every durable backend fulfils.
//!
//! Operations take params structs rather than long argument lists (River's `riverdriver`
//! does the same): adding a field later does not ripple through every call site, and a call
//! reads as what it asks for. Batch operations (`complete`, `heartbeat`, `release`) report
//! one outcome per item, in input order, so one stale lease in a batch does not fail the
//! others; they fail as a whole only when the store itself failed.
//!
//! Every implementation must pass the conformance suite in `keel-store` (feature
//! `testkit`), which checks each guarantee stated here against a real database.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::backoff::Backoff;
use crate::clock::{Timestamp, truncate_micros};
use crate::error::StoreError;
use crate::ids::{
    IdempotencyKey, JobId, JobKind, LeaseToken, QueueName, ScheduleName, TenantId, WorkerId,
};
use crate::job::{Job, JobState, NewJob, next_attempt_at};
use crate::schedule::{NewSchedule, Schedule};

/// Identifies one lease of one job: what a worker presents to prove it still holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    /// The job.
    pub id: JobId,
    /// The token handed out when it was leased.
    pub token: LeaseToken,
}

impl LeaseRef {
    /// The lease a freshly leased job is held under, if it is running.
    pub fn of(job: &Job) -> Option<Self> {
        job.lease.as_ref().map(|l| Self {
            id: job.id,
            token: l.token,
        })
    }
}

/// Take up to `max` available jobs from `queue`.
#[derive(Debug, Clone)]
pub struct LeaseParams {
    /// The queue to lease from.
    pub queue: QueueName,
    /// At most this many jobs (the number of free worker permits).
    pub max: u32,
    /// How long the lease lasts before it must be renewed.
    pub lease_for: Duration,
    /// Who is leasing.
    pub owner: WorkerId,
    /// Only jobs of this tenant (an external worker holding a tenant's key); `None` takes
    /// any tenant's (the built-in dispatchers, an operator's worker).
    pub tenant: Option<TenantId>,
    /// Only jobs of these kinds (the kinds an external worker has handlers for); empty
    /// takes every kind.
    pub kinds: Vec<JobKind>,
}

/// Extend leases that are still held.
#[derive(Debug, Clone)]
pub struct HeartbeatParams {
    /// The leases to extend.
    pub leases: Vec<LeaseRef>,
    /// New expiry is now + `lease_for`.
    pub lease_for: Duration,
}

/// One successful run to record.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The lease the run held.
    pub lease: LeaseRef,
    /// What the run produced, if anything.
    pub result: Option<Box<RawValue>>,
}

/// Record a failed attempt.
#[derive(Debug, Clone)]
pub struct FailParams {
    /// The lease the run held.
    pub lease: LeaseRef,
    /// What went wrong (truncated when stored).
    pub error: String,
    /// The error will not go away by retrying: discard regardless of attempts left.
    pub permanent: bool,
    /// When the failure itself says when to try again (a webhook receiver's `Retry-After`,
    /// an open circuit's next probe): used instead of the job's backoff when attempts
    /// remain, so the job neither hammers a receiver that asked for quiet nor waits longer
    /// than it asked. A time in the past means now. Ignored when the job is discarded.
    pub retry_at: Option<Timestamp>,
}

impl FailParams {
    /// When this failed attempt runs again, or `None` to discard the job: `retry_at` (not
    /// before `now`) when set, else now + the job's backoff, and `None` when the error is
    /// permanent or `attempt` was the last of `max_attempts`. Every backend's `fail` uses it
    /// so they cannot disagree.
    pub fn next_run_at(
        &self,
        attempt: u32,
        max_attempts: u32,
        backoff: &Backoff,
        now: Timestamp,
        rng: &mut impl rand::Rng,
    ) -> Option<Timestamp> {
        if let Some(at) = self.retry_at
            && !self.permanent
            && attempt < max_attempts
        {
            return Some(truncate_micros(at.max(now)));
        }
        next_attempt_at(attempt, max_attempts, backoff, self.permanent, now, rng)
    }
}

/// Filters and cursor for listing jobs. Pagination is by id (keyset), never by offset, so a
/// page costs the same however deep it is and rows inserted meanwhile neither repeat nor
/// shift earlier rows.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Only this queue.
    pub queue: Option<QueueName>,
    /// Only this state.
    pub state: Option<JobState>,
    /// Only this kind.
    pub kind: Option<JobKind>,
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Only ids greater than this (the `next` of the previous page).
    pub after: Option<JobId>,
    /// Page size, 1..=[`ListParams::MAX_LIMIT`].
    pub limit: u32,
}

impl ListParams {
    /// Largest page a store returns; larger limits are clamped.
    pub const MAX_LIMIT: u32 = 1000;

    /// The limit clamped into 1..=[`ListParams::MAX_LIMIT`].
    pub fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

/// One page of jobs, oldest first.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// The jobs, by ascending id.
    pub jobs: Vec<Job>,
    /// Cursor for the next page; `None` when this page was not full.
    pub next: Option<JobId>,
}

/// Make due scheduled and retryable jobs available.
#[derive(Debug, Clone, Copy)]
pub struct PromoteParams {
    /// At most this many jobs per call, so one call's transaction stays short.
    pub limit: u32,
}

/// How many jobs a promotion made available in one queue (so dispatchers of that queue can
/// be woken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The queue.
    pub queue: QueueName,
    /// Jobs made available in it.
    pub count: u64,
}

/// Rescue running jobs whose lease expired.
#[derive(Debug, Clone, Copy)]
pub struct RescueParams {
    /// At most this many jobs per call.
    pub limit: u32,
}

/// A job taken back from a worker that stopped renewing its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescued {
    /// The job.
    pub id: JobId,
    /// Its queue.
    pub queue: QueueName,
    /// `retryable` (attempts left) or `discarded`.
    pub state: JobState,
    /// Who held the lease that lapsed.
    pub owner: Option<WorkerId>,
}

/// Delete finished jobs past retention.
#[derive(Debug, Clone, Copy)]
pub struct RetentionParams {
    /// Delete jobs that finished before this instant.
    pub finished_before: Timestamp,
    /// At most this many rows per call.
    pub limit: u32,
}

/// Number of jobs in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    /// Scheduled jobs.
    pub scheduled: u64,
    /// Available jobs.
    pub available: u64,
    /// Running jobs.
    pub running: u64,
    /// Retryable jobs.
    pub retryable: u64,
    /// Completed jobs.
    pub completed: u64,
    /// Discarded jobs.
    pub discarded: u64,
    /// Cancelled jobs.
    pub cancelled: u64,
}

impl StateCounts {
    fn slot(&mut self, state: JobState) -> &mut u64 {
        match state {
            JobState::Scheduled => &mut self.scheduled,
            JobState::Available => &mut self.available,
            JobState::Running => &mut self.running,
            JobState::Retryable => &mut self.retryable,
            JobState::Completed => &mut self.completed,
            JobState::Discarded => &mut self.discarded,
            JobState::Cancelled => &mut self.cancelled,
        }
    }

    /// The count for `state`.
    pub fn get(&self, state: JobState) -> u64 {
        let mut copy = *self;
        *copy.slot(state)
    }

    /// Adds `n` jobs in `state`.
    pub fn add(&mut self, state: JobState, n: u64) {
        *self.slot(state) += n;
    }

    /// All jobs counted.
    pub fn total(&self) -> u64 {
        JobState::ALL.iter().map(|s| self.get(*s)).sum()
    }
}

/// Per-queue job counts by state, and whether the queue is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// The queue.
    pub queue: QueueName,
    /// Whether leasing from it is paused.
    pub paused: bool,
    /// Its jobs by state.
    pub counts: StateCounts,
}

/// How busy a store's connections are, for `keel_db_pool_connections{state}` and for
/// diagnosing pool exhaustion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Most connections the store will open.
    pub max: usize,
    /// Connections open and idle.
    pub idle: usize,
    /// Connections open and lent out.
    pub in_use: usize,
    /// Callers waiting for a connection (on SQLite: writes queued for the writer thread).
    pub waiting: usize,
}

/// The response an idempotent request produced, kept so a replay returns it byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status of the original response.
    pub status: u16,
    /// Its body, exactly as sent.
    pub body: Vec<u8>,
}

/// Builds the response to store for a first request, from the jobs as they will be stored.
/// Called inside the insert transaction, so the response and the jobs commit together.
pub type Respond = Box<dyn FnOnce(&[Job]) -> StoredResponse + Send>;

/// Insert jobs under an idempotency key: the key, a fingerprint of the request and the
/// response commit in the same transaction as the jobs.
pub struct IdempotentInsert {
    /// Tenant the key belongs to (keys are scoped per tenant).
    pub tenant: TenantId,
    /// The client's key.
    pub key: IdempotencyKey,
    /// A digest of what was asked (method, path, body): the same key with a different
    /// fingerprint is a conflict, not a replay.
    pub fingerprint: String,
    /// The jobs to insert (atomically, as [`Store::insert`]).
    pub jobs: Vec<NewJob>,
    /// How long the key is remembered.
    pub ttl: Duration,
    /// Produces the response to store and return.
    pub respond: Respond,
}

impl std::fmt::Debug for IdempotentInsert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentInsert")
            .field("tenant", &self.tenant)
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("jobs", &self.jobs.len())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What an idempotent insert did.
#[derive(Debug, Clone)]
pub enum IdempotentOutcome {
    /// First use of the key: the jobs were inserted and this response stored.
    Created {
        /// The stored jobs.
        jobs: Vec<Job>,
        /// The response stored with the key.
        response: StoredResponse,
    },
    /// The key was used before with the same request: here is the original response.
    Replayed(StoredResponse),
}

/// The maintenance leader's term number. It increases by one every time leadership passes
/// to another replica (never on a renewal), so a write made by a former leader can be told
/// from one made by the current leader (a fencing token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LeaderEpoch(pub u64);

impl std::fmt::Display for LeaderEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Ask to become, or stay, the maintenance leader.
#[derive(Debug, Clone)]
pub struct CampaignParams {
    /// Who asks: this replica's id.
    pub owner: WorkerId,
    /// How long the term lasts unless renewed. Another replica can take over only after it
    /// lapses, so this bounds how long maintenance and cron pause when a leader dies.
    pub ttl: Duration,
}

/// Who leads, as the store answered a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The current leader (the caller, if its campaign won or renewed).
    pub owner: WorkerId,
    /// Its term.
    pub epoch: LeaderEpoch,
    /// When its term lapses unless renewed.
    pub expires_at: Timestamp,
}

/// Proof that a write is made by the current leader: the store refuses it with
/// [`StoreError::NotLeader`] unless `owner` still holds the term `epoch`, unexpired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The leader.
    pub owner: WorkerId,
    /// Its term.
    pub epoch: LeaderEpoch,
}

/// Enqueue cron ticks of one schedule.
#[derive(Debug, Clone)]
pub struct TickParams {
    /// The schedule's tenant.
    pub tenant: TenantId,
    /// The schedule.
    pub schedule: ScheduleName,
    /// Each tick and the job it enqueues, oldest first.
    pub ticks: Vec<(Timestamp, NewJob)>,
    /// The leader's fence (see [`Fence`]).
    pub fence: Fence,
}

/// What [`Store::enqueue_ticks`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// Ticks enqueued now, each with its job.
    pub enqueued: Vec<(Timestamp, JobId)>,
    /// Ticks skipped because they had been enqueued before (the `(schedule, tick)` key
    /// exists), or because the schedule was paused or deleted meanwhile.
    pub skipped: usize,
}

/// A job changed state, as announced to every replica sharing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The job.
    pub id: JobId,
    /// Its queue.
    pub queue: QueueName,
    /// The state it moved to.
    pub state: JobState,
}

/// State changes made by any process sharing the database (Postgres `NOTIFY`), including
/// this one. Best effort, like [`WakeupStream`]: a change made while the listening
/// connection was down is not delivered, so a consumer must also re-read what it waits for
/// on a timer.
#[async_trait]
pub trait ChangeStream: Send {
    /// The next change, or `None` when the stream has ended (store closed).
    async fn next(&mut self) -> Option<StateChange>;
}

/// Notices that jobs became available in a queue, sent by other processes sharing the
/// database (Postgres `LISTEN/NOTIFY`), so an idle dispatcher starts a job within
/// milliseconds of another replica's enqueue instead of at its next poll.
#[async_trait]
pub trait WakeupStream: Send {
    /// The next queue with new work, or `None` when the stream has ended (store closed).
    /// A notice may be spurious or coalesced; it only ever means "look now".
    async fn next(&mut self) -> Option<QueueName>;
}

/// A durable job store.
///
/// Implementations are shared (`Arc<dyn Store>`) across every request handler and worker,
/// so each method takes `&self` and is safe to call concurrently. Time comes from the
/// [`crate::Clock`] the store was built with.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts every job or none (one transaction). Each job is validated first; the first
    /// invalid one fails the call with [`StoreError::Invalid`]. A duplicate id is a
    /// [`StoreError::Conflict`]. Returns the stored jobs in input order.
    ///
    /// A job with a [`NewJob::unique`] key that another job of its tenant holds (see
    /// [`crate::UniqueScopeKind::holds_in`]) is not inserted: the holder is returned in its
    /// place (its id differs from the one asked for). The database enforces this, so
    /// concurrent inserts of one key from any number of processes create one job.
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError>;

    /// One job by id.
    async fn get(&self, id: JobId) -> Result<Job, StoreError>;

    /// A page of jobs matching the filters, by ascending id.
    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError>;

    /// Leases up to `max` available jobs of a queue, most urgent first (priority, then
    /// `run_at`, then id). Each job is handed to exactly one caller, however many lease
    /// concurrently; it becomes `running` with `attempt` + 1 and a fresh lease token.
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError>;

    /// Extends leases that are still held; per item, the new expiry or
    /// [`StoreError::StaleLease`] / [`StoreError::NotFound`].
    async fn heartbeat(
        &self,
        params: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError>;

    /// Marks runs completed with their results; per item, success or why not (a stale
    /// token never overwrites the outcome of the run that replaced it).
    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError>;

    /// Records a failed attempt: `retryable` with `run_at` = [`FailParams::retry_at`] if
    /// given, else now + the job's backoff, when attempts remain and the error is not
    /// permanent; otherwise `discarded` (see [`FailParams::next_run_at`]).
    async fn fail(&self, params: FailParams) -> Result<Job, StoreError>;

    /// Gives leased jobs back unfinished (graceful shutdown): `available` again, the
    /// attempt not counted.
    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError>;

    /// Cancels a job that has not finished. A running job's lease is revoked, so its
    /// worker's later complete or fail is rejected as stale.
    async fn cancel(&self, id: JobId) -> Result<Job, StoreError>;

    /// Makes a scheduled, retryable or finished job available now. A job that had used up
    /// its attempts gets one more.
    async fn retry(&self, id: JobId) -> Result<Job, StoreError>;

    /// Makes scheduled and retryable jobs whose `run_at` has come available. Safe to run
    /// from several processes at once.
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError>;

    /// Takes back running jobs whose lease expired: each counts as a failed attempt
    /// (`retryable` with backoff, or `discarded` when none are left). Safe to run from
    /// several processes at once; never touches a job that finished meanwhile.
    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError>;

    /// Deletes finished jobs that finished before the cutoff; returns how many.
    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError>;

    /// Job counts per queue and state, and the paused flag, sorted by queue name. Without a
    /// tenant: every queue that has jobs or has been paused or resumed. With one: the
    /// queues that hold jobs of that tenant, counting only those (a tenant learns nothing
    /// of the others' queues or load).
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError>;

    /// [`Store::queue_stats`] without a tenant, counting only unfinished jobs (scheduled,
    /// available, running, retryable); the finished counts are zero. For gauges refreshed
    /// every few seconds: counting finished jobs reads every job kept for retention, and
    /// that grows with history (days of it), where this grows with the backlog.
    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError>;

    /// Inserts jobs under an idempotency key (G3). First use of `(tenant, key)`: inserts the
    /// jobs and stores the key, fingerprint and the response from `respond`, all in one
    /// transaction. Later use with the same fingerprint while the key lives: inserts nothing
    /// and returns the stored response. Same key, different fingerprint:
    /// [`StoreError::Conflict`]. Concurrent first uses of one key create the jobs once.
    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError>;

    /// Forgets idempotency keys whose time to live has passed; returns how many.
    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError>;

    /// Pauses or resumes leasing from a queue. Jobs can still be enqueued into a paused
    /// queue; [`Store::lease`] returns nothing from it until it is resumed.
    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError>;

    /// Becomes or stays the maintenance leader if the term is free, lapsed, or the caller's
    /// own (renewed to `now + ttl`); returns who leads either way. A new leader gets the
    /// previous epoch + 1.
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError>;

    /// Gives up leadership if `owner` holds it (graceful shutdown), so another replica takes
    /// over at its next campaign instead of after the term lapses.
    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError>;

    /// Creates a schedule, or replaces one of the same tenant and name when `replace`
    /// (keeping its `created_at` and `last_tick_at`). Returns it and whether it was created.
    /// Without `replace`, an existing schedule is a [`StoreError::Conflict`]. The caller
    /// validates it first ([`NewSchedule::validate`]).
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError>;

    /// One schedule, or [`StoreError::ScheduleNotFound`].
    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError>;

    /// Schedules of one tenant, or of every tenant (maintenance), by tenant then name; at
    /// most `limit`, after `(tenant, name)` when given (keyset pagination).
    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError>;

    /// Deletes a schedule (jobs it enqueued stay), or [`StoreError::ScheduleNotFound`].
    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError>;

    /// Pauses or resumes a schedule; returns it.
    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError>;

    /// Enqueues cron ticks exactly once (G4). In one transaction: checks the fence
    /// ([`StoreError::NotLeader`] if stale), and for each tick not yet recorded for the
    /// schedule, records the `(schedule, tick)` key and inserts its job; then moves the
    /// schedule's `last_tick_at` forward. A tick recorded before is skipped, whoever
    /// recorded it; so is every tick of a schedule paused or deleted meanwhile.
    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError>;

    /// Forgets tick records older than `before` (they only guard against enqueuing a tick
    /// twice, and no tick that old is due any more); returns how many.
    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError>;

    /// Checks the database answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Current connection pool occupancy. Cheap and non-blocking: called for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Wakeups from other processes, if the backend can deliver them (Postgres); `None` for
    /// a store only one process uses (SQLite), where in-process wakeups cover every
    /// enqueue. Each call returns an independent stream.
    fn wakeups(&self) -> Option<Box<dyn WakeupStream>> {
        None
    }

    /// Job state changes made by any process sharing the database, if the backend can
    /// deliver them across processes (Postgres); `None` for SQLite, where the runtime's
    /// in-process events already see every change. Announced: cancels (including of a
    /// running job, so the replica running it stops it), retries and rescues. Completions
    /// and failures are not (on Postgres a notifying transaction serialises commits, which
    /// cost the completion path 15–20 %): a consumer waiting for a job to finish on another
    /// process re-reads it on a timer. Each call returns an independent stream.
    fn changes(&self) -> Option<Box<dyn ChangeStream>> {
        None
    }

    /// Flushes pending writes and closes connections. Later calls fail.
    async fn close(&self);
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn params(permanent: bool, retry_at: Option<Timestamp>) -> FailParams {
        FailParams {
            lease: LeaseRef {
                id: JobId::new(),
                token: LeaseToken::new(),
            },
            error: "boom".into(),
            permanent,
            retry_at,
        }
    }

    #[test]
    fn retry_at_replaces_the_backoff_only_while_the_job_may_retry() {
        let now = truncate_micros(chrono::Utc::now());
        let hour = Backoff::Fixed {
            delay_ms: 3_600_000,
        };
        let rng = &mut rand::rng();
        let soon = now + TimeDelta::seconds(120);
        assert_eq!(
            params(false, Some(soon)).next_run_at(1, 3, &hour, now, rng),
            Some(soon)
        );
        assert_eq!(
            params(false, None).next_run_at(1, 3, &hour, now, rng),
            Some(now + TimeDelta::hours(1))
        );
        assert_eq!(
            params(false, Some(now - TimeDelta::seconds(5))).next_run_at(1, 3, &hour, now, rng),
            Some(now),
            "a time in the past means now"
        );
        assert_eq!(
            params(true, Some(soon)).next_run_at(1, 3, &hour, now, rng),
            None
        );
        assert_eq!(
            params(false, Some(soon)).next_run_at(3, 3, &hour, now, rng),
            None
        );
    }
}
