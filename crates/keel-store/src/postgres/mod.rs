//! [`PgStore`]: the job store for several Keel replicas sharing one Postgres database.
//!
//! - **Leases** take rows with `FOR UPDATE SKIP LOCKED`, so replicas leasing from the same
//!   queue never block each other and never receive the same job.
//! - **Batches** are one statement each: inserts, heartbeats, completions, releases and
//!   rescues send their items as arrays and `unnest` them server-side, so a batch of a
//!   thousand costs one round trip, not a thousand.
//! - **State guards** come from the state machine ([`keel_core::Transition::sources`]); see
//!   `sql.rs`. Each statement lives in the module that runs it.
//! - **Time** comes from the injected [`Clock`], never from SQL `now()`, so every replica and
//!   every test decides "expired" and "due" the same way.
//! - **Connections** come from a bounded pool (deadpool) with an acquire timeout, a maximum
//!   lifetime and a warm minimum; see `pool.rs`.
//! - **Inserts are group-committed**: concurrent `insert` calls are merged into one
//!   statement by a committer task, each caller answered after the commit; see `commit.rs`.
//! - **Wakeups**: statements that make jobs available `pg_notify` the store's channel (inserts
//!   once they have committed, from a notifier of their own: `wakeup.rs`), and a listening
//!   connection outside the pool turns the notifications into [`Store::wakeups`] streams;
//!   see `listen.rs`.
//! - **State changes**: cancel, retry and rescue announce the jobs they moved (completions
//!   and failures are not announced: see `lease.rs` for the measured reason) on a second
//!   channel, heard on the same connection and handed to [`Store::changes`]
//!   streams, so a replica waiting for a job sees it finish on another replica.
//! - **Unique jobs** are inserted with `ON CONFLICT DO NOTHING` on the partial unique index
//!   and answered with the key's holder (see `commit.rs`); **leadership** is a row with a
//!   term and an epoch; **cron ticks** are recorded under a primary key in the transaction
//!   that inserts their jobs, behind the leader's fence.
//!
//! Every statement is unqualified and resolves through the connection's `search_path`, so a
//! URL with `?options=-csearch_path%3D<schema>` confines a store to one schema (tests run one
//! schema each).

mod commit;
mod error;
mod idempotency;
mod jobs;
mod leader;
mod lease;
mod listen;
mod maintenance;
mod pool;
mod queues;
mod rows;
mod schedules;
mod sql;
mod statements;
mod task;
#[cfg(all(test, feature = "testkit"))]
mod tests;
mod wakeup;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;
use keel_core::store::{
    IdempotentOutcome, LeaseRef, PoolStats, QueueStats, StateCounts, StoredResponse,
};
use keel_core::{
    ChangeStream, Clock, IdempotencyKey, Job, JobId, JobState, NewJob, QueueName, Store,
    StoreError, Transition, WakeupStream,
};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::key_reused;
use crate::migrate::{self, MigrationReport};
use commit::Committer;
use listen::Listener;
use pool::{Lender, Lent};
use sql::{EXISTING_SQL, STATE_OF_SQL};
use statements::Statements;
use task::Background;
use wakeup::{Pending, Wakeups};

