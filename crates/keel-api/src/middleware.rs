//! The layers every request passes through, outermost first (see [`crate::router`] for the
//! order and why):
//!
//! 0. `admission::admit` — sheds load before anything else is spent on a request.
//! 1. `assign_request_id` — gives the request an id, echoes it, stamps it into problems.
//! 2. `trace_request` — one log line per request.
//! 3. `record_metrics` — request count and latency by method, route and status.
//! 4. `panic_response` (via `CatchPanicLayer`) — a handler bug becomes a `500`, not a
//!    dropped connection.
//! 5. `enforce_deadline` — the request deadline (G7), and the [`RequestScope`] that carries
//!    it (and the current step) down to the store.
//! 6. `limit_body` — refuses oversized bodies before anyone reads them.
//!
//! On the `/v1` tenant routes only, innermost: admission ([`crate::admission`]), then
//! authentication ([`crate::auth`]), then the rate limit ([`crate::rate_limit`]).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_resilience::RequestScope;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{ApiError, ErrorCause, Problem};
use crate::state::ApiState;

/// The header carrying the request id, in and out.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The header a client uses to ask for a shorter deadline, in milliseconds.
pub const REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("request-timeout");

/// Longest incoming request id that is kept; longer ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The request's id, from a sane incoming `X-Request-Id` or a fresh UUIDv7. Lives in the
/// request extensions so anything that logs or answers can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// When the request must be answered. Handlers that wait on purpose (`/v1/process`,
/// `/readyz`) read it to answer before the deadline layer has to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left until the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Deadline {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Deadline>()
            .copied()
            .ok_or_else(|| ApiError::internal("the deadline layer did not run"))
    }
}

/// Whether an incoming request id is worth keeping: 1..=128 visible ASCII characters, so it
/// is safe to echo in a header and to write in a log line.
fn sane_request_id(s: &str) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// The request's id: a sane incoming `X-Request-Id`, or a fresh UUIDv7.
pub(crate) fn request_id_of(req: &Request) -> Arc<str> {
    request_id_from(req.headers())
}

/// The id of a request with these headers (HTTP headers or gRPC metadata): a sane
/// `x-request-id`, or a fresh UUIDv7.
pub(crate) fn request_id_from(headers: &axum::http::HeaderMap) -> Arc<str> {
    match headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| sane_request_id(s))
    {
        Some(s) => s.into(),
        None => uuid::Uuid::now_v7().to_string().into(),
    }
}

/// Echoes `id` as `X-Request-Id` and writes it into the problem body of an error response.
pub(crate) fn stamp_request_id(mut resp: Response, id: &str) -> Response {
    if let Some(problem) = resp.extensions_mut().get_mut::<Problem>() {
        problem.request_id = Some(id.to_owned());
        let body = problem.to_body();
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        *resp.body_mut() = body.into();
    }
    // Visible ASCII (checked by `sane_request_id`, or a UUID), so always a valid value.
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    resp
}

/// Assigns the request id, and on the way out echoes it as `X-Request-Id` and writes it
/// into the problem body of an error response. Outside every other layer but admission, so
/// that every response, including those of the layers below (`504`, `413`, `401`), carries
/// it; admission stamps its own refusals the same way.
pub(crate) async fn assign_request_id(mut req: Request, next: Next) -> Response {
    let id = request_id_of(&req);
    req.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let resp = next.run(req).await;
    stamp_request_id(resp, &id)
}

/// The route a request matched, as registered (`/v1/jobs/{id}`), or `unmatched`: a bounded
/// label, never a raw path with ids in it.
fn route_of(req: &Request) -> Arc<str> {
    req.extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".into(), |m| m.as_str().into())
}

/// Second layer: one log line per request with `request_id`, `method`, `route`, `status`
/// and `duration_ms`. Successes and client errors (expected conditions) log at INFO, shed
/// requests (`503` overloaded: the server protecting itself, as designed) at DEBUG — they
/// come by the thousand exactly when CPU is short, so they are counted in
/// `keel_requests_shed_total` rather than each written out — other server errors at ERROR
/// with their cause — the one place a `5xx` cause is logged. Inside the
/// request-id layer so it has the id; outside everything else so it sees their answers
/// (`504`, `413`, `401`). Everything the handler logs happens inside a span carrying the
/// request id.
pub(crate) async fn trace_request(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = route_of(&req);
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map_or_else(|| "-".into(), |r| Arc::clone(&r.0));
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let resp = next.run(req).instrument(span).await;
    let status = resp.status().as_u16();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let problem = resp
        .extensions()
        .get::<Problem>()
        .map(|p| p.type_uri.as_str());
    let shed = problem.is_some_and(|t| t.ends_with("/overloaded"));
    if shed {
        tracing::debug!(%request_id, %method, %route, status, duration_ms, problem, "request shed");
    } else if resp.status().is_server_error() {
        let cause = resp
            .extensions()
            .get::<ErrorCause>()
            .map_or_else(|| "-".into(), |c| Arc::clone(&c.0));
        tracing::error!(%request_id, %method, %route, status, duration_ms, error = %cause, "request failed");
    } else {
        tracing::info!(%request_id, %method, %route, status, duration_ms, problem, "request");
    }
    resp
}

