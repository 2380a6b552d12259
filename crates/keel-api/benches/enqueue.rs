//! The HTTP enqueue path in process: middleware, body parsing and validation, rendering the
//! `JobOut`, over a store that does no I/O, so the figure is Keel's own CPU and allocation
//! cost per request (what stays when the database is fast). Prints allocations per request.
//!
//! `cargo bench -p keel-api --bench enqueue`
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_api::{ApiConfig, ApiState, Readiness, router};
use keel_core::store::{
    CampaignParams, Completion, FailParams, HeartbeatParams, IdempotentInsert, IdempotentOutcome,
    JobPage, Leadership, LeaseParams, LeaseRef, ListParams, PoolStats, PromoteParams, Promoted,
    QueueStats, RescueParams, Rescued, RetentionParams, TickOutcome, TickParams,
};
use keel_core::{
    Clock, Job, JobId, JobStore, LeaderStore, MaintenanceStore, NewJob, NewSchedule, QueueName,
    QueueStore, Schedule, ScheduleName, ScheduleStore, Store, StoreError, SystemClock, TenantId,
    Timestamp, WorkStore, WorkerId,
};
use keel_runtime::RuntimeHandle;
use metrics_exporter_prometheus::PrometheusBuilder;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::ServiceExt;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Accepts inserts instantly (as the stores do: `NewJob::into_job(now)`); nothing else is
/// used by this bench.
struct InstantStore;

fn unused<T>() -> Result<T, StoreError> {
    Err(StoreError::permanent(
        "bench store",
        "not used by this bench",
    ))
}

#[async_trait]
impl JobStore for InstantStore {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        let now = SystemClock.now();
        Ok(jobs.into_iter().map(|j| j.into_job(now)).collect())
    }
    async fn insert_idempotent(
        &self,
        _: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        unused()
    }
    async fn get(&self, _: JobId) -> Result<Job, StoreError> {
        unused()
    }
    async fn list(&self, _: ListParams) -> Result<JobPage, StoreError> {
        unused()
    }
    async fn cancel(&self, _: JobId) -> Result<Job, StoreError> {
        unused()
    }
    async fn retry(&self, _: JobId) -> Result<Job, StoreError> {
        unused()
    }
}

#[async_trait]
impl WorkStore for InstantStore {
    async fn lease(&self, _: LeaseParams) -> Result<Vec<Job>, StoreError> {
        unused()
    }
    async fn heartbeat(
        &self,
        _: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        unused()
    }
    async fn complete(
        &self,
        _: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        unused()
    }
    async fn fail(&self, _: FailParams) -> Result<Job, StoreError> {
        unused()
    }
    async fn release(&self, _: Vec<LeaseRef>) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        unused()
    }
}

#[async_trait]
impl MaintenanceStore for InstantStore {
    async fn promote(&self, _: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        unused()
    }
    async fn rescue(&self, _: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        unused()
    }
    async fn delete_finished(&self, _: RetentionParams) -> Result<u64, StoreError> {
        unused()
    }
    async fn delete_expired_idempotency_keys(&self, _: u32) -> Result<u64, StoreError> {
        unused()
    }
    async fn delete_old_ticks(&self, _: Timestamp, _: u32) -> Result<u64, StoreError> {
        unused()
    }
}

#[async_trait]
impl QueueStore for InstantStore {
    async fn queue_stats(&self, _: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        unused()
    }
    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        unused()
    }
    async fn set_queue_paused(&self, _: QueueName, _: bool) -> Result<(), StoreError> {
        unused()
    }
    async fn queue_stats_of(
        &self,
        _: QueueName,
        _: Option<TenantId>,
    ) -> Result<QueueStats, StoreError> {
        unused()
    }
}

#[async_trait]
impl LeaderStore for InstantStore {
    async fn campaign(&self, _: CampaignParams) -> Result<Leadership, StoreError> {
        unused()
    }
    async fn resign(&self, _: &WorkerId) -> Result<(), StoreError> {
        unused()
    }
}

#[async_trait]
impl ScheduleStore for InstantStore {
    async fn save_schedule(&self, _: NewSchedule, _: bool) -> Result<(Schedule, bool), StoreError> {
        unused()
    }
    async fn get_schedule(&self, _: &TenantId, _: &ScheduleName) -> Result<Schedule, StoreError> {
        unused()
    }
    async fn list_schedules(
        &self,
        _: Option<&TenantId>,
        _: Option<(TenantId, ScheduleName)>,
        _: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        unused()
    }
    async fn delete_schedule(&self, _: &TenantId, _: &ScheduleName) -> Result<(), StoreError> {
        unused()
    }
    async fn set_schedule_paused(
        &self,
        _: &TenantId,
        _: &ScheduleName,
        _: bool,
    ) -> Result<Schedule, StoreError> {
        unused()
    }
    async fn enqueue_ticks(&self, _: TickParams) -> Result<TickOutcome, StoreError> {
        unused()
    }
}

#[async_trait]
impl Store for InstantStore {
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn pool_stats(&self) -> PoolStats {
        PoolStats::default()
    }
    async fn close(&self) {}
}

const BODY: &str = r#"{"kind":"webhook","queue":"default","args":{"url":"https://example.com/hook","body":{"order":42,"items":[1,2,3]}},"priority":3,"max_attempts":10,"tags":["billing","eu"]}"#;

fn enqueue(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = ApiState::new(
        Arc::new(InstantStore),
        RuntimeHandle::new([QueueName::default()], 1024),
        ApiConfig::default(),
        PrometheusBuilder::new().build_recorder().handle(),
        Readiness::default(),
    );
    let app = router(state);
    let request = || {
        Request::post("/v1/jobs")
            .header("content-type", "application/json")
            .body(Body::from(BODY))
            .unwrap()
    };

    // Allocations per request, measured once outside criterion's timing loop.
    rt.block_on(async {
        let n = 1000;
        let region = Region::new(GLOBAL);
        for _ in 0..n {
            let resp = app.clone().oneshot(request()).await.unwrap();
            assert_eq!(resp.status(), 201);
            let _ = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
        }
        let change = region.change();
        println!(
            "enqueue path: {:.1} allocations and {:.0} bytes allocated per request",
            change.allocations as f64 / n as f64,
            change.bytes_allocated as f64 / n as f64
        );
    });

    let mut group = c.benchmark_group("api");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("post_v1_jobs_in_process", |b| {
        b.to_async(&rt).iter(|| {
            let app = app.clone();
            async move {
                let resp = app.oneshot(request()).await.unwrap();
                axum::body::to_bytes(resp.into_body(), usize::MAX)
                    .await
                    .unwrap()
            }
        })
    });
    group.finish();
}

criterion_group!(benches, enqueue);
criterion_main!(benches);
