//! Group commit for [`PgStore::insert`](super::PgStore): many callers, one transaction.
//!
//! Each `insert` call sends its (validated) jobs over a bounded channel to one committer
//! task and waits for the answer. The committer takes the first waiting request, drains
//! whatever else is already queued (up to `max_batch` jobs), and writes them all with one
//! `unnest` INSERT — one statement, so one transaction and one WAL flush — then answers
//! every caller, only after the commit. Nothing lingers: a lone request at low load is
//! written at once. Up to `concurrency` batches are in flight on separate pooled
//! connections, so one commit's fsync does not stall the next batch's round trip; while
//! every slot is busy, requests pile up in the channel and the next batch is larger. That
//! is what makes the batch size follow the load without a timer.
//!
//! - **Backpressure**: the channel is bounded; when it is full, callers wait to send (their
//!   own deadline still applies), instead of the queue growing without limit.
//! - **Per-caller atomicity**: a merged write that fails for a reason other than a transient
//!   one (a duplicate id in one caller's jobs, say) is retried caller by caller, each in its
//!   own statement, so only the offending caller gets the error and the others' jobs are
//!   stored. A transient failure (connection lost, pool exhausted) is every caller's: they
//!   all get it and may retry.
//! - **Callers who gave up** (deadline, disconnect) before their batch was written are
//!   left out of it: they were already told the enqueue failed, so storing their jobs would
//!   contradict that, and under overload it sheds work nobody waits for. Once written, a
//!   batch stands even if a caller leaves meanwhile; the answer is dropped.
//! - **Close** writes everything queued before it, refuses what comes after with a clear
//!   error, and waits for the batches in flight.
//! - **Wakeups** follow the commit: the statement notifies no one, and the queues that got
//!   available jobs are handed to the store's notifier (`wakeup.rs`), so concurrent batches
//!   are not made to commit one at a time by Postgres's notification lock.
//! - **Unique jobs** go through the same batches: a batch holding any is written with
//!   `INSERT_UNIQUE_SQL` in a transaction that skips jobs whose key is held and reads their
//!   holders ([`insert_jobs`]), and each caller gets the holder in the place of its skipped
//!   job. Batches without one keep the plain single statement, so the common path costs
//!   nothing more.
//!
//! [`insert_jobs`] is the store's one insert routine, run by group commits, idempotent
//! inserts (`idempotency.rs`) and cron ticks (`schedules.rs`) alike. Its statements, and
//! [`JobColumns`] which lays out their parameters, live in `rows.rs` beside the columns they
//! write.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keel_core::{Job, JobId, JobState, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::pool::Lender;
use super::rows::{INSERT_SQL, INSERT_UNIQUE_SQL, JobColumns, UNIQUE_HOLDERS_SQL};
use super::statements::{Conn, Statements};
use super::task::Background;
use super::wakeup::Wakeups;
use super::{error, rows};

/// How the committer batches; see [`PgOptions`](super::PgOptions) for each field's reason.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    /// Insert calls that may wait in the channel.
    pub(super) queue: usize,
    /// Jobs per batch, at most (one request larger than this is a batch of its own).
    pub(super) max_batch: usize,
    /// Batches written at once, each on its own connection.
    pub(super) concurrency: usize,
}

/// Counters of what the committer wrote, for tests and diagnosis.
#[derive(Debug, Default)]
pub(super) struct Stats {
    /// Insert statements that committed: one per merged batch, plus one per caller written
    /// alone after a merged batch failed.
    pub(super) commits: AtomicU64,
    /// Insert calls answered with success.
    pub(super) requests: AtomicU64,
}

/// One caller's insert, waiting for its batch.
struct Request {
    jobs: Vec<Job>,
    reply: oneshot::Sender<Result<Vec<Job>, StoreError>>,
}

enum Message {
    Insert(Request),
    /// Write what was queued before this, stop, then signal.
    Close(oneshot::Sender<()>),
}

/// The handle `PgStore` holds: sends requests and stops the task.
pub(super) struct Committer {
    tx: mpsc::Sender<Message>,
    task: Background,
    stats: Arc<Stats>,
}

impl fmt::Debug for Committer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Committer")
            .field("queued", &self.queued())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What the committing tasks share.
struct Shared {
    lender: Lender,
    sql: Statements,
    /// Told which queues got available jobs once a batch has committed.
    wakeups: Arc<Wakeups>,
    stats: Arc<Stats>,
}

