//! `POST /v1/process`: enqueue a job and wait for its outcome within the request deadline —
//! the seed's `/process` made useful. When the deadline comes first the answer is a `504`
//! naming the job, which keeps running and can be polled.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::{IdempotencyKeyHeader, JsonBody};
use crate::job_in;
use crate::middleware::Deadline;
use crate::routes::jobs::{UNIQUE_CONFLICT, job_context, render_job};
use crate::service::jobs::{self as service, InsertRequest};
use crate::state::ApiState;
use keel_wire::{JobIn, JobOut};

/// How long before the request deadline the handler stops waiting, so that it — not the
/// deadline layer — answers the `504`, with the job id in it.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// Enqueue a job and wait until it finishes.
///
/// Any terminal state answers `200` with the job: `completed` (with `result`), `discarded`
/// (with `errors`) or `cancelled` — the state says what happened, and a `5xx` stays reserved
/// for failures of Keel itself. With `Idempotency-Key`, a retry after a `504` waits for the
/// same job instead of creating another. With `unique`, a job holding the key is waited on
/// instead of creating another, and the answer carries `Keel-Unique-Conflict: <its id>`.
///
/// While waiting, the request is in the `wait_job` step and holds an admission slot (it is
/// work in flight), but its latency is not fed to the adaptive limit: it waits on purpose,
/// and a job's duration says nothing about how loaded the server is.
#[utoipa::path(
    post,
    path = "/v1/process",
    tag = "jobs",
    security(("bearer" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Retrying with the same key waits on the same job"),
        ("Request-Timeout" = Option<u64>, Header, description = "Wait at most this many ms (capped by the server's request timeout)"),
    ),
    request_body(content = JobIn, content_type = "application/json"),
    responses(
        (status = 200, description = "The job reached a terminal state (completed, discarded or cancelled)", body = JobOut,
            headers(("Keel-Unique-Conflict" = Option<String>, description = "Set when the unique key was held: the id of the job waited on instead"))),
        (status = 409, description = "The Idempotency-Key was used with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, all listed (`run_at` and `delay_ms` are refused: the job runs now)", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Deadline passed; `job_id` names the job, which keeps running", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn process_job(
    State(state): State<ApiState>,
    caller: Caller,
    deadline: Deadline,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let job = job_in::parse_process(&body, &job_context(&state, &caller))?;
    let asked = job.id;
    let req = InsertRequest {
        route: "/v1/process",
        tenant: job.tenant.clone(),
        key,
        body: &body,
        jobs: vec![job],
        render: render_job,
    };
    let give_up = deadline
        .0
        .checked_sub(DEADLINE_MARGIN)
        .unwrap_or(deadline.0);
    let (job, held) = service::process(&state, req, asked, give_up).await?;
    let id = job.id;
    let mut resp = Json(JobOut::from(job)).into_response();
    if held && let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert(UNIQUE_CONFLICT, v);
    }
    Ok(resp)
}
