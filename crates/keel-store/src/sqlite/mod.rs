//! The embedded default store: one SQLite file.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit is on disk (the WAL is
//! fsynced) before any caller is answered — G1 holds across `kill -9` and power loss.
//! Writes go through the single [`writer`] thread (group commit); reads run on a small pool
//! of read-only connections in blocking threads, concurrently with writes (WAL readers never
//! block the writer or each other).
//!
//! Each statement is written in the module that runs it (`jobs.rs`, `lease.rs`, ...). This
//! module keeps the SQL several of them share: the state guard derived from the state
//! machine, the insert (`insert_rows`, for plain, idempotent and cron inserts alike) with
//! its unique-holder lookup, and the read that tells a refused transition from a missing
//! job.

mod idempotency;
mod jobs;
mod leader;
mod lease;
mod maintenance;
mod queues;
mod rows;
mod schedules;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::store::{PoolStats, QueueStats, StateCounts};
use keel_core::{
    Clock, Job, JobId, JobState, NewJob, QueueName, Store, StoreError, Timestamp, Transition,
};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::Semaphore;

use crate::migrate::{self, MigrationReport};
use rows::{COLUMNS, job_from_row};
use writer::Writer;

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read-only connections serving `get`, `list` and statistics concurrently with writes.
    /// Reads beyond this wait for a free connection (bounded, G5).
    pub read_connections: usize,
    /// How long a statement waits on a lock held by another process before failing with a
    /// transient error. Only matters if something else opens the same file.
    pub busy_timeout: Duration,
    /// Capacity of the queue into the writer thread; when full, writers wait (backpressure)
    /// rather than queue without bound.
    pub write_queue: usize,
    /// Most writes committed in one transaction (one fsync).
    pub max_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
            write_queue: 4096,
            max_batch: 512,
        }
    }
}

/// A job store on one SQLite file. Cloning is not needed: share it as `Arc<dyn Store>`.
pub struct SqliteStore {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    writer: Writer,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

/// Maps a SQLite error to the store's error classes: busy/locked (another connection holds
/// the lock) and I/O hiccups are transient; unique and primary-key violations are
/// conflicts; data SQLite refuses (too big, a type mismatch, a CHECK or NOT NULL rule) is
/// the request's fault, as Postgres's classes 22, 23 and 54 are; the rest is permanent.
pub(crate) fn map_err(context: &str, e: &rusqlite::Error) -> StoreError {
    /// Extended result codes of the constraint violations that are the data's fault.
    const CONSTRAINT_CHECK: i32 = 275;
    const CONSTRAINT_NOTNULL: i32 = 1299;
    let extended = match e {
        rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
        _ => 0,
    };
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            StoreError::transient(context.to_owned(), e.to_string())
        }
        Some(ErrorCode::ConstraintViolation)
            if extended == CONSTRAINT_CHECK || extended == CONSTRAINT_NOTNULL =>
        {
            StoreError::rejected(context.to_owned(), e.to_string())
        }
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict(format!("{context}: {e}")),
        Some(ErrorCode::TooBig | ErrorCode::TypeMismatch) => {
            StoreError::rejected(context.to_owned(), e.to_string())
        }
        _ => StoreError::permanent(context.to_owned(), e.to_string()),
    }
}

