//! Writes: group commit (shared commits, one caller's duplicate failing only that caller,
//! close answering every caller), idempotent claims, pausing, heartbeats overlapping
//! completions without deadlock, heartbeats that skip rows being written, and heartbeats
//! and releases of thousands of leases.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{
    Clock, JobStore, ManualClock, QueueName, QueueStore, Store, StoreError, WorkStore,
};

use super::{
    count_jobs, count_jobs_where, eventually, keyed_request, lease_from, noop, schema_or_skip,
    store_in, store_with_clock,
};
use crate::postgres::PgOptions;

#[tokio::test]
async fn duplicate_ids_are_conflicts_naming_the_key() {
    let Some(schema) =
        schema_or_skip("postgres::tests::duplicate_ids_are_conflicts_naming_the_key").await
    else {
        return;
    };
    let store = store_in(&schema, PgOptions::for_tests()).await;
    let job = keel_core::NewJob::new(keel_core::JobKind::parse("noop").expect("valid kind"));
    store.insert(vec![job.clone()]).await.expect("first insert");
    let err = store
        .insert(vec![job.clone()])
        .await
        .expect_err("duplicate");
    match &err {
        StoreError::Conflict(msg) => assert!(msg.contains(&job.id.to_string()), "{msg}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    store.close().await;
}

/// A first use that finds the key inserted by a transaction still in flight waits for it
/// (no error, no guess), then follows its outcome: committed with another request, the key
/// is taken (conflict, nothing inserted); rolled back, the key is free and the waiter
/// creates. This is the wait the conformance suite's 50-way race relies on, made visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_claim_waits_for_an_unfinished_holder() {
    use keel_core::store::IdempotentOutcome;
    let Some(schema) =
        schema_or_skip("postgres::tests::idempotent_claim_waits_for_an_unfinished_holder").await
    else {
        return;
    };
    let store = Arc::new(store_in(&schema, PgOptions::for_tests()).await);
    let watcher = store.pool().get().await.expect("connection");
    for commit in [true, false] {
        let key = if commit {
            "held-then-committed"
        } else {
            "held-then-rolled-back"
        };
        let mut holder = store.pool().get().await.expect("connection");
        let tx = holder.transaction().await.expect("begin");
        tx.execute(
            "INSERT INTO idempotency_keys \
             (tenant, key, fingerprint, status, body, created_at, expires_at) \
             VALUES ('t', $1, 'theirs', 200, '\\x'::bytea, now(), now() + interval '1 hour')",
            &[&key],
        )
        .await
        .expect("hold the key");
        let xid: String = tx
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await
            .expect("holder's transaction id")
            .get(0);
        let task = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.insert_idempotent(keyed_request(key)).await }
        });
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let waiting: i64 = watcher
                    .query_one(
                        "SELECT count(*) FROM pg_locks \
                         WHERE NOT granted AND locktype = 'transactionid' \
                           AND transactionid::text = $1",
                        &[&xid],
                    )
                    .await
                    .expect("read pg_locks")
                    .get(0);
                if waiting > 0 {
                    break;
                }
                assert!(!task.is_finished(), "the claim did not wait for the holder");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the claim blocked on the holder");
        if commit {
            tx.commit().await.expect("commit the holder");
        } else {
            tx.rollback().await.expect("roll the holder back");
        }
        let outcome = task.await.expect("task");
        let stored: String = watcher
            .query_one(
                "SELECT fingerprint FROM idempotency_keys WHERE tenant = 't' AND key = $1",
                &[&key],
            )
            .await
            .expect("the key is stored")
            .get(0);
        let jobs: i64 = watcher
            .query_one("SELECT count(*) FROM jobs", &[])
            .await
            .expect("count jobs")
            .get(0);
        if commit {
            match outcome {
                Err(StoreError::Conflict(msg)) => {
                    assert!(msg.contains("different request"), "{msg}");
                }
                other => panic!("expected a conflict, got {other:?}"),
            }
            assert_eq!(stored, "theirs");
            assert_eq!(jobs, 0, "the loser inserted jobs");
        } else {
            match outcome {
                Ok(IdempotentOutcome::Created { jobs, response }) => {
                    assert_eq!(response.body, jobs[0].id.to_string().into_bytes());
                }
                other => panic!("expected the waiter to create, got {other:?}"),
            }
            assert_eq!(stored, "mine");
            assert_eq!(jobs, 1);
        }
    }
    drop(watcher);
    store.close().await;
}

