//! Several runtimes on one database, as several replicas run: one leader at a time, a
//! handover when it stops or loses the database, maintenance only on the leader, cron
//! exactly once per tick, and state changes (a cancel, a completion) crossing replicas.
//!
//! Each scenario runs on SQLite (the runtimes share one store, as one process would) and,
//! when `KEEL_TEST_DATABASE_URL` is set, on Postgres (each runtime has its own pool and
//! listener on one schema, as separate processes would).
//!
//! The leadership scenarios run on a [`ManualClock`] that stands still: a term then never
//! lapses in the store unless the test moves the clock, so a handover can only have the
//! cause the test names (a resignation, a clock moved past the term), never a slow
//! machine, and no assertion needs to time anything.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_core::store::{LeaderEpoch, ListParams};
use keel_core::{
    Clock, JobState, JobTemplate, ManualClock, NewSchedule, ScheduleName, Store, SystemClock,
    TenantId, Timestamp,
};
use keel_runtime::{Handlers, Runtime, RuntimeConfig, WebhookConfig};
use keel_store::testkit::{Intercepted, PgSchema, pg_url_or_skip};
use keel_store::{PgOptions, PgStore};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::flaky::Flaky;
use crate::helpers::{
    config, eventually, job, kind, queue, start, start_with_clock, store_with_clock, until_idle,
    wait_for,
};

/// The leader term used here: short, so handovers are quick.
const TTL: Duration = Duration::from_secs(1);

/// Stores sharing one database, one per replica, their clock, and what keeps the database
/// alive.
struct Replicas {
    stores: Vec<Arc<dyn Store>>,
    clock: Arc<dyn Clock>,
    _db: Db,
}

/// Dropped after the stores (field order), removing the database.
enum Db {
    Sqlite { _dir: TempDir },
    Postgres { _schema: PgSchema },
}

impl Replicas {
    /// One SQLite store shared by `n` runtimes (a SQLite file has one process), on the
    /// system clock.
    async fn sqlite(n: usize) -> Self {
        Self::sqlite_on(n, Arc::new(SystemClock)).await
    }

    /// [`Replicas::sqlite`] on `clock`.
    async fn sqlite_on(n: usize, clock: Arc<dyn Clock>) -> Self {
        let (dir, store) = store_with_clock(Arc::clone(&clock)).await;
        Self {
            stores: vec![store; n],
            clock,
            _db: Db::Sqlite { _dir: dir },
        }
    }

    /// `n` Postgres stores (pools, listeners) on one fresh schema, or `None` when no test
    /// server is configured, on the system clock.
    async fn postgres(test: &str, n: usize) -> Option<Self> {
        Self::postgres_on(test, n, Arc::new(SystemClock)).await
    }

    /// [`Replicas::postgres`] on `clock`, shared by every replica (as NTP would keep them).
    async fn postgres_on(test: &str, n: usize, clock: Arc<dyn Clock>) -> Option<Self> {
        let base = pg_url_or_skip(test)?;
        let schema = PgSchema::create(&base).await;
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for i in 0..n {
            let s = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::clone(&clock))
                .await
                .unwrap();
            if i == 0 {
                s.migrate().await.unwrap();
            }
            stores.push(Arc::new(s));
        }
        Some(Self {
            stores,
            clock,
            _db: Db::Postgres { _schema: schema },
        })
    }

    /// Starts a runtime on replica `i`'s store and the replicas' clock.
    fn start(&self, i: usize, config: RuntimeConfig) -> Runtime {
        start_with_clock(&self.stores[i], config, builtins(), Arc::clone(&self.clock))
    }
}

/// A clock that stands still until a test moves it (see the module docs).
fn frozen() -> ManualClock {
    ManualClock::starting_now()
}

fn replica_config(queues: &[(&str, usize)]) -> RuntimeConfig {
    RuntimeConfig {
        leader_ttl: TTL,
        ..config(queues)
    }
}

fn builtins() -> Handlers {
    Handlers::builtin(&WebhookConfig::default())
}

fn leaders(runtimes: &[&Runtime]) -> Vec<Option<LeaderEpoch>> {
    runtimes
        .iter()
        .map(|r| r.handle().leadership.current())
        .collect()
}

