//! The job read cache behind `GET /v1/jobs/{id}` and `/result`: one store read for a crowd
//! of readers of a cold job, the writer's own changes visible at once, job events
//! invalidating, tenants kept apart.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_api::{ApiConfig, ApiKey, JobCacheConfig};
use keel_core::TenantId;
use keel_resilience::AdaptiveLimitConfig;

use crate::helpers::*;

/// Entries that outlive any test, so that only invalidation can refresh them.
fn long_lived() -> ApiConfig {
    ApiConfig {
        job_cache: JobCacheConfig {
            live_ttl: Duration::from_secs(600),
            finished_ttl: Duration::from_secs(600),
            ..JobCacheConfig::default()
        },
        request_timeout: Duration::from_secs(30),
        // Admission must not shed any of the thousand readers.
        admission: AdaptiveLimitConfig {
            initial: 2048,
            min: 2048,
            max: 2048,
            ..AdaptiveLimitConfig::default()
        },
        ..ApiConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_readers_of_a_cold_job_cost_one_store_read() {
    let app = std::sync::Arc::new(app_with(long_lived()).await);
    let id = job_id(&app.enqueue(r#"{"kind":"noop","args":{"n":1}}"#).await);
    let before = app.store.reads();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let app = app.clone();
        let path = format!("/v1/jobs/{id}");
        readers.spawn(async move { app.get(&path).await });
    }
    let mut bodies = Vec::new();
    while let Some(r) = readers.join_next().await {
        let r = r.unwrap();
        r.assert_status(StatusCode::OK);
        assert_eq!(r.json()["id"], id.to_string());
        bodies.push(r.body);
    }
    assert_eq!(bodies.len(), 1000);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every reader got the same job"
    );
    assert_eq!(
        app.store.reads() - before,
        1,
        "one store read for all readers"
    );

    // The result route reads through the same cache.
    let r = app.get(&format!("/v1/jobs/{id}/result")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(app.store.reads() - before, 1);

    let metrics = String::from_utf8_lossy(&app.get("/metrics").await.body).into_owned();
    for needle in [
        "keel_cache_requests_total{result=\"hit\"}",
        "keel_cache_requests_total{result=\"miss\"}",
        "keel_cache_loads_total",
    ] {
        assert!(metrics.contains(needle), "{needle} missing");
    }
}

#[tokio::test]
async fn a_cancel_is_visible_to_the_next_read() {
    let app = app_with(long_lived()).await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "available"
    );
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/cancel")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "cancelled"
    );
    app.get(&format!("/v1/jobs/{id}/result"))
        .await
        .assert_problem(409, "job-not-completed");
    // And a retry, too.
    assert_eq!(
        app.post(&format!("/v1/jobs/{id}/retry")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "available"
    );
}

#[tokio::test]
async fn a_job_event_invalidates_and_nothing_else_does() {
    let app = app_with(long_lived()).await;
    let id = job_id(&app.enqueue(r#"{"kind":"noop"}"#).await);
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "available"
    );
    let job = app.lease("default").await.pop().unwrap();
    app.complete_in_store(&job, None).await;
    // Unannounced, the change stays hidden for the entry's lifetime: the read is cached.
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.json()["state"],
        "available"
    );
    app.publish_completed(&job);
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.get(&format!("/v1/jobs/{id}")).await.json()["state"] != "completed" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the event invalidated the cached job");
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}/result")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_cached_job_is_never_served_to_another_tenant() {
    let mut config = long_lived();
    config.api_keys = vec![
        ApiKey::new(TenantId::parse("acme").unwrap(), "acme-key"),
        ApiKey::new(TenantId::parse("globex").unwrap(), "globex-key"),
    ];
    let app = app_with(config).await;
    let as_key = |path: String, key: &str| {
        Request::get(path)
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let r = app
        .send(
            json_request("/v1/jobs")
                .header("authorization", "Bearer acme-key")
                .body(Body::from(r#"{"kind":"noop"}"#))
                .unwrap(),
        )
        .await;
    let id = job_id(&r.json());
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/result")] {
        assert!(
            app.send(as_key(path.clone(), "acme-key"))
                .await
                .status
                .is_success()
        );
        app.send(as_key(path, "globex-key"))
            .await
            .assert_problem(404, "not-found");
    }
    app.send(
        Request::post(format!("/v1/jobs/{id}/cancel"))
            .header("authorization", "Bearer globex-key")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .assert_problem(404, "not-found");
}
