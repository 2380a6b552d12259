//! Every error status the job API can return, produced for real and checked for status,
//! `content-type: application/problem+json` and the problem body.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{Backend, problem, spawn_app, spawn_app_with};

async fn malformed_requests_get_400(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let resp = app
        .http
        .post(app.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body(r#"{"kind": "echo", "args": "#)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::BAD_REQUEST).await;
    let resp = app.get("/v1/jobs/not-a-uuid").await;
    let body = problem(resp, StatusCode::BAD_REQUEST).await;
    assert!(
        body["detail"].as_str().unwrap().contains("job id"),
        "{body}"
    );
    app.stop().await;
}
both_backends!(malformed_requests_get_400);

async fn unknown_job_is_404(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let id = keel_core::JobId::new();
    let resp = app.get(&format!("/v1/jobs/{id}")).await;
    problem(resp, StatusCode::NOT_FOUND).await;
    let resp = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    problem(resp, StatusCode::NOT_FOUND).await;
    app.stop().await;
}
both_backends!(unknown_job_is_404);

async fn illegal_transition_is_409(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let id = app.enqueue("noop", json!(null)).await;
    app.wait_for(&id, Duration::from_secs(10), |j| j.state == "completed")
        .await;
    let resp = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    let body = problem(resp, StatusCode::CONFLICT).await;
    assert!(
        body["detail"].as_str().unwrap().contains("completed"),
        "{body}"
    );
    app.stop().await;
}
both_backends!(illegal_transition_is_409);

async fn oversized_body_is_413(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.max_body_bytes = Some("4096".into());
        a.max_args_bytes = Some("2048".into());
    })
    .await
    else {
        return;
    };
    let big = "x".repeat(10_000);
    let resp = app
        .post_json("/v1/jobs", &json!({"kind": "echo", "args": big}))
        .await;
    problem(resp, StatusCode::PAYLOAD_TOO_LARGE).await;
    app.stop().await;
}
both_backends!(oversized_body_is_413);

async fn wrong_content_type_is_415(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let resp = app
        .http
        .post(app.url("/v1/jobs"))
        .header("content-type", "text/plain")
        .body(r#"{"kind":"echo"}"#)
        .send()
        .await
        .unwrap();
    problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    app.stop().await;
}
both_backends!(wrong_content_type_is_415);

async fn every_invalid_field_is_listed_in_one_422(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let resp = app.post_json("/v1/jobs", &json!({"kind": "", "priority": 42, "max_attempts": 0, "queue": "bad queue", "timeout_ms": "soon"})).await;
    let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors array")
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in ["kind", "priority", "max_attempts", "queue", "timeout_ms"] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    // Nothing was stored.
    let page = app.client.list_jobs(&Default::default()).await.unwrap();
    assert!(page.jobs.is_empty());
    app.stop().await;
}
both_backends!(every_invalid_field_is_listed_in_one_422);

/// API keys: no key or a wrong key is 401; a key may only act for its own tenant.
async fn auth_is_401_and_tenant_scoped_403(backend: Backend, test: &str) {
    let digest = keel_api::hash_api_key("acme-secret");
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.api_keys = Some(format!("acme={}", hex::encode(digest)));
    })
    .await
    else {
        return;
    };
    let body = json!({"kind": "noop"});
    let resp = app.post_json("/v1/jobs", &body).await;
    let resp_headers = resp.headers().clone();
    problem(resp, StatusCode::UNAUTHORIZED).await;
    assert!(resp_headers.contains_key("www-authenticate"));
    let resp = app.post_json_as("/v1/jobs", "wrong", &body).await;
    problem(resp, StatusCode::UNAUTHORIZED).await;
    let resp = app
        .post_json_as(
            "/v1/jobs",
            "acme-secret",
            &json!({"kind": "noop", "tenant": "globex"}),
        )
        .await;
    problem(resp, StatusCode::FORBIDDEN).await;
    let resp = app.post_json_as("/v1/jobs", "acme-secret", &body).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["tenant"], "acme");
    // Health endpoints stay open for probes.
    let resp = app.get("/healthz").await;
    assert_eq!(resp.status(), StatusCode::OK);
    app.stop().await;
}
both_backends!(auth_is_401_and_tenant_scoped_403);

