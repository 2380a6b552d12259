//! The protection layers of the HTTP API, through the real app: per-tenant rate limits
//! (429), the deadline naming the step it ran out in (504), injected database failures
//! (opaque 500s, `/readyz` down — the breaker is proven against a real outage in
//! `chaos_outage`), `/debug/chaos` switching faults on
//! and off at runtime, and admission control shedding while probes still get through.
//!
//! The tests that read counters from `/metrics` run Keel as a child process: the in-process
//! apps of this test binary share one metrics recorder (the SQLite and Postgres twins run
//! at once), so a count read there could be another test's.

use std::time::{Duration, Instant};

use keel_client::Client;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{
    Backend, Backing, JsonAnswer, TestApp, database, metric_value, spawn_app_with, within,
};

/// A `keel serve` child with a recorder of its own, and what keeps its database alive.
struct Process {
    keel: KeelProcess,
    http: reqwest::Client,
    client: Client,
    _backing: Backing,
}

impl Process {
    /// Starts a child on a fresh database for `backend`, with `env`; `None` when the
    /// Postgres tests are skipped.
    async fn start(backend: Backend, test: &str, env: &[(&str, &str)]) -> Option<Self> {
        let (url, backing) = database(backend, test).await?;
        let keel = KeelProcess::start(&url, env).await;
        let client = Client::new(keel.base.clone(), None).unwrap();
        Some(Self {
            keel,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            client,
            _backing: backing,
        })
    }

    fn url(&self, path: &str) -> String {
        self.keel.url(path)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The value of `metric` with `labels` in this process's `/metrics`.
    async fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.keel.metrics(&self.http).await, metric, labels)
    }

    async fn stop(self) {
        self.keel.stop(Duration::from_secs(30)).await;
    }
}

/// Asserts an RFC 9457 problem with `status` and problem type `slug`; returns the body.
async fn problem(resp: reqwest::Response, status: StatusCode, slug: &str) -> Value {
    assert_eq!(resp.status(), status);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ct, "application/problem+json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["type"],
        format!("https://keel.dev/problems/{slug}"),
        "{body}"
    );
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    body
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Sets the chaos settings through the admin listener; returns what it answered.
async fn put_chaos(app: &TestApp, settings: &Value) -> Value {
    let resp = app
        .http
        .put(app.admin_url("/debug/chaos"))
        .json(settings)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn a_tenant_over_its_rate_gets_429_with_the_ratelimit_headers(backend: Backend, test: &str) {
    // One request a minute with a burst of two: the third quick request is over, and the
    // bucket cannot refill between them however slow the machine.
    let Some(app) = Process::start(
        backend,
        test,
        &[("KEEL_RATE_LIMIT", "1/m"), ("KEEL_RATE_LIMIT_BURST", "2")],
    )
    .await
    else {
        return;
    };
    for remaining in ["1", "0"] {
        let resp = app.get("/v1/queues").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "ratelimit-limit").as_deref(), Some("2"));
        assert_eq!(
            header(&resp, "ratelimit-remaining").as_deref(),
            Some(remaining)
        );
    }
    let resp = app.post_json("/v1/jobs", &json!({"kind": "noop"})).await;
    let retry_after: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(header(&resp, "ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(header(&resp, "ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(
        header(&resp, "ratelimit-reset"),
        Some(retry_after.to_string())
    );
    let body = problem(resp, StatusCode::TOO_MANY_REQUESTS, "rate-limited").await;
    assert!(
        body["detail"].as_str().unwrap().contains("rate limit"),
        "{body}"
    );

    // Probes are not rate limited, and the refusal is counted, once.
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        app.metric("keel_requests_shed_total", &[("reason", "rate_limit")])
            .await,
        1.0
    );
    app.stop().await;
}
both_backends!(a_tenant_over_its_rate_gets_429_with_the_ratelimit_headers);

