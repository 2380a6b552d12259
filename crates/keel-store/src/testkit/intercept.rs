//! A real store with a hook in front of every operation, for tests that need the database
//! to fail, stall or be counted on demand.
//!
//! Tests of the runtime, the store guard and the API each used to carry their own
//! thirty-method `impl Store` that forwarded everything but the two or three operations
//! they meddled with. [`Intercepted`] is that forwarding written once: a test supplies an
//! [`Interceptor`] that sees each [`Op`] before it reaches the real store and may answer
//! an error instead, sleep, or count.

use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
use keel_core::store::{
    CampaignParams, Completion, FailParams, HeartbeatParams, IdempotentInsert, IdempotentOutcome,
    JobPage, LeaderEpoch, Leadership, LeaseParams, LeaseRef, ListParams, PoolStats, PromoteParams,
    Promoted, QueueStats, RescueParams, Rescued, RetentionParams, TickOutcome, TickParams,
};
use keel_core::{
    ChangeStream, Job, JobId, NewJob, NewSchedule, QueueName, Schedule, ScheduleName, Store,
    StoreError, TenantId, Timestamp, WakeupStream, WorkerId,
};

/// The store operation about to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Op {
    Insert,
    Get,
    List,
    Lease,
    Heartbeat,
    Complete,
    Fail,
    Release,
    Cancel,
    Retry,
    Promote,
    Rescue,
    DeleteFinished,
    QueueStats,
    QueueDepths,
    InsertIdempotent,
    DeleteExpiredIdempotencyKeys,
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
    DeleteOldTicks,
    Ping,
}

impl Op {
    /// What the operation does, worded like the stores' own error contexts ("reading a
    /// job"), for injected errors.
    pub fn doing(self) -> &'static str {
        match self {
            Op::Insert => "inserting jobs",
            Op::Get => "reading a job",
            Op::List => "listing jobs",
            Op::Lease => "leasing",
            Op::Heartbeat => "extending leases",
            Op::Complete => "completing",
            Op::Fail => "recording a failed attempt",
            Op::Release => "releasing jobs",
            Op::Cancel => "cancelling a job",
            Op::Retry => "retrying a job",
            Op::Promote => "promoting due jobs",
            Op::Rescue => "rescuing expired leases",
            Op::DeleteFinished => "deleting finished jobs",
            Op::QueueStats => "reading queue statistics",
            Op::QueueDepths => "reading queue depths",
            Op::InsertIdempotent => "inserting jobs under an idempotency key",
            Op::DeleteExpiredIdempotencyKeys => "deleting expired idempotency keys",
            Op::SetQueuePaused => "pausing or resuming a queue",
            Op::Campaign => "campaigning",
            Op::Resign => "resigning",
            Op::SaveSchedule => "saving a schedule",
            Op::GetSchedule => "reading a schedule",
            Op::ListSchedules => "listing schedules",
            Op::DeleteSchedule => "deleting a schedule",
            Op::SetSchedulePaused => "pausing or resuming a schedule",
            Op::EnqueueTicks(_) => "enqueuing cron ticks",
            Op::DeleteOldTicks => "deleting old tick records",
            Op::Ping => "pinging the database",
        }
    }
}

/// Decides, before each operation, whether it reaches the real store.
#[async_trait]
pub trait Interceptor: Send + Sync + 'static {
    /// Called before `op` runs; an error is answered in its place.
    async fn before(&self, op: Op) -> Result<(), StoreError>;
}

/// `inner` behind `interceptor`. Dereferences to the interceptor, so a test flips its
/// switches and reads its counters through the store handle it gave the code under test.
pub struct Intercepted<I> {
    inner: Arc<dyn Store>,
    interceptor: I,
}

impl<I: Interceptor> Intercepted<I> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, interceptor: I) -> Arc<Self> {
        Arc::new(Self { inner, interceptor })
    }

    /// The real store, to change data behind the interceptor's back.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }
}

