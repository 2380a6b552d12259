//! `keel.v1.JobService`: a thin adapter over the same service layer as `/v1/jobs`. Each
//! call resolves its caller, converts its message, calls the business step and renders the
//! answer; nothing here decides anything HTTP does not.

use std::pin::Pin;

use futures_util::Stream;
use keel_core::store::StoredResponse;
use keel_core::{JobId, NewJob, QueueName};
use keel_wire::{BatchOut, JobOut};
use prost::Message;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::call::{Core, Kind};
use super::convert::{self, Problems};
use super::pb;
use super::pb::job_service_server::JobService;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::parse_idempotency_key_text;
use crate::job_in::{self, JobContext};
use crate::routes::jobs::{job_context, list_params, render_batch, render_job};
use crate::routes::process::DEADLINE_MARGIN;
use crate::service::jobs::{self as service, InsertRequest, Inserted, insert_jobs, visible_job};
use crate::service::watch::{Change, JobWatch, WatchEnd, watch_queue};

/// The idempotency fingerprint's route for each RPC: a key is never shared across calls or
/// with the HTTP routes.
const ENQUEUE_ROUTE: &str = "grpc:/keel.v1.JobService/Enqueue";
const ENQUEUE_BATCH_ROUTE: &str = "grpc:/keel.v1.JobService/EnqueueBatch";
const PROCESS_ROUTE: &str = "grpc:/keel.v1.JobService/Process";

/// Changes queued for a watcher that is not reading; past them the watch waits (a job
/// watch) or falls behind (a queue watch).
const WATCH_BUFFER: usize = 64;

/// A request without its job.
fn job_required() -> Status {
    ApiError::Validation(vec![keel_core::FieldError {
        field: "job".to_owned(),
        message: "is required".to_owned(),
    }])
    .into()
}

/// The `keel.v1.JobService` implementation.
#[derive(Clone)]
pub(crate) struct Jobs(pub(crate) Core);

/// How the body of one job is parsed: `POST /v1/jobs`'s or `POST /v1/process`'s.
type ParseOne = fn(&[u8], &JobContext<'_>) -> Result<NewJob, ApiError>;

impl Jobs {
    /// The insert of a one-job call (Enqueue, Process): its idempotency key from the
    /// metadata, its job checked by `parse` as HTTP checks the body, fingerprinted by the
    /// message's bytes under `route`; and the id of the job asked for.
    fn single<'a>(
        &self,
        caller: &Caller,
        metadata: &MetadataMap,
        spec: Option<pb::JobSpec>,
        fingerprinted: &'a [u8],
        route: &'static str,
        parse: ParseOne,
    ) -> Result<(InsertRequest<'a>, JobId), Status> {
        let key = idempotency_key(metadata)?;
        let spec = spec.ok_or_else(job_required)?;
        let mut problems = Problems::new(String::new());
        let body = convert::job_body(spec, &mut problems);
        let job = convert::checked(
            parse(&body, &job_context(&self.0.state, caller)),
            problems.list,
        )?;
        let asked = job.id;
        Ok((
            InsertRequest {
                route,
                tenant: job.tenant.clone(),
                key,
                body: fingerprinted,
                jobs: vec![job],
                render: render_job,
            },
            asked,
        ))
    }
}

/// The `idempotency-key` metadata, if sent.
fn idempotency_key(metadata: &MetadataMap) -> Result<Option<keel_core::IdempotencyKey>, Status> {
    let Some(v) = metadata.get("idempotency-key") else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| {
        ApiError::BadRequest(
            "invalid idempotency-key: may contain only visible ASCII characters".to_owned(),
        )
    })?;
    Ok(Some(parse_idempotency_key_text(text)?))
}

