//! Completions, batched.
//!
//! A busy pool finishes jobs in bursts; writing each completion in its own statement (and,
//! on Postgres, its own round trip and commit) makes the store the bottleneck long before
//! the workers are. Workers instead hand their completion to one task that writes whatever
//! has accumulated in a single [`WorkStore::complete`] call, and answers each worker with its
//! own item's outcome once the write is done. There is no linger: a lone completion is
//! written at once, and completions arriving while a write is in flight form the next
//! batch, so batches grow with load and a job's result is never held back waiting for
//! company. At most [`MAX_FLUSHES`] writes are in flight at once (bounded, G5), and the
//! channel in is bounded too: a worker waits (backpressure) rather than queue without limit.

use std::sync::Arc;

use keel_core::store::Completion;
use keel_core::{StoreError, WorkStore};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry;

/// Most completions written in one statement.
const MAX_BATCH: usize = 512;
/// Most batches being written at once. Two keeps the store busy while the next batch forms.
const MAX_FLUSHES: usize = 2;
/// Capacity of the queue from workers to the completer.
const QUEUE: usize = 4096;

struct Pending {
    completion: Completion,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// Where workers send completions. Cheap to share.
///
/// The runtime has one for its built-in workers; the API has its own for external workers'
/// completions (docs/workers.md), so both go through the same batched write.
#[derive(Debug, Clone)]
pub struct Completer {
    tx: mpsc::Sender<Pending>,
}

impl Completer {
    /// Starts the completer on `tracker`; it stops once `stop` fires and every completion
    /// already sent has been written.
    pub(crate) fn spawn(
        store: Arc<dyn WorkStore>,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tracker.spawn(run(store, rx, stop));
        Self { tx }
    }

    /// A completer that lives as long as its clones: once the last one is dropped it
    /// writes what was already sent and ends. For a caller with no task tracker of its own
    /// (the API), whose every completion is awaited before the caller's request ends.
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns a task).
    pub fn start(store: Arc<dyn WorkStore>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx, CancellationToken::new()));
        Self { tx }
    }

    /// Records one completion, in whatever batch it lands in; returns this item's outcome.
    pub async fn complete(&self, completion: Completion) -> Result<(), StoreError> {
        self.submit(completion).await?.outcome().await
    }

    /// Queues one completion and returns once the completer has taken it, before it is
    /// written: a worker slot is free to take its next job while the write happens, yet a
    /// full queue still holds the slot back (backpressure). Await the [`Receipt`] for the
    /// item's outcome.
    pub async fn submit(&self, completion: Completion) -> Result<Receipt, StoreError> {
        let id = completion.lease.id;
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { completion, reply })
            .await
            .map_err(|_| {
                StoreError::transient(format!("completing job {id}"), "the completer has stopped")
            })?;
        Ok(Receipt { id, answer })
    }
}

/// A completion the completer has taken; [`Receipt::outcome`] waits for its write.
#[derive(Debug)]
pub struct Receipt {
    id: keel_core::JobId,
    answer: oneshot::Receiver<Result<(), StoreError>>,
}

impl Receipt {
    /// This item's outcome, once the batch it landed in was written.
    pub async fn outcome(self) -> Result<(), StoreError> {
        let id = self.id;
        self.answer.await.map_err(|_| {
            StoreError::transient(
                format!("completing job {id}"),
                "the completer dropped the write",
            )
        })?
    }
}

async fn run(store: Arc<dyn WorkStore>, mut rx: mpsc::Receiver<Pending>, stop: CancellationToken) {
    let flushes = Arc::new(Semaphore::new(MAX_FLUSHES));
    let writes = TaskTracker::new();
    loop {
        let first = tokio::select! {
            biased;
            p = rx.recv() => match p {
                Some(p) => p,
                None => break,
            },
            () = stop.cancelled() => {
                // Refuse new completions, but write the ones already queued.
                rx.close();
                continue;
            }
        };
        // Waiting for a free write slot is when the batch fills up.
        let Ok(permit) = Arc::clone(&flushes).acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let store = Arc::clone(&store);
        writes.spawn(async move {
            flush(store.as_ref(), batch).await;
            drop(permit);
        });
    }
    writes.close();
    writes.wait().await;
}

async fn flush(store: &dyn WorkStore, batch: Vec<Pending>) {
    telemetry::store_batch("complete", batch.len());
    let (completions, replies): (Vec<Completion>, Vec<_>) =
        batch.into_iter().map(|p| (p.completion, p.reply)).unzip();
    match store.complete(completions).await {
        Ok(items) => {
            let mut items = items.into_iter();
            for reply in replies {
                let item = items.next().unwrap_or_else(|| {
                    Err(StoreError::permanent(
                        "completing jobs",
                        "the store answered fewer items than it was given",
                    ))
                });
                // The worker may be gone (aborted at shutdown); the write stands.
                let _ = reply.send(item);
            }
        }
        Err(e) => {
            // The whole write failed: every worker gets the same class of error and retries
            // its own completion (transient) or reports it (permanent).
            let message = telemetry::ErrorChain(&e).to_string();
            for reply in replies {
                let copy = if e.is_transient() {
                    StoreError::transient("completing jobs", message.clone())
                } else {
                    StoreError::permanent("completing jobs", message.clone())
                };
                let _ = reply.send(Err(copy));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_core::store::{LeaseParams, LeaseRef};
    use keel_core::{JobKind, JobState, NewJob, QueueName, Store, SystemClock, WorkerId};
    use keel_store::{SqliteOptions, SqliteStore};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_completions_are_written_and_answered_individually() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("k.db"),
            SqliteOptions::default(),
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let q = QueueName::parse("c").unwrap();
        let jobs: Vec<NewJob> = (0..300)
            .map(|_| NewJob::new(JobKind::parse("noop").unwrap()).queue(q.clone()))
            .collect();
        store.insert(jobs).await.unwrap();
        let leased = store
            .lease(LeaseParams {
                queue: q.clone(),
                max: 300,
                lease_for: Duration::from_secs(60),
                owner: WorkerId::parse("t").unwrap(),
                tenant: None,
                kinds: Vec::new(),
            })
            .await
            .unwrap();
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let completer = Completer::spawn(store.clone(), &tracker, stop.clone());
        let mut tasks = Vec::new();
        for (i, job) in leased.iter().enumerate() {
            let completer = completer.clone();
            let mut lease = LeaseRef::of(job).unwrap();
            if i == 7 {
                lease.token = keel_core::LeaseToken::new(); // a stale one among many
            }
            tasks.push(tokio::spawn(async move {
                completer
                    .complete(Completion {
                        lease,
                        result: None,
                    })
                    .await
            }));
        }
        let mut stale = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => {}
                Err(StoreError::StaleLease(_)) => stale += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(stale, 1, "only the forged token is refused");
        let stats = store.queue_stats(None).await.unwrap();
        assert_eq!(stats[0].counts.completed, 299);
        assert_eq!(stats[0].counts.get(JobState::Running), 1);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert!(
            completer
                .complete(Completion {
                    lease: LeaseRef::of(&leased[7]).unwrap(),
                    result: None
                })
                .await
                .is_err()
        );
    }
}
