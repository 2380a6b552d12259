//! The connection pool and the small task that keeps it healthy.
//!
//! deadpool hands out connections and bounds how many exist; two policies it does not have
//! are added here:
//! - **max_lifetime**: a `pre_recycle` hook refuses connections older than the limit, so
//!   they are closed instead of reused (server-side memory growth, credential rotation, and a
//!   load balancer in front of Postgres that should see connections rebalance), and the
//!   maintenance task evicts idle ones that reached it before a request trips over them.
//! - **min_idle**: connections are opened at startup and topped up in the background, so the
//!   first requests after startup or after a burst of dropped connections do not each pay for
//!   a TCP + auth handshake.
//!
//! Store calls borrow connections through a [`Lender`], which behind a transaction pooler
//! closes a connection its call dropped before every answer came back (see [`Lent`]).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Timeouts, WeakPool,
};

use super::PgOptions;
use super::task::{Background, Stopped};

/// How often the maintenance task evicts expired idle connections and tops the pool up.
/// Checking is a mutex and two counters, so a second is cheap, and a connection lost to a
/// server restart is replaced before most requests notice.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the pool (no connection is opened yet).
pub(super) fn build(
    cfg: tokio_postgres::Config,
    opts: &PgOptions,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        cfg,
        tokio_postgres::NoTls,
        ManagerConfig {
            // `is_closed` only: a health query on every checkout would add a round trip to
            // every statement. A connection that died silently fails its next statement with
            // a transient error, which callers retry, and is then discarded.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let mut builder = Pool::builder(manager)
        .max_size(opts.max_connections)
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(opts.acquire_timeout),
            create: Some(opts.connect_timeout),
            recycle: Some(opts.acquire_timeout),
        });
    if let Some(max) = opts.max_lifetime {
        builder = builder.pre_recycle(Hook::sync_fn(move |_, metrics| {
            if metrics.age() >= max {
                Err(HookError::message("connection reached max_lifetime"))
            } else {
                Ok(())
            }
        }));
    }
    builder.build()
}

/// Lends the pool's connections to store calls, one [`Lent`] per call; cheap to clone.
#[derive(Clone)]
pub(super) struct Lender {
    pool: Pool,
    /// `Some` behind a transaction pooler, where a connection dropped before its answers
    /// came back is closed rather than given back: how many were, for
    /// [`PoolStats`](keel_core::store::PoolStats).
    closed: Option<Arc<AtomicU64>>,
}

impl Lender {
    /// Lends from `pool`; `behind_pooler` when a transaction pooler sits in front of
    /// Postgres.
    pub(super) fn new(pool: Pool, behind_pooler: bool) -> Self {
        Self {
            pool,
            closed: behind_pooler.then(Arc::default),
        }
    }

    /// The pool itself: its status, and closing it.
    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection for one call, waiting up to the pool's acquire timeout.
    pub(super) async fn lend(&self) -> Result<Lent, PoolError> {
        Ok(Lent {
            conn: Some(self.pool.get().await?),
            answered: false,
            closed: self.closed.clone(),
        })
    }

