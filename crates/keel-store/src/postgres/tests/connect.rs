//! Connecting and migrating: error classes for an unreachable server and a missing
//! database, concurrent migrations, a search_path naming no schema, what the server refuses as
//! data, the statement timeout, and noticing a server without autovacuum.

use std::sync::Arc;
use std::time::Duration;

use keel_core::Store;

use super::{clock, schema_or_skip, store_in};
use crate::postgres::{PgOptions, PgStore};
use crate::testkit::pg_url_or_skip;

#[tokio::test]
async fn unreachable_server_is_a_fast_transient_error() {
    // Connect and acquire timeouts an hour long: the error can only be the refusal itself,
    // not a timeout running out.
    let opts = PgOptions {
        connect_timeout: Duration::from_secs(3600),
        acquire_timeout: Duration::from_secs(3600),
        ..PgOptions::for_tests()
    };
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let err = PgStore::connect("postgres://keel@127.0.0.1:1/keel", opts, clock())
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_transient(), "{err:?}");
    assert!(
        err.to_string()
            .contains("connecting to postgres at 127.0.0.1:1/keel"),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_url_and_missing_database_are_permanent() {
    let err = PgStore::connect(
        "postgres://x@127.0.0.1:5432/db?sslmode=nonsense",
        PgOptions::for_tests(),
        clock(),
    )
    .await
    .expect_err("invalid URL");
    assert_eq!(err.class(), "permanent", "{err:?}");

    let Some(base) =
        pg_url_or_skip("postgres::tests::malformed_url_and_missing_database_are_permanent")
    else {
        return;
    };
    let url = crate::postgres_url_with_database(&base, "keel_no_such_database");
    let err = PgStore::connect(&url, PgOptions::for_tests(), clock())
        .await
        .expect_err("the database does not exist");
    assert_eq!(err.class(), "permanent", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let Some(schema) = schema_or_skip("postgres::tests::concurrent_migrations_apply_once").await
    else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(
            PgStore::connect(&schema.url, PgOptions::for_tests(), clock())
                .await
                .expect("connect"),
        ));
    }
    let tasks: Vec<_> = stores
        .iter()
        .map(|s| {
            let s = Arc::clone(s);
            tokio::spawn(async move { s.migrate().await })
        })
        .collect();
    let mut applied = Vec::new();
    for t in tasks {
        let report = t.await.expect("task").expect("migrate");
        assert_eq!(report.current, crate::migrate::POSTGRES.len() as i64);
        applied.extend(report.applied);
    }
    let all: Vec<i64> = crate::migrate::POSTGRES.iter().map(|m| m.version).collect();
    assert_eq!(applied, all, "each migration applied exactly once");
    let again = stores[0].migrate().await.expect("migrate again");
    assert!(again.applied.is_empty());
    let conn = stores[0].pool().get().await.expect("connection");
    let rows: i64 = conn
        .query_one("SELECT count(*) FROM keel_schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, all.len() as i64);
    drop(conn);
    for s in stores {
        s.close().await;
    }
}

#[tokio::test]
async fn search_path_without_schema_is_a_clear_error() {
    let Some(base) = pg_url_or_skip("postgres::tests::search_path_without_schema_is_a_clear_error")
    else {
        return;
    };
    let url = crate::postgres_url_with_schema(&base, "keel_no_such_schema");
    let store = PgStore::connect(&url, PgOptions::for_tests(), clock())
        .await
        .expect("connecting does not need the schema");
    let err = store.migrate().await.expect_err("nowhere to create tables");
    assert_eq!(err.class(), "permanent");
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(
        chain.contains("no schema in the search_path exists"),
        "{chain}"
    );
    store.close().await;
}

/// What the server refuses as data is the caller's fault (`rejected`), whatever the SQL:
/// a NUL in jsonb (22P05), a number out of range (22003), JSON nested past the server's stack
/// (54001). None of them counts against the database's health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_the_server_refuses_is_rejected_not_a_failure() {
    let Some(base) =
        pg_url_or_skip("postgres::tests::data_the_server_refuses_is_rejected_not_a_failure")
    else {
        return;
    };
    let store = PgStore::connect(&base, PgOptions::for_tests(), clock())
        .await
        .expect("connect");
    let conn = store.pool().get().await.expect("connection");
    let deep = format!("{}0{}", "[".repeat(100_000), "]".repeat(100_000));
    for (sql, param) in [
        ("SELECT $1::text::jsonb", r#"["a\u0000b"]"#.to_owned()),
        ("SELECT $1::text::smallint", "70000".to_owned()),
        ("SELECT $1::text::jsonb", deep),
    ] {
        let e = conn
            .query_one(sql, &[&param])
            .await
            .expect_err("the server refuses it");
        let code = e.code().cloned();
        let mapped = crate::postgres::error::db(e, "storing a hostile value".into());
        assert_eq!(mapped.class(), "rejected", "{code:?}: {mapped:?}");
    }
    drop(conn);
    store.close().await;
}

/// `statement_timeout` reaches every pooled connection (on top of the URL's own options,
/// which confine the store to its schema), cuts a statement that runs past it, and does not
/// stop migrations.
#[tokio::test]
async fn statement_timeout_bounds_every_statement_but_not_migrations() {
    let Some(schema) =
        schema_or_skip("postgres::tests::statement_timeout_bounds_every_statement").await
    else {
        return;
    };
    let opts = PgOptions {
        statement_timeout: Some(Duration::from_millis(300)),
        ..PgOptions::for_tests()
    };
    let store = store_in(&schema, opts).await;
    let conn = store.pool().get().await.expect("connection");
    let shown: String = conn
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(shown, "300ms");
    let in_schema: Option<String> = conn
        .query_one("SELECT current_schema()", &[])
        .await
        .expect("schema")
        .get(0);
    assert_eq!(
        in_schema.as_deref(),
        Some(schema.name.as_str()),
        "URL options kept"
    );
    // A minute's sleep cancelled by the server: the 300 ms statement_timeout did it.
    let err = conn
        .query_one("SELECT pg_sleep(60)", &[])
        .await
        .expect_err("cut by statement_timeout");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    drop(conn);
    store.migrate().await.expect("migrations lift the timeout");
    store.close().await;
}

/// The startup check that warns about a server without autovacuum reads the server's own
/// setting (on this test server or any other: compared with `SHOW autovacuum`).
#[tokio::test]
async fn a_server_without_autovacuum_is_noticed() {
    let Some(schema) = schema_or_skip("a_server_without_autovacuum_is_noticed").await else {
        return;
    };
    let store = store_in(&schema, PgOptions::default()).await;
    let conn = store.pool().get().await.expect("connection");
    let shown: String = conn
        .query_one("SHOW autovacuum", &[])
        .await
        .expect("SHOW autovacuum")
        .get(0);
    let facts = super::super::ServerFacts::read(&conn, &store.sql)
        .await
        .expect("read the server's facts");
    assert_eq!(
        facts.autovacuum_off,
        shown == "off",
        "SHOW autovacuum says {shown}"
    );
}
