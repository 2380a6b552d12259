//! Scale-out on Postgres (G2–G4): three real `keel serve` processes on one database.
//!
//! - 50 000 jobs enqueued through all three replicas all complete, each exactly once (no
//!   lease is lost here, so no duplicate run may happen and none may be counted);
//! - a cron schedule firing every second enqueues exactly one job per tick while the leader
//!   is SIGKILLed mid-run, and the ticks missed while every replica was stopped are caught
//!   up once by the first one back;
//! - 100 concurrent inserts of one unique job through three replicas create one job;
//! - an idempotent retry sent to another replica returns the original response, byte for
//!   byte;
//! - a replica frozen with SIGSTOP past its lease: the job is rescued and run elsewhere, and
//!   after SIGCONT the frozen replica's outcome is refused as stale;
//! - a cancel sent to one replica stops the job running on another (cross-replica events);
//! - a gRPC Watch on one replica sees, in order, the transitions another replica makes.
//!
//! Postgres only: a SQLite database belongs to one process. Each scenario runs twice: on
//! Postgres itself, and through a real PgBouncer in transaction mode with `LISTEN` straight
//! to Postgres (`KEEL_DATABASE_POOLER=transaction`, `KEEL_DATABASE_LISTEN_URL`).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use keel_client::{Client, JobOut};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::child::KeelProcess;
use keel_store::testkit::{PgBouncer, PgDatabase, pg_url_or_skip};

use crate::helpers::{Backend, Backing, CPU_HEAVY, all_jobs, database, metric_value, within};

const REPLICAS: usize = 3;

/// Settings every replica of these tests shares: short leases and leader terms so that
/// failures are noticed within seconds, and a fast maintenance pass.
fn replica_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("KEEL_LEASE_TIMEOUT", "2s"),
        ("KEEL_HEARTBEAT_INTERVAL", "500ms"),
        ("KEEL_MAINTENANCE_INTERVAL", "200ms"),
        ("KEEL_POLL_INTERVAL", "500ms"),
        ("KEEL_LEADER_TTL", "3s"),
        ("KEEL_REQUEST_TIMEOUT", "10s"),
    ]
}

async fn start_replicas(db: &Target, n: usize, extra: &[(&str, &str)]) -> Vec<KeelProcess> {
    let mut env = replica_env();
    env.extend_from_slice(extra);
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(db.start(&env).await);
    }
    replicas
}

/// Where the replicas' database is: Postgres itself, or a PgBouncer in transaction mode in
/// front of it (statements unnamed, `LISTEN` straight to Postgres).
#[derive(Debug, Clone, Copy)]
enum Via {
    Postgres,
    PgBouncer,
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Postgres => "postgres",
            Via::PgBouncer => "pgbouncer",
        })
    }
}

/// The replicas' database, the settings that reach it, and what keeps it alive.
struct Target {
    url: String,
    env: Vec<(&'static str, String)>,
    _backing: TargetBacking,
}

#[allow(dead_code)]
enum TargetBacking {
    Postgres(Backing),
    /// The bouncer first: it is stopped before its database is dropped.
    PgBouncer(PgBouncer, PgDatabase),
}

/// The database for `test` reached `via`, or `None` when the test is skipped.
async fn target(via: Via, test: &str) -> Option<Target> {
    match via {
        Via::Postgres => {
            let (url, backing) = database(Backend::Postgres, test).await?;
            Some(Target {
                url,
                env: Vec::new(),
                _backing: TargetBacking::Postgres(backing),
            })
        }
        Via::PgBouncer => {
            let bouncer = PgBouncer::start(test, None)?;
            let database = PgDatabase::create(&pg_url_or_skip(test)?).await;
            Some(Target {
                url: bouncer.url(&database.name),
                env: vec![
                    ("KEEL_DATABASE_POOLER", "transaction".to_owned()),
                    (
                        "KEEL_DATABASE_LISTEN_URL",
                        bouncer.direct_url(&database.name),
                    ),
                ],
                _backing: TargetBacking::PgBouncer(bouncer, database),
            })
        }
    }
}

impl Target {
    /// A replica on this database, with `extra` settings.
    async fn start(&self, extra: &[(&str, &str)]) -> KeelProcess {
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        KeelProcess::start(&self.url, &env).await
    }
}

/// Each scenario twice: on Postgres itself, and through PgBouncer in transaction mode.
macro_rules! on_both_targets {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(super::Via::Postgres).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn pgbouncer() {
                    super::$name(super::Via::PgBouncer).await;
                }
            }
        )*
    };
}

