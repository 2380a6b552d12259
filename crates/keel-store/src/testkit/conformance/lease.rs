//! Running jobs: lease order and exclusivity, fencing by lease token, and what a failure or a
//! release does to the next attempt.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use keel_core::store::{Completion, LeaseParams, LeaseRef};
use keel_core::{
    Backoff, Clock as _, Job, JobId, JobState, LeaseToken, NewJob, Priority, StoreError, TenantId,
};

use super::{
    Harness, LEASE_FOR, complete_one, fail_at, fail_one, heartbeat_one, insert_one, job, kind,
    lease, lease_one, owner, promote, q, raw, state_of,
};

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

/// Heartbeat, complete, fail and release all refuse a token that is not the current one.
pub async fn stale_tokens_are_fenced_off(h: &Harness) {
    let j = insert_one(h, job("fence")).await;
    let (_, real) = lease_one(h, "fence").await;
    let forged = LeaseRef {
        id: j.id,
        token: LeaseToken::new(),
    };
    let hb = heartbeat_one(h, forged).await;
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
    promoted_exactly_after(
        h,
        j.id,
        Duration::from_millis(4999),
        Duration::from_millis(1),
    )
    .await;

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
    promoted_exactly_after(
        h,
        j.id,
        Duration::from_micros(120_000_006),
        Duration::from_micros(1),
    )
    .await;

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

/// Retryable job `id` is still retryable (not promoted) after `wait`, and promoted to
/// available once `step` more has passed: its retry time is exact to `step`.
async fn promoted_exactly_after(h: &Harness, id: JobId, wait: Duration, step: Duration) {
    h.clock.advance(wait);
    promote(h, 10).await;
    assert_eq!(state_of(h, id).await, JobState::Retryable);
    h.clock.advance(step);
    promote(h, 10).await;
    assert_eq!(state_of(h, id).await, JobState::Available);
}