/// Connection pool settings. Each bounds a resource so overload turns into fast, retryable
/// errors instead of unbounded waits (guarantee G5).
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Most connections this process opens. Postgres pays a process per connection and caps
    /// them server-wide (`max_connections`), so N replicas × this must fit under the server's
    /// limit with room for operators; callers beyond it wait up to `acquire_timeout`.
    pub max_connections: usize,
    /// Connections kept open and idle even when quiet, so the first requests after startup or
    /// after connections were dropped do not each pay a TCP + authentication handshake.
    pub min_idle: usize,
    /// Connections older than this are closed instead of reused. Long-lived backends grow
    /// (caches, plans); recycling them also lets a load balancer or PgBouncer in front of
    /// Postgres rebalance, and picks up rotated credentials. `None` keeps them forever.
    pub max_lifetime: Option<Duration>,
    /// Longest a caller waits for a free connection before getting a transient error. Keeps
    /// pool exhaustion from turning into an unbounded queue of waiting requests; it should be
    /// well under the request deadline so the caller can still answer 503 in time.
    pub acquire_timeout: Duration,
    /// Longest to wait for a new connection to be established. An unreachable server (black-
    /// holed packets, not a refusal) must fail fast rather than hang startup or a request.
    pub connect_timeout: Duration,
    /// Insert calls that may wait for the group committer. Beyond it callers wait to be
    /// queued (backpressure, bounded by their own deadline) rather than the queue, and the
    /// memory its jobs hold, growing without limit under overload.
    pub insert_queue: usize,
    /// Most jobs merged into one group commit. Larger batches amortise the commit further but
    /// make each statement, and the wait of every caller in it, longer; past a couple of
    /// thousand rows the per-row cost dominates and merging gains little. A single call with
    /// more jobs is written on its own, never split.
    pub insert_batch_max: usize,
    /// Group commits in flight at once, each on its own pooled connection. One is enough to
    /// batch, but then every batch waits for the previous one's WAL flush; a second overlaps
    /// the next batch's round trip with that flush. More only splits the load into smaller
    /// batches. Counts against `max_connections`.
    pub insert_commits: usize,
    /// Server-side cap on each statement (`SET statement_timeout` on every new connection).
    /// A request that gives up at its deadline drops its future, but the statement it had
    /// sent keeps running on the server; this bounds how long. Set it a little above the
    /// request timeout, so a statement a live request is waiting on is never cut first.
    /// `None` (the default) leaves the server's setting alone. Migrations lift it for their
    /// own transaction: a schema change may legitimately take longer.
    pub statement_timeout: Option<Duration>,
    /// What sits between Keel and Postgres; see [`Pooler`].
    pub pooler: Pooler,
    /// Where `LISTEN` connects, when not to the URL the pool uses: straight to Postgres,
    /// past a transaction pooler (which cannot carry a session's `LISTEN`). Without it,
    /// behind a transaction pooler, Keel does not listen: wakeups fall back to polling and
    /// state changes on other replicas are not heard.
    pub listen_url: Option<String>,
}

/// What sits between Keel and Postgres, which decides how statements are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Postgres itself, or a pooler in session mode: a connection is one server session.
    /// Statements are prepared once per connection and the statement timeout is a startup
    /// option.
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer's `pool_mode = transaction`): each
    /// transaction may run on a different server session. Keel sends no startup `options`
    /// (PgBouncer refuses them), no named prepared statements (unnamed ones, parsed and
    /// run in one round trip), keeps no session state, and `LISTEN`s only through
    /// [`PgOptions::listen_url`]. Set the statement timeout on the role or the database
    /// instead (`ALTER ROLE keel SET statement_timeout = '3s'`).
    Transaction,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_idle: 2,
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            acquire_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            insert_queue: 4096,
            insert_batch_max: 2000,
            insert_commits: 2,
            statement_timeout: None,
            pooler: Pooler::None,
            listen_url: None,
        }
    }
}

impl PgOptions {
    /// A small pool for tests: many tests run in parallel against one server, each with a
    /// store of its own, and must not exhaust the server's connection limit together.
    pub fn for_tests() -> Self {
        Self {
            max_connections: 8,
            min_idle: 1,
            ..Self::default()
        }
    }
}