/// A replayed enqueue answer (the HTTP rendering, which the idempotency record keeps) as
/// the value it renders; a stored failure is an internal error. Fresh answers are built
/// from the stored jobs directly, not read back from their rendering.
fn stored<T: serde::de::DeserializeOwned>(r: &StoredResponse) -> Result<T, Status> {
    if !(200..300).contains(&r.status) {
        return Err(ApiError::internal("the stored enqueue answer is a failure").into());
    }
    serde_json::from_slice(&r.body)
        .map_err(|e| ApiError::internal(format!("reading a stored enqueue answer: {e}")).into())
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// A change as a watch event.
fn event(c: Change) -> pb::WatchEvent {
    pb::WatchEvent {
        id: c.id.to_string(),
        queue: c.queue.into(),
        state: convert::state(c.state).into(),
        attempt: c.attempt,
        job: c.job.map(|j| JobOut::from(j).into()),
    }
}

#[tonic::async_trait]
impl JobService for Jobs {
    type WatchStream = Events;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Events>, Status> {
        use pb::watch_request::Target;
        let core = self.0.clone();
        let caller = core.open_stream(request.metadata()).await?.caller;
        let slot = core.streams.take(caller.scope())?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let stop = core.shutdown.clone();
        let state = core.state.clone();
        let running = match request.into_inner().target {
            Some(Target::Id(id)) => {
                let id = convert::job_id("id", &id)?;
                let watch = JobWatch::start(&state, &caller, id).await?;
                tokio::spawn(async move {
                    let _slot = slot;
                    watch.run(tx, stop).await
                })
            }
            Some(Target::Queue(queue)) => {
                let queue = QueueName::parse(queue).map_err(|e| {
                    ApiError::Validation(vec![keel_core::FieldError {
                        field: "queue".to_owned(),
                        message: e.reason,
                    }])
                })?;
                tokio::spawn(async move {
                    let _slot = slot;
                    watch_queue(&state, &caller, queue, tx, stop).await
                })
            }
            None => {
                return Err(ApiError::Validation(vec![keel_core::FieldError {
                    field: "target".to_owned(),
                    message: "is required: id or queue".to_owned(),
                }])
                .into());
            }
        };
        let shutdown = core.shutdown.clone();
        // The changes, then how the watch ended: OK, or UNAVAILABLE (stopping), or
        // ABORTED (fell behind). The channel closes only once the watch has returned.
        let events = futures_util::stream::unfold((rx, Some(running)), move |(mut rx, running)| {
            let shutdown = shutdown.clone();
            async move {
                if let Some(c) = rx.recv().await {
                    return Some((Ok(event(c)), (rx, running)));
                }
                let end = running?.await.unwrap_or(WatchEnd::Stopped);
                let status = match end {
                    WatchEnd::Lagged(n) => Status::aborted(format!(
                        "the watcher fell behind: {n} changes were dropped; watch again"
                    )),
                    WatchEnd::Stopped if shutdown.is_cancelled() => {
                        Status::unavailable("the server is stopping; watch again elsewhere")
                    }
                    WatchEnd::Stopped | WatchEnd::Finished => return None,
                };
                Some((Err(status), (rx, None)))
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn enqueue(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        self.0
            .serve(
                request,
                Kind::Enqueue,
                |caller, metadata, message, _| async move {
                    let fingerprinted = message.encode_to_vec();
                    let (req, asked) = self.single(
                        &caller,
                        &metadata,
                        message.job,
                        &fingerprinted,
                        ENQUEUE_ROUTE,
                        job_in::parse_single,
                    )?;
                    let (job, unique_conflict, replayed) =
                        match insert_jobs(&self.0.state, req).await? {
                            Inserted::Created { jobs, .. } => {
                                let job = jobs.into_iter().next().ok_or_else(|| {
                                    Status::from(ApiError::internal("the insert returned no job"))
                                })?;
                                // The holder of the key stands in for the job asked for.
                                let held = job.id != asked;
                                (JobOut::from(job), held, false)
                            }
                            // A single enqueue answers 200 exactly when it met the holder of its key.
                            Inserted::Replayed(r) => (stored(&r)?, r.status == 200, true),
                        };
                    Ok(pb::EnqueueResponse {
                        job: Some(job.into()),
                        unique_conflict,
                        replayed,
                    })
                },
            )
            .await
    }

    async fn enqueue_batch(
        &self,
        request: Request<pb::EnqueueBatchRequest>,
    ) -> Result<Response<pb::EnqueueBatchResponse>, Status> {
        self.0
            .serve(
                request,
                Kind::Enqueue,
                |caller, metadata, message, _| async move {
                    let key = idempotency_key(&metadata)?;
                    let fingerprinted = message.encode_to_vec();
                    let mut problems = Vec::new();
                    let mut jobs = Vec::with_capacity(message.jobs.len());
                    for (i, spec) in message.jobs.into_iter().enumerate() {
                        let mut p = Problems::new(format!("jobs[{i}]."));
                        let body = convert::job_body(spec, &mut p);
                        problems.extend(p.list);
                        // Each is valid JSON of one job: spliced into the batch body as is.
                        jobs.push(String::from_utf8(body).unwrap_or_default());
                    }
                    let body = format!("{{\"jobs\":[{}]}}", jobs.join(","));
                    let jobs = convert::checked(
                        job_in::parse_batch(body.as_bytes(), &job_context(&self.0.state, &caller)),
                        problems,
                    )?;
                    // Without auth a batch may mix tenants; its key then belongs to the first job's.
                    let tenant = match jobs.first() {
                        Some(j) => j.tenant.clone(),
                        None => caller.tenant_for(None)?,
                    };
                    let req = InsertRequest {
                        route: ENQUEUE_BATCH_ROUTE,
                        tenant,
                        key,
                        body: &fingerprinted,
                        jobs,
                        render: render_batch,
                    };
                    let (jobs, replayed) = match insert_jobs(&self.0.state, req).await? {
                        Inserted::Created { jobs, .. } => {
                            (jobs.into_iter().map(JobOut::from).collect(), false)
                        }
                        Inserted::Replayed(r) => (stored::<BatchOut>(&r)?.jobs, true),
                    };
                    Ok(pb::EnqueueBatchResponse {
                        jobs: jobs.into_iter().map(pb::Job::from).collect(),
                        replayed,
                    })
                },
            )
            .await
    }

    async fn process(
        &self,
        request: Request<pb::ProcessRequest>,
    ) -> Result<Response<pb::ProcessResponse>, Status> {
        self.0
            .serve(
                request,
                Kind::Wait,
                |caller, metadata, message, at| async move {
                    let fingerprinted = message.encode_to_vec();
                    let (req, asked) = self.single(
                        &caller,
                        &metadata,
                        message.job,
                        &fingerprinted,
                        PROCESS_ROUTE,
                        job_in::parse_process,
                    )?;
                    // Stop waiting a little before the call's deadline, so that this answer (with
                    // the job's id) is the one the client gets.
                    let give_up = at.checked_sub(DEADLINE_MARGIN).unwrap_or(at);
                    let (job, held) = service::process(&self.0.state, req, asked, give_up).await?;
                    Ok(pb::ProcessResponse {
                        job: Some(JobOut::from(job).into()),
                        unique_conflict: held,
                    })
                },
            )
            .await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, message, _| async move {
                let id = convert::job_id("id", &message.id)?;
                let job = visible_job(&self.0.state, &caller, id).await?;
                Ok(JobOut::from(job).into())
            })
            .await
    }

    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, message, _| async move {
                let id = convert::job_id("id", &message.id)?;
                let job = service::result(&self.0.state, &caller, id).await?;
                let done = job.state == keel_core::JobState::Completed;
                Ok(pb::JobResult {
                    id: id.to_string(),
                    state: convert::state(job.state).into(),
                    done,
                    result: done.then(|| {
                        job.result
                            .map_or_else(|| "null".to_owned(), |r| r.get().to_owned())
                    }),
                })
            })
            .await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, message, _| async move {
                let id = convert::job_id("id", &message.id)?;
                let job = service::cancel(&self.0.state, &caller, id).await?;
                Ok(JobOut::from(job).into())
            })
            .await
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, message, _| async move {
                let id = convert::job_id("id", &message.id)?;
                let job = service::retry(&self.0.state, &caller, id).await?;
                Ok(JobOut::from(job).into())
            })
            .await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, q, _| async move {
                // The query HTTP would have received: one parser, the same messages.
                let mut pairs: Vec<(String, String)> = Vec::new();
                let mut put = |name: &str, value: Option<String>| {
                    if let Some(v) = value {
                        pairs.push((name.to_owned(), v));
                    }
                };
                put("queue", q.queue);
                put(
                    "state",
                    q.state.map(|n| {
                        convert::state_of(n)
                            .map_or_else(|| format!("#{n}"), |s| s.as_str().to_owned())
                    }),
                );
                put("kind", q.kind);
                put("tenant", q.tenant);
                put("after", q.after);
                put("limit", q.limit.map(|n| n.to_string()));
                let params = list_params(pairs)?;
                let page = service::list(&self.0.state, &caller, params).await?;
                Ok(pb::ListJobsResponse {
                    jobs: page
                        .jobs
                        .into_iter()
                        .map(|j| JobOut::from(j).into())
                        .collect(),
                    next: page.next.map(|id| id.to_string()),
                })
            })
            .await
    }
}
