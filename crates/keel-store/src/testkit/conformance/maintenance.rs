//! Maintenance: promoting due jobs, rescuing expired leases, and retention.

use std::time::Duration;

use chrono::TimeDelta;
use keel_core::{Backoff, Clock as _, JobState, NewJob, StoreError};

use super::{
    Harness, LEASE_FOR, complete_one, fail_one, heartbeat_one, insert_one, job, job_in_state,
    lease, lease_one, owner, promote, purge, rescue, state_of,
};

/// A heartbeat keeps a lease alive; once it lapses the rescuer takes the job back as a
/// failed attempt, and the old holder's token is void.
pub async fn lease_expiry_and_rescue(h: &Harness) {
    let inserted = insert_one(h, job("rescue").backoff(Backoff::Fixed { delay_ms: 1000 })).await;
    let (leased, lease) = lease_one(h, "rescue").await;
    assert_eq!(leased.id, inserted.id);
    h.clock.advance(Duration::from_secs(29));
    assert!(rescue(h, 100).await.is_empty());
    let renewed = heartbeat_one(h, lease).await.unwrap();
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
