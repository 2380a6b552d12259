//! `/v1/queues…`: statistics, pause and resume.

use axum::Json;
use axum::extract::State;

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::QueuePath;
use crate::service::queues as service;
use crate::state::ApiState;
use keel_wire::{QueueOut, QueuePausedOut};

/// Queues with job counts by state. An operator (or anyone, without authentication) sees
/// every queue that has jobs or was ever paused or resumed; a tenant key sees the queues
/// that hold its jobs, counting only its own.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Queues sorted by name", body = Vec<QueueOut>),
        (status = 503, description = "Database temporarily unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_queues(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<QueueOut>>, ApiError> {
    let stats = service::stats(&state, &caller).await?;
    Ok(Json(stats.into_iter().map(QueueOut::from).collect()))
}

/// One queue with its job counts by state, without counting the others. A tenant key
/// counts only its own jobs. Any valid queue name answers: a queue nobody has used has zero
/// counts.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}",
    tag = "queues",
    security(("bearer" = [])),
    params(("queue" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "The queue", body = QueueOut),
        (status = 400, description = "Invalid queue name", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database temporarily unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_queue(
    State(state): State<ApiState>,
    caller: Caller,
    QueuePath(queue): QueuePath,
) -> Result<Json<QueueOut>, ApiError> {
    let stats = service::stats_of(&state, &caller, &queue).await?;
    Ok(Json(QueueOut::from(stats)))
}

/// Stamps out the pause and the resume route: one annotated handler each, because utoipa
/// documents an operation per function, around one body that differs only in `paused`.
macro_rules! set_paused_route {
    ($(#[doc = $doc:literal])* $handler:ident, $path:literal, $done:literal, $paused:literal) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            post,
            path = $path,
            tag = "queues",
            security(("bearer" = [])),
            params(("queue" = String, Path, description = "Queue name")),
            responses(
                (status = 200, description = $done, body = QueuePausedOut),
                (status = 400, description = "Invalid queue name", body = Problem, content_type = "application/problem+json"),
                (status = 403, description = "A tenant key: queues are shared, only an operator key may pause or resume them", body = Problem, content_type = "application/problem+json"),
            )
        )]
        pub(crate) async fn $handler(
            State(state): State<ApiState>,
            caller: Caller,
            QueuePath(queue): QueuePath,
        ) -> Result<Json<QueuePausedOut>, ApiError> {
            service::set_paused(&state, &caller, &queue, $paused).await?;
            Ok(Json(QueuePausedOut {
                queue,
                paused: $paused,
            }))
        }
    };
}

set_paused_route!(
    /// Stop leasing from a queue. Jobs can still be enqueued into it; running jobs finish.
    /// A queue serves every tenant, so this needs an operator key (`403` for a tenant key).
    pause_queue,
    "/v1/queues/{queue}/pause",
    "Paused",
    true
);

set_paused_route!(
    /// Resume leasing from a queue, and wake its dispatcher so waiting jobs start at once.
    /// Needs an operator key, as pausing does.
    resume_queue,
    "/v1/queues/{queue}/resume",
    "Resumed",
    false
);
