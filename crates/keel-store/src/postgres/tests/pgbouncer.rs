//! Through a real PgBouncer in transaction mode: Keel leaves nothing behind on the server
//! connections it is handed, and the ways of talking to Postgres that a transaction pooler
//! breaks are configuration errors naming the setting to change.

use std::sync::Arc;
use std::time::Duration;

use keel_core::store::{
    CampaignParams, Completion, FailParams, IdempotentInsert, LeaseParams, LeaseRef, ListParams,
    RescueParams, StoredResponse,
};
use keel_core::{
    IdempotencyKey, Job, JobId, JobStore as _, LeaderStore as _, MaintenanceStore as _, QueueName,
    Store as _, StoreError, TenantId, WorkStore as _, WorkerId,
};

use super::{PgOptions, PgStore, clock, noop};
use crate::Pooler;
use crate::testkit::{PgBouncer, PgDatabase, pg_url_or_skip};

/// A bouncer with `pool` server connections per database, a database behind it, and a
/// migrated transaction-mode store on it (listening straight to Postgres).
async fn through_bouncer(test: &str, pool: usize) -> Option<(PgBouncer, PgDatabase, PgStore)> {
    let bouncer = PgBouncer::start(test, Some(pool))?;
    let database = PgDatabase::create(&pg_url_or_skip(test)?).await;
    let store = PgStore::connect(
        &bouncer.url(&database.name),
        PgOptions {
            pooler: Pooler::Transaction,
            listen_url: Some(bouncer.direct_url(&database.name)),
            ..PgOptions::for_tests()
        },
        clock(),
    )
    .await
    .expect("connect through pgbouncer");
    store.migrate().await.expect("migrate through pgbouncer");
    Some((bouncer, database, store))
}

