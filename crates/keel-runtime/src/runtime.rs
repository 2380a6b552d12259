//! The runtime as a whole: starting every loop, and the two-phase stop (G6).
//!
//! Tasks and their tokens:
//! - one dispatcher per queue, the leader task, maintenance and cron stop at phase 1
//!   (`draining`); the leader task then resigns, so another replica takes over at once;
//! - job tasks (workers and their handlers) are tracked in one [`TaskTracker`]; each job's
//!   token is a child of `hard_stop`, which fires at phase 2;
//! - heartbeats stop last, once every job has ended, so leases live through the grace; so
//!   does the forwarding of other replicas' state changes, so a cancel made elsewhere still
//!   reaches a job running here during the grace.
//!
//! All tokens descend from one root, cancelled when the [`Runtime`] is dropped, so a runtime
//! dropped without [`Runtime::shutdown`] still stops (abruptly) rather than leaking loops.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_core::{ChangeStream, Clock, JobState, QueueName, Store, SystemClock, WakeupStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::completer::Completer;
use crate::config::RuntimeConfig;
use crate::handle::{JobEvent, RuntimeHandle};
use crate::handler::Handlers;
use crate::{cron, dispatcher, heartbeat, leader, maintenance, telemetry};

/// What every loop and job task of one runtime shares.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) handlers: Handlers,
    pub(crate) handle: RuntimeHandle,
    pub(crate) config: RuntimeConfig,
    /// The store's clock: retention cutoffs and a failure's `retry_after` are computed
    /// with it.
    pub(crate) clock: Arc<dyn Clock>,
    /// Every job task (worker and handler), so shutdown can wait for them.
    pub(crate) jobs: TaskTracker,
    /// Phase 1: stop leasing (dispatchers) and maintenance.
    pub(crate) draining: CancellationToken,
    /// Phase 2: the parent of every running job's token.
    pub(crate) hard_stop: CancellationToken,
    /// Runs that ended, other than by release, after shutdown began.
    pub(crate) finished_in_grace: AtomicUsize,
    /// Runs released back to the queue after shutdown began.
    pub(crate) released: AtomicUsize,
    /// Prefetched jobs released at shutdown before any slot started them.
    pub(crate) released_unstarted: AtomicUsize,
    /// Batches completions into one store write (see `completer.rs`).
    pub(crate) completer: Completer,
    /// Asks the leader task to campaign now rather than at its next renewal (a fenced
    /// write was refused: find out who leads).
    pub(crate) recampaign: Notify,
    /// The wakeup of each queue served here.
    wakers: HashMap<QueueName, Arc<Notify>>,
}

impl Shared {
    /// Wakes the dispatcher of `queue`, if it is served here.
    pub(crate) fn wake(&self, queue: &QueueName) {
        match self.wakers.get(queue) {
            Some(n) => n.notify_one(),
            // Not served here: external workers may be waiting on it.
            None => self.handle.wakeups.job_available(queue),
        }
    }
}

/// What a shutdown did with the jobs that were running when it began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs whose run ended with a recorded outcome (completed, failed, or found cancelled
    /// or lost) after shutdown began; almost all of them within the grace period.
    pub finished_in_grace: usize,
    /// Jobs still running when the grace period ended, cancelled and released back to
    /// `available` without counting the attempt.
    pub released: usize,
    /// Jobs leased ahead into a queue's buffer (prefetch) that no worker had started when
    /// shutdown began, released back to `available` at once without counting the attempt.
    pub released_unstarted: usize,
}

