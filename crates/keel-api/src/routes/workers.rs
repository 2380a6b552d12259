//! The worker protocol over HTTP (docs/workers.md): thin adapters that parse the body
//! (`worker_in`), call [`crate::service::workers`] and render the answer.

use axum::Json;
use axum::extract::State;

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::{JobIdPath, JsonBody, QueuePath};
use crate::service::workers as service;
use crate::state::ApiState;
use crate::worker_in;
use keel_wire::{HeartbeatOut, JobOut, LeasedOut, OutcomeOut, OutcomesOut, WorkerOut, WorkersOut};

/// The path of a lease route, known to the layers that treat long polls apart: admission
/// (a waiting lease is not work in progress) and the deadline (which grows by the wait).
pub(crate) fn is_lease_path(path: &str) -> bool {
    path.strip_prefix("/v1/queues/")
        .and_then(|rest| rest.strip_suffix("/lease"))
        .is_some_and(|queue| !queue.is_empty() && !queue.contains('/'))
}

/// Take up to `max` jobs of a queue served by external workers, waiting up to `wait` for
/// one (a long poll, woken by enqueues here and, on Postgres, on other replicas). Each job
/// comes back `running` with its lease token, shown only here.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/lease",
    tag = "workers",
    security(("bearer" = [])),
    params(("queue" = String, Path, description = "Queue name")),
    request_body(content = keel_wire::LeaseBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The jobs now held (empty when the wait ran out or the server is stopping)", body = LeasedOut),
        (status = 400, description = "Malformed body or queue name", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This process serves the queue with built-in workers (KEEL_QUEUES)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn lease_jobs(
    State(state): State<ApiState>,
    caller: Caller,
    QueuePath(queue): QueuePath,
    JsonBody(body): JsonBody,
) -> Result<Json<LeasedOut>, ApiError> {
    let req = worker_in::parse_lease(&body)?;
    let jobs = service::lease(&state, &caller, queue, req).await?;
    Ok(Json(LeasedOut {
        jobs: jobs.into_iter().map(JobOut::leased).collect(),
    }))
}

/// Extend a lease. Once a user cancelled the job, answers `cancel_requested: true`: that is
/// how a cancel reaches a remote worker.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/heartbeat",
    tag = "workers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id (UUID)")),
    request_body(content = keel_wire::HeartbeatBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Lease extended, or the job was cancelled", body = HeartbeatOut),
        (status = 400, description = "Malformed body or job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token is stale; the detail says why", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn heartbeat(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
    JsonBody(body): JsonBody,
) -> Result<Json<HeartbeatOut>, ApiError> {
    let req = worker_in::parse_heartbeat(&body)?;
    let beat = service::heartbeat(&state, &caller, id, req).await?;
    Ok(Json(HeartbeatOut {
        expires_at: beat.expires_at,
        cancel_requested: beat.cancel_requested,
    }))
}

/// Record a leased job as completed, with its result.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/complete",
    tag = "workers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id (UUID)")),
    request_body(content = keel_wire::CompleteBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The job, now completed", body = JobOut),
        (status = 400, description = "Malformed body or job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token is stale; the detail says why", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body or result too large", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn complete_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
    JsonBody(body): JsonBody,
) -> Result<Json<JobOut>, ApiError> {
    let item = worker_in::parse_complete(&body, id)?;
    service::one(service::complete(&state, &caller, vec![item]).await)?;
    let job = service::fresh_visible_job(&state, &caller, id).await?;
    Ok(Json(JobOut::from(job)))
}

/// Record a failed attempt of a leased job: `retryable` while attempts remain (after
/// `retry_in`, or the job's backoff), otherwise, or when `permanent`, `discarded`.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/fail",
    tag = "workers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id (UUID)")),
    request_body(content = keel_wire::FailBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The job, now retryable or discarded", body = JobOut),
        (status = 400, description = "Malformed body or job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token is stale; the detail says why", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn fail_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
    JsonBody(body): JsonBody,
) -> Result<Json<JobOut>, ApiError> {
    let item = worker_in::parse_fail(&body, id)?;
    let job = service::one(service::fail(&state, &caller, vec![item]).await)?;
    Ok(Json(JobOut::from(job)))
}

/// Give a leased job back unrun (a worker stopping): `available` again, the attempt not
/// counted.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/release",
    tag = "workers",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id (UUID)")),
    request_body(content = keel_wire::ReleaseBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The job, available again", body = JobOut),
        (status = 400, description = "Malformed body or job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token is stale; the detail says why", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn release_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
    JsonBody(body): JsonBody,
) -> Result<Json<JobOut>, ApiError> {
    let token = worker_in::parse_release(&body)?;
    let job = service::release(&state, &caller, id, token).await?;
    Ok(Json(JobOut::from(job)))
}

/// Record many completions in one round trip. Each is judged alone; the answer lists them
/// in the order sent.
#[utoipa::path(
    post,
    path = "/v1/jobs/complete",
    tag = "workers",
    security(("bearer" = [])),
    request_body(content = keel_wire::CompleteManyBody, content_type = "application/json"),
    responses(
        (status = 200, description = "One answer per outcome", body = OutcomesOut),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn complete_many(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<OutcomesOut>, ApiError> {
    let items = worker_in::parse_complete_batch(&body)?;
    let ids: Vec<_> = items.iter().map(|i| i.id).collect();
    let answers = service::complete(&state, &caller, items).await;
    Ok(Json(outcomes(ids, answers, |s| s)))
}

/// Record many failed attempts in one round trip. Each is judged alone; the answer lists
/// them in the order sent.
#[utoipa::path(
    post,
    path = "/v1/jobs/fail",
    tag = "workers",
    security(("bearer" = [])),
    request_body(content = keel_wire::FailManyBody, content_type = "application/json"),
    responses(
        (status = 200, description = "One answer per outcome", body = OutcomesOut),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn fail_many(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<OutcomesOut>, ApiError> {
    let items = worker_in::parse_fail_batch(&body)?;
    let ids: Vec<_> = items.iter().map(|i| i.id).collect();
    let answers = service::fail(&state, &caller, items).await;
    Ok(Json(outcomes(ids, answers, |job| job.state)))
}

/// External workers this process heard from in the last 5 minutes: a tenant key sees its
/// own, an operator key every tenant's.
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "workers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Workers by tenant and id", body = WorkersOut),
    )
)]
pub(crate) async fn list_workers(
    State(state): State<ApiState>,
    caller: Caller,
) -> Json<WorkersOut> {
    Json(WorkersOut {
        workers: service::workers(&state, &caller)
            .into_iter()
            .map(|w| WorkerOut {
                id: w.id.into(),
                tenant: w.tenant.into(),
                queues: w.queues.into_iter().map(String::from).collect(),
                last_seen: w.last_seen,
                jobs_held: w.jobs_held,
            })
            .collect(),
    })
}

fn outcomes<T>(
    ids: Vec<keel_core::JobId>,
    answers: Vec<Result<T, ApiError>>,
    state_of: impl Fn(T) -> keel_core::JobState,
) -> OutcomesOut {
    OutcomesOut {
        results: ids
            .into_iter()
            .zip(answers)
            .map(|(id, answer)| match answer {
                Ok(done) => OutcomeOut {
                    id,
                    status: 200,
                    state: Some(state_of(done)),
                    problem: None,
                },
                Err(e) => {
                    let problem = e.problem();
                    if problem.status >= 500 {
                        tracing::warn!(job_id = %id, error = %e, "an outcome could not be recorded");
                    }
                    OutcomeOut {
                        id,
                        status: problem.status,
                        state: None,
                        problem: Some(problem),
                    }
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::is_lease_path;

    #[test]
    fn lease_paths_are_recognised_exactly() {
        assert!(is_lease_path("/v1/queues/mail/lease"));
        for not in [
            "/v1/queues//lease",
            "/v1/queues/a/b/lease",
            "/v1/queues/mail/pause",
            "/v1/queues/mail/lease/x",
            "/v1/jobs/lease",
        ] {
            assert!(!is_lease_path(not), "{not}");
        }
    }
}
