//! Unique jobs: at most one job per key and scope, held and freed by the database across
//! replicas.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::store::IdempotentOutcome;
use keel_core::{
    Clock as _, Job, JobId, JobState, NewJob, StoreError, UniqueHold, UniqueScope, UniqueScopeKind,
};

use super::{
    Harness, complete_one, count_jobs, fail_one, idem, insert_one, job, lease_one, q, tenant,
};

/// A job in `queue` unique by `key` within `scope`.
fn unique(queue: &str, key: &str, scope: UniqueScope) -> NewJob {
    job(queue).unique(key, scope)
}

/// The id the store answers for a unique job with `key`: a duplicate of a held key returns
/// the holder, a free key a new job.
async fn holder_of(h: &Harness, queue: &str, key: &str, scope: UniqueScope) -> JobId {
    insert_one(h, unique(queue, key, scope)).await.id
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
        holder_of(h, "uq", "debounce", UniqueScope::Queued).await,
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
        holder_of(h, "uq", "debounce", UniqueScope::Queued).await,
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
        holder_of(h, "ua", "sync", UniqueScope::Active).await,
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
        holder_of(h, "ua", "sync", UniqueScope::Active).await,
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
        holder_of(h, "up", "digest", scope).await,
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
        holder_of(h, "u-idem", "twice", UniqueScope::Active).await,
        jobs[0].id
    );
    assert_eq!(count_jobs(h, "u-idem").await, 2);
}
