//! The worker protocol (docs/workers.md) through a real HTTP client against the real app,
//! on both backends: lease with its long poll, heartbeat and cancel, complete and fail
//! (single and batched), release, fencing of stale tokens, tenancy, and the shutdown
//! answer of a waiting lease.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::both_backends;
use crate::helpers::{
    Backend, JsonAnswer, TestApp, metric_value, problem, spawn_app, spawn_app_with, within,
};

/// Waits until the lease poll of `worker` has looked once (and found the queue empty): the
/// registry lists a worker from its first lease request on.
async fn poll_is_waiting(app: &TestApp, worker: &str) {
    within(
        Duration::from_secs(20),
        "the poll to start waiting",
        async {
            loop {
                let w: Value = app.get("/v1/workers").await.json().await.unwrap();
                if w["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["id"] == worker)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
}

/// A queue name no other test uses: this process serves only `default`, so it is external.
fn external_queue() -> String {
    format!("ext-{}", uuid::Uuid::new_v4().simple())
}

async fn enqueue_on(app: &TestApp, queue: &str, kind: &str, args: Value) -> String {
    let r = app
        .post_json(
            "/v1/jobs",
            &json!({"queue": queue, "kind": kind, "args": args}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn lease(app: &TestApp, queue: &str, body: Value) -> Vec<Value> {
    let r = app
        .post_json(&format!("/v1/queues/{queue}/lease"), &body)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Value>().await.unwrap()["jobs"]
        .as_array()
        .unwrap()
        .clone()
}

async fn get(app: &TestApp, id: &str) -> Value {
    let r = app.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

fn token(job: &Value) -> String {
    job["lease"]["token"].as_str().unwrap().to_owned()
}

both_backends!(a_worker_leases_heartbeats_and_reports_outcomes);
async fn a_worker_leases_heartbeats_and_reports_outcomes(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let queue = external_queue();
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(enqueue_on(&app, &queue, "square", json!({"n": n})).await);
    }
    let held = lease(
        &app,
        &queue,
        json!({"worker": "w-1", "max": 3, "lease": "30s"}),
    )
    .await;
    assert_eq!(held.len(), 3);
    for job in &held {
        assert_eq!(job["state"], "running");
        assert_eq!(job["attempt"], 1);
        assert_eq!(job["lease"]["owner"], "w-1");
        assert_eq!(token(job).len(), 36, "the token is shown to the worker");
    }
    // The token is the worker's alone: a plain read never shows it.
    let read = get(&app, held[0]["id"].as_str().unwrap()).await;
    assert_eq!(read["state"], "running");
    assert!(read["lease"].get("token").is_none(), "{read}");

    let first = &held[0];
    let id = first["id"].as_str().unwrap();
    let r = app
        .post_json(
            &format!("/v1/jobs/{id}/heartbeat"),
            &json!({"token": token(first), "lease": "60s"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let beat: Value = r.json().await.unwrap();
    assert_eq!(beat["cancel_requested"], false);
    assert!(beat["expires_at"].is_string());

    let r = app
        .post_json(
            &format!("/v1/jobs/{id}/complete"),
            &json!({"token": token(first), "result": {"square": 0}}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["state"], "completed");
    assert_eq!(done["result"], json!({"square": 0}));

    // A batch: one good completion, one with a made-up token; each judged alone.
    let second = &held[1];
    let made_up = uuid::Uuid::new_v4().to_string();
    let r = app
        .post_json(
            "/v1/jobs/complete",
            &json!({"outcomes": [
                {"id": second["id"], "token": token(second), "result": {"square": 1}},
                {"id": held[2]["id"], "token": made_up, "result": 4},
            ]}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], 200);
    assert_eq!(results[0]["state"], "completed");
    assert_eq!(results[1]["status"], 409);
    assert!(
        results[1]["problem"]["type"]
            .as_str()
            .unwrap()
            .ends_with("/stale-lease"),
        "{answer}"
    );
    // The made-up token moved nothing.
    let third = get(&app, held[2]["id"].as_str().unwrap()).await;
    assert_eq!(third["state"], "running");
    assert_eq!(third["result"], Value::Null);

    // A failure with retry_in, then the release of nothing left: the third job fails.
    let r = app
        .post_json(
            "/v1/jobs/fail",
            &json!({"outcomes": [{"id": held[2]["id"], "token": token(&held[2]),
                                  "error": "upstream 503", "retry_in": "1h"}]}),
        )
        .await;
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["results"][0]["state"], "retryable", "{answer}");
    let failed = get(&app, held[2]["id"].as_str().unwrap()).await;
    assert_eq!(failed["errors"][0]["message"], "upstream 503");

    // The fourth: leased and given back unrun, its attempt not counted.
    let last = lease(&app, &queue, json!({"worker": "w-1", "max": 10})).await;
    assert_eq!(last.len(), 1);
    let lid = last[0]["id"].as_str().unwrap();
    let r = app
        .post_json(
            &format!("/v1/jobs/{lid}/release"),
            &json!({"token": token(&last[0])}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let released: Value = r.json().await.unwrap();
    assert_eq!(released["state"], "available");
    assert_eq!(released["attempt"], 0);

    let workers: Value = app.get("/v1/workers").await.json().await.unwrap();
    let w = &workers["workers"][0];
    assert_eq!(w["id"], "w-1");
    assert_eq!(w["queues"], json!([queue]));
    assert_eq!(
        w["jobs_held"], 0,
        "every job it held was reported: {workers}"
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric_value(&metrics, "keel_worker_leases_total", &[("queue", &queue)]),
        4.0
    );
    for (outcome, n) in [("completed", 2.0), ("retryable", 1.0), ("released", 1.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                "keel_worker_outcomes_total",
                &[("queue", &queue), ("outcome", outcome)]
            ),
            n,
            "{outcome}"
        );
    }
    app.stop().await;
}

both_backends!(stale_tokens_and_bad_requests_move_nothing);
async fn stale_tokens_and_bad_requests_move_nothing(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |a| {
        a.max_args_bytes = Some("1024".into());
    })
    .await
    else {
        return;
    };
    let queue = external_queue();
    let path = format!("/v1/queues/{queue}/lease");

    // Double complete: the second is refused and the first result stays.
    let id = enqueue_on(&app, &queue, "k", json!(1)).await;
    let job = &lease(&app, &queue, json!({"worker": "w"})).await[0];
    let t = token(job);
    let url = format!("/v1/jobs/{id}/complete");
    let r = app
        .post_json(&url, &json!({"token": t, "result": "first"}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let p = problem(
        app.post_json(&url, &json!({"token": t, "result": "second"}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("already completed"),
        "{p}"
    );
    assert_eq!(get(&app, &id).await["result"], "first");

    // Cancel while a worker holds it: the heartbeat says so, and its outcome is refused.
    let id = enqueue_on(&app, &queue, "k", json!(2)).await;
    let job = &lease(&app, &queue, json!({"worker": "w"})).await[0];
    let t = token(job);
    let r = app
        .post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app
        .post_json(&format!("/v1/jobs/{id}/heartbeat"), &json!({"token": t}))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let beat: Value = r.json().await.unwrap();
    assert_eq!(beat["cancel_requested"], true);
    assert_eq!(beat["expires_at"], Value::Null);
    let p = problem(
        app.post_json(&format!("/v1/jobs/{id}/complete"), &json!({"token": t}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("cancelled"), "{p}");
    assert_eq!(get(&app, &id).await["state"], "cancelled");

    // A result past the args limit: 413, and the job is still the worker's to report.
    let id = enqueue_on(&app, &queue, "k", json!(3)).await;
    let job = &lease(&app, &queue, json!({"worker": "w"})).await[0];
    let t = token(job);
    problem(
        app.post_json(
            &format!("/v1/jobs/{id}/complete"),
            &json!({"token": t, "result": "x".repeat(2000)}),
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    let still = get(&app, &id).await;
    assert_eq!(
        (still["state"].as_str(), still["attempt"].as_u64()),
        (Some("running"), Some(1))
    );
    let r = app
        .post_json(
            &format!("/v1/jobs/{id}/fail"),
            &json!({"token": t, "error": "too big", "permanent": true}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "discarded");

    // Made-up tokens and ids.
    let id = enqueue_on(&app, &queue, "k", json!(4)).await;
    let made_up = uuid::Uuid::new_v4().to_string();
    problem(
        app.post_json(
            &format!("/v1/jobs/{id}/complete"),
            &json!({"token": made_up}),
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    let unknown = uuid::Uuid::now_v7();
    problem(
        app.post_json(
            &format!("/v1/jobs/{unknown}/complete"),
            &json!({"token": made_up}),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let untouched = get(&app, &id).await;
    assert_eq!(
        (untouched["state"].as_str(), untouched["attempt"].as_u64()),
        (Some("available"), Some(0))
    );

    // Bad lease requests, each field named; a queue served here is refused.
    for (body, field) in [
        (json!({"worker": "w", "max": 0}), "max"),
        (json!({"worker": "w", "max": 1001}), "max"),
        (json!({"worker": "w", "wait": "31s"}), "wait"),
        (json!({"max": 1}), "worker"),
    ] {
        let p = problem(
            app.post_json(&path, &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(p["errors"][0]["field"], field, "{p}");
    }
    let p = problem(
        app.post_json("/v1/queues/default/lease", &json!({"worker": "w"}))
            .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(
        p["type"].as_str().unwrap().ends_with("/queue-served-here"),
        "{p}"
    );
    app.stop().await;
}

both_backends!(a_long_poll_waits_for_an_enqueue_and_ends_on_shutdown);
async fn a_long_poll_waits_for_an_enqueue_and_ends_on_shutdown(backend: Backend, test: &str) {
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    let queue = external_queue();
    // A short wait on an empty queue answers empty.
    assert!(
        lease(&app, &queue, json!({"worker": "idle", "wait": "100ms"}))
            .await
            .is_empty()
    );

    // A long one is woken by the enqueue and takes the job.
    let poll = {
        let http = app.http.clone();
        let url = app.url(&format!("/v1/queues/{queue}/lease"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"worker": "poller", "wait": "30s"}))
                .send()
                .await
                .unwrap()
        })
    };
    // The poll has asked once (and found nothing) when the registry knows the worker.
    poll_is_waiting(&app, "poller").await;
    let id = enqueue_on(&app, &queue, "k", json!({})).await;
    let r = within(Duration::from_secs(25), "the woken poll", poll)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value = r.json().await.unwrap();
    assert_eq!(got["jobs"][0]["id"], id.as_str());

    // A poll waiting when the server stops answers empty at once.
    let poll = {
        let http = app.http.clone();
        let url = app.url(&format!("/v1/queues/{queue}/lease"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"worker": "stopper", "wait": "30s"}))
                .send()
                .await
                .unwrap()
        })
    };
    poll_is_waiting(&app, "stopper").await;
    let stopping = tokio::spawn(app.stop());
    let r = within(
        Duration::from_secs(25),
        "the poll's answer on shutdown",
        poll,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["jobs"], json!([]));
    within(Duration::from_secs(25), "the stop", stopping)
        .await
        .unwrap();
}

both_backends!(a_tenant_worker_leases_only_its_tenants_jobs);
async fn a_tenant_worker_leases_only_its_tenants_jobs(backend: Backend, test: &str) {
    let digest = crate::bad_input::digest;
    let keys = format!(
        "acme={},globex={}",
        digest("acme-key-000000001"),
        digest("globex-key-0000001"),
    );
    let Some(app) = spawn_app_with(backend, test, |a| a.api_keys = Some(keys)).await else {
        return;
    };
    let queue = external_queue();
    for key in ["acme-key-000000001", "globex-key-0000001"] {
        let r = app
            .post_json_as("/v1/jobs", key, &json!({"queue": queue, "kind": "k"}))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let path = format!("/v1/queues/{queue}/lease");
    let r = app
        .post_json_as(
            &path,
            "acme-key-000000001",
            &json!({"worker": "acme-w", "max": 10}),
        )
        .await;
    let jobs: Value = r.json().await.unwrap();
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["tenant"], "acme");
    // The other tenant's worker sees neither acme's worker nor its job's lease.
    let seen: Value = app
        .http
        .get(app.url("/v1/workers"))
        .bearer_auth("globex-key-0000001")
        .json_answer()
        .await;
    assert_eq!(seen["workers"], json!([]));
    let id = jobs[0]["id"].as_str().unwrap();
    let r = app
        .post_json_as(
            &format!("/v1/jobs/{id}/complete"),
            "globex-key-0000001",
            &json!({"token": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "another tenant's job is not revealed"
    );
    app.stop().await;
}

/// keel-client's worker leases ahead of its slots (prefetch). With its two slots held by
/// handlers that wait on a gate, it holds more leases than slots; a stop then releases the
/// buffered jobs at once (back to `available`, no attempt used) while the running ones
/// finish within the grace period; a second worker runs the rest. Every job ran exactly
/// once and completed on its first attempt. Over HTTP (long polls) and over gRPC (one
/// streaming lease per queue) alike.
async fn the_rust_worker_releases_its_prefetched_jobs_at_stop(backend: Backend, test: &str) {
    releases_prefetched_jobs_at_stop(backend, test, false).await;
}

both_backends!(the_rust_worker_releases_its_prefetched_jobs_at_stop);

async fn the_rust_grpc_worker_releases_its_prefetched_jobs_at_stop(backend: Backend, test: &str) {
    releases_prefetched_jobs_at_stop(backend, test, true).await;
}

both_backends!(the_rust_grpc_worker_releases_its_prefetched_jobs_at_stop);

async fn releases_prefetched_jobs_at_stop(backend: Backend, test: &str, over_grpc: bool) {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use keel_client::worker::{JobFailure, Worker, WorkerConfig};
    use keel_client::{JobIn, JobListQuery, JobOut};
    use keel_core::JobState;
    use tokio_util::sync::CancellationToken;

    const JOBS: usize = 12;
    let Some(app) = spawn_app(backend, test).await else {
        return;
    };
    for n in 0..JOBS {
        let job = JobIn {
            queue: Some("ext".to_owned()),
            ..JobIn::new("gated", json!({ "n": n }))
        };
        app.client.enqueue(&job, None).await.unwrap();
    }
    let (gate, opened) = tokio::sync::watch::channel(false);
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let worker = |runs: Arc<Mutex<HashMap<String, usize>>>| {
        let opened = opened.clone();
        Worker::new(
            app.client.clone(),
            WorkerConfig::new(["ext"])
                .concurrency(2)
                .wait(Duration::from_millis(500))
                .grace(Duration::from_secs(30)),
        )
        .handle("gated", move |ctx, _| {
            let (runs, mut opened) = (Arc::clone(&runs), opened.clone());
            async move {
                *runs
                    .lock()
                    .unwrap()
                    .entry(ctx.job.id.to_string())
                    .or_default() += 1;
                let _ = opened.wait_for(|open| *open).await;
                Ok::<_, JobFailure>(Value::Null)
            }
        })
    };
    let jobs = |state: Option<JobState>| {
        let client = app.client.clone();
        async move {
            client
                .list_jobs(&JobListQuery {
                    queue: Some("ext".to_owned()),
                    state,
                    limit: Some(100),
                    ..JobListQuery::default()
                })
                .await
                .unwrap()
                .jobs
        }
    };

    let grpc = format!("http://{}", app.grpc_addr.expect("gRPC is on in tests"));
    let run = |w: Worker, stop: CancellationToken| {
        let grpc = grpc.clone();
        async move {
            if over_grpc {
                w.run_grpc(&grpc, stop).await
            } else {
                w.run(stop).await
            }
        }
    };
    let stop = CancellationToken::new();
    let first = tokio::spawn(run(worker(Arc::clone(&runs)), stop.clone()));
    let running: Vec<JobOut> = within(
        Duration::from_secs(30),
        "both slots busy and a job buffered",
        async {
            loop {
                let running = jobs(Some(JobState::Running)).await;
                if runs.lock().unwrap().len() == 2 && running.len() > 2 {
                    return running;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    stop.cancel();
    // The buffered jobs come back at once, unrun, while the slots' jobs still run.
    within(
        Duration::from_secs(30),
        "the buffered jobs released",
        async {
            loop {
                let running = jobs(Some(JobState::Running)).await;
                if running.len() == 2 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    for job in jobs(Some(JobState::Available)).await {
        assert_eq!(job.attempt, 0, "a released job used an attempt: {job:?}");
    }
    gate.send(true).unwrap();
    let report = first.await.unwrap().unwrap();
    assert_eq!(report.completed, 2, "{report:?}");
    assert!(
        report.released as usize >= running.len() - 2,
        "{report:?}, {} leased at the stop",
        running.len()
    );

    let stop = CancellationToken::new();
    let second = tokio::spawn(run(worker(Arc::clone(&runs)), stop.clone()));
    let all = within(Duration::from_secs(30), "every job completing", async {
        loop {
            let all = jobs(None).await;
            if all.len() == JOBS && all.iter().all(|j| j.state == JobState::Completed) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.cancel();
    second.await.unwrap().unwrap();
    let runs = runs.lock().unwrap().clone();
    for job in &all {
        assert_eq!(job.attempt, 1, "{job:?}");
        assert_eq!(runs.get(&job.id.to_string()), Some(&1), "{job:?}");
    }
    app.stop().await;
}