impl Committer {
    /// Starts the committer task, writing through connections `lender` lends and waking
    /// `wakeups`.
    pub(super) fn spawn(
        lender: Lender,
        sql: Statements,
        wakeups: Arc<Wakeups>,
        settings: Settings,
    ) -> Self {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared {
            lender,
            sql,
            wakeups,
            stats: Arc::clone(&stats),
        });
        // The committer ends on its own close message (after writing what was queued), not
        // on the stop signal.
        let task = Background::spawn(|_stopped| run(shared, rx, settings));
        Self { tx, task, stats }
    }

    /// Queues `jobs` (already validated, non-empty) for the next batch and returns them once
    /// that batch has committed.
    pub(super) async fn insert(&self, jobs: Vec<Job>) -> Result<Vec<Job>, StoreError> {
        let n = jobs.len();
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Insert(Request { jobs, reply }))
            .await
            .map_err(|_| closed(n))?;
        answer.await.map_err(|_| {
            // The reply was dropped unanswered: the committer stopped (store closed) or the
            // task writing the batch failed. Whether the jobs were stored is unknown.
            StoreError::transient(
                format!("inserting jobs (batch of {n})"),
                "the group commit ended without an answer (store closing or writer failure); \
                 the jobs may or may not be stored",
            )
        })?
    }

    /// Insert calls waiting in the channel.
    pub(super) fn queued(&self) -> usize {
        crate::write_queue::queued(&self.tx)
    }

    /// Writes what is queued, refuses later inserts, waits for the batches in flight, and
    /// stops the task.
    pub(super) async fn close(&self) {
        crate::write_queue::close(&self.tx, Message::Close).await;
        self.task.join().await;
    }

    /// What has been written so far.
    #[cfg(test)]
    pub(super) fn stats(&self) -> &Stats {
        &self.stats
    }
}

fn closed(n: usize) -> StoreError {
    StoreError::permanent(
        format!("inserting jobs (batch of {n})"),
        "the Postgres store is closed",
    )
}

/// Requests taken from the channel for one write.
struct Batch {
    requests: Vec<Request>,
    jobs: usize,
}

impl Batch {
    fn of(first: Request) -> Self {
        Self {
            jobs: first.jobs.len(),
            requests: vec![first],
        }
    }
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Message>, settings: Settings) {
    // Bounded by the pool anyway (each commit holds a connection); the cap keeps the
    // permit arithmetic below in range whatever was configured.
    let concurrency = settings.concurrency.clamp(1, 1024);
    let slots = Arc::new(Semaphore::new(concurrency));
    let max_batch = settings.max_batch.max(1);
    // A request drained that would have overfilled the batch: it opens the next one.
    let mut carry: Option<Request> = None;
    let mut closing = None;
    loop {
        // A free slot first, then the requests: while every slot is busy, requests collect
        // in the channel and the batch taken next is larger.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break; // unreachable: the semaphore is never closed
        };
        let first = match carry.take() {
            Some(request) => request,
            None => match rx.recv().await {
                Some(Message::Insert(request)) => request,
                Some(Message::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                // Every sender is gone: the store was dropped without close().
                None => break,
            },
        };
        let mut batch = Batch::of(first);
        while batch.jobs < max_batch {
            match rx.try_recv() {
                Ok(Message::Insert(request)) => {
                    if batch.jobs + request.jobs.len() > max_batch {
                        carry = Some(request);
                        break;
                    }
                    batch.jobs += request.jobs.len();
                    batch.requests.push(request);
                }
                Ok(Message::Close(done)) => {
                    closing = Some(done);
                    break;
                }
                Err(_) => break,
            }
        }
        tokio::spawn(commit(Arc::clone(&shared), batch, permit));
        if closing.is_some() {
            break;
        }
    }
    if let Some(request) = carry.take() {
        // Queued before the close: written like the rest.
        if let Ok(permit) = Arc::clone(&slots).acquire_owned().await {
            tokio::spawn(commit(Arc::clone(&shared), Batch::of(request), permit));
        }
    }
    // Refuse what was sent after the close; answer what slipped in meanwhile.
    rx.close();
    let mut waiters = Vec::from_iter(closing);
    while let Ok(message) = rx.try_recv() {
        match message {
            Message::Insert(request) => {
                let _ = request.reply.send(Err(closed(request.jobs.len())));
            }
            Message::Close(done) => waiters.push(done),
        }
    }
    // Every slot back means no batch is in flight: each caller has been answered.
    let all = u32::try_from(concurrency).expect("concurrency is clamped to 1024");
    let _ = slots.acquire_many(all).await;
    for done in waiters {
        let _ = done.send(());
    }
}

