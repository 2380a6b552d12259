//! Conformance cases for running several replicas on one database: unique jobs, the
//! maintenance leader, cron schedules and their exactly-once ticks.
//!
//! Like the rest of the suite, time moves only through the harness's clock, and every case
//! asserts what is stored, not merely that calls succeeded.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DurationRound as _, TimeDelta};
use keel_core::store::{CampaignParams, Fence, IdempotentOutcome, LeaderEpoch, TickParams};
use keel_core::{
    Clock, Job, JobId, JobState, JobTemplate, NewJob, NewSchedule, Schedule, ScheduleName,
    StoreError, TenantId, Timestamp, UniqueHold, UniqueScope, UniqueScopeKind, WorkerId,
};

use super::{
    Harness, complete_one, count_jobs, fail_one, idem, insert_one, job, kind, lease_one, q, raw,
};

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("test tenants are valid")
}

fn replica(name: &str) -> WorkerId {
    WorkerId::parse(name).expect("test worker ids are valid")
}

fn schedule_name(name: &str) -> ScheduleName {
    ScheduleName::parse(name).expect("test schedule names are valid")
}

/// A job in `queue` unique by `key` within `scope`.
fn unique(queue: &str, key: &str, scope: UniqueScope) -> NewJob {
    job(queue).unique(key, scope)
}

async fn insert_all(h: &Harness, jobs: Vec<NewJob>) -> Vec<Job> {
    h.store.insert(jobs).await.expect("insert")
}

/// A second insert of a held key returns the holder (same id, same row), stores nothing
/// new, and leaves other tenants free to use the key.
pub async fn unique_insert_returns_the_holder(h: &Harness) {
    let first = insert_one(h, unique("uniq", "report-42", UniqueScope::Active)).await;
    let again = unique("uniq", "report-42", UniqueScope::Active);
    let again_id = again.id;
    let got = insert_one(h, again).await;
    assert_eq!(
        got.id, first.id,
        "the holder comes back in place of the new job"
    );
    assert_eq!(got, h.store.get(first.id).await.unwrap());
    assert!(
        matches!(h.store.get(again_id).await, Err(StoreError::NotFound(_))),
        "the duplicate was stored"
    );
    assert_eq!(count_jobs(h, "uniq").await, 1);
    // Keys are per tenant.
    let other = unique("uniq", "report-42", UniqueScope::Active).tenant(tenant("other"));
    let other_id = other.id;
    assert_eq!(insert_one(h, other).await.id, other_id);
    assert_eq!(count_jobs(h, "uniq").await, 2);
}

/// The stored key and scope come back through insert, get and list, for every scope; a
/// period key carries its window.
pub async fn unique_hold_round_trips(h: &Harness) {
    let now = h.clock.now();
    let period = UniqueScope::Period(Duration::from_secs(3600));
    let window = now.timestamp_millis().div_euclid(3_600_000) * 3_600_000;
    let cases = [
        (
            UniqueScope::Queued,
            UniqueScopeKind::Queued,
            "rt-q".to_owned(),
        ),
        (
            UniqueScope::Active,
            UniqueScopeKind::Active,
            "rt-a".to_owned(),
        ),
        (period, UniqueScopeKind::Period, format!("rt-p@{window}")),
    ];
    for (scope, kind, stored) in cases {
        let key = stored.split('@').next().unwrap().to_owned();
        let inserted = insert_one(h, unique("rt", &key, scope)).await;
        let want = Some(UniqueHold {
            key: stored.clone(),
            scope: kind,
        });
        assert_eq!(inserted.unique, want, "insert, {scope:?}");
        let got = h.store.get(inserted.id).await.unwrap();
        assert_eq!(got.unique, want, "get, {scope:?}");
        assert_eq!(got, inserted);
    }
    let plain = insert_one(h, job("rt")).await;
    assert_eq!(h.store.get(plain.id).await.unwrap().unique, None);
    let page = h
        .store
        .list(keel_core::store::ListParams {
            queue: Some(q("rt")),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut keys: Vec<Option<String>> = page
        .jobs
        .iter()
        .map(|j| j.unique.as_ref().map(|u| u.key.clone()))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            None,
            Some("rt-a".to_owned()),
            Some(format!("rt-p@{window}")),
            Some("rt-q".to_owned()),
        ]
    );
}

