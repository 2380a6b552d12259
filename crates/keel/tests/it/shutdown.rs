//! G6 end to end: a real `keel serve`, a real signal (SIGTERM, and SIGINT as a terminal's
//! Ctrl-C sends it), both backends. Each step is checked by what can be observed from
//! outside, in the order G6 promises:
//!
//! 1. readiness fails at once: `/readyz` answers 503 on a new connection while the listener
//!    still accepts (`KEEL_SHUTDOWN_DELAY`) and requests are in flight;
//! 2. no lease is taken after the signal: a job enqueued then, with worker slots free,
//!    is never started (its row is never leased);
//! 3. the listener closes: a new connection is refused;
//! 4. in-flight requests finish: every `/v1/process` waiting on a running job gets it
//!    completed;
//! 5. jobs that outlast the grace are released with their attempt not counted;
//! 6. the store is closed (the process says so, after the drain began), and the exit code
//!    is 0.

use std::sync::Arc;
use std::time::Duration;

use keel_client::{Client, JobIn, JobListQuery};
use keel_core::store::ListParams;
use keel_core::{JobId, JobState, QueueName, SystemClock};
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::child::KeelProcess;
use crate::helpers::{Backend, database, within};

/// Free slots in `default` beyond the jobs the in-flight requests wait on, so a lease taken
/// after the signal would have somewhere to run.
const DEFAULT_SLOTS: usize = 60;
const WAITING_REQUESTS: usize = 50;
const LONG_JOBS: usize = 20;

/// Jobs of `queue` in `state`, through the API.
async fn count(client: &Client, queue: &str, state: &str) -> usize {
    client
        .list_jobs(&JobListQuery {
            queue: Some(queue.into()),
            state: Some(state.parse().expect("a job state")),
            limit: Some(1000),
            ..JobListQuery::default()
        })
        .await
        .unwrap()
        .jobs
        .len()
}

/// Polls until `queue` has `n` running jobs.
async fn until_running(client: &Client, queue: &str, n: usize) {
    within(Duration::from_secs(60), "jobs to start", async {
        while count(client, queue, "running").await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn a_signal_drains_in_order_and_exits_0(backend: Backend, test: &str, signal: Signal) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let queues = format!("default:{DEFAULT_SLOTS},long:{LONG_JOBS}");
    let mut keel = KeelProcess::start(
        &url,
        &[
            ("KEEL_QUEUES", queues.as_str()),
            ("KEEL_REQUEST_TIMEOUT", "20s"),
            // Steps 1 and 2 below happen inside this delay: a few requests, with seconds
            // to spare on a loaded machine.
            ("KEEL_SHUTDOWN_DELAY", "8s"),
            ("KEEL_SHUTDOWN_GRACE", "10s"),
        ],
    )
    .await;
    let client = Client::new(keel.base.clone(), None).unwrap();
    let addr = keel.base.trim_start_matches("http://").to_owned();
    // A new connection per request: the readiness and refusal checks are about what a new
    // client meets, not a kept-alive connection.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // Jobs that cannot finish within the grace period.
    for _ in 0..LONG_JOBS {
        let job = JobIn {
            queue: Some("long".into()),
            ..JobIn::new("sleep", json!({"ms": 120_000}))
        };
        client.enqueue(&job, None).await.unwrap();
    }
    until_running(&client, "long", LONG_JOBS).await;

    // Requests in flight, each waiting on a job that is running when the signal comes.
    let mut requests = Vec::new();
    for _ in 0..WAITING_REQUESTS {
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            client
                .process(&JobIn::new("sleep", json!({"ms": 4000})))
                .await
        }));
    }
    until_running(&client, "default", WAITING_REQUESTS).await;
    let ready = fresh.get(keel.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "ready before the signal");

    keel.signal(signal);

    // 1. Readiness fails while the listener still accepts.
    let not_ready = within(Duration::from_secs(30), "/readyz turning 503", async {
        loop {
            let r = fresh
                .get(keel.url("/readyz"))
                .send()
                .await
                .expect("the listener accepts during the shutdown delay");
            if r.status() == 503 {
                return r;
            }
            assert_eq!(r.status(), 200);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(not_ready.headers().contains_key("retry-after"));
    let body: serde_json::Value = not_ready.json().await.unwrap();
    assert_eq!(body["draining"], true, "{body}");

    // 2. A job enqueued now is accepted (durable for another replica or the next start)
    //    but never leased here, although `default` has free slots.
    let after = fresh
        .post(keel.url("/v1/jobs"))
        .json(&json!({"kind": "noop"}))
        .send()
        .await
        .expect("the listener accepts during the shutdown delay");
    assert_eq!(after.status(), 201);
    let after: serde_json::Value = after.json().await.unwrap();
    let after = JobId::parse(after["id"].as_str().unwrap()).unwrap();

    // 3. The listener closes: a new connection is refused. A connection that reached the
    //    listen backlog as the socket closed is reset instead: refused all the same.
    within(Duration::from_secs(30), "the listener to close", async {
        loop {
            match tokio::net::TcpStream::connect(&addr).await {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return;
                }
                Err(e) => panic!("connecting to {addr}: {e}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;

    // 4. Every in-flight request gets its job, completed.
    for r in requests {
        let job = r
            .await
            .unwrap()
            .expect("an in-flight request failed during shutdown");
        assert_eq!(job.state, "completed", "{job:?}");
    }

    // 6. Exit 0, having closed the store after the drain began.
    let exit = keel
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("keel exited");
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    let messages = keel.log_messages();
    let at = |m: &str| {
        messages
            .iter()
            .position(|l| l.starts_with(m))
            .unwrap_or_else(|| panic!("no {m:?} in the log: {messages:#?}"))
    };
    let drained = at("shutdown requested");
    let closed_listener = at("API listener closed");
    let closed_store = at("store closed");
    assert!(
        drained < closed_listener && closed_listener < closed_store,
        "out of order: {messages:#?}"
    );

    // 2 and 5, in the rows.
    let store = keel_store::open(
        &DatabaseUrl::parse(&url).unwrap(),
        SqliteOptions::default(),
        PgOptions::for_tests(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap()
    .0;
    let never_leased = store.get(after).await.unwrap();
    assert_eq!(never_leased.state, JobState::Available, "{never_leased:?}");
    assert_eq!(never_leased.attempt, 0);
    assert!(never_leased.started_at.is_none(), "{never_leased:?}");
    assert!(never_leased.lease.is_none(), "{never_leased:?}");
    let page = store
        .list(ListParams {
            queue: Some(QueueName::parse("long").unwrap()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), LONG_JOBS);
    for j in &page.jobs {
        assert_eq!(j.state, JobState::Available, "{}", j.id);
        assert_eq!(j.attempt, 0, "released jobs keep their attempt count");
        assert!(j.errors.is_empty());
    }
    store.close().await;
}

async fn sigterm_drains_in_order_and_exits_0(backend: Backend, test: &str) {
    a_signal_drains_in_order_and_exits_0(backend, test, Signal::SIGTERM).await;
}
crate::both_backends!(sigterm_drains_in_order_and_exits_0);

async fn sigint_drains_in_order_and_exits_0(backend: Backend, test: &str) {
    a_signal_drains_in_order_and_exits_0(backend, test, Signal::SIGINT).await;
}
crate::both_backends!(sigint_drains_in_order_and_exits_0);