/// A running runtime: per-queue dispatchers and worker pools, heartbeats and maintenance.
///
/// Start it with [`Runtime::start`]; stop it with [`Runtime::shutdown`]. Dropping it
/// without a shutdown stops every task abruptly: running jobs are released without a grace
/// period, and nothing waits for them.
#[derive(Debug)]
pub struct Runtime {
    shared: Arc<Shared>,
    root: CancellationToken,
    stop_heartbeats: CancellationToken,
    dispatchers: TaskTracker,
    background: TaskTracker,
    loops_alive: Arc<AtomicUsize>,
    loops_started: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("worker_id", &self.config.worker_id)
            .field("running", &self.handle.running.len())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Starts a dispatcher and worker pool for each configured queue, the heartbeat task,
    /// the leader task, and maintenance and cron (which act only while this replica leads).
    /// Returns at once; jobs start running in the background.
    ///
    /// `handle` is what the API holds: its [`crate::Wakeups`] should cover every configured
    /// queue (build it with [`RuntimeHandle::new`] from the same queue names), otherwise a
    /// missing queue only picks up work on the poll interval. Inconsistent config values
    /// are corrected and logged (see [`RuntimeConfig::validate`] to refuse them instead).
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns tasks).
    pub fn start(
        store: Arc<dyn Store>,
        config: RuntimeConfig,
        handlers: Handlers,
        handle: RuntimeHandle,
    ) -> Runtime {
        Self::start_with_clock(store, config, handlers, handle, Arc::new(SystemClock))
    }

    /// [`Runtime::start`] with the clock the store was built with (a
    /// [`keel_core::ManualClock`] in tests), so that "finished longer ago than retention"
    /// means the same thing to the runtime and the store.
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns tasks).
    pub fn start_with_clock(
        store: Arc<dyn Store>,
        config: RuntimeConfig,
        handlers: Handlers,
        handle: RuntimeHandle,
        clock: Arc<dyn Clock>,
    ) -> Runtime {
        telemetry::describe_metrics();
        let config = config.normalized();
        let wakers = config
            .queues
            .iter()
            .map(|q| {
                let notify = handle.wakeups.for_queue(&q.name).unwrap_or_else(|| {
                    tracing::warn!(
                        queue = %q.name,
                        "queue has no wakeup in the runtime handle; it will only be polled"
                    );
                    Arc::new(Notify::new())
                });
                (q.name.clone(), notify)
            })
            .collect::<HashMap<_, _>>();
        let root = CancellationToken::new();
        let stop_heartbeats = root.child_token();
        let background = TaskTracker::new();
        // Stopped with the heartbeats, i.e. after every job task has ended, so no completion
        // is left unwritten.
        let completer = Completer::spawn(store.clone(), &background, stop_heartbeats.clone());
        let wakeups = store.wakeups();
        let changes = store.changes();
        let shared = Arc::new(Shared {
            store,
            handlers,
            handle,
            config,
            clock,
            jobs: TaskTracker::new(),
            draining: root.child_token(),
            hard_stop: root.child_token(),
            finished_in_grace: AtomicUsize::new(0),
            released: AtomicUsize::new(0),
            released_unstarted: AtomicUsize::new(0),
            completer,
            recampaign: Notify::new(),
            wakers,
        });
        let loops_alive = Arc::new(AtomicUsize::new(0));
        let dispatchers = TaskTracker::new();
        if let Some(stream) = wakeups {
            background.spawn(forward_wakeups(Arc::clone(&shared), stream));
        }
        if let Some(stream) = changes {
            background.spawn(forward_changes(
                Arc::clone(&shared),
                stream,
                stop_heartbeats.clone(),
            ));
        }
        for q in &shared.config.queues {
            let wake = Arc::clone(&shared.wakers[&q.name]);
            let run = dispatcher::run(Arc::clone(&shared), q.clone(), wake);
            spawn_loop(&dispatchers, &loops_alive, run);
        }
        let run = heartbeat::run(Arc::clone(&shared), stop_heartbeats.clone());
        spawn_loop(&background, &loops_alive, run);
        let run = leader::run(Arc::clone(&shared), shared.draining.clone());
        spawn_loop(&background, &loops_alive, run);
        let run = maintenance::run(Arc::clone(&shared), shared.draining.clone());
        spawn_loop(&background, &loops_alive, run);
        let run = maintenance::run_vacuum(Arc::clone(&shared), shared.draining.clone());
        spawn_loop(&background, &loops_alive, run);
        let run = cron::run(Arc::clone(&shared), shared.draining.clone());
        spawn_loop(&background, &loops_alive, run);
        let loops_started = shared.config.queues.len() + 5;
        dispatchers.close();
        background.close();
        tracing::info!(
            worker_id = %shared.config.worker_id,
            queues = ?shared.config.queues.iter().map(|q| format!("{}:{}", q.name, q.concurrency)).collect::<Vec<_>>(),
            "runtime started"
        );
        Runtime {
            shared,
            root,
            stop_heartbeats,
            dispatchers,
            background,
            loops_alive,
            loops_started,
        }
    }

    /// What the API holds to wake dispatchers, cancel running jobs and follow events.
    pub fn handle(&self) -> &RuntimeHandle {
        &self.shared.handle
    }

    /// How many jobs are running in this process right now.
    pub fn running_jobs(&self) -> usize {
        self.shared.handle.running.len()
    }

    /// Whether every loop (dispatchers, heartbeats, leader, maintenance, cron) is still
    /// running and no
    /// shutdown has begun. A loop only ends early if it panicked, which leaves its queue
    /// unserved or its leases unrenewed: a liveness probe should restart the process.
    pub fn is_healthy(&self) -> bool {
        !self.shared.draining.is_cancelled()
            && self.loops_alive.load(Ordering::Relaxed) == self.loops_started
    }

    /// The two-phase stop of G6. Phase 1: dispatchers stop leasing, maintenance and cron
    /// stop, and this replica resigns the leadership if it held it;
    /// running jobs get up to `shutdown_grace` to finish normally. Phase 2: the jobs still
    /// running have their tokens cancelled and are released back to `available` without
    /// counting the attempt; a handler that ignores its token is aborted after two more
    /// seconds. Then heartbeats stop, and every task has been awaited when this returns.
    pub async fn shutdown(self) -> ShutdownReport {
        let grace = self.shared.config.shutdown_grace;
        self.shutdown_within(grace).await
    }

    /// Phase 1 of the stop on its own: dispatchers stop leasing, maintenance and cron stop,
    /// and the leadership is resigned; running jobs carry on. Returns once the last lease
    /// in flight has come back and its jobs were started, so from then on this process
    /// takes no lease. The server calls it the moment the signal arrives, before it spends
    /// time draining HTTP, so that jobs enqueued meanwhile are left to the other replicas
    /// (or the next start) rather than started here and cut short. Idempotent; the
    /// shutdown that follows does the rest.
    pub async fn stop_leasing(&self) {
        if !self.shared.draining.is_cancelled() {
            tracing::info!(
                running = self.shared.handle.running.len(),
                "runtime draining: no new leases; running jobs may finish"
            );
        }
        self.shared.draining.cancel();
        self.shared.handle.leasing_stopped.cancel();
        // A lease in flight completes and its jobs are started; after this no job is added.
        self.dispatchers.wait().await;
    }

    /// [`Runtime::shutdown`] with `grace` instead of the configured `shutdown_grace`: for a
    /// caller that already spent part of the overall grace period draining other things
    /// (the HTTP listener) and gives the workers what is left.
    pub async fn shutdown_within(self, grace: std::time::Duration) -> ShutdownReport {
        self.stop_leasing().await;
        tracing::info!(
            running = self.shared.handle.running.len(),
            grace_ms = grace.as_millis() as u64,
            "runtime stopping: running jobs may finish within the grace period"
        );
        self.shared.jobs.close();
        if tokio::time::timeout(grace, self.shared.jobs.wait())
            .await
            .is_err()
        {
            tracing::info!(
                running = self.shared.handle.running.len(),
                "grace period over: cancelling and releasing the jobs still running"
            );
            self.shared.hard_stop.cancel();
            self.shared.jobs.wait().await;
        }
        self.stop_heartbeats.cancel();
        self.background.wait().await;
        let report = ShutdownReport {
            finished_in_grace: self.shared.finished_in_grace.load(Ordering::Relaxed),
            released: self.shared.released.load(Ordering::Relaxed),
            released_unstarted: self.shared.released_unstarted.load(Ordering::Relaxed),
        };
        tracing::info!(
            finished_in_grace = report.finished_in_grace,
            released = report.released,
            released_unstarted = report.released_unstarted,
            "runtime stopped"
        );
        report
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.root.cancel();
        self.shared.handle.leasing_stopped.cancel();
    }
}