/// A [`Store`] on Postgres. Cheap to share behind an `Arc`: every method borrows a pooled
/// connection for the duration of one statement or transaction (inserts through the group
/// committer, which borrows one per batch).
pub struct PgStore {
    /// Lends the pool's connections to calls (`pool.rs`).
    lender: Lender,
    /// How statements are sent: named, or unnamed behind a transaction pooler.
    sql: Statements,
    clock: Arc<dyn Clock>,
    /// `host:port/db` for messages (never the password).
    target: String,
    /// Where wakeups are sent and heard: `keel_jobs:<schema>`, fixed at connect.
    channel: String,
    /// Where state changes are sent and heard: `keel_changes:<schema>`.
    changes_channel: String,
    maintenance: Background,
    /// Sends the wakeups of committed inserts (`wakeup.rs`).
    wakeups: Arc<Wakeups>,
    committer: Committer,
    /// `None` behind a transaction pooler without a listen URL: nothing is heard, and
    /// waiters poll.
    listener: Option<Listener>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("pool", &self.pool().status())
            .field("channel", &self.channel)
            .field("committer", &self.committer)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// Lazily built context for an error message: only formatted when something failed.
type Ctx<'a> = &'a (dyn Fn() -> String + Send + Sync);

/// Rolls `tx` back and waits for the server's answer: how a transaction that found nothing
/// to do, or a reason to refuse, ends early, so that its call can then say
/// [`answered`](Lent::answered) and keep its connection. Dropping it instead sends its
/// `ROLLBACK` without waiting, and behind a transaction pooler the [`Lent`] connection is
/// then closed rather than given back (see there for why): harmless on an error path, but
/// a reconnect every second for the leader's rescue pass, which usually finds nothing.
async fn roll_back(tx: deadpool_postgres::Transaction<'_>, ctx: Ctx<'_>) -> Result<(), StoreError> {
    tx.rollback().await.map_err(|e| error::db(e, ctx()))
}

impl PgStore {
    /// Connects to the server at `url` (libpq URL syntax, including
    /// `?options=-csearch_path%3D<schema>`), verifies it answers, warms `min_idle`
    /// connections, and starts the pool's maintenance task, the group committer and the
    /// wakeup listener (which connects in the background).
    ///
    /// Fails with [`StoreError::Transient`] when the server is unreachable or not accepting
    /// connections yet (worth retrying at startup), and [`StoreError::Permanent`] for a
    /// malformed URL, bad credentials or a missing database.
    pub async fn connect(
        url: &str,
        opts: PgOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::permanent("parsing the Postgres URL", e))?;
        let target = describe(&cfg);
        if opts.max_connections == 0 {
            return Err(StoreError::permanent(
                format!("configuring the pool for {target}"),
                "max_connections must be at least 1",
            ));
        }
        cfg.connect_timeout(opts.connect_timeout);
        if cfg.get_application_name().is_none() {
            // Shows up in pg_stat_activity, so operators can tell Keel's sessions apart.
            cfg.application_name("keel");
        }
        match (opts.pooler, opts.statement_timeout) {
            (Pooler::None, Some(t)) => {
                // Appended to any options the URL carries (tests set search_path there).
                let options = match cfg.get_options() {
                    Some(o) if !o.trim().is_empty() => {
                        format!("{o} -c statement_timeout={}", t.as_millis().max(1))
                    }
                    _ => format!("-c statement_timeout={}", t.as_millis().max(1)),
                };
                cfg.options(&options);
            }
            (Pooler::None, None) => {}
            (Pooler::Transaction, _) => {
                if cfg.get_options().is_some_and(|o| !o.trim().is_empty()) {
                    return Err(StoreError::misconfigured(
                        format!("configuring the connections to {target}"),
                        "the URL sets `options`, which a transaction pooler cannot carry \
                         (PgBouncer refuses it as an unsupported startup parameter); set \
                         them on the role or the database instead (ALTER ROLE … SET …)",
                    ));
                }
            }
        }
        let sql = match opts.pooler {
            Pooler::None => Statements::named(),
            Pooler::Transaction => Statements::unnamed(cfg.clone()),
        };
        let pool = pool::build(cfg.clone(), &opts).map_err(|e| {
            StoreError::permanent(format!("building the connection pool for {target}"), e)
        })?;
        let server = {
            let conn = pool
                .get()
                .await
                .map_err(|e| error::pool(e, format!("connecting to {target}")))?;
            // Also proves the server answers.
            ServerFacts::read(&conn, &sql)
                .await
                .map_err(|e| error::db(e, format!("checking that {target} answers")))?
        };
        let channel = listen::channel_for(server.schema.as_deref());
        let changes_channel = listen::changes_channel_for(server.schema.as_deref());
        if let Err(e) = pool::top_up(&pool, opts.min_idle).await {
            tracing::warn!(error = %e, %target, "could not open min_idle Postgres connections");
        }
        let maintenance = pool::keep(&pool, &opts);
        let lender = Lender::new(pool, sql.are_unnamed());
        let pending = Arc::new(Pending::default());
        let listener = match (&opts.listen_url, opts.pooler) {
            (Some(url), _) => {
                let listen_cfg: tokio_postgres::Config = url.parse().map_err(|e| {
                    StoreError::permanent("parsing the Postgres URL to LISTEN on", e)
                })?;
                Some(Listener::spawn(
                    listen_cfg,
                    channel.clone(),
                    &changes_channel,
                    Arc::clone(&pending),
                ))
            }
            (None, Pooler::None) => Some(Listener::spawn(
                cfg,
                channel.clone(),
                &changes_channel,
                Arc::clone(&pending),
            )),
            (None, Pooler::Transaction) => {
                tracing::warn!(
                    %target,
                    "behind a transaction pooler without a listen URL (KEEL_DATABASE_LISTEN_URL): \
                     no LISTEN, so workers find new jobs by polling (up to the poll interval \
                     late) and jobs finishing on other replicas are seen only when re-read"
                );
                None
            }
        };
        // The listener sends the inserts' wakeups on its own connection; without one, the
        // pool does.
        let wakeups = Arc::new(if listener.is_some() {
            Wakeups::for_listener(pending)
        } else {
            Wakeups::through_pool(pending, lender.clone(), sql.clone(), channel.clone())
        });
        let committer = Committer::spawn(
            lender.clone(),
            sql.clone(),
            Arc::clone(&wakeups),
            commit::Settings {
                queue: opts.insert_queue,
                max_batch: opts.insert_batch_max,
                // Each commit holds a pooled connection; more could only wait for one.
                concurrency: opts.insert_commits.min(opts.max_connections),
            },
        );
        server.warn(&target, sql.are_unnamed(), opts.statement_timeout);
        Ok(Self {
            lender,
            sql,
            clock,
            target,
            channel,
            changes_channel,
            maintenance,
            wakeups,
            committer,
            listener,
        })
    }

