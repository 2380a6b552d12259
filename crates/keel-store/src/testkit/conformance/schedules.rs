//! Cron schedules and their exactly-once ticks (G4).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::DurationRound as _;
use chrono::TimeDelta;
use keel_core::store::{Fence, LeaderEpoch, TickParams};
use keel_core::{
    Clock as _, JobId, JobState, JobTemplate, NewSchedule, Schedule, StoreError, Timestamp,
};

use super::{Harness, campaign, count_jobs, kind, q, raw, replica, schedule_name, tenant};

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