    /// Connections closed because their call dropped them unanswered.
    pub(super) fn closed_unanswered(&self) -> u64 {
        self.closed
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// A pooled connection lent for one store call. Dropped, it goes back to the pool, except
/// behind a transaction pooler when the call did not say it had every answer it asked for
/// ([`answered`](Self::answered)): then it is closed.
///
/// A call drops its connection early when its caller gives up (a request's deadline, the
/// leader's campaign timeout) or when it returns on an error with a transaction open,
/// whose `ROLLBACK` tokio-postgres then sends without waiting. A request on it may still be
/// unanswered, and the next call's statements would be pipelined behind it. Postgres
/// answers a connection's requests in order, so straight to Postgres that is harmless, and
/// the connection goes back to the pool (closing it would turn every request that gives up
/// under overload into a reconnect). But PgBouncer before 1.21 in transaction mode hands
/// its server connection on at that request's answer while the next statement may still be
/// arriving: a batch insert's 95 kB bind message was split between two server connections,
/// and the second one closed with `FATAL: invalid frontend message type 255` under another
/// client (docs/scaling.md).
pub(super) struct Lent {
    conn: Option<Object>,
    answered: bool,
    /// `Some` behind a transaction pooler: counts the connections closed unanswered.
    closed: Option<Arc<AtomicU64>>,
}

impl Lent {
    /// Gives the connection back: the call has had every answer it asked for (its last
    /// statement, its commit or its awaited rollback returned).
    pub(super) fn answered(mut self) {
        self.answered = true;
    }

    /// Closes the connection instead of giving it back, whatever it was used for: its
    /// session's state is unknown (a setting a failed statement may have left changed).
    pub(super) fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Object::take(conn));
        }
    }
}

impl Deref for Lent {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.conn
            .as_ref()
            .expect("a lent connection is present until dropped")
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut Object {
        self.conn
            .as_mut()
            .expect("a lent connection is present until dropped")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        match &self.closed {
            Some(closed) if !self.answered => {
                // Out of the pool: dropping the client closes the connection, and the pooler
                // ends whatever was left of its transaction.
                drop(Object::take(conn));
                closed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "closed a pooled connection its call dropped before every answer came back"
                );
            }
            _ => drop(conn),
        }
    }
}

/// Opens connections until at least `min_idle` are idle (or the pool is full). Never waits
/// for a slot: when every connection is busy the pool is warm enough already.
///
/// The pool hands out idle connections before it creates new ones, so to create `n` new ones
/// this holds the idle ones too, briefly; they all go back to the pool at the end.
pub(super) async fn top_up(pool: &Pool, min_idle: usize) -> Result<(), PoolError> {
    let status = pool.status();
    let target = min_idle.min(status.max_size);
    let room = status.max_size.saturating_sub(status.size);
    let missing = target.saturating_sub(status.available).min(room);
    if missing == 0 {
        return Ok(());
    }
    let no_wait = Timeouts {
        wait: Some(Duration::ZERO),
        ..pool.timeouts()
    };
    let mut held = Vec::with_capacity(status.available + missing);
    for _ in 0..status.available + missing {
        match pool.timeout_get(&no_wait).await {
            Ok(conn) => held.push(conn),
            // Another task took the slot meanwhile: good enough.
            Err(PoolError::Timeout(_)) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts the background task enforcing `min_idle` and `max_lifetime`. It holds only a weak
/// reference to the pool and exits when stopped, when the handle is dropped (the sender goes
/// away), or when the pool is gone or closed, so it never outlives the store.
pub(super) fn keep(pool: &Pool, opts: &PgOptions) -> Background {
    let (pool, min_idle, max_lifetime) = (pool.weak(), opts.min_idle, opts.max_lifetime);
    Background::spawn(move |stopped| run(pool, min_idle, max_lifetime, stopped))
}

async fn run(
    pool: WeakPool,
    min_idle: usize,
    max_lifetime: Option<Duration>,
    mut stopped: Stopped,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Either close() asked us to stop or the store was dropped.
            _ = stopped.changed() => return,
        }
        let Some(pool) = pool.upgrade() else { return };
        if pool.is_closed() {
            return;
        }
        if let Some(max) = max_lifetime {
            let evicted = pool.retain(|_, metrics| metrics.age() < max);
            if !evicted.removed.is_empty() {
                tracing::debug!(
                    evicted = evicted.removed.len(),
                    "closed idle Postgres connections that reached max_lifetime"
                );
            }
        }
        if let Err(e) = top_up(&pool, min_idle).await {
            // Requests will surface the same failure with context; this is only a hint.
            tracing::debug!(error = %e, "could not top up the Postgres pool to min_idle");
        }
    }
}