    /// `SHOW <setting>` on every connection the pool can hold: all `max_connections` are
    /// checked out at once (so the pool opens the missing ones, exactly as load would) and
    /// each answers. For the tests that guard G1: `synchronous_commit` and `fsync` can be
    /// set per session (startup options, a `SET` on connect, the role or the database), and
    /// a downgrade on any pooled session would go unnoticed by a SIGKILL test of Keel,
    /// since a killed client does not take the server's WAL buffers with it.
    #[cfg(any(test, feature = "testkit"))]
    pub async fn show_on_every_connection(&self, setting: &str) -> Result<Vec<String>, StoreError> {
        let ctx = || format!("checking out every pooled connection of {}", self.target);
        let mut held = Vec::with_capacity(self.pool().status().max_size);
        for _ in 0..self.pool().status().max_size {
            held.push(self.pool().get().await.map_err(|e| error::pool(e, ctx()))?);
        }
        let mut out = Vec::with_capacity(held.len());
        for conn in &held {
            let row = self
                .sql
                .query_one(conn, "SELECT current_setting($1)", &[&setting])
                .await
                .map_err(|e| error::db(e, format!("reading {setting}")))?;
            out.push(
                row.try_get(0)
                    .map_err(|e| error::db(e, format!("reading {setting}")))?,
            );
        }
        Ok(out)
    }

    /// How many times the wakeup listener has (re)started listening; 0 without one.
    #[cfg(test)]
    fn listens(&self) -> u64 {
        self.listener.as_ref().map_or(0, Listener::listens)
    }

