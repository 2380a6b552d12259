//! The pool: min_idle warming and top-up, max_lifetime, the acquire timeout, and a
//! connection killed under the store.

use std::collections::HashSet;
use std::time::Duration;

use keel_core::Store;

use super::{backend_pid, clock, eventually};
use crate::postgres::{PgOptions, PgStore};
use crate::testkit::pg_url_or_skip;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_keeps_min_idle_warm_and_retires_old_connections() {
    let Some(base) =
        pg_url_or_skip("postgres::tests::pool_keeps_min_idle_warm_and_retires_old_connections")
    else {
        return;
    };
    let opts = PgOptions {
        max_connections: 4,
        min_idle: 3,
        max_lifetime: Some(Duration::from_millis(500)),
        ..PgOptions::for_tests()
    };
    let store = PgStore::connect(&base, opts, clock())
        .await
        .expect("connect");
    let status = store.pool().status();
    assert!(
        status.size >= 3,
        "min_idle connections are opened at connect: {status:?}"
    );

    let held = [
        store.pool().get().await.expect("connection"),
        store.pool().get().await.expect("connection"),
        store.pool().get().await.expect("connection"),
    ];
    let mut first = HashSet::new();
    for c in &held {
        first.insert(backend_pid(c).await);
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Past max_lifetime: whatever the pool hands out now is a new backend.
    let conn = store.pool().get().await.expect("connection");
    let pid = backend_pid(&conn).await;
    assert!(
        !first.contains(&pid),
        "a connection older than max_lifetime was reused"
    );
    drop(conn);

    // The maintenance task evicts expired idle connections and tops the pool back up.
    let pool = store.pool().clone();
    eventually("the pool to be topped up to min_idle", || {
        pool.status().size >= 3
    })
    .await;

    store.close().await;
    assert!(store.pool().is_closed());
    assert!(
        store.maintenance.is_finished(),
        "close() stops and joins the maintenance task"
    );
    let err = store.ping().await.expect_err("closed");
    assert_eq!(err.class(), "permanent", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_fails_fast_and_transient() {
    let Some(base) = pg_url_or_skip("postgres::tests::exhausted_pool_fails_fast_and_transient")
    else {
        return;
    };
    let opts = PgOptions {
        max_connections: 1,
        min_idle: 1,
        acquire_timeout: Duration::from_millis(200),
        ..PgOptions::for_tests()
    };
    let store = PgStore::connect(&base, opts, clock())
        .await
        .expect("connect");
    // Held for the rest of the test: only the acquire timeout can end the ping's wait.
    let busy = store.pool().get().await.expect("the only connection");
    let err = store.ping().await.expect_err("no connection free");
    assert!(err.is_transient(), "{err:?}");
    drop(busy);
    store.ping().await.expect("the connection is back");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connection_is_transient_and_replaced() {
    let Some(base) = pg_url_or_skip("postgres::tests::killed_connection_is_transient_and_replaced")
    else {
        return;
    };
    let opts = PgOptions {
        max_connections: 2,
        min_idle: 0,
        ..PgOptions::for_tests()
    };
    let store = PgStore::connect(&base, opts, clock())
        .await
        .expect("connect");
    let victim = store.pool().get().await.expect("connection");
    let killer = store.pool().get().await.expect("connection");
    let pid = backend_pid(&victim).await;
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    drop(killer);
    let e = victim
        .simple_query("SELECT 1")
        .await
        .expect_err("the backend is gone");
    let err = crate::postgres::error::db(e, "running a query on a killed connection".into());
    assert!(err.is_transient(), "{err:?}");
    // The driver's connection task sees the socket close right after the error; from then on
    // the pool's recycle check (`is_closed`) discards the connection instead of handing it
    // out again.
    eventually("the driver to notice the closed socket", || {
        victim.is_closed()
    })
    .await;
    drop(victim);
    for _ in 0..3 {
        store.ping().await.expect("a live connection");
    }
    store.close().await;
}
