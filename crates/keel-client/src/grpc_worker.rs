//! The same [`Worker`] over gRPC's streaming lease (`keel.v1.WorkerService/Lease`,
//! docs/grpc.md): one stream per queue instead of long polls and outcome requests.
//!
//! ```no_run
//! # async fn run() -> Result<(), keel_client::ClientError> {
//! use keel_client::worker::{JobFailure, Worker, WorkerConfig};
//! let client = keel_client::Client::new("http://127.0.0.1:8080", None)?;
//! let stop = tokio_util::sync::CancellationToken::new();
//! Worker::new(client, WorkerConfig::new(["images"]).concurrency(20))
//!     .handle("resize", |_, _| async { Ok::<_, JobFailure>(serde_json::Value::Null) })
//!     .run_grpc("http://127.0.0.1:50051", stop)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Per queue, one task owns the stream. It grants credits for the slots plus a prefetch
//! (so a slot freed by a finished job finds the next one already here, not a round trip
//! away), starts jobs on free slots, sends each batch of finished jobs' outcomes as one
//! message that also hands their credits back, and heartbeats every held lease on the
//! stream. A broken stream is reopened after a backoff, with credits for what is not held;
//! outcomes not yet sent wait for it (they are fenced by their tokens, not by the stream).
//! On stop: no more credits; buffered jobs are released at once; running jobs get the
//! grace, then their tokens are cancelled and those still unfinished are released; the
//! worker then closes its side and reads the last answers.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use keel_core::JobId;
use keel_proto::v1 as pb;
use keel_proto::v1::worker_service_client::WorkerServiceClient;
use keel_wire::JobOut;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::ClientError;
use crate::worker::{
    BoxedHandler, Counters, JobFailure, Worker, WorkerConfig, WorkerReport, invoke,
};

/// Most credits a stream may have outstanding (the server's limit).
const MAX_CREDITS: usize = 1000;
/// Most outcomes in one message.
const MAX_BATCH: usize = 1000;

/// A finished job's outcome on its way to the stream.
struct Finished {
    id: JobId,
    token: String,
    outcome: pb::outcome::Outcome,
}

/// A job held here: running, or buffered until a slot frees.
struct Held {
    token: String,
    cancelled: CancellationToken,
}