/// `queued`: the key is held until the holder is leased; then the same key inserts a new
/// job, and the leased job failing back to retryable (or being retried) does not take the
/// key back or conflict with the new holder.
pub async fn queued_scope_frees_the_key_at_lease(h: &Harness) {
    let first = insert_one(h, unique("uq", "debounce", UniqueScope::Queued)).await;
    assert_eq!(
        insert_one(h, unique("uq", "debounce", UniqueScope::Queued))
            .await
            .id,
        first.id,
        "held while available"
    );
    let (leased, lease) = lease_one(h, "uq").await;
    assert_eq!(leased.id, first.id);
    let second = insert_one(h, unique("uq", "debounce", UniqueScope::Queued)).await;
    assert_ne!(second.id, first.id, "the lease released the key");
    let failed = fail_one(h, lease, false)
        .await
        .expect("fail back to retryable");
    assert_eq!(failed.state, JobState::Retryable);
    assert_eq!(
        insert_one(h, unique("uq", "debounce", UniqueScope::Queued))
            .await
            .id,
        second.id,
        "the new job holds the key, not the retryable one"
    );
    let retried = h.store.retry(first.id).await.expect("retry without a key");
    assert_eq!(retried.state, JobState::Available);
    assert_eq!(count_jobs(h, "uq").await, 2);
}

/// `active`: the key is held while waiting and running, free once the holder finishes; a
/// manual retry of the finished holder while a new job holds the key is a conflict that
/// changes nothing, and succeeds once the key is free again.
pub async fn active_scope_holds_until_finished(h: &Harness) {
    let first = insert_one(h, unique("ua", "sync", UniqueScope::Active)).await;
    let (_, lease) = lease_one(h, "ua").await;
    assert_eq!(
        insert_one(h, unique("ua", "sync", UniqueScope::Active))
            .await
            .id,
        first.id,
        "held while running"
    );
    complete_one(h, lease, None).await.unwrap();
    let second = insert_one(h, unique("ua", "sync", UniqueScope::Active)).await;
    assert_ne!(second.id, first.id, "free once completed");
    let err = h.store.retry(first.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("unique key"), "{err}");
    assert_eq!(
        h.store.get(first.id).await.unwrap().state,
        JobState::Completed,
        "a refused retry changed the job"
    );
    h.store.cancel(second.id).await.unwrap();
    let retried = h
        .store
        .retry(first.id)
        .await
        .expect("the key is free again");
    assert_eq!(retried.state, JobState::Available);
    assert_eq!(
        insert_one(h, unique("ua", "sync", UniqueScope::Active))
            .await
            .id,
        first.id,
        "the retried job holds the key again"
    );
    assert_eq!(count_jobs(h, "ua").await, 2);
}