/// The state a session can carry from one transaction to the next, read on the one server
/// connection PgBouncer has for the database: named prepared statements, `LISTEN`s,
/// session advisory locks, temporary tables, a changed setting, an open transaction. With
/// `default_pool_size = 1` every client shares that connection, so this sees exactly what
/// Keel left behind.
async fn session_state(bouncer: &PgBouncer, database: &str) -> Vec<(String, String)> {
    let (client, conn) = tokio_postgres::connect(&bouncer.url(database), tokio_postgres::NoTls)
        .await
        .expect("probe connects through pgbouncer");
    tokio::spawn(conn);
    // The simple query protocol: the probe itself prepares nothing.
    let probes = [
        (
            "prepared statements",
            "SELECT count(*)::text FROM pg_prepared_statements",
        ),
        (
            "listening channels",
            "SELECT count(*)::text FROM pg_listening_channels()",
        ),
        (
            "advisory locks",
            "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        ),
        (
            "temporary tables",
            "SELECT count(*)::text FROM pg_class WHERE relpersistence = 't'",
        ),
        (
            "statement_timeout",
            "SELECT current_setting('statement_timeout')",
        ),
        ("search_path", "SELECT current_setting('search_path')"),
        (
            "transaction",
            "SELECT (now() = statement_timestamp())::text",
        ),
    ];
    let mut out = Vec::new();
    for (what, sql) in probes {
        let rows = client.simple_query(sql).await.expect("probe");
        let value = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("a row");
        out.push((what.to_owned(), value));
    }
    out
}

/// Every kind of statement the store sends, through a bouncer with one server connection;
/// then that connection holds nothing of Keel's: a test that fails the day a named
/// statement, a `LISTEN`, a lock or a setting outlives its transaction. Every call,
/// refusals included (a stale lease, a missing job, a replayed key), had all its answers,
/// so none closed its connection.
#[tokio::test]
async fn no_session_state_outlives_a_transaction() {
    let test = "postgres::tests::pgbouncer::no_session_state_outlives_a_transaction";
    let Some((bouncer, database, store)) = through_bouncer(test, 1).await else {
        return;
    };
    let fresh = session_state(&bouncer, &database.name).await;
    let queue = QueueName::parse("default").unwrap();
    let worker = WorkerId::parse("w1").unwrap();

    // Group-committed inserts, an idempotent insert (a transaction), reads and listings.
    let jobs = store.insert(vec![noop(), noop(), noop()]).await.unwrap();
    store.get(jobs[0].id).await.unwrap();
    let keyed = || IdempotentInsert {
        tenant: TenantId::default(),
        key: IdempotencyKey::parse("k1").unwrap(),
        fingerprint: "f".into(),
        ttl: Duration::from_secs(60),
        jobs: vec![noop()],
        respond: Box::new(|jobs: &[Job]| StoredResponse {
            status: 201,
            body: format!("{}", jobs.len()).into_bytes(),
        }),
    };
    store.insert_idempotent(keyed()).await.unwrap();
    store.insert_idempotent(keyed()).await.unwrap();
    store.list(ListParams::default()).await.unwrap();
    // The worker's round: lease, complete, fail (a transaction), release.
    let leased = store
        .lease(LeaseParams {
            queue,
            max: 3,
            lease_for: Duration::from_secs(30),
            owner: worker.clone(),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(leased.len(), 3);
    let leases: Vec<LeaseRef> = leased.iter().map(|j| LeaseRef::of(j).unwrap()).collect();
    let outcomes = store
        .complete(vec![Completion {
            lease: leases[0],
            result: None,
        }])
        .await
        .unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    store
        .fail(FailParams {
            lease: leases[1],
            error: "boom".into(),
            permanent: false,
            retry_at: None,
        })
        .await
        .unwrap();
    store.release(vec![leases[2]]).await.unwrap();
    store.cancel(jobs[0].id).await.ok();
    // Refusals: a lease that moved on, a job that does not exist, a move its state forbids.
    let stale = store
        .fail(FailParams {
            lease: leases[0],
            error: "late".into(),
            permanent: false,
            retry_at: None,
        })
        .await;
    assert!(matches!(stale, Err(StoreError::StaleLease(_))), "{stale:?}");
    let missing = JobId::new();
    assert!(matches!(
        store.get(missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.cancel(missing).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.cancel(leased[0].id).await,
        Err(StoreError::IllegalTransition { .. })
    ));
    assert!(
        store
            .rescue(RescueParams { limit: 10 })
            .await
            .unwrap()
            .is_empty()
    );
    // Leadership (a single statement with a term) and maintenance (a transaction).
    store
        .campaign(CampaignParams {
            owner: worker.clone(),
            ttl: Duration::from_secs(10),
        })
        .await
        .unwrap();
    store.resign(&worker).await.unwrap();

    let after = session_state(&bouncer, &database.name).await;
    assert_eq!(after, fresh, "state left on the server connection");
    assert_eq!(after[0], ("prepared statements".to_owned(), "0".to_owned()));
    assert_eq!(
        store.pool_stats().closed_unanswered,
        0,
        "a call that had every answer closed its connection"
    );
    store.close().await;
}

/// A call whose caller gives up while its statement waits (here on a row lock held by
/// another session): behind the bouncer its connection is closed rather than lent to the
/// next call, whose statements would otherwise follow the unanswered one on it (the split
/// bind message of docs/scaling.md). Straight to Postgres, which answers in order, the
/// connection is kept. Either way the store goes on serving.
#[tokio::test]
async fn a_call_given_up_mid_request_closes_its_connection_behind_a_pooler_only() {
    let test = "postgres::tests::pgbouncer::a_call_given_up_mid_request_closes_its_connection_behind_a_pooler_only";
    let Some((bouncer, database, pooled)) = through_bouncer(test, 2).await else {
        return;
    };
    let direct = PgStore::connect(
        &bouncer.direct_url(&database.name),
        PgOptions::for_tests(),
        clock(),
    )
    .await
    .expect("connect straight to Postgres");
    let (locker, conn) =
        tokio_postgres::connect(&bouncer.direct_url(&database.name), tokio_postgres::NoTls)
            .await
            .expect("the locking session connects");
    tokio::spawn(conn);

    for (store, closed) in [(&pooled, 1), (&direct, 0)] {
        let job = store.insert(vec![noop()]).await.unwrap().remove(0);
        locker.batch_execute("BEGIN").await.unwrap();
        locker
            .execute(
                "SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE",
                &[job.id.as_uuid()],
            )
            .await
            .unwrap();
        // The lock is held until the ROLLBACK below: the cancel cannot finish first.
        let gave_up = tokio::time::timeout(Duration::from_millis(200), store.cancel(job.id)).await;
        assert!(
            gave_up.is_err(),
            "the cancel waited for the lock: {gave_up:?}"
        );
        assert_eq!(store.pool_stats().closed_unanswered, closed);
        locker.batch_execute("ROLLBACK").await.unwrap();

        let more = store.insert(vec![noop(), noop()]).await.unwrap();
        assert_eq!(store.get(more[1].id).await.unwrap().id, more[1].id);
        assert_eq!(
            store.pool_stats().closed_unanswered,
            closed,
            "only the call given up closed its connection"
        );
    }
    direct.close().await;
    pooled.close().await;
}

/// Keel set up for Postgres itself (named statements, the statement timeout as a startup
/// option) against a transaction pooler: the startup parameter is refused at once, and the
/// error is a configuration error naming `KEEL_DATABASE_POOLER`, not an outage to retry.
#[tokio::test]
async fn a_pooler_refusing_startup_options_is_a_configuration_error() {
    let test =
        "postgres::tests::pgbouncer::a_pooler_refusing_startup_options_is_a_configuration_error";
    let Some(bouncer) = PgBouncer::start(test, None) else {
        return;
    };
    let database = PgDatabase::create(&pg_url_or_skip(test).unwrap()).await;
    let err = PgStore::connect(
        &bouncer.url(&database.name),
        PgOptions {
            statement_timeout: Some(Duration::from_secs(3)),
            ..PgOptions::for_tests()
        },
        clock(),
    )
    .await
    .expect_err("PgBouncer refuses the options startup parameter");
    assert_eq!(err.class(), "misconfigured", "{err:?}");
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(text.contains("KEEL_DATABASE_POOLER=transaction"), "{text}");
    // And transaction mode refuses to send them, naming why.
    let err = PgStore::connect(
        &format!(
            "{}?options=-cstatement_timeout%3D1000",
            bouncer.url(&database.name)
        ),
        PgOptions {
            pooler: Pooler::Transaction,
            ..PgOptions::for_tests()
        },
        clock(),
    )
    .await
    .expect_err("options in the URL cannot pass a transaction pooler");
    assert_eq!(err.class(), "misconfigured", "{err:?}");
}

/// Named statements through a transaction pooler (Keel not told about it, no statement
/// timeout to give it away at connect): under concurrent use a statement prepared on one
/// server connection is run on another. Every such failure is a configuration error
/// naming the setting, never a transient error that the breaker would count and callers
/// retry.
#[tokio::test]
async fn named_statements_through_a_transaction_pooler_are_a_configuration_error() {
    let test = "postgres::tests::pgbouncer::named_statements_through_a_transaction_pooler_are_a_configuration_error";
    let Some(bouncer) = PgBouncer::start(test, Some(2)) else {
        return;
    };
    let database = PgDatabase::create(&pg_url_or_skip(test).unwrap()).await;
    let url = bouncer.url(&database.name);
    // Migrated properly first (the migration itself is not what this shows).
    let setup = PgStore::connect(
        &url,
        PgOptions {
            pooler: Pooler::Transaction,
            ..PgOptions::for_tests()
        },
        clock(),
    )
    .await
    .unwrap();
    setup.migrate().await.unwrap();
    setup.close().await;
    let store = Arc::new(
        PgStore::connect(&url, PgOptions::for_tests(), clock())
            .await
            .expect("connects: nothing refused at startup"),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            for _ in 0..500 {
                let outcome = match store.insert(vec![noop()]).await {
                    Ok(jobs) => store.get(jobs[0].id).await.map(drop),
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    return Some(e);
                }
            }
            None
        });
    }
    let mut errors: Vec<StoreError> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        errors.extend(done.unwrap());
    }
    assert!(
        !errors.is_empty(),
        "4000 calls over 8 clients sharing 2 server connections never crossed connections"
    );
    for e in &errors {
        assert_eq!(e.class(), "misconfigured", "{e:?}");
        let text = format!("{e}: {}", std::error::Error::source(e).unwrap());
        assert!(text.contains("KEEL_DATABASE_POOLER=transaction"), "{text}");
    }
}
