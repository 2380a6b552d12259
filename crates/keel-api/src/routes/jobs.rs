//! `/v1/jobs…`: enqueue (single and batch, idempotent, unique), read (through the job
//! cache), result, cancel, retry, list.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use keel_core::store::{ListParams, StoredResponse};
use keel_core::{Job, JobId, JobKind, JobState, QueueName, TenantId};

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::{IdempotencyKeyHeader, JobIdPath, JsonBody, parse_limit, parse_query_fields};
use crate::job_in::{self, JobContext};
use crate::service::jobs::{
    self as service, InsertRequest, Inserted, id_in_body, insert_jobs, visible_job,
};
use crate::state::ApiState;
use crate::wire_in::fields_of;
use keel_wire::{BatchIn, BatchOut, JobIn, JobListQuery, JobOut, JobPageOut, JobResultOut};

/// Set on a response replayed from an idempotency record (G3).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Set when `POST /v1/jobs` (or `/v1/process`) found its unique key held: the id of the job
/// that holds it, which is the job the answer shows (`200` instead of `201`).
pub const UNIQUE_CONFLICT: HeaderName = HeaderName::from_static("keel-unique-conflict");

/// Default page size of `GET /v1/jobs`.
pub const DEFAULT_LIST_LIMIT: u32 = 100;

/// The context `job_in` parses a body in.
pub(crate) fn job_context<'a>(state: &'a ApiState, caller: &'a Caller) -> JobContext<'a> {
    JobContext {
        caller,
        catalog: &state.runtime.catalog,
        max_args_bytes: state.config.max_args_bytes,
        now: Utc::now(),
    }
}

/// A `201` with the JSON of `value`, as stored for replays.
fn created(value: &impl serde::Serialize) -> StoredResponse {
    json_response(StatusCode::CREATED, value)
}

/// `status` with the JSON of `value`, as stored for replays.
fn json_response(status: StatusCode, value: &impl serde::Serialize) -> StoredResponse {
    match serde_json::to_vec(value) {
        Ok(body) => StoredResponse {
            status: status.as_u16(),
            body,
        },
        // Cannot happen for these DTOs; answer (and store) a 500 rather than panic.
        Err(_) => internal_stored_response(),
    }
}

fn internal_stored_response() -> StoredResponse {
    let p = ApiError::internal("could not render the enqueue response").problem();
    StoredResponse {
        status: p.status,
        body: p.to_body(),
    }
}

/// Renders `POST /v1/jobs`: the one job, `201` if it was created, `200` if it is the
/// holder of the unique key the request asked for (the holder's id differs).
pub(crate) fn render_job(jobs: &[Job], requested: &[JobId]) -> StoredResponse {
    match jobs.first() {
        Some(job) if requested.first() == Some(&job.id) => created(&JobOut::from(job.clone())),
        Some(job) => json_response(StatusCode::OK, &JobOut::from(job.clone())),
        None => internal_stored_response(),
    }
}

/// Renders `POST /v1/jobs/batch`: every job, in order (holders of unique keys in place of
/// the jobs they kept out).
pub(crate) fn render_batch(jobs: &[Job], _requested: &[JobId]) -> StoredResponse {
    created(&BatchOut {
        jobs: jobs.iter().cloned().map(JobOut::from).collect(),
    })
}

/// The HTTP response for a stored response: its status and body byte for byte, marked
/// `Idempotent-Replayed: true` when it is a replay.
pub(crate) fn stored_response(
    r: StoredResponse,
    replayed: bool,
    location: Option<JobId>,
) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // A single-job enqueue answers `200` only with a unique key's holder, so the header can
    // be rebuilt from a replayed response too (only status and body are stored).
    let unique_conflict = location.filter(|_| status == StatusCode::OK);
    let json = status.is_success();
    let mut resp = (status, Body::from(r.body)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if json {
            "application/json"
        } else {
            crate::error::PROBLEM_JSON
        }),
    );
    if replayed {
        h.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    if let Some(id) = location.filter(|_| json)
        && let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{id}"))
    {
        h.insert(header::LOCATION, v);
    }
    if let Some(id) = unique_conflict
        && let Ok(v) = HeaderValue::from_str(&id.to_string())
    {
        h.insert(UNIQUE_CONFLICT, v);
    }
    resp
}