/// A bounded method label: the standard methods by name, anything else as `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Third layer: `http_requests_total{method,route,status}` and
/// `http_request_duration_seconds{method,route}`. Outside the deadline, panic and auth
/// layers so their answers are counted; labels are bounded sets (matched route, not path).
pub(crate) async fn record_metrics(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = route_of(&req);
    let resp = next.run(req).await;
    metrics::counter!(
        "http_requests_total",
        "method" => method,
        "route" => route.to_string(),
        "status" => resp.status().as_u16().to_string(),
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method,
        "route" => route.to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    resp
}

/// Fourth layer (`CatchPanicLayer`): turns a panicking handler into an opaque `500` whose
/// cause is logged by the trace layer, instead of a reset connection and no log line.
#[allow(clippy::needless_pass_by_value)] // The signature `CatchPanicLayer::custom` calls.
pub(crate) fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let msg = err
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| err.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    ApiError::internal(format!("handler panicked: {msg}")).into_response()
}

/// The shortest deadline a client may ask for: below it a request could expire before its
/// own body was read, and the answer would say nothing about the server.
pub const MIN_REQUESTED_TIMEOUT_MS: u64 = 100;

/// The client's `Request-Timeout: <ms>`, if any. Unparsable values, or fewer than
/// [`MIN_REQUESTED_TIMEOUT_MS`], are a `400`: a client that asks for a deadline should
/// learn that it was not understood.
pub(crate) fn requested_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(&REQUEST_TIMEOUT) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|ms| *ms >= MIN_REQUESTED_TIMEOUT_MS)
        .map(|ms| Some(Duration::from_millis(ms)))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Request-Timeout must be a whole number of milliseconds, at least \
                 {MIN_REQUESTED_TIMEOUT_MS}"
            ))
        })
}

/// Fifth layer: the request deadline (G7) — `request_timeout`, or less if the client asked
/// for less. When it passes, the inner future (auth, validation, the store call) is dropped,
/// which cancels its work, and the client gets `504` naming the step the request was in
/// ("deadline exceeded while authenticating"). Outside admission, auth and the body limit
/// so that a slow auth check or a slow-trickling body is bounded too (SLOW_AUTH); inside
/// trace and metrics so timeouts are logged and counted.
///
/// The inner future runs inside a [`RequestScope`]: code far below (the store guard's
/// bulkhead wait and retries) reads the deadline from it, and each layer marks its step in
/// it. The scope's step is shared with the clone kept here, so it is still readable after
/// the timeout dropped the inner future. Expiries are counted in
/// `keel_requests_deadline_exceeded_total{step}`.
pub(crate) async fn enforce_deadline(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    let budget = match requested_timeout(req.headers()) {
        Ok(Some(asked)) => asked.min(state.config.request_timeout),
        Ok(None) => state.config.request_timeout,
        Err(e) => return e.into_response(),
    };
    // A lease may wait up to its `wait` for a job before its own work starts.
    let budget = if crate::routes::workers::is_lease_path(req.uri().path()) {
        budget + state.config.max_lease_wait
    } else {
        budget
    };
    let at = Instant::now() + budget;
    req.extensions_mut().insert(Deadline(at));
    let scope = RequestScope::new(at);
    let seen = scope.clone();
    match tokio::time::timeout_at(at, scope.run(next.run(req))).await {
        Ok(resp) => resp,
        Err(_) => {
            let step = seen.step();
            metrics::counter!("keel_requests_deadline_exceeded_total", "step" => step.as_str())
                .increment(1);
            ApiError::DeadlineExceeded {
                job_id: None,
                step: Some(step),
            }
            .into_response()
        }
    }
}

/// Sixth layer: refuses a body whose declared `Content-Length` exceeds `max_body_bytes`
/// with a `413` problem before anything reads it. Bodies without a length (chunked) are
/// capped where they are read (`DefaultBodyLimit`), with the same `413`. Before auth, so an
/// unauthenticated client cannot make the server buffer a large body either.
pub(crate) async fn limit_body(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge { limit: Some(limit) }.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_bounded_visible_ascii() {
        assert!(sane_request_id("abc-123_DEF"));
        assert!(sane_request_id(&"x".repeat(128)));
        assert!(!sane_request_id(&"x".repeat(129)));
        assert!(!sane_request_id(""));
        assert!(!sane_request_id("has space"));
        assert!(!sane_request_id("tab\there"));
    }

    #[test]
    fn request_timeout_header_is_strict() {
        let mut h = HeaderMap::new();
        assert!(requested_timeout(&h).unwrap().is_none());
        h.insert(REQUEST_TIMEOUT, HeaderValue::from_static("250"));
        assert_eq!(
            requested_timeout(&h).unwrap(),
            Some(Duration::from_millis(250))
        );
        for bad in ["0", "99", "-1", "1.5", "soon"] {
            h.insert(REQUEST_TIMEOUT, HeaderValue::from_static(bad));
            assert!(requested_timeout(&h).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_panic_becomes_an_opaque_500_with_its_cause_kept_for_the_log() {
        let resp = panic_response(Box::new("index out of bounds"));
        assert_eq!(resp.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let problem = resp.extensions().get::<Problem>().unwrap();
        assert_eq!(problem.detail, "internal error");
        let cause = resp.extensions().get::<ErrorCause>().unwrap();
        assert_eq!(&*cause.0, "handler panicked: index out of bounds");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let m = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&m), "other");
        assert_eq!(method_label(&Method::POST), "POST");
    }
}
