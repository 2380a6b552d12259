//! The [`Store`] contract, split by role: a consumer names only the operations it uses, and
//! each backend implements a role in a module of its own.
//!
//! Beside each role trait stands its forwarding through [`Layered`] (each operation a read
//! or a write, named by its [`Op`]), so an operation is declared, named and forwarded in
//! this one file; the layers themselves ([`StoreLayer`]) never list operations.

use async_trait::async_trait;

use super::layer::{Layered, StoreLayer};
use super::{
    CampaignParams, Completion, FailParams, HeartbeatParams, IdempotentInsert, IdempotentOutcome,
    JobPage, LeaderEpoch, Leadership, LeaseParams, LeaseRef, ListParams, PoolStats, PromoteParams,
    Promoted, QueueStats, RescueParams, Rescued, RetentionParams, TickOutcome, TickParams,
};
use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::ids::{JobId, QueueName, ScheduleName, TenantId, WorkerId};
use crate::job::{Job, JobState, NewJob};
use crate::schedule::{NewSchedule, Schedule};

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

/// A store operation, as a layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    Insert,
    InsertIdempotent,
    Get,
    List,
    Cancel,
    Retry,
    Lease,
    Heartbeat,
    Complete,
    Fail,
    Release,
    Promote,
    Rescue,
    DeleteFinished,
    DeleteExpiredIdempotencyKeys,
    DeleteOldTicks,
    QueueStats,
    QueueDepths,
    QueueStatsOf,
    SetQueuePaused,
    Campaign,
    Resign,
    SaveSchedule,
    GetSchedule,
    ListSchedules,
    DeleteSchedule,
    SetSchedulePaused,
    /// With the epoch of the fence presented, so a refusal can name it.
    EnqueueTicks(LeaderEpoch),
    Ping,
    Vacuum,
}

impl Op {
    /// What the operation does, worded like the stores' own error contexts ("reading a
    /// job"), for errors a layer answers in its place.
    pub fn doing(self) -> &'static str {
        match self {
            Op::Insert => "inserting jobs",
            Op::InsertIdempotent => "inserting jobs under an idempotency key",
            Op::Get => "reading a job",
            Op::List => "listing jobs",
            Op::Cancel => "cancelling a job",
            Op::Retry => "retrying a job",
            Op::Lease => "leasing",
            Op::Heartbeat => "extending leases",
            Op::Complete => "completing",
            Op::Fail => "recording a failed attempt",
            Op::Release => "releasing jobs",
            Op::Promote => "promoting due jobs",
            Op::Rescue => "rescuing expired leases",
            Op::DeleteFinished => "deleting finished jobs",
            Op::DeleteExpiredIdempotencyKeys => "deleting expired idempotency keys",
            Op::DeleteOldTicks => "deleting old tick records",
            Op::QueueStats => "reading queue statistics",
            Op::QueueDepths => "reading queue depths",
            Op::QueueStatsOf => "reading a queue's statistics",
            Op::SetQueuePaused => "pausing or resuming a queue",
            Op::Campaign => "campaigning",
            Op::Resign => "resigning",
            Op::SaveSchedule => "saving a schedule",
            Op::GetSchedule => "reading a schedule",
            Op::ListSchedules => "listing schedules",
            Op::DeleteSchedule => "deleting a schedule",
            Op::SetSchedulePaused => "pausing or resuming a schedule",
            Op::EnqueueTicks(_) => "enqueuing cron ticks",
            Op::Ping => "pinging the database",
            Op::Vacuum => "vacuuming the job tables",
        }
    }
}

/// Jobs as clients see them: enqueue (with or without an idempotency key), read, list,
/// cancel and retry.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Inserts every job or none (one transaction). Each job is validated first; the first
    /// invalid one fails the call with [`StoreError::Invalid`]. A duplicate id is a
    /// [`StoreError::Conflict`]. Returns the stored jobs in input order.
    ///
    /// A job with a [`NewJob::unique`] key that another job of its tenant holds (see
    /// [`crate::UniqueScopeKind::holds_in`]) is not inserted: the holder is returned in its
    /// place (its id differs from the one asked for). The database enforces this, so
    /// concurrent inserts of one key from any number of processes create one job.
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError>;

    /// Inserts jobs under an idempotency key (G3). First use of `(tenant, key)`: inserts the
    /// jobs and stores the key, fingerprint and the response from `respond`, all in one
    /// transaction. Later use with the same fingerprint while the key lives: inserts nothing
    /// and returns the stored response. Same key, different fingerprint:
    /// [`StoreError::Conflict`]. Concurrent first uses of one key create the jobs once.
    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError>;

    /// One job by id.
    async fn get(&self, id: JobId) -> Result<Job, StoreError>;

    /// A page of jobs matching the filters, by ascending id.
    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError>;

    /// Cancels a job that has not finished. A running job's lease is revoked, so its
    /// worker's later complete or fail is rejected as stale.
    async fn cancel(&self, id: JobId) -> Result<Job, StoreError>;

    /// Makes a scheduled, retryable or finished job available now. A job that had used up
    /// its attempts gets one more.
    async fn retry(&self, id: JobId) -> Result<Job, StoreError>;
}