/// Pausing and resuming write the flag and the store's clock; resuming keeps the row, so
/// the queue still shows in the statistics.
#[tokio::test]
async fn pausing_records_the_flag_and_time() {
    let Some(schema) = schema_or_skip("postgres::tests::pausing_records_the_flag_and_time").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let store = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let queue = QueueName::parse("mail").expect("valid queue");
    store
        .set_queue_paused(queue.clone(), true)
        .await
        .expect("pause");
    let paused_at = clock.now();
    clock.advance(Duration::from_secs(5));
    store
        .set_queue_paused(queue.clone(), false)
        .await
        .expect("resume");
    let conn = store.pool().get().await.expect("connection");
    let rows = conn
        .query("SELECT name, paused, updated_at FROM queues", &[])
        .await
        .expect("read queues");
    assert_eq!(rows.len(), 1);
    let (name, paused, updated_at): (String, bool, keel_core::Timestamp) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((name.as_str(), paused), ("mail", false));
    assert_eq!(updated_at, clock.now());
    assert!(updated_at > paused_at);
    drop(conn);
    store.close().await;
}

/// Two hundred callers inserting one job each at the same moment are all answered, every
/// job is stored, and the committer wrote them in a handful of statements, not two hundred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_share_commits() {
    let Some(schema) = schema_or_skip("postgres::tests::concurrent_inserts_share_commits").await
    else {
        return;
    };
    let store = Arc::new(store_in(&schema, PgOptions::for_tests()).await);
    const CALLERS: usize = 200;
    let start = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                store.insert(vec![noop()]).await
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        let jobs = t.await.expect("task").expect("insert");
        assert_eq!(jobs.len(), 1);
        ids.insert(jobs[0].id);
    }
    assert_eq!(ids.len(), CALLERS);
    assert_eq!(count_jobs(&store).await, CALLERS as i64);
    let stats = store.committer.stats();
    let commits = stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        CALLERS as u64
    );
    assert!(
        commits <= 20,
        "{CALLERS} concurrent inserts took {commits} commits; group commit should merge them"
    );
    store.close().await;
}

/// Callers merged into one batch: one whose job id is already stored and one whose own
/// jobs repeat an id each get a conflict; the others' jobs are stored. The batch is forced
/// by holding a lock that blocks inserts until every caller has queued behind the only
/// commit slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_callers_duplicate_fails_only_that_caller() {
    let Some(schema) =
        schema_or_skip("postgres::tests::one_callers_duplicate_fails_only_that_caller").await
    else {
        return;
    };
    let opts = PgOptions {
        insert_commits: 1,
        ..PgOptions::for_tests()
    };
    let store = Arc::new(store_in(&schema, opts).await);
    let existing = noop();
    store
        .insert(vec![existing.clone()])
        .await
        .expect("first insert");

    let mut holder = store.pool().get().await.expect("connection");
    let watcher = store.pool().get().await.expect("connection");
    let tx = holder.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE jobs IN SHARE MODE")
        .await
        .expect("block inserts");
    let spawn_insert = |jobs: Vec<keel_core::NewJob>| {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.insert(jobs).await })
    };
    // Takes the only commit slot and waits on the lock.
    let blocker = spawn_insert(vec![noop()]);
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'jobs'::regclass",
                    &[],
                )
                .await
                .expect("read pg_locks")
                .get(0);
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first insert blocked on the lock");
    let repeated = noop();
    let good_a = vec![noop(), noop()];
    let good_b = vec![noop()];
    let callers = [
        spawn_insert(good_a.clone()),
        spawn_insert(vec![existing.clone(), noop()]),
        spawn_insert(vec![repeated.clone(), repeated.clone()]),
        spawn_insert(good_b.clone()),
    ];
    eventually("every caller to queue behind the blocked commit", || {
        store.committer.queued() == callers.len()
    })
    .await;
    tx.commit().await.expect("release the lock");
    blocker.await.expect("task").expect("the blocked insert");
    let [a, existing_caller, repeated_caller, b] = callers;
    let stored_a = a.await.expect("task").expect("caller a is unaffected");
    let stored_b = b.await.expect("task").expect("caller b is unaffected");
    for (what, outcome) in [
        ("an id already stored", existing_caller.await.expect("task")),
        (
            "an id repeated in the call",
            repeated_caller.await.expect("task"),
        ),
    ] {
        match outcome {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{what}: expected a conflict, got {other:?}"),
        }
    }
    assert_eq!(
        stored_a.iter().map(|j| j.id).collect::<Vec<_>>(),
        good_a.iter().map(|j| j.id).collect::<Vec<_>>()
    );
    assert_eq!(stored_b[0].id, good_b[0].id);
    let ids: Vec<uuid::Uuid> = watcher
        .query("SELECT id FROM jobs", &[])
        .await
        .expect("read ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The first insert, the blocker, and a's and b's three; nothing of the two that failed.
    assert_eq!(ids.len(), 5, "{ids:?}");
    for job in good_a.iter().chain(&good_b) {
        assert!(ids.contains(job.id.as_uuid()), "{} was not stored", job.id);
    }
    assert!(!ids.contains(repeated.id.as_uuid()));
    drop((holder, watcher));
    store.close().await;
}

