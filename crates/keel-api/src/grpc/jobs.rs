//! `keel.v1.JobService`: a thin adapter over the same service layer as `/v1/jobs`. Each
//! call resolves its caller, converts its message, calls the business step and renders the
//! answer; nothing here decides anything HTTP does not.

use std::future::Future;
use std::time::Duration;

use keel_core::store::StoredResponse;
use keel_resilience::{RequestScope, Step};
use keel_wire::{BatchOut, JobOut};
use prost::Message;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::convert::{self, Problems};
use super::pb;
use super::pb::job_service_server::JobService;
use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::extract::parse_idempotency_key_text;
use crate::job_in;
use crate::rate_limit;
use crate::routes::jobs::{job_context, list_params, render_batch, render_job};
use crate::routes::process::DEADLINE_MARGIN;
use crate::service::jobs::{self as service, InsertRequest, Inserted, insert_jobs, visible_job};
use crate::state::ApiState;

/// The idempotency fingerprint's route for each RPC: a key is never shared across calls or
/// with the HTTP routes.
const ENQUEUE_ROUTE: &str = "grpc:/keel.v1.JobService/Enqueue";
const ENQUEUE_BATCH_ROUTE: &str = "grpc:/keel.v1.JobService/EnqueueBatch";
const PROCESS_ROUTE: &str = "grpc:/keel.v1.JobService/Process";

/// A request without its job.
fn job_required() -> Status {
    ApiError::Validation(vec![keel_core::FieldError {
        field: "job".to_owned(),
        message: "is required".to_owned(),
    }])
    .into()
}

/// What a call does, for admission: whether the backlog cap applies, and whether its
/// latency says anything about the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Reads and moves jobs.
    Read,
    /// Creates jobs: refused while the backlog is full.
    Enqueue,
    /// Creates a job and waits for it on purpose: refused while the backlog is full, and
    /// never a latency sample.
    Wait,
}

/// The `keel.v1.JobService` implementation.
#[derive(Clone)]
pub(crate) struct Jobs {
    pub(crate) state: ApiState,
}