    /// The listening session's backend process id; 0 without one.
    #[cfg(test)]
    fn listener_backend(&self) -> i32 {
        self.listener.as_ref().map_or(0, Listener::backend)
    }

    /// Applies pending migrations in one transaction. Safe to call from several processes
    /// starting at once: they serialise on an advisory lock keyed by the schema (so stores in
    /// different schemas do not wait for each other), and the later ones find nothing to do.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        let ctx = || format!("migrating the schema on {}", self.target);
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        // Typed by hand rather than through `self.sql`: behind a transaction pooler its
        // types are learned on another connection, which cannot see the tracking table
        // this transaction creates.
        let schema: Option<String> = tx
            .query_typed_one("SELECT current_schema()", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| error::db(e, ctx()))?;
        let Some(schema) = schema else {
            return Err(StoreError::permanent(
                ctx(),
                "no schema in the search_path exists, so there is nowhere to create Keel's \
                 tables (create the schema, or fix options=-csearch_path in the URL)",
            ));
        };
        // Lock before touching the tracking table: even CREATE TABLE IF NOT EXISTS fails when
        // two sessions run it at the same moment.
        tx.batch_execute(
            "SET LOCAL statement_timeout = 0;
             SELECT pg_advisory_xact_lock(hashtextextended('keel_migrate:' || current_schema(), 0));
             CREATE TABLE IF NOT EXISTS keel_schema_migrations (
                 version    bigint      PRIMARY KEY,
                 name       text        NOT NULL,
                 checksum   text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await
        .map_err(|e| error::db(e, ctx()))?;
        let applied = tx
            .query_typed(
                "SELECT version, checksum FROM keel_schema_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<Vec<(i64, String)>, tokio_postgres::Error>>()
            .map_err(|e| error::db(e, ctx()))?;
        let todo = migrate::pending(migrate::POSTGRES, &applied)
            .map_err(|e| StoreError::permanent(ctx(), e))?;
        let now = self.clock.now();
        let mut report = MigrationReport {
            applied: Vec::with_capacity(todo.len()),
            current: applied.iter().map(|(v, _)| *v).max().unwrap_or(0),
        };
        for m in todo {
            let mctx = || {
                format!(
                    "applying migration {} ({}) in schema {schema}",
                    m.version, m.name
                )
            };
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| error::db(e, mctx()))?;
            tx.query_typed(
                "INSERT INTO keel_schema_migrations (version, name, checksum, applied_at) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    (&m.version, Type::INT8),
                    (&m.name, Type::TEXT),
                    (&m.checksum(), Type::TEXT),
                    (&now, Type::TIMESTAMPTZ),
                ],
            )
            .await
            .map_err(|e| error::db(e, mctx()))?;
            report.applied.push(m.version);
            report.current = report.current.max(m.version);
        }
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        if !report.applied.is_empty() {
            tracing::info!(
                applied = ?report.applied,
                version = report.current,
                %schema,
                "applied Postgres migrations"
            );
        }
        Ok(report)
    }

    /// The connection pool, for its status and its life cycle (calls borrow through
    /// [`conn`](Self::conn)).
    fn pool(&self) -> &Pool {
        self.lender.pool()
    }

    /// A pooled connection for one call, or why none could be had. The call says
    /// [`answered`](Lent::answered) once it has every answer it asked for.
    async fn conn(&self, ctx: Ctx<'_>) -> Result<Lent, StoreError> {
        self.lender.lend().await.map_err(|e| error::pool(e, ctx()))
    }

