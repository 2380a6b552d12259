//! G3 over HTTP: one key, one job, one response, byte for byte.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, spawn_app};

async fn concurrent_identical_requests_create_one_job(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    app.client.set_paused("default", true).await.unwrap();
    let body = json!({"kind": "echo", "args": {"order": 42}, "queue": "default"});
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = app.http.clone();
        let url = app.url("/v1/jobs");
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .header("Idempotency-Key", "order-42")
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status(), resp.bytes().await.unwrap().to_vec())
        }));
    }
    let mut statuses = HashSet::new();
    let mut bodies = HashSet::new();
    for t in tasks {
        let (status, bytes) = t.await.unwrap();
        statuses.insert(status);
        bodies.insert(bytes);
    }
    assert_eq!(
        statuses,
        HashSet::from([StatusCode::CREATED]),
        "every caller gets the original status"
    );
    assert_eq!(bodies.len(), 1, "every caller gets the identical body");
    let page = app.client.list_jobs(&Default::default()).await.unwrap();
    assert_eq!(page.jobs.len(), 1, "exactly one job was created");

    // The job runs to completion before the later replay: a response rendered again from
    // the job would now say `completed`; the stored original still says `available`.
    let original: serde_json::Value =
        serde_json::from_slice(bodies.iter().next().unwrap()).unwrap();
    assert_eq!(original["state"], "available", "{original}");
    let id = original["id"].as_str().unwrap().to_owned();
    app.client.set_paused("default", false).await.unwrap();
    app.wait_for(&id, std::time::Duration::from_secs(30), |j| {
        j.state == "completed"
    })
    .await;

    // A later replay says it is one, with the original status and bytes.
    let replay = app
        .http
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "order-42")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(
        replay.bytes().await.unwrap().to_vec(),
        bodies.into_iter().next().unwrap()
    );

    // Same key, different request: conflict.
    let other = app
        .http
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "order-42")
        .json(&json!({"kind": "echo", "args": {"order": 43}}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::CONFLICT);
    assert!(
        other.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/problem+json")
    );
    assert_eq!(
        app.client
            .list_jobs(&Default::default())
            .await
            .unwrap()
            .jobs
            .len(),
        1
    );
    app.stop().await;
}
both_backends!(concurrent_identical_requests_create_one_job);
