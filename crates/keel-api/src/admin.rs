//! The admin listener's router (default `127.0.0.1:9000`, never public by default, G8):
//! the private port an operator diagnoses a running Keel through, like Go's
//! `net/http/pprof` port in seed 000.
//!
//! - `GET /debug/pprof/profile?seconds=N&format=pprof|flamegraph`: a CPU profile of the
//!   whole process over N seconds (default 30, at most 300), as gzipped pprof protobuf
//!   (`go tool pprof`, `pprof`) or a flamegraph SVG. One at a time: a second request while
//!   one runs gets `409`.
//! - `GET /debug/pprof/heap`: jemalloc's heap profile of live memory, as gzipped pprof;
//!   `409` saying how to switch it on while sampling is inactive.
//!   `POST /debug/pprof/heap/activate` and `POST /debug/pprof/heap/deactivate` switch
//!   sampling in the running process.
//! - `GET /debug/tasks[?summary=1]`: every async task and the await point it is parked at
//!   (Go's `goroutine?debug=2`), or tasks grouped by identical stacks (Go's `debug=1`);
//!   `503` naming the problem when a runtime worker is blocked inside a poll.
//! - `GET /debug/config`: the effective configuration as the binary rendered it (secrets
//!   already redacted there).
//! - `GET /debug/chaos`: the fault injection settings in force.
//! - `PUT /debug/chaos`: replaces them (latency and error rate per dependency: `auth`,
//!   `store_read`, `store_write`, `webhook`), taking effect for calls that start afterwards.
//!   The body is a whole [`ChaosSettings`] document; a dependency left out is set to no
//!   fault, so `{}` turns chaos off.
//!
//! With an [`AdminToken`] configured (required by the binary for a non-loopback address),
//! every request must carry `Authorization: Bearer <token>`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_core::FieldError;
use keel_diag::heap::HeapStatus;
use keel_diag::{DiagError, cpu, heap, tasks};
use keel_resilience::{Chaos, ChaosSettings};
use serde::Deserialize;
use serde_json::error::Category;

use crate::auth::bearer_token;
use crate::config::{digests_equal, hash_api_key};
use crate::error::ApiError;
use crate::middleware::{assign_request_id, trace_request};

/// What the admin endpoints show and control. Cloning is cheap (shared).
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The effective configuration, secrets redacted by the caller: this module serves it
    /// as is and must never be handed a value with a secret in it.
    pub config: serde_json::Value,
    /// The process's fault injection switchboard, shared with the API's auth layer, the
    /// store guard and the webhook executor, so one `PUT` reaches all of them.
    pub chaos: Chaos,
    /// When set, every admin request must present this bearer token. Profiles, task
    /// dumps and the chaos switches are as sensitive as a shell on the host, so a listener
    /// reachable from other machines must not serve them to whoever connects.
    pub token: Option<AdminToken>,
}

