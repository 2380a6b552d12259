//! The conformance suite: what every [`Store`](keel_core::Store) must do, checked against a
//! real database.
//!
//! Each case is a public async fn taking a fresh [`Harness`]; the
//! [`conformance_suite!`](crate::conformance_suite) macro turns the whole list into one
//! `#[tokio::test]` per case for a backend, so a failure names both the case and the
//! backend. Time moves only through the harness's [`ManualClock`](keel_core::ManualClock):
//! no case sleeps.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use keel_core::store::{
    Completion, FailParams, HeartbeatParams, IdempotentInsert, IdempotentOutcome, LeaseParams,
    LeaseRef, ListParams, PromoteParams, Promoted, RescueParams, Rescued, RetentionParams,
    StateCounts, StoredResponse,
};
use keel_core::{
    Backoff, Clock, IdempotencyKey, Job, JobId, JobKind, JobState, LeaseToken, NewJob, Priority,
    QueueName, StoreError, TenantId, Timestamp, Transition, WorkerId,
};
use serde_json::value::RawValue;

use super::Harness;

mod scale_out;

pub use scale_out::*;

/// Stamps out every conformance case as a `#[tokio::test]`. The argument is a callable
/// taking the test's name (`&'static str`) and returning a future of `Option<Harness>`
/// (`None` = skipped).
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@cases $harness;
            insert_and_get_round_trip,
            insert_picks_scheduled_or_available,
            batch_insert_is_atomic_on_invalid_job,
            batch_insert_is_atomic_on_duplicate_id,
            missing_jobs_are_not_found,
            every_transition_matches_the_state_machine,
            lease_order_is_priority_then_run_at_then_id,
            lease_respects_queue_and_max,
            lease_filters_by_tenant_and_kind,
            lease_exclusivity_under_concurrency,
            lease_expiry_and_rescue,
            rescue_discards_when_attempts_are_exhausted,
            rescue_never_touches_finished_jobs,
            stale_tokens_are_fenced_off,
            batch_outcomes_are_per_item,
            scheduled_jobs_are_promoted_when_due,
            retry_sets_run_at_from_backoff,
            failure_with_retry_at_runs_then,
            failures_exhaust_attempts_then_discard,
            permanent_failure_discards_at_once,
            release_does_not_count_the_attempt,
            cancel_revokes_a_running_lease,
            retry_of_finished_job_grants_an_attempt,
            keyset_pagination_is_stable_under_inserts,
            list_filters_match_rows,
            retention_deletes_only_old_finished_jobs,
            queue_stats_match_rows,
            results_round_trip_byte_for_byte,
            hostile_values_are_refused_as_the_callers_fault,
            paused_queues_are_not_leased,
            idempotent_insert_replays_and_conflicts,
            idempotent_first_use_is_exclusive_under_concurrency,
            idempotency_keys_expire,
            idempotent_insert_of_invalid_job_stores_no_key,
            unique_insert_returns_the_holder,
            unique_hold_round_trips,
            queued_scope_frees_the_key_at_lease,
            active_scope_holds_until_finished,
            period_scope_holds_for_its_window,
            unique_jobs_in_a_batch_return_holders_in_place,
            concurrent_unique_inserts_create_one_job,
            idempotent_insert_of_a_held_unique_job_returns_the_holder,
            leadership_is_won_renewed_lost_and_resigned,
            schedules_are_saved_listed_paused_and_deleted,
            ticks_enqueue_once_under_a_valid_fence,
            concurrent_enqueue_ticks_create_one_job_per_tick,
            old_ticks_are_deleted_by_tick_time,
        );
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let make = $harness;
                if let Some(h) = make(concat!(module_path!(), "::", stringify!($case))).await {
                    $crate::testkit::conformance::$case(&h).await;
                    h.store.close().await;
                }
            }
        )*
    };
}

const LEASE_FOR: Duration = Duration::from_secs(30);

fn q(name: &str) -> QueueName {
    QueueName::parse(name).expect("test queue names are valid")
}

fn kind(name: &str) -> JobKind {
    JobKind::parse(name).expect("test kinds are valid")
}

fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("test JSON is valid")
}

fn owner() -> WorkerId {
    WorkerId::parse("conformance-worker").expect("valid worker id")
}

/// A job in `queue` that fails with a fixed 1 h backoff (so it stays retryable until the
/// test moves the clock).
fn job(queue: &str) -> NewJob {
    NewJob::new(kind("noop"))
        .queue(q(queue))
        .backoff(Backoff::Fixed {
            delay_ms: 3_600_000,
        })
}

async fn insert_one(h: &Harness, new: NewJob) -> Job {
    h.store.insert(vec![new]).await.expect("insert").remove(0)
}

