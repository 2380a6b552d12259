//! `keel.v1.WorkerService`: the worker protocol (docs/workers.md) over gRPC, a thin
//! adapter over [`crate::service::workers`] like the HTTP routes. Each message is turned
//! into the body the HTTP route reads and checked by the same parser (`worker_in`), so a
//! worker sees the same limits and messages whichever transport it speaks.
//!
//! The `Lease` stream is one task per stream: it keeps one lease call in flight while the
//! worker has credits (a long poll woken by enqueues, exactly HTTP's), records outcomes
//! concurrently with it, and sends jobs and answers as they come. Outcomes are recorded
//! the way the completer writes: those that arrive while [`RECORDING`] batches are being
//! written wait and go as the next batch, so batches grow with load and a worker sending
//! many small messages does not make many small writes. Its memory is bounded: at most
//! [`MAX_CREDITS`] jobs are granted and unsent, about [`MAX_QUEUED_BYTES`] of outcomes
//! wait (the stream stops reading until they are written; credits in later messages wait
//! too, which is the backpressure), and replies wait in a channel of [`REPLIES`] (the task
//! waits while the worker does not read).

use std::pin::Pin;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::{FutureExt, Stream};
use keel_core::{Job, JobId, QueueName};
use keel_wire::{HeartbeatBody, HumanDuration, JobOut, LeaseBody};
use prost::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use super::call::{Charged, Core, Kind};
use super::convert::{self, Problems};
use super::pb;
use super::pb::worker_service_server::WorkerService;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::workers as service;
use crate::worker_in::{self, CompleteIn, FailIn, HeartbeatIn, LeaseIn, MAX_LEASE, MAX_WAIT};

/// Most jobs a stream's worker may have granted and not yet received.
pub(crate) const MAX_CREDITS: u32 = MAX_LEASE;
/// Outcome batches of one stream being recorded at once: two keep the store busy while the
/// next batch forms.
const RECORDING: usize = 2;
/// Most bytes of outcomes (as encoded) waiting to be recorded before the stream stops
/// reading: some ten thousand outcomes without large results, so batches are never cut
/// short by it, while a stream holds at most this and one message (`KEEL_MAX_BODY_BYTES`).
const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Replies (jobs, answers) queued for a worker that is not reading.
const REPLIES: usize = 16;

/// The `keel.v1.WorkerService` implementation.
#[derive(Clone)]
pub(crate) struct Workers(pub(crate) Core);

type Replies = Pin<Box<dyn Stream<Item = Result<pb::LeaseResponse, Status>> + Send>>;
type Answers = Pin<Box<dyn std::future::Future<Output = Vec<pb::OutcomeResult>> + Send>>;
type Leasing = Pin<Box<dyn std::future::Future<Output = Result<Vec<Job>, ApiError>> + Send>>;

/// A body of the HTTP worker protocol, for its parser.
fn body(value: &impl Serialize) -> Vec<u8> {
    // Strings, numbers and parsed JSON only: serialising cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn duration(ms: Option<u64>) -> Option<HumanDuration> {
    ms.map(|ms| HumanDuration(std::time::Duration::from_millis(ms)))
}

/// What an open message asks for, checked as `POST /v1/queues/{queue}/lease`'s body is.
fn lease_in(open: pb::LeaseOpen) -> Result<(QueueName, LeaseIn), ApiError> {
    let mut problems = Problems::new(String::new());
    let queue = QueueName::parse(open.queue).map_err(|e| keel_core::FieldError {
        field: "queue".to_owned(),
        message: e.reason,
    });
    let lease = duration(problems.millis("lease", open.lease));
    let parsed = worker_in::parse_lease(&body(&LeaseBody {
        worker: open.worker,
        max: Some(1),
        wait: None,
        lease,
        kinds: (!open.kinds.is_empty()).then_some(open.kinds),
    }));
    let mut list = problems.list;
    if let Err(e) = &queue {
        list.insert(0, e.clone());
    }
    let req = convert::checked(parsed, list)?;
    Ok((queue.map_err(|e| ApiError::Validation(vec![e]))?, req))
}

fn complete_in(id: &str, token: String, result: Option<String>) -> Result<CompleteIn, ApiError> {
    let id = convert::job_id("id", id)?;
    let mut problems = Problems::new(String::new());
    let result = problems.json("result", result);
    convert::checked(worker_in::complete_item(id, token, result), problems.list)
}

