//! Enqueues under an idempotency key (G3): replays, conflicts, exclusivity and expiry.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::StoreError;
use keel_core::store::IdempotentOutcome;

use super::{Harness, count_jobs, idem, job};

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