/// Inserts racing with close are each either stored and answered Ok, or refused and not
/// stored; none hangs. After close, inserts fail and wakeup streams end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_answers_every_insert() {
    let Some(schema) = schema_or_skip("postgres::tests::close_answers_every_insert").await else {
        return;
    };
    let store = Arc::new(store_in(&schema, PgOptions::for_tests()).await);
    let mut wakeups = store.wakeups().expect("Postgres delivers wakeups");
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.insert(vec![noop()]).await })
        })
        .collect();
    tokio::task::yield_now().await;
    tokio::time::timeout(Duration::from_secs(10), store.close())
        .await
        .expect("close finishes");
    let mut ok = 0;
    for t in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("every caller is answered")
            .expect("task");
        match outcome {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.class(), "permanent", "{e:?}"),
        }
    }
    let err = store.insert(vec![noop()]).await.expect_err("closed");
    assert_eq!(err.class(), "permanent", "{err:?}");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), wakeups.next())
            .await
            .expect("the stream ends")
            .is_none()
    );
    // Read through a store of its own: the closed one has no pool left.
    let reader = store_in(&schema, PgOptions::for_tests()).await;
    assert_eq!(count_jobs(&reader).await, ok);
    reader.close().await;
}

/// Heartbeats and completions over the same running jobs, each batch in a random order,
/// must never deadlock: a completion's update reaches its rows, and locks them, in id order
/// (migration 14), and a heartbeat waits for no lock. Without the sort in keel_complete this
/// fails with 40P01 (checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_heartbeats_and_completions_do_not_deadlock() {
    use keel_core::store::{Completion, HeartbeatParams, LeaseRef};
    use rand::seq::SliceRandom;

    let Some(schema) =
        schema_or_skip("postgres::tests::overlapping_heartbeats_and_completions_do_not_deadlock")
            .await
    else {
        return;
    };
    let store = Arc::new(store_in(&schema, PgOptions::for_tests()).await);
    for round in 0..5 {
        let q = QueueName::parse(format!("dl{round}")).expect("valid queue");
        let jobs: Vec<keel_core::NewJob> = (0..400)
            .map(|_| {
                keel_core::NewJob::new(keel_core::JobKind::parse("noop").expect("kind"))
                    .queue(q.clone())
            })
            .collect();
        store.insert(jobs).await.expect("insert");
        let leased = lease_from(&store, &q, 400).await;
        let leases: Vec<LeaseRef> = leased.iter().filter_map(LeaseRef::of).collect();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let store = Arc::clone(&store);
            let mut mine = leases.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    mine.shuffle(&mut rand::rng());
                    if t % 2 == 0 {
                        store
                            .heartbeat(HeartbeatParams {
                                leases: mine.clone(),
                                lease_for: Duration::from_secs(60),
                            })
                            .await?;
                    } else {
                        let chunk: Vec<Completion> = mine[..50]
                            .iter()
                            .map(|l| Completion {
                                lease: *l,
                                result: None,
                            })
                            .collect();
                        store.complete(chunk).await?;
                    }
                }
                Ok::<(), StoreError>(())
            }));
        }
        for t in tasks {
            t.await
                .expect("task")
                .expect("no batch may fail (a deadlock is a 40P01 error)");
        }
    }
    store.close().await;
}