impl<I> Deref for Intercepted<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.interceptor
    }
}

#[async_trait]
impl<I: Interceptor> Store for Intercepted<I> {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        self.interceptor.before(Op::Insert).await?;
        self.inner.insert(jobs).await
    }
    async fn get(&self, id: JobId) -> Result<Job, StoreError> {
        self.interceptor.before(Op::Get).await?;
        self.inner.get(id).await
    }
    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError> {
        self.interceptor.before(Op::List).await?;
        self.inner.list(params).await
    }
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError> {
        self.interceptor.before(Op::Lease).await?;
        self.inner.lease(params).await
    }
    async fn heartbeat(
        &self,
        params: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        self.interceptor.before(Op::Heartbeat).await?;
        self.inner.heartbeat(params).await
    }
    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.interceptor.before(Op::Complete).await?;
        self.inner.complete(completions).await
    }
    async fn fail(&self, params: FailParams) -> Result<Job, StoreError> {
        self.interceptor.before(Op::Fail).await?;
        self.inner.fail(params).await
    }
    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.interceptor.before(Op::Release).await?;
        self.inner.release(leases).await
    }
    async fn cancel(&self, id: JobId) -> Result<Job, StoreError> {
        self.interceptor.before(Op::Cancel).await?;
        self.inner.cancel(id).await
    }
    async fn retry(&self, id: JobId) -> Result<Job, StoreError> {
        self.interceptor.before(Op::Retry).await?;
        self.inner.retry(id).await
    }
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        self.interceptor.before(Op::Promote).await?;
        self.inner.promote(params).await
    }
    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        self.interceptor.before(Op::Rescue).await?;
        self.inner.rescue(params).await
    }
    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError> {
        self.interceptor.before(Op::DeleteFinished).await?;
        self.inner.delete_finished(params).await
    }
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        self.interceptor.before(Op::QueueStats).await?;
        self.inner.queue_stats(tenant).await
    }
    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.interceptor.before(Op::QueueDepths).await?;
        self.inner.queue_depths().await
    }
    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        self.interceptor.before(Op::InsertIdempotent).await?;
        self.inner.insert_idempotent(req).await
    }
    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        self.interceptor
            .before(Op::DeleteExpiredIdempotencyKeys)
            .await?;
        self.inner.delete_expired_idempotency_keys(limit).await
    }
    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        self.interceptor.before(Op::SetQueuePaused).await?;
        self.inner.set_queue_paused(queue, paused).await
    }
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError> {
        self.interceptor.before(Op::Campaign).await?;
        self.inner.campaign(params).await
    }
    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        self.interceptor.before(Op::Resign).await?;
        self.inner.resign(owner).await
    }
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError> {
        self.interceptor.before(Op::SaveSchedule).await?;
        self.inner.save_schedule(schedule, replace).await
    }
    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError> {
        self.interceptor.before(Op::GetSchedule).await?;
        self.inner.get_schedule(tenant, name).await
    }
    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        self.interceptor.before(Op::ListSchedules).await?;
        self.inner.list_schedules(tenant, after, limit).await
    }
    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError> {
        self.interceptor.before(Op::DeleteSchedule).await?;
        self.inner.delete_schedule(tenant, name).await
    }
    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        self.interceptor.before(Op::SetSchedulePaused).await?;
        self.inner.set_schedule_paused(tenant, name, paused).await
    }
    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError> {
        self.interceptor
            .before(Op::EnqueueTicks(params.fence.epoch))
            .await?;
        self.inner.enqueue_ticks(params).await
    }
    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.interceptor.before(Op::DeleteOldTicks).await?;
        self.inner.delete_old_ticks(before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.interceptor.before(Op::Ping).await?;
        self.inner.ping().await
    }
    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }
    fn wakeups(&self) -> Option<Box<dyn WakeupStream>> {
        self.inner.wakeups()
    }
    fn changes(&self) -> Option<Box<dyn ChangeStream>> {
        self.inner.changes()
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