fn fail_in(
    id: &str,
    token: String,
    error: String,
    permanent: bool,
    retry_in: Option<prost_types::Duration>,
) -> Result<FailIn, ApiError> {
    let id = convert::job_id("id", id)?;
    let mut problems = Problems::new(String::new());
    let retry_in = duration(problems.millis("retry_in", retry_in));
    let parsed = worker_in::fail_item(id, token, error, permanent, retry_in.map(|d| d.0));
    convert::checked(parsed, problems.list)
}

fn heartbeat_in(
    id: &str,
    token: String,
    lease: Option<prost_types::Duration>,
) -> Result<(JobId, HeartbeatIn), ApiError> {
    let id = convert::job_id("id", id)?;
    let mut problems = Problems::new(String::new());
    let lease = duration(problems.millis("lease", lease));
    let parsed = worker_in::parse_heartbeat(&body(&HeartbeatBody { token, lease }));
    Ok((id, convert::checked(parsed, problems.list)?))
}

fn release_in(id: &str, token: String) -> Result<(JobId, keel_core::LeaseToken), ApiError> {
    let id = convert::job_id("id", id)?;
    let token = worker_in::parse_release(&body(&keel_wire::ReleaseBody { token }))?;
    Ok((id, token))
}

/// A job as a lease hands it over: with its token.
fn leased(job: Job) -> pb::Job {
    JobOut::leased(job).into()
}

/// An outcome's answer: OK with the job's state, or the code and message the unary call
/// would have answered.
fn answer(id: String, r: Result<keel_core::JobState, ApiError>) -> pb::OutcomeResult {
    match r {
        Ok(s) => pb::OutcomeResult {
            id,
            code: Code::Ok as i32,
            state: convert::state(s).into(),
            ..Default::default()
        },
        Err(e) => refused(id, e),
    }
}

fn refused(id: String, e: ApiError) -> pb::OutcomeResult {
    let status = Status::from(e);
    pb::OutcomeResult {
        id,
        code: status.code() as i32,
        message: status.message().to_owned(),
        ..Default::default()
    }
}

/// The answers to a batch of outcomes: completions and failures each recorded as one
/// batch (through the same batched writers as `POST /v1/jobs/complete`), heartbeats and
/// releases one by one; all concurrently. A heartbeat that finds its job cancelled answers
/// OK with state `cancelled` and `cancel_requested`, as HTTP's heartbeat does.
fn record(core: &Core, caller: &Caller, outcomes: Vec<pb::Outcome>) -> Answers {
    use pb::outcome::Outcome as O;
    let (state, caller) = (core.state.clone(), caller.clone());
    Box::pin(async move {
        let mut answers = Vec::with_capacity(outcomes.len());
        let (mut completes, mut fails) = (Vec::new(), Vec::new());
        let singles: FuturesUnordered<
            Pin<Box<dyn std::future::Future<Output = pb::OutcomeResult> + Send>>,
        > = FuturesUnordered::new();
        for o in outcomes {
            let id = o.id;
            match o.outcome {
                None => answers.push(refused(
                    id,
                    ApiError::Validation(vec![keel_core::FieldError {
                        field: "outcome".to_owned(),
                        message: "is required: complete, fail, release or heartbeat".to_owned(),
                    }]),
                )),
                Some(O::Complete(c)) => match complete_in(&id, o.token, c.result) {
                    Ok(item) => completes.push((id, item)),
                    Err(e) => answers.push(refused(id, e)),
                },
                Some(O::Fail(f)) => match fail_in(&id, o.token, f.error, f.permanent, f.retry_in) {
                    Ok(item) => fails.push((id, item)),
                    Err(e) => answers.push(refused(id, e)),
                },
                Some(O::Heartbeat(b)) => match heartbeat_in(&id, o.token, b.lease) {
                    Ok((job, req)) => {
                        let (state, caller) = (state.clone(), caller.clone());
                        singles.push(Box::pin(async move {
                            match service::heartbeat(&state, &caller, job, req).await {
                                Ok(beat) => pb::OutcomeResult {
                                    id,
                                    code: Code::Ok as i32,
                                    state: if beat.cancel_requested {
                                        pb::JobState::Cancelled
                                    } else {
                                        pb::JobState::Running
                                    }
                                    .into(),
                                    expires_at: beat.expires_at.map(keel_proto::convert::timestamp),
                                    cancel_requested: beat.cancel_requested,
                                    ..Default::default()
                                },
                                Err(e) => refused(id, e),
                            }
                        }));
                    }
                    Err(e) => answers.push(refused(id, e)),
                },
                Some(O::Release(_)) => match release_in(&id, o.token) {
                    Ok((job, token)) => {
                        let (state, caller) = (state.clone(), caller.clone());
                        singles.push(Box::pin(async move {
                            let r = service::release(&state, &caller, job, token).await;
                            answer(id, r.map(|j| j.state))
                        }));
                    }
                    Err(e) => answers.push(refused(id, e)),
                },
            }
        }
        let (ids, items): (Vec<_>, Vec<_>) = completes.into_iter().unzip();
        let completed = service::complete(&state, &caller, items);
        let (fail_ids, items): (Vec<_>, Vec<_>) = fails.into_iter().unzip();
        let failed = service::fail(&state, &caller, items);
        let singles = singles.collect::<Vec<_>>();
        let (completed, failed, singles) = tokio::join!(completed, failed, singles);
        answers.extend(ids.into_iter().zip(completed).map(|(id, r)| answer(id, r)));
        answers.extend(
            fail_ids
                .into_iter()
                .zip(failed)
                .map(|(id, r)| answer(id, r.map(|j| j.state))),
        );
        answers.extend(singles);
        answers
    })
}

