//! Postgres-specific tests: what the conformance suite cannot see from the `Store` trait.
//!
//! - **Plans.** The hot statements, exactly as the store sends them, must use their indexes
//!   on a table shaped like production (mostly finished jobs, a few thousand live ones). A
//!   sequential scan on `jobs` is invisible in functional tests on small tables and fatal at
//!   a few million rows, so one test loads a realistic table, `ANALYZE`s it and reads the
//!   plans. `EXPLAIN` without `ANALYZE` plans the statements without running them. Each
//!   statement is checked twice: with its parameters bound (the custom plans Postgres uses
//!   for a prepared statement's first executions) and as a generic plan (what a prepared
//!   statement may switch to afterwards, planned without knowing the values). The same goes
//!   for `idempotency_keys`, which holds a row per keyed request for a day or so, and for
//!   lease's paused-queue check, which must run once per statement, not once per job.
//! - **Connecting and migrating**: error classes for an unreachable server and a missing
//!   database, concurrent migrations, a search_path naming no schema.
//! - **The pool**: min_idle warming and top-up, max_lifetime, the acquire timeout, close,
//!   and a connection killed under the store.
//! - **Group commit**: concurrent inserts share commits; one caller's duplicate id fails
//!   only that caller; close answers every caller.
//! - **Wakeups**: a notification reaches other stores on the same schema and no other, and
//!   the listener comes back after its connection is killed.
//! - **State changes**: what complete, fail, cancel, retry and rescue announce reaches
//!   another store on the same schema, in order and nothing else; a completion batch too
//!   large for one notification is split under Postgres's payload limit and arrives whole.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use keel_core::store::ListParams;
use keel_core::{
    Clock, JobId, JobState, JobStore, MaintenanceStore, ManualClock, QueueName, QueueStore, Store,
    StoreError, WorkStore,
};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::commit::UNIQUE_HOLDERS_SQL;
use super::idempotency::{IDEMPOTENCY_EXPIRE_SQL, IDEMPOTENCY_READ_SQL};
use super::jobs::ListQuery;
use super::lease::{COMPLETE_SQL, LEASE_SQL};
use super::maintenance::{
    DELETE_FINISHED_SQL, IDEMPOTENCY_DELETE_EXPIRED_SQL, PROMOTE_SQL, RESCUE_LOCK_SQL,
};
use super::queues::QUEUE_DEPTHS_SQL;
use super::{PgOptions, PgStore};
use crate::testkit::{PgSchema, pg_url_or_skip};

/// Rows loaded: 88 % completed, 6 % available over 8 queues, 2 % each running and
/// scheduled, 2 % retryable. Ids are time-ordered like the UUIDv7s the store assigns.
const LOAD: &str = "
INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, attempt, max_attempts,
                  timeout_ms, backoff, tags, run_at, created_at, started_at, finished_at,
                  lease_owner, lease_token, lease_expires_at)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
       'q' || (i % 8), 'noop', 't' || (i % 16), '{}'::json, (i % 10)::int2, s.state,
       CASE WHEN s.state IN ('available', 'scheduled') THEN 0 ELSE 1 END,
       25, 60000, '{\"type\":\"fixed\",\"delay_ms\":1000}'::jsonb, '[]'::jsonb,
       CASE WHEN s.state IN ('scheduled', 'retryable') THEN now() + i * interval '1 ms'
            ELSE now() - interval '1 hour' + i * interval '1 ms' END,
       now() - interval '2 hours' + i * interval '1 ms',
       CASE WHEN s.state IN ('running', 'completed', 'retryable')
            THEN now() - interval '1 hour' END,
       CASE WHEN s.state = 'completed' THEN now() - interval '30 minutes' + i * interval '1 ms' END,
       CASE WHEN s.state IN ('running', 'completed') THEN 'w1' END,
       CASE WHEN s.state = 'running' THEN gen_random_uuid() END,
       CASE WHEN s.state = 'running' THEN now() + interval '30 seconds' END
FROM (SELECT i,
             CASE WHEN i % 100 < 88 THEN 'completed'
                  WHEN i % 100 < 94 THEN 'available'
                  WHEN i % 100 < 96 THEN 'running'
                  WHEN i % 100 < 98 THEN 'scheduled'
                  ELSE 'retryable' END AS state
      FROM generate_series(1, 120000) AS i) AS s;