/// `period`: one job per key per window, whatever its state; the next window takes a new
/// job, and the stored key names its window.
pub async fn period_scope_holds_for_its_window(h: &Harness) {
    const MINUTE_MS: i64 = 60_000;
    let scope = UniqueScope::Period(Duration::from_secs(60));
    // Start one second into a fresh window, so the test never straddles a boundary.
    let now_us = h.clock.now().timestamp_micros();
    let boundary_ms = (now_us / 1000).div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
    let skip_us = boundary_ms * 1000 + 1_000_000 - now_us;
    h.clock
        .advance(Duration::from_micros(u64::try_from(skip_us).unwrap()));
    let first = insert_one(h, unique("up", "digest", scope)).await;
    assert_eq!(
        first.unique.as_ref().map(|u| u.key.as_str()),
        Some(format!("digest@{boundary_ms}").as_str())
    );
    h.clock.advance(Duration::from_secs(30));
    let (_, lease) = lease_one(h, "up").await;
    complete_one(h, lease, None).await.unwrap();
    assert_eq!(
        insert_one(h, unique("up", "digest", scope)).await.id,
        first.id,
        "a finished job still holds its window"
    );
    h.clock.advance(Duration::from_secs(30));
    let next = insert_one(h, unique("up", "digest", scope)).await;
    assert_ne!(next.id, first.id, "a new window takes a new job");
    assert_eq!(
        next.unique.map(|u| u.key),
        Some(format!("digest@{}", boundary_ms + MINUTE_MS))
    );
    assert_eq!(count_jobs(h, "up").await, 2);
}

/// In a batch, a job whose key is held comes back as the holder in its position, a key
/// repeated within the batch is stored once, and the other jobs are stored as asked.
pub async fn unique_jobs_in_a_batch_return_holders_in_place(h: &Harness) {
    let holder = insert_one(h, unique("ub", "held", UniqueScope::Active)).await;
    let plain = job("ub");
    let dup = unique("ub", "held", UniqueScope::Active);
    let fresh = unique("ub", "fresh", UniqueScope::Active);
    let fresh_again = unique("ub", "fresh", UniqueScope::Active);
    let ids = [plain.id, holder.id, fresh.id, fresh.id];
    let got = insert_all(h, vec![plain, dup, fresh, fresh_again]).await;
    let got_ids: Vec<JobId> = got.iter().map(|j| j.id).collect();
    assert_eq!(got_ids, ids);
    for j in &got {
        assert_eq!(*j, h.store.get(j.id).await.unwrap(), "returned as stored");
    }
    assert_eq!(count_jobs(h, "ub").await, 3);
}

/// Fifty concurrent inserts of the same keys create one job per key; every caller gets that
/// job back. Half the callers name the two keys in the opposite order, so a store that
/// locks keys in submission order would deadlock here.
pub async fn concurrent_unique_inserts_create_one_job(h: &Harness) {
    let mut tasks = Vec::new();
    for i in 0..50 {
        let store = Arc::clone(&h.store);
        tasks.push(tokio::spawn(async move {
            let x = unique("u-race", "x", UniqueScope::Active);
            let y = unique("u-race", "y", UniqueScope::Active);
            let flipped = i % 2 == 1;
            let batch = if flipped { vec![y, x] } else { vec![x, y] };
            let mut got = store.insert(batch).await.expect("concurrent unique insert");
            if flipped {
                got.reverse();
            }
            (got[0].id, got[1].id)
        }));
    }
    let mut pairs = HashSet::new();
    for t in tasks {
        pairs.insert(t.await.unwrap());
    }
    assert_eq!(pairs.len(), 1, "callers got different holders: {pairs:?}");
    assert_eq!(count_jobs(h, "u-race").await, 2);
}

/// An idempotent insert of a job whose key is held creates nothing new: the holder is what
/// it returns, and what its stored response (replayed later) is built from.
pub async fn idempotent_insert_of_a_held_unique_job_returns_the_holder(h: &Harness) {
    let holder = insert_one(h, unique("u-idem", "once", UniqueScope::Active)).await;
    let ttl = Duration::from_secs(600);
    let req = || {
        idem(
            "t",
            "idem-unique",
            "fp",
            vec![unique("u-idem", "once", UniqueScope::Active)],
            ttl,
        )
    };
    let IdempotentOutcome::Created { jobs, response } =
        h.store.insert_idempotent(req()).await.unwrap()
    else {
        panic!("first use must create");
    };
    assert_eq!(jobs[0].id, holder.id);
    assert_eq!(
        response.body,
        format!("{{\"id\":\"{}\"}}", holder.id).into_bytes(),
        "the response names the holder"
    );
    match h.store.insert_idempotent(req()).await.unwrap() {
        IdempotentOutcome::Replayed(r) => assert_eq!(r, response),
        other => panic!("expected a replay, got {other:?}"),
    }
    // A free key under an idempotency key is inserted and holds.
    let IdempotentOutcome::Created { jobs, .. } = h
        .store
        .insert_idempotent(idem(
            "t",
            "idem-unique-2",
            "fp",
            vec![unique("u-idem", "twice", UniqueScope::Active)],
            ttl,
        ))
        .await
        .unwrap()
    else {
        panic!("first use must create");
    };
    assert_eq!(
        insert_one(h, unique("u-idem", "twice", UniqueScope::Active))
            .await
            .id,
        jobs[0].id
    );
    assert_eq!(count_jobs(h, "u-idem").await, 2);
}

