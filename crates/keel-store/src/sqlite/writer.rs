//! The single writer thread and its group commit.
//!
//! SQLite allows one writer at a time; a pool of writers would only queue on the database
//! lock and pay a `fsync` each. Instead every write becomes a task sent over a bounded
//! channel to one thread that owns the only write connection. The thread takes the first
//! waiting task, drains whatever else is already queued (up to `max_batch`), runs them all in
//! one `BEGIN IMMEDIATE … COMMIT` — each under its own savepoint, so one failing task rolls
//! back alone — and answers each caller only after the commit is durable. Under load many
//! callers share one `fsync`; at low load a lone task commits at once, without lingering.
//!
//! The channel is bounded: when the writer falls behind, senders wait (backpressure) instead
//! of queueing without limit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

use keel_core::StoreError;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::map_err;

/// One unit of work for the writer: run inside the batch transaction, then be told whether
/// the batch committed.
trait Task: Send {
    /// Runs the work; returns whether it succeeded (its savepoint is kept) or failed (rolled
    /// back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller with the outcome, given how the batch's commit went.
    fn finish(self: Box<Self>, commit: Result<(), &CommitError>);
}

/// Why a batch did not commit; turned into a fresh `StoreError` for each caller.
#[derive(Debug)]
pub(super) struct CommitError {
    transient: bool,
    message: String,
}

impl CommitError {
    fn from_sqlite(context: &str, e: &rusqlite::Error) -> Self {
        let err = map_err(context, e);
        Self {
            transient: err.is_transient(),
            message: format!("{context}: {e}"),
        }
    }

    fn to_store_error(&self) -> StoreError {
        let context = "committing a write batch";
        if self.transient {
            StoreError::transient(context, self.message.clone())
        } else {
            StoreError::permanent(context, self.message.clone())
        }
    }
}

struct FnTask<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Task for FnTask<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A panic in one task must not take the writer thread (and every later write) down.
        let outcome = catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or_else(|_| {
            Err(StoreError::permanent(
                "running a write",
                "the write panicked; it was rolled back",
            ))
        });
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn finish(self: Box<Self>, commit: Result<(), &CommitError>) {
        let answer = match (self.outcome, commit) {
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(e)) | (None, Err(e)) => Err(e.to_store_error()),
            (Some(Err(e)), _) => Err(e),
            (None, Ok(())) => Err(StoreError::permanent(
                "running a write",
                "the write was never run",
            )),
        };
        // The caller may have given up (deadline, disconnect); the write stands regardless.
        let _ = self.reply.send(answer);
    }
}

enum Message {
    Work(Box<dyn Task>),
    Close(oneshot::Sender<()>),
}

/// The async side of the writer: cheap to clone, one per store.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("queued", &self.queued())
            .finish()
    }
}

impl Writer {
    /// Starts the writer thread on `conn` (already configured and migrated).
    pub(super) fn spawn(
        conn: Connection,
        queue: usize,
        max_batch: usize,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let handle = std::thread::Builder::new()
            .name("keel-sqlite-writer".into())
            .spawn(move || run(conn, rx, max_batch.max(1)))?;
        Ok((Self { tx }, handle))
    }

    /// Runs `work` in the next batch transaction and returns its result once that batch has
    /// committed. `context` names the operation for errors.
    pub(super) async fn write<T, F>(&self, context: &str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let task = Box::new(FnTask {
            work: Some(work),
            outcome: None,
            reply,
        });
        self.tx
            .send(Message::Work(task))
            .await
            .map_err(|_| closed(context))?;
        answer.await.map_err(|_| closed(context))?
    }

    /// Writes waiting in the queue for the writer thread.
    pub(super) fn queued(&self) -> usize {
        crate::write_queue::queued(&self.tx)
    }

    /// Asks the thread to finish what is queued before this call and stop; waits for it.
    pub(super) async fn close(&self) {
        crate::write_queue::close(&self.tx, Message::Close).await;
    }
}

fn closed(context: &str) -> StoreError {
    StoreError::permanent(context.to_owned(), "the SQLite store is closed")
}

fn run(mut conn: Connection, mut rx: mpsc::Receiver<Message>, max_batch: usize) {
    let mut batch: Vec<Box<dyn Task>> = Vec::with_capacity(max_batch);
    let mut closing = None;
    while closing.is_none() {
        match rx.blocking_recv() {
            Some(Message::Work(task)) => batch.push(task),
            Some(Message::Close(done)) => closing = Some(done),
            None => break,
        }
        while closing.is_none() && batch.len() < max_batch {
            match rx.try_recv() {
                Ok(Message::Work(task)) => batch.push(task),
                Ok(Message::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let commit = commit_batch(&mut conn, &mut batch);
            for task in batch.drain(..) {
                task.finish(commit.as_ref().map(|_| ()));
            }
        }
    }
    // Refuse anything sent after close; tasks already queued behind the close marker are
    // answered (dropped senders report "closed" to their callers).
    rx.close();
    while let Ok(msg) = rx.try_recv() {
        if let Message::Close(done) = msg {
            let _ = done.send(());
        }
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

fn commit_batch(conn: &mut Connection, batch: &mut [Box<dyn Task>]) -> Result<(), CommitError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| CommitError::from_sqlite("beginning a write batch", &e))?;
    if let [task] = batch {
        // A lone write needs no savepoint: the transaction is its unit of rollback, and
        // skipping the savepoint spares SQLite journaling every page it touches twice.
        return if task.run(&tx) {
            tx.commit()
                .map_err(|e| CommitError::from_sqlite("committing a write batch", &e))
        } else {
            // The task's own error is what its caller gets; nothing is kept.
            tx.rollback()
                .map_err(|e| CommitError::from_sqlite("rolling back a write", &e))
        };
    }
    for task in batch.iter_mut() {
        let sp = tx
            .savepoint()
            .map_err(|e| CommitError::from_sqlite("opening a savepoint", &e))?;
        if task.run(&sp) {
            sp.commit()
                .map_err(|e| CommitError::from_sqlite("releasing a savepoint", &e))?;
        } else {
            // Dropping an uncommitted savepoint rolls it back.
            drop(sp);
        }
    }
    tx.commit()
        .map_err(|e| CommitError::from_sqlite("committing a write batch", &e))
}
