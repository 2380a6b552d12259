//! A worker over the HTTP worker protocol (docs/workers.md), for Rust programs that do not
//! embed Keel: it leases jobs of the queues it serves, runs a handler per kind, heartbeats,
//! and reports outcomes in batches, the way the Python and TypeScript SDKs do.
//!
//! ```no_run
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! use keel_client::worker::{JobFailure, Worker, WorkerConfig};
//! let client = keel_client::Client::new("http://127.0.0.1:8080", None)?;
//! let stop = tokio_util::sync::CancellationToken::new();
//! Worker::new(client, WorkerConfig::new(["images"]).concurrency(20))
//!     .handle("resize", |ctx, args| async move {
//!         let _ = (ctx, args);
//!         Ok::<_, JobFailure>(serde_json::json!({"ok": true}))
//!     })
//!     .run(stop)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The loop, per queue: lease ahead into a local buffer — `max = free slots + prefetch −
//! buffered`, the prefetch following the worker's pace ([`keel_core::pace::Pace`]: jobs
//! started per second × the lease round trip, at most [`WorkerConfig::prefetch`]) — with a
//! long poll while nothing is buffered; start a buffered job the moment a slot frees, in its
//! own task holding the slot until its outcome is queued; every `heartbeat` interval extend
//! every lease held (running or buffered), and cancel a job's token when the server says it
//! was cancelled (or the lease is gone; a buffered one is then dropped unrun); hand each
//! outcome to one reporter task that sends whatever has accumulated as one
//! `POST /v1/jobs/complete` or `/v1/jobs/fail` (no linger: batches grow with load). On
//! stop: no new lease; buffered jobs are released at once; running jobs get `grace`, then
//! their tokens are cancelled and the jobs still unfinished are released, so their attempt
//! does not count.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_core::JobId;
use keel_core::pace::Pace;
use keel_wire::{
    CompleteItem, CompleteManyBody, FailItem, FailManyBody, HeartbeatBody, HeartbeatOut,
    HumanDuration, LeaseBody, LeasedOut, OutcomesOut, ReleaseBody, raw_json,
};
use reqwest::Method;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Client, ClientError, JobOut};

/// Most outcomes sent in one batch request (the server's limit).
const MAX_BATCH: usize = 1000;
/// Most jobs a worker may buffer ahead of its slots (the server's own limit).
const MAX_PREFETCH: usize = 10_000;

/// Why a handler's attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// What went wrong (stored in the job's `errors`).
    pub message: String,
    /// Retrying will not help: discard the job.
    pub permanent: bool,
    /// Run again after this long instead of the job's backoff.
    pub retry_in: Option<Duration>,
}

impl JobFailure {
    /// A failure the job's backoff retries.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_in: None,
        }
    }

    /// A failure that discards the job.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            retry_in: None,
        }
    }
}

/// What a handler gets besides the args.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job as leased (state `running`, attempt counted).
    pub job: JobOut,
    /// Cancelled when a user cancels the job, when its lease is lost, or when the worker's
    /// grace period runs out: a handler should stop soon after.
    pub cancelled: CancellationToken,
}

pub(crate) type BoxedHandler = Arc<
    dyn Fn(JobContext, Value) -> Pin<Box<dyn Future<Output = Result<Value, JobFailure>> + Send>>
        + Send
        + Sync,
>;

/// How a [`Worker`] runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub(crate) queues: Vec<String>,
    pub(crate) concurrency: usize,
    pub(crate) lease: Duration,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) wait: Duration,
    pub(crate) grace: Duration,
    pub(crate) worker_id: String,
    pub(crate) prefetch: usize,
}

impl WorkerConfig {
    /// Serve `queues` with 10 slots, 30 s leases heartbeated every 10 s, 5 s long polls and
    /// a 30 s grace period, as `rust-<pid>`.
    pub fn new<S: Into<String>>(queues: impl IntoIterator<Item = S>) -> Self {
        Self {
            queues: queues.into_iter().map(Into::into).collect(),
            concurrency: 10,
            lease: Duration::from_secs(30),
            heartbeat: None,
            wait: Duration::from_secs(5),
            grace: Duration::from_secs(30),
            worker_id: format!("rust-{}", std::process::id()),
            prefetch: 256,
        }
    }