#[async_trait]
impl<L: StoreLayer> JobStore for Layered<L> {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        self.layer.write(Op::Insert, self.inner.insert(jobs)).await
    }

    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        let call = self.inner.insert_idempotent(req);
        self.layer.write(Op::InsertIdempotent, call).await
    }

    async fn get(&self, id: JobId) -> Result<Job, StoreError> {
        let call = Box::new(move || self.inner.get(id));
        self.layer.read(Op::Get, call).await
    }

    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError> {
        let call = Box::new(move || self.inner.list(params.clone()));
        self.layer.read(Op::List, call).await
    }

    async fn cancel(&self, id: JobId) -> Result<Job, StoreError> {
        self.layer.write(Op::Cancel, self.inner.cancel(id)).await
    }

    async fn retry(&self, id: JobId) -> Result<Job, StoreError> {
        self.layer.write(Op::Retry, self.inner.retry(id)).await
    }
}

/// Running jobs: lease, extend, finish and give back. What dispatchers, the completer,
/// heartbeats and external workers need; every write is fenced by the lease token.
#[async_trait]
pub trait WorkStore: Send + Sync {
    /// Leases up to `max` available jobs of a queue, most urgent first (priority, then
    /// `run_at`, then id). Each job is handed to exactly one caller, however many lease
    /// concurrently; it becomes `running` with `attempt` + 1 and a fresh lease token.
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError>;

    /// Extends leases that are still held; per item, the lease's expiry after the call, or
    /// [`StoreError::StaleLease`] / [`StoreError::NotFound`]. The expiry is the new one,
    /// except that a store may leave a lease whose row another write holds at that moment
    /// (almost always the job's outcome being committed) at its current expiry rather than
    /// wait for it; the next heartbeat extends it if it is still held.
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
}

#[async_trait]
impl<L: StoreLayer> WorkStore for Layered<L> {
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError> {
        self.layer.write(Op::Lease, self.inner.lease(params)).await
    }

    async fn heartbeat(
        &self,
        params: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        let call = self.inner.heartbeat(params);
        self.layer.write(Op::Heartbeat, call).await
    }

    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let call = self.inner.complete(completions);
        self.layer.write(Op::Complete, call).await
    }

    async fn fail(&self, params: FailParams) -> Result<Job, StoreError> {
        self.layer.write(Op::Fail, self.inner.fail(params)).await
    }

    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let call = self.inner.release(leases);
        self.layer.write(Op::Release, call).await
    }
}

/// What the maintenance leader runs on timers: promote due jobs, rescue expired leases, and
/// delete what retention no longer keeps (finished jobs, expired idempotency keys, old tick
/// records). Each is safe to run from several
/// processes at once.
#[async_trait]
pub trait MaintenanceStore: Send + Sync {
    /// Makes scheduled and retryable jobs whose `run_at` has come available. Safe to run
    /// from several processes at once.
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError>;

    /// Takes back running jobs whose lease expired: each counts as a failed attempt
    /// (`retryable` with backoff, or `discarded` when none are left). Safe to run from
    /// several processes at once; never touches a job that finished meanwhile.
    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError>;

    /// Deletes finished jobs that finished before the cutoff; returns how many.
    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError>;

    /// Forgets idempotency keys whose time to live has passed; returns how many.
    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError>;

    /// Forgets tick records older than `before` (they only guard against enqueuing a tick
    /// twice, and no tick that old is due any more); returns how many.
    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError>;

    /// Reclaims the dead row versions of the store's busiest tables and refreshes their
    /// statistics, where nothing else does; returns the tables it vacuumed or analysed.
    ///
    /// A Postgres queue table lives on vacuum: every lease and completion leaves a dead row
    /// version and dead index entries, which each lease steps over until a vacuum removes
    /// them, and a planner without fresh statistics misjudges listings. Autovacuum does that
    /// when it is on; when a server runs with it off, the job table would rot. Stores whose
    /// database reclaims space by itself (SQLite rewrites rows in place) do nothing. Safe to
    /// call from several processes: a table another session is vacuuming is skipped.
    async fn vacuum(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl<L: StoreLayer> MaintenanceStore for Layered<L> {
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        self.layer
            .write(Op::Promote, self.inner.promote(params))
            .await
    }

    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        self.layer
            .write(Op::Rescue, self.inner.rescue(params))
            .await
    }

    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError> {
        let call = self.inner.delete_finished(params);
        self.layer.write(Op::DeleteFinished, call).await
    }

    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        let call = self.inner.delete_expired_idempotency_keys(limit);
        self.layer
            .write(Op::DeleteExpiredIdempotencyKeys, call)
            .await
    }

    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        let call = self.inner.delete_old_ticks(before, limit);
        self.layer.write(Op::DeleteOldTicks, call).await
    }

    async fn vacuum(&self) -> Result<Vec<String>, StoreError> {
        self.layer.write(Op::Vacuum, self.inner.vacuum()).await
    }
}

