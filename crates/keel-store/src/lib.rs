//! Keel's durable job stores.
//!
//! Two implementations of [`keel_core::Store`]:
//! - [`sqlite::SqliteStore`], the embedded default: one file, zero setup. One writer thread
//!   group-commits every write waiting in its bounded queue into one transaction; a small
//!   pool of read connections serves reads concurrently (WAL).
//! - [`postgres::PgStore`], for several replicas sharing one database: leases with
//!   `FOR UPDATE SKIP LOCKED`, batched statements with arrays/`unnest`, a bounded pool.
//!
//! Both apply their embedded, versioned [`migrate`]ions and must pass the same conformance
//! suite (feature `testkit`, module `testkit`), River's `riverdrivertest` being the model.

#![warn(missing_docs)]

pub mod migrate;
pub mod postgres;
pub mod sqlite;
#[cfg(feature = "testkit")]
pub mod testkit;

mod codec;
mod write_queue;

use std::path::PathBuf;
use std::sync::Arc;

use keel_core::{Clock, Store, StoreError};

pub use migrate::MigrationReport;
pub use postgres::{PgOptions, PgStore, Pooler};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Where the jobs live, parsed from `KEEL_DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://path/to/file.db` (relative to the working directory) or
    /// `sqlite:///absolute/path.db`.
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`, passed to the driver as is (libpq URL syntax,
    /// including `?options=-csearch_path%3Dschema`).
    Postgres(String),
}

impl DatabaseUrl {
    /// Parses a database URL, naming the accepted forms when it is not one of them.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err("sqlite URL has no file path (try sqlite://keel.db)".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| format!("invalid postgres URL: {e}"))?;
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err("database URL must start with sqlite:// or postgres:// (e.g. sqlite://keel.db)".into())
    }
}

/// `url` (a `postgres://` URL) naming `database` instead of its own, keeping everything
/// else: user, password, host, port, query. Tests, the test PgBouncer and `keel bench` reach
/// databases of their own this way.
pub fn postgres_url_with_database(url: &str, database: &str) -> String {
    let (head, query) = url
        .split_once('?')
        .map_or((url, None), |(h, q)| (h, Some(q)));
    let authority = head.find("://").map_or(0, |i| i + 3);
    let server = head[authority..]
        .find('/')
        .map_or(head, |slash| &head[..authority + slash]);
    match query {
        Some(q) => format!("{server}/{database}?{q}"),
        None => format!("{server}/{database}"),
    }
}

/// `url` (a `postgres://` URL) with its connections confined to `schema`: a `search_path`
/// startup option appended to its query. Tests and `keel bench` give each run a schema of
/// its own this way (docs/scaling.md: not through a transaction pooler, which refuses
/// startup options).
pub fn postgres_url_with_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

/// The conflict both backends report when an idempotency key comes back with a different
/// request: one wording, so API clients see the same 409 whichever store is behind it. The
/// key is quoted as text (`"k-1"`), escaped, since it is client input.
pub(crate) fn key_reused(key: &keel_core::IdempotencyKey) -> StoreError {
    StoreError::Conflict(format!(
        "idempotency key {:?} was already used with a different request",
        key.as_str()
    ))
}

/// The conflict both backends report when a manual retry would put a job back among the
/// holders of its unique key while another job of its tenant holds that key (an `active` or
/// `queued` job that finished, then a new job took the key). One wording for both stores.
pub(crate) fn unique_key_held(id: keel_core::JobId) -> StoreError {
    StoreError::Conflict(format!(
        "job {id} cannot be retried now: another job of its tenant holds its unique key"
    ))
}

/// The conflict both backends report when a schedule is created (not replaced) under a name
/// its tenant already uses.
pub(crate) fn schedule_exists(
    tenant: &keel_core::TenantId,
    name: &keel_core::ScheduleName,
) -> StoreError {
    StoreError::Conflict(format!(
        "schedule {name} already exists in tenant {tenant} (replace it instead)"
    ))
}