INSERT INTO queues (name, paused, updated_at)
SELECT 'q' || i, i % 3 = 0, now() FROM generate_series(100, 300) AS i;
INSERT INTO idempotency_keys (tenant, key, fingerprint, status, body, created_at, expires_at)
SELECT 't' || (i % 16), 'key-' || i, 'fp', 201, '\\x7b7d'::bytea, now() - interval '1 day',
       now() + (i - 2000) * interval '1 second'
FROM generate_series(1, 40000) AS i;
ANALYZE jobs;
ANALYZE queues;
ANALYZE idempotency_keys;
";

/// Tables that grow with traffic: a sequential scan of either is a defect. (`queues` holds a
/// row per paused or resumed queue; reading all of it can be the cheapest plan.)
const LARGE_TABLES: [&str; 2] = ["jobs", "idempotency_keys"];

/// What a plan does, gathered from its JSON form.
#[derive(Default)]
struct PlanFacts {
    /// Large tables read by a sequential scan (once per scan).
    seq_scans: Vec<String>,
    /// Every index the plan uses.
    indexes: Vec<String>,
    /// Relations read inside an InitPlan: evaluated once per statement.
    once: BTreeSet<String>,
    /// Relations read anywhere else.
    elsewhere: BTreeSet<String>,
}

impl PlanFacts {
    fn of(plan: &Value) -> Self {
        let mut facts = Self::default();
        facts.walk(plan, false);
        facts
    }

    fn walk(&mut self, plan: &Value, in_init_plan: bool) {
        match plan {
            Value::Object(map) => {
                // A CTE is an InitPlan too ("CTE picked"); only an uncorrelated sublink's
                // ("InitPlan 1 (returns $0)") runs once per statement by construction.
                let in_init_plan = in_init_plan
                    || (map.get("Parent Relationship").and_then(Value::as_str) == Some("InitPlan")
                        && map
                            .get("Subplan Name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| n.starts_with("InitPlan")));
                if let Some(rel) = map.get("Relation Name").and_then(Value::as_str) {
                    if map.get("Node Type").and_then(Value::as_str) == Some("Seq Scan")
                        && LARGE_TABLES.contains(&rel)
                    {
                        self.seq_scans.push(rel.to_owned());
                    }
                    let reads = if in_init_plan {
                        &mut self.once
                    } else {
                        &mut self.elsewhere
                    };
                    reads.insert(rel.to_owned());
                }
                if let Some(index) = map.get("Index Name").and_then(Value::as_str) {
                    self.indexes.push(index.to_owned());
                }
                map.values().for_each(|v| self.walk(v, in_init_plan));
            }
            Value::Array(items) => items.iter().for_each(|v| self.walk(v, in_init_plan)),
            _ => {}
        }
    }
}

/// What is wrong with `plan`, if anything: a sequential scan of a large table, not using the
/// index the statement was designed for (when `index` is given), or reading a table of
/// `once` other than once per statement.
fn check(
    name: &str,
    mode: &str,
    plan: &Value,
    index: Option<&str>,
    once: &[&str],
) -> Option<String> {
    let facts = PlanFacts::of(plan);
    let pretty = || serde_json::to_string_pretty(plan).unwrap_or_default();
    if !facts.seq_scans.is_empty() {
        return Some(format!(
            "{name} ({mode}) scans {:?} sequentially:\n{}",
            facts.seq_scans,
            pretty()
        ));
    }
    if let Some(index) = index
        && !facts.indexes.iter().any(|i| i == index)
    {
        return Some(format!(
            "{name} ({mode}) does not use {index} (uses {:?}):\n{}",
            facts.indexes,
            pretty()
        ));
    }
    if let Some(rel) = once
        .iter()
        .find(|r| !facts.once.contains(**r) || facts.elsewhere.contains(**r))
    {
        return Some(format!(
            "{name} ({mode}) does not read {rel} exactly once per statement (in an \
             InitPlan):\n{}",
            pretty()
        ));
    }
    None
}

/// One statement to check: its text, bound values for the custom plan, the same values as
/// SQL literals for `EXECUTE` (generic plan), and the index it must use.
struct Case<'a> {
    name: &'a str,
    sql: &'a str,
    params: Vec<&'a (dyn ToSql + Sync)>,
    literals: String,
    /// The index the custom plan must use.
    index: &'a str,
    /// Whether the generic plan must use it too. A generic plan is planned without the
    /// values, so for a selective filter with a LIMIT the planner may reasonably prefer
    /// walking the primary key and filtering; Postgres only keeps a generic plan when it
    /// costs no more than the custom ones, so for those statements the requirement is only
    /// "no sequential scan".
    generic_uses_index: bool,
    /// Tables the statement must read once per execution (an InitPlan), whatever the
    /// number of rows it touches.
    once: &'a [&'a str],
}

