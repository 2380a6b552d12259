//! Wakeups for inserted jobs, sent after the insert has committed, from a transaction of
//! their own.
//!
//! A transaction that calls `pg_notify` takes a database-wide lock when it commits and holds
//! it through its WAL flush (notifications must enter the queue in commit order), so the
//! server commits notifying transactions one at a time and concurrent inserts lose group
//! commit: each waits for the previous one's flush before starting its own. Measured on this
//! project's machine with pgbench, 8 clients inserting one row per transaction: 7.5–7.9k
//! tx/s; 2.2–2.3k with a `pg_notify` in the same transaction; 4.9–5.2k with it in a separate
//! `synchronous_commit = off` transaction after each commit. `keel bench` saw it as W2p's
//! tail (inserts waiting on `Lock: object` behind each other's `WALSync`) and as W2's enqueue
//! rate.
//!
//! So inserts commit without notifying and hand the queues that received available jobs to
//! the store's notifier, which sends whatever has collected in one `synchronous_commit =
//! off` statement ([`WAKE_SQL`]): its commit does not wait for the disk and holds the lock
//! for microseconds, and while one is in flight the next queues collect, so a busy server
//! sends one round of notifications per round trip, not one per insert (the listener also
//! leaves a millisecond between the starts of two rounds: at most a thousand a second).
//! The pending set holds each queue name once, so it is bounded by the queues enqueued into
//! during one round.
//!
//! The notifier is the store's listener (`listen.rs`): it sends on its own `LISTEN`
//! connection and ignores what comes back from its own backend, the idiom the `NOTIFY`
//! documentation gives, since this process already woke its own dispatchers when the insert
//! returned. Sent from any other connection, each wakeup would come back to this process
//! after the local one had been served and cost an extra, empty lease per enqueue (measured:
//! W2p's Postgres CPU 0.76–0.79 → 0.88–0.93 cores, p50 0.9 → 1.2 ms). A store without a
//! listener (behind a transaction pooler without a listen URL) sends through its pool.
//!
//! A wakeup still only follows a commit: a rolled-back insert wakes nobody. What is given up
//! is atomicity with the insert: if the process dies, or the notification fails, between
//! the commit and the notification, other replicas find the jobs at their next poll
//! (`KEEL_POLL_INTERVAL`), the same fallback that covers a listener while it reconnects.
//! The rarer statements that make jobs available (promotion, release, resuming a queue)
//! still notify in their own transactions.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use keel_core::StoreError;
use tokio::sync::Notify;

use super::error;
use super::pool::Lender;
use super::statements::Statements;
use super::task::{Background, Stopped};

/// Notifies `$1` once per queue in `$2`, in a transaction that does not wait for its WAL
/// flush (the wakeup is a hint; the jobs it points to were committed durably before it).
pub(super) const WAKE_SQL: &str = "SELECT pg_notify($1, q.queue) \
     FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s, \
          unnest($2::text[]) AS q(queue)";

/// The notifier: [`wake`](Self::wake) queues names; the listener, or a task of its own
/// when there is none, sends them.
#[derive(Debug)]
pub(super) struct Wakeups {
    pending: Arc<Pending>,
    /// The task sending through the pool, when no listener does.
    task: Option<Background>,
}

/// The queues waiting to be notified, and the signal that there are some.
#[derive(Debug, Default)]
pub(super) struct Pending {
    queues: Mutex<BTreeSet<String>>,
    ready: Notify,
}

impl Pending {
    /// Resolves once queues were added since the last [`take`](Self::take) began.
    /// `notify_one` keeps a permit when nobody waits, so a wake during a send is not lost.
    pub(super) async fn ready(&self) {
        self.ready.notified().await;
    }

    /// The queues to notify now, leaving none pending.
    pub(super) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.queues.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .collect()
    }
}

impl Wakeups {
    /// A notifier whose wakeups the store's listener sends, from `pending`.
    pub(super) fn for_listener(pending: Arc<Pending>) -> Self {
        Self {
            pending,
            task: None,
        }
    }

    /// A notifier sending on `channel` through connections `lender` lends, for a store
    /// without a listener.
    pub(super) fn through_pool(
        pending: Arc<Pending>,
        lender: Lender,
        sql: Statements,
        channel: String,
    ) -> Self {
        let task = Background::spawn({
            let pending = Arc::clone(&pending);
            move |stopped| run(pending, lender, sql, channel, stopped)
        });
        Self {
            pending,
            task: Some(task),
        }
    }

    /// Queues a wakeup for each of `queues`. Call it only once the jobs are committed.
    pub(super) fn wake<'a>(&self, queues: impl IntoIterator<Item = &'a str>) {
        let mut added = false;
        {
            let mut pending = self
                .pending
                .queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for queue in queues {
                if !pending.contains(queue) {
                    pending.insert(queue.to_owned());
                }
                added = true;
            }
        }
        if added {
            self.pending.ready.notify_one();
        }
    }

    /// Sends what is still pending and stops the pool's sender. (A listener stops with the
    /// listener; what it had not sent by then is left to the other replicas' polls.)
    pub(super) async fn stop(&self) {
        if let Some(task) = &self.task {
            task.stop().await;
        }
    }
}

async fn run(
    pending: Arc<Pending>,
    lender: Lender,
    sql: Statements,
    channel: String,
    mut stopped: Stopped,
) {
    loop {
        let stopping = tokio::select! {
            () = pending.ready() => false,
            _ = stopped.changed() => true,
        };
        let queues = pending.take();
        if !queues.is_empty() {
            send(&lender, &sql, &channel, &queues).await;
        }
        if stopping {
            return;
        }
    }
}

/// One round of notifications through the pool. A failure is logged and dropped: the jobs
/// are stored, and the workers' poll finds them.
async fn send(lender: &Lender, sql: &Statements, channel: &str, queues: &[String]) {
    let ctx = || format!("notifying {} queue(s) of new jobs", queues.len());
    let sent = async {
        let conn = lender.lend().await.map_err(|e| error::pool(e, ctx()))?;
        sql.execute(&*conn, WAKE_SQL, &[&channel, &queues])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok::<_, StoreError>(())
    }
    .await;
    if let Err(e) = sent {
        tracing::warn!(
            error = %e,
            "could not send wakeups; workers will find the new jobs at their next poll"
        );
    }
}
