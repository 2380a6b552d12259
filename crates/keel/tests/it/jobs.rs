//! Jobs run end to end: enqueue over HTTP, worker pools execute, results and retries are
//! visible over HTTP.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_client::{Backoff, JobIn};
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, spawn_app, spawn_app_with};

fn millis_between(a: &DateTime<Utc>, b: &DateTime<Utc>) -> i64 {
    (*b - *a).num_milliseconds()
}

/// The quick start: an echo job's result is its args.
async fn echo_job_completes_with_its_args(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let enq = app
        .client
        .enqueue(&JobIn::new("echo", json!({"hello": "world"})), None)
        .await
        .unwrap();
    assert_eq!(enq.status, 201);
    let id = enq.job.id;
    let done = app
        .wait_for(&id, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    assert_eq!(done.attempt, 1);
    assert_eq!(done.result_value(), Some(json!({"hello": "world"})));
    assert_eq!(
        app.client.job_result(&id).await.unwrap(),
        Some(json!({"hello": "world"}))
    );
    app.stop().await;
}
both_backends!(echo_job_completes_with_its_args);

/// A `fail` job set to fail twice ends completed on attempt 3 with two recorded errors,
/// and each retry waited at least the backoff.
async fn failing_job_retries_with_backoff_then_completes(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let job = JobIn {
        backoff: Some(Backoff::Fixed { delay_ms: 300 }),
        ..JobIn::new("fail", json!({"times": 2}))
    };
    let id = app.client.enqueue(&job, None).await.unwrap().job.id;
    let done = app
        .wait_for(&id, Duration::from_secs(15), |j| j.state == "completed")
        .await;
    assert_eq!(done.attempt, 3);
    assert_eq!(done.errors.len(), 2, "{:?}", done.errors);
    assert_eq!(done.errors[0].attempt, 1);
    assert_eq!(done.errors[1].attempt, 2);
    // The second attempt failed at least one backoff after the first failure, and the
    // third (successful) attempt started at least one backoff after the second failure.
    assert!(millis_between(&done.errors[0].at, &done.errors[1].at) >= 300);
    assert!(millis_between(&done.errors[1].at, done.started_at.as_ref().unwrap()) >= 300);
    app.stop().await;
}
both_backends!(failing_job_retries_with_backoff_then_completes);

/// Exhausted attempts discard the job; a retry gives it one more.
async fn exhausted_job_is_discarded_and_can_be_retried(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let job = JobIn {
        max_attempts: Some(1),
        ..JobIn::new("fail", json!({"times": 1}))
    };
    let id = app.client.enqueue(&job, None).await.unwrap().job.id;
    let done = app
        .wait_for(&id, Duration::from_secs(10), |j| j.state == "discarded")
        .await;
    assert_eq!(done.errors.len(), 1);
    let retried = app.client.retry_job(&id).await.unwrap();
    assert_eq!(retried.max_attempts, 2);
    let done = app
        .wait_for(&id, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    assert_eq!(done.attempt, 2);
    app.stop().await;
}
both_backends!(exhausted_job_is_discarded_and_can_be_retried);

/// Cancelling a running job stops it: the job ends cancelled, not completed.
async fn cancel_stops_a_running_job(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let id = app.enqueue("sleep", json!({"ms": 60_000})).await;
    app.wait_for(&id, Duration::from_secs(10), |j| j.state == "running")
        .await;
    let cancelled = app.client.cancel_job(&id).await.unwrap();
    assert_eq!(cancelled.state, "cancelled");
    // The worker's slot frees up: a new job in the same queue runs.
    let next = app.enqueue("noop", json!(null)).await;
    app.wait_for(&next, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    assert_eq!(app.client.get_job(&id).await.unwrap().state, "cancelled");
    app.stop().await;
}
both_backends!(cancel_stops_a_running_job);

/// `POST /v1/process` answers with the finished job.
async fn process_waits_for_the_result(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let job = app
        .client
        .process(&JobIn::new("echo", json!({"n": 7})))
        .await
        .unwrap();
    assert_eq!(job.state, "completed");
    assert_eq!(job.result_value(), Some(json!({"n": 7})));
    app.stop().await;
}
both_backends!(process_waits_for_the_result);

/// Paused queues hold their jobs until resumed.
async fn paused_queue_holds_jobs_until_resumed(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.queues = Some("default:8,other:8".into());
    })
    .await
    else {
        return;
    };
    app.client.set_paused("default", true).await.unwrap();
    // One batch, so both queues' dispatchers are woken by the same commit: by the time the
    // job of the running queue has been leased, run and completed, the paused queue's
    // dispatcher has had the same chance to lease its job, and must not have.
    let batch = app
        .post_json(
            "/v1/jobs/batch",
            &json!({"jobs": [{"kind": "noop"}, {"kind": "noop", "queue": "other"}]}),
        )
        .await;
    assert_eq!(batch.status(), 201);
    let batch: serde_json::Value = batch.json().await.unwrap();
    let id = batch["jobs"][0]["id"].as_str().unwrap().to_owned();
    let other = batch["jobs"][1]["id"].as_str().unwrap().to_owned();
    app.wait_for(&other, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    assert_eq!(app.client.get_job(&id).await.unwrap().state, "available");
    let queues = app.client.queues().await.unwrap();
    assert!(queues.to_string().contains("\"paused\":true"), "{queues}");
    app.client.set_paused("default", false).await.unwrap();
    app.wait_for(&id, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    app.stop().await;
}
both_backends!(paused_queue_holds_jobs_until_resumed);