async fn explain(conn: &Object, case: &Case<'_>) -> Vec<String> {
    let row = conn
        .query_one(&format!("EXPLAIN (FORMAT JSON) {}", case.sql), &case.params)
        .await
        .unwrap_or_else(|e| panic!("explaining {}: {e:?}", case.name));
    let custom: Value = row.get(0);

    let stmt = format!("keel_explain_{}", case.name.replace(' ', "_"));
    conn.batch_execute(&format!(
        "PREPARE {stmt} AS {}; SET plan_cache_mode = force_generic_plan",
        case.sql
    ))
    .await
    .unwrap_or_else(|e| panic!("preparing {}: {e:?}", case.name));
    let row = conn
        .query_one(
            &format!("EXPLAIN (FORMAT JSON) EXECUTE {stmt}({})", case.literals),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("explaining generic {}: {e:?}", case.name));
    let generic: Value = row.get(0);
    conn.batch_execute(&format!("DEALLOCATE {stmt}; RESET plan_cache_mode"))
        .await
        .unwrap_or_else(|e| panic!("cleaning up {}: {e:?}", case.name));

    let generic_index = case.generic_uses_index.then_some(case.index);
    [
        check(
            case.name,
            "custom plan",
            &custom,
            Some(case.index),
            case.once,
        ),
        check(
            case.name,
            "generic plan",
            &generic,
            generic_index,
            case.once,
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[tokio::test]
async fn explain_hot_queries_use_indexes() {
    let Some(base) = pg_url_or_skip("postgres::tests::explain_hot_queries_use_indexes") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let clock = ManualClock::starting_now();
    let store = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::new(clock.clone()))
        .await
        .expect("connect to the test server");
    store.migrate().await.expect("migrate");
    let conn = store.pool.get().await.expect("a pooled connection");
    conn.batch_execute(LOAD)
        .await
        .expect("load and analyze jobs");
    let total: i64 = conn
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .expect("count jobs")
        .get(0);
    assert!(total >= 100_000, "loaded only {total} rows");

    let now = clock.now();
    let ts = |t: keel_core::Timestamp| format!("'{}'::timestamptz", t.to_rfc3339());
    let past = now - chrono::TimeDelta::minutes(10);

    let queue = QueueName::parse("q3").expect("valid queue");
    let by_queue_state = ListQuery::new(&ListParams {
        queue: Some(queue.clone()),
        state: Some(JobState::Available),
        limit: 100,
        ..ListParams::default()
    });
    let running_by_queue = ListQuery::new(&ListParams {
        queue: Some(queue.clone()),
        state: Some(JobState::Running),
        limit: 100,
        ..ListParams::default()
    });
    let cursor = JobId::parse("00000000-0000-7000-8000-000000000400").expect("valid id");
    let ids = vec![*cursor.as_uuid()];
    let tokens = vec![*cursor.as_uuid()];
    let results: Vec<Option<String>> = vec![None];
    let after_cursor = ListQuery::new(&ListParams {
        after: Some(cursor),
        limit: 100,
        ..ListParams::default()
    });
    let limit = 100_i64;
    let (owner, queue_name) = ("w2", queue.as_str());
    let (tenant, key) = ("t3", "key-3");
    let channel = "keel_jobs:explain";
    let (tenants, keys) = (vec!["t3"], vec!["key-3"]);

    let cases = [
        Case {
            name: "lease",
            sql: &LEASE_SQL,
            params: vec![&queue_name, &limit, &owner, &now, &now],
            literals: format!("'q3', 100, 'w2', {}, {}", ts(now), ts(now)),
            index: "jobs_lease_idx",
            generic_uses_index: true,
            once: &["queues"],
        },
        Case {
            name: "list by queue and state",
            sql: &by_queue_state.sql,
            params: by_queue_state.params(),
            literals: "'q3', 100".to_owned(),
            // The state is a literal (the listing indexes leave running jobs out, so the
            // plan must know it): the generic plan is the custom one.
            index: "jobs_queue_state_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "list running by queue",
            sql: &running_by_queue.sql,
            params: running_by_queue.params(),
            literals: "'q3', 100".to_owned(),
            index: "jobs_expired_lease_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "complete",
            sql: &COMPLETE_SQL,
            params: vec![&ids, &tokens, &results, &now],
            literals: format!(
                "ARRAY['{cursor}'::uuid], ARRAY['{cursor}'::uuid], ARRAY[NULL::text], {}",
                ts(now)
            ),
            // By primary key only, never by the running index (dead entries pile up there).
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "list after cursor",
            sql: &after_cursor.sql,
            params: after_cursor.params(),
            literals: format!("'{cursor}', 100"),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "promote",
            sql: &PROMOTE_SQL,
            params: vec![&now, &limit, &channel],
            literals: format!("{}, 100, 'keel_jobs:explain'", ts(now)),
            index: "jobs_due_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "rescue",
            sql: &RESCUE_LOCK_SQL,
            params: vec![&now, &limit],
            literals: format!("{}, 100", ts(now)),
            index: "jobs_expired_lease_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "delete finished",
            sql: &DELETE_FINISHED_SQL,
            params: vec![&past, &limit],
            literals: format!("{}, 100", ts(past)),
            index: "jobs_finished_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "read idempotency key",
            sql: IDEMPOTENCY_READ_SQL,
            params: vec![&tenant, &key, &now],
            literals: format!("'t3', 'key-3', {}", ts(now)),
            index: "idempotency_keys_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "expire idempotency key",
            sql: IDEMPOTENCY_EXPIRE_SQL,
            params: vec![&tenant, &key, &now],
            literals: format!("'t3', 'key-3', {}", ts(now)),
            index: "idempotency_keys_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "unique holders",
            sql: &UNIQUE_HOLDERS_SQL,
            params: vec![&tenants, &keys],
            literals: "ARRAY['t3'], ARRAY['key-3']".to_owned(),
            index: "jobs_unique_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "delete expired idempotency keys",
            sql: IDEMPOTENCY_DELETE_EXPIRED_SQL,
            params: vec![&now, &limit],
            literals: format!("{}, 100", ts(now)),
            index: "idempotency_keys_expires_idx",
            generic_uses_index: true,
            once: &[],
        },
    ];
    let mut problems = Vec::new();
    for case in &cases {
        problems.extend(explain(&conn, case).await);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));

    // The gauges' count (no parameters: one plan) reads the unfinished jobs through their
    // partial indexes, never an index that holds the finished ones.
    let row = conn
        .query_one(&format!("EXPLAIN (FORMAT JSON) {}", *QUEUE_DEPTHS_SQL), &[])
        .await
        .expect("explain queue depths");
    let plan: Value = row.get(0);
    let facts = PlanFacts::of(&plan);
    let pretty = serde_json::to_string_pretty(&plan).unwrap_or_default();
    assert!(facts.seq_scans.is_empty(), "{pretty}");
    for index in ["jobs_lease_idx", "jobs_due_idx", "jobs_expired_lease_idx"] {
        assert!(
            facts.indexes.iter().any(|i| i == index),
            "{index}: {pretty}"
        );
    }
    for index in [
        "jobs_queue_state_idx",
        "jobs_tenant_state_idx",
        "jobs_finished_idx",
    ] {
        assert!(
            !facts.indexes.iter().any(|i| i == index),
            "{index}: {pretty}"
        );
    }
    drop(conn);
    store.close().await;
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::starting_now())
}