/// Outcomes received and not yet being recorded, and their encoded size.
#[derive(Default)]
struct Queued {
    list: Vec<pb::Outcome>,
    bytes: usize,
}

impl Queued {
    fn add(&mut self, outcomes: Vec<pb::Outcome>) {
        self.bytes += outcomes.iter().map(Message::encoded_len).sum::<usize>();
        self.list.extend(outcomes);
    }

    fn take(&mut self) -> Vec<pb::Outcome> {
        self.bytes = 0;
        std::mem::take(&mut self.list)
    }
}

/// One `Lease` stream, after its open message: runs until the worker closes its side (once
/// every outcome it sent is answered), the stream breaks, or the server stops.
struct LeaseStream {
    core: Core,
    caller: Charged,
    queue: QueueName,
    req: LeaseIn,
    inbound: Streaming<pb::LeaseRequest>,
    tx: mpsc::Sender<Result<pb::LeaseResponse, Status>>,
    credits: u32,
    /// Cancelled when the worker drains: a waiting lease gives up.
    draining: CancellationToken,
}

impl LeaseStream {
    /// Adds a message's credits (INVALID_ARGUMENT past [`MAX_CREDITS`] outstanding).
    fn grant(&mut self, n: u32) -> Result<(), Status> {
        match self.credits.checked_add(n) {
            Some(c) if c <= MAX_CREDITS => {
                self.credits = c;
                Ok(())
            }
            _ => Err(ApiError::Validation(vec![keel_core::FieldError {
                field: "credits".to_owned(),
                message: format!(
                    "at most {MAX_CREDITS} jobs may be granted and not yet sent (had {}, asked {n} more)",
                    self.credits
                ),
            }])
            .into()),
        }
    }

    /// A lease of up to the credits, waiting (in turns of the longest wait) for a first job.
    fn lease(&self) -> Leasing {
        let (state, caller, queue) = (
            self.core.state.clone(),
            self.caller.caller.clone(),
            self.queue.clone(),
        );
        let req = LeaseIn {
            max: self.credits.min(MAX_LEASE),
            wait: MAX_WAIT,
            ..self.req.clone()
        };
        let draining = self.draining.clone();
        Box::pin(async move { service::lease_until(&state, &caller, queue, req, &draining).await })
    }

    async fn send(&self, reply: Result<pb::LeaseResponse, Status>) -> bool {
        self.tx.send(reply).await.is_ok()
    }

