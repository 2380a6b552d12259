//! The conformance suite: what every [`Store`](keel_core::Store) must do, checked against a
//! real database.
//!
//! Each case is a public async fn taking a fresh [`Harness`]; the
//! [`conformance_suite!`](crate::conformance_suite) macro turns the whole list into one
//! `#[tokio::test]` per case for a backend, so a failure names both the case and the
//! backend. Time moves only through the harness's [`ManualClock`](keel_core::ManualClock):
//! no case sleeps.

use std::time::Duration;

use chrono::TimeDelta;
use keel_core::store::{
    CampaignParams, Completion, FailParams, HeartbeatParams, IdempotentInsert, LeaseParams,
    LeaseRef, ListParams, PromoteParams, Promoted, RescueParams, Rescued, RetentionParams,
    StoredResponse,
};
use keel_core::{
    Backoff, Clock, IdempotencyKey, Job, JobId, JobKind, JobState, NewJob, QueueName, ScheduleName,
    StoreError, TenantId, Timestamp, WorkerId,
};
use serde_json::value::RawValue;

use super::Harness;

mod idempotency;
mod jobs;
mod leader;
mod lease;
mod maintenance;
mod queues;
mod schedules;
mod unique;

pub use idempotency::*;
pub use jobs::*;
pub use leader::*;
pub use lease::*;
pub use maintenance::*;
pub use queues::*;
pub use schedules::*;
pub use unique::*;

/// Stamps out every conformance case as a `#[tokio::test]`. The argument is a callable
/// taking the test's name (`&'static str`) and returning a future of `Option<Harness>`
/// (`None` = skipped).
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        $crate::conformance_suite!(@cases $harness;
            insert_and_get_round_trip,
            meta_round_trips_on_every_insert_path,
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
            one_queue_stats_match_its_entry,
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

/// Extends one lease by [`LEASE_FOR`]: the new expiry, or why the store refused.
async fn heartbeat_one(h: &Harness, lease: LeaseRef) -> Result<Timestamp, StoreError> {
    h.store
        .heartbeat(HeartbeatParams {
            leases: vec![lease],
            lease_for: LEASE_FOR,
        })
        .await
        .expect("heartbeat batch")
        .remove(0)
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

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("test tenants are valid")
}

fn replica(name: &str) -> WorkerId {
    WorkerId::parse(name).expect("test worker ids are valid")
}

fn schedule_name(name: &str) -> ScheduleName {
    ScheduleName::parse(name).expect("test schedule names are valid")
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
