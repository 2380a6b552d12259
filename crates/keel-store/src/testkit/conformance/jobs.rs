//! Jobs as clients see them: insert, read, list, cancel, retry, and the state machine behind them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use keel_core::store::{FailParams, LeaseRef, ListParams};
use keel_core::{
    Backoff, Clock as _, Job, JobId, JobState, LeaseToken, NewJob, Priority, StoreError, TenantId,
    Transition,
};

use super::{
    Harness, LEASE_FOR, complete_one, fail_one, insert_one, job, job_in_state_with, kind, lease,
    lease_one, promote, q, raw, rescue, state_of,
};

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

/// `meta` is kept byte for byte on every insert path (plain, unique, under an idempotency
/// key) and comes back with reads and leases; a job without it has none.
pub async fn meta_round_trips_on_every_insert_path(h: &Harness) {
    let text = r#"{"trace": "t-1",  "n":[1, 2.50]}"#;
    let with_meta = |queue: &str| job(queue).meta(raw(text));
    let plain = insert_one(h, with_meta("meta")).await;
    let unique = insert_one(
        h,
        with_meta("meta").unique("meta-key", keel_core::UniqueScope::Active),
    )
    .await;
    let keyed = match h
        .store
        .insert_idempotent(super::idem(
            "default",
            "meta-k",
            "fp",
            vec![with_meta("meta")],
            Duration::from_secs(60),
        ))
        .await
        .unwrap()
    {
        keel_core::store::IdempotentOutcome::Created { jobs, .. } => jobs[0].clone(),
        other => panic!("first use must create, got {other:?}"),
    };
    let bare = insert_one(h, job("meta")).await;
    for inserted in [&plain, &unique, &keyed] {
        let got = h.store.get(inserted.id).await.unwrap();
        assert_eq!(got.meta.as_ref().map(|m| m.get()), Some(text));
        assert_eq!(&got, inserted);
    }
    assert!(h.store.get(bare.id).await.unwrap().meta.is_none());
    let leased = lease(h, "meta", 10).await;
    assert_eq!(leased.len(), 4);
    for j in leased {
        let expected = (j.id != bare.id).then_some(text);
        assert_eq!(j.meta.as_ref().map(|m| m.get()), expected, "{}", j.id);
    }
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
    // Three running, two of them then completed: every listing index is left out by some
    // state on some backend (running on both, completed on Postgres).
    for i in 0..3 {
        let (_, lease) = lease_one(h, "even").await;
        if i < 2 {
            complete_one(h, lease, None).await.unwrap();
        }
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
                state: Some(JobState::Completed),
                ..Default::default()
            },
            Box::new(|j| j.state == JobState::Completed),
        ),
        (
            ListParams {
                queue: Some(q("even")),
                state: Some(JobState::Completed),
                tenant: Some(t1.clone()),
                ..Default::default()
            },
            Box::new(|j| {
                j.queue.as_str() == "even"
                    && j.state == JobState::Completed
                    && j.tenant.as_str() == "t1"
            }),
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
