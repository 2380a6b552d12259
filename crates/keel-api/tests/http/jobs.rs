//! The jobs endpoints: enqueue, batch, read, result, cancel, retry, list, and their errors.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_core::store::{FailParams, LeaseRef};
use keel_core::{JobState, JobStore, WorkStore};

use crate::helpers::*;

#[tokio::test]
async fn enqueue_returns_201_with_the_job_and_its_location() {
    let app = app().await;
    let waker = app
        .runtime
        .wakeups
        .for_queue(&keel_core::QueueName::parse("emails").unwrap())
        .unwrap();
    let body = r#"{"kind":"echo","queue":"emails","args":{"to": "a@b.c",  "n":[1, 2.50]},"priority":2,
        "max_attempts":3,"timeout_ms":1500,"backoff":{"type":"fixed","delay_ms":250},"tags":["t1"]}"#;
    let r = app.post_json("/v1/jobs", body).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.content_type(), "application/json");
    let job = r.json();
    let id = job_id(&job);
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    assert!(r.header("idempotent-replayed").is_none());
    // args come back byte for byte, whitespace and number spelling included.
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains(r#""args":{"to": "a@b.c",  "n":[1, 2.50]}"#),
        "{text}"
    );
    assert_eq!(job["kind"], "echo");
    assert_eq!(job["queue"], "emails");
    assert_eq!(job["tenant"], "default");
    assert_eq!(job["priority"], 2);
    assert_eq!(job["state"], "available");
    assert_eq!(job["attempt"], 0);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(job["timeout_ms"], 1500);
    assert_eq!(
        job["backoff"],
        serde_json::json!({"type":"fixed","delay_ms":250})
    );
    assert_eq!(job["tags"], serde_json::json!(["t1"]));
    assert_eq!(job["lease"], serde_json::Value::Null);
    assert!(chrono::DateTime::parse_from_rfc3339(job["created_at"].as_str().unwrap()).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(job["run_at"].as_str().unwrap()).is_ok());
    // Durable, and the queue's dispatcher was woken.
    let stored = app.store.get(id).await.unwrap();
    assert_eq!(stored.args.get(), r#"{"to": "a@b.c",  "n":[1, 2.50]}"#);
    tokio::time::timeout(Duration::from_secs(1), waker.notified())
        .await
        .expect("the emails dispatcher is woken");
}