    /// Most jobs leased ahead of the free slots (default 256, at most 10 000; 0 leases
    /// only for free slots). Within it the buffer follows the worker's pace, so short jobs
    /// never wait for a lease round trip and long ones are not hoarded from other workers.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.min(MAX_PREFETCH);
        self
    }

    /// Jobs run at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Each lease's length (5 s to 1 h).
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// How often running leases are extended; default a third of the lease.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.heartbeat = Some(d);
        self
    }

    /// How long one lease request waits for work (at most 30 s). A stop waits for the
    /// poll in flight, so this also bounds how long a stop takes to stop leasing.
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = d;
        self
    }

    /// How long running jobs may take to finish after a stop.
    pub fn grace(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// The name this worker leases under.
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Completions the server accepted.
    pub completed: u64,
    /// Failures the server accepted.
    pub failed: u64,
    /// Outcomes refused (stale lease: cancelled, or lost and rescued).
    pub refused: u64,
    /// Jobs given back unrun at stop.
    pub released: u64,
}

/// A worker serving some queues with handlers by kind.
pub struct Worker {
    pub(crate) client: Client,
    pub(crate) config: WorkerConfig,
    pub(crate) handlers: HashMap<String, BoxedHandler>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One job running here.
struct Running {
    token: String,
    cancelled: CancellationToken,
}

/// An outcome on its way to the reporter.
enum Outcome {
    Complete(CompleteItem),
    Fail(FailItem),
}

#[derive(Default)]
pub(crate) struct Counters {
    report: Mutex<WorkerReport>,
}

impl Counters {
    pub(crate) fn report(&self) -> WorkerReport {
        *self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add(&self, f: impl FnOnce(&mut WorkerReport)) {
        f(&mut self.report.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Worker {
    /// A worker with no handlers yet.
    pub fn new(client: Client, config: WorkerConfig) -> Self {
        Self {
            client,
            config,
            handlers: HashMap::new(),
        }
    }

    /// Runs `handler` for jobs of `kind`. Only registered kinds are leased.
    pub fn handle<F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(JobContext, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, JobFailure>> + Send + 'static,
    {
        self.handlers.insert(
            kind.into(),
            Arc::new(move |ctx, args| Box::pin(handler(ctx, args))),
        );
        self
    }

    /// Runs until `stop` is cancelled, then stops gracefully (see the module docs).
    pub async fn run(self, stop: CancellationToken) -> Result<WorkerReport, ClientError> {
        let Worker {
            client,
            config,
            handlers,
        } = self;
        let handlers = Arc::new(handlers);
        let slots = Arc::new(Semaphore::new(config.concurrency));
        let running: Arc<Mutex<HashMap<JobId, Running>>> = Arc::default();
        let counters = Arc::new(Counters::default());
        let (report_tx, report_rx) = mpsc::channel::<Outcome>(config.concurrency * 4);
        let reporter = tokio::spawn(report(client.clone(), report_rx, Arc::clone(&counters)));
        let beats_stop = CancellationToken::new();
        let beats = tokio::spawn(heartbeats(
            client.clone(),
            Arc::clone(&running),
            config.lease,
            config.heartbeat.unwrap_or(config.lease / 3),
            beats_stop.clone(),
        ));
        let mut jobs = JoinSet::new();
        let mut pollers = JoinSet::new();
        let kinds: Vec<String> = handlers.keys().cloned().collect();
        for queue in &config.queues {
            pollers.spawn(poll(PollCtx {
                client: client.clone(),
                queue: queue.clone(),
                config: config.clone(),
                kinds: kinds.clone(),
                slots: Arc::clone(&slots),
                stop: stop.clone(),
                handlers: Arc::clone(&handlers),
                running: Arc::clone(&running),
                report: report_tx.clone(),
                counters: Arc::clone(&counters),
            }));
        }
        while let Some(done) = pollers.join_next().await {
            if let Ok(Some(spawned)) = done {
                jobs = merge(jobs, spawned);
            }
        }
        // Stopped: the running jobs get the grace period, then their tokens are cancelled.
        let grace = tokio::time::sleep(config.grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = jobs.join_next() => if next.is_none() { break },
                () = &mut grace => {
                    for r in lock(&running).values() {
                        r.cancelled.cancel();
                    }
                    while jobs.join_next().await.is_some() {}
                    break;
                }
            }
        }
        drop(report_tx);
        let _ = reporter.await;
        beats_stop.cancel();
        let _ = beats.await;
        let report = *counters.report.lock().unwrap_or_else(|p| p.into_inner());
        Ok(report)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Entries are inserted and removed whole: a panic cannot leave one half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Moves the tasks of `from` into `into` (a poller hands its running jobs over when it
/// stops, so the stop can wait for them).
fn merge(mut into: JoinSet<()>, mut from: JoinSet<()>) -> JoinSet<()> {
    // JoinSet has no merge: wrap what is left of `from` in one task of `into`.
    if !from.is_empty() {
        into.spawn(async move { while from.join_next().await.is_some() {} });
    }
    into
}

struct PollCtx {
    client: Client,
    queue: String,
    config: WorkerConfig,
    kinds: Vec<String>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    handlers: Arc<HashMap<String, BoxedHandler>>,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    report: mpsc::Sender<Outcome>,
    counters: Arc<Counters>,
}

/// A leased job waiting here for a slot; heartbeated like a running one.
struct Buffered {
    job: JobOut,
    token: String,
    cancelled: CancellationToken,
}

type LeaseCall = Pin<Box<dyn Future<Output = Result<Vec<JobOut>, ClientError>> + Send>>;

/// Leases from one queue until the stop; returns the job tasks it started.
async fn poll(cx: PollCtx) -> Option<JoinSet<()>> {
    let mut jobs = JoinSet::new();
    let mut buffer: VecDeque<Buffered> = VecDeque::new();
    let mut pace = Pace::new(cx.config.prefetch, Instant::now());
    let mut backoff = Duration::from_millis(100);
    // The lease in flight: the call, how many it asked for, whether it may wait, when sent.
    let mut leasing: Option<(LeaseCall, usize, bool, Instant)> = None;
    loop {
        // Reap finished job tasks so the set does not grow.
        while jobs.try_join_next().is_some() {}
        let started = start_buffered(&cx, &mut buffer, &mut jobs);
        pace.started(started, Instant::now());
        let busy = cx.config.concurrency - cx.slots.available_permits().min(cx.config.concurrency);
        let capacity = cx.config.concurrency + pace.prefetch();
        let room = capacity.saturating_sub(busy + buffer.len()).min(MAX_BATCH);
        if leasing.is_none()
            && !cx.stop.is_cancelled()
            && room > 0
            // Half the prefetch taken: lease again while the rest covers the round trip.
            && (buffer.is_empty() || room >= (pace.prefetch() / 2).max(1))
        {
            // Long-poll only with nothing buffered: jobs in hand must not wait on an empty
            // queue's poll to be started.
            let waits = buffer.is_empty();
            leasing = Some((lease_call(&cx, room, waits), room, waits, Instant::now()));
        }
        let wait_for_slot = !buffer.is_empty() || (leasing.is_none() && room == 0);
        tokio::select! {
            biased;
            () = cx.stop.cancelled() => break,
            (leased, asked, waited, sent) = finish(&mut leasing) => match leased {
                Ok(leased) => {
                    backoff = Duration::from_millis(100);
                    // A long poll that waited for work says nothing about the round trip.
                    let full = leased.len() >= asked;
                    if !waited || full {
                        pace.leased(sent.elapsed());
                    }
                    // Slow start after an idle spell, as the built-in dispatchers do.
                    pace.answered(full, buffer.is_empty() && cx.slots.available_permits() > 0);
                    take_lease(&cx, leased, &mut buffer);
                }
                Err(e) => {
                    // A refused request (4xx) will not get better by repeating it fast either.
                    tracing::warn!(queue = %cx.queue, error = %e, "leasing failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = cx.stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
            permit = Arc::clone(&cx.slots).acquire_owned(), if wait_for_slot => {
                let Ok(permit) = permit else { break };
                if let Some(b) = next_live(&cx, &mut buffer) {
                    start(&cx, b, permit, &mut jobs);
                    pace.started(1, Instant::now());
                }
            }
        }
    }
    // Stopped. A lease in flight was granted to us: its jobs go back with the buffer's.
    if let Some((call, ..)) = leasing.take()
        && let Ok(leased) = call.await
    {
        take_lease(&cx, leased, &mut buffer);
    }
    let mut releases = JoinSet::new();
    for b in buffer.drain(..) {
        lock(&cx.running).remove(&b.job.id);
        let (client, counters) = (cx.client.clone(), Arc::clone(&cx.counters));
        releases.spawn(async move { release(&client, &b.job, &counters).await });
    }
    while releases.join_next().await.is_some() {}
    Some(jobs)
}

fn lease_call(cx: &PollCtx, max: usize, waits: bool) -> LeaseCall {
    let body = LeaseBody {
        worker: cx.config.worker_id.clone(),
        max: Some(u32::try_from(max.clamp(1, MAX_BATCH)).unwrap_or(1)),
        wait: Some(HumanDuration(if waits {
            cx.config.wait
        } else {
            Duration::ZERO
        })),
        lease: Some(HumanDuration(cx.config.lease)),
        kinds: Some(cx.kinds.clone()),
    };
    let path = format!("/v1/queues/{}/lease", cx.queue);
    let client = cx.client.clone();
    Box::pin(async move {
        let leased: LeasedOut = client
            .json(client.request(Method::POST, &path).json(&body))
            .await?;
        Ok(leased.jobs)
    })
}

/// The lease in flight's answer; never resolves when none is in flight. Cancel-safe: the
/// call stays in `leasing` if this is dropped first.
async fn finish(
    leasing: &mut Option<(LeaseCall, usize, bool, Instant)>,
) -> (Result<Vec<JobOut>, ClientError>, usize, bool, Instant) {
    let Some((call, asked, waits, sent)) = leasing.as_mut() else {
        return std::future::pending().await;
    };
    let answer = call.await;
    let (asked, waits, sent) = (*asked, *waits, *sent);
    *leasing = None;
    (answer, asked, waits, sent)
}

/// Registers freshly leased jobs with the heartbeats and appends them to the buffer.
fn take_lease(cx: &PollCtx, leased: Vec<JobOut>, buffer: &mut VecDeque<Buffered>) {
    for job in leased {
        let Some(token) = job.lease.as_ref().and_then(|l| l.token.clone()) else {
            continue;
        };
        // Not a child of `stop`: a stop must not cancel running jobs before the grace.
        let cancelled = CancellationToken::new();
        lock(&cx.running).insert(
            job.id,
            Running {
                token: token.clone(),
                cancelled: cancelled.clone(),
            },
        );
        buffer.push_back(Buffered {
            job,
            token,
            cancelled,
        });
    }
}

/// The first buffered job still worth running; drops those cancelled (or whose lease was
/// lost) while they waited.
fn next_live(cx: &PollCtx, buffer: &mut VecDeque<Buffered>) -> Option<Buffered> {
    while let Some(b) = buffer.pop_front() {
        if !b.cancelled.is_cancelled() {
            return Some(b);
        }
        lock(&cx.running).remove(&b.job.id);
        tracing::info!(job_id = %b.job.id, "a buffered job was cancelled before it started; dropped");
    }
    None
}

/// Starts buffered jobs on the free slots; returns how many.
fn start_buffered(cx: &PollCtx, buffer: &mut VecDeque<Buffered>, jobs: &mut JoinSet<()>) -> usize {
    let mut started = 0;
    while !buffer.is_empty() {
        let Ok(permit) = Arc::clone(&cx.slots).try_acquire_owned() else {
            break;
        };
        let Some(b) = next_live(cx, buffer) else {
            break;
        };
        start(cx, b, permit, jobs);
        started += 1;
    }
    started
}

/// Runs one job in its own task holding `permit` until its outcome is queued.
fn start(cx: &PollCtx, b: Buffered, permit: OwnedSemaphorePermit, jobs: &mut JoinSet<()>) {
    let Buffered {
        job,
        token,
        cancelled,
    } = b;
    let handler = cx.handlers.get(&job.kind).cloned();
    let report = cx.report.clone();
    let running = Arc::clone(&cx.running);
    let client = cx.client.clone();
    let counters = Arc::clone(&cx.counters);
    jobs.spawn(async move {
        let id = job.id;
        let outcome = invoke(handler, job.clone(), cancelled.clone()).await;
        lock(&running).remove(&id);
        if cancelled.is_cancelled() && outcome.is_err() {
            // Stopped by the grace period (or a cancel): give it back unrun. A
            // cancelled job's release is refused as stale, which is fine.
            release(&client, &job, &counters).await;
        } else {
            let id = id.to_string();
            let sent = match outcome {
                Ok(result) => Outcome::Complete(CompleteItem {
                    id,
                    token,
                    result: Some(raw_json(&result)),
                }),
                Err(failure) => Outcome::Fail(FailItem {
                    id,
                    token,
                    error: failure.message,
                    permanent: Some(failure.permanent),
                    retry_in: failure.retry_in.map(HumanDuration),
                }),
            };
            let _ = report.send(sent).await;
        }
        drop(permit);
    });
}

/// Runs `handler` on `job` (whichever transport leased it): a panic is a failed attempt,
/// not a dead worker, and a kind without a handler is discarded.
pub(crate) async fn invoke(
    handler: Option<BoxedHandler>,
    job: JobOut,
    cancelled: CancellationToken,
) -> Result<Value, JobFailure> {
    let Some(h) = handler else {
        return Err(JobFailure::permanent(format!(
            "no handler for kind {:?} in this worker",
            job.kind
        )));
    };
    // Raw JSON from the server is valid JSON.
    let args = serde_json::from_str(job.args.get()).unwrap_or(Value::Null);
    let ctx = JobContext { job, cancelled };
    match tokio::spawn(h(ctx, args)).await {
        Ok(r) => r,
        Err(e) => Err(JobFailure::retry(format!("the handler panicked: {e}"))),
    }
}

/// Gives a leased job back unrun.
async fn release(client: &Client, job: &JobOut, counters: &Counters) {
    let Some(token) = job.lease.as_ref().and_then(|l| l.token.clone()) else {
        return;
    };
    let path = format!("/v1/jobs/{}/release", job.id);
    let sent = client
        .send(
            client
                .request(Method::POST, &path)
                .json(&ReleaseBody { token }),
        )
        .await;
    if sent.is_ok() {
        counters.add(|r| r.released += 1);
    }
}

/// Extends every running lease every `every`; cancels a job the server says was cancelled
/// or whose lease is gone.
async fn heartbeats(
    client: Client,
    running: Arc<Mutex<HashMap<JobId, Running>>>,
    lease: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let held: Vec<(JobId, String, CancellationToken)> = lock(&running)
            .iter()
            .map(|(id, r)| (*id, r.token.clone(), r.cancelled.clone()))
            .collect();
        let mut beats = JoinSet::new();
        for (id, token, cancelled) in held {
            let client = client.clone();
            beats.spawn(async move {
                let path = format!("/v1/jobs/{id}/heartbeat");
                let body = HeartbeatBody {
                    token,
                    lease: Some(HumanDuration(lease)),
                };
                match client
                    .json::<HeartbeatOut>(client.request(Method::POST, &path).json(&body))
                    .await
                {
                    Ok(b) if b.cancel_requested => cancelled.cancel(),
                    Ok(_) => {}
                    // The lease is gone (rescued, finished elsewhere): stop the handler.
                    Err(e)
                        if e.status()
                            .is_some_and(|s| s.as_u16() == 409 || s.as_u16() == 404) =>
                    {
                        cancelled.cancel();
                    }
                    Err(_) => {}
                }
            });
        }
        while beats.join_next().await.is_some() {}
    }
}

/// Sends outcomes in batches: whatever has accumulated when the previous send returns.
async fn report(client: Client, mut rx: mpsc::Receiver<Outcome>, counters: Arc<Counters>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        let (mut completes, mut fails) = (Vec::new(), Vec::new());
        for o in batch {
            match o {
                Outcome::Complete(item) => completes.push(item),
                Outcome::Fail(item) => fails.push(item),
            }
        }
        if !completes.is_empty() {
            let body = CompleteManyBody {
                outcomes: completes,
            };
            send_outcomes(&client, "/v1/jobs/complete", &body, false, &counters).await;
        }
        if !fails.is_empty() {
            let body = FailManyBody { outcomes: fails };
            send_outcomes(&client, "/v1/jobs/fail", &body, true, &counters).await;
        }
    }
}

/// Sends one batch, retrying while the server cannot be reached or is unavailable; the
/// leases stay ours meanwhile (the heartbeats continue), so a retry is safe.
async fn send_outcomes(
    client: &Client,
    path: &str,
    body: &impl Serialize,
    is_fail: bool,
    counters: &Counters,
) {
    let mut backoff = Duration::from_millis(50);
    for _ in 0..8 {
        match client
            .json::<OutcomesOut>(client.request(Method::POST, path).json(body))
            .await
        {
            Ok(r) => {
                for item in r.results {
                    counters.add(|c| match (item.status, is_fail) {
                        (200, false) => c.completed += 1,
                        (200, true) => c.failed += 1,
                        _ => c.refused += 1,
                    });
                }
                return;
            }
            Err(e)
                if e.status()
                    .is_some_and(|s| s.is_client_error() && s.as_u16() != 429) =>
            {
                tracing::warn!(error = %e, "outcomes refused");
                return;
            }
            Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::warn!("outcomes not recorded after 8 attempts; their leases will lapse");
}