/// Queues: their counts and their paused flag.
#[async_trait]
pub trait QueueStore: Send + Sync {
    /// Job counts per queue and state, and the paused flag, sorted by queue name. Without a
    /// tenant: every queue that has jobs or has been paused or resumed. With one: the
    /// queues that hold jobs of that tenant, counting only those (a tenant learns nothing
    /// of the others' queues or load).
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError>;

    /// [`QueueStore::queue_stats`] without a tenant, counting only unfinished jobs (scheduled,
    /// available, running, retryable); the finished counts are zero. For gauges refreshed
    /// every few seconds: counting finished jobs reads every job kept for retention, and
    /// that grows with history (days of it), where this grows with the backlog.
    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError>;

    /// One queue's counts by state and its paused flag, as [`QueueStore::queue_stats`]
    /// reports them, without counting the other queues. With a tenant, only that tenant's
    /// jobs are counted. A queue that holds no jobs and was never paused has zero counts:
    /// queues exist by being named.
    async fn queue_stats_of(
        &self,
        queue: QueueName,
        tenant: Option<TenantId>,
    ) -> Result<QueueStats, StoreError>;

    /// Pauses or resumes leasing from a queue. Jobs can still be enqueued into a paused
    /// queue; [`WorkStore::lease`] returns nothing from it until it is resumed.
    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError>;
}

#[async_trait]
impl<L: StoreLayer> QueueStore for Layered<L> {
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        let call = Box::new(move || self.inner.queue_stats(tenant.clone()));
        self.layer.read(Op::QueueStats, call).await
    }

    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        let call = Box::new(move || self.inner.queue_depths());
        self.layer.read(Op::QueueDepths, call).await
    }

    async fn queue_stats_of(
        &self,
        queue: QueueName,
        tenant: Option<TenantId>,
    ) -> Result<QueueStats, StoreError> {
        let call = Box::new(move || self.inner.queue_stats_of(queue.clone(), tenant.clone()));
        self.layer.read(Op::QueueStatsOf, call).await
    }

    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        let call = self.inner.set_queue_paused(queue, paused);
        self.layer.write(Op::SetQueuePaused, call).await
    }
}

/// The maintenance and cron leader's term, kept in the database so that one replica among
/// many runs maintenance and enqueues cron ticks.
#[async_trait]
pub trait LeaderStore: Send + Sync {
    /// Becomes or stays the maintenance leader if the term is free, lapsed, or the caller's
    /// own (renewed to `now + ttl`); returns who leads either way. A new leader gets the
    /// previous epoch + 1.
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError>;

    /// Gives up leadership if `owner` holds it (graceful shutdown), so another replica takes
    /// over at its next campaign instead of after the term lapses.
    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError>;
}

#[async_trait]
impl<L: StoreLayer> LeaderStore for Layered<L> {
    /// A write like any other: a campaign that a layer refuses (the guard's breaker open,
    /// its bulkhead full) is a failed campaign, and the leader steps down at once, which is
    /// what losing the database must mean.
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError> {
        self.layer
            .write(Op::Campaign, self.inner.campaign(params))
            .await
    }

    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        self.layer.write(Op::Resign, self.inner.resign(owner)).await
    }
}

/// Cron schedules, and the exactly-once enqueue of their ticks (G4).
#[async_trait]
pub trait ScheduleStore: Send + Sync {
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
}

#[async_trait]
impl<L: StoreLayer> ScheduleStore for Layered<L> {
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError> {
        let call = self.inner.save_schedule(schedule, replace);
        self.layer.write(Op::SaveSchedule, call).await
    }

    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError> {
        let call = Box::new(move || self.inner.get_schedule(tenant, name));
        self.layer.read(Op::GetSchedule, call).await
    }

    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        let call = Box::new(move || self.inner.list_schedules(tenant, after.clone(), limit));
        self.layer.read(Op::ListSchedules, call).await
    }

    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError> {
        let call = self.inner.delete_schedule(tenant, name);
        self.layer.write(Op::DeleteSchedule, call).await
    }

    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let call = self.inner.set_schedule_paused(tenant, name, paused);
        self.layer.write(Op::SetSchedulePaused, call).await
    }

    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError> {
        let op = Op::EnqueueTicks(params.fence.epoch);
        self.layer.write(op, self.inner.enqueue_ticks(params)).await
    }
}

/// A durable job store: every role, plus the store's own lifecycle (ping, pool statistics,
/// close) and the cross-process notice streams.
///
/// Implementations are shared (`Arc<dyn Store>`) across every request handler and worker,
/// so each method takes `&self` and is safe to call concurrently. Time comes from the
/// [`crate::Clock`] the store was built with.
///
/// A consumer that needs one role takes that role (`Arc<dyn WorkStore>`, `&dyn JobStore`);
/// an `Arc<dyn Store>` converts to any of them. Wrappers that treat every call alike (the
/// database guard, test interceptors) are a [`StoreLayer`](super::StoreLayer) inside
/// [`Layered`](super::Layered) rather than one more implementation of every role.
#[async_trait]
pub trait Store:
    JobStore + WorkStore + MaintenanceStore + QueueStore + LeaderStore + ScheduleStore + 'static
{
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