async fn a_slow_auth_check_ends_in_a_504_naming_the_auth_step(backend: Backend, test: &str) {
    // Auth takes a minute and the deadline is 300 ms: the 504 naming the auth step can only
    // be the deadline's (a patient server would answer 200 after the minute).
    let Some(app) = Process::start(
        backend,
        test,
        &[
            ("KEEL_REQUEST_TIMEOUT", "300ms"),
            ("KEEL_CHAOS", "auth.latency_ms=60000"),
        ],
    )
    .await
    else {
        return;
    };
    let resp = app.post_json("/v1/process", &json!({"kind": "noop"})).await;
    let body = problem(resp, StatusCode::GATEWAY_TIMEOUT, "deadline-exceeded").await;
    assert_eq!(body["detail"], "deadline exceeded while authenticating");
    assert!(body.get("job_id").is_none(), "no job was created: {body}");

    // Turning the fault off at runtime shows that nothing got past auth.
    let off = app
        .http
        .put(format!("{}/debug/chaos", app.keel.admin))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(off.status(), StatusCode::OK);
    let off: Value = off.json().await.unwrap();
    assert_eq!(off["auth"]["latency_ms"], 0);
    let page = app.client.list_jobs(&Default::default()).await.unwrap();
    assert!(page.jobs.is_empty(), "{page:?}");
    assert_eq!(
        app.metric("keel_requests_deadline_exceeded_total", &[("step", "auth")])
            .await,
        1.0
    );
    app.stop().await;
}
both_backends!(a_slow_auth_check_ends_in_a_504_naming_the_auth_step);

/// Background work fails too while faults are on; these tests want the store calls they
/// count to be their own requests, so maintenance and idle polling are slowed down past
/// the test's duration (each runs once at startup, before any fault is on).
fn quiet_background(a: &mut keel::ServeArgs) {
    a.maintenance_interval = Some("1h".into());
    a.poll_interval = Some("1h".into());
}

async fn database_failures_are_opaque_500s(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, quiet_background).await else {
        return;
    };
    // What DB_FAILURE=true sets at startup (see `db_failure_switch_…` below), switched on
    // after startup.
    put_chaos(
        &app,
        &json!({"store_read": {"error_rate": 1.0}, "store_write": {"error_rate": 1.0}}),
    )
    .await;

    // Injected failures are the database answering with an error: every request gets the
    // seed's opaque 500, however many there are (the breaker is for outages).
    for _ in 0..10 {
        let resp = app.post_json("/v1/process", &json!({"kind": "noop"})).await;
        let body = problem(resp, StatusCode::INTERNAL_SERVER_ERROR, "internal").await;
        assert_eq!(body["detail"], "internal error");
        let text = body.to_string();
        for secret in ["chaos", "refused", "store", "database", "sql"] {
            assert!(!text.contains(secret), "{secret:?} leaked: {text}");
        }
    }

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(header(&ready, "retry-after").is_some());
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["database"]["status"], "error", "{ready}");
    assert_eq!(
        ready["checks"]["database_breaker"]["status"], "ok",
        "{ready}"
    );
    app.stop().await;
}
both_backends!(database_failures_are_opaque_500s);

async fn the_db_failure_switch_fails_every_store_call_with_an_opaque_answer(
    backend: Backend,
    test: &str,
) {
    let Some(app) = spawn_app_with(backend, test, |a| a.db_failure = Some("true".into())).await
    else {
        return;
    };
    let settings: Value = app
        .http
        .get(app.admin_url("/debug/chaos"))
        .json_answer()
        .await;
    assert_eq!(settings["store_read"]["error_rate"], 1.0, "{settings}");
    assert_eq!(settings["store_write"]["error_rate"], 1.0, "{settings}");
    // The seed's experiment: `curl -X POST /v1/process` answers 500 with an opaque body,
    // every time (background work failing since startup does not change that).
    for _ in 0..5 {
        let resp = app.post_json("/v1/process", &json!({"kind": "noop"})).await;
        let body = problem(resp, StatusCode::INTERNAL_SERVER_ERROR, "internal").await;
        assert_eq!(body["detail"], "internal error");
        assert!(!body.to_string().contains("chaos"), "{body}");
    }
    app.stop().await;
}
both_backends!(the_db_failure_switch_fails_every_store_call_with_an_opaque_answer);