impl Worker {
    /// Runs until `stop` is cancelled over gRPC at `grpc_url` (e.g.
    /// `http://127.0.0.1:50051`, or `https://…` for a Keel serving TLS, trusting the
    /// client's CA certificate if it has one), with the client's API key; see the module
    /// docs.
    pub async fn run_grpc(
        self,
        grpc_url: &str,
        stop: CancellationToken,
    ) -> Result<WorkerReport, ClientError> {
        let mut endpoint = Endpoint::from_shared(grpc_url.to_owned())
            .map_err(|e| ClientError::Settings(format!("the gRPC address {grpc_url:?}: {e}")))?
            .tcp_nodelay(true);
        if endpoint.uri().scheme_str() == Some("https") {
            // The webpki roots, and the client's own CA when it was given one.
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(pem) = &self.client.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::Settings(format!("TLS for {grpc_url:?}: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        let Worker {
            client,
            config,
            handlers,
        } = self;
        let key = client.api_key.clone();
        let shared = Arc::new(Shared {
            channel,
            key,
            kinds: handlers.keys().cloned().collect(),
            handlers,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            counters: Counters::default(),
            config,
        });
        let mut queues = JoinSet::new();
        for queue in shared.config.queues.clone() {
            queues.spawn(serve_queue(Arc::clone(&shared), queue, stop.clone()));
        }
        while queues.join_next().await.is_some() {}
        Ok(shared.counters.report())
    }
}

struct Shared {
    channel: Channel,
    key: Option<String>,
    kinds: Vec<String>,
    handlers: HashMap<String, BoxedHandler>,
    slots: Arc<Semaphore>,
    counters: Counters,
    config: WorkerConfig,
}

impl Shared {
    /// Jobs a stream may hold (running and buffered): the slots and the prefetch.
    fn capacity(&self) -> usize {
        (self.config.concurrency + self.config.prefetch).min(MAX_CREDITS)
    }
}

/// One queue's state across the streams it opens.
struct Queue {
    shared: Arc<Shared>,
    name: String,
    held: HashMap<JobId, Held>,
    buffer: VecDeque<JobOut>,
    jobs: JoinSet<()>,
    finished_tx: mpsc::Sender<Finished>,
    finished_rx: mpsc::Receiver<Finished>,
    /// Outcomes sent and not yet answered.
    unanswered: usize,
    /// Credits freed and not yet handed back: they go back in batches (half the prefetch,
    /// or at once when nothing is buffered), so that the server leases many jobs per
    /// store round trip rather than one per finished job.
    owed: usize,
}

async fn serve_queue(shared: Arc<Shared>, name: String, stop: CancellationToken) {
    let (finished_tx, finished_rx) = mpsc::channel(shared.config.concurrency * 4 + 16);
    let mut q = Queue {
        shared,
        name,
        held: HashMap::new(),
        buffer: VecDeque::new(),
        jobs: JoinSet::new(),
        finished_tx,
        finished_rx,
        unanswered: 0,
        owed: 0,
    };
    let mut backoff = Duration::from_millis(100);
    let mut grace_ends: Option<Instant> = None;
    loop {
        match q.session(&stop, &mut grace_ends).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = %q.name, error = %e, "the lease stream broke; reopening");
                if stop.is_cancelled() && q.held.is_empty() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn message(credits: usize, outcomes: Vec<pb::Outcome>) -> pb::LeaseRequest {
    pb::LeaseRequest {
        open: None,
        credits: u32::try_from(credits).unwrap_or(0),
        outcomes,
        drain: false,
    }
}

fn release(id: JobId, token: String) -> pb::Outcome {
    outcome(Finished {
        id,
        token,
        outcome: pb::outcome::Outcome::Release(pb::outcome::Release {}),
    })
}

fn outcome(f: Finished) -> pb::Outcome {
    pb::Outcome {
        id: f.id.to_string(),
        token: f.token,
        outcome: Some(f.outcome),
    }
}

impl Queue {
    /// One stream: `Ok` once stopped and everything held is reported, `Err` when it broke.
    async fn session(
        &mut self,
        stop: &CancellationToken,
        grace_ends: &mut Option<Instant>,
    ) -> Result<(), tonic::Status> {
        let shared = Arc::clone(&self.shared);
        let cfg = &shared.config;
        let (tx, rx) = mpsc::channel::<pb::LeaseRequest>(64);
        let grant = if stop.is_cancelled() {
            0
        } else {
            self.shared.capacity().saturating_sub(self.held.len())
        };
        self.unanswered = 0;
        self.owed = 0;
        let open = pb::LeaseRequest {
            open: Some(pb::LeaseOpen {
                queue: self.name.clone(),
                worker: cfg.worker_id.clone(),
                kinds: self.shared.kinds.clone(),
                lease: Some(duration(cfg.lease)),
            }),
            credits: u32::try_from(grant).unwrap_or(0),
            outcomes: Vec::new(),
            drain: false,
        };
        let _ = tx.send(open).await;
        let outbound =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
            );
        let mut request = tonic::Request::new(outbound);
        if let Some(key) = &self.shared.key
            && let Ok(v) = MetadataValue::try_from(format!("Bearer {key}"))
        {
            request.metadata_mut().insert("authorization", v);
        }
        let mut replies = WorkerServiceClient::new(self.shared.channel.clone())
            .lease(request)
            .await?
            .into_inner();
        let every = cfg
            .heartbeat
            .unwrap_or(cfg.lease / 3)
            .max(Duration::from_millis(100));
        let mut beats = tokio::time::interval_at(Instant::now() + every, every);
        let mut tx = Some(tx);
        loop {
            if stop.is_cancelled() {
                if grace_ends.is_none() {
                    *grace_ends = Some(Instant::now() + cfg.grace);
                    // No more jobs (the unused credits are taken back, a waiting lease
                    // gives up), and the buffered ones go back at once.
                    let released: Vec<_> = self
                        .buffer
                        .drain(..)
                        .filter_map(|job| {
                            let held = self.held.remove(&job.id)?;
                            Some(release(job.id, held.token))
                        })
                        .collect();
                    if let Some(tx) = &tx {
                        self.unanswered += released.len();
                        let drain = pb::LeaseRequest {
                            drain: true,
                            ..message(0, released)
                        };
                        let _ = tx.send(drain).await;
                    }
                }
                if self.held.is_empty() && self.unanswered == 0 {
                    // Close our side; the server ends the stream once it answered all.
                    tx = None;
                }
            }
            if self.buffer.is_empty()
                && self.owed > 0
                && !stop.is_cancelled()
                && let Some(tx) = &tx
            {
                // Nothing left to start: every freed credit goes back now.
                let credits = std::mem::take(&mut self.owed);
                if tx.send(message(credits, Vec::new())).await.is_err() {
                    return Err(tonic::Status::unavailable("the stream closed"));
                }
            }
            let slot_wanted = !self.buffer.is_empty() && !stop.is_cancelled();
            tokio::select! {
                biased;
                reply = replies.message() => match reply? {
                    Some(r) => {
                        let late = self.take(r, stop.is_cancelled());
                        if !late.is_empty() && let Some(tx) = &tx {
                            self.unanswered += late.len();
                            let _ = tx.send(message(0, late)).await;
                        }
                    }
                    None if tx.is_none() => return Ok(()),
                    None => return Err(tonic::Status::unavailable("the server ended the stream")),
                },
                Some(first) = self.finished_rx.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match self.finished_rx.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    let mut freed = 0;
                    let mut outcomes = Vec::with_capacity(batch.len());
                    for f in batch {
                        if self.held.remove(&f.id).is_some() {
                            freed += 1;
                        }
                        outcomes.push(outcome(f));
                    }
                    if !stop.is_cancelled() {
                        self.owed += freed;
                    }
                    let credits = self.credits_due();
                    self.unanswered += outcomes.len();
                    match &tx {
                        Some(tx) => {
                            if tx.send(message(credits, outcomes)).await.is_err() {
                                return Err(tonic::Status::unavailable("the stream closed"));
                            }
                        }
                        None => return Err(tonic::Status::unavailable("the stream closed")),
                    }
                }
                permit = Arc::clone(&self.shared.slots).acquire_owned(), if slot_wanted => {
                    if let (Ok(permit), Some(job)) = (permit, self.buffer.pop_front()) {
                        self.start(job, permit);
                    }
                }
                _ = beats.tick() => {
                    let outcomes: Vec<_> = self.held.iter().map(|(id, h)| pb::Outcome {
                        id: id.to_string(),
                        token: h.token.clone(),
                        outcome: Some(pb::outcome::Outcome::Heartbeat(pb::outcome::Beat {
                            lease: Some(duration(self.shared.config.lease)),
                        })),
                    }).collect();
                    if !outcomes.is_empty() && let Some(tx) = &tx {
                        self.unanswered += outcomes.len();
                        let _ = tx.send(message(0, outcomes)).await;
                    }
                }
                () = sleep_until(*grace_ends) => {
                    // The grace ran out: stop the handlers; their jobs are released.
                    for h in self.held.values() {
                        h.cancelled.cancel();
                    }
                    *grace_ends = Some(Instant::now() + Duration::from_secs(3600));
                }
                () = stop.cancelled(), if grace_ends.is_none() => {}
            }
            while self.jobs.try_join_next().is_some() {}
        }
    }

    /// The credits to hand back with the next message: all those owed once they reach half
    /// the prefetch (or with nothing buffered), none before.
    fn credits_due(&mut self) -> usize {
        let batch = (self.shared.config.prefetch / 2).max(1);
        if self.owed >= batch || self.buffer.is_empty() {
            std::mem::take(&mut self.owed)
        } else {
            0
        }
    }

    /// A reply: jobs to buffer, answers to count (a heartbeat saying the job was cancelled,
    /// or any refusal of one, stops its handler).
    /// Jobs leased after the stop (a lease already reading the store when the drain
    /// arrived) are not kept: their releases are returned, to be sent.
    fn take(&mut self, r: pb::LeaseResponse, stopping: bool) -> Vec<pb::Outcome> {
        let mut late = Vec::new();
        for job in r.jobs {
            let Ok(job) = JobOut::try_from(job) else {
                continue;
            };
            let Some(token) = job.lease.as_ref().and_then(|l| l.token.clone()) else {
                continue;
            };
            if stopping {
                late.push(release(job.id, token));
                continue;
            }
            self.held.insert(
                job.id,
                Held {
                    token,
                    cancelled: CancellationToken::new(),
                },
            );
            self.buffer.push_back(job);
        }
        for a in r.results {
            self.unanswered = self.unanswered.saturating_sub(1);
            let ok = a.code == tonic::Code::Ok as i32;
            let stopped = a.cancel_requested || (!ok && a.state == 0);
            if stopped
                && let Ok(id) = JobId::parse(&a.id)
                && let Some(h) = self.held.get(&id)
            {
                h.cancelled.cancel();
            }
            let state = keel_proto::convert::state_of(a.state);
            self.shared.counters.add(|c| match state {
                _ if !ok => c.refused += 1,
                Some(keel_core::JobState::Completed) => c.completed += 1,
                Some(keel_core::JobState::Retryable | keel_core::JobState::Discarded) => {
                    c.failed += 1;
                }
                Some(keel_core::JobState::Available) => c.released += 1,
                _ => {}
            });
        }
        late
    }

    /// Runs `job` in its own task holding `permit` until its outcome is queued.
    fn start(&mut self, job: JobOut, permit: OwnedSemaphorePermit) {
        let Some(held) = self.held.get(&job.id) else {
            return;
        };
        let (token, cancelled) = (held.token.clone(), held.cancelled.clone());
        if cancelled.is_cancelled() {
            // Cancelled (or its lease lost) while it waited: never started.
            self.held.remove(&job.id);
            return;
        }
        let handler = self.shared.handlers.get(&job.kind).cloned();
        let finished = self.finished_tx.clone();
        self.jobs.spawn(async move {
            let id = job.id;
            let result = invoke(handler, job, cancelled.clone()).await;
            drop(permit);
            let outcome = match result {
                // Stopped by the grace period (or a cancel): give it back unrun.
                Err(_) if cancelled.is_cancelled() => {
                    pb::outcome::Outcome::Release(pb::outcome::Release {})
                }
                Ok(v) => pb::outcome::Outcome::Complete(pb::outcome::Completion {
                    result: Some(v.to_string()),
                }),
                Err(JobFailure {
                    message,
                    permanent,
                    retry_in,
                }) => pb::outcome::Outcome::Fail(pb::outcome::Failure {
                    error: message,
                    permanent,
                    retry_in: retry_in.map(duration),
                }),
            };
            let _ = finished.send(Finished { id, token, outcome }).await;
        });
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    keel_proto::convert::duration_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
