//! Promotion of scheduled jobs and deletion past retention.

use std::time::Duration;

use keel_core::{JobState, StoreError};
use keel_runtime::{Handlers, WebhookConfig};

use crate::helpers::{config, enqueue, eventually, job, now, start, store, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_runs_once_promoted() {
    let (_dir, store) = store().await;
    let rt = start(
        &store,
        config(&[("default", 2)]),
        Handlers::builtin(&WebhookConfig::default()),
    );
    let run_at = now() + chrono::TimeDelta::milliseconds(200);
    let inserted = enqueue(
        &rt,
        &store,
        vec![job("default", "noop", "null").run_at(run_at)],
    )
    .await;
    assert_eq!(inserted[0].state, JobState::Scheduled);
    let done = wait_for(
        &store,
        inserted[0].id,
        "the scheduled job to complete",
        |j| j.state == JobState::Completed,
    )
    .await;
    assert!(done.started_at.unwrap() >= run_at, "{done:?}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_past_retention_are_deleted_and_others_kept() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("default", 2)]);
    cfg.maintenance.retention = Duration::from_millis(300);
    let rt = start(&store, cfg, Handlers::builtin(&WebhookConfig::default()));
    let later = now() + chrono::TimeDelta::hours(1);
    let jobs = enqueue(
        &rt,
        &store,
        vec![
            job("default", "noop", "null"),
            job("default", "noop", "null").run_at(later),
        ],
    )
    .await;
    let (finished, scheduled) = (jobs[0].id, jobs[1].id);
    wait_for(&store, finished, "the job to complete", |j| {
        j.state == JobState::Completed
    })
    .await;
    eventually("the finished job to be deleted", || async {
        match store.get(finished).await {
            Err(StoreError::NotFound(_)) => Ok(()),
            other => Err(other.map(|j| j.state)),
        }
    })
    .await;
    let kept = store.get(scheduled).await.unwrap();
    assert_eq!(kept.state, JobState::Scheduled);
    rt.shutdown().await;
}
