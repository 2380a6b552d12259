//! Chaos, crash (G1, G2): 64 clients enqueue `sleep` jobs while workers run them; Keel is
//! killed with SIGKILL at a random moment and restarted on the same database, five times.
//! Afterwards every acknowledged job exists and is completed, and a job was leased more
//! than once only if its lease was lost in a crash (its earlier attempts are recorded as
//! expired leases). That prefetched jobs, leased but not started at a kill, then run only
//! once is `prefetch.rs`'s to prove.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_client::{Client, JobOut};
use rand::Rng as _;
use serde_json::json;
use tokio::task::JoinSet;

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{Backend, all_jobs, database, within};

const CYCLES: usize = 5;
const CLIENTS: usize = 64;
const WORKERS: usize = 32;
/// Each client waits this long between enqueues, so the backlog a cycle leaves stays small
/// enough to drain within the test's patience.
const CLIENT_PACE: Duration = Duration::from_millis(25);

/// Short leases so the jobs a crash orphans are rescued within seconds.
fn server_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KEEL_QUEUES", "default:32"),
        ("KEEL_LEASE_TIMEOUT", "2s"),
        ("KEEL_HEARTBEAT_INTERVAL", "500ms"),
        ("KEEL_MAINTENANCE_INTERVAL", "100ms"),
        ("KEEL_POLL_INTERVAL", "200ms"),
        ("KEEL_REQUEST_TIMEOUT", "5s"),
    ]
}

/// One enqueuing client: posts a short `sleep` job, records the id when the answer is a 2xx
/// (an acknowledgement: the job is durable, G1), until told to stop.
async fn enqueue_until(
    http: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<HashSet<String>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let ms = rand::rng().random_range(1..=10);
        let sent = http
            .post(&url)
            .json(&json!({"kind": "sleep", "args": {"ms": ms}}))
            .send()
            .await;
        if let Ok(resp) = sent
            && resp.status().is_success()
            && let Ok(job) = resp.json::<JobOut>().await
        {
            acked.lock().unwrap().insert(job.id.to_string());
        }
        tokio::time::sleep(CLIENT_PACE).await;
    }
}

/// Every job in the database, by id.
async fn jobs_by_id(client: &Client) -> HashMap<String, JobOut> {
    all_jobs(client)
        .await
        .into_iter()
        .map(|j| (j.id.to_string(), j))
        .collect()
}

async fn crash_loses_no_acknowledged_job(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let env = server_env();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut per_cycle = Vec::new();
    for cycle in 0..CYCLES {
        let keel = KeelProcess::start(&url, &env).await;
        let before = acked.lock().unwrap().len();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = JoinSet::new();
        for _ in 0..CLIENTS {
            clients.spawn(enqueue_until(
                http.clone(),
                keel.url("/v1/jobs"),
                Arc::clone(&stop),
                Arc::clone(&acked),
            ));
        }
        let run_for = Duration::from_millis(rand::rng().random_range(500..=2000));
        tokio::time::sleep(run_for).await;
        keel.kill9().await;
        stop.store(true, Ordering::Relaxed);
        within(Duration::from_secs(30), "clients stopping", async {
            while clients.join_next().await.is_some() {}
        })
        .await;
        let now = acked.lock().unwrap().len();
        per_cycle.push(now - before);
        eprintln!(
            "[{test}] cycle {cycle}: killed after {run_for:?}, {} jobs acknowledged",
            now - before
        );
    }
    assert!(
        per_cycle.iter().all(|n| *n > 0),
        "every cycle must acknowledge jobs before the kill: {per_cycle:?}"
    );

    // A last restart. First G1: every acknowledged job is stored (a lost one fails here,
    // by name, not as a drain that never ends). Then G2: the restart rescues what the
    // crashes orphaned and drains the backlog.
    let keel = KeelProcess::start(&url, &env).await;
    let client = Client::new(keel.base.clone(), None).unwrap();
    let acked = acked.lock().unwrap().clone();
    let stored = jobs_by_id(&client).await;
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged jobs lost: {missing:?}",
        missing.len(),
        acked.len()
    );
    let jobs = within(Duration::from_secs(120), "draining the backlog", async {
        loop {
            let jobs = jobs_by_id(&client).await;
            let unfinished = acked
                .iter()
                .filter(|id| {
                    jobs.get(*id).is_none_or(|j| {
                        !matches!(j.state.as_str(), "completed" | "discarded" | "cancelled")
                    })
                })
                .count();
            if unfinished == 0 {
                return jobs;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let mut duplicated = 0;
    for id in &acked {
        let job = &jobs[id];
        assert_eq!(job.state, "completed", "job {id}: {job:?}");
        if job.attempt > 1 {
            duplicated += 1;
            // Every earlier attempt of a `sleep` job can only have ended in a crash: its
            // lease expired and the job was rescued.
            assert_eq!(
                job.errors.len() as u32,
                job.attempt - 1,
                "job {id}: {job:?}"
            );
            for e in &job.errors {
                assert!(
                    e.message.starts_with("lease expired"),
                    "job {id} ran again for another reason: {job:?}"
                );
            }
        }
    }
    // Only jobs leased at a kill can lose their lease: per kill, at most the workers' jobs,
    // the ones prefetched for them (never started: rescued and run once), and the few
    // whose completion was queued but not yet committed.
    let held = WORKERS + keel_runtime::RuntimeConfig::DEFAULT_PREFETCH_CAP;
    assert!(
        duplicated <= CYCLES * held,
        "{duplicated} jobs were leased again, more than {} could have been held at the kills",
        CYCLES * held
    );
    eprintln!(
        "[{test}] {} acknowledged over {CYCLES} crashes, {} found, all completed; {duplicated} leased again after a lost lease",
        acked.len(),
        acked.iter().filter(|id| jobs.contains_key(*id)).count()
    );
    assert!(
        keel.terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "the last server must stop cleanly"
    );
}

both_backends!(crash_loses_no_acknowledged_job);
