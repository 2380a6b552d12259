//! Notifications: wakeups and state changes reach other stores on the same schema (and no
//! other), the listener comes back after its connection is killed, and a batch too large for
//! one notification arrives whole.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::store::LeaseRef;
use keel_core::{
    Clock, JobId, JobState, JobStore, MaintenanceStore, ManualClock, QueueName, Store, WorkStore,
};

use super::{
    eventually, keyed_request, lease_from, noop, schema_or_skip, store_in, store_with_clock,
};
use crate::postgres::{PgOptions, PgStore};
use crate::testkit::{PgSchema, pg_url_or_skip};

/// What `next` (a wakeup or change stream's next item) yields within `wait`, or `None` if
/// nothing comes.
async fn within<T>(wait: Duration, next: impl Future<Output = Option<T>>) -> Option<T> {
    tokio::time::timeout(wait, next).await.ok().flatten()
}

/// An insert through one store wakes another store on the same schema, for that queue (and
/// not for a queue that only got a scheduled job); promotion and a release wake it too. A
/// store on another schema hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_reach_stores_on_the_same_schema_only() {
    let Some(base) =
        pg_url_or_skip("postgres::tests::wakeups_reach_stores_on_the_same_schema_only")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let other_schema = PgSchema::create(&base).await;
    let clock = ManualClock::starting_now();
    let a = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let b = store_in(&schema, PgOptions::for_tests()).await;
    let elsewhere = store_in(&other_schema, PgOptions::for_tests()).await;
    let mut heard = b.wakeups().expect("Postgres delivers wakeups");
    let mut overheard = elsewhere.wakeups().expect("Postgres delivers wakeups");
    eventually("both listeners to be listening", || {
        b.listens() >= 1 && elsewhere.listens() >= 1
    })
    .await;

    let later = QueueName::parse("later").expect("valid queue");
    let mail = QueueName::parse("mail").expect("valid queue");
    let due = clock.now() + chrono::TimeDelta::seconds(30);
    a.insert(vec![noop().queue(later.clone()).run_at(due)])
        .await
        .expect("insert scheduled");
    a.insert(vec![noop().queue(mail.clone()), noop().queue(mail.clone())])
        .await
        .expect("insert available");
    assert_eq!(
        within(Duration::from_secs(5), heard.next()).await,
        Some(mail.clone()),
        "the first wakeup is for the queue that got available jobs"
    );

    clock.advance(Duration::from_secs(60));
    let promoted = a
        .promote(keel_core::store::PromoteParams { limit: 10 })
        .await
        .expect("promote");
    assert_eq!(promoted.len(), 1);
    assert_eq!(
        within(Duration::from_secs(5), heard.next()).await,
        Some(later)
    );

    // Leasing wakes nobody; giving the leases back makes the jobs available again, and
    // wakes their queue once.
    let leased = lease_from(&a, &mail, 10).await;
    assert_eq!(leased.len(), 2);
    let leases: Vec<_> = leased
        .iter()
        .map(|j| LeaseRef::of(j).expect("a leased job carries its lease"))
        .collect();
    let released = a.release(leases).await.expect("release");
    assert!(released.iter().all(Result::is_ok), "{released:?}");
    assert_eq!(
        within(Duration::from_secs(5), heard.next()).await,
        Some(mail.clone())
    );
    assert_eq!(
        within(Duration::from_millis(500), heard.next()).await,
        None,
        "one wakeup per queue released"
    );
    assert_eq!(
        within(Duration::from_millis(500), overheard.next()).await,
        None,
        "a store on another schema was woken"
    );
    for s in [a, b, elsewhere] {
        s.close().await;
    }
}