async fn chaos_set_at_runtime_fails_writes_and_clearing_it_recovers(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, quiet_background).await else {
        return;
    };
    let noop = json!({"kind": "noop"});
    let enqueue = || app.post_json("/v1/jobs", &noop);
    assert_eq!(enqueue().await.status(), StatusCode::CREATED);

    let on = put_chaos(&app, &json!({"store_write": {"error_rate": 1.0}})).await;
    assert_eq!(on["store_write"]["error_rate"], 1.0);
    for _ in 0..10 {
        assert_eq!(enqueue().await.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    let off = put_chaos(&app, &json!({})).await;
    assert_eq!(off["store_write"]["error_rate"], 0.0);
    // The API serves again without a restart.
    let recovered = within(
        Duration::from_secs(5),
        "recovery after chaos is cleared",
        async {
            loop {
                let resp = enqueue().await;
                if resp.status() == StatusCode::CREATED {
                    break Instant::now();
                }
                assert_eq!(
                    resp.status(),
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "only the injected failure until it is cleared"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    within(Duration::from_secs(5), "readiness after recovery", async {
        loop {
            let r = app.get("/readyz").await;
            if r.status() == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let page = app.client.list_jobs(&Default::default()).await.unwrap();
    assert_eq!(
        page.jobs.len(),
        2,
        "the job before the fault and the one after recovery (at {recovered:?}), nothing from during it"
    );
    app.stop().await;
}
both_backends!(chaos_set_at_runtime_fails_writes_and_clearing_it_recovers);

async fn above_the_concurrency_limit_requests_are_shed_but_probes_pass(
    backend: Backend,
    test: &str,
) {
    let Some(app) = Process::start(
        backend,
        test,
        &[
            ("KEEL_ADMISSION_LIMIT_INITIAL", "1"),
            ("KEEL_ADMISSION_LIMIT_MIN", "1"),
            ("KEEL_ADMISSION_LIMIT_MAX", "1"),
            ("KEEL_REQUEST_TIMEOUT", "10s"),
        ],
    )
    .await
    else {
        return;
    };
    let http = app.http.clone();
    let process_url = app.url("/v1/process");
    // Holds the only slot while its sleep job runs: 8 s, so that however slow the machine
    // the requests below meet the slot taken (nothing can free it sooner: a cancel would
    // itself need the slot). Retried if it lands while a probe below holds the slot for a
    // moment (then it is the one shed).
    let holder = tokio::spawn(async move {
        for _ in 0..200 {
            let resp = http
                .post(&process_url)
                .json(&json!({"kind": "sleep", "args": {"ms": 8000}}))
                .send()
                .await
                .unwrap();
            if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
                return resp;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the waiting request was never admitted");
    });
    let shed = within(
        Duration::from_secs(8),
        "a request shed at the limit",
        async {
            loop {
                let resp = app.get("/v1/queues").await;
                if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
                    break resp;
                }
                assert_eq!(resp.status(), StatusCode::OK);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    assert_eq!(header(&shed, "retry-after").as_deref(), Some("1"));
    let body = problem(shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("concurrency limit"),
        "{body}"
    );
    // Probes and scrapes are outside admission control.
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    assert!(
        app.metric("keel_requests_shed_total", &[("reason", "concurrency")])
            .await
            >= 1.0
    );

    let done = holder.await.unwrap();
    assert_eq!(done.status(), StatusCode::OK);
    let job: Value = done.json().await.unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    // The slot is free again.
    let resp = app.get("/v1/queues").await;
    assert_eq!(resp.status(), StatusCode::OK);
    app.stop().await;
}
both_backends!(above_the_concurrency_limit_requests_are_shed_but_probes_pass);

async fn enqueues_are_shed_while_the_backlog_is_over_its_cap(backend: Backend, test: &str) {
    let env = [
        ("KEEL_MAX_QUEUE_BACKLOG", "1"),
        ("KEEL_QUEUE_DEPTH_INTERVAL", "200ms"),
    ];
    let Some(app) = Process::start(backend, test, &env).await else {
        return;
    };
    // Scheduled jobs count towards the backlog. The figure is refreshed every 200 ms here,
    // so keep enqueuing until the cap is noticed.
    let later = json!({"kind": "noop", "delay_ms": 3_600_000});
    let shed = within(
        Duration::from_secs(15),
        "an enqueue shed for backlog",
        async {
            loop {
                let resp = app.post_json("/v1/jobs", &later).await;
                if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
                    break resp;
                }
                assert_eq!(resp.status(), StatusCode::CREATED);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    assert_eq!(header(&shed, "retry-after").as_deref(), Some("5"));
    let body = problem(shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    assert!(
        body["detail"].as_str().unwrap().contains("backlog"),
        "{body}"
    );
    // Only enqueues are refused: reads still work.
    let resp = app.get("/v1/jobs").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        app.metric("keel_requests_shed_total", &[("reason", "backlog")])
            .await,
        1.0
    );
    app.stop().await;
}
both_backends!(enqueues_are_shed_while_the_backlog_is_over_its_cap);