/// The `grpc-timeout` a client sent (at most 8 digits and a unit: H, M, S, m, u, n), if
/// any and well formed; a malformed one is ignored, as tonic ignores it.
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Jobs {
    /// When a call must be answered: its `grpc-timeout` or the API's request deadline,
    /// whichever is sooner, less a margin (a twentieth, at most 10 ms) so that the
    /// server's DEADLINE_EXCEEDED, which names the step, reaches the client before the
    /// client's own deadline, and before tonic's timeout (which answers CANCELLED).
    fn deadline(&self, metadata: &MetadataMap) -> Instant {
        let limit = self.state.config.request_timeout;
        let budget = grpc_timeout(metadata).map_or(limit, |asked| asked.min(limit));
        let margin = (budget / 20).min(Duration::from_millis(10));
        Instant::now() + budget.saturating_sub(margin)
    }

    /// Runs `call` as HTTP's layers run a request: admitted first (shed with UNAVAILABLE,
    /// or on a full backlog when it creates jobs, before anything is spent on it), then in a
    /// request scope ending at `at`. Out of time, the call is dropped and answered
    /// DEADLINE_EXCEEDED naming the step it was in (auth, the store, …), counted in
    /// `keel_requests_deadline_exceeded_total`. A call that failed on the server's side
    /// frees its admission slot without teaching the limit its latency, as over HTTP.
    async fn within<T>(
        &self,
        at: Instant,
        kind: Kind,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let admitted = self
            .state
            .admission
            .try_admit(kind != Kind::Read)
            .await
            .map_err(|reason| Status::from(ApiError::Overloaded { reason }))?;
        let scope = RequestScope::new(at);
        let seen = scope.clone();
        match tokio::time::timeout_at(at, scope.run(call)).await {
            Ok(answer) => {
                let server_side = answer.as_ref().err().is_some_and(|s| {
                    matches!(
                        s.code(),
                        Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
                    )
                });
                if !server_side && kind != Kind::Wait {
                    admitted.success();
                }
                answer
            }
            Err(_) => {
                let step = seen.step();
                metrics::counter!("keel_requests_deadline_exceeded_total", "step" => step.as_str())
                    .increment(1);
                Err(ApiError::DeadlineExceeded {
                    job_id: None,
                    step: Some(step),
                }
                .into())
            }
        }
    }

    /// One call, the way every JobService method runs: admitted, under its deadline, with
    /// its caller resolved and charged; then `step` with the caller, the metadata, the
    /// message and the deadline, whose value is the reply.
    async fn serve<M, T, Fut>(
        &self,
        request: Request<M>,
        kind: Kind,
        step: impl FnOnce(Caller, MetadataMap, M, Instant) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let at = self.deadline(request.metadata());
        self.within(at, kind, async move {
            let caller = self.caller(request.metadata()).await?;
            let (metadata, _, message) = request.into_parts();
            step(caller, metadata, message, at).await.map(Response::new)
        })
        .await
    }

    /// The caller of a request, from its `authorization` metadata, charged one token of its
    /// rate limits (RESOURCE_EXHAUSTED with RetryInfo when spent).
    async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        RequestScope::enter_current(Step::Auth);
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        let (caller, key) = auth::resolve_caller(&self.state, token).await?;
        rate_limit::charge(&self.state, caller.scope(), key.as_ref())?;
        RequestScope::enter_current(Step::Validate);
        Ok(caller)
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

#[tonic::async_trait]
impl JobService for Jobs {
    async fn enqueue(
        &self,
        request: Request<pb::EnqueueRequest>,
    ) -> Result<Response<pb::EnqueueResponse>, Status> {
        self.serve(
            request,
            Kind::Enqueue,
            |caller, metadata, message, _| async move {
                let key = idempotency_key(&metadata)?;
                let fingerprinted = message.encode_to_vec();
                let Some(spec) = message.job else {
                    return Err(job_required());
                };
                let mut problems = Problems::new(String::new());
                let body = convert::job_body(spec, &mut problems);
                let job = convert::checked(
                    job_in::parse_single(&body, &job_context(&self.state, &caller)),
                    problems.list,
                )?;
                let asked = job.id;
                let req = InsertRequest {
                    route: ENQUEUE_ROUTE,
                    tenant: job.tenant.clone(),
                    key,
                    body: &fingerprinted,
                    jobs: vec![job],
                    render: render_job,
                };
                let (job, unique_conflict, replayed) = match insert_jobs(&self.state, req).await? {
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
        self.serve(
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
                    job_in::parse_batch(body.as_bytes(), &job_context(&self.state, &caller)),
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
                let (jobs, replayed) = match insert_jobs(&self.state, req).await? {
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
        self.serve(
            request,
            Kind::Wait,
            |caller, metadata, message, at| async move {
                let key = idempotency_key(&metadata)?;
                let fingerprinted = message.encode_to_vec();
                let Some(spec) = message.job else {
                    return Err(job_required());
                };
                let mut problems = Problems::new(String::new());
                let body = convert::job_body(spec, &mut problems);
                let job = convert::checked(
                    job_in::parse_process(&body, &job_context(&self.state, &caller)),
                    problems.list,
                )?;
                let asked = job.id;
                let req = InsertRequest {
                    route: PROCESS_ROUTE,
                    tenant: job.tenant.clone(),
                    key,
                    body: &fingerprinted,
                    jobs: vec![job],
                    render: render_job,
                };
                // Stop waiting a little before the call's deadline, so that this answer (with
                // the job's id) is the one the client gets.
                let give_up = at.checked_sub(DEADLINE_MARGIN).unwrap_or(at);
                let (job, held) = service::process(&self.state, req, asked, give_up).await?;
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
        self.serve(request, Kind::Read, |caller, _, message, _| async move {
            let id = convert::job_id("id", &message.id)?;
            let job = visible_job(&self.state, &caller, id).await?;
            Ok(JobOut::from(job).into())
        })
        .await
    }

    async fn get_result(
        &self,
        request: Request<pb::GetResultRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        self.serve(request, Kind::Read, |caller, _, message, _| async move {
            let id = convert::job_id("id", &message.id)?;
            let job = service::result(&self.state, &caller, id).await?;
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
        self.serve(request, Kind::Read, |caller, _, message, _| async move {
            let id = convert::job_id("id", &message.id)?;
            let job = service::cancel(&self.state, &caller, id).await?;
            Ok(JobOut::from(job).into())
        })
        .await
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.serve(request, Kind::Read, |caller, _, message, _| async move {
            let id = convert::job_id("id", &message.id)?;
            let job = service::retry(&self.state, &caller, id).await?;
            Ok(JobOut::from(job).into())
        })
        .await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.serve(request, Kind::Read, |caller, _, q, _| async move {
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
                    convert::state_of(n).map_or_else(|| format!("#{n}"), |s| s.as_str().to_owned())
                }),
            );
            put("kind", q.kind);
            put("tenant", q.tenant);
            put("after", q.after);
            put("limit", q.limit.map(|n| n.to_string()));
            let params = list_params(pairs)?;
            let page = service::list(&self.state, &caller, params).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("5000u"), Some(Duration::from_millis(5)));
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
