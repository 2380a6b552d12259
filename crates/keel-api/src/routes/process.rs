//! `POST /v1/process`: enqueue a job and wait for its outcome within the request deadline —
//! the seed's `/process` made useful. When the deadline comes first the answer is a `504`
//! naming the job, which keeps running and can be polled.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use keel_core::{Job, JobId};
use keel_resilience::{RequestScope, Step};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};

use crate::auth::Caller;
use crate::dto::{JobOut, ProcessIn};
use crate::error::{ApiError, Problem};
use crate::extract::{IdempotencyKeyHeader, JsonBody};
use crate::job_in;
use crate::middleware::Deadline;
use crate::routes::jobs::{UNIQUE_CONFLICT, id_in_body, job_context, render_job};
use crate::service::jobs::{InsertRequest, Inserted, insert_jobs};
use crate::state::ApiState;

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
    request_body(content = ProcessIn, content_type = "application/json"),
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
    // Subscribe before inserting: an event published between the insert and the
    // subscription would otherwise be missed.
    let mut events = state.runtime.events.subscribe();
    let req = InsertRequest {
        route: "/v1/process",
        tenant: job.tenant.clone(),
        key,
        body: &body,
        jobs: vec![job],
        render: render_job,
    };
    let mut job: Option<Job> = None;
    // `held`: whether the job waited on is the holder of the request's unique key.
    let (id, held) = match insert_jobs(&state, req).await? {
        Inserted::Created { jobs, .. } => {
            let first = jobs.into_iter().next();
            let id = first.as_ref().map(|j| j.id);
            job = first;
            (id, id.is_some_and(|id| id != asked))
        }
        // The stored answer is `200` exactly when the first request met a holder.
        Inserted::Replayed(response) => (id_in_body(&response.body), response.status == 200),
    };
    let id = id.ok_or_else(|| ApiError::internal("the enqueue response names no job"))?;

    let give_up = deadline
        .0
        .checked_sub(DEADLINE_MARGIN)
        .unwrap_or(deadline.0);
    let timed_out = |step: Step| {
        metrics::counter!("keel_requests_deadline_exceeded_total", "step" => step.as_str())
            .increment(1);
        ApiError::DeadlineExceeded {
            job_id: Some(id),
            step: Some(step),
        }
    };
    let store = &state.store;
    let reread = |id: JobId| async move {
        tokio::time::timeout_at(give_up, store.get(id))
            .await
            .map_err(|_| timed_out(Step::Store))?
            .map_err(ApiError::from)
    };
    let mut job = match job {
        Some(j) => j,
        None => reread(id).await?,
    };
    let every = state.config.process_poll;
    let mut poll = tokio::time::interval_at(Instant::now() + every, every);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events_open = true;
    while !job.state.is_finished() {
        // Re-entered on every turn: a re-read marks the request as in the store.
        RequestScope::enter_current(Step::WaitJob);
        tokio::select! {
            () = tokio::time::sleep_until(give_up) => return Err(timed_out(Step::WaitJob)),
            ev = events.recv(), if events_open => match ev {
                Ok(ev) if ev.id == id && ev.state.is_finished() => job = reread(id).await?,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => job = reread(id).await?,
                Err(RecvError::Closed) => events_open = false,
            },
            _ = poll.tick() => job = reread(id).await?,
        }
    }
    let mut resp = Json(JobOut::from(job)).into_response();
    if held && let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert(UNIQUE_CONFLICT, v);
    }
    Ok(resp)
}