/// Waits until exactly one of `runtimes` leads; returns its index and term. Fails at once if
/// two ever lead at the same moment.
async fn one_leader(runtimes: &[&Runtime]) -> (usize, LeaderEpoch) {
    eventually("exactly one replica to lead", || async {
        let seen = leaders(runtimes);
        let leading: Vec<_> = seen
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_some())
            .collect();
        assert!(leading.len() <= 1, "two replicas lead at once: {seen:?}");
        match leading.first() {
            Some((i, Some(epoch))) => Ok((*i, *epoch)),
            _ => Err(seen),
        }
    })
    .await
}

/// Watches `runtimes` for `period`, failing if two ever lead at once; returns who led last.
async fn never_two_leaders(runtimes: &[&Runtime], period: Duration) -> Vec<Option<LeaderEpoch>> {
    let until = Instant::now() + period;
    loop {
        let seen = leaders(runtimes);
        let leading = seen.iter().filter(|l| l.is_some()).count();
        assert!(leading <= 1, "two replicas lead at once: {seen:?}");
        if Instant::now() >= until {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// --- one leader, and a handover when it stops ---------------------------------------------

/// Runs on a frozen clock: the leader's term never lapses, so only its resignation can
/// hand the leadership over.
async fn one_leads_and_the_other_takes_over_when_it_stops(r: &Replicas) {
    let a = r.start(0, replica_config(&[("default", 1)]));
    let b = r.start(1, replica_config(&[("default", 1)]));
    let (first, epoch) = one_leader(&[&a, &b]).await;
    // Through several renewals, the same replica keeps leading under the same term.
    let seen = never_two_leaders(&[&a, &b], TTL * 2).await;
    assert_eq!(seen[first], Some(epoch), "{seen:?}");

    let (leader, other) = if first == 0 { (a, b) } else { (b, a) };
    leader.shutdown().await;
    // The store's clock has not moved since the term was granted, so it has not lapsed:
    // the takeover is the resignation's doing.
    let next = eventually("the other replica to lead", || async {
        other.handle().leadership.current().ok_or(())
    })
    .await;
    assert!(
        next > epoch,
        "a new leader gets a later term: {next} after {epoch}"
    );
    let handle = other.handle().clone();
    other.shutdown().await;
    assert_eq!(
        handle.leadership.current(),
        None,
        "a stopped runtime does not claim to lead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops_sqlite() {
    let r = Replicas::sqlite_on(2, Arc::new(frozen())).await;
    one_leads_and_the_other_takes_over_when_it_stops(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops_postgres() {
    let test = "one_of_two_replicas_leads_and_the_other_takes_over_when_it_stops_postgres";
    if let Some(r) = Replicas::postgres_on(test, 2, Arc::new(frozen())).await {
        one_leads_and_the_other_takes_over_when_it_stops(&r).await;
    }
}

// --- losing the database means losing leadership at once ---------------------------------

/// Runs on a frozen clock, which the test moves past the term once A has stepped down.
async fn a_leader_that_loses_the_database_steps_down_at_once(r: &Replicas, clock: &ManualClock) {
    let cut = Flaky::new(Arc::clone(&r.stores[0]));
    let cut_store: Arc<dyn Store> = cut.clone();
    let a = start_with_clock(
        &cut_store,
        replica_config(&[("default", 1)]),
        builtins(),
        Arc::clone(&r.clock),
    );
    let epoch = eventually("the first replica to lead", || async {
        a.handle().leadership.current().ok_or(())
    })
    .await;
    let b = r.start(1, replica_config(&[("default", 1)]));
    never_two_leaders(&[&a, &b], TTL / 2).await;
    assert_eq!(a.handle().leadership.current(), Some(epoch));

    // A's database goes away: its next renewal fails, and it stops leading then. Its term
    // is still valid in the store (the clock has not moved), so nothing but the failed
    // renewal can have ended it here.
    cut.fail_campaigns.store(true, Ordering::SeqCst);
    let mut leadership = a.handle().leadership.subscribe();
    tokio::time::timeout(
        crate::helpers::DEADLINE,
        leadership.wait_for(Option::is_none),
    )
    .await
    .expect("the leader stepped down")
    .unwrap();

    // B cannot take over while the term is valid in the store, however many times it
    // campaigns meanwhile: leadership is never shared and never taken early.
    let campaigns = || cut.campaigns.load(Ordering::SeqCst);
    let before = campaigns();
    eventually("A to campaign (and fail) again", || async {
        if campaigns() >= before + 2 {
            Ok(())
        } else {
            Err(campaigns())
        }
    })
    .await;
    assert_eq!(
        leaders(&[&a, &b]),
        [None, None],
        "the term had not lapsed, yet someone leads"
    );

    // The term lapses: B takes over; never both at once.
    clock.advance(TTL);
    let next = eventually("the other replica to take over", || async {
        let seen = leaders(&[&a, &b]);
        assert!(
            seen[0].is_none(),
            "the cut-off replica leads again: {seen:?}"
        );
        seen[1].ok_or(seen)
    })
    .await;
    assert!(next > epoch, "{next} after {epoch}");

    // A's database comes back: it stays a follower while B renews.
    cut.fail_campaigns.store(false, Ordering::SeqCst);
    let seen = never_two_leaders(&[&a, &b], TTL).await;
    assert_eq!(seen, [None, Some(next)]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_the_database_steps_down_at_once_sqlite() {
    let clock = frozen();
    let r = Replicas::sqlite_on(2, Arc::new(clock.clone())).await;
    a_leader_that_loses_the_database_steps_down_at_once(&r, &clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_the_database_steps_down_at_once_postgres() {
    let test = "a_leader_that_loses_the_database_steps_down_at_once_postgres";
    let clock = frozen();
    if let Some(r) = Replicas::postgres_on(test, 2, Arc::new(clock.clone())).await {
        a_leader_that_loses_the_database_steps_down_at_once(&r, &clock).await;
    }
}

// --- maintenance runs on the leader only --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_runs_maintenance() {
    let r = Replicas::sqlite(2).await;
    let counted: Vec<Arc<Intercepted<Flaky>>> =
        r.stores.iter().map(|s| Flaky::new(Arc::clone(s))).collect();
    let stores: Vec<Arc<dyn Store>> = counted
        .iter()
        .map(|f| f.clone() as Arc<dyn Store>)
        .collect();
    let a = start(&stores[0], replica_config(&[("default", 1)]), builtins());
    let b = start(&stores[1], replica_config(&[("default", 1)]), builtins());
    let (leader, _) = one_leader(&[&a, &b]).await;
    let follower = 1 - leader;
    let before = counted[follower].promotes.load(Ordering::SeqCst);
    eventually("the leader to run several maintenance passes", || async {
        let n = counted[leader].promotes.load(Ordering::SeqCst);
        if n >= 10 { Ok(()) } else { Err(n) }
    })
    .await;
    // Leadership did not move meanwhile (else the count below proves nothing).
    assert!(leaders(&[&a, &b])[leader].is_some());
    assert_eq!(
        counted[follower].promotes.load(Ordering::SeqCst),
        before,
        "the follower ran maintenance"
    );
    assert_eq!(
        before, 0,
        "the follower never led, so it never ran maintenance"
    );
    a.shutdown().await;
    b.shutdown().await;
}

// --- cron: exactly one job per tick, across a handover ------------------------------------

fn every_second(queue_name: &str) -> NewSchedule {
    NewSchedule {
        tenant: TenantId::default(),
        name: ScheduleName::parse("every-second").unwrap(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        job: JobTemplate {
            queue: queue(queue_name),
            ..JobTemplate::new(kind("noop"))
        },
        paused: false,
        catch_up: NewSchedule::DEFAULT_CATCH_UP,
    }
}

async fn cron_jobs(store: &Arc<dyn Store>) -> Vec<keel_core::Job> {
    store
        .list(ListParams {
            queue: Some(queue("cron")),
            limit: 1000,
            ..ListParams::default()
        })
        .await
        .unwrap()
        .jobs
}

async fn cron_ticks_once_each_across_a_handover(r: &Replicas) {
    let (schedule, created) = r.stores[0]
        .save_schedule(every_second("cron"), false)
        .await
        .unwrap();
    assert!(created);
    // Precision: with the refresh an hour away, the leader enqueues a tick only if it
    // wakes for that tick, so every tick seen below proves the per-tick wakeup.
    let cron_config = || RuntimeConfig {
        cron_refresh: Duration::from_secs(3600),
        ..replica_config(&[("cron", 4)])
    };
    let a = start(&r.stores[0], cron_config(), builtins());
    let b = start(&r.stores[1], cron_config(), builtins());
    let (first, _) = one_leader(&[&a, &b]).await;
    let store = &r.stores[0];
    let until = |n: usize| {
        eventually("cron to enqueue more ticks", move || async move {
            let jobs = cron_jobs(store).await;
            if jobs.len() >= n {
                Ok(jobs.len())
            } else {
                Err(jobs.len())
            }
        })
    };
    let before_handover = until(3).await;

    // The leader stops mid-run; the other replica continues the schedule.
    let (leader, other) = if first == 0 { (a, b) } else { (b, a) };
    leader.shutdown().await;
    until(before_handover + 3).await;
    other.shutdown().await;

    let mut jobs = cron_jobs(store).await;
    jobs.sort_by_key(|j| j.run_at);
    let ticks: Vec<Timestamp> = jobs.iter().map(|j| j.run_at).collect();
    let first_tick = ticks[0];
    let expected: Vec<Timestamp> = (0..ticks.len())
        .map(|i| first_tick + chrono::TimeDelta::seconds(i as i64))
        .collect();
    assert_eq!(
        ticks, expected,
        "one job per tick, every second, none doubled or lost"
    );
    assert!(
        first_tick > schedule.created_at
            && first_tick <= schedule.created_at + chrono::TimeDelta::seconds(1),
        "the first tick is the first second after creation: {first_tick} vs {}",
        schedule.created_at
    );
    for j in &jobs {
        assert_eq!(j.kind, kind("noop"));
        assert_eq!(j.tenant, TenantId::default());
    }
    let stored = store
        .get_schedule(&schedule.tenant, &schedule.name)
        .await
        .unwrap();
    assert_eq!(stored.last_tick_at, ticks.last().copied());
    // Every tick's job ran once and completed, except one enqueued as the last replica was
    // stopping: it stops leasing at once, so that job waits, untouched, for the next start.
    // A drainer picks it up (with the schedule paused, so no new tick is added meanwhile).
    store
        .set_schedule_paused(&schedule.tenant, &schedule.name, true)
        .await
        .unwrap();
    let drainer = start(store, replica_config(&[("cron", 4)]), builtins());
    eventually("every cron job to complete", || async {
        let jobs = cron_jobs(store).await;
        let runs: Vec<(JobState, u32)> = jobs.iter().map(|j| (j.state, j.attempt)).collect();
        if runs.iter().all(|r| *r == (JobState::Completed, 1)) {
            Ok(())
        } else {
            Err(runs)
        }
    })
    .await;
    drainer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_enqueues_one_job_per_tick_across_two_replicas_and_a_handover_sqlite() {
    cron_ticks_once_each_across_a_handover(&Replicas::sqlite(2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_enqueues_one_job_per_tick_across_two_replicas_and_a_handover_postgres() {
    let test = "cron_enqueues_one_job_per_tick_across_two_replicas_and_a_handover_postgres";
    if let Some(r) = Replicas::postgres(test, 2).await {
        cron_ticks_once_each_across_a_handover(&r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_off_cron_write_makes_the_leader_step_down_and_campaign_at_once() {
    let r = Replicas::sqlite(1).await;
    let fenced = Flaky::new(Arc::clone(&r.stores[0]));
    let store: Arc<dyn Store> = fenced.clone();
    store
        .save_schedule(every_second("cron"), false)
        .await
        .unwrap();
    // A term of an hour: the next regular renewal is 20 minutes away, so a campaign
    // within this test after the refusal can only be the step-down's.
    let cfg = RuntimeConfig {
        leader_ttl: Duration::from_secs(3600),
        ..replica_config(&[("cron", 1)])
    };
    let rt = start(&store, cfg, builtins());
    let mut leadership = rt.handle().leadership.subscribe();
    tokio::time::timeout(
        crate::helpers::DEADLINE,
        leadership.wait_for(Option::is_some),
    )
    .await
    .unwrap()
    .unwrap();
    let campaigns = fenced.campaigns.load(Ordering::SeqCst);
    fenced.fence_ticks.store(true, Ordering::SeqCst);
    // The next tick's write is refused: the leader steps down (the watch changes) and
    // campaigns again at once, not at its next renewal (20 minutes away).
    tokio::time::timeout(crate::helpers::DEADLINE, leadership.changed())
        .await
        .expect("the refused write ended the term here")
        .unwrap();
    eventually("a campaign right after the refusal", || async {
        let n = fenced.campaigns.load(Ordering::SeqCst);
        if n > campaigns { Ok(()) } else { Err(n) }
    })
    .await;
    assert!(
        fenced.refused_ticks.load(Ordering::SeqCst) >= 1,
        "the refusal happened"
    );
    fenced.fence_ticks.store(false, Ordering::SeqCst);
    // The term was in fact still this replica's: it leads again and cron resumes.
    eventually("the replica to lead again", || async {
        rt.handle().leadership.current().ok_or(())
    })
    .await;
    let enqueued = cron_jobs(&store).await.len();
    eventually("cron to resume", || async {
        let n = cron_jobs(&store).await.len();
        if n > enqueued { Ok(()) } else { Err(n) }
    })
    .await;
    rt.shutdown().await;
}

// --- state changes cross replicas (Postgres NOTIFY) ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_made_through_another_replica_stops_the_job_running_here() {
    let test = "a_cancel_made_through_another_replica_stops_the_job_running_here";
    let Some(r) = Replicas::postgres(test, 2).await else {
        return;
    };
    // The first heartbeat is an hour away: only the cross-replica notice can stop the job
    // within this test.
    let mut cfg = replica_config(&[("default", 2)]);
    cfg.lease_for = Duration::from_secs(7200);
    cfg.heartbeat_every = Duration::from_secs(3600);
    let a = start(&r.stores[0], cfg, builtins());
    let b = start(&r.stores[1], replica_config(&[("other", 1)]), builtins());
    let id = r.stores[0]
        .insert(vec![job("default", "sleep", r#"{"ms": 60000}"#)])
        .await
        .unwrap()[0]
        .id;
    a.handle().wakeups.job_available(&queue("default"));
    wait_for(&r.stores[0], id, "the job to run on A", |j| {
        j.state == JobState::Running
    })
    .await;
    eventually("the job to be registered as running on A", || async {
        if a.running_jobs() == 1 {
            Ok(())
        } else {
            Err(a.running_jobs())
        }
    })
    .await;

    let mut events = a.handle().events.subscribe();
    // B's API cancels it: in the store, through B's pool. Nothing is said to A directly.
    r.stores[1].cancel(id).await.unwrap();
    until_idle(&a, "the job to stop on A").await;
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.id == id {
                return e;
            }
        }
    })
    .await
    .expect("A announced the cancel made on B");
    assert_eq!(event.state, JobState::Cancelled);
    let job = r.stores[0].get(id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.errors.is_empty(), "{:?}", job.errors);
    a.shutdown().await;
    b.shutdown().await;
}

/// A retry made through another replica's store is announced here (completions and
/// failures are not announced on Postgres: see keel-store's `postgres/sql.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_retried_on_another_replica_is_announced_here() {
    let test = "a_job_retried_on_another_replica_is_announced_here";
    let Some(r) = Replicas::postgres(test, 2).await else {
        return;
    };
    // Neither replica serves the job's queue, so nothing but the retry moves it.
    let a = start(&r.stores[0], replica_config(&[("default", 1)]), builtins());
    let mut events = a.handle().events.subscribe();
    let id = r.stores[1]
        .insert(vec![job("elsewhere", "noop", "null")])
        .await
        .unwrap()[0]
        .id;
    r.stores[1].cancel(id).await.unwrap();
    r.stores[1].retry(id).await.unwrap();
    let heard = tokio::time::timeout(crate::helpers::DEADLINE, async {
        let mut heard = Vec::new();
        loop {
            let e = events.recv().await.unwrap();
            if e.id == id {
                heard.push(e.state);
                if e.state == JobState::Available {
                    return heard;
                }
            }
        }
    })
    .await
    .expect("A heard of the retry made through B");
    assert_eq!(heard, [JobState::Cancelled, JobState::Available]);
    assert_eq!(
        r.stores[0].get(id).await.unwrap().state,
        JobState::Available
    );
    a.shutdown().await;
}