/// Enqueue one job.
///
/// With `Idempotency-Key`, a retry of the same request (same key, tenant, route and body)
/// returns the original response byte for byte, with its original status (as Stripe
/// replays it: `201`, even though the job may have moved on since) and
/// `Idempotent-Replayed: true`, and creates nothing; the same key with a different request
/// is a `409`.
///
/// With `unique`, a job of the tenant that holds the key (per its scope) is answered
/// instead, with `200` and `Keel-Unique-Conflict: <its id>`, and nothing is created.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "1-255 visible ASCII characters; makes the enqueue idempotent for 24 h")),
    request_body(content = JobIn, content_type = "application/json"),
    responses(
        (status = 201, description = "Created, or the original 201 replayed byte for byte (with `Idempotent-Replayed: true`)", body = JobOut,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 200, description = "Not created: another job holds the unique key; this is that job", body = JobOut,
            headers(
                ("Keel-Unique-Conflict" = String, description = "The id of the job holding the key"),
                ("Location" = String, description = "/v1/jobs/{id} of that job"),
            )),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid API key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The body names another tenant than the API key's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency key reused with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database temporarily unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Deadline exceeded", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn enqueue_job(
    State(state): State<ApiState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let job = job_in::parse_single(&body, &job_context(&state, &caller))?;
    let req = InsertRequest {
        route: "/v1/jobs",
        tenant: job.tenant.clone(),
        key,
        body: &body,
        jobs: vec![job],
        render: render_job,
    };
    Ok(match insert_jobs(&state, req).await? {
        Inserted::Created { jobs, response } => {
            stored_response(response, false, jobs.first().map(|j| j.id))
        }
        Inserted::Replayed(response) => {
            let id = id_in_body(&response.body);
            stored_response(response, true, id)
        }
    })
}

/// Enqueue 1 to 1000 jobs atomically (all or none). Honours `Idempotency-Key` like
/// `POST /v1/jobs`. A unique job whose key is held is not created: the holder stands in its
/// place in the answer (a different id).
#[utoipa::path(
    post,
    path = "/v1/jobs/batch",
    tag = "jobs",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the batch idempotent")),
    request_body(content = BatchIn, content_type = "application/json"),
    responses(
        (status = 201, description = "Every job created (or the original response replayed)", body = BatchOut),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "A job names another tenant", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency key reused with a different request", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Every error of every job, e.g. `jobs[3].priority`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn enqueue_batch(
    State(state): State<ApiState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let jobs = job_in::parse_batch(&body, &job_context(&state, &caller))?;
    // Without auth a batch may mix tenants; its key then belongs to the first job's tenant.
    let tenant = match jobs.first() {
        Some(j) => j.tenant.clone(),
        None => caller.tenant_for(None)?,
    };
    let req = InsertRequest {
        route: "/v1/jobs/batch",
        tenant,
        key,
        body: &body,
        jobs,
        render: render_batch,
    };
    Ok(match insert_jobs(&state, req).await? {
        Inserted::Created { response, .. } => stored_response(response, false, None),
        Inserted::Replayed(response) => stored_response(response, true, None),
    })
}

/// One job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobOut),
        (status = 400, description = "Not a job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job (or another tenant's)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobOut>, ApiError> {
    Ok(Json(visible_job(&state, &caller, id).await?.into()))
}

/// A job's result: `200` once completed; `202` with `Retry-After` while it is still on its
/// way; `409` if it was discarded or cancelled (the problem names the state and, for a
/// discarded job, its last error).
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "Job id")),
    responses(
        (status = 200, description = "Completed: the result", body = JobResultOut),
        (status = 202, description = "Not finished yet; poll again", body = JobResultOut,
            headers(("Retry-After" = u32, description = "Seconds until it is worth asking again"))),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Discarded or cancelled: there is no result", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_job_result(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Response, ApiError> {
    let job = service::result(&state, &caller, id).await?;
    Ok(if job.state == JobState::Completed {
        let result = job
            .result
            .or_else(|| serde_json::value::RawValue::from_string("null".to_owned()).ok());
        Json(JobResultOut {
            id,
            state: job.state,
            result,
        })
        .into_response()
    } else {
        (
            StatusCode::ACCEPTED,
            [(header::RETRY_AFTER, "1")],
            Json(JobResultOut {
                id,
                state: job.state,
                result: None,
            }),
        )
            .into_response()
    })
}