/// Writes one batch and answers its callers; `_permit` frees the slot when done.
async fn commit(shared: Arc<Shared>, mut batch: Batch, _permit: OwnedSemaphorePermit) {
    batch.requests.retain(|r| !r.reply.is_closed());
    let Batch { requests, .. } = batch;
    if requests.is_empty() {
        return;
    }
    let jobs: usize = requests.iter().map(|r| r.jobs.len()).sum();
    let all: Vec<&Job> = requests.iter().flat_map(|r| r.jobs.iter()).collect();
    let merged = write(&shared, &all, requests.len()).await;
    drop(all);
    match merged {
        Ok(holders) => answer_all(&shared, requests, &holders),
        Err(e) if requests.len() == 1 => {
            if let Some(r) = requests.into_iter().next() {
                let _ = r.reply.send(Err(e));
            }
        }
        Err(e) if !e.is_transient() => {
            // Someone's jobs cannot be stored (most likely a duplicate id). Find out whose
            // by writing each caller alone; rare enough that one statement each is fine.
            tracing::debug!(
                error = %e,
                callers = requests.len(),
                "group insert failed; retrying each caller's jobs separately"
            );
            for r in requests {
                if r.reply.is_closed() {
                    continue; // gave up meanwhile, and nothing of theirs was written
                }
                let own: Vec<&Job> = r.jobs.iter().collect();
                let written = write(&shared, &own, 1).await;
                drop(own);
                match written {
                    Ok(holders) => answer_all(&shared, vec![r], &holders),
                    Err(e) => {
                        let _ = r.reply.send(Err(e));
                    }
                }
            }
        }
        Err(e) => {
            // Every caller's failure: each gets its own error carrying the shared cause.
            let context = format!(
                "inserting jobs (group commit of {jobs} jobs from {} callers)",
                requests.len()
            );
            let cause = Arc::new(e);
            for r in requests {
                let _ = r.reply.send(Err(StoreError::transient(
                    context.clone(),
                    SharedCause(Arc::clone(&cause)),
                )));
            }
        }
    }
}

fn answer_all(shared: &Shared, requests: Vec<Request>, holders: &Holders) {
    shared.stats.commits.fetch_add(1, Ordering::Relaxed);
    shared
        .stats
        .requests
        .fetch_add(requests.len() as u64, Ordering::Relaxed);
    for r in requests {
        // The caller may have given up meanwhile; the jobs are stored regardless.
        let _ = r.reply.send(Ok(substitute(r.jobs, holders)));
    }
}

/// Inserts `jobs` (from `callers` insert calls) on a pooled connection: one statement, or
/// one transaction when unique jobs are among them. Returns the holders of the unique jobs
/// that were not inserted.
async fn write(shared: &Shared, jobs: &[&Job], callers: usize) -> Result<Holders, StoreError> {
    let n = jobs.len();
    let ctx = || {
        if callers == 1 {
            format!("inserting jobs (batch of {n})")
        } else {
            format!("inserting jobs (group commit of {n} jobs from {callers} callers)")
        }
    };
    let unique = jobs.iter().any(|j| j.unique.is_some());
    if unique {
        shared
            .sql
            .ready(&*INSERT_STATEMENTS)
            .await
            .map_err(|e| error::db(e, ctx()))?;
    }
    let mut conn = shared
        .lender
        .lend()
        .await
        .map_err(|e| error::pool(e, ctx()))?;
    let holders = if unique {
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let holders = insert_jobs(&shared.sql, &tx, jobs, &ctx).await?;
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        holders
    } else {
        insert_jobs(&shared.sql, &*conn, jobs, &ctx).await?
    };
    conn.answered();
    shared.wakeups.wake(woken(jobs, &holders));
    Ok(holders)
}

/// The queues to wake after `jobs` committed: those of the available jobs that went in (a
/// unique job in `holders` was not inserted; its key's holder was already there).
pub(super) fn woken<'a>(jobs: &[&'a Job], holders: &Holders) -> BTreeSet<&'a str> {
    jobs.iter()
        .filter(|j| j.state == JobState::Available && !holders.contains_key(&j.id))
        .map(|j| j.queue.as_str())
        .collect()
}