    /// Runs one statement and returns its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        ctx: Ctx<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn(ctx).await?;
        let rows = self
            .sql
            .query(&*conn, sql, params)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok(rows)
    }

    /// Runs one statement on a pooled connection and returns how many rows it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        ctx: Ctx<'_>,
    ) -> Result<u64, StoreError> {
        let conn = self.conn(ctx).await?;
        let changed = self
            .sql
            .execute(&*conn, sql, params)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok(changed)
    }

    /// Runs one statement planned afresh for these parameters and the table as it is now
    /// (see [`Statements::query_replanned`]); for statements whose best plan depends on how many jobs
    /// there are.
    async fn query_fresh(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        ctx: Ctx<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn(ctx).await?;
        let rows = self
            .sql
            .query_replanned(&*conn, sql, params)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok(rows)
    }

    /// Runs one lease-fenced batch statement (`heartbeat`, `complete`, `release`) whose
    /// first two parameters are the ids and tokens of `leases` and which returns the
    /// `(id, token)` pairs it applied to (rows of NULLs, if a statement ever returns them,
    /// are skipped), each with what `value` reads from the rest of its row. Items it did
    /// not apply to are told apart with one more query: the job exists (its lease is
    /// stale) or it does not.
    async fn fenced_batch<T: Clone>(
        &self,
        leases: &[LeaseRef],
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        value: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
        ctx: Ctx<'_>,
    ) -> Result<Vec<Result<T, StoreError>>, StoreError> {
        let conn = self.conn(ctx).await?;
        let rows = self
            .sql
            .query_replanned(&*conn, sql, params)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let db = |e: tokio_postgres::Error| error::db(e, ctx());
        let mut applied = HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: Option<Uuid> = r.try_get(0).map_err(db)?;
            let token: Option<Uuid> = r.try_get(1).map_err(db)?;
            if let Some(pair) = id.zip(token) {
                applied.insert(pair, value(r).map_err(db)?);
            }
        }
        let held = |l: &LeaseRef| applied.get(&(*l.id.as_uuid(), *l.token.as_uuid()));
        let missing: Vec<Uuid> = leases
            .iter()
            .filter(|l| held(l).is_none())
            .map(|l| *l.id.as_uuid())
            .collect();
        let existing: HashSet<Uuid> = if missing.is_empty() {
            HashSet::new()
        } else {
            self.sql
                .query_replanned(&*conn, EXISTING_SQL, &[&missing])
                .await
                .map_err(db)?
                .iter()
                .map(|r| r.try_get::<_, Uuid>(0))
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        conn.answered();
        Ok(leases
            .iter()
            .map(|l| {
                if let Some(v) = held(l) {
                    Ok(v.clone())
                } else if existing.contains(l.id.as_uuid()) {
                    Err(StoreError::StaleLease(l.id))
                } else {
                    Err(StoreError::NotFound(l.id))
                }
            })
            .collect())
    }

    /// Runs a single-row guarded transition (`cancel`, `retry`). When the guard matched
    /// nothing, reads the job's state to answer NotFound or IllegalTransition. Should the
    /// state change between the two statements to one the transition accepts (a concurrent
    /// retry, say), the transition is tried again, a bounded number of times. The statement
    /// takes the id and now as `$1` and `$2`, then `channels` (wakeup and changes channels,
    /// as it needs them).
    async fn guarded(
        &self,
        id: JobId,
        transition: Transition,
        sql: &str,
        channels: &[&String],
        ctx: Ctx<'_>,
    ) -> Result<Job, StoreError> {
        const ATTEMPTS: usize = 3;
        let conn = self.conn(ctx).await?;
        for _ in 0..ATTEMPTS {
            let now = self.clock.now();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![id.as_uuid(), &now];
            params.extend(channels.iter().map(|c| *c as &(dyn ToSql + Sync)));
            let row = self
                .sql
                .query_opt(&*conn, sql, &params)
                .await
                .map_err(|e| error::db(e, ctx()))?;
            if let Some(row) = row {
                conn.answered();
                return rows::job_from_row(&row);
            }
            let Some(row) = self
                .sql
                .query_opt(&*conn, STATE_OF_SQL, &[id.as_uuid()])
                .await
                .map_err(|e| error::db(e, ctx()))?
            else {
                conn.answered();
                return Err(StoreError::NotFound(id));
            };
            let from = rows::state(rows::get(&row, 0, "state")?)?;
            if let Err(source) = from.apply(transition) {
                conn.answered();
                return Err(StoreError::IllegalTransition { id, source });
            }
        }
        conn.answered();
        Err(StoreError::transient(
            ctx(),
            format!("job {id} kept changing state concurrently"),
        ))
    }
}

