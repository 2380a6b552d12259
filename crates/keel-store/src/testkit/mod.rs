//! Test plumbing and the conformance suite every store must pass.
//!
//! - [`Harness`]: a fresh, migrated store with a [`ManualClock`], on a temporary SQLite file
//!   or in a Postgres schema of its own that is dropped afterwards.
//! - Postgres tests read `KEEL_TEST_DATABASE_URL`. When it is unset they skip with a notice
//!   written straight to stderr (past the test harness's output capture, so it is seen);
//!   when `KEEL_REQUIRE_SERVICES=1` (CI) a missing or unreachable database fails instead.
//! - [`pgbouncer`]: a real PgBouncer in transaction mode in front of the test server, and
//!   a database per test reached through it ([`Harness::pgbouncer`]).
//! - [`conformance`]: the cases, and [`conformance_suite!`](crate::conformance_suite) to
//!   stamp them out as `#[tokio::test]`s for a backend.

// Test support: a failed expectation here must panic and fail the test, so unwrap is the
// point rather than a shortcut.
#![allow(clippy::unwrap_used)]

pub mod conformance;
pub mod intercept;
pub mod pgbouncer;

pub use intercept::{Intercept, Intercepted, Interceptor, Op, intercept};
pub use pgbouncer::{PgBouncer, PgDatabase};

use std::io::Write as _;
use std::sync::Arc;

use keel_core::{Clock, ManualClock, Store};

use crate::{PgOptions, PgStore, SqliteOptions, SqliteStore};

/// Env var naming the Postgres server tests use (e.g.
/// `postgres://postgres@127.0.0.1:5432/postgres`).
pub const TEST_DATABASE_URL: &str = "KEEL_TEST_DATABASE_URL";
/// Env var that turns "skip when the service is absent" into "fail" (set in CI).
pub const REQUIRE_SERVICES: &str = "KEEL_REQUIRE_SERVICES";

/// Whether missing services must fail tests rather than skip them.
pub fn services_required() -> bool {
    std::env::var(REQUIRE_SERVICES).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The Postgres URL for tests, or `None` after printing a loud skip notice for `test`.
///
/// # Panics
/// When the URL is unset and [`services_required`].
pub fn pg_url_or_skip(test: &str) -> Option<String> {
    match std::env::var(TEST_DATABASE_URL) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                !services_required(),
                "{REQUIRE_SERVICES}=1 but {TEST_DATABASE_URL} is not set: cannot run {test}"
            );
            // Written to the real stderr, not through eprintln!, so `cargo test` shows it even
            // though the test passes.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {TEST_DATABASE_URL} is not set (Postgres tests need it; see README)"
            );
            None
        }
    }
}

/// A Postgres schema of its own for one test, dropped (with everything in it) on drop.
/// Connections made through [`PgSchema::url`] see only this schema (`search_path`).
#[derive(Debug)]
pub struct PgSchema {
    /// The schema's name (`keel_test_<random>`).
    pub name: String,
    /// The server URL with `options=-csearch_path=<name>` appended.
    pub url: String,
    base_url: String,
}

impl PgSchema {
    /// Creates a uniquely named schema on the server at `base_url`.
    pub async fn create(base_url: &str) -> Self {
        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        run_once(base_url, &format!("CREATE SCHEMA {name}")).await;
        let url = crate::postgres_url_with_schema(base_url, &name);
        Self {
            name,
            url,
            base_url: base_url.to_owned(),
        }
    }
}

impl Drop for PgSchema {
    /// The test is over, so sessions still holding locks on the schema's tables are ended
    /// first. A test that panics while one of its connections is inside a transaction
    /// (holding a row lock, say) leaves that transaction open: the connection's task is
    /// never polled again, and the drop would otherwise wait for its locks forever,
    /// turning the test's failure into a hang.
    fn drop(&mut self) {
        let name = &self.name;
        run_on_drop(
            &self.base_url,
            format!(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                 JOIN pg_class c ON c.oid = l.relation \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = '{name}' AND l.pid <> pg_backend_pid(); \
                 DROP SCHEMA IF EXISTS {name} CASCADE"
            ),
        );
    }
}