/// Killing the listener's connection does not end the stream: the listener reconnects and
/// later notifications arrive on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_connection_is_killed() {
    let Some(schema) =
        schema_or_skip("postgres::tests::listener_reconnects_after_its_connection_is_killed").await
    else {
        return;
    };
    let store = store_in(&schema, PgOptions::for_tests()).await;
    let mut wakeups = store.wakeups().expect("Postgres delivers wakeups");
    eventually("the listener to be listening", || store.listens() >= 1).await;
    let conn = store.pool().get().await.expect("connection");
    let killed: bool = conn
        .query_one(
            "SELECT pg_terminate_backend($1)",
            &[&store.listener_backend()],
        )
        .await
        .expect("terminate the listener")
        .get(0);
    assert!(killed, "the listening session was not found");
    drop(conn);
    eventually("the listener to listen again", || store.listens() >= 2).await;
    // Inserted through another store: a store does not hear its own inserts' wakeups.
    let other = store_in(&schema, PgOptions::for_tests()).await;
    let queue = QueueName::parse("after-reconnect").expect("valid queue");
    other
        .insert(vec![noop().queue(queue.clone())])
        .await
        .expect("insert");
    assert_eq!(
        within(Duration::from_secs(5), wakeups.next()).await,
        Some(queue)
    );
    for s in [store, other] {
        s.close().await;
    }
}

/// An insert's wakeup is sent after its commit from the inserting store's listening
/// connection: other stores on the schema hear it, the inserting store (whose process woke
/// its own dispatchers when the insert returned) does not hear it come back. A plain batch
/// and an idempotent insert both wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_wakeups_reach_other_stores_but_not_their_sender() {
    let Some(schema) =
        schema_or_skip("postgres::tests::insert_wakeups_reach_other_stores_but_not_their_sender")
            .await
    else {
        return;
    };
    let a = store_in(&schema, PgOptions::for_tests()).await;
    let b = store_in(&schema, PgOptions::for_tests()).await;
    let mut own = a.wakeups().expect("Postgres delivers wakeups");
    let mut heard = b.wakeups().expect("Postgres delivers wakeups");
    eventually("both listeners to be listening", || {
        a.listens() >= 1 && b.listens() >= 1
    })
    .await;

    let plain = QueueName::parse("plain").expect("valid queue");
    a.insert(vec![noop().queue(plain.clone())])
        .await
        .expect("insert");
    assert_eq!(
        within(Duration::from_secs(5), heard.next()).await,
        Some(plain)
    );

    let keyed = QueueName::parse("keyed").expect("valid queue");
    let mut request = keyed_request("wake-once");
    request.jobs = vec![noop().queue(keyed.clone())];
    a.insert_idempotent(request)
        .await
        .expect("idempotent insert");
    assert_eq!(
        within(Duration::from_secs(5), heard.next()).await,
        Some(keyed)
    );

    assert_eq!(
        within(Duration::from_millis(500), own.next()).await,
        None,
        "the inserting store heard its own wakeup"
    );
    for s in [a, b] {
        s.close().await;
    }
}

/// Two stores on `schema`: `a`, on a clock the test moves, makes the moves; `b` hears
/// them on the returned stream, already listening.
async fn announcer_and_listener(
    schema: &PgSchema,
) -> (
    ManualClock,
    PgStore,
    PgStore,
    Box<dyn keel_core::ChangeStream>,
) {
    let clock = ManualClock::starting_now();
    let a = store_with_clock(schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let b = store_in(schema, PgOptions::for_tests()).await;
    let heard = b.changes().expect("Postgres delivers changes");
    eventually("the listener to be listening", || b.listens() >= 1).await;
    (clock, a, b, heard)
}

/// Every kind of announced move (cancel, retry, rescue) made through one store reaches
/// another store on the same schema, in commit order, with the right state and queue;
/// inserting, leasing, completing and failing announce nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_another_store_on_the_same_schema() {
    use keel_core::store::StateChange;
    use keel_core::store::{Completion, FailParams, LeaseRef, RescueParams};

    let Some(schema) =
        schema_or_skip("postgres::tests::changes_reach_another_store_on_the_same_schema").await
    else {
        return;
    };
    let (clock, a, b, mut heard) = announcer_and_listener(&schema).await;

    let queue = QueueName::parse("events").expect("valid queue");
    let jobs = a
        .insert((0..5).map(|_| noop().queue(queue.clone())).collect())
        .await
        .expect("insert");
    let leased = lease_from(&a, &queue, 5).await;
    assert_eq!(leased.len(), 5);
    let lease = |i: usize| LeaseRef::of(&leased[i]).expect("leased");
    let fail = |i: usize, permanent: bool| FailParams {
        lease: lease(i),
        error: "boom".into(),
        permanent,
        retry_at: None,
    };
    let outcome = a
        .complete(vec![Completion {
            lease: lease(0),
            result: None,
        }])
        .await
        .expect("complete");
    assert!(outcome[0].is_ok());
    a.fail(fail(1, false)).await.expect("fail, retryable");
    a.fail(fail(2, true)).await.expect("fail, discarded");
    a.cancel(leased[3].id).await.expect("cancel a running job");
    a.retry(leased[2].id)
        .await
        .expect("retry the discarded job");
    clock.advance(Duration::from_secs(31));
    let rescued = a.rescue(RescueParams { limit: 10 }).await.expect("rescue");
    assert_eq!(rescued.len(), 1);

    let change = |i: usize, state: JobState| StateChange {
        id: leased[i].id,
        queue: queue.clone(),
        state,
    };
    // Completions and failures are not announced (lease.rs says why).
    let want = [
        change(3, JobState::Cancelled),
        change(2, JobState::Available),
        change(4, JobState::Retryable),
    ];
    let mut got = Vec::new();
    while got.len() < want.len() {
        match within(Duration::from_secs(5), heard.next()).await {
            Some(c) => got.push(c),
            None => break,
        }
    }
    assert_eq!(
        got,
        want,
        "inserted: {:?}",
        jobs.iter().map(|j| j.id).collect::<Vec<_>>()
    );
    assert_eq!(
        within(Duration::from_millis(300), heard.next()).await,
        None,
        "something else was announced"
    );
    for s in [a, b] {
        s.close().await;
    }
}

