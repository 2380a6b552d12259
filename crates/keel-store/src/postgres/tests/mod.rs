//! Postgres-specific tests: what the conformance suite cannot see from the `Store` trait,
//! one module per area below (`plans`, `connect`, `pool`, `writes`, `notify`); the helpers
//! they share are here.
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
//! - **PgBouncer** in transaction mode: no session state outlives a transaction, and the
//!   ways of talking a transaction pooler breaks are configuration errors naming the
//!   setting.
//! - **State changes**: what complete, fail, cancel, retry and rescue announce reaches
//!   another store on the same schema, in order and nothing else; a completion batch too
//!   large for one notification is split under Postgres's payload limit and arrives whole.
//! - **Vacuum**: Keel vacuums and analyses the job table itself where autovacuum is off,
//!   past autovacuum's thresholds, and leaves it alone where autovacuum runs.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use keel_core::{Clock, ManualClock, QueueName, WorkStore};

use super::{PgOptions, PgStore};
use crate::testkit::PgSchema;

mod connect;
mod notify;
mod pgbouncer;
mod plans;
mod pool;
mod vacuum;
mod writes;

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::starting_now())
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

fn noop() -> keel_core::NewJob {
    keel_core::NewJob::new(keel_core::JobKind::parse("noop").expect("valid kind"))
}

/// Leases up to `max` jobs of `queue` through `store`, for 30 s.
async fn lease_from(store: &PgStore, queue: &QueueName, max: u32) -> Vec<keel_core::Job> {
    store
        .lease(keel_core::store::LeaseParams {
            queue: queue.clone(),
            max,
            lease_for: Duration::from_secs(30),
            owner: keel_core::WorkerId::parse("w").expect("valid worker"),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .expect("lease")
}

async fn count_jobs(store: &PgStore) -> i64 {
    count_jobs_where(store, "true", &[]).await
}

/// How many stored jobs match `filter` (a WHERE clause over `jobs`, with `params`).
async fn count_jobs_where(
    store: &PgStore,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    let conn = store.pool().get().await.expect("connection");
    conn.query_one(&format!("SELECT count(*) FROM jobs WHERE {filter}"), params)
        .await
        .unwrap_or_else(|e| panic!("counting jobs where {filter}: {e}"))
        .get(0)
}

/// A fresh schema for `test`, or `None` (the test is skipped) when no server is configured.
async fn schema_or_skip(test: &str) -> Option<PgSchema> {
    Some(PgSchema::create(&crate::testkit::pg_url_or_skip(test)?).await)
}

/// A migrated store in `schema` with `opts`.
async fn store_in(schema: &PgSchema, opts: PgOptions) -> PgStore {
    store_with_clock(schema, opts, clock()).await
}

/// A migrated store in `schema` with `opts`, reading the time from `clock` (tests that move
/// time keep a handle on it).
async fn store_with_clock(schema: &PgSchema, opts: PgOptions, clock: Arc<dyn Clock>) -> PgStore {
    let store = PgStore::connect(&schema.url, opts, clock)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    store
}
