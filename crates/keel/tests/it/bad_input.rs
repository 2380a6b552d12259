//! Bad input never hurts anyone else: each probe that once hurt other users (found by trying
//! Keel as an attacker would) answers a precise `4xx` problem+json, stores nothing, and
//! leaves the server healthy: afterwards `/readyz` is `200`, the database breaker closed,
//! and a normal enqueue `201`.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{
    Backend, JsonAnswer, TestApp, database, metric_value, problem, spawn_app, spawn_app_with,
    within,
};

/// The fields a `422` names.
fn fields(body: &Value) -> Vec<String> {
    body["errors"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|f| f["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `/readyz` is `200` with the breaker closed, and a plain job is accepted.
async fn still_healthy(app: &TestApp) {
    let ready = app.get("/readyz").await;
    let status = ready.status();
    let body: Value = ready.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["database_breaker"]["status"], "ok", "{body}");
    let resp = app.post_json("/v1/jobs", &json!({"kind": "noop"})).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

/// `[[[…0…]]]`, `depth` levels deep.
fn nested(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

async fn data_no_backend_can_store_is_a_422_that_trips_nothing(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let raw = |body: String| {
        app.http
            .post(app.url("/v1/jobs"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Many times over: once these opened the database breaker on Postgres.
    for _ in 0..10 {
        let resp = raw(r#"{"kind":"noop","tags":["a\u0000b"]}"#.to_owned())
            .await
            .unwrap();
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&body), ["tags[0]"], "{body}");
        let resp = raw(format!(r#"{{"kind":"noop","args":{}}}"#, nested(100_000)))
            .await
            .unwrap();
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&body), ["args"], "{body}");
        assert!(body.to_string().contains("deeper than 64"), "{body}");
    }
    // The limit is exactly 64 levels; a job at it reads back.
    let resp = raw(format!(r#"{{"kind":"noop","args":{}}}"#, nested(65)))
        .await
        .unwrap();
    problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    let resp = raw(format!(r#"{{"kind":"echo","args":{}}}"#, nested(64)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let back = app.client.get_job(id).await.unwrap();
    assert_eq!(back.args.to_string(), nested(64));
    // A lone surrogate is not text.
    let resp = raw(r#"{"kind":"noop","args":{"a":"\ud800"}}"#.to_owned())
        .await
        .unwrap();
    let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(body.to_string().contains("surrogate"), "{body}");
    // NUL inside args is a character like another: stored as sent, on both backends.
    let resp = raw(r#"{"kind":"echo","args":{"a":"x\u0000y"}}"#.to_owned())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.unwrap();
    let done = app
        .wait_for(
            created["id"].as_str().unwrap(),
            Duration::from_secs(30),
            |j| j.state == "completed",
        )
        .await;
    assert_eq!(done.result_value(), Some(json!({"a": "x\u{0}y"})));
    // A schedule whose ticks could never be stored is refused up front.
    let resp = app
        .http
        .put(app.url("/v1/schedules/nul-tag"))
        .json(&json!({"cron": "* * * * *", "job": {"kind": "noop", "tags": ["a\u{0}b"]}}))
        .send()
        .await
        .unwrap();
    let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        fields(&body).iter().any(|f| f.ends_with("tags[0]")),
        "{body}"
    );
    still_healthy(&app).await;
    app.stop().await;
}
both_backends!(data_no_backend_can_store_is_a_422_that_trips_nothing);

async fn jobs_that_can_never_run_are_refused_at_enqueue(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.webhook_allow_private = Some("false".into());
    })
    .await
    else {
        return;
    };
    // `default` runs here with the built-in executors: a kind without a handler never runs.
    let resp = app
        .post_json("/v1/jobs", &json!({"kind": "resize-image"}))
        .await;
    let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(fields(&body), ["kind"], "{body}");
    assert!(
        body.to_string().contains("sleep"),
        "names the kinds that run: {body}"
    );
    // Another queue is external workers' business: any kind goes.
    let resp = app
        .post_json(
            "/v1/jobs",
            &json!({"kind": "resize-image", "queue": "images"}),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    for (kind, args) in [
        ("sleep", json!({"ms": -1})),
        ("sleep", json!({})),
        ("fail", json!({"times": -1})),
        ("webhook", json!({"url": "ftp://example.com/x"})),
        ("webhook", json!({"url": "http://127.0.0.1:9/hook"})),
    ] {
        let resp = app
            .post_json("/v1/jobs", &json!({"kind": kind, "args": args}))
            .await;
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&body), ["args"], "{kind} {args}: {body}");
    }
    // A job that could not start before the request's deadline: /v1/process, which runs
    // its job now, refuses run times at once instead of ending in a certain 504.
    for delayed in [
        json!({"kind": "noop", "delay_ms": 3_600_000}),
        json!({"kind": "noop", "run_at": "2100-01-01T00:00:00Z"}),
    ] {
        let resp = app.post_json("/v1/process", &delayed).await;
        let body = problem(resp, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&body).len(), 1, "{body}");
        assert!(body.to_string().contains("POST /v1/jobs"), "{body}");
    }
    let page = app.client.list_jobs(&Default::default()).await.unwrap();
    assert_eq!(page.jobs.len(), 1, "only the external-queue job was stored");
    still_healthy(&app).await;
    app.stop().await;
}
both_backends!(jobs_that_can_never_run_are_refused_at_enqueue);

/// `keel hash-key` of each test key.
pub(crate) fn digest(key: &str) -> String {
    keel_api::hash_api_key(key)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn tenants_see_and_steer_only_their_own_work(backend: Backend, test: &str) {
    let keys = format!(
        "acme={},globex={},ops={}:operator",
        digest("acme-key-000000001"),
        digest("globex-key-0000001"),
        digest("ops-key-00000000001")
    );
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.api_keys = Some(keys);
        // Nothing runs: the counts below stay as enqueued.
        a.queues = Some("elsewhere:1".into());
    })
    .await
    else {
        return;
    };
    let as_key = |key: &'static str, path: &str, body: Value| {
        app.http
            .post(app.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    for _ in 0..2 {
        let r = as_key("acme-key-000000001", "/v1/jobs", json!({"kind": "noop"}))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    for _ in 0..3 {
        let r = as_key(
            "globex-key-0000001",
            "/v1/jobs",
            json!({"kind": "noop", "queue": "globex-only"}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = as_key("globex-key-0000001", "/v1/jobs", json!({"kind": "noop"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // acme sees the one queue it uses, counting its own two jobs only.
    let queues: Value = app
        .http
        .get(app.url("/v1/queues"))
        .bearer_auth("acme-key-000000001")
        .json_answer()
        .await;
    let names: Vec<&str> = queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default"], "{queues}");
    assert_eq!(queues[0]["counts"]["available"], 2, "{queues}");

    // A tenant cannot stop a queue every tenant shares; an operator can.
    let r = as_key("acme-key-000000001", "/v1/queues/default/pause", json!({}))
        .await
        .unwrap();
    let body = problem(r, StatusCode::FORBIDDEN).await;
    assert!(
        body["detail"].as_str().unwrap().contains("operator"),
        "{body}"
    );
    let r = as_key("ops-key-00000000001", "/v1/queues/default/pause", json!({}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let all: Value = app
        .http
        .get(app.url("/v1/queues"))
        .bearer_auth("ops-key-00000000001")
        .json_answer()
        .await;
    let default = all
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "default")
        .unwrap();
    assert_eq!(default["counts"]["available"], 3, "every tenant's: {all}");
    assert_eq!(default["paused"], true);
    // Nor can a tenant start it again behind the operator's back.
    let r = as_key("acme-key-000000001", "/v1/queues/default/resume", json!({}))
        .await
        .unwrap();
    problem(r, StatusCode::FORBIDDEN).await;
    let r = as_key(
        "ops-key-00000000001",
        "/v1/queues/default/resume",
        json!({}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // An operator acts for any tenant it names.
    let r = as_key(
        "ops-key-00000000001",
        "/v1/jobs",
        json!({"kind": "noop", "tenant": "acme"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    app.stop().await;
}
both_backends!(tenants_see_and_steer_only_their_own_work);

/// Series of `metric` in a Prometheus text exposition, by their label sets.
fn series(text: &str, metric: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_owned()))
        .collect()
}

async fn made_up_queues_and_kinds_add_no_metric_series(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    // A process of its own: its /metrics counts only this test's series.
    let keel = KeelProcess::start(&url, &[("KEEL_QUEUES", "default:2")]).await;
    let http = reqwest::Client::new();
    let jobs: Vec<Value> = (0..1000)
        .map(|i| json!({"kind": format!("kind-{i}"), "queue": format!("queue-{i}")}))
        .collect();
    let resp = http
        .post(keel.url("/v1/jobs/batch"))
        .json(&json!({ "jobs": jobs }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = http
        .post(keel.url("/v1/jobs"))
        .json(&json!({"kind": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // The depth gauges are refreshed every few seconds: wait for the made-up queues to be
    // counted (under `other`).
    let text = within(
        Duration::from_secs(60),
        "the depth gauges counting them",
        async {
            loop {
                let text = keel.metrics(&http).await;
                let other = metric_value(
                    &text,
                    "keel_queue_depth",
                    &[("queue", "other"), ("state", "available")],
                );
                if other == 1000.0 {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    let enqueued = series(&text, "keel_jobs_enqueued_total");
    assert_eq!(
        enqueued.len(),
        2,
        "1 000 made-up names, two series: {enqueued:?}"
    );
    let count = |queue, kind| {
        metric_value(
            &text,
            "keel_jobs_enqueued_total",
            &[("queue", queue), ("kind", kind)],
        )
    };
    assert_eq!(count("other", "other"), 1000.0);
    assert_eq!(count("default", "noop"), 1.0);
    let depth = series(&text, "keel_queue_depth");
    let queues: BTreeSet<&str> = depth
        .iter()
        .filter_map(|s| s.split("queue=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(queues, BTreeSet::from(["default", "other"]), "{depth:?}");
    assert!(
        !text.contains("queue-17"),
        "a client-chosen name reached /metrics"
    );
    keel.stop(Duration::from_secs(30)).await;
}
both_backends!(made_up_queues_and_kinds_add_no_metric_series);

/// Reads until the server closes the connection (or the guard gives up); returns what was
/// read.
async fn until_closed(stream: &mut TcpStream, what: &str) -> String {
    within(Duration::from_secs(60), what, async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// The status code and body of a raw HTTP/1.1 response.
fn status_and_body(response: &str) -> (u16, Value) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{head}"
    );
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_are_closed_and_framing_errors_are_4xx() {
    let Some((url, _backing)) = database(Backend::Sqlite, "bad_input::connections").await else {
        return;
    };
    let keel = KeelProcess::start(
        &url,
        &[
            ("KEEL_HEADER_READ_TIMEOUT", "1s"),
            ("KEEL_IDLE_TIMEOUT", "2s"),
            ("KEEL_REQUEST_TIMEOUT", "1s"),
        ],
    )
    .await;
    let addr = keel.base.trim_start_matches("http://").to_owned();

    // Slowloris: a head trickled a header line at a time, never finished, is cut off; had
    // the server waited for it, the guard (60 s) would fail the test.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n")
        .await
        .unwrap();
    let trickle = async {
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    };
    within(
        Duration::from_secs(60),
        "the trickled head to be cut off",
        trickle,
    )
    .await;

    // An idle connection, before its first request and after one.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(
        until_closed(&mut idle, "an idle connection to close").await,
        ""
    );
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n")
        .await
        .unwrap();
    let answered = until_closed(&mut kept, "a kept-alive idle connection to close").await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // A body shorter than its Content-Length: the client's delay, a 408.
    let mut short = TcpStream::connect(&addr).await.unwrap();
    short
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"kind\"",
        )
        .await
        .unwrap();
    let (status, body) = status_and_body(&until_closed(&mut short, "the 408").await);
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["type"], "https://keel.dev/problems/request-timeout");

    // A chunk announced at 2^64-1 bytes that never comes: the same 408, not a 5xx.
    let mut huge = TcpStream::connect(&addr).await.unwrap();
    huge.write_all(
        b"POST /v1/jobs HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n\
          Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{",
    )
    .await
    .unwrap();
    let (status, body) = status_and_body(&until_closed(&mut huge, "the chunked answer").await);
    assert_eq!(status, 408, "framing is the client's problem: {body}");
    assert_eq!(body["type"], "https://keel.dev/problems/request-timeout");

    // A chunk size that is not hex: the body cannot be read, a 400 problem+json.
    let mut garbled = TcpStream::connect(&addr).await.unwrap();
    garbled
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, body) =
        status_and_body(&until_closed(&mut garbled, "the garbled-chunk answer").await);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["status"], 400, "problem+json: {body}");

    let http = reqwest::Client::new();
    let ok = http.get(keel.url("/readyz")).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    keel.stop(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_a_503() {
    let Some((url, _backing)) = database(Backend::Sqlite, "bad_input::connection_cap").await else {
        return;
    };
    let keel = KeelProcess::start(
        &url,
        &[("KEEL_MAX_CONNECTIONS", "4"), ("KEEL_IDLE_TIMEOUT", "60s")],
    )
    .await;
    let addr = keel.base.trim_start_matches("http://").to_owned();
    // Four connections, each proven accepted by a request answered on it.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let mut fifth = TcpStream::connect(&addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keel\r\n\r\n")
        .await;
    let refused = until_closed(&mut fifth, "the refusal").await;
    let (status, body) = status_and_body(&refused);
    assert_eq!(status, 503, "{body}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    assert_eq!(body["type"], "https://keel.dev/problems/overloaded");
    // A slot freed is a slot to use.
    drop(held.pop());
    let http = reqwest::Client::new();
    let ok = within(
        Duration::from_secs(30),
        "a connection after one closed",
        async {
            loop {
                match http.get(keel.url("/readyz")).send().await {
                    Ok(r) if r.status() == StatusCode::OK => return r,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        },
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    drop(held);
    keel.stop(Duration::from_secs(30)).await;
}
