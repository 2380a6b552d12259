//! G6: the two-phase stop.

use std::time::Duration;

use keel_core::JobState;
use keel_core::store::ListParams;
use keel_runtime::{Handlers, WebhookConfig};

use crate::helpers::{config, enqueue, eventually, job, start, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_short_jobs_finish_and_releases_long_ones_uncounted() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("default", 8)]);
    cfg.shutdown_grace = Duration::from_secs(3);
    let rt = start(&store, cfg, Handlers::builtin(&WebhookConfig::default()));

    let short: Vec<_> = (0..3)
        .map(|_| job("default", "sleep", r#"{"ms": 1000}"#))
        .collect();
    let long: Vec<_> = (0..3)
        .map(|_| job("default", "sleep", r#"{"ms": 60000}"#))
        .collect();
    let short: Vec<_> = enqueue(&rt, &store, short)
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    let long: Vec<_> = enqueue(&rt, &store, long)
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    eventually("all six jobs to run", || async {
        let page = store
            .list(ListParams {
                state: Some(JobState::Running),
                limit: 100,
                ..ListParams::default()
            })
            .await
            .unwrap();
        if page.jobs.len() == 6 {
            Ok(())
        } else {
            Err(page.jobs.len())
        }
    })
    .await;

    let report = tokio::time::timeout(Duration::from_secs(30), rt.shutdown())
        .await
        .expect("shutdown returns after the grace period");

    for id in short {
        let j = store.get(id).await.unwrap();
        assert_eq!(j.state, JobState::Completed, "{j:?}");
        assert_eq!(j.result.unwrap().get(), r#"{"slept_ms":1000}"#);
    }
    for id in long {
        let j = store.get(id).await.unwrap();
        assert_eq!(j.state, JobState::Available, "{j:?}");
        assert_eq!(j.attempt, 0, "a released attempt does not count");
        assert!(j.errors.is_empty(), "{:?}", j.errors);
        assert!(j.lease.is_none());
    }
    assert_eq!(report.finished_in_grace, 3, "{report:?}");
    assert_eq!(report.released, 3, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_runtime_stops_at_once() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("a", 1), ("b", 2)]);
    cfg.shutdown_grace = Duration::from_secs(60);
    let rt = start(&store, cfg, Handlers::new());
    assert!(rt.is_healthy());
    let report = tokio::time::timeout(Duration::from_secs(10), rt.shutdown())
        .await
        .expect("an idle runtime stops without waiting for the grace period");
    assert_eq!(report, keel_runtime::ShutdownReport::default());
}

/// Ignores its cancellation token.
struct Stubborn;

#[async_trait::async_trait]
impl keel_runtime::Handler for Stubborn {
    async fn run(
        &self,
        _ctx: keel_runtime::JobContext,
    ) -> Result<Option<Box<serde_json::value::RawValue>>, keel_runtime::JobError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_ignoring_cancellation_is_aborted_and_its_job_released() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("default", 2)]);
    cfg.shutdown_grace = Duration::from_millis(200);
    let mut handlers = Handlers::new();
    handlers.register(
        crate::helpers::kind("stubborn"),
        std::sync::Arc::new(Stubborn),
    );
    let rt = start(&store, cfg, handlers);
    let id = enqueue(&rt, &store, vec![job("default", "stubborn", "null")]).await[0].id;
    crate::helpers::wait_for(&store, id, "the job to run", |j| {
        j.state == JobState::Running
    })
    .await;
    let report = tokio::time::timeout(Duration::from_secs(30), rt.shutdown())
        .await
        .expect("shutdown does not wait for a handler that ignores its token");
    let j = store.get(id).await.unwrap();
    assert_eq!(j.state, JobState::Available, "{j:?}");
    assert_eq!(j.attempt, 0);
    assert_eq!(report.released, 1, "{report:?}");
}