fn open_connection(
    path: &Path,
    flags: OpenFlags,
    opts: &SqliteOptions,
) -> Result<Connection, StoreError> {
    let ctx = format!("opening SQLite database {}", path.display());
    let conn = Connection::open_with_flags(path, flags).map_err(|e| map_err(&ctx, &e))?;
    conn.busy_timeout(opts.busy_timeout)
        .map_err(|e| map_err(&ctx, &e))?;
    conn.set_prepared_statement_cache_capacity(64);
    // Query planner stability: without it SQLite re-plans a cached statement whenever a
    // bound value might change the plan — here at every lease, because the lease compares
    // `state` with the predicate of the partial lease index — which showed as
    // `sqlite3Reprepare` (a parse and a plan per call) in the writer's profile. Our
    // statements are written for their index, so the first plan is the one we want.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(|e| map_err(&ctx, &e))?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer thread. Call
    /// [`SqliteStore::migrate`] before use (or use [`crate::open`], which does).
    pub async fn open(
        path: &Path,
        opts: SqliteOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let (writer_conn, readers) = tokio::task::spawn_blocking({
            let path = path.clone();
            let opts = opts.clone();
            move || -> Result<_, StoreError> {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::permanent(format!("creating directory {}", dir.display()), e)
                    })?;
                }
                let w = open_connection(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE
                        | OpenFlags::SQLITE_OPEN_CREATE
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    &opts,
                )?;
                // WAL: readers and the writer do not block each other. FULL: the WAL is
                // fsynced at every commit, so an acknowledged write survives power loss.
                // temp_store=MEMORY keeps savepoint sub-journals off disk; a larger page
                // cache keeps the hot index pages of a busy queue in memory.
                w.pragma_update(None, "journal_mode", "WAL")
                    .and_then(|_| w.pragma_update(None, "synchronous", "FULL"))
                    .and_then(|_| w.pragma_update(None, "foreign_keys", "ON"))
                    .and_then(|_| w.pragma_update(None, "temp_store", "MEMORY"))
                    .and_then(|_| w.pragma_update(None, "cache_size", -16_384))
                    .map_err(|e| map_err("configuring the write connection", &e))?;
                let mut readers = Vec::with_capacity(opts.read_connections.max(1));
                for _ in 0..opts.read_connections.max(1) {
                    let r = open_connection(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                        &opts,
                    )?;
                    r.pragma_update(None, "query_only", "ON")
                        .map_err(|e| map_err("configuring a read connection", &e))?;
                    readers.push(r);
                }
                Ok((w, readers))
            }
        })
        .await
        .map_err(|e| StoreError::permanent("opening SQLite database", e))??;
        let (writer, handle) = Writer::spawn(writer_conn, opts.write_queue, opts.max_batch)
            .map_err(|e| StoreError::permanent("starting the SQLite writer thread", e))?;
        Ok(Self {
            path,
            clock,
            writer,
            writer_thread: Mutex::new(Some(handle)),
            readers: Arc::new(ReadPool::new(readers)),
        })
    }

    /// Applies pending migrations. Safe when several processes open the same file at once:
    /// `BEGIN IMMEDIATE` makes them take turns, and each re-reads what is applied.
    pub async fn migrate(&self) -> Result<MigrationReport, StoreError> {
        self.writer
            .write("applying SQLite migrations", |conn| {
                conn.execute_batch(
                    "CREATE TABLE IF NOT EXISTS keel_schema_migrations (
                        version INTEGER PRIMARY KEY,
                        name TEXT NOT NULL,
                        checksum TEXT NOT NULL,
                        applied_at INTEGER NOT NULL)",
                )
                .map_err(|e| map_err("creating keel_schema_migrations", &e))?;
                let applied = {
                    let mut stmt = conn
                        .prepare("SELECT version, checksum FROM keel_schema_migrations")
                        .map_err(|e| map_err("reading applied migrations", &e))?;
                    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| map_err("reading applied migrations", &e))?
                };
                let todo = migrate::pending(migrate::SQLITE, &applied)
                    .map_err(|e| StoreError::permanent("planning SQLite migrations", e))?;
                let mut report = MigrationReport {
                    applied: Vec::new(),
                    current: applied.iter().map(|(v, _)| *v).max().unwrap_or(0),
                };
                for m in todo {
                    let ctx = format!("applying migration {} ({})", m.version, m.name);
                    conn.execute_batch(m.sql).map_err(|e| map_err(&ctx, &e))?;
                    conn.execute(
                        "INSERT INTO keel_schema_migrations (version, name, checksum, applied_at)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![
                            m.version,
                            m.name,
                            m.checksum(),
                            chrono::Utc::now().timestamp_micros()
                        ],
                    )
                    .map_err(|e| map_err(&ctx, &e))?;
                    report.applied.push(m.version);
                    report.current = m.version;
                }
                Ok(report)
            })
            .await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA <name>` as it is in force on every connection this store uses: the writer's
    /// first (`"writer"`), then each reader's (`"reader"`). The writer's answer is read
    /// inside a batch transaction on the writer thread, so it is the setting its commits
    /// run under. For the tests that guard G1: durability is a per-connection setting, and
    /// a downgrade on any writing connection would go unnoticed by a SIGKILL test (the OS
    /// page cache survives the kill).
    #[cfg(any(test, feature = "testkit"))]
    pub async fn pragma_on_every_connection(
        &self,
        name: &'static str,
    ) -> Result<Vec<(&'static str, String)>, StoreError> {
        fn query(conn: &Connection, name: &str) -> Result<String, StoreError> {
            use rusqlite::types::Value;
            conn.pragma_query_value(None, name, |row| row.get::<_, Value>(0))
                .map(|v| match v {
                    Value::Integer(i) => i.to_string(),
                    Value::Text(t) => t,
                    other => format!("{other:?}"),
                })
                .map_err(|e| map_err("reading a pragma", &e))
        }
        let mut out = vec![(
            "writer",
            self.writer
                .write("reading a pragma on the writer", move |conn| {
                    query(conn, name)
                })
                .await?,
        )];
        // Every permit at once: each idle connection is then ours, and each is asked.
        let all = u32::try_from(self.readers.size).unwrap_or(u32::MAX);
        let _permits =
            self.readers.permits.acquire_many(all).await.map_err(|_| {
                StoreError::permanent("reading a pragma", "the SQLite store is closed")
            })?;
        let readers = Arc::clone(&self.readers);
        let answers = tokio::task::spawn_blocking(move || {
            let idle = readers.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter()
                .map(|conn| query(conn, name))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| StoreError::permanent("reading a pragma", e))??;
        out.extend(answers.into_iter().map(|v| ("reader", v)));
        Ok(out)
    }

    async fn read<T, F>(&self, context: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.readers.run(context, f).await
    }
}

/// A fixed set of read-only connections. A semaphore bounds how many reads run at once; the
/// connection itself moves into the blocking thread for the duration of the read.
struct ReadPool {
    permits: Semaphore,
    idle: Mutex<Vec<Connection>>,
    size: usize,
}

impl ReadPool {
    fn new(conns: Vec<Connection>) -> Self {
        Self {
            permits: Semaphore::new(conns.len()),
            size: conns.len(),
            idle: Mutex::new(conns),
        }
    }

    async fn run<T, F>(self: &Arc<Self>, context: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::permanent(context, "the SQLite store is closed"))?;
        let pool = Arc::clone(self);
        let out = tokio::task::spawn_blocking(move || {
            let conn = pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .ok_or_else(|| StoreError::permanent(context, "no idle read connection"))?;
            let out = f(&conn);
            pool.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            out
        })
        .await
        .map_err(|e| StoreError::permanent(context, e))?;
        drop(permit);
        out
    }

    fn close(&self) {
        self.permits.close();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// `state IN ('a', 'b')` for the states `t` may start from (see keel-core's
/// `Transition::sources`): the SQL guard can never disagree with the state machine.
fn state_guard(t: Transition) -> String {
    let list: Vec<String> = t
        .sources()
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("state IN ({})", list.join(", "))
}

/// After a guarded transition matched nothing: the job is missing, or in a state the
/// transition may not start from.
fn refused(conn: &Connection, id: JobId, t: Transition) -> StoreError {
    let state: Result<Option<String>, _> = conn
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1")
        .and_then(|mut s| s.query_row([id.as_bytes()], |r| r.get(0)).optional());
    match state {
        Ok(None) => StoreError::NotFound(id),
        Ok(Some(s)) => match s.parse::<JobState>() {
            Ok(from) => match from.apply(t) {
                Err(source) => StoreError::IllegalTransition { id, source },
                // Legal now: it changed between the update and this read; report a conflict
                // so the caller can retry.
                Ok(_) => StoreError::Conflict(format!("job {id} changed concurrently; retry")),
            },
            Err(e) => StoreError::permanent("decoding stored state", e),
        },
        Err(e) => map_err("reading job state", &e),
    }
}

/// The job holding a tenant's unique key: the predicate is `jobs_unique_idx`'s own, so the
/// lookup is a probe of that index and agrees exactly with what it enforces.
static UNIQUE_HOLDER_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM jobs WHERE tenant = ?1 AND unique_key = ?2
           AND (unique_scope = 'period'
                OR state IN ('scheduled', 'available', 'retryable', 'running'))"
    )
});

/// Whether `e` is a violation of `jobs_unique_idx`: the statement would have made a second
/// job of the tenant hold a unique key.
fn is_unique_key_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_extended_error_code() == Some(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
        && e.to_string().contains("jobs.unique_key")
}

/// Validates every job of an insert before anything is written; the first invalid one names
/// its position.
fn validate_all(jobs: &[NewJob]) -> Result<(), StoreError> {
    for (index, job) in jobs.iter().enumerate() {
        job.validate(NewJob::DEFAULT_MAX_ARGS_BYTES)
            .map_err(|errors| StoreError::Invalid { index, errors })?;
    }
    Ok(())
}

/// Writes new jobs as of `now`, inside the caller's transaction; returns them as stored, in
/// input order. A unique job whose key another job of its tenant holds is not written: the
/// holder takes its place. Looking the holder up first is race-free here because the writer
/// thread is the database's only writer and this runs inside its transaction; the lookup
/// also sees jobs written earlier in the same call or the same group-committed batch.
fn insert_rows(
    conn: &Connection,
    jobs: Vec<NewJob>,
    now: Timestamp,
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = conn
        .prepare_cached(rows::INSERT)
        .map_err(|e| map_err("inserting jobs", &e))?;
    let mut out = Vec::with_capacity(jobs.len());
    for new in jobs {
        let job = new.into_job(now);
        if let Some(u) = &job.unique
            && let Some(holder) = query_jobs(
                conn,
                "looking up a unique key's holder",
                &UNIQUE_HOLDER_SQL,
                params![job.tenant.as_str(), u.key],
            )?
            .pop()
        {
            out.push(holder);
            continue;
        }
        rows::insert_job(&mut stmt, &job).map_err(|e| match map_err("inserting jobs", &e) {
            // Cannot happen after the lookup above unless another process wrote the file
            // meanwhile; said plainly all the same.
            StoreError::Conflict(_) if is_unique_key_violation(&e) => {
                StoreError::Conflict(format!(
                    "another job of tenant {} holds unique key {:?}",
                    job.tenant,
                    job.unique.as_ref().map_or("", |u| u.key.as_str())
                ))
            }
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("a job with id {} already exists", job.id))
            }
            other => other,
        })?;
        out.push(job);
    }
    Ok(out)
}

fn query_jobs(
    conn: &Connection,
    context: &str,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(|e| map_err(context, &e))?;
    let mut rows = stmt.query(params).map_err(|e| map_err(context, &e))?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next().map_err(|e| map_err(context, &e))? {
        jobs.push(job_from_row(row)?);
    }
    Ok(jobs)
}

#[async_trait]
impl Store for SqliteStore {
    fn pool_stats(&self) -> PoolStats {
        let readers = self.readers.size;
        let idle = self.readers.permits.available_permits();
        PoolStats {
            // The read connections plus the one write connection.
            max: readers + 1,
            idle,
            in_use: readers.saturating_sub(idle) + 1,
            waiting: self.writer.queued(),
            closed_unanswered: 0,
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read("pinging SQLite", |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(|e| map_err("pinging SQLite", &e))
        })
        .await
    }

    async fn close(&self) {
        self.writer.close().await;
        self.readers.close();
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Without an explicit close the writer thread still stops: dropping the last sender
        // ends its loop after the queued writes commit.
        self.readers.close();
    }
}

/// Folds `(queue, state, count)` rows into one [`QueueStats`] per queue, sorted by name,
/// with each queue's paused flag; `every_queue` adds the queues that have no jobs but were
/// paused or resumed (a tenant's view leaves them out: it learns nothing of other queues).
fn stats_with_flags(
    conn: &rusqlite::Connection,
    rows: Vec<(String, String, i64)>,
    every_queue: bool,
) -> Result<Vec<QueueStats>, StoreError> {
    let paused: Vec<(String, bool)> = conn
        .prepare_cached("SELECT name, paused FROM queues")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| map_err("reading queue settings", &e))?;
    let mut by_queue: BTreeMap<String, (bool, StateCounts)> = BTreeMap::new();
    for (queue, state, n) in rows {
        let state: JobState = state
            .parse()
            .map_err(|e| StoreError::permanent("decoding stored state", e))?;
        by_queue.entry(queue).or_default().1.add(state, n as u64);
    }
    for (queue, p) in paused {
        // A tenant sees the flag of the queues its jobs are in, no others.
        match by_queue.get_mut(&queue) {
            Some(entry) => entry.0 = p,
            None if every_queue => {
                by_queue.entry(queue).or_default().0 = p;
            }
            None => {}
        }
    }
    by_queue
        .into_iter()
        .map(|(q, (paused, counts))| {
            Ok(QueueStats {
                queue: QueueName::parse(q)
                    .map_err(|e| StoreError::permanent("decoding stored queue", e))?,
                paused,
                counts,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use keel_core::JobStore;
    use keel_core::store::ListParams;

    use super::*;

    #[test]
    fn guards_follow_the_state_machine() {
        assert_eq!(
            state_guard(Transition::Cancel),
            "state IN ('scheduled', 'available', 'running', 'retryable')"
        );
        assert_eq!(
            state_guard(Transition::Promote),
            "state IN ('scheduled', 'retryable')"
        );
    }

    /// The bundled SQLite is built as `.cargo/config.toml` asks (LIBSQLITE3_FLAGS): without
    /// the shared page cache and the allocation counters, whose process-wide locks took
    /// about a fifth of the writer's time. A build that loses the setting fails here.
    #[test]
    fn sqlite_is_built_without_process_wide_locks_on_the_hot_path() {
        let conn = Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
    }

    /// Data SQLite refuses is the request's fault (`rejected`, a 422 that no breaker
    /// counts), as Postgres's classes 22, 23 and 54 are; a duplicate key stays a conflict
    /// and a broken statement a permanent failure. Real errors from a real connection.
    #[test]
    fn data_sqlite_refuses_is_rejected_not_a_failure() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, \
             n INTEGER NOT NULL CHECK (n >= 0), u TEXT UNIQUE)",
        )
        .unwrap();
        let class = |sql: &str| {
            let e = conn.execute(sql, []).expect_err(sql);
            map_err("storing a hostile value", &e).class()
        };
        assert_eq!(class("INSERT INTO t (n) VALUES (-1)"), "rejected", "CHECK");
        assert_eq!(
            class("INSERT INTO t (n) VALUES (NULL)"),
            "rejected",
            "NOT NULL"
        );
        assert_eq!(
            class("INSERT INTO t (id, n) VALUES ('not a rowid', 1)"),
            "rejected",
            "MISMATCH"
        );
        conn.execute("INSERT INTO t (n, u) VALUES (1, 'a')", [])
            .unwrap();
        assert_eq!(class("INSERT INTO t (n, u) VALUES (2, 'a')"), "conflict");
        assert_eq!(class("INSERT INTO missing VALUES (1)"), "permanent");
    }

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("keel.db"),
            SqliteOptions::default(),
            Arc::new(keel_core::SystemClock),
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    /// SQLite's plan for `sql` with `args` bound, one line per step (the `detail` column of
    /// EXPLAIN QUERY PLAN).
    async fn query_plan(store: &SqliteStore, sql: &str, args: &[&'static str]) -> String {
        let sql = format!("EXPLAIN QUERY PLAN {sql}");
        let args = args.to_vec();
        store
            .read("explaining a statement", move |conn| {
                let mut stmt = conn.prepare(&sql).map_err(|e| map_err("explaining", &e))?;
                stmt.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map(|rows| rows.join("\n"))
                    .map_err(|e| map_err("explaining", &e))
            })
            .await
            .unwrap()
    }

    /// A unique insert probes `jobs_unique_idx`. SQLite uses a partial index only when the
    /// query's WHERE implies the index's, so a lookup whose predicate drifted from the
    /// migration's would scan `jobs` per unique insert: invisible in functional tests, fatal
    /// on a large table.
    #[tokio::test]
    async fn unique_holder_lookup_probes_the_unique_index() {
        let (store, _dir) = store().await;
        let plan = query_plan(&store, &UNIQUE_HOLDER_SQL, &["tenant", "key"]).await;
        assert!(
            plan.contains("USING INDEX jobs_unique_idx (tenant=? AND unique_key=?)"),
            "{plan}"
        );
        store.close().await;
    }

    /// The depth gauges' count reads each unfinished state through its partial index and
    /// never scans the table: finished jobs pile up for the whole retention period.
    #[tokio::test]
    async fn depth_counts_read_only_the_unfinished_jobs_indexes() {
        let (store, _dir) = store().await;
        let plan = query_plan(&store, crate::DEPTH_COUNTS, &[]).await;
        for index in ["jobs_lease_idx", "jobs_due_idx", "jobs_expired_lease_idx"] {
            assert!(plan.contains(&format!("INDEX {index}")), "{plan}");
        }
        assert!(
            !plan.contains("SCAN jobs\n") && !plan.ends_with("SCAN jobs"),
            "{plan}"
        );
        for index in [
            "jobs_queue_state_idx",
            "jobs_tenant_state_idx",
            "jobs_finished_idx",
        ] {
            assert!(!plan.contains(index), "{plan}");
        }
        store.close().await;
    }

    /// Callers inserting one unique key at once land in the same group-committed batch, each
    /// in its own savepoint: the first creates the job, every other one gets it back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_unique_inserts_in_one_batch_create_one_job() {
        let (store, _dir) = store().await;
        let store = Arc::new(store);
        let kind = keel_core::JobKind::parse("noop").unwrap();
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let store = Arc::clone(&store);
                let job = NewJob::new(kind.clone()).unique("one", keel_core::UniqueScope::Active);
                tokio::spawn(async move { store.insert(vec![job]).await.unwrap().remove(0) })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for c in callers {
            ids.insert(c.await.unwrap().id);
        }
        assert_eq!(ids.len(), 1, "every caller gets the one job");
        let page = store
            .list(ListParams {
                limit: 1000,
                ..ListParams::default()
            })
            .await
            .unwrap();
        assert_eq!(page.jobs.len(), 1, "one row in the table");
        store.close().await;
    }
}