/// Cancel a job that has not finished. A running job's lease is revoked and, if it runs in
/// this process, its worker is told to stop.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = JobOut),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already finished", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn cancel_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobOut>, ApiError> {
    Ok(Json(service::cancel(&state, &caller, id).await?.into()))
}

/// Run a scheduled, retryable or finished job again now.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/retry",
    tag = "jobs",
    security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "Job id")),
    responses(
        (status = 200, description = "Available again", body = JobOut),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Available or running: nothing to retry; or its unique key is held by another job now", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn retry_job(
    State(state): State<ApiState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobOut>, ApiError> {
    Ok(Json(service::retry(&state, &caller, id).await?.into()))
}

/// Parses the query of `GET /v1/jobs`, reporting every bad parameter (as a `400` listing
/// them in `errors`).
pub(crate) fn list_params(pairs: Vec<(String, String)>) -> Result<ListParams, ApiError> {
    let mut p = ListParams {
        limit: DEFAULT_LIST_LIMIT,
        ..ListParams::default()
    };
    parse_query_fields(
        pairs,
        fields_of::<JobListQuery>(),
        |field, value| match field {
            "queue" => QueueName::parse(value)
                .map(|q| p.queue = Some(q))
                .map_err(|e| e.reason),
            "state" => value
                .parse::<JobState>()
                .map(|s| p.state = Some(s))
                .map_err(|e| e.reason),
            "kind" => JobKind::parse(value)
                .map(|k| p.kind = Some(k))
                .map_err(|e| e.reason),
            "tenant" => TenantId::parse(value)
                .map(|t| p.tenant = Some(t))
                .map_err(|e| e.reason),
            "after" => JobId::parse(&value)
                .map(|id| p.after = Some(id))
                .map_err(|e| e.reason),
            // "limit", the only name left.
            _ => parse_limit(&value).map(|n| p.limit = n),
        },
    )?;
    Ok(p)
}

/// List jobs, oldest first, with keyset pagination: pass the previous page's `next` as
/// `after`. Every invalid parameter is reported at once in a `400`.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    security(("bearer" = [])),
    params(
        JobListQuery,
    ),
    responses(
        (status = 200, description = "A page of jobs", body = JobPageOut),
        (status = 400, description = "Invalid parameters, all listed in `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`tenant` names another tenant than the API key's", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_jobs(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<JobPageOut>, ApiError> {
    let Query(pairs) = query?;
    let params = list_params(pairs)?;
    Ok(Json(service::list(&state, &caller, params).await?.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::query_pairs as pairs;

    #[test]
    fn list_params_report_every_bad_one() {
        let e = list_params(pairs(&[
            ("state", "done"),
            ("limit", "0"),
            ("after", "x"),
            ("page", "2"),
            ("queue", "ok"),
        ]))
        .unwrap_err();
        let ApiError::InvalidQuery(errors) = e else {
            panic!("{e:?}")
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["state", "limit", "after", "page"]);
        let ok = list_params(pairs(&[("limit", "1000"), ("state", "running")])).unwrap();
        assert_eq!((ok.limit, ok.state), (1000, Some(JobState::Running)));
        assert_eq!(list_params(vec![]).unwrap().limit, DEFAULT_LIST_LIMIT);
    }

    #[test]
    fn bound_callers_list_only_their_tenant() {
        let acme = Caller::tenant(TenantId::parse("acme").unwrap());
        let p = list_params(vec![]).unwrap();
        let scoped = service::listing_scope(&acme, p.tenant).unwrap();
        assert_eq!(scoped.unwrap().as_str(), "acme");
        let p = list_params(pairs(&[("tenant", "other")])).unwrap();
        assert!(matches!(
            service::listing_scope(&acme, p.tenant),
            Err(ApiError::Forbidden(_))
        ));
        let open = Caller::unrestricted();
        assert_eq!(service::listing_scope(&open, None).unwrap(), None);
    }
}