/// The admin listener's bearer token. Only its SHA-256 digest is kept, and requests are
/// compared digest to digest without an early exit, so neither memory dumps nor response
/// timing reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// The shortest token accepted: 16 random characters are beyond guessing over a
    /// network; a shorter one is a password someone will type.
    pub const MIN_LEN: usize = 16;

    /// Accepts a token of at least [`Self::MIN_LEN`] visible ASCII characters (what an
    /// `Authorization` header can carry verbatim).
    pub fn parse(token: &str) -> Result<Self, String> {
        if token.len() < Self::MIN_LEN {
            return Err(format!(
                "must be at least {} characters (e.g. `openssl rand -hex 32`)",
                Self::MIN_LEN
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters, without spaces".to_owned());
        }
        Ok(Self(hash_api_key(token)))
    }

    fn matches(&self, presented: &str) -> bool {
        digests_equal(&self.0, &hash_api_key(presented))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// Inside the request id and the log line, so refusals are logged like any request;
/// before every route and the fallback, so an unauthenticated caller learns nothing, not
/// even which paths exist.
async fn require_token(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let presented = bearer_token(req.headers()).unwrap_or_default();
        if !token.matches(presented) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// A diagnostic that could not be produced, as the operator should read it: already
/// running, switched off or unavailable here are all `409` with the reason and the way out
/// in `detail`; a dump that timed out or met a blocked worker is `503`; a profiler
/// failure is an opaque `500` with the cause logged.
fn diag_error(e: DiagError) -> ApiError {
    match e {
        DiagError::Busy(detail) | DiagError::Off(detail) | DiagError::Unsupported(detail) => {
            ApiError::Conflict {
                detail,
                job_id: None,
            }
        }
        DiagError::TimedOut(detail) | DiagError::Blocked(detail) => ApiError::Unavailable {
            detail,
            retry_after_secs: 10,
            cause: None,
        },
        e @ DiagError::Failed { .. } => ApiError::internal(e),
    }
}

/// A binary download, named as `go tool pprof` users expect to save it.
fn attachment(bytes: Vec<u8>, filename: &'static str) -> Response {
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response()
}

/// Query of `GET /debug/pprof/profile`; text, so bad values are reported by name.
#[derive(Debug, Default, Deserialize)]
struct ProfileParams {
    seconds: Option<String>,
    format: Option<String>,
}

fn parse_profile_params(p: &ProfileParams) -> Result<(Duration, cpu::CpuFormat), ApiError> {
    let mut errors = Vec::new();
    let seconds = match p.seconds.as_deref() {
        None => Some(cpu::DEFAULT_SECONDS),
        Some(s) => match s.trim().parse::<u64>() {
            Ok(n) if (1..=cpu::MAX_SECONDS).contains(&n) => Some(n),
            _ => {
                errors.push(FieldError {
                    field: "seconds".to_owned(),
                    message: format!(
                        "must be a whole number of seconds in 1..={}, got {s:?}",
                        cpu::MAX_SECONDS
                    ),
                });
                None
            }
        },
    };
    let format = match p.format.as_deref() {
        None | Some("pprof") => Some(cpu::CpuFormat::Pprof),
        Some("flamegraph") => Some(cpu::CpuFormat::Flamegraph),
        Some(other) => {
            errors.push(FieldError {
                field: "format".to_owned(),
                message: format!("must be pprof or flamegraph, got {other:?}"),
            });
            None
        }
    };
    match (seconds, format) {
        (Some(s), Some(f)) if errors.is_empty() => Ok((Duration::from_secs(s), f)),
        _ => Err(ApiError::InvalidQuery(errors)),
    }
}

/// `GET /debug/pprof/profile`: holds the request for the profile's length (no thread is
/// held: the wait is a timer), then answers with the profile.
async fn cpu_profile(Query(params): Query<ProfileParams>) -> Result<Response, ApiError> {
    let (duration, format) = parse_profile_params(&params)?;
    tracing::info!(
        seconds = duration.as_secs(),
        ?format,
        "CPU profile requested"
    );
    let bytes = cpu::profile(duration, format).await.map_err(diag_error)?;
    Ok(match format {
        cpu::CpuFormat::Pprof => attachment(bytes, "cpu.pb.gz"),
        cpu::CpuFormat::Flamegraph => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml"),
            )],
            bytes,
        )
            .into_response(),
    })
}

/// `GET /debug/pprof/heap`.
async fn heap_profile() -> Result<Response, ApiError> {
    let bytes = heap::profile().await.map_err(diag_error)?;
    Ok(attachment(bytes, "heap.pb.gz"))
}

/// `POST /debug/pprof/heap/activate`: from now on, allocations are sampled.
async fn activate_heap_profiling() -> Result<Json<HeapStatus>, ApiError> {
    heap::activate().await.map(Json).map_err(diag_error)
}

/// `POST /debug/pprof/heap/deactivate`: sampling stops and what was recorded is dropped.
async fn deactivate_heap_profiling() -> Result<Json<HeapStatus>, ApiError> {
    heap::deactivate().await.map(Json).map_err(diag_error)
}

/// Query of `GET /debug/tasks`.
#[derive(Debug, Default, Deserialize)]
struct TasksParams {
    summary: Option<String>,
}

/// `GET /debug/tasks`: a dump of the runtime that serves this request, which is the one
/// the whole process runs on.
async fn dump_tasks(Query(params): Query<TasksParams>) -> Result<Response, ApiError> {
    let summary = match params.summary.as_deref().map(str::trim) {
        None | Some("" | "0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::InvalidQuery(vec![FieldError {
                field: "summary".to_owned(),
                message: format!("must be 1 or 0 (true or false), got {other:?}"),
            }]));
        }
    };
    let handle = tokio::runtime::Handle::current();
    let dump = tasks::dump(&handle, tasks::DEFAULT_TIMEOUT)
        .await
        .map_err(diag_error)?;
    let text = if summary {
        dump.render_summary()
    } else {
        dump.render_full()
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

async fn get_config(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(state.config.clone())
}

async fn get_chaos(State(state): State<Arc<AdminState>>) -> Json<ChaosSettings> {
    Json(state.chaos.settings())
}

/// Parses a `PUT /debug/chaos` body. Malformed JSON is a `400`; JSON of the wrong shape (an
/// unknown dependency or setting, a string for a number) is a `422` naming the problem; and
/// values out of bounds are a `422` listing every one, each under its field
/// (`auth.latency_ms`).
fn parse_chaos(body: &[u8]) -> Result<ChaosSettings, ApiError> {
    let settings: ChaosSettings = serde_json::from_slice(body).map_err(|e| match e.classify() {
        Category::Data => ApiError::Validation(vec![FieldError {
            field: "body".to_owned(),
            message: e.to_string(),
        }]),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::BadRequest(format!("the body is not a JSON object: {e}"))
        }
    })?;
    settings.validate().map_err(|errors| {
        ApiError::Validation(
            errors
                .into_iter()
                .map(|e| match e.split_once(' ') {
                    // `validate` words every message as "<dependency>.<setting> must …".
                    Some((field, message)) if field.contains('.') => FieldError {
                        field: field.to_owned(),
                        message: message.to_owned(),
                    },
                    _ => FieldError {
                        field: "body".to_owned(),
                        message: e,
                    },
                })
                .collect(),
        )
    })?;
    Ok(settings)
}

