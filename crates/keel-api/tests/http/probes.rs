//! /healthz, /readyz, /metrics and the OpenAPI document.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};

use crate::helpers::*;

#[tokio::test]
async fn healthz_is_ok_without_io() {
    let app = app().await;
    app.store.set(Fault::Permanent);
    let r = app.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn readyz_reports_the_database_check() {
    let app = app().await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["draining"], false);
    assert_eq!(body["checks"]["database"]["status"], "ok");
    assert!(body["checks"]["database"]["latency_ms"].is_u64());
}

#[tokio::test]
async fn readyz_is_503_while_draining() {
    let app = app().await;
    app.readiness.start_draining();
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(r.header("retry-after"), Some("5"));
    let body = r.json();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["draining"], true);
    assert_eq!(body["checks"]["database"]["status"], "ok");
}

#[tokio::test]
async fn readyz_is_503_when_the_database_fails() {
    let app = app().await;
    app.store.set(Fault::Transient);
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.header("retry-after").is_some());
    let body = r.json();
    assert_eq!(body["checks"]["database"]["status"], "error");
    assert!(
        body["checks"]["database"]["error"]
            .as_str()
            .unwrap()
            .contains("pinging")
    );
    assert!(
        !body["checks"]["database"]["error"]
            .as_str()
            .unwrap()
            .contains("injected")
    );
}

#[tokio::test]
async fn a_hung_database_fails_readiness_before_the_request_deadline() {
    let app = app_with(keel_api::ApiConfig {
        request_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    app.store.set(Fault::Hang);
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "not a 504");
    assert_eq!(r.json()["checks"]["database"]["status"], "error");
}

#[tokio::test]
async fn queues_list_pause_and_resume() {
    let app = app().await;
    app.enqueue(r#"{"kind":"noop","queue":"emails"}"#).await;
    let r = app.post("/v1/queues/emails/pause").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        serde_json::json!({"queue":"emails","paused":true})
    );
    let qs = app.get("/v1/queues").await.json();
    let emails = qs
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "emails")
        .unwrap();
    assert_eq!(emails["paused"], true);
    assert_eq!(emails["counts"]["available"], 1);
    assert_eq!(emails["counts"]["completed"], 0);

    let waker = app
        .runtime
        .wakeups
        .for_queue(&keel_core::QueueName::parse("emails").unwrap())
        .unwrap();
    let r = app.post("/v1/queues/emails/resume").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"queue":"emails","paused":false})
    );
    tokio::time::timeout(std::time::Duration::from_secs(1), waker.notified())
        .await
        .expect("resume wakes the queue");
    app.post("/v1/queues/bad%20name/pause")
        .await
        .assert_problem(400, "malformed-request");
}

#[tokio::test]
async fn one_queue_answers_its_counts_and_flag() {
    let app = app().await;
    app.enqueue(r#"{"kind":"noop","queue":"emails"}"#).await;
    app.enqueue(r#"{"kind":"noop","queue":"emails"}"#).await;
    app.enqueue(r#"{"kind":"noop","queue":"sms"}"#).await;
    app.post("/v1/queues/emails/pause").await;
    let r = app.get("/v1/queues/emails").await;
    assert_eq!(r.status, StatusCode::OK);
    let q = r.json();
    assert_eq!(q["queue"], "emails");
    assert_eq!(q["paused"], true);
    assert_eq!(q["counts"]["available"], 2);
    let listed = app.get("/v1/queues").await.json();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "emails")
        .unwrap()
        .clone();
    assert_eq!(q, entry, "the same as its entry in the list");

    let unused = app.get("/v1/queues/never-used").await;
    assert_eq!(unused.status, StatusCode::OK);
    assert_eq!(unused.json()["paused"], false);
    assert_eq!(unused.json()["counts"]["available"], 0);
    app.get("/v1/queues/bad%20name")
        .await
        .assert_problem(400, "malformed-request");
}

/// A concrete URL for a route template.
fn concrete(path: &str) -> String {
    path.replace("{id}", &keel_core::JobId::new().to_string())
        .replace("{queue}", "default")
}

#[tokio::test]
async fn the_served_document_covers_every_route_and_every_route_is_served() {
    let app = app().await;
    let r = app.get("/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "application/json");
    let doc = r.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let table: BTreeSet<(String, String)> = keel_api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_uppercase(), (*p).to_owned()))
        .collect();
    assert_eq!(documented, table);
    // And the router really serves each one: never the unmatched-route 404 or a 405.
    for (method, path) in &table {
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(concrete(path))
            .header("content-type", "application/json")
            .header("request-timeout", "300")
            .body(Body::from(if method == "POST" { "{}" } else { "" }))
            .unwrap();
        let resp = app.send(req).await;
        assert_ne!(
            resp.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        if resp.status == StatusCode::NOT_FOUND {
            assert_ne!(resp.json()["detail"], "no such route", "{method} {path}");
        }
    }
}
