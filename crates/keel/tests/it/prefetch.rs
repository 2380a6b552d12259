//! Prefetch (issue 14): jobs a queue leased ahead of its free slots are neither lost nor run
//! twice when the process stops, by SIGTERM or by SIGKILL.
//!
//! The jobs are webhooks to a wiremock receiver whose first [`WORKERS`] requests hang, so
//! the moment of the stop is an observed state, not a timing: every slot holds a hanging
//! job, and the queue holds more leased jobs than slots (the prefetch buffer). Each job's
//! body carries its number, so the receiver's log says exactly how often each job ran.
//! - SIGTERM: the buffered jobs are released at once, the hanging ones finish within the
//!   grace period; after a restart every job is completed, on its first attempt, and
//!   received exactly once.
//! - SIGKILL: the leases lapse and the jobs are rescued on restart. The jobs that were
//!   running ran again (their first run was cut by the crash, G2); the buffered ones, which
//!   never started, ran exactly once; every job is completed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keel_client::{Client, JobListQuery, JobOut};
use keel_core::JobState;
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{Backend, database, within};

const WORKERS: usize = 8;
const JOBS: usize = 30;
const QUEUE: &str = "prefetch";

fn server_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KEEL_QUEUES", "prefetch:8"),
        ("KEEL_WEBHOOK_ALLOW_PRIVATE", "true"),
        // Short leases, so a crash's orphans are rescued within seconds of the restart.
        ("KEEL_LEASE_TIMEOUT", "2s"),
        ("KEEL_HEARTBEAT_INTERVAL", "500ms"),
        ("KEEL_MAINTENANCE_INTERVAL", "100ms"),
        ("KEEL_POLL_INTERVAL", "200ms"),
        ("KEEL_SHUTDOWN_GRACE", "30s"),
        (
            "KEEL_LOG_LEVEL",
            "warn,keel::app=info,keel_runtime::dispatcher=info",
        ),
    ]
}

/// A receiver whose first `WORKERS` requests take `hang` to answer; the rest answer at once.
async fn receiver(hang: Duration) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(hang))
        .up_to_n_times(WORKERS as u64)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

/// How many times the receiver was called for each job number.
async fn runs(server: &MockServer) -> BTreeMap<u64, usize> {
    let mut runs = BTreeMap::new();
    for req in server.received_requests().await.unwrap_or_default() {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        *runs.entry(body["n"].as_u64().unwrap()).or_default() += 1;
    }
    runs
}

/// Job number of each job of the queue.
fn number(job: &JobOut) -> u64 {
    let args: serde_json::Value = serde_json::from_str(job.args.get()).unwrap();
    args["body"]["n"].as_u64().unwrap()
}

async fn jobs(client: &Client, state: Option<JobState>) -> Vec<JobOut> {
    client
        .list_jobs(&JobListQuery {
            queue: Some(QUEUE.to_owned()),
            state,
            limit: Some(1000),
            ..JobListQuery::default()
        })
        .await
        .unwrap()
        .jobs
}

