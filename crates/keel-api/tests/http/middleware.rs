//! Request ids, the deadline, and metrics.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_api::ApiConfig;

use crate::helpers::*;

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_named_in_problems() {
    let app = app().await;
    let r = app
        .send(
            Request::get("/v1/jobs/not-an-id")
                .header("x-request-id", "client-req-7")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.header("x-request-id"), Some("client-req-7"));
    let p = r.assert_problem(400, "malformed-request");
    assert_eq!(p["request_id"], "client-req-7");

    let r = app
        .send(
            Request::get("/healthz")
                .header("x-request-id", "abc")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        r.header("x-request-id"),
        Some("abc"),
        "successes carry it too"
    );
}

#[tokio::test]
async fn an_insane_or_missing_request_id_is_replaced_by_a_uuid_v7() {
    let app = app().await;
    let long = "x".repeat(129);
    for incoming in [Some("has space"), Some(long.as_str()), None] {
        let mut req = Request::get("/healthz");
        if let Some(v) = incoming {
            req = req.header("x-request-id", v);
        }
        let r = app.send(req.body(Body::empty()).unwrap()).await;
        let id = r.header("x-request-id").unwrap();
        let uuid = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("not a uuid: {id}"));
        assert_eq!(uuid.get_version_num(), 7);
    }
}

#[tokio::test]
async fn the_deadline_answers_504_and_drops_the_store_work() {
    let app = app_with(ApiConfig {
        request_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    app.store.set(Fault::Hang);
    let r = app.get(&format!("/v1/jobs/{id}")).await;
    let p = r.assert_problem(504, "deadline-exceeded");
    assert!(p.get("job_id").is_none(), "{p}");
    // G7: the store call was cancelled with the request, not left running: it was dropped
    // while hanging, and letting the hang go afterwards finishes nothing.
    assert_eq!(app.store.hung(), 1);
    assert_eq!(
        app.store.hung_dropped(),
        1,
        "the store work outlived its request"
    );
    app.store.release();
    assert_eq!(app.store.hung_finished(), 0);
}

#[tokio::test]
async fn a_client_may_ask_for_a_shorter_deadline_but_not_garbage() {
    // The server's own deadline is an hour away: only the client's can end the request.
    let app = app_with(ApiConfig {
        request_timeout: Duration::from_secs(3600),
        ..Default::default()
    })
    .await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    app.store.set(Fault::Hang);
    let r = app
        .send(
            Request::get(format!("/v1/jobs/{id}"))
                .header("request-timeout", "100")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    r.assert_problem(504, "deadline-exceeded");
    assert_eq!(app.store.hung_dropped(), 1);

    let r = app
        .send(
            Request::get("/healthz")
                .header("request-timeout", "soon")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    r.assert_problem(400, "malformed-request");
}

#[tokio::test]
async fn metrics_label_requests_by_matched_route() {
    let app = app().await;
    let id = keel_core::JobId::new();
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    app.get("/no/such/route").await;
    let r = app.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.content_type(), "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8_lossy(&r.body);
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total{")
                && l.contains(r#"route="/v1/jobs/{id}""#)
                && l.contains(r#"status="404""#)
                && l.contains(r#"method="GET""#)
        })
        .unwrap_or_else(|| panic!("no counter for the matched route in:\n{text}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    assert!(text.contains(r#"route="unmatched""#), "{text}");
    assert!(text.contains("http_request_duration_seconds"), "{text}");
    assert!(!text.contains(&id.to_string()), "no ids in labels");
}