/// What `connect` reads from the server, in the round trip that proves it answers.
#[derive(Debug)]
struct ServerFacts {
    /// NULL when no schema of the search_path exists yet; `migrate` reports that, and
    /// wakeups fall back to a shared channel.
    schema: Option<String>,
    /// Every lease and completion leaves a dead row version behind (a job's state is
    /// indexed, so its updates are never HOT), and a queue table lives on vacuum: without
    /// it the lease index keeps an entry for every job ever leased, and each lease on a
    /// quiet queue steps over all of them. Keel then vacuums its own tables
    /// ([`MaintenanceStore::vacuum`](keel_core::MaintenanceStore::vacuum)).
    autovacuum_off: bool,
    /// No statement timeout from the role, the database or the connection.
    statement_timeout_unset: bool,
}

impl ServerFacts {
    async fn read(
        conn: &deadpool_postgres::Object,
        sql: &Statements,
    ) -> Result<Self, tokio_postgres::Error> {
        let row = sql
            .query_one(
                conn,
                "SELECT current_schema(), current_setting('autovacuum') = 'off', \
                 current_setting('statement_timeout') = '0'",
                &[],
            )
            .await?;
        Ok(Self {
            schema: row.try_get(0)?,
            autovacuum_off: row.try_get(1)?,
            statement_timeout_unset: row.try_get(2)?,
        })
    }

    /// Warns once, at startup, about settings that hurt a job server. Behind a transaction
    /// pooler (`unnamed` statements) the statement timeout cannot be a startup option, so
    /// when the role and database set none, a statement left running by a request that
    /// gave up runs unbounded.
    fn warn(&self, target: &str, unnamed: bool, statement_timeout: Option<Duration>) {
        if let Some(wanted) = statement_timeout.filter(|_| unnamed && self.statement_timeout_unset)
        {
            tracing::warn!(
                %target,
                wanted_ms = wanted.as_millis() as u64,
                "behind a transaction pooler Keel cannot set statement_timeout per connection, and \
                 the role and database set none: set it there (ALTER ROLE <user> SET statement_timeout = '…')"
            );
        }
        if self.autovacuum_off {
            tracing::warn!(
                %target,
                "autovacuum is off on this Postgres server: the maintenance leader vacuums and \
                 analyses Keel's job tables itself when their dead rows pass autovacuum's \
                 thresholds, but the server's other tables get nothing; turn autovacuum on \
                 (Keel sets per-table thresholds for it)"
            );
        }
    }
}

/// `host:port/db as user` for messages; the password never appears.
fn describe(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = cfg
                .get_ports()
                .get(i)
                .or_else(|| cfg.get_ports().first())
                .copied()
                .unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
    match cfg.get_user() {
        Some(user) => format!("postgres at {hosts}/{db} as {user}"),
        None => format!("postgres at {hosts}/{db}"),
    }
}

/// The state `from` moves to under `transition`, for transitions decided per row in Rust
/// (`fail`, `rescue`).
fn next_state(id: JobId, from: JobState, transition: Transition) -> Result<JobState, StoreError> {
    from.apply(transition)
        .map_err(|source| StoreError::IllegalTransition { id, source })
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let ctx = || format!("pinging {}", self.target);
        let conn = self.conn(&ctx).await?;
        conn.simple_query("SELECT 1")
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok(())
    }

    fn pool_stats(&self) -> PoolStats {
        let st = self.pool().status();
        PoolStats {
            max: st.max_size,
            idle: st.available,
            in_use: st.size.saturating_sub(st.available),
            // Inserts queued for the committer wait for a connection too, one batch away.
            waiting: st.waiting + self.committer.queued(),
            closed_unanswered: self.lender.closed_unanswered(),
        }
    }

    fn wakeups(&self) -> Option<Box<dyn WakeupStream>> {
        self.listener.as_ref().map(Listener::subscribe)
    }

    fn changes(&self) -> Option<Box<dyn ChangeStream>> {
        self.listener.as_ref().map(Listener::subscribe_changes)
    }

    /// Stops the listener (ending every wakeup and change stream), writes the inserts already queued
    /// and waits for those in flight, then closes the pool and its maintenance task.
    async fn close(&self) {
        if let Some(listener) = &self.listener {
            listener.stop().await;
        }
        self.committer.close().await;
        // After the last batch, so its wakeups go out; before the pool closes under them.
        self.wakeups.stop().await;
        self.pool().close();
        self.maintenance.stop().await;
    }
}