/// Runs `sql` on a connection of its own to the test server at `url`; panics (failing the
/// test) when it cannot.
async fn run_once(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {TEST_DATABASE_URL}: {e}"));
    let conn = tokio::spawn(conn);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = conn.await;
}

/// Runs `sql` on the server at `url`, for a `Drop` impl's cleanup. Drop runs inside (or
/// outside) a runtime that may be shutting down, so the cleanup gets a thread and a runtime
/// of its own; a failure is ignored (the test is over).
fn run_on_drop(url: &str, sql: String) {
    let url = url.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build cleanup runtime");
        rt.block_on(async move {
            if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                let _ = client.batch_execute(&sql).await;
            }
        });
    })
    .join();
}

/// What keeps a harness's database alive until the harness is dropped (both are removed by
/// their `Drop`).
#[derive(Debug)]
enum Backing {
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        _schema: PgSchema,
    },
    /// Field order matters: the bouncer goes first, then the database it served.
    PgBouncer {
        _bouncer: PgBouncer,
        _database: PgDatabase,
    },
}

/// A fresh, migrated store for one test, with a clock the test controls.
pub struct Harness {
    /// The store under test.
    pub store: Arc<dyn Store>,
    /// Its clock; advance it instead of sleeping.
    pub clock: ManualClock,
    /// Where its database lives: `sqlite://…` or the Postgres URL with the test schema.
    pub url: String,
    backing: Backing,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("url", &self.url)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A store on a new SQLite file in a temporary directory.
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("keel.db");
        let clock = ManualClock::starting_now();
        let store = SqliteStore::open(&path, SqliteOptions::default(), clock_arc(&clock))
            .await
            .expect("open sqlite store");
        store.migrate().await.expect("migrate sqlite store");
        Self {
            store: Arc::new(store),
            clock,
            url: format!("sqlite://{}", path.display()),
            backing: Backing::Sqlite { _dir: dir },
        }
    }

    /// A store in a new schema on the test Postgres server, or `None` (skipped, with a
    /// notice naming `test`) when no server is configured.
    pub async fn postgres(test: &str) -> Option<Self> {
        let base = pg_url_or_skip(test)?;
        let schema = PgSchema::create(&base).await;
        let clock = ManualClock::starting_now();
        let store = PgStore::connect(&schema.url, PgOptions::for_tests(), clock_arc(&clock))
            .await
            .expect("connect postgres store");
        store.migrate().await.expect("migrate postgres store");
        Some(Self {
            store: Arc::new(store),
            clock,
            url: schema.url.clone(),
            backing: Backing::Postgres { _schema: schema },
        })
    }

    /// A store in a new database reached through a PgBouncer in transaction mode (statements
    /// unnamed, `LISTEN` straight to the server), or `None` (skipped, with a notice naming
    /// `test`) when no server or no PgBouncer is available.
    pub async fn pgbouncer(test: &str) -> Option<Self> {
        let bouncer = PgBouncer::start(test, None)?;
        let database = PgDatabase::create(&pg_url_or_skip(test)?).await;
        let url = bouncer.url(&database.name);
        let clock = ManualClock::starting_now();
        let store = PgStore::connect(
            &url,
            PgOptions {
                pooler: crate::Pooler::Transaction,
                listen_url: Some(bouncer.direct_url(&database.name)),
                ..PgOptions::for_tests()
            },
            clock_arc(&clock),
        )
        .await
        .expect("connect postgres store through pgbouncer");
        store.migrate().await.expect("migrate through pgbouncer");
        Some(Self {
            store: Arc::new(store),
            clock,
            url,
            backing: Backing::PgBouncer {
                _bouncer: bouncer,
                _database: database,
            },
        })
    }

    /// Which backend this is, for messages.
    pub fn backend(&self) -> &'static str {
        match self.backing {
            Backing::Sqlite { .. } => "sqlite",
            Backing::Postgres { .. } => "postgres",
            Backing::PgBouncer { .. } => "postgres through pgbouncer",
        }
    }
}

fn clock_arc(clock: &ManualClock) -> Arc<dyn Clock> {
    Arc::new(clock.clone())
}