    async fn run(mut self, first: Vec<pb::Outcome>) {
        let stopped = self.core.state.runtime.leasing_stopped.clone();
        let shutdown = self.core.shutdown.clone();
        let mut pending: FuturesUnordered<Answers> = FuturesUnordered::new();
        let mut queued = Queued::default();
        queued.add(first);
        let mut leasing: Option<Leasing> = None;
        let mut reading = true;
        loop {
            if leasing.is_none() && self.credits > 0 && !stopped.is_cancelled() && reading {
                leasing = Some(self.lease());
            }
            if pending.len() < RECORDING && !queued.list.is_empty() {
                let batch = queued.take();
                pending.push(record(&self.core, &self.caller.caller, batch));
            }
            if !reading && pending.is_empty() {
                // The worker closed its side and every outcome it sent is answered.
                return;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = self.send(Err(Status::unavailable(
                        "the server is stopping: jobs this stream holds stay leased to the worker \
                         until their leases lapse; report them with the unary calls, here or on \
                         another replica",
                    ))).await;
                    return;
                }
                Some(answers) = pending.next() => {
                    let mut results = answers;
                    // Whatever else is already recorded goes in the same reply.
                    while let Some(Some(more)) = pending.next().now_or_never() {
                        results.extend(more);
                    }
                    if !self.send(Ok(pb::LeaseResponse { jobs: Vec::new(), results })).await {
                        return;
                    }
                }
                granted = async { leasing.as_mut().expect("guarded").await }, if leasing.is_some() => {
                    leasing = None;
                    match granted {
                        Ok(jobs) if jobs.is_empty() => {}
                        Ok(jobs) => {
                            let n = u32::try_from(jobs.len()).unwrap_or(u32::MAX);
                            self.credits = self.credits.saturating_sub(n);
                            let jobs = jobs.into_iter().map(leased).collect();
                            if !self.send(Ok(pb::LeaseResponse { jobs, results: Vec::new() })).await {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = self.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                msg = self.inbound.message(), if reading && queued.bytes < MAX_QUEUED_BYTES => match msg {
                    Ok(Some(m)) => {
                        if let Err(status) = self.take(m, &mut queued) {
                            let _ = self.send(Err(status)).await;
                            return;
                        }
                    }
                    Ok(None) => reading = false,
                    // The worker's side broke: nothing can be answered any more.
                    Err(_) => return,
                },
            }
        }
    }

    /// One message after the open: charged to the caller's rate limits, its credits
    /// granted and its outcomes set recording.
    fn take(&mut self, m: pb::LeaseRequest, queued: &mut Queued) -> Result<(), Status> {
        if m.open.is_some() {
            return Err(Status::invalid_argument(
                "open: only the first message of a Lease stream opens it",
            ));
        }
        self.caller.charge(&self.core.state)?;
        if m.drain {
            self.credits = 0;
            self.draining.cancel();
        } else if !self.draining.is_cancelled() {
            self.grant(m.credits)?;
        }
        queued.add(m.outcomes);
        Ok(())
    }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    type LeaseStream = Replies;

    async fn lease(
        &self,
        request: Request<Streaming<pb::LeaseRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let core = self.0.clone();
        let caller = core.open_stream(request.metadata()).await?;
        let slot = core.streams.take(caller.caller.scope())?;
        let mut inbound = request.into_inner();
        // Waiting for the open message is bounded by the call's deadline (tonic's timeout).
        let first = inbound.message().await?.unwrap_or_default();
        let Some(open) = first.open else {
            return Err(Status::invalid_argument(
                "open: the first message of a Lease stream must open it (queue, worker)",
            ));
        };
        let (queue, req) = lease_in(open)?;
        if core.state.runtime.catalog.serves(&queue) {
            return Err(ApiError::QueueServedHere(queue).into());
        }
        let (tx, rx) = mpsc::channel(REPLIES);
        let mut stream = LeaseStream {
            core,
            caller,
            queue,
            req,
            inbound,
            tx,
            credits: 0,
            draining: CancellationToken::new(),
        };
        if !first.drain {
            stream.grant(first.credits)?;
        }
        tokio::spawn(async move {
            let _slot = slot;
            stream.run(first.outcomes).await;
        });
        let replies = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|reply| (reply, rx))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let (id, req) = heartbeat_in(&m.id, m.token, m.lease)?;
                let beat = service::heartbeat(&self.0.state, &caller, id, req).await?;
                Ok(pb::HeartbeatResponse {
                    expires_at: beat.expires_at.map(keel_proto::convert::timestamp),
                    cancel_requested: beat.cancel_requested,
                })
            })
            .await
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let item = complete_in(&m.id, m.token, m.result)?;
                let id = item.id;
                let state = &self.0.state;
                service::one(service::complete(state, &caller, vec![item]).await)?;
                let job = service::fresh_visible_job(state, &caller, id).await?;
                Ok(JobOut::from(job).into())
            })
            .await
    }

    async fn fail(&self, request: Request<pb::FailRequest>) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let item = fail_in(&m.id, m.token, m.error, m.permanent, m.retry_in)?;
                let job = service::one(service::fail(&self.0.state, &caller, vec![item]).await)?;
                Ok(JobOut::from(job).into())
            })
            .await
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let (id, token) = release_in(&m.id, m.token)?;
                let job = service::release(&self.0.state, &caller, id, token).await?;
                Ok(JobOut::from(job).into())
            })
            .await
    }
}