async fn campaign(h: &Harness, owner: &str, ttl_s: u64) -> keel_core::store::Leadership {
    h.store
        .campaign(CampaignParams {
            owner: replica(owner),
            ttl: Duration::from_secs(ttl_s),
        })
        .await
        .expect("campaign")
}

/// The first campaign wins epoch 1; a rival sees the leader; renewal keeps the epoch and
/// extends the term; after it lapses another replica wins the next epoch; a resignation
/// lets another win at once; a non-leader's resignation changes nothing.
pub async fn leadership_is_won_renewed_lost_and_resigned(h: &Harness) {
    let t0 = h.clock.now();
    let a = campaign(h, "replica-a", 10).await;
    assert_eq!(a.owner, replica("replica-a"));
    assert_eq!(a.epoch, LeaderEpoch(1));
    assert_eq!(a.expires_at, t0 + TimeDelta::seconds(10));
    let seen_by_b = campaign(h, "replica-b", 10).await;
    assert_eq!(seen_by_b, a, "a rival's campaign reports the leader");

    h.clock.advance(Duration::from_secs(6));
    let renewed = campaign(h, "replica-a", 10).await;
    assert_eq!(renewed.epoch, LeaderEpoch(1), "renewal keeps the epoch");
    assert_eq!(renewed.expires_at, h.clock.now() + TimeDelta::seconds(10));

    // Past the first term's end but inside the renewed one: still A.
    h.clock.advance(Duration::from_secs(6));
    assert_eq!(
        campaign(h, "replica-b", 10).await.owner,
        replica("replica-a")
    );

    h.clock.advance(Duration::from_secs(5));
    let b = campaign(h, "replica-b", 10).await;
    assert_eq!(
        b.owner,
        replica("replica-b"),
        "the lapsed term is taken over"
    );
    assert_eq!(b.epoch, LeaderEpoch(2));
    assert_eq!(
        campaign(h, "replica-a", 10).await,
        b,
        "the old leader sees the new"
    );

    h.store.resign(&replica("replica-a")).await.unwrap();
    assert_eq!(
        campaign(h, "replica-c", 10).await,
        b,
        "only the leader's resignation counts"
    );
    h.store.resign(&replica("replica-b")).await.unwrap();
    let c = campaign(h, "replica-c", 10).await;
    assert_eq!(
        c.owner,
        replica("replica-c"),
        "a resignation frees the term at once"
    );
    assert_eq!(c.epoch, LeaderEpoch(3));
}