/// Starts Keel, enqueues the jobs, and waits until every slot holds a hanging job and at
/// least one more job is leased (buffered). Returns the numbers of the running jobs and of
/// the buffered ones.
async fn fill(keel: &KeelProcess, server: &MockServer) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let client = Client::new(keel.base.clone(), None).unwrap();
    let http = reqwest::Client::new();
    for n in 0..JOBS {
        let resp = http
            .post(keel.url("/v1/jobs"))
            .json(&json!({
                "kind": "webhook",
                "queue": QUEUE,
                "args": {"url": format!("{}/hook", server.uri()), "body": {"n": n}},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
    within(
        Duration::from_secs(60),
        "every slot holding a hanging job, and a job buffered",
        async {
            loop {
                let started: BTreeSet<u64> = runs(server).await.into_keys().collect();
                let leased: BTreeSet<u64> = jobs(&client, Some(JobState::Running))
                    .await
                    .iter()
                    .map(number)
                    .collect();
                if started.len() == WORKERS && leased.len() > WORKERS {
                    assert!(started.is_subset(&leased), "{started:?} ⊄ {leased:?}");
                    let buffered = leased.difference(&started).copied().collect();
                    return (started, buffered);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await
}

/// Restarts Keel on the database and waits until every job is completed.
async fn drain(url: &str) -> (KeelProcess, Vec<JobOut>) {
    let keel = KeelProcess::start(url, &server_env()).await;
    let client = Client::new(keel.base.clone(), None).unwrap();
    let all = within(Duration::from_secs(60), "every job completing", async {
        loop {
            let all = jobs(&client, None).await;
            if all.len() == JOBS && all.iter().all(|j| j.state == JobState::Completed) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    (keel, all)
}

async fn sigterm_releases_prefetched_jobs_unstarted(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    // Long enough that the stop surely begins while the slots' jobs hang; they then finish
    // within the grace period.
    let server = receiver(Duration::from_secs(5)).await;
    let keel = KeelProcess::start(&url, &server_env()).await;
    let (started, buffered) = fill(&keel, &server).await;
    let mut keel = keel;
    keel.signal(nix::sys::signal::Signal::SIGTERM);
    let status = keel.wait_exit(Duration::from_secs(40)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let logs = keel.log_messages();
    assert!(
        logs.iter()
            .any(|m| m.starts_with("released the prefetched jobs")),
        "the buffered jobs {buffered:?} were not released: {logs:?}"
    );
    // Nothing ran but the slots' jobs, each once.
    let before = runs(&server).await;
    assert_eq!(before.keys().copied().collect::<BTreeSet<_>>(), started);
    assert!(before.values().all(|&n| n == 1), "{before:?}");

    let (keel, all) = drain(&url).await;
    let after = runs(&server).await;
    for job in &all {
        let n = number(job);
        assert_eq!(
            job.attempt, 1,
            "job {n} used more than one attempt: {job:?}"
        );
        assert_eq!(
            after.get(&n),
            Some(&1),
            "job {n} ran {:?} times",
            after.get(&n)
        );
    }
    eprintln!(
        "[{test}] {} jobs running and {} buffered at SIGTERM; all {JOBS} completed once, on their first attempt",
        started.len(),
        buffered.len()
    );
    keel.stop(Duration::from_secs(15)).await;
}

both_backends!(sigterm_releases_prefetched_jobs_unstarted);

async fn sigkill_neither_loses_nor_repeats_prefetched_jobs(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    // The slots' jobs hang until the crash.
    let server = receiver(Duration::from_secs(600)).await;
    let keel = KeelProcess::start(&url, &server_env()).await;
    let (started, buffered) = fill(&keel, &server).await;
    keel.kill9().await;

    let (keel, all) = drain(&url).await;
    let after = runs(&server).await;
    for job in &all {
        let n = number(job);
        let ran = after.get(&n).copied().unwrap_or(0);
        if started.contains(&n) {
            // Cut by the crash, rescued and run again (G2).
            assert_eq!(ran, 2, "running job {n}: {job:?}");
            assert_eq!(job.attempt, 2, "running job {n}: {job:?}");
        } else if buffered.contains(&n) {
            // Leased but never started: rescued once its lease lapsed, and run once.
            assert_eq!(ran, 1, "buffered job {n} ran {ran} times: {job:?}");
            assert_eq!(job.attempt, 2, "buffered job {n}: {job:?}");
            assert!(
                job.errors
                    .iter()
                    .all(|e| e.message.starts_with("lease expired")),
                "buffered job {n}: {job:?}"
            );
        } else {
            assert_eq!(ran, 1, "job {n} ran {ran} times: {job:?}");
            assert_eq!(job.attempt, 1, "job {n}: {job:?}");
        }
    }
    eprintln!(
        "[{test}] {} jobs running and {} buffered at SIGKILL; all {JOBS} completed, the buffered ones once",
        started.len(),
        buffered.len()
    );
    keel.stop(Duration::from_secs(15)).await;
}

both_backends!(sigkill_neither_loses_nor_repeats_prefetched_jobs);
