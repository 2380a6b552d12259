//! `/v1/schedules…`: cron schedules of the caller's tenant — create, replace, read (with the
//! next ticks), list, delete, pause and resume. Enqueuing their ticks is the maintenance
//! leader's job (keel-runtime), exactly once per tick by the store's `(schedule, tick)` key.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use keel_core::{ScheduleName, TenantId};

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::extract::{JsonBody, ScheduleNamePath, parse_limit, parse_query_fields};
use crate::routes::jobs::job_context;
use crate::schedule_in::parse_schedule;
use crate::service::schedules as service;
use crate::state::ApiState;
use crate::wire_in::fields_of;
use keel_wire::{ScheduleIn, ScheduleListQuery, ScheduleOut, SchedulePageOut, TenantQuery};

/// Default page size of `GET /v1/schedules`.
pub const DEFAULT_SCHEDULE_LIST_LIMIT: u32 = 100;

/// The query of the schedule routes: `tenant` everywhere; `after` and `limit` when listing.
/// Which tenant the caller may act for is the service's decision.
pub(crate) struct ScheduleQuery {
    pub(crate) tenant: Option<TenantId>,
    pub(crate) after: Option<ScheduleName>,
    pub(crate) limit: u32,
}

/// Parses the query, reporting every bad parameter at once (`400`).
pub(crate) fn schedule_query(
    pairs: Vec<(String, String)>,
    listing: bool,
) -> Result<ScheduleQuery, ApiError> {
    let names = if listing {
        fields_of::<ScheduleListQuery>()
    } else {
        fields_of::<TenantQuery>()
    };
    let mut tenant = None;
    let mut after = None;
    let mut limit = DEFAULT_SCHEDULE_LIST_LIMIT;
    parse_query_fields(pairs, names, |field, value| match field {
        "tenant" => TenantId::parse(value)
            .map(|t| tenant = Some(t))
            .map_err(|e| e.reason),
        "after" => ScheduleName::parse(value)
            .map(|n| after = Some(n))
            .map_err(|e| e.reason),
        // "limit", the only name left.
        _ => parse_limit(&value).map(|n| limit = n),
    })?;
    Ok(ScheduleQuery {
        tenant,
        after,
        limit,
    })
}