fn template() -> JobTemplate {
    let mut t = JobTemplate::new(kind("report"));
    t.queue = q("cron");
    t.args = raw(r#"{"report": "daily",  "n":[1, 2.50]}"#);
    t.tags = vec!["cron".into()];
    t
}

fn new_schedule(tenant_name: &str, name: &str) -> NewSchedule {
    NewSchedule {
        tenant: tenant(tenant_name),
        name: schedule_name(name),
        cron: "*/5 * * * *".into(),
        timezone: "Europe/Paris".into(),
        job: template(),
        paused: false,
        catch_up: Duration::from_secs(900),
    }
}

/// Schedules are compared through their serialised form (args verbatim, times exact):
/// `Schedule` has no `PartialEq` because its template holds raw JSON.
fn same(a: &Schedule, b: &Schedule) -> bool {
    serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

async fn save(h: &Harness, s: NewSchedule, replace: bool) -> Result<(Schedule, bool), StoreError> {
    h.store.save_schedule(s, replace).await
}

fn names(list: &[Schedule]) -> Vec<(String, String)> {
    list.iter()
        .map(|s| (s.tenant.to_string(), s.name.to_string()))
        .collect()
}

/// Create, conflict, replace (keeping creation and tick history), get, list per tenant and
/// across tenants with a keyset cursor, pause, delete.
pub async fn schedules_are_saved_listed_paused_and_deleted(h: &Harness) {
    let created_at = h.clock.now();
    let (s, created) = save(h, new_schedule("acme", "nightly"), false)
        .await
        .unwrap();
    assert!(created);
    assert_eq!((s.tenant.as_str(), s.name.as_str()), ("acme", "nightly"));
    assert_eq!(s.cron, "*/5 * * * *");
    assert_eq!(s.timezone, "Europe/Paris");
    assert_eq!(s.job.args.get(), r#"{"report": "daily",  "n":[1, 2.50]}"#);
    assert_eq!(s.job.queue, q("cron"));
    assert_eq!(s.job.tags, ["cron"]);
    assert_eq!(s.catch_up, Duration::from_secs(900));
    assert!(!s.paused);
    assert_eq!(
        (s.created_at, s.updated_at, s.last_tick_at),
        (created_at, created_at, None)
    );
    assert!(same(
        &h.store
            .get_schedule(&tenant("acme"), &schedule_name("nightly"))
            .await
            .unwrap(),
        &s
    ));

    let err = save(h, new_schedule("acme", "nightly"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    // Give it a tick history, then replace it.
    let fence = fence_of(&campaign(h, "replica-a", 60).await);
    let tick = created_at.duration_trunc(TimeDelta::minutes(5)).unwrap();
    enqueue(h, "acme", "nightly", &fence, &[tick])
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(60));
    let mut changed = new_schedule("acme", "nightly");
    changed.cron = "0 * * * *".into();
    changed.catch_up = Duration::from_secs(60);
    let (r, created) = save(h, changed, true).await.unwrap();
    assert!(!created, "a replace is not a creation");
    assert_eq!(r.cron, "0 * * * *");
    assert_eq!(r.catch_up, Duration::from_secs(60));
    assert_eq!(r.created_at, created_at, "replace keeps created_at");
    assert_eq!(r.last_tick_at, Some(tick), "replace keeps last_tick_at");
    assert_eq!(r.updated_at, h.clock.now());
    let got = h
        .store
        .get_schedule(&tenant("acme"), &schedule_name("nightly"))
        .await
        .unwrap();
    assert!(same(&got, &r), "{got:?} != {r:?}");
    let (fresh, created) = save(h, new_schedule("acme", "hourly"), true).await.unwrap();
    assert!(created, "replace of a missing schedule creates it");
    assert_eq!(fresh.last_tick_at, None);

    for (t, n) in [("acme", "a-first"), ("zeta", "only"), ("beta", "b")] {
        save(h, new_schedule(t, n), false).await.unwrap();
    }
    let acme = h
        .store
        .list_schedules(Some(&tenant("acme")), None, 100)
        .await
        .unwrap();
    assert_eq!(
        names(&acme),
        [
            ("acme".into(), "a-first".into()),
            ("acme".into(), "hourly".into()),
            ("acme".into(), "nightly".into())
        ]
    );
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = h.store.list_schedules(None, after, 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some((last.tenant.clone(), last.name.clone()));
        all.extend(page);
    }
    assert_eq!(
        names(&all),
        [
            ("acme".into(), "a-first".into()),
            ("acme".into(), "hourly".into()),
            ("acme".into(), "nightly".into()),
            ("beta".into(), "b".into()),
            ("zeta".into(), "only".into())
        ]
    );
    let acme_after = h
        .store
        .list_schedules(
            Some(&tenant("acme")),
            Some((tenant("acme"), schedule_name("hourly"))),
            100,
        )
        .await
        .unwrap();
    assert_eq!(names(&acme_after), [("acme".into(), "nightly".into())]);

    h.clock.advance(Duration::from_secs(1));
    let paused = h
        .store
        .set_schedule_paused(&tenant("acme"), &schedule_name("nightly"), true)
        .await
        .unwrap();
    assert!(paused.paused);
    assert_eq!(paused.updated_at, h.clock.now());
    assert!(
        h.store
            .get_schedule(&tenant("acme"), &schedule_name("nightly"))
            .await
            .unwrap()
            .paused
    );
    let resumed = h
        .store
        .set_schedule_paused(&tenant("acme"), &schedule_name("nightly"), false)
        .await
        .unwrap();
    assert!(!resumed.paused);

    h.store
        .delete_schedule(&tenant("acme"), &schedule_name("nightly"))
        .await
        .unwrap();
    let not_found = |r: Result<(), StoreError>| {
        matches!(r, Err(StoreError::ScheduleNotFound(t, n))
            if t.as_str() == "acme" && n.as_str() == "nightly")
    };
    assert!(not_found(
        h.store
            .get_schedule(&tenant("acme"), &schedule_name("nightly"))
            .await
            .map(drop)
    ));
    assert!(not_found(
        h.store
            .delete_schedule(&tenant("acme"), &schedule_name("nightly"))
            .await
    ));
    assert!(not_found(
        h.store
            .set_schedule_paused(&tenant("acme"), &schedule_name("nightly"), true)
            .await
            .map(drop)
    ));
    assert_eq!(
        h.store.list_schedules(None, None, 100).await.unwrap().len(),
        4
    );
    // The schedule's job stays.
    assert_eq!(count_jobs(h, "cron").await, 1);
}

fn fence_of(l: &keel_core::store::Leadership) -> Fence {
    Fence {
        owner: l.owner.clone(),
        epoch: l.epoch,
    }
}

/// Enqueues `ticks` of a schedule with fresh jobs from [`template`].
async fn enqueue(
    h: &Harness,
    tenant_name: &str,
    schedule: &str,
    fence: &Fence,
    ticks: &[Timestamp],
) -> Result<keel_core::store::TickOutcome, StoreError> {
    let t = tenant(tenant_name);
    let template = template();
    h.store
        .enqueue_ticks(TickParams {
            tenant: t.clone(),
            schedule: schedule_name(schedule),
            ticks: ticks
                .iter()
                .map(|at| (*at, template.job_for(&t, *at)))
                .collect(),
            fence: fence.clone(),
        })
        .await
}

async fn last_tick(h: &Harness, tenant_name: &str, schedule: &str) -> Option<Timestamp> {
    h.store
        .get_schedule(&tenant(tenant_name), &schedule_name(schedule))
        .await
        .unwrap()
        .last_tick_at
}

/// Whole minutes before the clock's minute, oldest first.
fn minutes_ago(h: &Harness, ago: &[i64]) -> Vec<Timestamp> {
    let base = h.clock.now().duration_trunc(TimeDelta::minutes(1)).unwrap();
    ago.iter().map(|m| base - TimeDelta::minutes(*m)).collect()
}

/// Each tick enqueues its job once: a second call with the same ticks skips them all and
/// stores nothing; `last_tick_at` only moves forward; a stale, foreign or lapsed fence is
/// refused with nothing written; a paused or deleted schedule skips every tick.
pub async fn ticks_enqueue_once_under_a_valid_fence(h: &Harness) {
    save(h, new_schedule("acme", "every-minute"), false)
        .await
        .unwrap();
    let a = campaign(h, "replica-a", 30).await;
    let fence_a = fence_of(&a);
    let ticks = minutes_ago(h, &[3, 2]);
    let out = enqueue(h, "acme", "every-minute", &fence_a, &ticks)
        .await
        .unwrap();
    assert_eq!(out.skipped, 0);
    let enqueued_ticks: Vec<Timestamp> = out.enqueued.iter().map(|(t, _)| *t).collect();
    assert_eq!(enqueued_ticks, ticks);
    for (tick, id) in &out.enqueued {
        let j = h.store.get(*id).await.unwrap();
        assert_eq!(j.run_at, *tick);
        assert_eq!(
            j.state,
            JobState::Available,
            "a past tick's job runs at once"
        );
        assert_eq!(j.tenant, tenant("acme"));
        assert_eq!(j.kind, kind("report"));
        assert_eq!(j.args.get(), r#"{"report": "daily",  "n":[1, 2.50]}"#);
    }
    assert_eq!(last_tick(h, "acme", "every-minute").await, Some(ticks[1]));

    let again = enqueue(h, "acme", "every-minute", &fence_a, &ticks)
        .await
        .unwrap();
    assert_eq!((again.enqueued.len(), again.skipped), (0, 2));
    assert_eq!(
        count_jobs(h, "cron").await,
        2,
        "a repeated tick stored a job"
    );

    // An older tick never seen before is enqueued; last_tick_at does not go back.
    let older = minutes_ago(h, &[5]);
    let out = enqueue(h, "acme", "every-minute", &fence_a, &older)
        .await
        .unwrap();
    assert_eq!(out.enqueued.len(), 1);
    assert_eq!(last_tick(h, "acme", "every-minute").await, Some(ticks[1]));
    // A future tick's job waits for its time.
    let future =
        h.clock.now().duration_trunc(TimeDelta::minutes(1)).unwrap() + TimeDelta::minutes(1);
    let out = enqueue(h, "acme", "every-minute", &fence_a, &[future])
        .await
        .unwrap();
    assert_eq!(
        h.store.get(out.enqueued[0].1).await.unwrap().state,
        JobState::Scheduled
    );
    assert_eq!(last_tick(h, "acme", "every-minute").await, Some(future));
    assert_eq!(count_jobs(h, "cron").await, 4);

    // A lapsed term, a foreign owner and a superseded epoch are all refused.
    h.clock.advance(Duration::from_secs(31));
    let next = future + TimeDelta::minutes(1);
    let err = enqueue(h, "acme", "every-minute", &fence_a, &[next])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotLeader(1)), "lapsed: {err:?}");
    let b = campaign(h, "replica-b", 30).await;
    assert_eq!(b.epoch, LeaderEpoch(2));
    let foreign = Fence {
        owner: replica("replica-c"),
        epoch: b.epoch,
    };
    for (fence, epoch) in [(&fence_a, 1), (&foreign, 2)] {
        let err = enqueue(h, "acme", "every-minute", fence, &[next])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::NotLeader(e) if e == epoch),
            "{fence:?}: {err:?}"
        );
    }
    assert_eq!(
        count_jobs(h, "cron").await,
        4,
        "a refused fence stored a job"
    );
    assert_eq!(last_tick(h, "acme", "every-minute").await, Some(future));
    let out = enqueue(h, "acme", "every-minute", &fence_of(&b), &[next])
        .await
        .unwrap();
    assert_eq!(out.enqueued.len(), 1, "the refused tick was not recorded");

    // Paused, then deleted: every tick skipped, nothing stored.
    let fence_b = fence_of(&b);
    let later = next + TimeDelta::minutes(1);
    h.store
        .set_schedule_paused(&tenant("acme"), &schedule_name("every-minute"), true)
        .await
        .unwrap();
    let out = enqueue(
        h,
        "acme",
        "every-minute",
        &fence_b,
        &[later, later + TimeDelta::minutes(1)],
    )
    .await
    .unwrap();
    assert_eq!((out.enqueued.len(), out.skipped), (0, 2));
    assert_eq!(last_tick(h, "acme", "every-minute").await, Some(next));
    h.store
        .delete_schedule(&tenant("acme"), &schedule_name("every-minute"))
        .await
        .unwrap();
    let out = enqueue(h, "acme", "every-minute", &fence_b, &[later])
        .await
        .unwrap();
    assert_eq!((out.enqueued.len(), out.skipped), (0, 1));
    assert_eq!(count_jobs(h, "cron").await, 5);
}

/// Calls racing with the same ticks (and the same valid fence) enqueue each tick once in
/// total, whoever wins each one.
pub async fn concurrent_enqueue_ticks_create_one_job_per_tick(h: &Harness) {
    save(h, new_schedule("acme", "race"), false).await.unwrap();
    let fence = fence_of(&campaign(h, "replica-a", 60).await);
    let ticks = minutes_ago(h, &[9, 8, 7, 6, 5, 4, 3, 2, 1]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = Arc::clone(&h.store);
        let fence = fence.clone();
        let ticks = ticks.clone();
        tasks.push(tokio::spawn(async move {
            let t = tenant("acme");
            let template = template();
            store
                .enqueue_ticks(TickParams {
                    tenant: t.clone(),
                    schedule: schedule_name("race"),
                    ticks: ticks
                        .iter()
                        .map(|at| (*at, template.job_for(&t, *at)))
                        .collect(),
                    fence,
                })
                .await
                .expect("concurrent enqueue_ticks")
        }));
    }
    let mut winners: BTreeMap<Timestamp, Vec<JobId>> = BTreeMap::new();
    let mut skipped = 0;
    for t in tasks {
        let out = t.await.unwrap();
        skipped += out.skipped;
        for (tick, id) in out.enqueued {
            winners.entry(tick).or_default().push(id);
        }
    }
    assert_eq!(winners.keys().copied().collect::<Vec<_>>(), ticks);
    assert!(winners.values().all(|ids| ids.len() == 1), "{winners:?}");
    assert_eq!(skipped, 8 * ticks.len() - ticks.len());
    assert_eq!(count_jobs(h, "cron").await, ticks.len());
    for ids in winners.values() {
        assert!(h.store.get(ids[0]).await.is_ok());
    }
    assert_eq!(last_tick(h, "acme", "race").await, ticks.last().copied());
}

/// Tick records older than the cutoff are deleted (by tick time, `limit` per call); a
/// forgotten tick could be enqueued again, a kept one cannot.
pub async fn old_ticks_are_deleted_by_tick_time(h: &Harness) {
    save(h, new_schedule("acme", "old"), false).await.unwrap();
    let fence = fence_of(&campaign(h, "replica-a", 60).await);
    let ticks = minutes_ago(h, &[30, 20, 10]);
    enqueue(h, "acme", "old", &fence, &ticks).await.unwrap();
    let cutoff = ticks[2];
    assert_eq!(h.store.delete_old_ticks(cutoff, 1).await.unwrap(), 1);
    assert_eq!(h.store.delete_old_ticks(cutoff, 10).await.unwrap(), 1);
    assert_eq!(h.store.delete_old_ticks(cutoff, 10).await.unwrap(), 0);
    let out = enqueue(h, "acme", "old", &fence, &ticks).await.unwrap();
    let again: Vec<Timestamp> = out.enqueued.iter().map(|(t, _)| *t).collect();
    assert_eq!(again, ticks[..2], "only the deleted records are forgotten");
    assert_eq!(out.skipped, 1);
    // The jobs the ticks enqueued are not touched by the cleanup.
    assert_eq!(count_jobs(h, "cron").await, 5);
}