/// A request that outlives its deadline gets 504 naming the job, which keeps running.
async fn process_past_deadline_is_504_with_job_id(backend: Backend, test: &str) {
    let Some(app) =
        spawn_app_with(backend, test, |a| a.request_timeout = Some("500ms".into())).await
    else {
        return;
    };
    let resp = app
        .post_json(
            "/v1/process",
            &json!({"kind": "sleep", "args": {"ms": 3000}}),
        )
        .await;
    let body = problem(resp, StatusCode::GATEWAY_TIMEOUT).await;
    let id = body["job_id"]
        .as_str()
        .expect("504 names the job")
        .to_owned();
    app.wait_for(&id, Duration::from_secs(15), |j| j.state == "completed")
        .await;
    app.stop().await;
}
both_backends!(process_past_deadline_is_504_with_job_id);

/// A stored row that cannot be decoded is a 500 with an opaque body: the cause is logged,
/// not sent.
async fn corrupt_row_is_opaque_500(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    app.client.set_paused("default", true).await.unwrap();
    let id = app.enqueue("noop", json!(null)).await;
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    match backend {
        Backend::Sqlite => {
            let path = app
                .database_url
                .strip_prefix("sqlite://")
                .unwrap()
                .to_owned();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.execute(
                "UPDATE jobs SET tags = '{\"not\":\"a list\"}' WHERE id = ?1",
                [uuid.as_bytes()],
            )
            .unwrap();
        }
        Backend::Postgres => {
            let (client, conn) = tokio_postgres::connect(&app.database_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            client
                .execute(
                    "UPDATE jobs SET tags = '{\"not\":\"a list\"}'::jsonb WHERE id = $1",
                    &[&uuid],
                )
                .await
                .unwrap();
        }
    }
    let resp = app.get(&format!("/v1/jobs/{id}")).await;
    let body = problem(resp, StatusCode::INTERNAL_SERVER_ERROR).await;
    let text = body.to_string();
    assert!(
        !text.contains("tags") && !text.contains("decoding"),
        "5xx body leaks internals: {text}"
    );
    app.stop().await;
}
both_backends!(corrupt_row_is_opaque_500);

/// Another process holding SQLite's write lock makes writes fail as transient: 503 with
/// Retry-After, not a hang and not a 500. The writer waits out SQLite's busy timeout (5 s)
/// per batch, and the request may queue behind a maintenance batch that is itself waiting,
/// so the lock is held long enough to outlast two busy periods. (SQLite only: on Postgres a lock wait runs into
/// the request deadline instead, covered by the 504 test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_sqlite_database_is_503_with_retry_after() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "api_errors::locked_sqlite", |a| {
        a.request_timeout = Some("14s".into());
    })
    .await
    else {
        return;
    };
    let path = app
        .database_url
        .strip_prefix("sqlite://")
        .unwrap()
        .to_owned();
    // Holds the lock until told to let go, so the request meets the lock however long it
    // takes to arrive.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let blocker = std::thread::spawn(move || {
        let mut conn = rusqlite::Connection::open(path).unwrap();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
            .unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
        tx.rollback().unwrap();
    });
    locked_rx.recv().unwrap();
    let resp = app.post_json("/v1/jobs", &json!({"kind": "noop"})).await;
    release_tx.send(()).unwrap();
    // A 503 is the store giving up on the lock (busy timeout, transient); running into the
    // 14 s request deadline would have been a 504.
    let retry_after = resp.headers().get("retry-after").cloned();
    problem(resp, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(retry_after.is_some(), "503 without Retry-After");
    blocker.join().unwrap();
    app.stop().await;
}
