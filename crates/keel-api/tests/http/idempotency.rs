//! G3: the same `Idempotency-Key` gives the same job and the original response, byte for
//! byte; a different request under the key is a 409.

use std::sync::Arc;

use axum::body::Body;
use axum::http::StatusCode;
use keel_core::store::{Completion, LeaseRef};
use keel_core::{JobState, WorkStore};

use crate::helpers::*;

async fn post_with_key(app: &TestApp, path: &str, key: &str, body: &str) -> TestResponse {
    app.send(
        json_request(path)
            .header("idempotency-key", key)
            .body(Body::from(body.to_owned()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_replay_returns_the_original_bytes_and_creates_nothing() {
    let app = app().await;
    let body = r#"{"kind":"echo","args":{"n": 1}}"#;
    let first = post_with_key(&app, "/v1/jobs", "order-42", body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(first.header("idempotent-replayed").is_none());
    assert_eq!(first.json()["state"], "available");

    // The job moves on before the retry: a response rendered again from the job would say
    // so, the stored original does not.
    complete_all(&app, 1).await;

    let again = post_with_key(&app, "/v1/jobs", "order-42", body).await;
    // The original status (201, as Stripe replays it), not a 200 for "found".
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.content_type(), "application/json");
    assert_eq!(again.body, first.body, "byte for byte");
    assert_eq!(again.json()["state"], "available", "the original answer");
    assert_eq!(again.header("location"), first.header("location"));
    assert_eq!(app.all_jobs().await.len(), 1);

    // The key is per endpoint and per tenant: a different tenant may use the same key.
    let other = post_with_key(
        &app,
        "/v1/jobs",
        "order-42",
        r#"{"kind":"echo","tenant":"acme","args":{"n": 1}}"#,
    )
    .await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert!(other.header("idempotent-replayed").is_none());
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_409() {
    let app = app().await;
    post_with_key(&app, "/v1/jobs", "k1", r#"{"kind":"noop"}"#).await;
    let r = post_with_key(&app, "/v1/jobs", "k1", r#"{"kind":"noop","priority":1}"#).await;
    let p = r.assert_problem(409, "idempotency-key-reused");
    assert!(p["detail"].as_str().unwrap().contains("k1"), "{p}");
    // Same body on another endpoint is a different request too.
    let r = post_with_key(
        &app,
        "/v1/jobs/batch",
        "k1",
        r#"{"jobs":[{"kind":"noop"}]}"#,
    )
    .await;
    r.assert_problem(409, "idempotency-key-reused");
    assert_eq!(app.all_jobs().await.len(), 1);
}

#[tokio::test]
async fn an_invalid_key_is_400() {
    let app = app().await;
    let long = "k".repeat(256);
    for key in ["has space", long.as_str()] {
        post_with_key(&app, "/v1/jobs", key, r#"{"kind":"noop"}"#)
            .await
            .assert_problem(400, "malformed-request");
    }
    assert!(app.all_jobs().await.is_empty());
}

#[tokio::test]
async fn batches_replay_too() {
    let app = app().await;
    let body = r#"{"jobs":[{"kind":"a"},{"kind":"b"}]}"#;
    let first = post_with_key(&app, "/v1/jobs/batch", "batch-1", body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // Both jobs move on first, so only the stored original can match the first bytes.
    complete_all(&app, 2).await;
    let again = post_with_key(&app, "/v1/jobs/batch", "batch-1", body).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(app.all_jobs().await.len(), 2);
}

/// Leases and completes the `n` available jobs on `default`, so that a response rendered
/// afresh from them would differ from the one given when they were created.
async fn complete_all(app: &TestApp, n: usize) {
    let jobs = app.lease("default").await;
    assert_eq!(jobs.len(), n, "the jobs are available");
    let completions = jobs
        .iter()
        .map(|job| Completion {
            lease: LeaseRef::of(job).unwrap(),
            result: None,
        })
        .collect();
    app.store.complete(completions).await.unwrap();
    for job in app.all_jobs().await {
        assert_eq!(job.state, JobState::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_identical_requests_create_one_job() {
    let app = Arc::new(app().await);
    let body = r#"{"kind":"echo","args":{"payload":"same"}}"#;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let app = Arc::clone(&app);
        tasks.push(tokio::spawn(async move {
            post_with_key(&app, "/v1/jobs", "concurrent-key", body).await
        }));
    }
    let mut responses = Vec::new();
    for t in tasks {
        responses.push(t.await.unwrap());
    }
    let first = &responses[0].body;
    for r in &responses {
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(&r.body, first, "every caller got the same bytes");
    }
    let originals = responses
        .iter()
        .filter(|r| r.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(originals, 1, "exactly one request created the job");
    assert_eq!(app.all_jobs().await.len(), 1);

    // After the job has run, a late retry still gets the bytes all fifty got.
    complete_all(&app, 1).await;
    let late = post_with_key(&app, "/v1/jobs", "concurrent-key", body).await;
    assert_eq!(late.status, StatusCode::CREATED);
    assert_eq!(late.header("idempotent-replayed"), Some("true"));
    assert_eq!(&late.body, first);
}
