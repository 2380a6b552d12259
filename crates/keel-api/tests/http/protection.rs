//! The protection layers: the deadline naming its step, admission control, the backlog cap,
//! per-key rate limits, auth chaos, and readiness following the database breaker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_api::rate_limit::{Rate, RateLimitConfig};
use keel_api::{ApiConfig, ApiKey};
use keel_core::TenantId;
use keel_core::store::Layered;
use keel_resilience::{
    AdaptiveLimitConfig, BreakerConfig, Chaos, ChaosSettings, CircuitBreaker, StoreGuard,
    StoreGuardConfig,
};

use crate::helpers::*;

fn short_deadline() -> ApiConfig {
    ApiConfig {
        request_timeout: Duration::from_millis(200),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_slow_auth_check_is_a_504_naming_the_auth_step() {
    // Auth takes a minute: without the deadline the request would end in a 200, so the
    // 504 naming the auth step is the deadline's doing.
    let chaos = Chaos::new(ChaosSettings::parse("auth.latency_ms=60000").unwrap());
    let app = app_wired(short_deadline(), |s| s.with_chaos(chaos)).await;
    let r = app.get("/v1/queues").await;
    let p = r.assert_problem(504, "deadline-exceeded");
    assert_eq!(p["detail"], "deadline exceeded while authenticating");
    // Probes do not authenticate, so the fault does not reach them.
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_slow_database_behind_the_guard_is_a_504_naming_the_store_step() {
    let app = app_wired(short_deadline(), |s| {
        let guarded = Layered::new(
            Arc::clone(&s.store),
            StoreGuard::new(StoreGuardConfig::default(), Chaos::default()),
        );
        s.with_store(Arc::new(guarded))
    })
    .await;
    app.store.set(Fault::Hang);
    let r = app.get("/v1/queues").await;
    let p = r.assert_problem(504, "deadline-exceeded");
    assert_eq!(
        p["detail"],
        "deadline exceeded while waiting for the database"
    );
}

#[tokio::test]
async fn an_injected_auth_failure_is_a_503_that_hides_its_cause() {
    let chaos = Chaos::new(ChaosSettings::parse("auth.error_rate=1").unwrap());
    let app = app_wired(ApiConfig::default(), |s| s.with_chaos(chaos)).await;
    let r = app.get("/v1/queues").await;
    assert_eq!(r.header("retry-after"), Some("1"));
    let p = r.assert_problem(503, "unavailable");
    assert_eq!(p["detail"], "authentication is unavailable; retry shortly");
    assert!(!p.to_string().contains("chaos"), "{p}");
}

fn one_at_a_time() -> ApiConfig {
    ApiConfig {
        admission: AdaptiveLimitConfig {
            initial: 1,
            min: 1,
            max: 1,
            max_wait: Duration::ZERO,
            ..AdaptiveLimitConfig::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn above_the_concurrency_limit_requests_are_shed_at_once_but_probes_pass() {
    let mut admission = None;
    let app = Arc::new(
        app_wired(one_at_a_time(), |s| {
            admission = Some(s.admission.clone());
            s
        })
        .await,
    );
    let admission = admission.unwrap();
    app.store.set(Fault::Hang);
    let holder = tokio::spawn({
        let app = Arc::clone(&app);
        async move { app.get("/v1/queues").await }
    });
    // The holder is inside the store, holding the only slot, until the test lets it go.
    while app.store.hung() == 0 {
        tokio::task::yield_now().await;
    }
    let r = app.get("/v1/jobs").await;
    // Shed at once: answered while the holder still holds its slot, not after it.
    assert_eq!(app.store.hung_finished(), 0, "answered after the holder");
    assert!(!holder.is_finished());
    assert_eq!(r.header("retry-after"), Some("1"));
    let p = r.assert_problem(503, "overloaded");
    assert!(
        p["detail"].as_str().unwrap().contains("concurrency limit"),
        "{p}"
    );
    for probe in ["/healthz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(app.get(probe).await.status, StatusCode::OK, "{probe}");
    }
    let metrics = String::from_utf8_lossy(&app.get("/metrics").await.body).into_owned();
    assert!(
        metrics.contains(r#"keel_requests_shed_total{reason="concurrency"}"#),
        "{metrics}"
    );
    app.store.release();
    assert_eq!(holder.await.unwrap().status, StatusCode::OK);
    assert_eq!(admission.in_flight(), 0, "the slot is released");
}

#[tokio::test]
async fn a_full_backlog_sheds_enqueues_only() {
    let mut admission = None;
    let app = app_wired(
        ApiConfig {
            max_queue_backlog: 5,
            ..Default::default()
        },
        |s| {
            admission = Some(s.admission.clone());
            s
        },
    )
    .await;
    let admission = admission.unwrap();
    app.enqueue(r#"{"kind":"noop"}"#).await;
    admission.backlog().set(6);
    for path in ["/v1/jobs", "/v1/process"] {
        let r = app.post_json(path, r#"{"kind":"noop"}"#).await;
        assert_eq!(r.header("retry-after"), Some("5"), "{path}");
        let p = r.assert_problem(503, "overloaded");
        assert!(p["detail"].as_str().unwrap().contains("backlog"), "{p}");
    }
    let r = app
        .post_json("/v1/jobs/batch", r#"{"jobs":[{"kind":"noop"}]}"#)
        .await;
    r.assert_problem(503, "overloaded");
    assert_eq!(app.get("/v1/jobs").await.status, StatusCode::OK);
    admission.backlog().set(5);
    app.enqueue(r#"{"kind":"noop"}"#).await;
}

#[tokio::test]
async fn each_api_key_has_a_bucket_of_its_own_inside_its_tenants() {
    let acme = TenantId::parse("acme").unwrap();
    let app = app_with(ApiConfig {
        api_keys: ["key-one", "key-two", "key-three"]
            .map(|k| ApiKey::new(acme.clone(), k))
            .to_vec(),
        rate_limits: RateLimitConfig {
            tenant_default: None,
            tenants: BTreeMap::from([(acme, Rate::parse("100/h:2").unwrap())]),
            per_key: Some(Rate::parse("1/h").unwrap()),
        },
        ..Default::default()
    })
    .await;
    let get = |key: &'static str| {
        app.send(
            Request::get("/v1/queues")
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap(),
        )
    };
    let r = get("key-one").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("ratelimit-limit"), Some("1"), "the tighter bucket");
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    let r = get("key-one").await;
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 3000, "the key's bucket refills in an hour: {retry}");
    assert_eq!(
        r.header("ratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    assert_eq!(r.header("ratelimit-limit"), Some("1"));
    r.assert_problem(429, "rate-limited");
    let r = get("key-two").await;
    assert_eq!(r.status, StatusCode::OK, "another key, another bucket");
    // Both keys' requests came out of the tenant's bucket of 2, so a third key with a full
    // bucket of its own is still refused, by the tenant's.
    let r = get("key-three").await;
    assert_eq!(
        r.header("ratelimit-limit"),
        Some("2"),
        "the tenant's bucket"
    );
    r.assert_problem(429, "rate-limited");
}

#[tokio::test]
async fn without_limits_no_ratelimit_headers_are_sent() {
    let app = app().await;
    let r = app.get("/v1/queues").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("ratelimit-limit").is_none());
}

#[tokio::test]
async fn readyz_is_503_while_the_database_breaker_is_open() {
    let breaker = CircuitBreaker::new(BreakerConfig {
        consecutive_failures: 2,
        open_for: Duration::from_secs(60),
        ..BreakerConfig::default()
    });
    let app = app_wired(ApiConfig::default(), |s| {
        s.with_database_breaker(breaker.clone())
    })
    .await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["checks"]["database_breaker"]["status"], "ok");
    for _ in 0..2 {
        breaker.try_acquire().unwrap().failure();
    }
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = r.json();
    assert_eq!(body["checks"]["database"]["status"], "ok", "{body}");
    assert_eq!(
        body["checks"]["database_breaker"]["status"], "error",
        "{body}"
    );
    assert!(
        body["checks"]["database_breaker"]["error"]
            .as_str()
            .unwrap()
            .contains("circuit open"),
        "{body}"
    );
}