/// Validates every job of an insert before anything is written; the first invalid one names
/// its position, and nothing (no job, no idempotency key) is stored.
fn validate_all(jobs: &[NewJob]) -> Result<(), StoreError> {
    for (index, job) in jobs.iter().enumerate() {
        job.validate(NewJob::DEFAULT_MAX_ARGS_BYTES)
            .map_err(|errors| StoreError::Invalid { index, errors })?;
    }
    Ok(())
}

/// The response an idempotent insert stores with its key.
enum Response {
    /// Built before the claim, stored by it.
    Ready(StoredResponse),
    /// Built after the insert, from the jobs as stored (holders in place of unique jobs
    /// that were not inserted), and written over the claim's placeholder.
    AfterInsert(keel_core::store::Respond),
}

/// A response's status as stored (`smallint`).
fn status_of(response: &StoredResponse, ctx: Ctx<'_>) -> Result<i16, StoreError> {
    i16::try_from(response.status).map_err(|e| {
        StoreError::permanent(format!("{}: response status {}", ctx(), response.status), e)
    })
}

/// The answer for a live key found stored ([`IDEMPOTENCY_READ_SQL`](idempotency::IDEMPOTENCY_READ_SQL)): the original response
/// when the request is the same, a conflict when it is not.
fn replay(
    row: &Row,
    fingerprint: &str,
    key: &IdempotencyKey,
) -> Result<IdempotentOutcome, StoreError> {
    let stored: &str = rows::get(row, 0, "fingerprint")?;
    if stored != fingerprint {
        return Err(key_reused(key));
    }
    let status: i16 = rows::get(row, 1, "status")?;
    let status = u16::try_from(status).map_err(|e| {
        StoreError::permanent(format!("decoding stored response status ({status})"), e)
    })?;
    Ok(IdempotentOutcome::Replayed(StoredResponse {
        status,
        body: rows::get(row, 2, "body")?,
    }))
}

/// The ids and tokens of `leases`, as two array parameters.
fn split(leases: &[LeaseRef]) -> (Vec<Uuid>, Vec<Uuid>) {
    leases
        .iter()
        .map(|l| (*l.id.as_uuid(), *l.token.as_uuid()))
        .unzip()
}

/// Folds `(queue, state, count, paused)` rows (a queue with no jobs has a NULL state and
/// count) into one [`QueueStats`] per queue, sorted by name.
fn stats_from_rows(rows: &[Row]) -> Result<Vec<QueueStats>, StoreError> {
    let mut by_queue: BTreeMap<String, (bool, StateCounts)> = BTreeMap::new();
    for row in rows {
        let queue: String = rows::get(row, 0, "queue")?;
        let state: Option<&str> = rows::get(row, 1, "state")?;
        let count: Option<i64> = rows::get(row, 2, "count")?;
        let paused: bool = rows::get(row, 3, "paused")?;
        let entry = by_queue.entry(queue).or_default();
        entry.0 = paused;
        if let (Some(state), Some(count)) = (state, count) {
            entry
                .1
                .add(rows::state(state)?, u64::try_from(count).unwrap_or(0));
        }
    }
    by_queue
        .into_iter()
        .map(|(queue, (paused, counts))| {
            Ok(QueueStats {
                queue: rows::parsed("queue", &queue, QueueName::parse)?,
                paused,
                counts,
            })
        })
        .collect()
}