#[tokio::test]
async fn a_delayed_job_is_scheduled() {
    let app = app().await;
    let job = app.enqueue(r#"{"kind":"noop","delay_ms":60000}"#).await;
    assert_eq!(job["state"], "scheduled");
    let job = app
        .enqueue(r#"{"kind":"noop","run_at":"2031-01-01T00:00:00Z"}"#)
        .await;
    assert_eq!(job["state"], "scheduled");
    assert!(
        job["run_at"]
            .as_str()
            .unwrap()
            .starts_with("2031-01-01T00:00:00")
    );
}

#[tokio::test]
async fn timestamps_out_of_range_are_422_and_the_store_keeps_working() {
    let app = app().await;
    for far in ["2999-01-01T00:00:00Z", "0001-01-01T00:00:00Z"] {
        let body = format!(r#"{{"kind":"noop","run_at":"{far}"}}"#);
        let p = app
            .post_json("/v1/jobs", &body)
            .await
            .assert_problem(422, "validation");
        assert_eq!(p["errors"][0]["field"], "run_at");
    }
    let huge = format!(r#"{{"kind":"noop","delay_ms":{}}}"#, u64::MAX);
    app.post_json("/v1/jobs", &huge)
        .await
        .assert_problem(422, "validation");
    app.enqueue(r#"{"kind":"noop"}"#).await;
}

#[tokio::test]
async fn invalid_fields_are_all_listed_in_one_422() {
    let app = app().await;
    let body = r#"{"queue":"no spaces allowed","priority":12,"run_at":"yesterday","delay_ms":5,
        "max_attempts":0,"timeout_ms":"soon","backoff":{"type":"linear"},"tags":[""],"colour":"red"}"#;
    let r = app.post_json("/v1/jobs", body).await;
    let p = r.assert_problem(422, "validation");
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            e["field"].as_str().unwrap()
        })
        .collect();
    for f in [
        "kind",
        "queue",
        "priority",
        "run_at",
        "max_attempts",
        "timeout_ms",
        "backoff",
        "tags[0]",
        "colour",
    ] {
        assert!(fields.contains(&f), "{f} missing from {fields:?}");
    }
    assert!(app.all_jobs().await.is_empty(), "nothing stored");
}

#[tokio::test]
async fn args_over_the_limit_are_a_field_error() {
    let app = app_with(keel_api::ApiConfig {
        max_args_bytes: 16,
        ..Default::default()
    })
    .await;
    let r = app
        .post_json(
            "/v1/jobs",
            r#"{"kind":"noop","args":"0123456789abcdefghij"}"#,
        )
        .await;
    let p = r.assert_problem(422, "validation");
    assert_eq!(p["errors"][0]["field"], "args");
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let app = app().await;
    for body in [r#"{"kind":"noop""#, "[1,2]", "not json", r#""kind""#] {
        let r = app.post_json("/v1/jobs", body).await;
        let p = r.assert_problem(400, "malformed-request");
        assert!(p.get("errors").is_none(), "{p}");
    }
    let r = app.post("/v1/jobs").await;
    r.assert_problem(400, "malformed-request");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let app = app().await;
    let req = Request::post("/v1/jobs")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"kind":"noop"}"#))
        .unwrap();
    app.send(req)
        .await
        .assert_problem(415, "unsupported-media-type");
    let req = Request::post("/v1/jobs")
        .body(Body::from(r#"{"kind":"noop"}"#))
        .unwrap();
    app.send(req)
        .await
        .assert_problem(415, "unsupported-media-type");
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_problems() {
    let app = app_with(keel_api::ApiConfig {
        max_body_bytes: 100,
        ..Default::default()
    })
    .await;
    let big = format!(r#"{{"kind":"noop","args":"{}"}}"#, "x".repeat(200));
    // Declared length: refused by the body-limit layer before anything reads it.
    let req = json_request("/v1/jobs")
        .header("content-length", big.len().to_string())
        .body(Body::from(big.clone()))
        .unwrap();
    let p = app.send(req).await.assert_problem(413, "payload-too-large");
    assert!(p["detail"].as_str().unwrap().contains("100 bytes"), "{p}");
    // No Content-Length header: refused where the body is read (DefaultBodyLimit).
    let req = json_request("/v1/jobs").body(Body::from(big)).unwrap();
    app.send(req).await.assert_problem(413, "payload-too-large");
    assert!(app.all_jobs().await.is_empty());
}

#[tokio::test]
async fn get_job_404_and_bad_ids() {
    let app = app().await;
    let job = app.enqueue(r#"{"kind":"noop"}"#).await;
    let id = job_id(&job);
    let r = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["id"], id.to_string());

    let missing = keel_core::JobId::new();
    let p = app
        .get(&format!("/v1/jobs/{missing}"))
        .await
        .assert_problem(404, "not-found");
    assert_eq!(p["job_id"], missing.to_string());

    let p = app
        .get("/v1/jobs/not-a-uuid")
        .await
        .assert_problem(400, "malformed-request");
    assert!(p["detail"].as_str().unwrap().contains("job id"), "{p}");
}

#[tokio::test]
async fn result_is_202_until_completed_then_200() {
    // The test leases and completes behind the API's back without announcing it (leases
    // never are), so live jobs are not kept in the job cache here: each read shows the
    // state at once instead of up to `live_ttl` later.
    let app = app_with(keel_api::ApiConfig {
        job_cache: keel_api::JobCacheConfig {
            live_ttl: Duration::ZERO,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let job = app.enqueue(r#"{"kind":"echo","args":{"x":1}}"#).await;
    let id = job_id(&job);
    let r = app.get(&format!("/v1/jobs/{id}/result")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        r.json(),
        serde_json::json!({"id": id.to_string(), "state": "available"})
    );

    let leased = app.lease("default").await;
    assert_eq!(leased.len(), 1);
    let running = app.get(&format!("/v1/jobs/{id}")).await.json();
    assert_eq!(running["state"], "running");
    assert_eq!(running["lease"]["owner"], "test-worker");
    assert!(running["lease"]["expires_at"].is_string());
    assert!(
        running["lease"].get("token").is_none(),
        "the lease token is never shown"
    );
    assert!(
        !String::from_utf8_lossy(&app.get(&format!("/v1/jobs/{id}")).await.body)
            .contains(&leased[0].lease.as_ref().unwrap().token.to_string())
    );

    app.complete_in_store(&leased[0], Some(r#"{"x": 1}"#)).await;
    let r = app.get(&format!("/v1/jobs/{id}/result")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        format!(r#"{{"id":"{id}","state":"completed","result":{{"x": 1}}}}"#)
    );
}

#[tokio::test]
async fn result_of_a_discarded_or_cancelled_job_is_409() {
    let app = app().await;
    let a = job_id(&app.enqueue(r#"{"kind":"fail"}"#).await);
    let leased = app.lease("default").await;
    app.store
        .fail(FailParams {
            lease: LeaseRef::of(&leased[0]).unwrap(),
            error: "upstream said no".into(),
            permanent: true,
            retry_at: None,
        })
        .await
        .unwrap();
    let p = app
        .get(&format!("/v1/jobs/{a}/result"))
        .await
        .assert_problem(409, "job-not-completed");
    assert_eq!(p["state"], "discarded");
    assert_eq!(p["job_id"], a.to_string());
    assert!(
        p["detail"].as_str().unwrap().contains("upstream said no"),
        "{p}"
    );

    let b = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    assert_eq!(
        app.post(&format!("/v1/jobs/{b}/cancel")).await.status,
        StatusCode::OK
    );
    let p = app
        .get(&format!("/v1/jobs/{b}/result"))
        .await
        .assert_problem(409, "job-not-completed");
    assert_eq!(p["state"], "cancelled");
}

#[tokio::test]
async fn cancel_publishes_an_event_and_refuses_twice() {
    let app = app().await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    let mut events = app.runtime.events.subscribe();
    let token = tokio_util::sync::CancellationToken::new();
    let lease = keel_core::store::LeaseRef {
        id,
        token: keel_core::LeaseToken::new(),
    };
    app.runtime
        .running
        .register(lease, keel_core::QueueName::default(), token.clone());

    let r = app.post(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "cancelled");
    assert!(token.is_cancelled(), "the running worker is told to stop");
    let ev = events.try_recv().unwrap();
    assert_eq!((ev.id, ev.state), (id, JobState::Cancelled));

    let p = app
        .post(&format!("/v1/jobs/{id}/cancel"))
        .await
        .assert_problem(409, "illegal-transition");
    assert_eq!(p["job_id"], id.to_string());
    assert!(
        p["detail"].as_str().unwrap().contains("cannot cancel"),
        "{p}"
    );
    app.post(&format!("/v1/jobs/{}/cancel", keel_core::JobId::new()))
        .await
        .assert_problem(404, "not-found");
}

#[tokio::test]
async fn retry_makes_a_finished_job_available_again() {
    let app = app().await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    app.post(&format!("/v1/jobs/{id}/retry"))
        .await
        .assert_problem(409, "illegal-transition");
    app.post(&format!("/v1/jobs/{id}/cancel")).await;
    let r = app.post(&format!("/v1/jobs/{id}/retry")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["state"], "available");
}

#[tokio::test]
async fn list_paginates_by_keyset_and_filters() {
    let app = app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let q = if i % 2 == 0 { "default" } else { "emails" };
        ids.push(
            app.enqueue(&format!(r#"{{"kind":"noop","queue":"{q}"}}"#))
                .await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut seen = Vec::new();
    let mut url = "/v1/jobs?limit=2".to_owned();
    loop {
        let r = app.get(&url).await;
        assert_eq!(r.status, StatusCode::OK);
        let page = r.json();
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => url = format!("/v1/jobs?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every job once, oldest first");

    let page = app
        .get("/v1/jobs?queue=emails&state=available")
        .await
        .json();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], serde_json::Value::Null);
    let page = app.get("/v1/jobs?state=running").await.json();
    assert!(page["jobs"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn bad_list_parameters_are_all_reported_in_one_400() {
    let app = app().await;
    let r = app
        .get("/v1/jobs?state=finished&limit=5000&after=nope&queue=a%20b&sort=asc")
        .await;
    let p = r.assert_problem(400, "invalid-query");
    let fields = error_fields(&p);
    assert_eq!(fields, ["state", "limit", "after", "queue", "sort"]);
}

#[tokio::test]
async fn a_batch_is_inserted_atomically() {
    let app = app().await;
    let r = app
        .post_json(
            "/v1/jobs/batch",
            r#"{"jobs":[{"kind":"a"},{"kind":"b","queue":"emails","args":[1]}]}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let jobs = r.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["kind"], "a");
    assert_eq!(jobs[1]["queue"], "emails");
    assert_eq!(app.all_jobs().await.len(), 2);

    let r = app
        .post_json(
            "/v1/jobs/batch",
            r#"{"jobs":[{"kind":"ok"},{"kind":"x","priority":99},{"kind":"y","tags":[1]},{"kind":"z"}]}"#,
        )
        .await;
    let p = r.assert_problem(422, "validation");
    let fields = error_fields(&p);
    assert_eq!(fields, ["jobs[1].priority", "jobs[2].tags"]);
    assert_eq!(
        app.all_jobs().await.len(),
        2,
        "nothing of the bad batch was stored"
    );

    let many = format!(
        r#"{{"jobs":[{}]}}"#,
        vec![r#"{"kind":"a"}"#; 1001].join(",")
    );
    let p = app
        .post_json("/v1/jobs/batch", &many)
        .await
        .assert_problem(422, "validation");
    assert_eq!(p["errors"][0]["field"], "jobs");
}

#[tokio::test]
async fn store_failures_map_to_503_and_opaque_500() {
    let app = app().await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);

    app.store.set(Fault::Transient);
    let r = app.get(&format!("/v1/jobs/{id}")).await;
    r.assert_problem(503, "unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(!String::from_utf8_lossy(&r.body).contains("injected"));

    app.store.set(Fault::Permanent);
    let r = app.post_json("/v1/jobs", r#"{"kind":"noop"}"#).await;
    let p = r.assert_problem(500, "internal");
    assert_eq!(p["detail"], "internal error");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("corrupt"),
        "no internals leak"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let app = app().await;
    app.get("/v2/nothing")
        .await
        .assert_problem(404, "not-found");
    let r = app
        .send(Request::delete("/v1/jobs").body(Body::empty()).unwrap())
        .await;
    r.assert_problem(405, "method-not-allowed");
}