/// Completes `completions` through `write`, except those whose result breaks the rules of
/// stored JSON ([`keel_core::json_text`]): those are answered [`StoreError::Rejected`] here,
/// on both backends alike, and never reach the database (Postgres would refuse some of
/// them itself, SQLite none). Answers come back in the order of `completions`.
pub(crate) async fn complete_checked<F, Fut>(
    completions: Vec<keel_core::store::Completion>,
    write: F,
) -> Result<Vec<Result<(), StoreError>>, StoreError>
where
    F: FnOnce(Vec<keel_core::store::Completion>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Result<(), StoreError>>, StoreError>>,
{
    let total = completions.len();
    let mut refused: Vec<Option<StoreError>> = Vec::with_capacity(total);
    let mut accepted = Vec::with_capacity(total);
    for c in completions {
        match c
            .result
            .as_deref()
            .map(|r| keel_core::json_text::check(r.get()))
        {
            Some(Err(e)) => refused.push(Some(StoreError::rejected(
                format!("completing job {} with its result", c.lease.id),
                e,
            ))),
            _ => {
                refused.push(None);
                accepted.push(c);
            }
        }
    }
    if accepted.len() == total {
        return write(accepted).await;
    }
    let mut written = if accepted.is_empty() {
        Vec::new().into_iter()
    } else {
        write(accepted).await?.into_iter()
    };
    Ok(refused
        .into_iter()
        .map(|r| match r {
            Some(e) => Err(e),
            None => written.next().unwrap_or_else(|| {
                Err(StoreError::permanent(
                    "completing jobs",
                    "the backend answered fewer completions than it was given",
                ))
            }),
        })
        .collect())
}

/// The `leaders` row the maintenance leader holds (the only role so far).
pub(crate) const MAINTENANCE_ROLE: &str = "maintenance";

/// The unfinished jobs per queue and state, as `(queue, state, count)` rows
/// ([`keel_core::QueueStore::queue_depths`]), on both backends. Each part's state term is the
/// predicate of one partial index (lease, due, running), so the count reads only those
/// indexes and never the finished jobs.
pub(crate) const DEPTH_COUNTS: &str = "\
    SELECT queue, state, count(*) AS n FROM jobs WHERE state = 'available' \
    GROUP BY queue, state \
    UNION ALL \
    SELECT queue, state, count(*) FROM jobs WHERE state IN ('scheduled', 'retryable') \
    GROUP BY queue, state \
    UNION ALL \
    SELECT queue, state, count(*) FROM jobs WHERE state = 'running' \
    GROUP BY queue, state";

/// Opens the store named by `url`, applies pending migrations, and returns it ready to use.
pub async fn open(
    url: &DatabaseUrl,
    sqlite: SqliteOptions,
    pg: PgOptions,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<dyn Store>, MigrationReport), StoreError> {
    match url {
        DatabaseUrl::Sqlite(path) => {
            let store = SqliteStore::open(path, sqlite, clock).await?;
            let report = store.migrate().await?;
            Ok((Arc::new(store), report))
        }
        DatabaseUrl::Postgres(url) => {
            let store = PgStore::connect(url, pg, clock).await?;
            let report = store.migrate().await?;
            Ok((Arc::new(store), report))
        }
    }
}

/// How a backend's listing indexes (`jobs_queue_state_idx`, `jobs_tenant_state_idx`) are
/// shaped, as its listing filter needs to know.
pub(crate) struct ListingIndexes {
    /// The states the indexes leave out (their predicate is "every state but these"):
    /// running jobs on both backends (the `*_lean_listing_indexes` migrations), completed
    /// ones too on Postgres (`0010_listing_skips_completed`).
    pub(crate) left_out: &'static [keel_core::JobState],
    /// Whether a query must carry the predicate's own term for the planner to use them.
    /// SQLite's planner looks for the term; Postgres proves the predicate from the state
    /// literal, and an extra term would only skew its row estimate (it multiplies the
    /// selectivities of the two terms as if they were independent).
    pub(crate) spell_predicate: bool,
}

impl ListingIndexes {
    /// The indexes' predicate, written as the migrations write it: `state <> 'x'` for one
    /// left-out state, `state NOT IN ('x', 'y')` for more.
    pub(crate) fn predicate(&self, prefix: &str) -> String {
        match self.left_out {
            [one] => format!("{prefix}state <> '{}'", one.as_str()),
            many => {
                let names: Vec<String> = many.iter().map(|s| format!("'{}'", s.as_str())).collect();
                format!("{prefix}state NOT IN ({})", names.join(", "))
            }
        }
    }
}

/// A listing's state filter, as SQL text for either backend: the state as a literal (a
/// closed set of names, so nothing from outside reaches the text), so the planner knows
/// whether a partial listing index holds it, plus the indexes' predicate where the backend
/// needs it spelled out. A state the indexes leave out gets no such term: running jobs come
/// from the running index, completed ones (Postgres) from the primary key, where they are
/// most of a kept table, so a walk in id order meets them densely.
pub(crate) fn listing_state_filter(
    prefix: &str,
    state: keel_core::JobState,
    indexes: &ListingIndexes,
) -> String {
    if indexes.spell_predicate && !indexes.left_out.contains(&state) {
        format!(
            "{prefix}state = '{}' AND {}",
            state.as_str(),
            indexes.predicate(prefix)
        )
    } else {
        format!("{prefix}state = '{}'", state.as_str())
    }
}

/// A value a listing filter compares a column with; each backend binds it as its own type.
pub(crate) enum ListingValue<'a> {
    /// A name (queue, tenant, kind).
    Text(&'a str),
    /// The cursor: the page starts after this id.
    Id(keel_core::JobId),
}

/// The conditions of a `list` statement joined with `AND`, or `None` when nothing filters,
/// so both backends filter alike. Columns are prefixed with `prefix` (a table alias or
/// nothing). The queue, tenant, kind and cursor are parameters, numbered in that order:
/// `bind` binds each value and returns its placeholder. The state goes in as a literal
/// ([`listing_state_filter`] says why).
pub(crate) fn listing_conditions(
    p: &keel_core::store::ListParams,
    prefix: &str,
    indexes: &ListingIndexes,
    mut bind: impl FnMut(ListingValue<'_>) -> String,
) -> Option<String> {
    let mut clauses = Vec::new();
    let mut term = |column: &str, op: &str, value| {
        clauses.push(format!("{prefix}{column} {op} {}", bind(value)));
    };
    if let Some(q) = &p.queue {
        term("queue", "=", ListingValue::Text(q.as_str()));
    }
    if let Some(t) = &p.tenant {
        term("tenant", "=", ListingValue::Text(t.as_str()));
    }
    if let Some(k) = &p.kind {
        term("kind", "=", ListingValue::Text(k.as_str()));
    }
    if let Some(after) = p.after {
        term("id", ">", ListingValue::Id(after));
    }
    if let Some(s) = p.state {
        clauses.push(listing_state_filter(prefix, s, indexes));
    }
    (!clauses.is_empty()).then(|| clauses.join(" AND "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_name_every_unfinished_state_once_and_no_finished_one() {
        for state in keel_core::JobState::ALL {
            let quoted = format!("'{}'", state.as_str());
            assert_eq!(
                DEPTH_COUNTS.matches(&quoted).count(),
                usize::from(keel_core::JobState::UNFINISHED.contains(&state)),
                "{state:?}"
            );
        }
    }

    #[test]
    fn parses_both_backends_and_explains_the_rest() {
        assert_eq!(
            DatabaseUrl::parse("sqlite://keel.db").unwrap(),
            DatabaseUrl::Sqlite("keel.db".into())
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite:///var/lib/keel.db").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/keel.db".into())
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://root@127.0.0.1:5432/test").unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        assert!(
            DatabaseUrl::parse("mysql://x")
                .unwrap_err()
                .contains("sqlite://")
        );
        assert!(
            DatabaseUrl::parse("sqlite://")
                .unwrap_err()
                .contains("no file path")
        );
    }

    #[test]
    fn a_postgres_url_is_confined_to_a_schema() {
        assert_eq!(
            postgres_url_with_schema("postgres://u@h/db", "s1"),
            "postgres://u@h/db?options=-csearch_path%3Ds1"
        );
        assert_eq!(
            postgres_url_with_schema("postgres://u@h/db?sslmode=disable", "s1"),
            "postgres://u@h/db?sslmode=disable&options=-csearch_path%3Ds1"
        );
    }

    #[test]
    fn a_postgres_url_names_another_database_and_keeps_the_rest() {
        assert_eq!(
            postgres_url_with_database("postgres://u:p@h:5433/old?sslmode=disable", "new"),
            "postgres://u:p@h:5433/new?sslmode=disable"
        );
        assert_eq!(
            postgres_url_with_database("postgres://u@h/old", "new"),
            "postgres://u@h/new"
        );
        assert_eq!(
            postgres_url_with_database("postgresql://h", "new"),
            "postgresql://h/new"
        );
        assert_eq!(
            postgres_url_with_database("postgres://h?a=1", "new"),
            "postgres://h/new?a=1"
        );
    }
}
