//! How statements reach Postgres: named and prepared once per connection when Keel talks
//! to Postgres itself (or through a session-mode pooler), unnamed behind a transaction-mode
//! pooler (PgBouncer's `pool_mode = transaction`), which hands each transaction to whichever
//! server connection is free.
//!
//! A named prepared statement lives on one server connection. Behind a transaction pooler
//! the statement prepared in one round trip is looked for on another server connection in
//! the next (`prepared statement "s16" does not exist`), and a name this client prepared is
//! later found already taken by another client on the same server connection. The unnamed
//! statement is parsed, bound and run in one round trip (tokio-postgres's `query_typed`),
//! so it never outlives the transaction it ran in; it needs its parameter types up front.
//!
//! Those types are learned once per statement text per process, on a connection of their
//! own (see [`Describer`]): inside one transaction the statement is prepared, its types
//! read, and the statement closed before the transaction ends, so nothing is left on the
//! server connection the pooler hands on. Learning runs in a task of its own, so a caller
//! that gives up at its deadline cannot leave that connection mid-transaction.
//!
//! Every statement of the store goes through here ([`Statements`]), so the choice is made
//! in one place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt as _;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient as _, Row};

/// What a statement runs on: a pooled connection, or a transaction on one.
pub(super) trait Conn: deadpool_postgres::GenericClient {
    /// The driver's own client, for unnamed statements.
    type Driver: tokio_postgres::GenericClient + Sync;

    /// Whether this is a transaction, which holds its server connection until it ends.
    const IN_TRANSACTION: bool;

    fn driver(&self) -> &Self::Driver;
}

impl Conn for deadpool_postgres::Object {
    type Driver = tokio_postgres::Client;
    const IN_TRANSACTION: bool = false;

    fn driver(&self) -> &tokio_postgres::Client {
        self
    }
}

impl<'a> Conn for deadpool_postgres::Transaction<'a> {
    type Driver = tokio_postgres::Transaction<'a>;
    const IN_TRANSACTION: bool = true;

    fn driver(&self) -> &tokio_postgres::Transaction<'a> {
        self
    }
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The way this store sends statements; cheap to clone.
#[derive(Clone)]
pub(super) struct Statements {
    /// `None`: named statements, prepared once per connection (deadpool's cache).
    /// `Some`: unnamed statements, with parameter types learned by the describer.
    unnamed: Option<Arc<Describer>>,
}

impl std::fmt::Debug for Statements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.unnamed.is_some() {
            "Statements::Unnamed"
        } else {
            "Statements::Named"
        })
    }
}

impl Statements {
    /// Named statements, prepared once per pooled connection.
    pub(super) fn named() -> Self {
        Self { unnamed: None }
    }

    /// Unnamed statements, their types learned on connections made from `cfg`.
    pub(super) fn unnamed(cfg: tokio_postgres::Config) -> Self {
        Self {
            unnamed: Some(Arc::new(Describer::new(cfg))),
        }
    }

    /// Whether statements are unnamed (a transaction pooler sits in front of Postgres).
    pub(super) fn are_unnamed(&self) -> bool {
        self.unnamed.is_some()
    }

    /// Learns the types of the statements a transaction is about to run, before it holds a
    /// server connection: learning takes one, and a transaction learning while it holds the
    /// pooler's last one would wait for itself. A no-op for named statements.
    pub(super) async fn ready(&self, sqls: &[&str]) -> Result<(), Error> {
        if let Some(describer) = &self.unnamed {
            for sql in sqls {
                describer.types(sql).await?;
            }
        }
        Ok(())
    }

    /// The parameter types of `sql`, when statements are unnamed; `None` when they are
    /// named (the prepared statement knows them).
    ///
    /// Inside a transaction, a statement not made [`ready`](Self::ready) is described on
    /// the transaction's own connection (prepared and closed within it) rather than wait
    /// for the describer, which could need the very server connection the transaction
    /// holds. Should the caller be cancelled mid-describe, that statement stays prepared
    /// on the server connection, so transactions make their statements ready first.
    async fn types<C: Conn>(&self, conn: &C, sql: &str) -> Result<Option<Arc<[Type]>>, Error> {
        let Some(describer) = &self.unnamed else {
            return Ok(None);
        };
        if let Some(types) = describer.known(sql) {
            return Ok(Some(types));
        }
        if C::IN_TRANSACTION {
            let types: Arc<[Type]> = conn.driver().prepare(sql).await?.params().into();
            describer.remember(sql.into(), Arc::clone(&types));
            return Ok(Some(types));
        }
        describer.types(sql).await.map(Some)
    }

    /// Runs `sql` and returns its rows.
    pub(super) async fn query<C: Conn>(
        &self,
        conn: &C,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        match self.types(conn, sql).await? {
            None => {
                let stmt = conn.prepare_cached(sql).await?;
                conn.query(&stmt, params).await
            }
            Some(types) => conn.driver().query_typed(sql, &typed(params, &types)).await,
        }
    }

