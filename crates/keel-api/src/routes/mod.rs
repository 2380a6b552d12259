//! The route table and the one [`router`] that serves it with its middleware.

pub(crate) mod health;
pub(crate) mod jobs;
pub(crate) mod process;
pub(crate) mod queues;
pub(crate) mod schedules;
pub(crate) mod workers;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::admission::admit;
use crate::auth::authenticate;
use crate::error::ApiError;
use crate::middleware::{
    assign_request_id, enforce_deadline, limit_body, panic_response, record_metrics, trace_request,
};
use crate::rate_limit::limit_rate;
use crate::state::ApiState;

/// Declares every route once: the same tokens build the axum routes, the list of documented
/// operations (`RouteDocs`) and [`ROUTES`], which the OpenAPI test compares with the
/// generated document in both directions, so a route cannot be served without being
/// documented or documented without being served.
macro_rules! route_table {
    (
        public { $($pm:ident $pp:literal => $ph:path,)* }
        tenant { $($tm:ident $tp:literal => $th:path,)* }
    ) => {
        /// Every route served, as `(method, path)` in axum's path syntax.
        pub const ROUTES: &[(&str, &str)] = &[
            $((stringify!($pm), $pp),)*
            $((stringify!($tm), $tp),)*
        ];

        /// The documented operation of every route (each handler's `#[utoipa::path]`), merged
        /// into the served document by [`crate::openapi::api_doc`].
        #[derive(utoipa::OpenApi)]
        #[openapi(paths($($ph,)* $($th,)*))]
        pub(crate) struct RouteDocs;

        /// Routes open to anyone: probes, metrics, the API description.
        fn public_routes() -> Router<ApiState> {
            Router::new() $(.route($pp, axum::routing::$pm($ph)))*
        }

        /// Routes that act for a tenant and so need an API key when keys are configured.
        fn tenant_routes() -> Router<ApiState> {
            Router::new() $(.route($tp, axum::routing::$tm($th)))*
        }
    };
}

route_table! {
    public {
        get "/healthz" => health::get_health,
        get "/readyz" => health::get_ready,
        get "/metrics" => health::get_metrics,
        get "/v1/openapi.json" => health::get_openapi,
    }
    tenant {
        post "/v1/jobs" => jobs::enqueue_job,
        get "/v1/jobs" => jobs::list_jobs,
        post "/v1/jobs/batch" => jobs::enqueue_batch,
        get "/v1/jobs/{id}" => jobs::get_job,
        get "/v1/jobs/{id}/result" => jobs::get_job_result,
        post "/v1/jobs/{id}/cancel" => jobs::cancel_job,
        post "/v1/jobs/{id}/retry" => jobs::retry_job,
        post "/v1/process" => process::process_job,
        get "/v1/queues" => queues::list_queues,
        get "/v1/queues/{queue}" => queues::get_queue,
        post "/v1/queues/{queue}/pause" => queues::pause_queue,
        post "/v1/queues/{queue}/resume" => queues::resume_queue,
        post "/v1/schedules" => schedules::create_schedule,
        get "/v1/schedules" => schedules::list_schedules,
        put "/v1/schedules/{name}" => schedules::put_schedule,
        get "/v1/schedules/{name}" => schedules::get_schedule,
        delete "/v1/schedules/{name}" => schedules::delete_schedule,
        post "/v1/schedules/{name}/pause" => schedules::pause_schedule,
        post "/v1/schedules/{name}/resume" => schedules::resume_schedule,
        post "/v1/queues/{queue}/lease" => workers::lease_jobs,
        post "/v1/jobs/{id}/heartbeat" => workers::heartbeat,
        post "/v1/jobs/{id}/complete" => workers::complete_job,
        post "/v1/jobs/{id}/fail" => workers::fail_job,
        post "/v1/jobs/{id}/release" => workers::release_job,
        post "/v1/jobs/complete" => workers::complete_many,
        post "/v1/jobs/fail" => workers::fail_many,
        get "/v1/workers" => workers::list_workers,
    }
}

async fn route_not_found() -> ApiError {
    ApiError::NotFound {
        detail: "no such route".to_owned(),
        job_id: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The whole HTTP API with its middleware, ready for
/// `axum::serve(listener, router(state).into_make_service())` (no connect info needed).
///
/// Layers, outermost first — each sees the answers of those below it:
/// 0. admission (`/v1` only, not the OpenAPI document: probes and scrapes must get through
///    an overloaded server): sheds at once above the concurrency limit or backlog cap,
///    before anything else is spent on the request — refusals come by the thousand when
///    CPU is shortest, so they skip the log line and the HTTP metrics below and are counted
///    in `keel_requests_shed_total`; each still carries a request id;
/// 1. request id: so every other response (even a `504` or `401`) carries it and every
///    problem body names it;
/// 2. trace: one log line per request, with the id and the final status;
/// 3. metrics: counts everything below, including timeouts and auth failures;
/// 4. catch-panic: a handler bug becomes an opaque `500` (logged and counted above);
/// 5. deadline: bounds everything below — auth, body reading, validation, store (G7) —
///    and opens the request scope the steps are marked in;
/// 6. body limit: refuses a too-large declared body before auth or a handler reads it;
///
/// then, on the `/v1` tenant routes only:
/// 7. auth: resolves the caller (and applies the `auth` chaos faults);
/// 8. rate limit: needs the caller's tenant and key, so after auth; marks the `validate`
///    step on the way to the handler, whose extractors read and check the body.
pub fn router(state: ApiState) -> Router {
    // `route_layer`s wrap the routes in the order added: the last one added runs first.
    let tenant = tenant_routes()
        .route_layer(from_fn_with_state(state.clone(), limit_rate))
        .route_layer(from_fn_with_state(state.clone(), authenticate));
    let layers = ServiceBuilder::new()
        .layer(from_fn_with_state(state.clone(), admit))
        .layer(from_fn(assign_request_id))
        .layer(from_fn(trace_request))
        .layer(from_fn(record_metrics))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn_with_state(state.clone(), enforce_deadline))
        .layer(from_fn_with_state(state.clone(), limit_body))
        // Caps bodies without a Content-Length where extractors read them (same 413).
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    public_routes()
        .merge(tenant)
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        .layer(layers)
        .with_state(state)
}
