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

use serde::Serialize;
use serde_json::value::RawValue;

use crate::backoff::Backoff;
use crate::clock::{Timestamp, truncate_micros};
use crate::ids::{
    IdempotencyKey, JobId, JobKind, LeaseToken, QueueName, ScheduleName, TenantId, WorkerId,
};
use crate::job::{Job, JobState, NewJob, next_attempt_at};

mod layer;
mod roles;

pub use layer::{Call, Layered, StoreLayer};
pub use roles::{
    ChangeStream, JobStore, LeaderStore, MaintenanceStore, Op, QueueStore, ScheduleStore,
    StateChange, Store, WakeupStream, WorkStore,
};

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
    /// Connections closed, since the store opened, because the call using them ended before
    /// every answer came back (a caller that gave up, a transaction ended by an error).
    /// Only behind a transaction pooler, where the next call's statements must not follow
    /// an unanswered request; elsewhere such connections are reused and this stays 0.
    pub closed_unanswered: u64,
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
    /// The jobs to insert (atomically, as [`JobStore::insert`]).
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

/// What [`ScheduleStore::enqueue_ticks`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickOutcome {
    /// Ticks enqueued now, each with its job.
    pub enqueued: Vec<(Timestamp, JobId)>,
    /// Ticks skipped because they had been enqueued before (the `(schedule, tick)` key
    /// exists), or because the schedule was paused or deleted meanwhile.
    pub skipped: usize,
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