/// The lease commits without waiting for its WAL flush (migration 11), and only the lease:
/// the setting lives in the lease's own transaction, so the next transaction on the same
/// pooled connection (a completion, an enqueue) commits durably.
#[tokio::test]
async fn only_the_lease_commits_asynchronously() {
    let Some(schema) =
        schema_or_skip("postgres::tests::only_the_lease_commits_asynchronously").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let store = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let queue = QueueName::parse("async-lease").expect("valid queue");
    store
        .insert(vec![noop().queue(queue.clone())])
        .await
        .expect("insert");
    let mut conn = store.pool().get().await.expect("a pooled connection");
    let setting = "SELECT current_setting('synchronous_commit')";
    let before: String = conn.query_one(setting, &[]).await.expect("setting").get(0);
    assert_eq!(before, "on");

    let now = clock.now();
    let expires = now + chrono::TimeDelta::seconds(30);
    let tx = conn.transaction().await.expect("begin");
    let leased = tx
        .query(
            &*crate::postgres::lease::LEASE_SQL,
            &[&queue.as_str(), &10_i64, &"w1", &expires, &now],
        )
        .await
        .expect("lease");
    assert_eq!(leased.len(), 1);
    let inside: String = tx.query_one(setting, &[]).await.expect("setting").get(0);
    assert_eq!(
        inside, "off",
        "the lease's transaction commits asynchronously"
    );
    tx.commit().await.expect("commit");

    let after: String = conn.query_one(setting, &[]).await.expect("setting").get(0);
    assert_eq!(
        after, "on",
        "the connection's next transaction commits durably"
    );
    let running: i64 = conn
        .query_one("SELECT count(*) FROM jobs WHERE state = 'running'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(running, 1, "the lease is committed and visible");
    drop(conn);
    store.close().await;
}

/// A heartbeat and a release of thousands of leases (a replica's prefetched jobs and queued
/// completions after a stall) apply to each live lease and to nothing else: every job gets
/// the new expiry, stale tokens and unknown ids are told apart, and the release makes every
/// job available with its attempt given back. Migration 12 keeps these batches linear; this
/// checks they stay correct at that size.
#[tokio::test]
async fn thousands_of_leases_extend_and_release_each_one() {
    use keel_core::store::{HeartbeatParams, LeaseRef};
    use keel_core::{JobId, LeaseToken};

    let Some(schema) =
        schema_or_skip("postgres::tests::thousands_of_leases_extend_and_release_each_one").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let store = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let queue = QueueName::parse("many").expect("valid queue");
    for _ in 0..5 {
        let jobs = (0..1000).map(|_| noop().queue(queue.clone())).collect();
        store.insert(jobs).await.expect("insert");
    }
    let mut leases: Vec<LeaseRef> = Vec::new();
    while leases.len() < 5000 {
        let leased = lease_from(&store, &queue, 1000).await;
        assert!(!leased.is_empty(), "only {} leased", leases.len());
        leases.extend(leased.iter().filter_map(LeaseRef::of));
    }
    let stale: Vec<LeaseRef> = leases[..10]
        .iter()
        .map(|l| LeaseRef {
            id: l.id,
            token: LeaseToken::new(),
        })
        .collect();
    let missing: Vec<LeaseRef> = (0..5)
        .map(|_| LeaseRef {
            id: JobId::new(),
            token: LeaseToken::new(),
        })
        .collect();

    clock.advance(Duration::from_secs(20));
    let batch: Vec<LeaseRef> = leases
        .iter()
        .chain(&stale)
        .chain(&missing)
        .copied()
        .collect();
    let answers = store
        .heartbeat(HeartbeatParams {
            leases: batch,
            lease_for: Duration::from_secs(60),
        })
        .await
        .expect("heartbeat");
    assert_eq!(answers.len(), 5015);
    let expires = clock.now() + chrono::TimeDelta::seconds(60);
    for (i, answer) in answers.iter().enumerate() {
        match i {
            0..5000 => assert_eq!(answer.as_ref().ok(), Some(&expires), "lease {i}"),
            5000..5010 => assert!(
                matches!(answer, Err(StoreError::StaleLease(_))),
                "{i}: {answer:?}"
            ),
            _ => assert!(
                matches!(answer, Err(StoreError::NotFound(_))),
                "{i}: {answer:?}"
            ),
        }
    }
    assert_eq!(
        count_jobs_where(&store, RUNNING_UNTIL, &[&expires]).await,
        5000
    );

    let released = store.release(leases).await.expect("release");
    assert_eq!(released.len(), 5000);
    assert!(released.iter().all(Result::is_ok));
    let available = count_jobs_where(
        &store,
        "state = 'available' AND attempt = 0 AND lease_token IS NULL",
        &[],
    )
    .await;
    assert_eq!(available, 5000);
    store.close().await;
}

/// A heartbeat does not wait for a row another transaction holds (a completion being
/// committed, say): it extends every other lease and answers that one as still held until
/// its current expiry. Once the row is free again, the next heartbeat extends it. Were it to
/// wait, the heartbeat would run into its statement timeout and answer an error.
#[tokio::test]
async fn a_heartbeat_skips_a_row_another_transaction_holds() {
    use keel_core::store::{HeartbeatParams, LeaseRef};

    let Some(schema) =
        schema_or_skip("postgres::tests::a_heartbeat_skips_a_row_another_transaction_holds").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let options = PgOptions {
        statement_timeout: Some(Duration::from_secs(5)),
        ..PgOptions::for_tests()
    };
    let store = store_with_clock(&schema, options, Arc::new(clock.clone())).await;
    let queue = QueueName::parse("busy").expect("valid queue");
    store
        .insert((0..3).map(|_| noop().queue(queue.clone())).collect())
        .await
        .expect("insert");
    let leased = lease_from(&store, &queue, 3).await;
    assert_eq!(leased.len(), 3);
    let leases: Vec<LeaseRef> = leased.iter().filter_map(LeaseRef::of).collect();
    let busy = leased[1].id;
    let busy_expiry = leased[1]
        .lease
        .as_ref()
        .expect("a leased job has a lease")
        .expires_at;

    let mut holder = store.pool().get().await.expect("connection");
    let tx = holder.transaction().await.expect("begin");
    tx.query_one(
        "SELECT id FROM jobs WHERE id = $1 FOR UPDATE",
        &[busy.as_uuid()],
    )
    .await
    .expect("lock the row");

    let heartbeat = |lease_for| {
        store.heartbeat(HeartbeatParams {
            leases: leases.clone(),
            lease_for,
        })
    };
    clock.advance(Duration::from_secs(10));
    let answers = heartbeat(Duration::from_secs(60))
        .await
        .expect("a heartbeat that waits for no lock");
    let extended = clock.now() + chrono::TimeDelta::seconds(60);
    let expected: Vec<Option<_>> = leased
        .iter()
        .map(|j| Some(if j.id == busy { busy_expiry } else { extended }))
        .collect();
    let got: Vec<Option<_>> = answers.iter().map(|a| a.as_ref().ok().copied()).collect();
    assert_eq!(got, expected, "{answers:?}");
    tx.rollback().await.expect("release the row");
    drop(holder);

    clock.advance(Duration::from_secs(10));
    let answers = heartbeat(Duration::from_secs(60)).await.expect("heartbeat");
    let extended = clock.now() + chrono::TimeDelta::seconds(60);
    assert!(
        answers.iter().all(|a| a.as_ref().ok() == Some(&extended)),
        "{answers:?}"
    );
    assert_eq!(
        count_jobs_where(&store, RUNNING_UNTIL, &[&extended]).await,
        3
    );
    store.close().await;
}

/// Running jobs whose stored lease expires at `$1`.
const RUNNING_UNTIL: &str = "state = 'running' AND lease_expires_at = $1";