/// The tenant a single-schedule route names, if any.
fn tenant_of(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Option<TenantId>, ApiError> {
    let Query(pairs) = query?;
    Ok(schedule_query(pairs, false)?.tenant)
}

fn show(s: keel_core::Schedule) -> ScheduleOut {
    ScheduleOut::at(s, Utc::now())
}

/// `status` with the schedule, and its `Location`.
fn saved(status: StatusCode, s: keel_core::Schedule) -> Response {
    let location = HeaderValue::from_str(&format!("/v1/schedules/{}", s.name)).ok();
    let mut resp = (status, Json(show(s))).into_response();
    if let Some(v) = location {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Create a schedule. Its first tick is the first one after now; `409` if the tenant already
/// has a schedule of this name (replace it with `PUT`).
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    security(("bearer" = [])),
    request_body(content = ScheduleIn, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = ScheduleOut,
            headers(("Location" = String, description = "/v1/schedules/{name}"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The body names another tenant than the API key's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A schedule of this name exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, all listed (e.g. `cron`, `timezone`, `job.kind`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn create_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let new = parse_schedule(&body, &job_context(&state, &caller), None)?;
    let (schedule, _) = service::save(&state, new, false).await?;
    Ok(saved(StatusCode::CREATED, schedule))
}

/// Create (`201`) or replace (`200`) the schedule `name`. A replaced schedule keeps its
/// creation time and its last enqueued tick, so no tick is enqueued twice across the change.
#[utoipa::path(
    put,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Schedule name")),
    request_body(content = ScheduleIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced", body = ScheduleOut),
        (status = 201, description = "Created", body = ScheduleOut,
            headers(("Location" = String, description = "/v1/schedules/{name}"))),
        (status = 400, description = "Malformed JSON or name", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The body names another tenant than the API key's", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    ScheduleNamePath(name): ScheduleNamePath,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let new = parse_schedule(&body, &job_context(&state, &caller), Some(&name))?;
    let (schedule, created) = service::save(&state, new, true).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(saved(status, schedule))
}

/// The tenant's schedules by name, with keyset pagination: pass the previous page's `next`
/// as `after`.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    security(("bearer" = [])),
    params(
        ScheduleListQuery,
    ),
    responses(
        (status = 200, description = "A page of schedules", body = SchedulePageOut),
        (status = 400, description = "Invalid parameters, all listed in `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`tenant` names another tenant than the API key's", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list_schedules(
    State(state): State<ApiState>,
    caller: Caller,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<SchedulePageOut>, ApiError> {
    let Query(pairs) = query?;
    let q = schedule_query(pairs, true)?;
    let page = service::list(&state, &caller, q.tenant, q.after, q.limit).await?;
    let now = Utc::now();
    Ok(Json(SchedulePageOut {
        schedules: page
            .schedules
            .into_iter()
            .map(|s| ScheduleOut::at(s, now))
            .collect(),
        next: page.next.map(String::from),
    }))
}

/// One schedule, with its next 5 ticks.
#[utoipa::path(
    get,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Schedule name"),
        TenantQuery,
    ),
    responses(
        (status = 200, description = "The schedule", body = ScheduleOut),
        (status = 400, description = "Invalid name or parameters", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such schedule in the tenant", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    ScheduleNamePath(name): ScheduleNamePath,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<ScheduleOut>, ApiError> {
    let tenant = tenant_of(query)?;
    Ok(Json(show(
        service::get(&state, &caller, tenant, &name).await?,
    )))
}

/// Delete a schedule. Jobs it already enqueued stay.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{name}",
    tag = "schedules",
    security(("bearer" = [])),
    params(
        ("name" = String, Path, description = "Schedule name"),
        TenantQuery,
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such schedule in the tenant", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_schedule(
    State(state): State<ApiState>,
    caller: Caller,
    ScheduleNamePath(name): ScheduleNamePath,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of(query)?;
    service::delete(&state, &caller, tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stamps out the pause and the resume route: one annotated handler each, because utoipa
/// documents an operation per function, around one body that differs only in `paused`.
macro_rules! set_paused_route {
    ($(#[doc = $doc:literal])* $handler:ident, $path:literal, $done:literal, $paused:literal) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            post,
            path = $path,
            tag = "schedules",
            security(("bearer" = [])),
            params(
                ("name" = String, Path, description = "Schedule name"),
                TenantQuery,
            ),
            responses(
                (status = 200, description = $done, body = ScheduleOut),
                (status = 404, description = "No such schedule in the tenant", body = Problem, content_type = "application/problem+json"),
            )
        )]
        pub(crate) async fn $handler(
            State(state): State<ApiState>,
            caller: Caller,
            ScheduleNamePath(name): ScheduleNamePath,
            query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        ) -> Result<Json<ScheduleOut>, ApiError> {
            let tenant = tenant_of(query)?;
            Ok(Json(show(
                service::set_paused(&state, &caller, tenant, &name, $paused).await?,
            )))
        }
    };
}

set_paused_route!(
    /// Pause a schedule: its ticks are skipped until it is resumed.
    pause_schedule,
    "/v1/schedules/{name}/pause",
    "Paused",
    true
);

set_paused_route!(
    /// Resume a paused schedule. Ticks missed while paused are caught up only within its
    /// catch-up window (the latest one always).
    resume_schedule,
    "/v1/schedules/{name}/resume",
    "Resumed",
    false
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::query_pairs as pairs;

    #[test]
    fn queries_report_every_bad_parameter_and_scope_the_tenant() {
        let open = Caller::unrestricted();
        let Err(ApiError::InvalidQuery(errors)) = schedule_query(
            pairs(&[("limit", "0"), ("after", "bad name"), ("page", "2")]),
            true,
        ) else {
            panic!("expected a 400")
        };
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["limit", "after", "page"]);
        assert!(schedule_query(pairs(&[("limit", "5")]), false).is_err());
        let q = schedule_query(pairs(&[("tenant", "acme")]), true).unwrap();
        let tenant = open.tenant_for(q.tenant).unwrap();
        assert_eq!(
            (tenant.as_str(), q.limit),
            ("acme", DEFAULT_SCHEDULE_LIST_LIMIT)
        );
        let acme = Caller::tenant(TenantId::parse("acme").unwrap());
        let q = schedule_query(vec![], false).unwrap();
        assert_eq!(acme.tenant_for(q.tenant).unwrap().as_str(), "acme");
        let q = schedule_query(pairs(&[("tenant", "other")]), false).unwrap();
        assert!(matches!(
            acme.tenant_for(q.tenant),
            Err(ApiError::Forbidden(_))
        ));
    }
}
