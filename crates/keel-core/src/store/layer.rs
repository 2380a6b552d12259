//! One generic forwarding layer for wrappers that treat every store call alike.
//!
//! The database guard (bulkhead, breaker, retries) and the tests' fault injectors do not
//! care what an operation does, only whether it is a read or a write and what to call it.
//! Each used to be its own thirty-method implementation of [`Store`] forwarding to the real
//! one, so adding an operation meant editing every wrapper. Here the forwarding is written
//! once, in [`Layered`]; a wrapper is a [`StoreLayer`]: two methods that see an [`Op`] and
//! the call to make.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    CampaignParams, ChangeStream, Completion, FailParams, HeartbeatParams, IdempotentInsert,
    IdempotentOutcome, JobPage, JobStore, LeaderEpoch, LeaderStore, Leadership, LeaseParams,
    LeaseRef, ListParams, MaintenanceStore, PoolStats, PromoteParams, Promoted, QueueStats,
    QueueStore, RescueParams, Rescued, RetentionParams, ScheduleStore, Store, TickOutcome,
    TickParams, WakeupStream, WorkStore,
};
use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::ids::{JobId, QueueName, ScheduleName, TenantId, WorkerId};
use crate::job::{Job, NewJob};
use crate::schedule::{NewSchedule, Schedule};

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
        }
    }
}

/// One call to the wrapped store, not yet started (the shape `async_trait` methods return).
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What a wrapper does around every call to the store it wraps.
///
/// Reads and writes arrive apart because they may be treated differently: a read may be
/// made again (its closure builds a fresh call each time), a write is handed over once,
/// since a write that failed in flight may have committed and only its owner knows whether
/// repeating it is safe.
pub trait StoreLayer: Send + Sync + 'static {
    /// Runs a write: `call` at most once, or an error in its place.
    fn write<'a, T: Send + 'a>(&'a self, op: Op, call: Call<'a, T>) -> Call<'a, T>;

    /// Runs a read: `call()` once or more, or an error in its place.
    fn read<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        call: Box<dyn FnMut() -> Call<'a, T> + Send + 'a>,
    ) -> Call<'a, T>;

    /// Runs a readiness probe ([`Store::ping`]); by default like any write.
    fn ping<'a>(&'a self, call: Call<'a, ()>) -> Call<'a, ()> {
        self.write(Op::Ping, call)
    }
}

/// A store with a [`StoreLayer`] around every operation. Dereferences to the layer, so its
/// owner reads the layer's state (a breaker, a counter) through the store handle.
///
/// The streams ([`Store::wakeups`], [`Store::changes`]), [`Store::pool_stats`] and
/// [`Store::close`] pass straight through: they are not calls to bound or fail.
pub struct Layered<L> {
    inner: Arc<dyn Store>,
    layer: L,
}

impl<L: StoreLayer> Layered<L> {
    /// `inner` behind `layer`.
    pub fn new(inner: Arc<dyn Store>, layer: L) -> Self {
        Self { inner, layer }
    }

    /// The wrapped store, to reach the data behind the layer's back (tests).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

impl<L> Deref for Layered<L> {
    type Target = L;
    fn deref(&self) -> &L {
        &self.layer
    }
}

impl<L: std::fmt::Debug> std::fmt::Debug for Layered<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Layered").field(&self.layer).finish()
    }
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

    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        let call = self.inner.set_queue_paused(queue, paused);
        self.layer.write(Op::SetQueuePaused, call).await
    }
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

#[async_trait]
impl<L: StoreLayer> Store for Layered<L> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.layer.ping(self.inner.ping()).await
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
        self.inner.close().await;
    }
}