/// `base` with its database name replaced (test URLs are `postgres://…/db[?…]`).
fn with_database(base: &str, db: &str) -> String {
    let (head, query) = base
        .split_once('?')
        .map_or((base, None), |(h, q)| (h, Some(q)));
    let head = head.rsplit_once('/').map_or(head, |(h, _)| h);
    match query {
        Some(q) => format!("{head}/{db}?{q}"),
        None => format!("{head}/{db}"),
    }
}

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
    let url = with_database(&base, "keel_no_such_database");
    let err = PgStore::connect(&url, PgOptions::for_tests(), clock())
        .await
        .expect_err("the database does not exist");
    assert_eq!(err.class(), "permanent", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let Some(base) = pg_url_or_skip("postgres::tests::concurrent_migrations_apply_once") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
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
    let conn = stores[0].pool.get().await.expect("connection");
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
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-csearch_path%3Dkeel_no_such_schema");
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

async fn backend_pid(conn: &Object) -> i32 {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0)
}

/// Polls `cond` until it holds; gives up (fails) after 20 s, a hang guard.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("gave up waiting for {what}"));
}

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
    let status = store.pool.status();
    assert!(
        status.size >= 3,
        "min_idle connections are opened at connect: {status:?}"
    );

    let held = [
        store.pool.get().await.expect("connection"),
        store.pool.get().await.expect("connection"),
        store.pool.get().await.expect("connection"),
    ];
    let mut first = HashSet::new();
    for c in &held {
        first.insert(backend_pid(c).await);
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Past max_lifetime: whatever the pool hands out now is a new backend.
    let conn = store.pool.get().await.expect("connection");
    let pid = backend_pid(&conn).await;
    assert!(
        !first.contains(&pid),
        "a connection older than max_lifetime was reused"
    );
    drop(conn);

    // The maintenance task evicts expired idle connections and tops the pool back up.
    let pool = store.pool.clone();
    eventually("the pool to be topped up to min_idle", || {
        pool.status().size >= 3
    })
    .await;

    store.close().await;
    assert!(store.pool.is_closed());
    assert!(
        store.maintenance.is_finished(),
        "close() stops and joins the maintenance task"
    );
    let err = store.ping().await.expect_err("closed");
    assert_eq!(err.class(), "permanent", "{err:?}");
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
    let conn = store.pool.get().await.expect("connection");
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
        let mapped = super::error::db(e, "storing a hostile value".into());
        assert_eq!(mapped.class(), "rejected", "{code:?}: {mapped:?}");
    }
    drop(conn);
    store.close().await;
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
    let busy = store.pool.get().await.expect("the only connection");
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
    let victim = store.pool.get().await.expect("connection");
    let killer = store.pool.get().await.expect("connection");
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
    let err = super::error::db(e, "running a query on a killed connection".into());
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

