//! API keys and tenant scoping.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_api::{ApiConfig, ApiKey};
use keel_core::{JobStore, TenantId};

use crate::helpers::*;

const ACME_KEY: &str = "acme-secret-key";
const GLOBEX_KEY: &str = "globex-secret-key";

async fn secured() -> TestApp {
    app_with(ApiConfig {
        api_keys: vec![
            ApiKey::new(TenantId::parse("acme").unwrap(), ACME_KEY),
            ApiKey::new(TenantId::parse("globex").unwrap(), GLOBEX_KEY),
        ],
        ..Default::default()
    })
    .await
}

fn with_key(req: axum::http::request::Builder, key: &str) -> axum::http::request::Builder {
    req.header("authorization", format!("Bearer {key}"))
}

async fn enqueue_as(app: &TestApp, key: &str, body: &str) -> TestResponse {
    app.send(
        with_key(json_request("/v1/jobs"), key)
            .body(Body::from(body.to_owned()))
            .unwrap(),
    )
    .await
}

async fn get_as(app: &TestApp, key: &str, path: &str) -> TestResponse {
    app.send(
        with_key(Request::get(path), key)
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn no_key_or_a_wrong_key_is_401() {
    let app = secured().await;
    let r = app.post_json("/v1/jobs", r#"{"kind":"noop"}"#).await;
    r.assert_problem(401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer realm="keel""#));

    let r = enqueue_as(&app, "not-a-key", r#"{"kind":"noop"}"#).await;
    r.assert_problem(401, "unauthorized");
    assert!(r.header("www-authenticate").is_some());
    let r = get_as(&app, "nope", "/v1/queues").await;
    r.assert_problem(401, "unauthorized");
    assert!(app.all_jobs().await.is_empty());
}

#[tokio::test]
async fn probes_and_the_document_need_no_key() {
    let app = secured().await;
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(app.get(path).await.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn the_key_decides_the_tenant() {
    let app = secured().await;
    let r = enqueue_as(&app, ACME_KEY, r#"{"kind":"noop"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["tenant"], "acme");
    let r = enqueue_as(&app, ACME_KEY, r#"{"kind":"noop","tenant":"acme"}"#).await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = enqueue_as(&app, ACME_KEY, r#"{"kind":"noop","tenant":"globex"}"#).await;
    let p = r.assert_problem(403, "forbidden");
    assert!(p["detail"].as_str().unwrap().contains("globex"), "{p}");
    let batch = r#"{"jobs":[{"kind":"a"},{"kind":"b","tenant":"globex"}]}"#;
    let r = app
        .send(
            with_key(json_request("/v1/jobs/batch"), ACME_KEY)
                .body(Body::from(batch))
                .unwrap(),
        )
        .await;
    r.assert_problem(403, "forbidden");
    assert_eq!(app.all_jobs().await.len(), 2);
}

#[tokio::test]
async fn another_tenants_jobs_are_invisible() {
    let app = secured().await;
    let theirs = job_id(
        &enqueue_as(&app, GLOBEX_KEY, r#"{"kind":"noop"}"#)
            .await
            .json(),
    );
    let ours = job_id(
        &enqueue_as(&app, ACME_KEY, r#"{"kind":"noop"}"#)
            .await
            .json(),
    );

    for path in [
        format!("/v1/jobs/{theirs}"),
        format!("/v1/jobs/{theirs}/result"),
    ] {
        get_as(&app, ACME_KEY, &path)
            .await
            .assert_problem(404, "not-found");
    }
    for action in ["cancel", "retry"] {
        let r = app
            .send(
                with_key(
                    Request::post(format!("/v1/jobs/{theirs}/{action}")),
                    ACME_KEY,
                )
                .body(Body::empty())
                .unwrap(),
            )
            .await;
        r.assert_problem(404, "not-found");
    }
    assert_eq!(
        app.store.get(theirs).await.unwrap().state,
        keel_core::JobState::Available,
        "the other tenant's job was not touched"
    );

    let page = get_as(&app, ACME_KEY, "/v1/jobs").await.json();
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [ours.to_string()]);
    get_as(&app, ACME_KEY, "/v1/jobs?tenant=globex")
        .await
        .assert_problem(403, "forbidden");
    assert_eq!(
        get_as(&app, ACME_KEY, &format!("/v1/jobs/{ours}"))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_tenant_counts_only_its_own_jobs_in_one_queue() {
    let app = secured().await;
    for key in [ACME_KEY, ACME_KEY, GLOBEX_KEY] {
        let r = enqueue_as(&app, key, r#"{"kind":"noop","queue":"shared"}"#).await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let acme = get_as(&app, ACME_KEY, "/v1/queues/shared").await;
    assert_eq!(acme.status, StatusCode::OK);
    assert_eq!(acme.json()["counts"]["available"], 2);
    let globex = get_as(&app, GLOBEX_KEY, "/v1/queues/shared").await;
    assert_eq!(globex.json()["counts"]["available"], 1);
    get_as(&app, "nope", "/v1/queues/shared")
        .await
        .assert_problem(401, "unauthorized");
}