on_both_targets!(
    fifty_thousand_jobs_through_three_replicas_all_complete_once,
    cron_fires_once_per_tick_across_replicas_a_leader_kill_and_a_full_stop,
    one_hundred_concurrent_unique_inserts_create_one_job,
    an_idempotent_retry_on_another_replica_replays_the_original_bytes,
    a_frozen_replica_loses_its_job_and_its_late_outcome_is_refused,
    a_cancel_sent_to_one_replica_stops_the_job_running_on_another,
    a_watch_on_one_replica_sees_the_transitions_made_on_another,
);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn signal(p: &KeelProcess, sig: Signal) {
    kill(Pid::from_raw(i32::try_from(p.pid()).unwrap()), sig).expect("signal the replica");
}

/// Sum of `metric` (with `labels`) over the replicas still running.
async fn metric_sum(
    replicas: &[&KeelProcess],
    http: &reqwest::Client,
    metric: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let mut sum = 0.0;
    for r in replicas {
        sum += metric_value(&r.metrics(http).await, metric, labels);
    }
    sum
}

/// The replica that reports `keel_leader 1`, waiting up to `limit` for one to.
async fn leader_index(replicas: &[&KeelProcess], http: &reqwest::Client, limit: Duration) -> usize {
    within(limit, "a replica becoming leader", async {
        loop {
            for (i, r) in replicas.iter().enumerate() {
                if metric_value(&r.metrics(http).await, "keel_leader", &[]) == 1.0 {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

async fn fifty_thousand_jobs_through_three_replicas_all_complete_once(via: Via) {
    const JOBS: usize = 50_000;
    const BATCH: usize = 500;
    let test =
        format!("scale_out::fifty_thousand_jobs_through_three_replicas_all_complete_once::{via}");
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let replicas = start_replicas(&db, REPLICAS, &[("KEEL_QUEUES", "default:64")]).await;
    let http = http();

    let started = Instant::now();
    let mut senders = JoinSet::new();
    for b in 0..JOBS / BATCH {
        let target = replicas[b % REPLICAS].url("/v1/jobs/batch");
        let http = http.clone();
        senders.spawn(async move {
            let jobs: Vec<Value> = (0..BATCH).map(|_| json!({"kind": "noop"})).collect();
            let resp = http
                .post(target)
                .json(&json!({ "jobs": jobs }))
                .send()
                .await
                .expect("batch enqueue");
            assert_eq!(
                resp.status(),
                201,
                "{}",
                resp.text().await.unwrap_or_default()
            );
        });
        // At most 8 batches in flight.
        while senders.len() >= 8 {
            senders.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = senders.join_next().await {
        r.unwrap();
    }
    let enqueued_in = started.elapsed();

    let views: Vec<&KeelProcess> = replicas.iter().collect();
    within(Duration::from_secs(240), "50 000 jobs completing", async {
        loop {
            let done = metric_sum(
                &views,
                &http,
                "keel_jobs_finished_total",
                &[("outcome", "completed")],
            )
            .await;
            if done >= JOBS as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    let drained_in = started.elapsed();

    let client = Client::new(replicas[0].base.clone(), None).unwrap();
    let jobs = all_jobs(&client).await;
    assert_eq!(jobs.len(), JOBS);
    let not_completed = jobs.iter().filter(|j| j.state != "completed").count();
    let reran = jobs.iter().filter(|j| j.attempt != 1).count();
    let duplicates = metric_sum(&views, &http, "keel_jobs_duplicate_runs_total", &[]).await;
    let mut per_replica = Vec::new();
    for r in &replicas {
        per_replica.push(metric_value(
            &r.metrics(&http).await,
            "keel_jobs_finished_total",
            &[("outcome", "completed")],
        ));
    }
    eprintln!(
        "[{test}] {JOBS} jobs enqueued in {enqueued_in:?}, all completed after {drained_in:?}; \
         completed per replica {per_replica:?}; attempts > 1: {reran}; duplicate runs counted: {duplicates}"
    );
    assert_eq!(not_completed, 0);
    // No replica died and no lease was lost, so every job ran once; a re-run would have to
    // be counted as a duplicate run.
    assert_eq!(reran as f64, duplicates, "re-runs must all be counted");
    assert_eq!(reran, 0, "no lease was lost, so no job may run twice");
    assert!(
        per_replica.iter().all(|n| *n > 0.0),
        "every replica takes a share of the work: {per_replica:?}"
    );
}

/// Tick times (`run_at`) of the jobs a schedule enqueued, with how many jobs each has.
fn ticks_of(jobs: &[JobOut]) -> HashMap<chrono::DateTime<chrono::Utc>, usize> {
    let mut ticks = HashMap::new();
    for j in jobs
        .iter()
        .filter(|j| j.tags.iter().any(|t| t == "cron-test"))
    {
        *ticks.entry(j.run_at).or_insert(0) += 1;
    }
    ticks
}

/// Asserts one job per tick and no gap between the first and the last tick.
fn assert_every_tick_once(ticks: &HashMap<chrono::DateTime<chrono::Utc>, usize>) -> usize {
    let doubled: Vec<_> = ticks.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "ticks enqueued more than once: {doubled:?}"
    );
    let secs: BTreeSet<i64> = ticks.keys().map(chrono::DateTime::timestamp).collect();
    let (first, last) = (*secs.first().unwrap(), *secs.last().unwrap());
    let missing: Vec<i64> = (first..=last).filter(|s| !secs.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "ticks lost: {missing:?} (of {first}..={last})"
    );
    secs.len()
}

async fn cron_fires_once_per_tick_across_replicas_a_leader_kill_and_a_full_stop(via: Via) {
    let test = format!(
        "scale_out::cron_fires_once_per_tick_across_replicas_a_leader_kill_and_a_full_stop::{via}"
    );
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let mut replicas = start_replicas(&db, REPLICAS, &[]).await;
    let http = http();
    let schedule = json!({
        "cron": "* * * * * *",
        "timezone": "UTC",
        "catch_up": "1h",
        // One attempt: a job the killed leader held is rescued as dead with its `run_at`
        // (its tick) kept, where a retry would move `run_at` to the retry time.
        "job": {"kind": "noop", "tags": ["cron-test"], "max_attempts": 1},
    });
    let resp = http
        .put(replicas[1].url("/v1/schedules/every-second"))
        .json(&schedule)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        201,
        "{}",
        resp.text().await.unwrap_or_default()
    );

    // 12 s with three replicas, then the leader is killed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let views: Vec<&KeelProcess> = replicas.iter().collect();
    let leader = leader_index(&views, &http, Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    replicas.remove(leader).kill9().await;
    let views: Vec<&KeelProcess> = replicas.iter().collect();
    // A survivor takes over once the dead leader's term lapses; the ticks below show that
    // none was lost or doubled meanwhile (how long it took is printed, not asserted).
    let new_leader = leader_index(&views, &http, Duration::from_secs(60)).await;
    eprintln!(
        "[{test}] leader {leader} killed; replica {new_leader} of the survivors took over in {:?}",
        killed_at.elapsed()
    );
    // 18 s more (30 s in all), then every replica stops for 10 s.
    tokio::time::sleep(Duration::from_secs(18)).await;
    for r in replicas.drain(..) {
        r.stop(Duration::from_secs(20)).await;
    }
    let stopped_at = chrono::Utc::now();
    tokio::time::sleep(Duration::from_secs(10)).await;

    // One replica comes back and catches the missed ticks up, once.
    let back = db.start(&replica_env()).await;
    let client = Client::new(back.base.clone(), None).unwrap();
    let restarted_at = chrono::Utc::now();
    let ticks = within(
        Duration::from_secs(20),
        "the missed ticks being caught up",
        async {
            loop {
                let ticks = ticks_of(&all_jobs(&client).await);
                let caught_up = ticks.keys().any(|t| *t >= restarted_at);
                if caught_up {
                    return ticks;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        },
    )
    .await;
    let n = assert_every_tick_once(&ticks);
    let during_stop = ticks
        .keys()
        .filter(|t| **t > stopped_at && **t < restarted_at)
        .count();
    eprintln!(
        "[{test}] {n} ticks, each enqueued once; {during_stop} of them fell in the full stop and were caught up"
    );
    assert!(n >= 40, "about 30 s of ticks plus the stop: {n}");
    assert!(
        during_stop >= 9,
        "the ~10 s of stop were caught up: {during_stop}"
    );
    let resp = http
        .get(back.url("/v1/schedules/every-second"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

async fn one_hundred_concurrent_unique_inserts_create_one_job(via: Via) {
    let test = format!("scale_out::one_hundred_concurrent_unique_inserts_create_one_job::{via}");
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    // No queue is served: the job must stay queued, holding its key, for the whole test.
    let replicas = start_replicas(&db, REPLICAS, &[("KEEL_QUEUES", "elsewhere:1")]).await;
    let http = http();
    let mut inserts = JoinSet::new();
    for i in 0..100 {
        let target = replicas[i % REPLICAS].url("/v1/jobs");
        let http = http.clone();
        inserts.spawn(async move {
            let resp = http
                .post(target)
                .json(&json!({
                    "kind": "noop",
                    "unique": {"key": "invoice-42", "scope": "active"},
                }))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let job: Value = resp.json().await.unwrap();
            (status, job["id"].as_str().unwrap_or_default().to_owned())
        });
    }
    let mut statuses = HashMap::new();
    let mut ids = BTreeSet::new();
    while let Some(r) = inserts.join_next().await {
        let (status, id) = r.unwrap();
        *statuses.entry(status).or_insert(0) += 1;
        ids.insert(id);
    }
    eprintln!("[{test}] statuses {statuses:?}, distinct ids {}", ids.len());
    assert_eq!(
        statuses.get(&201),
        Some(&1),
        "exactly one insert creates: {statuses:?}"
    );
    assert_eq!(
        statuses.get(&200),
        Some(&99),
        "the others get the holder: {statuses:?}"
    );
    assert_eq!(ids.len(), 1, "every answer names the same job");
    let jobs = all_jobs(&Client::new(replicas[2].base.clone(), None).unwrap()).await;
    assert_eq!(jobs.len(), 1);
}

async fn an_idempotent_retry_on_another_replica_replays_the_original_bytes(via: Via) {
    let test = format!(
        "scale_out::an_idempotent_retry_on_another_replica_replays_the_original_bytes::{via}"
    );
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let replicas = start_replicas(&db, 2, &[]).await;
    let http = http();
    let body = json!({"kind": "echo", "args": {"order": 7}});
    let first = http
        .post(replicas[0].url("/v1/jobs"))
        .header("Idempotency-Key", "order-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first_bytes = first.bytes().await.unwrap();
    let first_json: Value = serde_json::from_slice(&first_bytes).unwrap();
    assert_eq!(first_json["state"], "available");
    // The job moves on before the retry: a response rendered afresh from the job would now
    // say "completed", so only a stored replay can match the first bytes.
    let id = first_json["id"].as_str().unwrap().to_owned();
    let other_client = Client::new(replicas[1].base.clone(), None).unwrap();
    within(Duration::from_secs(30), "the job completed", async {
        while other_client.get_job(&id).await.unwrap().state != "completed" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let retry = http
        .post(replicas[1].url("/v1/jobs"))
        .header("Idempotency-Key", "order-7")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 201, "a replay keeps the original status");
    assert_eq!(
        retry
            .headers()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let retry_bytes = retry.bytes().await.unwrap();
    assert_eq!(
        first_bytes, retry_bytes,
        "the replay is the original response byte for byte"
    );
    let other = http
        .post(replicas[1].url("/v1/jobs"))
        .header("Idempotency-Key", "order-7")
        .json(&json!({"kind": "echo", "args": {"order": 8}}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409, "same key, different payload");
}

async fn a_frozen_replica_loses_its_job_and_its_late_outcome_is_refused(via: Via) {
    let test =
        format!("scale_out::a_frozen_replica_loses_its_job_and_its_late_outcome_is_refused::{via}");
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let http = http();
    let frozen = db.start(&replica_env()).await;
    let client = Client::new(frozen.base.clone(), None).unwrap();
    let resp = http
        .post(frozen.url("/v1/jobs"))
        .json(&json!({
            "kind": "sleep",
            "args": {"ms": 3000},
            "backoff": {"type": "fixed", "delay_ms": 100},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<JobOut>().await.unwrap().id;
    within(
        Duration::from_secs(10),
        "the job starting on the first replica",
        async {
            while client.get_job(&id).await.unwrap().state != "running" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;

    // Frozen with the job running; two other replicas take over.
    signal(&frozen, Signal::SIGSTOP);
    let others = start_replicas(&db, 2, &[]).await;
    let other_client = Client::new(others[0].base.clone(), None).unwrap();
    let finished = within(
        Duration::from_secs(30),
        "the job rescued and run elsewhere",
        async {
            loop {
                let job = other_client.get_job(&id).await.unwrap();
                if job.state == "completed" {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    assert_eq!(
        finished.attempt, 2,
        "the rescuer's run is the second attempt"
    );
    assert!(
        finished
            .errors
            .first()
            .is_some_and(|e| e.message.contains("lease")),
        "the first attempt ended with its lease: {:?}",
        finished.errors
    );

    // Thawed: the frozen replica's run ends, and what it reports is refused as stale.
    signal(&frozen, Signal::SIGCONT);
    within(
        Duration::from_secs(15),
        "the thawed replica noticing it lost the lease",
        async {
            loop {
                let m = frozen.metrics(&http).await;
                if metric_value(&m, "keel_jobs_lease_lost_total", &[]) >= 1.0
                    || metric_value(&m, "keel_jobs_finished_total", &[("outcome", "lease_lost")])
                        >= 1.0
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    let after = other_client.get_job(&id).await.unwrap();
    assert_eq!(after.state, "completed");
    assert_eq!(after.attempt, 2);
    assert_eq!(
        after.finished_at, finished.finished_at,
        "the rescuer's outcome stands"
    );
    // G2: the one run that repeated work is counted, once, by the replica that rescued it.
    let mut counted = Vec::new();
    for r in others.iter().chain([&frozen]) {
        counted.push(metric_value(
            &r.metrics(&http).await,
            "keel_jobs_duplicate_runs_total",
            &[],
        ));
    }
    assert_eq!(
        counted.iter().sum::<f64>(),
        1.0,
        "duplicate runs counted by [other, other, frozen]: {counted:?}"
    );
    assert_eq!(counted[2], 0.0, "the frozen replica rescued nothing");
}

async fn a_cancel_sent_to_one_replica_stops_the_job_running_on_another(via: Via) {
    let test =
        format!("scale_out::a_cancel_sent_to_one_replica_stops_the_job_running_on_another::{via}");
    let Some(db) = target(via, &test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let http = http();
    // The runner's first heartbeat is an hour away: only the cross-replica event can stop
    // its job within this test.
    let runner = db
        .start(&[
            ("KEEL_LEASE_TIMEOUT", "2h"),
            ("KEEL_HEARTBEAT_INTERVAL", "1h"),
            ("KEEL_POLL_INTERVAL", "200ms"),
        ])
        .await;
    let front = db.start(&[("KEEL_QUEUES", "elsewhere:1")]).await;
    let resp = http
        .post(front.url("/v1/jobs"))
        .json(&json!({"kind": "sleep", "args": {"ms": 60000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = resp.json::<JobOut>().await.unwrap().id;
    let client = Client::new(front.base.clone(), None).unwrap();
    within(
        Duration::from_secs(10),
        "the job starting on the runner",
        async {
            while client.get_job(&id).await.unwrap().state != "running" {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let cancelled = client.cancel_job(&id).await.unwrap();
    assert_eq!(cancelled.state, "cancelled");
    let stopped = Instant::now();
    within(
        Duration::from_secs(60),
        "the runner stopping the cancelled job",
        async {
            loop {
                let m = runner.metrics(&http).await;
                if metric_value(&m, "keel_jobs_finished_total", &[("outcome", "cancelled")]) >= 1.0
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    eprintln!(
        "[{test}] the runner stopped the job {:?} after the cancel on the other replica",
        stopped.elapsed()
    );
    assert_eq!(
        metric_value(&runner.metrics(&http).await, "keel_workers_busy", &[]),
        0.0
    );
}

/// Watch across replicas: a job enqueued and watched through one replica, then leased,
/// failed and completed through another's WorkerService, reaches the watcher with every
/// transition in order (the other replica's outcomes are not announced: the watch's reads
/// find them).
async fn a_watch_on_one_replica_sees_the_transitions_made_on_another(via: Via) {
    use keel_api::grpc::pb;
    use keel_api::grpc::pb::JobState::Retryable;
    use keel_api::grpc::pb::job_service_client::JobServiceClient;

    use crate::grpc_workers::{
        assert_failed_then_completed, complete, lease_stream, open, token, watch_id,
    };

    let test =
        format!("scale_out::a_watch_on_one_replica_sees_the_transitions_made_on_another::{via}");
    let Some(db) = target(via, &test).await else {
        return;
    };
    let replicas = start_replicas(&db, 2, &[]).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let queue = "xr-watch";
    let job = Client::new(&a.base, None)
        .unwrap()
        .enqueue(
            &keel_client::JobIn {
                queue: Some(queue.to_owned()),
                ..keel_client::JobIn::new("work", json!({}))
            },
            None,
        )
        .await
        .unwrap();
    let id = job.job.id.to_string();
    let mut watch = JobServiceClient::connect(a.grpc.clone())
        .await
        .unwrap()
        .watch(watch_id(&id))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let mut next = async || {
        within(Duration::from_secs(30), "a watch event", watch.message())
            .await
            .expect("the watch is healthy")
    };
    let first = next().await.expect("the job as it is");
    events.push((first.state(), first.attempt));

    let elsewhere = tonic::transport::Channel::from_shared(b.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut s = lease_stream(&elsewhere, open(queue, 1)).await.unwrap();
    let leased = s.next().await.jobs.remove(0);
    let mut workers = pb::worker_service_client::WorkerServiceClient::new(elsewhere.clone());
    // Retried a second later: long enough for the watcher's reads to find it retryable.
    workers
        .fail(pb::FailRequest {
            id: id.clone(),
            token: token(&leased),
            error: "first".into(),
            permanent: false,
            retry_in: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .unwrap();
    loop {
        let ev = next().await.expect("the job is not finished");
        events.push((ev.state(), ev.attempt));
        if ev.state() == Retryable {
            break;
        }
    }
    s.send(1, Vec::new()).await;
    let again = loop {
        if let Some(j) = s.next().await.jobs.pop() {
            break j;
        }
    };
    s.send(0, vec![complete(&again, "true")]).await;
    assert_eq!(s.next().await.results[0].code, tonic::Code::Ok as i32);
    while let Some(ev) = next().await {
        events.push((ev.state(), ev.attempt));
    }
    assert_failed_then_completed(events, "from the other replica");
    drop(s);
    for r in replicas {
        r.stop(Duration::from_secs(30)).await;
    }
}
