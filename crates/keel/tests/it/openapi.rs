//! The served OpenAPI document against real traffic: each request body sent and each
//! response body received in a worker's life (enqueue, lease, heartbeat, complete, fail,
//! release, the batch forms, the workers list, and their error answers) must validate
//! against the schema the document gives for that operation and status. The route table
//! test in keel-api checks that every route is documented; this checks that what is
//! documented is what is spoken.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, spawn_app};

/// Validates `instance` against the schema at `pointer` (a JSON pointer into the document),
/// resolving `#/components/...` references inside the document.
fn check(doc: &Value, pointer: &str, instance: &Value, what: &str) {
    let schema = doc
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{what}: the document has nothing at {pointer}"));
    let mut root = schema.clone();
    if let Some(obj) = root.as_object_mut() {
        obj.insert("components".to_owned(), doc["components"].clone());
    } else {
        root = json!({"allOf": [schema], "components": doc["components"]});
    }
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("{what}: the schema at {pointer} does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not match the documented schema: {errors:#?}"
    );
}

fn escape(path: &str) -> String {
    path.replace('~', "~0").replace('/', "~1")
}

/// Sends `body` to `method path` (with `template` the documented path), checks the request
/// and the `expect`ed response against the document, and returns the response body.
async fn exchange(
    app: &TestApp,
    doc: &Value,
    method: &str,
    path: &str,
    template: &str,
    body: Option<Value>,
    expect: StatusCode,
) -> Value {
    let op = format!("/paths/{}/{method}", escape(template));
    // A request meant to be refused need not match the schema; one meant to succeed must.
    if let Some(b) = body.as_ref().filter(|_| expect.is_success()) {
        check(
            doc,
            &format!("{op}/requestBody/content/application~1json/schema"),
            b,
            &format!("request of {method} {template}"),
        );
    }
    let req = match method {
        "get" => app.http.get(app.url(path)),
        _ => app.http.post(app.url(path)),
    };
    let req = match &body {
        Some(b) => req.json(b),
        None => req,
    };
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(status, expect, "{method} {path}: {answer}");
    let media = if content_type.starts_with("application/problem+json") {
        "application~1problem+json"
    } else {
        "application~1json"
    };
    check(
        doc,
        &format!("{op}/responses/{}/content/{media}/schema", status.as_u16()),
        &answer,
        &format!("{} answer of {method} {template}", status.as_u16()),
    );
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_worker_protocol_bodies_match_the_document() {
    let Some(app) = spawn_app(Backend::Sqlite, "openapi::real_bodies").await else {
        return;
    };
    let doc: Value = app.get("/v1/openapi.json").await.json().await.unwrap();
    let queue = format!("docs-{}", uuid::Uuid::new_v4().simple());
    let mut ids = Vec::new();
    for n in 0..3 {
        let job = exchange(
            &app,
            &doc,
            "post",
            "/v1/jobs",
            "/v1/jobs",
            Some(json!({"queue": queue, "kind": "render", "args": {"n": n}, "tags": ["docs"]})),
            StatusCode::CREATED,
        )
        .await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let lease_path = format!("/v1/queues/{queue}/lease");
    let leased = exchange(
        &app,
        &doc,
        "post",
        &lease_path,
        "/v1/queues/{queue}/lease",
        Some(json!({"worker": "docs-w", "max": 3, "wait": "1s", "lease": "30s", "kinds": ["render"]})),
        StatusCode::OK,
    )
    .await;
    let jobs = leased["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 3);
    let token = |j: &Value| j["lease"]["token"].as_str().unwrap().to_owned();
    let id = |j: &Value| j["id"].as_str().unwrap().to_owned();

    let (a, b, c) = (&jobs[0], &jobs[1], &jobs[2]);
    for (method, path, template, body, status) in [
        (
            "post",
            format!("/v1/jobs/{}/heartbeat", id(a)),
            "/v1/jobs/{id}/heartbeat",
            Some(json!({"token": token(a), "lease": "45s"})),
            StatusCode::OK,
        ),
        (
            "get",
            format!("/v1/jobs/{}", id(a)),
            "/v1/jobs/{id}",
            None,
            StatusCode::OK,
        ),
        (
            "post",
            format!("/v1/jobs/{}/complete", id(a)),
            "/v1/jobs/{id}/complete",
            Some(json!({"token": token(a), "result": {"pages": 3}})),
            StatusCode::OK,
        ),
        // The same token again: a 409 problem.
        (
            "post",
            format!("/v1/jobs/{}/complete", id(a)),
            "/v1/jobs/{id}/complete",
            Some(json!({"token": token(a)})),
            StatusCode::CONFLICT,
        ),
        (
            "post",
            format!("/v1/jobs/{}/fail", id(b)),
            "/v1/jobs/{id}/fail",
            Some(json!({"token": token(b), "error": "boom", "permanent": false, "retry_in": "1h"})),
            StatusCode::OK,
        ),
        (
            "post",
            format!("/v1/jobs/{}/release", id(c)),
            "/v1/jobs/{id}/release",
            Some(json!({"token": token(c)})),
            StatusCode::OK,
        ),
    ] {
        exchange(&app, &doc, method, &path, template, body, status).await;
    }
    let again = exchange(
        &app,
        &doc,
        "post",
        &lease_path,
        "/v1/queues/{queue}/lease",
        Some(json!({"worker": "docs-w"})),
        StatusCode::OK,
    )
    .await;
    let c2 = &again["jobs"][0];
    for (method, path, template, body, status) in [
        (
            "post",
            "/v1/jobs/complete".to_owned(),
            "/v1/jobs/complete",
            Some(json!({"outcomes": [
                {"id": id(c2), "token": token(c2), "result": null},
                {"id": id(a), "token": token(a), "result": 1},
            ]})),
            StatusCode::OK,
        ),
        (
            "post",
            "/v1/jobs/fail".to_owned(),
            "/v1/jobs/fail",
            Some(json!({"outcomes": [{"id": id(b), "token": token(b), "error": "stale"}]})),
            StatusCode::OK,
        ),
        (
            "get",
            "/v1/workers".to_owned(),
            "/v1/workers",
            None,
            StatusCode::OK,
        ),
        (
            "post",
            lease_path,
            "/v1/queues/{queue}/lease",
            Some(json!({"worker": "docs-w", "max": 0})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        exchange(&app, &doc, method, &path, template, body, status).await;
    }
    app.stop().await;
}