/// Every statement [`insert_jobs`] may run: what a transaction that inserts makes
/// [`ready`](Statements::ready) before it begins.
pub(super) static INSERT_STATEMENTS: std::sync::LazyLock<[&'static str; 3]> =
    std::sync::LazyLock::new(|| [INSERT_SQL, &INSERT_UNIQUE_SQL, &UNIQUE_HOLDERS_SQL]);

/// Unique jobs that were not inserted because their key was held: the id asked for → the
/// job holding the key, which the caller gets in its place.
pub(super) type Holders = HashMap<JobId, Job>;

/// `jobs` with each job that was not inserted replaced by its key's holder, in order.
pub(super) fn substitute(jobs: Vec<Job>, holders: &Holders) -> Vec<Job> {
    if holders.is_empty() {
        return jobs;
    }
    jobs.into_iter()
        .map(|j| holders.get(&j.id).cloned().unwrap_or(j))
        .collect()
}

/// Inserts `jobs` through `client`: the one insert routine of the store (group commits,
/// idempotent inserts, cron ticks), so jobs are stored the same way whichever path they
/// take. It does not notify: once the caller has committed, it wakes the queues [`woken`]
/// names (`wakeup.rs` says why not in the same transaction).
///
/// Without unique jobs this is one plain statement. With them, `client` must be a
/// transaction (the caller commits): the insert skips jobs whose key is held, then the
/// holders of those keys are read. A holder can vanish between the two statements (leased
/// and so released, finished, deleted); the jobs it held are then inserted again, a bounded
/// number of times, so concurrent inserts of one key from any number of replicas end with
/// one job and every caller holding it.
pub(super) async fn insert_jobs<C: Conn>(
    sql: &Statements,
    client: &C,
    jobs: &[&Job],
    ctx: &(dyn Fn() -> String + Send + Sync),
) -> Result<Holders, StoreError> {
    // Each round follows a holder that vanished between two statements; several in a row
    // means the key is being taken and released continuously.
    const ROUNDS: usize = 5;
    if !jobs.iter().any(|j| j.unique.is_some()) {
        let columns = JobColumns::of(jobs.iter().copied(), jobs.len());
        sql.execute(client, INSERT_SQL, &columns.params())
            .await
            .map_err(|e| error::db(e, ctx()))?;
        return Ok(Holders::new());
    }
    let mut holders = Holders::new();
    let mut pending: Vec<&Job> = jobs.to_vec();
    for _ in 0..ROUNDS {
        let columns = JobColumns::of(pending.iter().copied(), pending.len());
        let inserted = sql
            .query(client, &INSERT_UNIQUE_SQL, &columns.unique_params())
            .await
            .map_err(|e| error::db(e, ctx()))?
            .iter()
            .map(|r| r.try_get::<_, Uuid>(0))
            .collect::<Result<HashSet<Uuid>, _>>()
            .map_err(|e| error::db(e, ctx()))?;
        // Only a job with a key can be skipped: any other conflict fails the statement.
        let skipped: Vec<&Job> = pending
            .iter()
            .copied()
            .filter(|j| !inserted.contains(j.id.as_uuid()) && j.unique.is_some())
            .collect();
        if skipped.is_empty() {
            return Ok(holders);
        }
        let (tenants, keys): (Vec<&str>, Vec<&str>) = skipped
            .iter()
            .filter_map(|j| {
                j.unique
                    .as_ref()
                    .map(|u| (j.tenant.as_str(), u.key.as_str()))
            })
            .unzip();
        let mut found: HashMap<(String, String), Job> = HashMap::new();
        for row in sql
            .query(client, &UNIQUE_HOLDERS_SQL, &[&tenants, &keys])
            .await
            .map_err(|e| error::db(e, ctx()))?
        {
            let holder = rows::job_from_row(&row)?;
            if let Some(u) = &holder.unique {
                found.insert((holder.tenant.to_string(), u.key.clone()), holder.clone());
            }
        }
        pending.clear();
        for j in skipped {
            let key = j
                .unique
                .as_ref()
                .map(|u| (j.tenant.to_string(), u.key.clone()));
            match key.and_then(|k| found.get(&k)) {
                Some(holder) => {
                    holders.insert(j.id, holder.clone());
                }
                None => pending.push(j),
            }
        }
        if pending.is_empty() {
            return Ok(holders);
        }
    }
    Err(StoreError::transient(
        ctx(),
        "the holder of a unique key kept changing while inserting its duplicate",
    ))
}

/// One failure reported to several callers: [`StoreError`] is not `Clone`, so each caller's
/// error holds this as its source, which shows the original error and its cause chain.
#[derive(Debug)]
struct SharedCause(Arc<StoreError>);

impl fmt::Display for SharedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}
