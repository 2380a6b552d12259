//! Chaos, slow dependency (G7): with the seed's `SLOW_AUTH` and with latency injected into
//! store writes, requests end in a `504` that names the slow step, and the slow step's work
//! is dropped with the request (nothing it would have written is stored); and a client that
//! goes away takes its work with it: the server's count of live tasks returns to its
//! baseline long before the slow store call could have ended.
//!
//! Nothing here is timed: the injected delays are far longer than the deadlines, so the
//! answers (`504`, not the `201` a patient server would give) and the stored rows tell what
//! cut the work short.

use std::time::Duration;

use keel_client::{Client, JobListQuery};
use serde_json::json;

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{Backend, database, metric_value, within};

const DEADLINE: Duration = Duration::from_millis(800);

async fn post(http: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let resp = http
        .post(url)
        .json(&json!({"kind": "noop"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Replaces the injected faults through the admin API; calls that start afterwards get them.
async fn put_chaos(http: &reqwest::Client, keel: &KeelProcess, settings: serde_json::Value) {
    let put = http
        .put(format!("{}/debug/chaos", keel.admin))
        .json(&settings)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
}

/// Clears every fault, which also ends the latencies being injected into background work
/// (maintenance, leases), so the process can stop within its grace.
async fn clear_chaos(http: &reqwest::Client, keel: &KeelProcess) {
    put_chaos(http, keel, json!({})).await;
}

async fn slow_auth_and_slow_store_answer_504_naming_the_step(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let http = reqwest::Client::new();
    let deadline = format!("{}ms", DEADLINE.as_millis());

    // The seed's experiment: SLOW_AUTH=true, then POST /v1/process.
    let keel = KeelProcess::start(
        &url,
        &[
            ("SLOW_AUTH", "true"),
            ("KEEL_REQUEST_TIMEOUT", deadline.as_str()),
        ],
    )
    .await;
    for _ in 0..3 {
        let (status, body) = post(&http, &keel.url("/v1/process")).await;
        assert_eq!(status, 504, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("authenticating"),
            "the 504 must name the auth step: {body}"
        );
        assert!(body.get("job_id").is_none(), "no job got past auth: {body}");
    }

    // Latency injected into every store write, switched at runtime on the admin listener
    // (which also clears SLOW_AUTH): enqueues time out in the store step.
    let set = http
        .put(format!("{}/debug/chaos", keel.admin))
        .json(&json!({"store_write": {"latency_ms": 60000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200, "{}", set.text().await.unwrap());
    for _ in 0..3 {
        let (status, body) = post(&http, &keel.url("/v1/jobs")).await;
        assert_eq!(status, 504, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("database"),
            "the 504 must name the store step: {body}"
        );
    }
    // The writes were dropped with their requests: none of the six requests above left a
    // job behind (reads are not slowed, so the listing answers).
    let client = Client::new(keel.base.clone(), None).unwrap();
    let page = client.list_jobs(&JobListQuery::default()).await.unwrap();
    assert!(page.jobs.is_empty(), "{:?}", page.jobs);
    clear_chaos(&http, &keel).await;
    keel.stop(Duration::from_secs(15)).await;
}

both_backends!(slow_auth_and_slow_store_answer_504_naming_the_step);

async fn alive_tasks(http: &reqwest::Client, keel: &KeelProcess) -> f64 {
    let text = keel.metrics(http).await;
    metric_value(&text, "keel_tasks_alive", &[])
}

async fn a_client_that_leaves_takes_its_work_with_it(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    // The deadline is two minutes: only the client's departure can end the work done for it
    // within the 40 s allowed below.
    let keel = KeelProcess::start(&url, &[("KEEL_REQUEST_TIMEOUT", "2m")]).await;
    let http = reqwest::Client::new();
    let baseline = within(Duration::from_secs(15), "a first tasks gauge", async {
        loop {
            let v = alive_tasks(&http, &keel).await;
            if v > 0.0 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Store writes take a minute (chaos's longest) from now on. Set only now, not at
    // startup: the background writes started at startup (leases, reaper, schedules) would
    // otherwise all land a minute after it, and on a slow machine inside the window below,
    // opening pool connections (each a task) that have nothing to do with the clients.
    put_chaos(&http, &keel, json!({"store_write": {"latency_ms": 60000}})).await;

    // 50 clients that give up after 12 s: two of the gauge's 5 s refreshes, so the gauge
    // must first show their connections' tasks alive, then show them gone. They leave at
    // 12 s and the settle guard below is 40 s: both well inside the 60 s the store takes,
    // so only their departure can end the work.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(12))
        .build()
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let impatient = impatient.clone();
        let url = keel.url("/v1/jobs");
        calls.spawn(async move {
            impatient
                .post(url)
                .json(&json!({"kind": "noop"}))
                .send()
                .await
                .is_err()
        });
    }
    let busy = within(
        Duration::from_secs(12),
        "the gauge counting the clients' tasks",
        async {
            loop {
                let v = alive_tasks(&http, &keel).await;
                if v >= baseline + 40.0 {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    let mut gave_up = 0;
    while let Some(r) = calls.join_next().await {
        gave_up += usize::from(r.unwrap());
    }
    assert_eq!(gave_up, 50, "every client must have given up waiting");

    // Long before the store latency is over, the server holds no task for them. A few tasks
    // of slack, far below the 50 that would stay: the baseline was read before this test's
    // own keep-alive connection to the admin port existed, and a background read may have
    // opened a pool connection (each is a task) since.
    let settled = within(
        Duration::from_secs(40),
        "tasks returning to baseline",
        async {
            loop {
                let v = alive_tasks(&http, &keel).await;
                if v <= baseline + 5.0 {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    eprintln!(
        "[{test}] tasks alive: baseline {baseline}, {busy} with 50 waiting clients, back to {settled} after they left"
    );
    clear_chaos(&http, &keel).await;
    keel.stop(Duration::from_secs(15)).await;
}

both_backends!(a_client_that_leaves_takes_its_work_with_it);
