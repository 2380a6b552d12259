//! A store that fails on demand, to test the runtime against database blips.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use keel_core::store::{
    CampaignParams, Completion, FailParams, HeartbeatParams, IdempotentInsert, IdempotentOutcome,
    JobPage, Leadership, LeaseParams, LeaseRef, ListParams, PromoteParams, Promoted, QueueStats,
    RescueParams, Rescued, RetentionParams, TickOutcome, TickParams,
};
use keel_core::{
    ChangeStream, Job, JobId, NewJob, NewSchedule, QueueName, Schedule, ScheduleName, Store,
    StoreError, TenantId, Timestamp, WakeupStream, WorkerId,
};

/// Delegates to a real store, except for the failures switched on here.
pub(crate) struct Flaky {
    inner: Arc<dyn Store>,
    /// While set, every heartbeat fails transiently (leases stop being extended).
    pub(crate) fail_heartbeats: AtomicBool,
    /// This many next `complete` calls fail transiently.
    pub(crate) fail_completes: AtomicU32,
    /// This many next `lease` calls fail transiently.
    pub(crate) fail_leases: AtomicU32,
    /// While set, every campaign for leadership fails transiently (the database is gone).
    pub(crate) fail_campaigns: AtomicBool,
    /// While set, every `enqueue_ticks` is refused as if the caller's term were superseded.
    pub(crate) fence_ticks: AtomicBool,
    /// Campaigns made (failed ones included).
    pub(crate) campaigns: AtomicU32,
    /// `promote` calls made (one per maintenance pass).
    pub(crate) promotes: AtomicU32,
    /// `enqueue_ticks` calls refused by `fence_ticks`.
    pub(crate) refused_ticks: AtomicU32,
}

impl Flaky {
    pub(crate) fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_heartbeats: AtomicBool::new(false),
            fail_completes: AtomicU32::new(0),
            fail_leases: AtomicU32::new(0),
            fail_campaigns: AtomicBool::new(false),
            fence_ticks: AtomicBool::new(false),
            campaigns: AtomicU32::new(0),
            promotes: AtomicU32::new(0),
            refused_ticks: AtomicU32::new(0),
        })
    }
}

fn blip(what: &str) -> StoreError {
    StoreError::transient(what.to_owned(), "injected failure")
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Store for Flaky {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        self.inner.insert(jobs).await
    }
    async fn get(&self, id: JobId) -> Result<Job, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError> {
        self.inner.list(params).await
    }
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError> {
        if take(&self.fail_leases) {
            return Err(blip("leasing"));
        }
        self.inner.lease(params).await
    }
    async fn heartbeat(
        &self,
        params: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        if self.fail_heartbeats.load(Ordering::SeqCst) {
            return Err(blip("extending leases"));
        }
        self.inner.heartbeat(params).await
    }
    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if take(&self.fail_completes) {
            return Err(blip("completing"));
        }
        self.inner.complete(completions).await
    }
    async fn fail(&self, params: FailParams) -> Result<Job, StoreError> {
        self.inner.fail(params).await
    }
    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.inner.release(leases).await
    }
    async fn cancel(&self, id: JobId) -> Result<Job, StoreError> {
        self.inner.cancel(id).await
    }
    async fn retry(&self, id: JobId) -> Result<Job, StoreError> {
        self.inner.retry(id).await
    }
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        self.promotes.fetch_add(1, Ordering::SeqCst);
        self.inner.promote(params).await
    }
    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        self.inner.rescue(params).await
    }
    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError> {
        self.inner.delete_finished(params).await
    }
    async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.inner.queue_stats().await
    }
    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        self.inner.insert_idempotent(req).await
    }
    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        self.inner.delete_expired_idempotency_keys(limit).await
    }
    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        self.inner.set_queue_paused(queue, paused).await
    }
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError> {
        self.campaigns.fetch_add(1, Ordering::SeqCst);
        if self.fail_campaigns.load(Ordering::SeqCst) {
            return Err(blip("campaigning"));
        }
        self.inner.campaign(params).await
    }
    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        self.inner.resign(owner).await
    }
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError> {
        self.inner.save_schedule(schedule, replace).await
    }
    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError> {
        self.inner.get_schedule(tenant, name).await
    }
    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        self.inner.list_schedules(tenant, after, limit).await
    }
    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError> {
        self.inner.delete_schedule(tenant, name).await
    }
    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        self.inner.set_schedule_paused(tenant, name, paused).await
    }
    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError> {
        if self.fence_ticks.load(Ordering::SeqCst) {
            self.refused_ticks.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::NotLeader(params.fence.epoch.0));
        }
        self.inner.enqueue_ticks(params).await
    }
    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.inner.delete_old_ticks(before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn wakeups(&self) -> Option<Box<dyn WakeupStream>> {
        self.inner.wakeups()
    }
    fn changes(&self) -> Option<Box<dyn ChangeStream>> {
        self.inner.changes()
    }

    fn pool_stats(&self) -> keel_core::store::PoolStats {
        self.inner.pool_stats()
    }
    async fn close(&self) {
        self.inner.close().await
    }
}