/// Wakes local dispatchers when another process makes jobs available (Postgres
/// `LISTEN/NOTIFY`), until shutdown begins or the store closes the stream.
async fn forward_wakeups(shared: Arc<Shared>, mut stream: Box<dyn WakeupStream>) {
    loop {
        tokio::select! {
            () = shared.draining.cancelled() => return,
            next = stream.next() => match next {
                Some(queue) => shared.wake(&queue),
                None => return,
            },
        }
    }
}

/// Feeds state changes made by any replica (Postgres `NOTIFY`) into this runtime's events,
/// so a `POST /v1/process` waiting here sees a job finished elsewhere; and stops a job
/// running here when it was cancelled through another replica. Changes made here arrive
/// too: subscribers re-read the job, and cancelling a job that already stopped is a no-op.
/// Runs until the heartbeats stop (`stop`), i.e. through the shutdown grace, or the store
/// closes the stream.
async fn forward_changes(
    shared: Arc<Shared>,
    mut stream: Box<dyn ChangeStream>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            () = stop.cancelled() => return,
            next = stream.next() => match next {
                Some(change) => change,
                None => return,
            },
        };
        if change.state == JobState::Cancelled && shared.handle.running.cancel(change.id) {
            tracing::info!(
                job_id = %change.id,
                queue = %change.queue,
                "job was cancelled through another replica; stopping it"
            );
        }
        shared.handle.events.publish(JobEvent {
            id: change.id,
            queue: change.queue,
            state: change.state,
        });
    }
}

/// Spawns a long-lived loop on `tracker`, counted in `alive` while it runs.
fn spawn_loop(
    tracker: &TaskTracker,
    alive: &Arc<AtomicUsize>,
    run: impl Future<Output = ()> + Send + 'static,
) {
    let guard = LoopAlive::new(Arc::clone(alive));
    tracker.spawn(async move {
        let _alive = guard;
        run.await;
    });
}

/// Counts a long-lived loop as alive until it ends (or unwinds).
struct LoopAlive(Arc<AtomicUsize>);

impl LoopAlive {
    fn new(alive: Arc<AtomicUsize>) -> Self {
        alive.fetch_add(1, Ordering::Relaxed);
        Self(alive)
    }
}

impl Drop for LoopAlive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
