//! Unique jobs over HTTP: a held key answers with its holder (`200` and
//! `Keel-Unique-Conflict`), on every enqueue path, and bad `unique` members are all listed.

use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;

use crate::helpers::*;

const UNIQUE: &str =
    r#"{"kind":"sync","args":{"account":7},"unique":{"key":"sync-7","scope":"active"}}"#;

#[tokio::test]
async fn a_held_key_answers_with_its_holder() {
    let app = app().await;
    let first = app.post_json("/v1/jobs", UNIQUE).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.header("keel-unique-conflict"), None);
    let first = first.json();
    assert_eq!(
        first["unique"],
        serde_json::json!({"key": "sync-7", "scope": "active"})
    );

    let again = app.post_json("/v1/jobs", UNIQUE).await;
    again.assert_status(StatusCode::OK);
    let holder = first["id"].as_str().unwrap();
    assert_eq!(again.header("keel-unique-conflict"), Some(holder));
    assert_eq!(
        again.header("location"),
        Some(format!("/v1/jobs/{holder}").as_str())
    );
    assert_eq!(again.json()["id"], holder);
    assert_eq!(app.all_jobs().await.len(), 1);

    // Another tenant has its own keys; a job without `unique` shows none.
    let other = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"sync","tenant":"globex","unique":{"key":"sync-7","scope":"active"}}"#,
        )
        .await;
    assert_eq!(other.status, StatusCode::CREATED);
    let plain = app.enqueue(r#"{"kind":"noop"}"#).await;
    assert!(plain.get("unique").is_none(), "{plain}");
    let shown = app.get(&format!("/v1/jobs/{holder}")).await.json();
    assert_eq!(shown["unique"]["key"], "sync-7");
}

#[tokio::test]
async fn a_queued_key_is_free_again_once_the_job_starts() {
    let app = app().await;
    let body = r#"{"kind":"sync","unique":{"key":"debounce","scope":"queued"}}"#;
    assert_eq!(
        app.post_json("/v1/jobs", body).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.post_json("/v1/jobs", body).await.status, StatusCode::OK);
    assert_eq!(app.lease("default").await.len(), 1);
    assert_eq!(
        app.post_json("/v1/jobs", body).await.status,
        StatusCode::CREATED
    );
    assert_eq!(app.all_jobs().await.len(), 2);
}

#[tokio::test]
async fn a_period_key_holds_for_its_window_whatever_the_state() {
    let app = app().await;
    let body = r#"{"kind":"report","unique":{"key":"daily","scope":"period","period":"1d"}}"#;
    let first = app.post_json("/v1/jobs", body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let first = first.json();
    assert_eq!(first["unique"]["scope"], "period");
    let key = first["unique"]["key"].as_str().unwrap();
    assert!(key.starts_with("daily@"), "{key}");
    let id = job_id(&first);
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/cancel")).await.status,
        StatusCode::OK
    );
    let again = app.post_json("/v1/jobs", body).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "a cancelled job still holds its window"
    );
    assert_eq!(again.json()["id"], id.to_string());
    // Milliseconds work as elsewhere in the API.
    let ms = r#"{"kind":"report","unique":{"key":"hourly","scope":"period","period":3600000}}"#;
    assert_eq!(
        app.post_json("/v1/jobs", ms).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn every_bad_unique_member_is_listed() {
    let app = app().await;
    let p = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"a","unique":{"scope":"forever","period":"soon","colour":1}}"#,
        )
        .await
        .assert_problem(422, "validation");
    assert_eq!(
        sorted_error_fields(&p),
        [
            "unique.colour",
            "unique.key",
            "unique.period",
            "unique.scope"
        ]
    );

    // A period scope without a period takes the documented default of a minute, and a
    // period given with another scope is ignored: neither is an error, because the
    // OpenAPI schema cannot state "required only when scope is period".
    let job = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"a","unique":{"key":"k","scope":"period"}}"#,
        )
        .await;
    assert_eq!(job.status, StatusCode::CREATED);
    let job = job.json();
    let key = job["unique"]["key"].as_str().unwrap();
    let bucket: u64 = key.strip_prefix("k@").unwrap().parse().unwrap();
    assert_eq!(bucket % 60_000, 0, "{key} is not a one-minute window");

    let p = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"a","unique":{"key":"","scope":"active","period":"1h"}}"#,
        )
        .await
        .assert_problem(422, "validation");
    assert_eq!(sorted_error_fields(&p), ["unique.key"]);

    let p = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"a","unique":{"key":"k","scope":"period","period":"500ms"}}"#,
        )
        .await
        .assert_problem(422, "validation");
    assert_eq!(sorted_error_fields(&p), ["unique.period"]);

    let p = app
        .post_json("/v1/jobs", r#"{"kind":"a","unique":"k"}"#)
        .await
        .assert_problem(422, "validation");
    assert_eq!(sorted_error_fields(&p), ["unique"]);
    // Only the defaulted period job was stored.
    assert_eq!(app.all_jobs().await.len(), 1);
}

#[tokio::test]
async fn idempotent_replays_keep_the_conflict() {
    let app = app().await;
    let holder = app.enqueue(UNIQUE).await;
    let send = || {
        app.send(
            json_request("/v1/jobs")
                .header("idempotency-key", "retry-me")
                .body(Body::from(UNIQUE))
                .unwrap(),
        )
    };
    let a = send().await;
    let b = send().await;
    for r in [&a, &b] {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("keel-unique-conflict"), holder["id"].as_str());
    }
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(a.body, b.body, "byte for byte");
    assert_eq!(app.all_jobs().await.len(), 1);
}

#[tokio::test]
async fn a_batch_returns_holders_in_place() {
    let app = app().await;
    let holder = app.enqueue(UNIQUE).await;
    let batch = format!(r#"{{"jobs":[{UNIQUE},{{"kind":"noop"}}]}}"#);
    let r = app.post_json("/v1/jobs/batch", &batch).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let jobs = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs[0]["id"], holder["id"]);
    assert_ne!(jobs[1]["id"], holder["id"]);
    assert_eq!(app.all_jobs().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_waits_on_the_holder() {
    // The waiting request re-reads its job every 20 ms: its first re-read shows it found
    // the holder and waits on it.
    let app = process_app(Duration::from_millis(20)).await;
    let holder = job_id(&app.enqueue(UNIQUE).await);
    let worker = {
        let app = app.clone();
        tokio::spawn(async move {
            // Once the request waits on the holder, finish the holder.
            while app.store.reads() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let job = app.lease("default").await.pop().unwrap();
            app.complete_in_store(&job, None).await;
            app.publish_completed(&job);
        })
    };
    let r = app.post_json("/v1/process", UNIQUE).await;
    worker.await.unwrap();
    r.assert_status(StatusCode::OK);
    assert_eq!(
        r.header("keel-unique-conflict"),
        Some(holder.to_string().as_str())
    );
    let job = r.json();
    assert_eq!(job["id"], holder.to_string());
    assert_eq!(job["state"], "completed");
    assert_eq!(app.all_jobs().await.len(), 1);
}
