//! POST /v1/process: enqueue and wait. The tests play the worker: they complete the job
//! through the store and publish its event, as the runtime would.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use keel_api::ApiConfig;

use crate::helpers::*;

/// Waits for a job to be enqueued, leases it and completes it with `result`; publishes the
/// completion event when `publish`.
async fn complete_next_job(app: &TestApp, result: &str, publish: bool) {
    let job = loop {
        if let Some(job) = app.lease("default").await.pop() {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    app.complete_in_store(&job, Some(result)).await;
    if publish {
        app.publish_completed(&job);
    }
}

/// With the fallback re-read an hour away, only the event can end the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_completion_event() {
    let app = process_app(Duration::from_secs(3600)).await;
    let worker = {
        let app = app.clone();
        tokio::spawn(async move { complete_next_job(&app, r#"{"sum": 3}"#, true).await })
    };
    let r = app
        .post_json("/v1/process", r#"{"kind":"add","args":[1,2]}"#)
        .await;
    worker.await.unwrap();
    r.assert_status(StatusCode::OK);
    let job = r.json();
    assert_eq!(job["state"], "completed");
    assert_eq!(job["result"], serde_json::json!({"sum": 3}));
}

/// No event is ever published: only the re-read can see the job finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_polling_when_no_event_comes() {
    let app = process_app(Duration::from_millis(20)).await;
    let worker = {
        let app = app.clone();
        tokio::spawn(async move { complete_next_job(&app, "42", false).await })
    };
    let r = app.post_json("/v1/process", r#"{"kind":"answer"}"#).await;
    worker.await.unwrap();
    r.assert_status(StatusCode::OK);
    assert_eq!(r.json()["result"], 42);
}

#[tokio::test]
async fn the_deadline_answers_504_with_the_job_left_running() {
    let app = app_with(ApiConfig {
        request_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let r = app.post_json("/v1/process", r#"{"kind":"slow"}"#).await;
    // The handler's own 504 (with the job id), not the deadline layer's.
    let p = r.assert_problem(504, "deadline-exceeded");
    let id = p["job_id"].as_str().expect("the 504 names the job");
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    let job = app.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(job["state"], "available", "the job is still there to run");
}

#[tokio::test]
async fn a_retry_with_the_same_key_waits_on_the_same_job() {
    let app = app_with(ApiConfig {
        request_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let send = || {
        app.send(
            json_request("/v1/process")
                .header("idempotency-key", "proc-1")
                .body(Body::from(r#"{"kind":"slow"}"#))
                .unwrap(),
        )
    };
    let a = send().await.assert_problem(504, "deadline-exceeded");
    let b = send().await.assert_problem(504, "deadline-exceeded");
    assert_eq!(a["job_id"], b["job_id"]);
    assert_eq!(app.all_jobs().await.len(), 1);
}

#[tokio::test]
async fn a_cancelled_job_is_answered_with_its_state() {
    let app = std::sync::Arc::new(app().await);
    let canceller = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                if let Some(job) = app.all_jobs().await.pop() {
                    let r = app.post(&format!("/v1/jobs/{}/cancel", job.id)).await;
                    assert_eq!(r.status, StatusCode::OK);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let r = app.post_json("/v1/process", r#"{"kind":"noop"}"#).await;
    canceller.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "cancelled");
}

#[tokio::test]
async fn invalid_bodies_are_refused_before_anything_is_stored() {
    let app = app().await;
    app.post_json("/v1/process", r#"{"priority":"high"}"#)
        .await
        .assert_problem(422, "validation");
    assert!(app.all_jobs().await.is_empty());
}