async fn lease(h: &Harness, queue: &str, max: u32) -> Vec<Job> {
    h.store
        .lease(LeaseParams {
            queue: q(queue),
            max,
            lease_for: LEASE_FOR,
            owner: owner(),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .expect("lease")
}

async fn lease_one(h: &Harness, queue: &str) -> (Job, LeaseRef) {
    let mut jobs = lease(h, queue, 1).await;
    assert_eq!(jobs.len(), 1, "expected one job to lease in {queue}");
    let job = jobs.remove(0);
    let lease = LeaseRef::of(&job).expect("a leased job carries its lease");
    (job, lease)
}

async fn complete_one(
    h: &Harness,
    lease: LeaseRef,
    result: Option<&str>,
) -> Result<(), StoreError> {
    let mut out = h
        .store
        .complete(vec![Completion {
            lease,
            result: result.map(raw),
        }])
        .await
        .expect("complete batch");
    out.remove(0)
}

async fn fail_one(h: &Harness, lease: LeaseRef, permanent: bool) -> Result<Job, StoreError> {
    fail_at(h, lease, permanent, None).await
}

async fn fail_at(
    h: &Harness,
    lease: LeaseRef,
    permanent: bool,
    retry_at: Option<Timestamp>,
) -> Result<Job, StoreError> {
    h.store
        .fail(FailParams {
            lease,
            error: "boom".into(),
            permanent,
            retry_at,
        })
        .await
}

async fn promote(h: &Harness, limit: u32) -> Vec<Promoted> {
    h.store.promote(PromoteParams { limit }).await.unwrap()
}

async fn rescue(h: &Harness, limit: u32) -> Vec<Rescued> {
    h.store.rescue(RescueParams { limit }).await.unwrap()
}

async fn purge(h: &Harness, finished_before: Timestamp, limit: u32) -> u64 {
    h.store
        .delete_finished(RetentionParams {
            finished_before,
            limit,
        })
        .await
        .unwrap()
}

async fn state_of(h: &Harness, id: JobId) -> JobState {
    h.store.get(id).await.expect("get").state
}

/// Puts a new job into `state` through the store's own operations, in its own queue. Returns
/// the job and the lease it held last (if it was ever leased).
async fn job_in_state(h: &Harness, state: JobState, queue: &str) -> (Job, Option<LeaseRef>) {
    job_in_state_with(h, state, queue, NewJob::DEFAULT_MAX_ATTEMPTS).await
}

async fn job_in_state_with(
    h: &Harness,
    state: JobState,
    queue: &str,
    max_attempts: u32,
) -> (Job, Option<LeaseRef>) {
    let now = h.clock.now();
    let job = |queue: &str| job(queue).max_attempts(max_attempts);
    let (job, lease) = match state {
        JobState::Scheduled => (
            insert_one(h, job(queue).run_at(now + TimeDelta::hours(1))).await,
            None,
        ),
        JobState::Available => (insert_one(h, job(queue)).await, None),
        JobState::Cancelled => {
            let j = insert_one(h, job(queue)).await;
            (h.store.cancel(j.id).await.expect("cancel"), None)
        }
        leased => {
            insert_one(h, job(queue)).await;
            let (j, l) = lease_one(h, queue).await;
            match leased {
                JobState::Running => {}
                JobState::Completed => complete_one(h, l, None).await.expect("complete"),
                JobState::Retryable => {
                    fail_one(h, l, false).await.expect("fail");
                }
                JobState::Discarded => {
                    fail_one(h, l, true).await.expect("fail");
                }
                other => unreachable!("{other} handled above"),
            }
            (h.store.get(j.id).await.expect("get"), Some(l))
        }
    };
    assert_eq!(job.state, state, "setting up a {state} job");
    (job, lease)
}

/// Every job field survives a write and a read, args byte for byte (whitespace included).
pub async fn insert_and_get_round_trip(h: &Harness) {
    let new = NewJob::new(kind("send_email"))
        .queue(q("mail"))
        .tenant(TenantId::parse("acme").unwrap())
        .args(raw(r#"{"to": "a@example.com",  "n":[1, 2.50, null]}"#))
        .priority(Priority::new(2).unwrap())
        .max_attempts(7)
        .timeout(Duration::from_millis(1234))
        .backoff(Backoff::Exponential {
            base_ms: 250,
            cap_ms: 9000,
        })
        .tags(vec!["a".into(), "b-c".into()]);
    let id = new.id;
    let inserted = h.store.insert(vec![new]).await.unwrap();
    assert_eq!(inserted.len(), 1);
    assert_eq!(inserted[0].id, id);
    let got = h.store.get(id).await.unwrap();
    assert_eq!(
        got, inserted[0],
        "stored job differs from the one returned by insert"
    );
    assert_eq!(
        got.args.get(),
        r#"{"to": "a@example.com",  "n":[1, 2.50, null]}"#
    );
    assert_eq!(got.state, JobState::Available);
    assert_eq!(got.attempt, 0);
    assert_eq!(got.created_at, h.clock.now());
    assert_eq!(got.run_at, h.clock.now());
    assert!(got.errors.is_empty() && got.result.is_none() && got.lease.is_none());
}

/// A future `run_at` makes a job scheduled; a past or absent one makes it available.
pub async fn insert_picks_scheduled_or_available(h: &Harness) {
    let now = h.clock.now();
    let jobs = h
        .store
        .insert(vec![
            job("s").run_at(now + TimeDelta::seconds(1)),
            job("s").run_at(now - TimeDelta::seconds(1)),
            job("s"),
        ])
        .await
        .unwrap();
    let states: Vec<JobState> = jobs.iter().map(|j| j.state).collect();
    assert_eq!(
        states,
        [
            JobState::Scheduled,
            JobState::Available,
            JobState::Available
        ]
    );
    for j in &jobs {
        assert_eq!(state_of(h, j.id).await, j.state);
    }
}

/// One invalid job fails the whole batch, names its position, and stores nothing.
pub async fn batch_insert_is_atomic_on_invalid_job(h: &Harness) {
    let batch = vec![job("atomic"), job("atomic").max_attempts(0), job("atomic")];
    let ids: Vec<JobId> = batch.iter().map(|j| j.id).collect();
    match h.store.insert(batch).await {
        Err(StoreError::Invalid { index, errors }) => {
            assert_eq!(index, 1);
            assert_eq!(errors.0[0].field, "max_attempts");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    for id in ids {
        assert!(matches!(
            h.store.get(id).await,
            Err(StoreError::NotFound(_))
        ));
    }
    let page = h
        .store
        .list(ListParams {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.jobs.is_empty());
}

/// A duplicate id fails the whole batch with a conflict; the other new job is not stored.
pub async fn batch_insert_is_atomic_on_duplicate_id(h: &Harness) {
    let first = insert_one(h, job("dup")).await;
    let mut dup = job("dup");
    dup.id = first.id;
    let fresh = job("dup");
    let fresh_id = fresh.id;
    let err = h.store.insert(vec![fresh, dup]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(matches!(
        h.store.get(fresh_id).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(h.store.get(first.id).await.unwrap(), first);
}

/// Every operation on an unknown id says not found.
pub async fn missing_jobs_are_not_found(h: &Harness) {
    let id = JobId::new();
    let lease = LeaseRef {
        id,
        token: LeaseToken::new(),
    };
    assert!(matches!(h.store.get(id).await, Err(StoreError::NotFound(x)) if x == id));
    assert!(matches!(
        h.store.cancel(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        h.store.retry(id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        fail_one(h, lease, false).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        complete_one(h, lease, None).await,
        Err(StoreError::NotFound(_))
    ));
}

/// For every state and every operation, the store does exactly what
/// [`JobState::apply`] allows, and refuses the rest with the right error.
pub async fn every_transition_matches_the_state_machine(h: &Harness) {
    let mut n = 0;
    for from in JobState::ALL {
        for t in Transition::ALL {
            n += 1;
            let queue = format!("t{n}");
            // A lapse discards only when the running attempt was the last one allowed.
            let max_attempts = match (from, t) {
                (JobState::Running, Transition::Rescue { retry: false }) => 1,
                _ => NewJob::DEFAULT_MAX_ATTEMPTS,
            };
            let (before, last_lease) = job_in_state_with(h, from, &queue, max_attempts).await;
            let id = before.id;
            let expected = from.apply(t);
            let token = last_lease.unwrap_or(LeaseRef {
                id,
                token: LeaseToken::new(),
            });
            let ctx = format!("{from} --{t:?}-->");
            match t {
                Transition::Cancel | Transition::Retry => {
                    let got = if t == Transition::Cancel {
                        h.store.cancel(id).await
                    } else {
                        h.store.retry(id).await
                    };
                    match (got, expected) {
                        (Ok(job), Ok(to)) => assert_eq!(job.state, to, "{ctx}"),
                        (Err(StoreError::IllegalTransition { source, .. }), Err(want)) => {
                            assert_eq!(source, want, "{ctx}")
                        }
                        (got, want) => panic!("{ctx}: got {got:?}, want {want:?}"),
                    }
                }
                Transition::Complete => {
                    let got = complete_one(h, token, None).await;
                    match expected {
                        Ok(_) => got.unwrap_or_else(|e| panic!("{ctx}: {e}")),
                        Err(_) => assert!(
                            matches!(got, Err(StoreError::StaleLease(_))),
                            "{ctx}: {got:?}"
                        ),
                    }
                }
                Transition::Fail { retry } => {
                    let got = fail_one(h, token, !retry).await;
                    match expected {
                        Ok(to) => assert_eq!(got.unwrap().state, to, "{ctx}"),
                        Err(_) => assert!(
                            matches!(got, Err(StoreError::StaleLease(_))),
                            "{ctx}: {got:?}"
                        ),
                    }
                }
                Transition::Release => {
                    let got = h.store.release(vec![token]).await.unwrap().remove(0);
                    match expected {
                        Ok(_) => got.unwrap_or_else(|e| panic!("{ctx}: {e}")),
                        Err(_) => assert!(
                            matches!(got, Err(StoreError::StaleLease(_))),
                            "{ctx}: {got:?}"
                        ),
                    }
                }
                Transition::Lease => {
                    let got = lease(h, &queue, 10).await;
                    let ids: Vec<JobId> = got.iter().map(|j| j.id).collect();
                    assert_eq!(ids.contains(&id), expected.is_ok(), "{ctx}");
                }
                Transition::Promote => {
                    // Everything is due an hour and a bit from now.
                    h.clock.advance(Duration::from_secs(3601));
                    promote(h, 1000).await;
                }
                Transition::Rescue { .. } => {
                    h.clock.advance(LEASE_FOR + Duration::from_secs(1));
                    rescue(h, 1000).await;
                }
            }
            let after = state_of(h, id).await;
            match expected {
                Ok(to) => assert_eq!(after, to, "{ctx}"),
                Err(_) => assert_eq!(after, from, "{ctx}: an illegal move changed the job"),
            }
        }
    }
}

/// Within a queue, lower priority values go first, then earlier `run_at`, then older ids.
pub async fn lease_order_is_priority_then_run_at_then_id(h: &Harness) {
    let now = h.clock.now();
    let at = |secs: i64| now - TimeDelta::seconds(secs);
    let specs = [(5, 10), (1, 5), (1, 20), (9, 100), (1, 20), (0, 0)];
    let mut jobs = Vec::new();
    for (prio, ago) in specs {
        jobs.push(
            job("order")
                .priority(Priority::new(prio).unwrap())
                .run_at(at(ago)),
        );
    }
    let inserted = h.store.insert(jobs).await.unwrap();
    let mut want: Vec<&Job> = inserted.iter().collect();
    want.sort_by_key(|j| (j.priority, j.run_at, j.id));
    let want: Vec<JobId> = want.iter().map(|j| j.id).collect();
    let mut got = Vec::new();
    for _ in 0..inserted.len() {
        got.push(lease_one(h, "order").await.0.id);
    }
    assert_eq!(got, want);
    // A batch lease returns the same order.
    let batch = h
        .store
        .insert(vec![
            job("order2").priority(Priority::new(3).unwrap()),
            job("order2").priority(Priority::HIGHEST),
        ])
        .await
        .unwrap();
    let leased = lease(h, "order2", 10).await;
    assert_eq!(
        leased.iter().map(|j| j.id).collect::<Vec<_>>(),
        [batch[1].id, batch[0].id]
    );
}

/// A lease takes only from its queue, at most `max`, and sets the lease fields.
pub async fn lease_respects_queue_and_max(h: &Harness) {
    let batch: Vec<NewJob> = (0..5)
        .map(|_| job("a"))
        .chain((0..3).map(|_| job("b")))
        .collect();
    h.store.insert(batch).await.unwrap();
    assert!(lease(h, "a", 0).await.is_empty());
    let got = lease(h, "a", 3).await;
    assert_eq!(got.len(), 3);
    let now = h.clock.now();
    for j in &got {
        assert_eq!(j.queue, q("a"));
        assert_eq!(j.state, JobState::Running);
        assert_eq!(j.attempt, 1);
        assert_eq!(j.started_at, Some(now));
        let l = j.lease.as_ref().unwrap();
        assert_eq!(l.owner, owner());
        assert_eq!(l.expires_at, now + TimeDelta::seconds(30));
        assert_eq!(h.store.get(j.id).await.unwrap(), *j);
    }
    let tokens: HashSet<LeaseToken> = got
        .iter()
        .map(|j| j.lease.as_ref().unwrap().token)
        .collect();
    assert_eq!(tokens.len(), 3, "every lease gets its own token");
    assert_eq!(lease(h, "a", 10).await.len(), 2);
    assert!(lease(h, "a", 10).await.is_empty());
    assert_eq!(lease(h, "b", 10).await.len(), 3);
}

/// An external worker's lease (docs/workers.md) takes only its tenant's jobs of the kinds
/// it handles, still in lease order; the unfiltered lease takes whatever is left.
pub async fn lease_filters_by_tenant_and_kind(h: &Harness) {
    let t = |name: &str| TenantId::parse(name).unwrap();
    let batch: Vec<NewJob> = [
        ("acme", "resize"),
        ("acme", "email"),
        ("globex", "resize"),
        ("acme", "resize"),
        ("acme", "other"),
    ]
    .into_iter()
    .map(|(tenant, k)| NewJob::new(kind(k)).queue(q("ext")).tenant(t(tenant)))
    .collect();
    let inserted = h.store.insert(batch).await.unwrap();
    let filtered = |tenant: Option<&str>, kinds: &[&str], max: u32| LeaseParams {
        queue: q("ext"),
        max,
        lease_for: LEASE_FOR,
        owner: owner(),
        tenant: tenant.map(t),
        kinds: kinds.iter().map(|k| kind(k)).collect(),
    };
    let got = h
        .store
        .lease(filtered(Some("acme"), &["resize", "email"], 10))
        .await
        .unwrap();
    let ids: Vec<JobId> = got.iter().map(|j| j.id).collect();
    // Same priority and run time: lease order is by id.
    let mut want = vec![inserted[0].id, inserted[1].id, inserted[3].id];
    want.sort();
    assert_eq!(ids, want);
    assert!(
        got.iter()
            .all(|j| j.state == JobState::Running && j.attempt == 1)
    );
    let got = h
        .store
        .lease(filtered(Some("acme"), &[], 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![inserted[4].id]
    );
    assert!(
        h.store
            .lease(filtered(Some("acme"), &[], 10))
            .await
            .unwrap()
            .is_empty()
    );
    let got = h
        .store
        .lease(filtered(None, &["resize"], 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![inserted[2].id]
    );
}

/// Eight concurrent leasers drain 10,000 jobs: each job is leased exactly once and all end
/// completed.
pub async fn lease_exclusivity_under_concurrency(h: &Harness) {
    const JOBS: usize = 10_000;
    for chunk in 0..(JOBS / 1000) {
        let _ = chunk;
        let batch: Vec<NewJob> = (0..1000).map(|_| job("race")).collect();
        h.store.insert(batch).await.unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = Arc::clone(&h.store);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let jobs = store
                    .lease(LeaseParams {
                        queue: q("race"),
                        max: 50,
                        lease_for: LEASE_FOR,
                        owner: owner(),
                        tenant: None,
                        kinds: Vec::new(),
                    })
                    .await
                    .expect("lease");
                if jobs.is_empty() {
                    return seen;
                }
                let completions: Vec<Completion> = jobs
                    .iter()
                    .map(|j| Completion {
                        lease: LeaseRef::of(j).unwrap(),
                        result: None,
                    })
                    .collect();
                for r in store.complete(completions).await.expect("complete") {
                    r.expect("a fresh lease completes");
                }
                seen.extend(jobs.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut count: HashMap<JobId, usize> = HashMap::new();
    for t in tasks {
        for id in t.await.unwrap() {
            *count.entry(id).or_default() += 1;
        }
    }
    assert_eq!(count.len(), JOBS, "every job was leased");
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "jobs leased more than once: {dups:?}");
    let stats = h.store.queue_stats(None).await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].counts.completed, JOBS as u64);
    assert_eq!(stats[0].counts.total(), JOBS as u64);
}

/// A heartbeat keeps a lease alive; once it lapses the rescuer takes the job back as a
/// failed attempt, and the old holder's token is void.
pub async fn lease_expiry_and_rescue(h: &Harness) {
    let inserted = insert_one(h, job("rescue").backoff(Backoff::Fixed { delay_ms: 1000 })).await;
    let (leased, lease) = lease_one(h, "rescue").await;
    assert_eq!(leased.id, inserted.id);
    h.clock.advance(Duration::from_secs(29));
    assert!(rescue(h, 100).await.is_empty());
    let renewed = h
        .store
        .heartbeat(HeartbeatParams {
            leases: vec![lease],
            lease_for: LEASE_FOR,
        })
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(renewed, h.clock.now() + TimeDelta::seconds(30));
    assert_eq!(
        h.store
            .get(leased.id)
            .await
            .unwrap()
            .lease
            .unwrap()
            .expires_at,
        renewed
    );
    h.clock.advance(Duration::from_secs(29));
    assert!(rescue(h, 100).await.is_empty(), "renewed lease was rescued");
    h.clock.advance(Duration::from_secs(2));
    let rescued = rescue(h, 100).await;
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].id, leased.id);
    assert_eq!(rescued[0].state, JobState::Retryable);
    assert_eq!(rescued[0].owner, Some(owner()));
    let after = h.store.get(leased.id).await.unwrap();
    assert_eq!(after.state, JobState::Retryable);
    assert_eq!(after.attempt, 1);
    assert_eq!(after.run_at, h.clock.now() + TimeDelta::seconds(1));
    assert!(after.lease.is_none());
    assert_eq!(after.errors.len(), 1);
    assert!(
        after.errors[0].message.contains("lease expired"),
        "{:?}",
        after.errors
    );
    // The old holder is fenced off.
    assert!(matches!(
        complete_one(h, lease, None).await,
        Err(StoreError::StaleLease(_))
    ));
    // The job runs again under a new lease.
    h.clock.advance(Duration::from_secs(1));
    promote(h, 100).await;
    let (again, lease2) = lease_one(h, "rescue").await;
    assert_eq!(again.id, leased.id);
    assert_eq!(again.attempt, 2);
    assert_ne!(lease2.token, lease.token);
    assert!(matches!(
        complete_one(h, lease, None).await,
        Err(StoreError::StaleLease(_))
    ));
    complete_one(h, lease2, None).await.unwrap();
    assert_eq!(state_of(h, leased.id).await, JobState::Completed);
}

/// A lapsed lease on the last allowed attempt discards the job.
pub async fn rescue_discards_when_attempts_are_exhausted(h: &Harness) {
    insert_one(h, job("last").max_attempts(1)).await;
    let (leased, _) = lease_one(h, "last").await;
    h.clock.advance(LEASE_FOR + Duration::from_secs(1));
    let rescued = rescue(h, 10).await;
    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].state, JobState::Discarded);
    let after = h.store.get(leased.id).await.unwrap();
    assert_eq!(after.state, JobState::Discarded);
    assert_eq!(after.finished_at, Some(h.clock.now()));
    assert_eq!(after.errors.len(), 1);
}

/// The rescuer never overwrites a job that finished before its lease would have lapsed.
pub async fn rescue_never_touches_finished_jobs(h: &Harness) {
    insert_one(h, job("fin")).await;
    insert_one(h, job("fin")).await;
    let (a, la) = lease_one(h, "fin").await;
    let (b, lb) = lease_one(h, "fin").await;
    complete_one(h, la, Some("1")).await.unwrap();
    fail_one(h, lb, true).await.unwrap();
    h.clock.advance(LEASE_FOR * 10);
    assert!(rescue(h, 10).await.is_empty());
    let a = h.store.get(a.id).await.unwrap();
    assert_eq!(a.state, JobState::Completed);
    assert_eq!(a.result.unwrap().get(), "1");
    assert_eq!(state_of(h, b.id).await, JobState::Discarded);
}

/// Heartbeat, complete, fail and release all refuse a token that is not the current one.
pub async fn stale_tokens_are_fenced_off(h: &Harness) {
    let j = insert_one(h, job("fence")).await;
    let (_, real) = lease_one(h, "fence").await;
    let forged = LeaseRef {
        id: j.id,
        token: LeaseToken::new(),
    };
    let hb = h
        .store
        .heartbeat(HeartbeatParams {
            leases: vec![forged],
            lease_for: LEASE_FOR,
        })
        .await
        .unwrap()
        .remove(0);
    assert!(matches!(hb, Err(StoreError::StaleLease(_))), "{hb:?}");
    assert!(matches!(
        complete_one(h, forged, None).await,
        Err(StoreError::StaleLease(_))
    ));
    assert!(matches!(
        fail_one(h, forged, false).await,
        Err(StoreError::StaleLease(_))
    ));
    let rel = h.store.release(vec![forged]).await.unwrap().remove(0);
    assert!(matches!(rel, Err(StoreError::StaleLease(_))), "{rel:?}");
    // The job is untouched by all of that.
    let now = h.store.get(j.id).await.unwrap();
    assert_eq!(now.state, JobState::Running);
    assert_eq!(now.lease.as_ref().unwrap().token, real.token);
    assert!(now.errors.is_empty());
    // Cancelling revokes the real token too.
    h.store.cancel(j.id).await.unwrap();
    assert!(matches!(
        complete_one(h, real, None).await,
        Err(StoreError::StaleLease(_))
    ));
    assert_eq!(state_of(h, j.id).await, JobState::Cancelled);
}

/// In one batch, a valid completion succeeds while a stale and a missing one are reported
/// individually.
pub async fn batch_outcomes_are_per_item(h: &Harness) {
    insert_one(h, job("items")).await;
    insert_one(h, job("items")).await;
    let (a, la) = lease_one(h, "items").await;
    let (b, _lb) = lease_one(h, "items").await;
    let stale = LeaseRef {
        id: b.id,
        token: LeaseToken::new(),
    };
    let missing = LeaseRef {
        id: JobId::new(),
        token: LeaseToken::new(),
    };
    let out = h
        .store
        .complete(vec![
            Completion {
                lease: la,
                result: Some(raw("{\"ok\":true}")),
            },
            Completion {
                lease: stale,
                result: None,
            },
            Completion {
                lease: missing,
                result: None,
            },
        ])
        .await
        .unwrap();
    assert!(out[0].is_ok(), "{:?}", out[0]);
    assert!(
        matches!(out[1], Err(StoreError::StaleLease(id)) if id == b.id),
        "{:?}",
        out[1]
    );
    assert!(
        matches!(out[2], Err(StoreError::NotFound(_))),
        "{:?}",
        out[2]
    );
    assert_eq!(state_of(h, a.id).await, JobState::Completed);
    assert_eq!(state_of(h, b.id).await, JobState::Running);
}

/// A scheduled job is neither leased nor promoted before its time, and is both after.
pub async fn scheduled_jobs_are_promoted_when_due(h: &Harness) {
    let at = h.clock.now() + TimeDelta::seconds(10);
    let j = insert_one(h, job("later").run_at(at)).await;
    assert_eq!(j.state, JobState::Scheduled);
    assert!(promote(h, 100).await.is_empty());
    assert!(lease(h, "later", 10).await.is_empty());
    h.clock.advance(Duration::from_secs(9));
    assert!(promote(h, 100).await.is_empty());
    h.clock.advance(Duration::from_secs(1));
    let promoted = promote(h, 100).await;
    assert_eq!(promoted.len(), 1);
    assert_eq!(
        (promoted[0].queue.as_str(), promoted[0].count),
        ("later", 1)
    );
    assert_eq!(state_of(h, j.id).await, JobState::Available);
    assert_eq!(lease_one(h, "later").await.0.id, j.id);
    // The limit bounds one call.
    let batch: Vec<NewJob> = (0..5)
        .map(|_| job("many").run_at(at + TimeDelta::seconds(1)))
        .collect();
    h.store.insert(batch).await.unwrap();
    h.clock.advance(Duration::from_secs(2));
    let first = promote(h, 3).await;
    assert_eq!(first.iter().map(|p| p.count).sum::<u64>(), 3);
    let rest = promote(h, 3).await;
    assert_eq!(rest.iter().map(|p| p.count).sum::<u64>(), 2);
}

/// A failed attempt is retried at now + the job's backoff, with the error recorded.
pub async fn retry_sets_run_at_from_backoff(h: &Harness) {
    insert_one(h, job("bo").backoff(Backoff::Fixed { delay_ms: 5000 })).await;
    let (j, l) = lease_one(h, "bo").await;
    let failed_at = h.clock.now();
    let after = fail_one(h, l, false).await.unwrap();
    assert_eq!(after.state, JobState::Retryable);
    assert_eq!(after.run_at, failed_at + TimeDelta::seconds(5));
    assert_eq!(after.errors.len(), 1);
    assert_eq!(after.errors[0].attempt, 1);
    assert_eq!(after.errors[0].at, failed_at);
    assert_eq!(after.errors[0].message, "boom");
    assert!(after.lease.is_none() && after.finished_at.is_none());
    assert_eq!(h.store.get(j.id).await.unwrap(), after);
    h.clock.advance(Duration::from_millis(4999));
    promote(h, 10).await;
    assert_eq!(state_of(h, j.id).await, JobState::Retryable);
    h.clock.advance(Duration::from_millis(1));
    promote(h, 10).await;
    assert_eq!(state_of(h, j.id).await, JobState::Available);

    // Exponential with full jitter: within [now, now + window] for each attempt.
    let b = Backoff::Exponential {
        base_ms: 1000,
        cap_ms: 4000,
    };
    insert_one(h, job("exp").backoff(b).max_attempts(10)).await;
    for attempt in 1..=4u32 {
        let (_, l) = lease_one(h, "exp").await;
        let now = h.clock.now();
        let after = fail_one(h, l, false).await.unwrap();
        let window = keel_core::clock::to_delta(b.window(attempt));
        assert!(
            after.run_at >= now && after.run_at <= now + window,
            "attempt {attempt}: {} not in [{now}, +{window}]",
            after.run_at
        );
        h.clock.advance(b.window(attempt));
        promote(h, 10).await;
    }
}

/// A failure that names its own retry time (a `Retry-After`) runs then, not after the
/// backoff, to the microsecond; a time already past means now. Permanence and exhausted
/// attempts still discard.
pub async fn failure_with_retry_at_runs_then(h: &Harness) {
    // The fixed 1 h backoff of `job` would put run_at an hour out.
    insert_one(h, job("ra").max_attempts(3)).await;
    let (j, l) = lease_one(h, "ra").await;
    let now = h.clock.now();
    let asked = now + TimeDelta::seconds(120) + TimeDelta::microseconds(7);
    let after = fail_at(h, l, false, Some(asked)).await.unwrap();
    assert_eq!(after.state, JobState::Retryable);
    assert_eq!(after.run_at, asked);
    assert_eq!(after.errors.len(), 1);
    assert!(after.lease.is_none() && after.finished_at.is_none());
    assert_eq!(h.store.get(j.id).await.unwrap().run_at, asked);
    h.clock.advance(Duration::from_micros(120_000_006));
    promote(h, 10).await;
    assert_eq!(state_of(h, j.id).await, JobState::Retryable);
    h.clock.advance(Duration::from_micros(1));
    promote(h, 10).await;
    assert_eq!(state_of(h, j.id).await, JobState::Available);

    // Sub-microsecond precision is dropped, as for every stored time.
    let (_, l) = lease_one(h, "ra").await;
    let now = h.clock.now();
    let fine = now + TimeDelta::seconds(1) + TimeDelta::nanoseconds(1_500);
    let after = fail_at(h, l, false, Some(fine)).await.unwrap();
    assert_eq!(
        after.run_at,
        now + TimeDelta::seconds(1) + TimeDelta::microseconds(1)
    );
    h.clock.advance(Duration::from_secs(2));
    promote(h, 10).await;

    // The last attempt is discarded whatever the failure asked for.
    let (last, l) = lease_one(h, "ra").await;
    assert_eq!(last.attempt, 3);
    let done = fail_at(h, l, false, Some(h.clock.now() + TimeDelta::seconds(5)))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Discarded);
    assert_eq!(done.finished_at, Some(h.clock.now()));

    // So is a permanent failure with attempts left.
    insert_one(h, job("ra-perm").max_attempts(25)).await;
    let (_, l) = lease_one(h, "ra-perm").await;
    let perm = fail_at(h, l, true, Some(h.clock.now() + TimeDelta::seconds(5)))
        .await
        .unwrap();
    assert_eq!(perm.state, JobState::Discarded);

    // A time in the past means now: due at once, not lost in the past.
    insert_one(h, job("ra-past")).await;
    let (p, l) = lease_one(h, "ra-past").await;
    let now = h.clock.now();
    let past = fail_at(h, l, false, Some(now - TimeDelta::minutes(5)))
        .await
        .unwrap();
    assert_eq!(past.state, JobState::Retryable);
    assert_eq!(past.run_at, now);
    promote(h, 10).await;
    assert_eq!(state_of(h, p.id).await, JobState::Available);
}

/// With two attempts allowed, the second failure discards the job, keeping both errors.
pub async fn failures_exhaust_attempts_then_discard(h: &Harness) {
    insert_one(
        h,
        job("twice")
            .max_attempts(2)
            .backoff(Backoff::Fixed { delay_ms: 0 }),
    )
    .await;
    let (_, l1) = lease_one(h, "twice").await;
    assert_eq!(
        fail_one(h, l1, false).await.unwrap().state,
        JobState::Retryable
    );
    promote(h, 10).await;
    let (j, l2) = lease_one(h, "twice").await;
    assert_eq!(j.attempt, 2);
    let last = fail_one(h, l2, false).await.unwrap();
    assert_eq!(last.state, JobState::Discarded);
    assert_eq!(last.finished_at, Some(h.clock.now()));
    assert_eq!(
        last.errors.iter().map(|e| e.attempt).collect::<Vec<_>>(),
        [1, 2]
    );
}

/// A permanent error discards at once, however many attempts remain.
pub async fn permanent_failure_discards_at_once(h: &Harness) {
    insert_one(h, job("perm").max_attempts(25)).await;
    let (_, l) = lease_one(h, "perm").await;
    let after = fail_one(h, l, true).await.unwrap();
    assert_eq!(after.state, JobState::Discarded);
    assert_eq!(after.attempt, 1);
}

/// Releasing (graceful shutdown) makes the job available again without using an attempt.
pub async fn release_does_not_count_the_attempt(h: &Harness) {
    let j = insert_one(h, job("rel")).await;
    let (leased, l) = lease_one(h, "rel").await;
    assert_eq!(leased.attempt, 1);
    h.store.release(vec![l]).await.unwrap().remove(0).unwrap();
    let after = h.store.get(j.id).await.unwrap();
    assert_eq!(after.state, JobState::Available);
    assert_eq!(after.attempt, 0);
    assert!(after.lease.is_none() && after.errors.is_empty());
    let (again, _) = lease_one(h, "rel").await;
    assert_eq!(again.attempt, 1);
    assert!(matches!(
        h.store.release(vec![l]).await.unwrap().remove(0),
        Err(StoreError::StaleLease(_))
    ));
}

/// Cancelling a running job finishes it and revokes its lease.
pub async fn cancel_revokes_a_running_lease(h: &Harness) {
    insert_one(h, job("cx")).await;
    let (j, l) = lease_one(h, "cx").await;
    let cancelled = h.store.cancel(j.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.finished_at, Some(h.clock.now()));
    assert!(cancelled.lease.is_none());
    assert!(matches!(
        fail_one(h, l, false).await,
        Err(StoreError::StaleLease(_))
    ));
    let again = h.store.cancel(j.id).await.unwrap_err();
    assert!(
        matches!(again, StoreError::IllegalTransition { .. }),
        "{again:?}"
    );
    assert_eq!(
        again.to_string(),
        format!("job {}: cannot cancel a job that is cancelled", j.id)
    );
}

/// Retrying a discarded job makes it available now with one more attempt allowed.
pub async fn retry_of_finished_job_grants_an_attempt(h: &Harness) {
    insert_one(h, job("again").max_attempts(1)).await;
    let (j, l) = lease_one(h, "again").await;
    fail_one(h, l, false).await.unwrap();
    assert_eq!(state_of(h, j.id).await, JobState::Discarded);
    h.clock.advance(Duration::from_secs(5));
    let retried = h.store.retry(j.id).await.unwrap();
    assert_eq!(retried.state, JobState::Available);
    assert_eq!(retried.run_at, h.clock.now());
    assert_eq!(retried.max_attempts, 2);
    assert!(retried.finished_at.is_none());
    assert_eq!(retried.errors.len(), 1, "history is kept");
    let (again, l2) = lease_one(h, "again").await;
    assert_eq!(again.attempt, 2);
    complete_one(h, l2, Some("\"done\"")).await.unwrap();
    // Completed jobs can be retried too; the old result is cleared.
    let r = h.store.retry(j.id).await.unwrap();
    assert!(r.result.is_none());
    assert_eq!(r.state, JobState::Available);
}

/// Paging by id while rows are being inserted returns every pre-existing row exactly once,
/// in ascending order.
pub async fn keyset_pagination_is_stable_under_inserts(h: &Harness) {
    let before: Vec<NewJob> = (0..250).map(|_| job("page")).collect();
    let original: HashSet<JobId> = before.iter().map(|j| j.id).collect();
    h.store.insert(before).await.unwrap();
    let writer = {
        let store = Arc::clone(&h.store);
        tokio::spawn(async move {
            for _ in 0..50 {
                store.insert(vec![job("page"), job("page")]).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut seen: Vec<JobId> = Vec::new();
    let mut after = None;
    loop {
        let page = h
            .store
            .list(ListParams {
                queue: Some(q("page")),
                after,
                limit: 40,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.jobs.len() <= 40);
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next {
            Some(next) => {
                assert_eq!(Some(next), page.jobs.last().map(|j| j.id));
                after = Some(next);
            }
            None => break,
        }
    }
    writer.await.unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ids not strictly ascending"
    );
    let seen_set: HashSet<JobId> = seen.iter().copied().collect();
    assert_eq!(seen_set.len(), seen.len(), "a row appeared twice");
    assert!(
        original.is_subset(&seen_set),
        "a pre-existing row was skipped"
    );
}

/// Each filter, alone and combined, returns exactly the matching rows.
pub async fn list_filters_match_rows(h: &Harness) {
    let t1 = TenantId::parse("t1").unwrap();
    let mut batch = Vec::new();
    for i in 0..24 {
        let mut j = job(if i % 2 == 0 { "even" } else { "odd" });
        if i % 3 == 0 {
            j = j.tenant(t1.clone());
        }
        if i % 4 == 0 {
            j.kind = kind("other");
        }
        batch.push(j);
    }
    let all = h.store.insert(batch).await.unwrap();
    for _ in 0..3 {
        lease_one(h, "even").await;
    }
    let all: Vec<Job> = {
        let mut v = Vec::new();
        for j in &all {
            v.push(h.store.get(j.id).await.unwrap());
        }
        v
    };
    type Matches = Box<dyn Fn(&Job) -> bool>;
    let cases: Vec<(ListParams, Matches)> = vec![
        (
            ListParams {
                queue: Some(q("even")),
                ..Default::default()
            },
            Box::new(|j| j.queue.as_str() == "even"),
        ),
        (
            ListParams {
                tenant: Some(t1.clone()),
                ..Default::default()
            },
            Box::new(|j| j.tenant.as_str() == "t1"),
        ),
        (
            ListParams {
                kind: Some(kind("other")),
                ..Default::default()
            },
            Box::new(|j| j.kind.as_str() == "other"),
        ),
        (
            ListParams {
                state: Some(JobState::Running),
                ..Default::default()
            },
            Box::new(|j| j.state == JobState::Running),
        ),
        (
            ListParams {
                queue: Some(q("even")),
                state: Some(JobState::Available),
                tenant: Some(t1.clone()),
                ..Default::default()
            },
            Box::new(|j| {
                j.queue.as_str() == "even"
                    && j.state == JobState::Available
                    && j.tenant.as_str() == "t1"
            }),
        ),
    ];
    for (mut params, pred) in cases {
        params.limit = 1000;
        let desc = format!("{params:?}");
        let got: Vec<JobId> = h
            .store
            .list(params)
            .await
            .unwrap()
            .jobs
            .iter()
            .map(|j| j.id)
            .collect();
        let mut want: Vec<JobId> = all.iter().filter(|j| pred(j)).map(|j| j.id).collect();
        want.sort();
        assert!(!want.is_empty(), "case matches nothing: {desc}");
        assert_eq!(got, want, "{desc}");
    }
}

/// Retention deletes finished jobs older than the cutoff, at most `limit` per call, and
/// nothing else.
pub async fn retention_deletes_only_old_finished_jobs(h: &Harness) {
    let mut old = Vec::new();
    for s in [
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ] {
        old.push(job_in_state(h, s, "ret").await.0.id);
    }
    let running = job_in_state(h, JobState::Running, "ret-run").await.0.id;
    let waiting = job_in_state(h, JobState::Available, "ret").await.0.id;
    h.clock.advance(Duration::from_secs(3600));
    let cutoff = h.clock.now();
    let recent = job_in_state(h, JobState::Completed, "ret-new").await.0.id;
    let n1 = purge(h, cutoff, 2).await;
    let n2 = purge(h, cutoff, 2).await;
    let n3 = purge(h, cutoff, 2).await;
    assert_eq!((n1, n2, n3), (2, 1, 0));
    for id in old {
        assert!(matches!(
            h.store.get(id).await,
            Err(StoreError::NotFound(_))
        ));
    }
    for id in [running, waiting, recent] {
        assert!(h.store.get(id).await.is_ok(), "{id} should be kept");
    }
}

/// Statistics agree with the rows; the depths are the same counts without the finished
/// jobs (and without the queues that hold only finished ones).
pub async fn queue_stats_match_rows(h: &Harness) {
    let mut n = 0;
    for (queue, states) in [
        (
            "s1",
            vec![
                JobState::Available,
                JobState::Available,
                JobState::Running,
                JobState::Completed,
            ],
        ),
        (
            "s2",
            vec![
                JobState::Scheduled,
                JobState::Retryable,
                JobState::Discarded,
                JobState::Cancelled,
            ],
        ),
    ] {
        for s in states {
            n += 1;
            // Each setup gets its own queue for leasing, then we count by the job's queue.
            let (j, _) = job_in_state(h, s, &format!("{queue}x{n}")).await;
            let _ = j;
        }
    }
    let stats = h.store.queue_stats(None).await.unwrap();
    let mut want: BTreeMap<String, StateCounts> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = h
            .store
            .list(ListParams {
                after,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        for j in &page.jobs {
            want.entry(j.queue.to_string()).or_default().add(j.state, 1);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let got: BTreeMap<String, StateCounts> = stats
        .into_iter()
        .map(|s| (s.queue.to_string(), s.counts))
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.values().map(|c| c.total()).sum::<u64>(), n as u64);

    let depths: BTreeMap<String, StateCounts> = h
        .store
        .queue_depths()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.queue.to_string(), s.counts))
        .collect();
    let unfinished: BTreeMap<String, StateCounts> = want
        .into_iter()
        .filter_map(|(queue, mut c)| {
            c.completed = 0;
            c.discarded = 0;
            c.cancelled = 0;
            (c.total() > 0).then_some((queue, c))
        })
        .collect();
    assert_eq!(depths, unfinished);
    assert_eq!(
        depths.values().map(|c| c.total()).sum::<u64>(),
        5,
        "two available, one running, one scheduled, one retryable"
    );
}

/// Results are stored and returned byte for byte.
pub async fn results_round_trip_byte_for_byte(h: &Harness) {
    insert_one(h, job("res")).await;
    let (j, l) = lease_one(h, "res").await;
    let body = r#"{"b": 2, "a":  [true, "é\u00e9"]}"#;
    complete_one(h, l, Some(body)).await.unwrap();
    let done = h.store.get(j.id).await.unwrap();
    assert_eq!(done.result.unwrap().get(), body);
    assert_eq!(done.finished_at, Some(h.clock.now()));
}

/// Values no client may store, sent straight to the store (past every API check): both
/// backends refuse them the same way, as the caller's fault (`invalid` or `rejected`, never
/// `transient` or `permanent`, which would count against the database's health), store
/// nothing, and go on working. A NUL in a failure message is replaced, identically.
pub async fn hostile_values_are_refused_as_the_callers_fault(h: &Harness) {
    let callers_fault = |e: &StoreError| matches!(e.class(), "invalid" | "rejected");
    let deep = format!("{}0{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut tagged = job("hostile");
    tagged.tags = vec!["a\0b".to_owned()];
    for bad in [
        job("hostile").args(raw(&deep)),
        job("hostile").args(raw(r#"{"a":"\ud800"}"#)),
        tagged,
    ] {
        let e = h.store.insert(vec![bad]).await.unwrap_err();
        assert!(callers_fault(&e), "{e:?}");
    }
    assert!(
        h.store
            .list(ListParams {
                queue: Some(q("hostile")),
                limit: 10,
                ..ListParams::default()
            })
            .await
            .unwrap()
            .jobs
            .is_empty(),
        "nothing was stored"
    );

    // Results: refused per item, and the job stays running under its lease.
    insert_one(h, job("hostile")).await;
    let (j, l) = lease_one(h, "hostile").await;
    for bad in [deep.as_str(), r#""\udc00""#] {
        let e = complete_one(h, l, Some(bad)).await.unwrap_err();
        assert_eq!(e.class(), "rejected", "{e:?}");
    }
    assert_eq!(h.store.get(j.id).await.unwrap().state, JobState::Running);
    complete_one(h, l, Some(r#"{"ok":"\u0000 is a character"}"#))
        .await
        .unwrap();
    let done = h.store.get(j.id).await.unwrap();
    assert_eq!(
        done.result.unwrap().get(),
        r#"{"ok":"\u0000 is a character"}"#,
        "kept as sent"
    );

    // A failure message with NUL in it is stored, NUL replaced.
    insert_one(h, job("hostile")).await;
    let (j, l) = lease_one(h, "hostile").await;
    let failed = h
        .store
        .fail(FailParams {
            lease: l,
            error: "bad\0byte".into(),
            permanent: true,
            retry_at: None,
        })
        .await
        .unwrap();
    assert_eq!(failed.errors[0].message, "bad\u{FFFD}byte");
    assert_eq!(
        h.store.get(j.id).await.unwrap().errors[0].message,
        "bad\u{FFFD}byte"
    );

    // And the store goes on.
    insert_one(h, job("hostile")).await;
}

/// A paused queue leases nothing until resumed; enqueueing into it still works, and the
/// flag shows in the statistics (even for a queue without jobs).
pub async fn paused_queues_are_not_leased(h: &Harness) {
    h.store.set_queue_paused(q("held"), true).await.unwrap();
    h.store.set_queue_paused(q("empty"), true).await.unwrap();
    let j = insert_one(h, job("held")).await;
    insert_one(h, job("free")).await;
    assert!(lease(h, "held", 10).await.is_empty());
    assert_eq!(
        lease(h, "free", 10).await.len(),
        1,
        "other queues are unaffected"
    );
    let stats = h.store.queue_stats(None).await.unwrap();
    let paused: Vec<(&str, bool)> = stats.iter().map(|s| (s.queue.as_str(), s.paused)).collect();
    assert_eq!(paused, [("empty", true), ("free", false), ("held", true)]);
    assert_eq!(stats[2].counts.available, 1);
    let depths = h.store.queue_depths().await.unwrap();
    let flags: Vec<(&str, bool)> = depths
        .iter()
        .map(|s| (s.queue.as_str(), s.paused))
        .collect();
    assert_eq!(flags, [("empty", true), ("free", false), ("held", true)]);
    assert_eq!(depths[2].counts.available, 1);
    h.store.set_queue_paused(q("held"), false).await.unwrap();
    assert_eq!(lease_one(h, "held").await.0.id, j.id);
    let stats = h.store.queue_stats(None).await.unwrap();
    assert!(
        stats
            .iter()
            .all(|s| s.queue.as_str() == "empty" || !s.paused)
    );
}

fn idem(
    tenant: &str,
    key: &str,
    fingerprint: &str,
    jobs: Vec<NewJob>,
    ttl: Duration,
) -> IdempotentInsert {
    IdempotentInsert {
        tenant: TenantId::parse(tenant).unwrap(),
        key: IdempotencyKey::parse(key).unwrap(),
        fingerprint: fingerprint.to_owned(),
        jobs,
        ttl,
        respond: Box::new(|jobs: &[Job]| StoredResponse {
            status: 201,
            body: format!("{{\"id\":\"{}\"}}", jobs[0].id).into_bytes(),
        }),
    }
}

async fn count_jobs(h: &Harness, queue: &str) -> usize {
    let page = h
        .store
        .list(ListParams {
            queue: Some(q(queue)),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    page.jobs.len()
}

/// The same key and request replays the stored response without inserting; the same key
/// with another request is a conflict; keys are scoped per tenant.
pub async fn idempotent_insert_replays_and_conflicts(h: &Harness) {
    let ttl = Duration::from_secs(3600);
    let first = h
        .store
        .insert_idempotent(idem("t1", "k-1", "fp-a", vec![job("idem")], ttl))
        .await
        .unwrap();
    let IdempotentOutcome::Created { jobs, response } = first else {
        panic!("first use must create");
    };
    assert_eq!(response.status, 201);
    assert_eq!(
        response.body,
        format!("{{\"id\":\"{}\"}}", jobs[0].id).into_bytes()
    );
    assert_eq!(h.store.get(jobs[0].id).await.unwrap(), jobs[0]);
    match h
        .store
        .insert_idempotent(idem("t1", "k-1", "fp-a", vec![job("idem")], ttl))
        .await
        .unwrap()
    {
        IdempotentOutcome::Replayed(r) => assert_eq!(r, response),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(count_jobs(h, "idem").await, 1, "a replay inserted a job");
    let err = h
        .store
        .insert_idempotent(idem("t1", "k-1", "fp-b", vec![job("idem")], ttl))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(err.to_string().contains("different request"), "{err}");
    // Another tenant may use the same key independently.
    let other = h
        .store
        .insert_idempotent(idem("t2", "k-1", "fp-b", vec![job("idem")], ttl))
        .await
        .unwrap();
    assert!(matches!(other, IdempotentOutcome::Created { .. }));
    assert_eq!(count_jobs(h, "idem").await, 2);
}

/// Fifty concurrent first uses of one key create exactly one job, and all fifty callers get
/// the identical response.
pub async fn idempotent_first_use_is_exclusive_under_concurrency(h: &Harness) {
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let store = Arc::clone(&h.store);
        tasks.push(tokio::spawn(async move {
            store
                .insert_idempotent(idem(
                    "race",
                    "same-key",
                    "fp",
                    vec![job("idem-race")],
                    Duration::from_secs(60),
                ))
                .await
        }));
    }
    let mut created = 0;
    let mut bodies = HashSet::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            IdempotentOutcome::Created { response, .. } => {
                created += 1;
                bodies.insert(response.body);
            }
            IdempotentOutcome::Replayed(r) => {
                bodies.insert(r.body);
            }
        }
    }
    assert_eq!(created, 1);
    assert_eq!(bodies.len(), 1, "callers saw different responses");
    assert_eq!(count_jobs(h, "idem-race").await, 1);
}

/// A key is forgotten after its time to live: it can then be reused with any request, and
/// the cleaner deletes expired keys.
pub async fn idempotency_keys_expire(h: &Harness) {
    let ttl = Duration::from_secs(60);
    h.store
        .insert_idempotent(idem("t", "old", "fp-a", vec![job("exp-idem")], ttl))
        .await
        .unwrap();
    h.store
        .insert_idempotent(idem("t", "gone", "fp-a", vec![job("exp-idem")], ttl))
        .await
        .unwrap();
    h.clock.advance(Duration::from_secs(59));
    assert_eq!(
        h.store.delete_expired_idempotency_keys(100).await.unwrap(),
        0
    );
    let reused = h
        .store
        .insert_idempotent(idem("t", "old", "fp-b", vec![job("exp-idem")], ttl))
        .await;
    assert!(
        matches!(reused, Err(StoreError::Conflict(_))),
        "a live key reused with another request is a conflict: {reused:?}"
    );
    h.clock.advance(Duration::from_secs(1));
    let reused = h
        .store
        .insert_idempotent(idem("t", "old", "fp-b", vec![job("exp-idem")], ttl))
        .await
        .unwrap();
    assert!(
        matches!(reused, IdempotentOutcome::Created { .. }),
        "an expired key must not replay"
    );
    assert_eq!(
        h.store.delete_expired_idempotency_keys(100).await.unwrap(),
        1,
        "only 'gone' is expired now"
    );
    assert_eq!(count_jobs(h, "exp-idem").await, 3);
}

/// An invalid job fails an idempotent insert without storing the key, so a corrected retry
/// with the same key succeeds.
pub async fn idempotent_insert_of_invalid_job_stores_no_key(h: &Harness) {
    let ttl = Duration::from_secs(60);
    let err = h
        .store
        .insert_idempotent(idem(
            "t",
            "fixme",
            "fp-bad",
            vec![job("idem-bad").max_attempts(0)],
            ttl,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid { index: 0, .. }),
        "{err:?}"
    );
    let ok = h
        .store
        .insert_idempotent(idem("t", "fixme", "fp-good", vec![job("idem-bad")], ttl))
        .await
        .unwrap();
    assert!(matches!(ok, IdempotentOutcome::Created { .. }));
}