#[tokio::test]
async fn duplicate_ids_are_conflicts_naming_the_key() {
    let Some(base) = pg_url_or_skip("postgres::tests::duplicate_ids_are_conflicts_naming_the_key")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let store = PgStore::connect(&schema.url, PgOptions::for_tests(), clock())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
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

/// An idempotent insert of one job under `key` with fingerprint `mine`.
fn keyed_request(key: &str) -> keel_core::store::IdempotentInsert {
    keel_core::store::IdempotentInsert {
        tenant: keel_core::TenantId::parse("t").expect("valid tenant"),
        key: keel_core::IdempotencyKey::parse(key).expect("valid key"),
        fingerprint: "mine".to_owned(),
        jobs: vec![keel_core::NewJob::new(
            keel_core::JobKind::parse("noop").expect("valid kind"),
        )],
        ttl: Duration::from_secs(3600),
        respond: Box::new(|jobs| keel_core::store::StoredResponse {
            status: 201,
            body: jobs[0].id.to_string().into_bytes(),
        }),
    }
}

/// A first use that finds the key inserted by a transaction still in flight waits for it
/// (no error, no guess), then follows its outcome: committed with another request, the key
/// is taken (conflict, nothing inserted); rolled back, the key is free and the waiter
/// creates. This is the wait the conformance suite's 50-way race relies on, made visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_claim_waits_for_an_unfinished_holder() {
    use keel_core::store::IdempotentOutcome;
    let Some(base) =
        pg_url_or_skip("postgres::tests::idempotent_claim_waits_for_an_unfinished_holder")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let store = Arc::new(
        PgStore::connect(&schema.url, PgOptions::for_tests(), clock())
            .await
            .expect("connect"),
    );
    store.migrate().await.expect("migrate");
    let watcher = store.pool.get().await.expect("connection");
    for commit in [true, false] {
        let key = if commit {
            "held-then-committed"
        } else {
            "held-then-rolled-back"
        };
        let mut holder = store.pool.get().await.expect("connection");
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
    let Some(base) = pg_url_or_skip("postgres::tests::pausing_records_the_flag_and_time") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let clock = ManualClock::starting_now();
    let store = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::new(clock.clone()))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
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
    let conn = store.pool.get().await.expect("connection");
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

fn noop() -> keel_core::NewJob {
    keel_core::NewJob::new(keel_core::JobKind::parse("noop").expect("valid kind"))
}

async fn count_jobs(store: &PgStore) -> i64 {
    let conn = store.pool.get().await.expect("connection");
    conn.query_one("SELECT count(*) FROM jobs", &[])
        .await
        .expect("count jobs")
        .get(0)
}

/// A migrated store in `schema` with `opts`.
async fn store_in(schema: &PgSchema, opts: PgOptions) -> PgStore {
    let store = PgStore::connect(&schema.url, opts, clock())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Two hundred callers inserting one job each at the same moment are all answered, every
/// job is stored, and the committer wrote them in a handful of statements, not two hundred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_share_commits() {
    let Some(base) = pg_url_or_skip("postgres::tests::concurrent_inserts_share_commits") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
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
    let Some(base) =
        pg_url_or_skip("postgres::tests::one_callers_duplicate_fails_only_that_caller")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
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

    let mut holder = store.pool.get().await.expect("connection");
    let watcher = store.pool.get().await.expect("connection");
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
    let Some(base) = pg_url_or_skip("postgres::tests::close_answers_every_insert") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
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

/// The next wakeup on `stream`, or `None` if none comes within `wait`.
async fn next_wakeup(
    stream: &mut Box<dyn keel_core::WakeupStream>,
    wait: Duration,
) -> Option<QueueName> {
    tokio::time::timeout(wait, stream.next())
        .await
        .ok()
        .flatten()
}

/// An insert through one store wakes another store on the same schema, for that queue (and
/// not for a queue that only got a scheduled job); promotion wakes it too. A store on
/// another schema hears nothing.
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
    let a = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::new(clock.clone()))
        .await
        .expect("connect");
    a.migrate().await.expect("migrate");
    let b = store_in(&schema, PgOptions::for_tests()).await;
    let elsewhere = store_in(&other_schema, PgOptions::for_tests()).await;
    let mut heard = b.wakeups().expect("Postgres delivers wakeups");
    let mut overheard = elsewhere.wakeups().expect("Postgres delivers wakeups");
    eventually("both listeners to be listening", || {
        b.listener.listens() >= 1 && elsewhere.listener.listens() >= 1
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
        next_wakeup(&mut heard, Duration::from_secs(5)).await,
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
        next_wakeup(&mut heard, Duration::from_secs(5)).await,
        Some(later)
    );
    assert_eq!(
        next_wakeup(&mut overheard, Duration::from_millis(500)).await,
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
    let Some(base) =
        pg_url_or_skip("postgres::tests::listener_reconnects_after_its_connection_is_killed")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let store = store_in(&schema, PgOptions::for_tests()).await;
    let mut wakeups = store.wakeups().expect("Postgres delivers wakeups");
    eventually("the listener to be listening", || {
        store.listener.listens() >= 1
    })
    .await;
    let conn = store.pool.get().await.expect("connection");
    let killed: i64 = conn
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE query = $1 AND pid <> pg_backend_pid()",
            &[&format!(
                "LISTEN \"{}\"; LISTEN \"{}\"",
                store.channel, store.changes_channel
            )],
        )
        .await
        .expect("terminate the listener")
        .get(0);
    assert_eq!(
        killed, 1,
        "exactly one session listens on {}",
        store.channel
    );
    drop(conn);
    eventually("the listener to listen again", || {
        store.listener.listens() >= 2
    })
    .await;
    let queue = QueueName::parse("after-reconnect").expect("valid queue");
    store
        .insert(vec![noop().queue(queue.clone())])
        .await
        .expect("insert");
    assert_eq!(
        next_wakeup(&mut wakeups, Duration::from_secs(5)).await,
        Some(queue)
    );
    store.close().await;
}

/// Heartbeats and completions over the same running jobs, each batch in a random order,
/// must never deadlock: every batched lease-fenced update locks its rows in id order first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_heartbeats_and_completions_do_not_deadlock() {
    use keel_core::store::{Completion, HeartbeatParams, LeaseParams, LeaseRef};
    use rand::seq::SliceRandom;

    let Some(base) =
        pg_url_or_skip("postgres::tests::overlapping_heartbeats_and_completions_do_not_deadlock")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let store = Arc::new(
        PgStore::connect(&schema.url, PgOptions::for_tests(), clock())
            .await
            .expect("connect"),
    );
    store.migrate().await.expect("migrate");
    for round in 0..5 {
        let q = QueueName::parse(format!("dl{round}")).expect("valid queue");
        let jobs: Vec<keel_core::NewJob> = (0..400)
            .map(|_| {
                keel_core::NewJob::new(keel_core::JobKind::parse("noop").expect("kind"))
                    .queue(q.clone())
            })
            .collect();
        store.insert(jobs).await.expect("insert");
        let leased = store
            .lease(LeaseParams {
                queue: q.clone(),
                max: 400,
                lease_for: Duration::from_secs(60),
                owner: keel_core::WorkerId::parse("dl").expect("worker"),
                tenant: None,
                kinds: Vec::new(),
            })
            .await
            .expect("lease");
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

/// `statement_timeout` reaches every pooled connection (on top of the URL's own options,
/// which confine the store to its schema), cuts a statement that runs past it, and does not
/// stop migrations.
#[tokio::test]
async fn statement_timeout_bounds_every_statement_but_not_migrations() {
    let Some(base) = pg_url_or_skip("postgres::tests::statement_timeout_bounds_every_statement")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let opts = PgOptions {
        statement_timeout: Some(Duration::from_millis(300)),
        ..PgOptions::for_tests()
    };
    let store = store_in(&schema, opts).await;
    let conn = store.pool.get().await.expect("connection");
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

/// The next state change on `stream`, or `None` if none comes within `wait`.
async fn next_change(
    stream: &mut Box<dyn keel_core::ChangeStream>,
    wait: Duration,
) -> Option<keel_core::store::StateChange> {
    tokio::time::timeout(wait, stream.next())
        .await
        .ok()
        .flatten()
}

/// Every kind of announced move (cancel, retry, rescue) made through one store reaches
/// another store on the same schema, in commit order, with the right state and queue;
/// inserting, leasing, completing and failing announce nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_another_store_on_the_same_schema() {
    use keel_core::store::StateChange;
    use keel_core::store::{Completion, FailParams, LeaseParams, LeaseRef, RescueParams};

    let Some(base) =
        pg_url_or_skip("postgres::tests::changes_reach_another_store_on_the_same_schema")
    else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let clock = ManualClock::starting_now();
    let a = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::new(clock.clone()))
        .await
        .expect("connect");
    a.migrate().await.expect("migrate");
    let b = store_in(&schema, PgOptions::for_tests()).await;
    let mut heard = b.changes().expect("Postgres delivers changes");
    eventually("the listener to be listening", || b.listener.listens() >= 1).await;

    let queue = QueueName::parse("events").expect("valid queue");
    let jobs = a
        .insert((0..5).map(|_| noop().queue(queue.clone())).collect())
        .await
        .expect("insert");
    let leased = a
        .lease(LeaseParams {
            queue: queue.clone(),
            max: 5,
            lease_for: Duration::from_secs(30),
            owner: keel_core::WorkerId::parse("w").expect("valid worker"),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .expect("lease");
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
        match next_change(&mut heard, Duration::from_secs(5)).await {
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
        next_change(&mut heard, Duration::from_millis(300)).await,
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
    use keel_core::store::{LeaseParams, RescueParams};

    let Some(base) = pg_url_or_skip("postgres::tests::many_changes_are_chunked_and_all_delivered")
    else {
        return;
    };
    const N: usize = 500;
    let schema = PgSchema::create(&base).await;
    let clock = ManualClock::starting_now();
    let a = PgStore::connect(&schema.url, PgOptions::for_tests(), Arc::new(clock.clone()))
        .await
        .expect("connect");
    a.migrate().await.expect("migrate");
    let b = store_in(&schema, PgOptions::for_tests()).await;
    let mut heard = b.changes().expect("Postgres delivers changes");
    eventually("the listener to be listening", || b.listener.listens() >= 1).await;
    let mut raw = raw_listen(&schema.url, &a.changes_channel).await;

    let queue =
        QueueName::parse(format!("q{}", "x".repeat(QueueName::MAX_LEN - 1))).expect("valid queue");
    a.insert((0..N).map(|_| noop().queue(queue.clone())).collect())
        .await
        .expect("insert");
    let leased = a
        .lease(LeaseParams {
            queue: queue.clone(),
            max: N as u32,
            lease_for: Duration::from_secs(30),
            owner: keel_core::WorkerId::parse("w").expect("valid worker"),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .expect("lease");
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
        let Some(c) = next_change(&mut heard, Duration::from_secs(5)).await else {
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
        N.div_ceil(super::sql::CHANGES_PER_NOTIFICATION),
        "one notification per {} changes",
        super::sql::CHANGES_PER_NOTIFICATION
    );
    for s in [a, b] {
        s.close().await;
    }
}