    /// Runs `sql`, which returns at most one row.
    pub(super) async fn query_opt<C: Conn>(
        &self,
        conn: &C,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, Error> {
        match self.types(conn, sql).await? {
            None => {
                let stmt = conn.prepare_cached(sql).await?;
                conn.query_opt(&stmt, params).await
            }
            Some(types) => {
                conn.driver()
                    .query_typed_opt(sql, &typed(params, &types))
                    .await
            }
        }
    }

    /// Runs `sql`, which returns exactly one row.
    pub(super) async fn query_one<C: Conn>(
        &self,
        conn: &C,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, Error> {
        match self.types(conn, sql).await? {
            None => {
                let stmt = conn.prepare_cached(sql).await?;
                conn.query_one(&stmt, params).await
            }
            Some(types) => {
                conn.driver()
                    .query_typed_one(sql, &typed(params, &types))
                    .await
            }
        }
    }

    /// Runs `sql` and returns how many rows it changed.
    pub(super) async fn execute<C: Conn>(
        &self,
        conn: &C,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, Error> {
        match self.types(conn, sql).await? {
            None => {
                let stmt = conn.prepare_cached(sql).await?;
                conn.execute(&stmt, params).await
            }
            Some(types) => {
                let rows = conn
                    .driver()
                    .query_typed_raw(sql, typed(params, &types))
                    .await?;
                futures_util::pin_mut!(rows);
                while rows.try_next().await?.is_some() {}
                Ok(rows.rows_affected().unwrap_or(0))
            }
        }
    }

    /// Runs `sql` as the unnamed statement even when statements are otherwise named, so
    /// Postgres plans it for these parameters and for the table as it is at this moment.
    /// The named prepared statement only lends its parameter types (cached per connection).
    ///
    /// A named statement settles on a generic plan after five executions and keeps it until
    /// the table's statistics change. On a young table that plan is made for a few hundred
    /// rows: the completion batch hashed a sequential scan of the whole table into every
    /// commit, and a fresh schema under W2 fell minutes behind before autovacuum's first
    /// ANALYZE (a minute away at the default naptime) replaced the plan. A custom plan reads
    /// the table's current size each time. Planning is paid once per batch (about 0.15 ms of
    /// Postgres CPU per statement, measured at one job per batch), so this is for batch
    /// statements (lease, heartbeat, completion, release) and listings, not for per-job ones.
    pub(super) async fn query_replanned<C: Conn>(
        &self,
        conn: &C,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, Error> {
        let types = match self.types(conn, sql).await? {
            Some(types) => types,
            None => conn.prepare_cached(sql).await?.params().into(),
        };
        conn.driver().query_typed(sql, &typed(params, &types)).await
    }
}

fn typed<'a>(params: Params<'a>, types: &[Type]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// Most statement texts whose types are remembered. Statements are fixed texts plus the
/// listing's filter combinations, a few hundred at most; past this the memory is cleared
/// rather than grown (texts are then learned again, once each).
const MAX_REMEMBERED: usize = 4096;

/// Learns statements' parameter types on a connection of its own, outside the pool: a
/// caller holding the pool's last connection must not wait for another to learn with.
pub(super) struct Describer {
    cfg: tokio_postgres::Config,
    known: Mutex<HashMap<Box<str>, Arc<[Type]>>>,
    /// The describing connection, opened on first use and again after it is lost. One
    /// describe at a time: learning is rare, and the lock also merges concurrent first
    /// uses of one statement into one describe.
    conn: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl Describer {
    fn new(cfg: tokio_postgres::Config) -> Self {
        Self {
            cfg,
            known: Mutex::default(),
            conn: tokio::sync::Mutex::default(),
        }
    }

    fn known(&self, sql: &str) -> Option<Arc<[Type]>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sql)
            .cloned()
    }

    async fn types(self: &Arc<Self>, sql: &str) -> Result<Arc<[Type]>, Error> {
        if let Some(types) = self.known(sql) {
            return Ok(types);
        }
        // In a task of its own: a caller cancelled at its deadline must not leave the
        // describing connection inside its transaction.
        let this = Arc::clone(self);
        let text: Box<str> = sql.into();
        match tokio::spawn(async move { this.learn(text).await }).await {
            Ok(learned) => learned,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Nothing aborts the task: it was cancelled because the runtime is shutting
            // down, which drops this caller too.
            Err(_) => std::future::pending().await,
        }
    }

    async fn learn(&self, sql: Box<str>) -> Result<Arc<[Type]>, Error> {
        let mut conn = self.conn.lock().await;
        if let Some(types) = self.known(&sql) {
            return Ok(types);
        }
        let client = match conn.take() {
            Some(client) if !client.is_closed() => conn.insert(client),
            _ => {
                let (client, connection) = self.cfg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "the statement-describing connection ended");
                    }
                });
                conn.insert(client)
            }
        };
        let tx = client.transaction().await?;
        let types: Arc<[Type]> = {
            let stmt = tx.prepare(&sql).await?;
            stmt.params().into()
            // The statement is closed here, before the transaction ends: the pooler hands
            // the server connection on with nothing of Keel's left on it.
        };
        tx.rollback().await?;
        self.remember(sql, Arc::clone(&types));
        Ok(types)
    }

    fn remember(&self, sql: Box<str>, types: Arc<[Type]>) {
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= MAX_REMEMBERED {
            known.clear();
        }
        known.insert(sql, types);
    }
}