/// Payloads heard on `channel` through a plain connection of the test's own, until dropped.
async fn raw_listen(url: &str, channel: &str) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect the raw listener");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let listen = format!("LISTEN \"{channel}\"");
    tokio::spawn(async move {
        let subscribe = client.batch_execute(&listen);
        tokio::pin!(subscribe);
        let mut ready_tx = Some(ready_tx);
        loop {
            tokio::select! {
                done = &mut subscribe, if ready_tx.is_some() => {
                    done.expect("LISTEN");
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                message = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                    match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                            if tx.send(n.payload().to_owned()).is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                }
            }
        }
    });
    ready.await.expect("the raw listener is listening");
    rx
}

/// Rescuing 500 jobs with the longest queue name allowed in one batch: the announcement is
/// split into notifications under Postgres's 8,000-byte limit (it would fail the rescue
/// otherwise), and a subscriber on another store receives all 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_changes_are_chunked_and_all_delivered() {
    use keel_core::store::RescueParams;

    const N: usize = 500;
    let Some(schema) =
        schema_or_skip("postgres::tests::many_changes_are_chunked_and_all_delivered").await
    else {
        return;
    };
    let (clock, a, b, mut heard) = announcer_and_listener(&schema).await;
    let mut raw = raw_listen(&schema.url, &a.changes_channel).await;

    let queue =
        QueueName::parse(format!("q{}", "x".repeat(QueueName::MAX_LEN - 1))).expect("valid queue");
    a.insert((0..N).map(|_| noop().queue(queue.clone())).collect())
        .await
        .expect("insert");
    let leased = lease_from(&a, &queue, N as u32).await;
    assert_eq!(leased.len(), N);
    clock.advance(Duration::from_secs(31));
    let rescued = a
        .rescue(RescueParams { limit: N as u32 })
        .await
        .expect("rescue the batch");
    assert_eq!(rescued.len(), N);

    let want: HashSet<JobId> = leased.iter().map(|j| j.id).collect();
    let mut got = HashSet::new();
    while got.len() < N {
        let Some(c) = within(Duration::from_secs(5), heard.next()).await else {
            break;
        };
        assert_eq!((c.state, &c.queue), (JobState::Retryable, &queue));
        got.insert(c.id);
    }
    assert_eq!(got, want, "missing {} changes", N - got.len());

    let mut payloads = Vec::new();
    let mut lines = 0;
    while lines < N {
        let payload = tokio::time::timeout(Duration::from_secs(5), raw.recv())
            .await
            .expect("a notification")
            .expect("the raw listener is running");
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        lines += payload.lines().count();
        payloads.push(payload);
    }
    assert_eq!(lines, N);
    assert_eq!(
        payloads.len(),
        N.div_ceil(crate::postgres::sql::CHANGES_PER_NOTIFICATION),
        "one notification per {} changes",
        crate::postgres::sql::CHANGES_PER_NOTIFICATION
    );
    for s in [a, b] {
        s.close().await;
    }
}