/// Replaces the chaos settings. The body is read as JSON whatever its `Content-Type`, so a
/// plain `curl -X PUT -d '{…}'` works from an operator's shell. Every change is logged at
/// WARN with the new settings, so the log explains the errors that follow.
async fn put_chaos(
    State(state): State<Arc<AdminState>>,
    body: Bytes,
) -> Result<Json<ChaosSettings>, ApiError> {
    let settings = parse_chaos(&body)?;
    let before = state.chaos.settings();
    state.chaos.set(settings);
    tracing::warn!(
        active = settings.is_active(),
        settings = %serde_json::to_string(&settings).unwrap_or_default(),
        before = %serde_json::to_string(&before).unwrap_or_default(),
        "chaos settings changed through /debug/chaos"
    );
    Ok(Json(settings))
}

async fn route_not_found() -> ApiError {
    ApiError::NotFound {
        detail: "no such admin route".to_owned(),
        job_id: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The admin router, ready for `axum::serve(listener, router.into_make_service())`. Requests
/// get an id and a log line like those of the public API; there is no deadline layer, since
/// a CPU profile answers after the seconds it was asked to sample.
pub fn router(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/debug/pprof/profile", get(cpu_profile))
        .route("/debug/pprof/heap", get(heap_profile))
        .route("/debug/pprof/heap/activate", post(activate_heap_profiling))
        .route(
            "/debug/pprof/heap/deactivate",
            post(deactivate_heap_profiling),
        )
        .route("/debug/tasks", get(dump_tasks))
        .route("/debug/config", get(get_config))
        .route("/debug/chaos", get(get_chaos).put(put_chaos))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        // Layers run outermost last: request id, then the log line, then the token check.
        .layer(from_fn_with_state(Arc::clone(&state), require_token))
        .layer(from_fn(trace_request))
        .layer(from_fn(assign_request_id))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    fn app(chaos: Chaos) -> Router {
        router(AdminState {
            config: serde_json::json!({"addr": "127.0.0.1:8080", "api_keys": "[redacted]"}),
            chaos,
            token: None,
        })
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn put(body: &str) -> Request<Body> {
        Request::put("/debug/chaos")
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn serves_the_config_it_was_given() {
        let app = app(Chaos::default());
        let resp = app
            .clone()
            .oneshot(Request::get("/debug/config").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["api_keys"], "[redacted]");
        let resp = app
            .oneshot(Request::get("/debug/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
    }

    #[tokio::test]
    async fn chaos_is_read_and_replaced_as_a_whole() {
        let chaos = Chaos::default();
        let app = app(chaos.clone());
        let (status, v) = send(
            &app,
            Request::get("/debug/chaos").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["store_write"]["error_rate"], 0.0);

        let (status, v) = send(&app, put(r#"{"store_write":{"error_rate":1.0}}"#)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["store_write"]["error_rate"], 1.0);
        assert!(chaos.is_active(), "the shared handle sees the change");

        let (status, _) = send(&app, put("{}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!chaos.is_active(), "an empty document turns chaos off");
    }

    #[tokio::test]
    async fn bad_chaos_documents_are_refused_precisely_and_change_nothing() {
        let chaos = Chaos::new(ChaosSettings::parse("auth.latency_ms=5").unwrap());
        let app = app(chaos.clone());

        let (status, p) = send(&app, put("{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");

        let (status, p) = send(&app, put(r#"{"disk":{"error_rate":1}}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert!(
            p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("unknown field"),
            "{p}"
        );

        let (status, p) = send(
            &app,
            put(r#"{"auth":{"latency_ms":70000},"store_read":{"error_rate":2}}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        let fields = error_fields(&p);
        assert_eq!(fields, ["auth.latency_ms", "store_read.error_rate"], "{p}");
        assert_eq!(chaos.settings().auth.latency_ms, 5, "nothing was applied");

        let resp = app
            .oneshot(Request::post("/debug/chaos").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    /// The `field` of each of a problem's `errors`, in order, read as a client would.
    fn error_fields(p: &serde_json::Value) -> Vec<String> {
        let problem: keel_wire::Problem = serde_json::from_value(p.clone()).unwrap();
        problem.errors.into_iter().map(|e| e.field).collect()
    }

    const TOKEN: &str = "s3cret-admin-token-0123456789";

    async fn status_of(
        app: &Router,
        req: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, body)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn with_a_token_every_route_needs_it() {
        let app = router(AdminState {
            config: serde_json::json!({}),
            chaos: Chaos::default(),
            token: Some(AdminToken::parse(TOKEN).unwrap()),
        });
        for path in ["/debug/config", "/debug/chaos", "/debug/nope"] {
            let (status, headers, _) = status_of(&app, get(path)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(headers["content-type"], "application/problem+json");
            assert!(headers.contains_key("www-authenticate"));
            let wrong = Request::get(path)
                .header("authorization", format!("Bearer {TOKEN}x"))
                .body(Body::empty())
                .unwrap();
            assert_eq!(
                status_of(&app, wrong).await.0,
                StatusCode::UNAUTHORIZED,
                "{path}"
            );
        }
        let right = Request::get("/debug/config")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(status_of(&app, right).await.0, StatusCode::OK);
    }

    #[test]
    fn tokens_must_be_long_and_printable_and_never_show() {
        assert!(
            AdminToken::parse("short")
                .unwrap_err()
                .contains("at least 16")
        );
        assert!(AdminToken::parse("has a space in the middle").is_err());
        let token = AdminToken::parse(TOKEN).unwrap();
        assert!(token.matches(TOKEN) && !token.matches("s3cret-admin-token"));
        assert_eq!(format!("{token:?}"), "AdminToken(***)");
    }

    #[tokio::test]
    async fn bad_profile_parameters_are_each_named_in_a_400() {
        let app = app(Chaos::default());
        let (status, p) = send(&app, get("/debug/pprof/profile?seconds=0&format=png")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
        let fields = error_fields(&p);
        assert_eq!(fields, ["seconds", "format"], "{p}");
        let (status, p) = send(&app, get("/debug/pprof/profile?seconds=301")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
        let (status, p) = send(&app, get("/debug/tasks?summary=maybe")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cpu_profile_is_a_gzipped_download() {
        let app = app(Chaos::default());
        let (status, headers, body) = status_of(&app, get("/debug/pprof/profile?seconds=1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert!(
            headers["content-disposition"]
                .to_str()
                .unwrap()
                .contains("cpu.pb.gz")
        );
        assert_eq!(&body[..2], [0x1f, 0x8b], "gzip magic");
    }

    #[tokio::test]
    async fn heap_profiles_explain_why_they_are_unavailable() {
        // Unit tests allocate through the system allocator, not jemalloc.
        let app = app(Chaos::default());
        let (status, p) = send(&app, get("/debug/pprof/heap")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{p}");
        assert!(p["detail"].as_str().unwrap().contains("jemalloc"), "{p}");
        let (status, _) = send(
            &app,
            Request::post("/debug/pprof/heap/activate")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
    }

    // One worker: a dump on two can wedge one of them when the machine is loaded (see
    // keel_diag::tasks and docs/operations.md), and the runtime's drop would hang the test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_task_dump_shows_parked_tasks_as_text() {
        let app = app(Chaos::default());
        let (status, headers, body) = status_of(&app, get("/debug/tasks?summary=1")).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("keel task summary: "), "{text}");
    }
}
