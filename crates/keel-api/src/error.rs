//! The one error type of the HTTP API and its `application/problem+json` (RFC 9457) form.
//!
//! Every failure a handler or middleware can meet becomes an [`ApiError`]; one `match`
//! ([`ApiError::classify`]) decides its status and problem type. The response carries the
//! [`Problem`] as an extension too, so the request-id layer can stamp `request_id` into the
//! body and the trace layer can log the cause of a `5xx` once, while the client only ever
//! sees an opaque "internal error".

use std::error::Error as StdError;
use std::sync::Arc;

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_core::{FieldError, JobId, JobState, QueueName, StoreError};
use keel_resilience::Step;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = Problem::MEDIA_TYPE;

/// Prefix of every problem `type` URI; the last segment names the problem and is stable.
pub const PROBLEM_TYPE_BASE: &str = "https://keel.dev/problems/";

/// `RateLimit-Limit` (IETF draft `ratelimit-headers`): the size of the caller's bucket.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: requests the caller may still send at once.
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: seconds until the next request will be accepted (on a `429`).
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong while serving a request, by what the client should do
/// about it. Converting to a response never fails and never panics.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: not JSON, not an object, a bad id in the path, a bad
    /// header. Fix the request.
    #[error("{0}")]
    BadRequest(String),
    /// One or more query parameters are invalid; every one is listed. (A query string is
    /// part of the request line, so this is a `400`, not a `422`.)
    #[error("invalid query parameters")]
    InvalidQuery(Vec<FieldError>),
    /// No API key, or one that matches no configured key.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// The API key is valid but may not act for the tenant the request names.
    #[error("{0}")]
    Forbidden(String),
    /// No such resource (or it belongs to another tenant, which is not revealed).
    #[error("{detail}")]
    NotFound {
        /// What was not found.
        detail: String,
        /// The job, when a job was looked up.
        job_id: Option<JobId>,
    },
    /// The path exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The state machine refuses the move (e.g. cancelling a completed job).
    #[error("{detail}")]
    IllegalTransition {
        /// The job.
        job_id: JobId,
        /// The refused move, e.g. "cannot cancel a job that is completed".
        detail: String,
    },
    /// The write conflicts with stored data (a duplicate, a stale lease).
    #[error("{detail}")]
    Conflict {
        /// What conflicts.
        detail: String,
        /// The job, when known.
        job_id: Option<JobId>,
    },
    /// A worker's lease token no longer holds the job (docs/workers.md): the job was
    /// cancelled, finished, or rescued after the lease lapsed.
    #[error("{detail}")]
    StaleLease {
        /// The job.
        job_id: JobId,
        /// What happened to the job.
        detail: String,
    },
    /// An external worker asked to lease from a queue this process serves itself.
    #[error(
        "queue {0} is served by this process's built-in workers (KEEL_QUEUES); external workers serve only the other queues"
    )]
    QueueServedHere(QueueName),
    /// An `Idempotency-Key` came back with a different request (G3).
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// A job's result was asked for but the job ended without one (discarded or
    /// cancelled).
    #[error("{detail}")]
    JobNotCompleted {
        /// The job.
        job_id: JobId,
        /// The terminal state it ended in.
        state: JobState,
        /// What happened, including the last error of a discarded job.
        detail: String,
    },
    /// The body is larger than the configured limit.
    #[error("{}", too_large_detail(*limit))]
    PayloadTooLarge {
        /// The limit in bytes, when known.
        limit: Option<usize>,
    },
    /// A body was sent with a content type other than JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body is well-formed JSON but invalid; every field error is listed.
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
    /// The request is well-formed but cannot be acted on as a whole (the database refused a
    /// value; a job that cannot start before the deadline it would be waited for).
    #[error("{0}")]
    Unprocessable(String),
    /// A bug or a permanent failure. The client sees only "internal error"; the cause is
    /// logged once, with the request id.
    #[error("internal error")]
    Internal(#[source] BoxError),
    /// A dependency is down or the process is not ready; retry after `retry_after_secs`.
    #[error("{detail}")]
    Unavailable {
        /// What is unavailable, phrased for the client (no internals).
        detail: String,
        /// Seconds the client should wait (`Retry-After`).
        retry_after_secs: u32,
        /// The underlying failure, logged, never sent.
        #[source]
        cause: Option<BoxError>,
    },
    /// The request deadline passed (G7). For `POST /v1/process`, `job_id` names the job,
    /// which keeps running and can be polled.
    #[error("{}", deadline_detail(*step))]
    DeadlineExceeded {
        /// The job the request created, if it got that far.
        job_id: Option<JobId>,
        /// Where the request was when time ran out, so the client (and the operator reading
        /// the log line) can tell a slow auth check from a slow database.
        step: Option<Step>,
    },
    /// The server shed the request to protect the requests it is already serving (G5):
    /// too many in flight, or too many jobs waiting to run. Retry after `Retry-After`.
    #[error("{}", reason.detail())]
    Overloaded {
        /// Why it was shed.
        reason: ShedReason,
    },
    /// The caller's tenant or API key spent its rate limit. `Retry-After` says when the
    /// next request will be accepted; the `RateLimit-*` headers describe the bucket.
    #[error("rate limit exceeded; retry in {retry_after_secs} s")]
    RateLimited {
        /// Size of the bucket (`RateLimit-Limit`).
        limit: u32,
        /// Seconds until a request will be accepted (`Retry-After`, `RateLimit-Reset`).
        retry_after_secs: u32,
    },
}

/// Why a request was shed with `503` before any work was done for it; the `reason` label of
/// `keel_requests_shed_total` (a bounded set, together with `rate_limit` for `429`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The adaptive concurrency limit was reached.
    Concurrency,
    /// The queue backlog is above `max_queue_backlog` (enqueue routes only).
    Backlog,
}

impl ShedReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::Concurrency => "concurrency",
            ShedReason::Backlog => "backlog",
        }
    }

    /// Seconds a shed client should wait. Concurrency frees up within a request's latency;
    /// a backlog drains at the workers' pace and is re-counted every few seconds, so asking
    /// sooner would only be shed again.
    pub fn retry_after_secs(self) -> u32 {
        match self {
            ShedReason::Concurrency => 1,
            ShedReason::Backlog => 5,
        }
    }

    fn detail(self) -> &'static str {
        match self {
            ShedReason::Concurrency => "the server is at its concurrency limit; retry shortly",
            ShedReason::Backlog => {
                "too many jobs are waiting to run; retry once the backlog has drained"
            }
        }
    }
}

fn deadline_detail(step: Option<Step>) -> String {
    match step {
        Some(Step::ReadBody) => {
            "the request body did not arrive before the request deadline (sent too slowly, or \
             shorter than its Content-Length)"
                .to_owned()
        }
        Some(step) => format!("deadline exceeded while {}", step.doing()),
        None => "deadline exceeded".to_owned(),
    }
}

impl ApiError {
    /// An internal error from any cause.
    pub fn internal(cause: impl Into<BoxError>) -> Self {
        ApiError::Internal(cause.into())
    }

    /// The job `id` does not exist (or is not visible to the caller).
    pub fn job_not_found(id: JobId) -> Self {
        ApiError::NotFound {
            detail: format!("job {id} not found"),
            job_id: Some(id),
        }
    }

    /// The single mapping from error to HTTP status and problem `type` slug.
    pub fn classify(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "malformed-request"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid-query"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            ApiError::IllegalTransition { .. } => (StatusCode::CONFLICT, "illegal-transition"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            ApiError::StaleLease { .. } => (StatusCode::CONFLICT, "stale-lease"),
            ApiError::QueueServedHere(_) => (StatusCode::CONFLICT, "queue-served-here"),
            ApiError::IdempotencyKeyReused(_) => (StatusCode::CONFLICT, "idempotency-key-reused"),
            ApiError::JobNotCompleted { .. } => (StatusCode::CONFLICT, "job-not-completed"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large")
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::Validation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "validation"),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            // The client did not send its body in time: its slowness, not ours.
            ApiError::DeadlineExceeded {
                step: Some(Step::ReadBody),
                ..
            } => (StatusCode::REQUEST_TIMEOUT, "request-timeout"),
            ApiError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "deadline-exceeded"),
            ApiError::Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
        }
    }

    /// The body the client sees (without `request_id`, which the request-id layer adds).
    pub fn problem(&self) -> Problem {
        let (status, slug) = self.classify();
        let mut p = Problem {
            type_uri: format!("{PROBLEM_TYPE_BASE}{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            request_id: None,
            errors: Vec::new(),
            job_id: None,
            state: None,
        };
        match self {
            ApiError::InvalidQuery(errors) | ApiError::Validation(errors) => {
                p.errors = errors.iter().map(ProblemField::from).collect();
                p.detail = match errors.len() {
                    1 => format!("{} (1 error)", self),
                    n => format!("{} ({n} errors)", self),
                };
            }
            ApiError::NotFound { job_id, .. } | ApiError::Conflict { job_id, .. } => {
                p.job_id = *job_id;
            }
            ApiError::IllegalTransition { job_id, .. } | ApiError::StaleLease { job_id, .. } => {
                p.job_id = Some(*job_id)
            }
            ApiError::JobNotCompleted { job_id, state, .. } => {
                p.job_id = Some(*job_id);
                p.state = Some(*state);
            }
            ApiError::DeadlineExceeded {
                job_id: Some(id), ..
            } => {
                p.job_id = Some(*id);
                p.detail = format!(
                    "the request deadline passed before job {id} finished; it keeps running: \
                     poll GET /v1/jobs/{id}"
                );
            }
            _ => {}
        }
        p
    }

    /// The full cause chain, for the log line of a `5xx`.
    pub(crate) fn cause(&self) -> Option<String> {
        let source: &(dyn StdError + 'static) = match self {
            ApiError::Internal(e) => e.as_ref(),
            ApiError::Unavailable { cause: Some(e), .. } => e.as_ref(),
            _ => return None,
        };
        let mut out = source.to_string();
        let mut next = source.source();
        while let Some(e) = next {
            out.push_str(": ");
            out.push_str(&e.to_string());
            next = e.source();
        }
        Some(out)
    }
}

pub use keel_wire::{Problem, ProblemField};

/// The cause of a `5xx`, attached to the response for the trace layer to log. Never
/// serialised.
#[derive(Debug, Clone)]
pub(crate) struct ErrorCause(pub(crate) Arc<str>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, problem.to_body()).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match &self {
            ApiError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Bearer realm="keel""#),
                );
            }
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Overloaded { reason } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(reason.retry_after_secs()),
                );
            }
            ApiError::RateLimited {
                limit,
                retry_after_secs,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                headers.insert(RATELIMIT_LIMIT, HeaderValue::from(*limit));
                headers.insert(RATELIMIT_REMAINING, HeaderValue::from(0u32));
                headers.insert(RATELIMIT_RESET, HeaderValue::from(*retry_after_secs));
            }
            ApiError::DeadlineExceeded {
                job_id: Some(id), ..
            } => {
                if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
                    headers.insert(header::LOCATION, v);
                }
            }
            _ => {}
        }
        if let Some(cause) = self.cause() {
            resp.extensions_mut().insert(ErrorCause(cause.into()));
        }
        resp.extensions_mut().insert(problem);
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::from_store(Arc::new(e))
    }
}

impl ApiError {
    /// The one mapping from a store error to the API's. Takes the error shared because a
    /// coalesced read (the job cache: one store read for every concurrent reader of a key)
    /// hands the same failure to every waiting request; the cause logged for a `5xx` is the
    /// store error itself, whose `Display` and `source` chain an `Arc` passes through.
    pub(crate) fn from_store(e: Arc<StoreError>) -> Self {
        match &*e {
            StoreError::NotFound(id) => ApiError::job_not_found(*id),
            StoreError::ScheduleNotFound(_, name) => ApiError::NotFound {
                detail: format!("schedule {name} not found"),
                job_id: None,
            },
            StoreError::IllegalTransition { id, source } => ApiError::IllegalTransition {
                job_id: *id,
                detail: source.to_string(),
            },
            StoreError::Conflict(detail) => ApiError::Conflict {
                detail: detail.clone(),
                job_id: None,
            },
            StoreError::StaleLease(id) => ApiError::StaleLease {
                detail: format!("job {id}: the lease token is stale"),
                job_id: *id,
            },
            StoreError::Invalid { errors, .. } => ApiError::Validation(errors.0.clone()),
            // The database's (or the store's) own words about the value, which name no
            // internals beyond the problem with the data.
            StoreError::Rejected { source, .. } => ApiError::Unprocessable(format!(
                "a value in the request cannot be stored: {source}"
            )),
            StoreError::Transient { .. } => ApiError::Unavailable {
                detail: "the database is temporarily unavailable; retry shortly".to_owned(),
                retry_after_secs: 1,
                cause: Some(Box::new(e)),
            },
            // A leader-only write reached a replica whose term had passed: the new leader
            // does the work; the client may simply retry (on any replica).
            StoreError::NotLeader(_) => ApiError::Unavailable {
                detail: "leadership changed while the request was served; retry shortly".to_owned(),
                retry_after_secs: 1,
                cause: Some(Box::new(e)),
            },
            StoreError::Permanent { .. } => ApiError::internal(e),
            // The operator's to fix, and nothing a client sent: unavailable, with the
            // details kept for the log and /readyz (they name Keel's settings).
            StoreError::Misconfigured { .. } => ApiError::Unavailable {
                detail: "the server cannot use its database as configured; retry later".to_owned(),
                retry_after_secs: 5,
                cause: Some(Box::new(e)),
            },
            StoreError::Unavailable {
                reason,
                retry_after,
            } => ApiError::Unavailable {
                detail: format!("the database is not taking requests ({reason}); retry shortly"),
                retry_after_secs: retry_after_secs(*retry_after),
                // Logged, so the log line of a refused request says why it was refused.
                cause: Some(Box::new(e)),
            },
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up and at least 1 (a `0` invites an instant
/// retry storm).
pub(crate) fn retry_after_secs(d: std::time::Duration) -> u32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

fn too_large_detail(limit: Option<usize>) -> String {
    match limit {
        Some(n) => format!("the request body is larger than the limit of {n} bytes"),
        None => "the request body is larger than the limit".to_owned(),
    }
}

/// Maps one of axum's extractor rejections by the status axum chose for it, so a rejection
/// we did not anticipate still comes out as problem+json with the right status.
fn from_rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit: None },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(text),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Validation(vec![FieldError {
            field: "body".to_owned(),
            message: text,
        }]),
        s if s.is_client_error() => ApiError::BadRequest(text),
        _ => ApiError::internal(text),
    }
}

/// Each of axum's rejections the same way: its status and text, through [`from_rejection`].
macro_rules! from_rejections {
    ($($rejection:ty),+) => {
        $(
            impl From<$rejection> for ApiError {
                fn from(r: $rejection) -> Self {
                    from_rejection(r.status(), r.body_text())
                }
            }
        )+
    };
}

from_rejections!(JsonRejection, BytesRejection, PathRejection, QueryRejection);

/// The fields a `422` names, in order: for the body parsers' tests, which check that every
/// bad field is reported at once.
#[cfg(test)]
pub(crate) fn validation_fields(e: ApiError) -> Vec<String> {
    match e {
        ApiError::Validation(v) => v.into_iter().map(|e| e.field).collect(),
        other => panic!("expected validation, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::{IllegalTransition, Transition};

    #[test]
    fn store_errors_map_to_their_statuses() {
        let id = JobId::new();
        let cases: Vec<(StoreError, StatusCode)> = vec![
            (StoreError::NotFound(id), StatusCode::NOT_FOUND),
            (
                StoreError::IllegalTransition {
                    id,
                    source: IllegalTransition {
                        from: JobState::Completed,
                        transition: Transition::Cancel,
                    },
                },
                StatusCode::CONFLICT,
            ),
            (StoreError::Conflict("dup".into()), StatusCode::CONFLICT),
            (StoreError::StaleLease(id), StatusCode::CONFLICT),
            (
                StoreError::transient("pinging", "connection reset"),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                StoreError::permanent("reading", "disk on fire"),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                StoreError::ScheduleNotFound(
                    keel_core::TenantId::default(),
                    keel_core::ScheduleName::parse("nightly").unwrap(),
                ),
                StatusCode::NOT_FOUND,
            ),
            (StoreError::NotLeader(7), StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (e, want) in cases {
            assert_eq!(ApiError::from(e).classify().0, want);
        }
    }

    #[test]
    fn internal_errors_are_opaque_but_keep_their_cause() {
        let e = ApiError::from(StoreError::permanent(
            "reading job",
            "secret table xyz broke",
        ));
        let p = e.problem();
        assert_eq!(p.detail, "internal error");
        let resp = e.into_response();
        let cause = resp
            .extensions()
            .get::<ErrorCause>()
            .map(|c| c.0.to_string());
        assert_eq!(
            cause.as_deref(),
            Some("store error while reading job: secret table xyz broke")
        );
    }

    #[test]
    fn protection_answers_carry_their_headers_and_name_the_step() {
        let resp = ApiError::Overloaded {
            reason: ShedReason::Backlog,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
        assert!(
            resp.extensions().get::<ErrorCause>().is_none(),
            "nothing to log"
        );

        let resp = ApiError::RateLimited {
            limit: 10,
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        for (h, v) in [
            (header::RETRY_AFTER, "3"),
            (RATELIMIT_LIMIT, "10"),
            (RATELIMIT_REMAINING, "0"),
            (RATELIMIT_RESET, "3"),
        ] {
            assert_eq!(resp.headers()[&h], v, "{h}");
        }

        let p = ApiError::DeadlineExceeded {
            job_id: None,
            step: Some(Step::Auth),
        }
        .problem();
        assert_eq!(p.detail, "deadline exceeded while authenticating");
        let id = JobId::new();
        let p = ApiError::DeadlineExceeded {
            job_id: Some(id),
            step: Some(Step::WaitJob),
        }
        .problem();
        assert_eq!(p.job_id, Some(id));
        assert!(p.detail.contains("keeps running"), "{}", p.detail);
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let resp = ApiError::from(StoreError::transient("x", "y")).into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let resp = ApiError::from(StoreError::NotLeader(3)).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn a_missing_schedule_is_a_plain_not_found() {
        let p = ApiError::from(StoreError::ScheduleNotFound(
            keel_core::TenantId::parse("acme").unwrap(),
            keel_core::ScheduleName::parse("nightly").unwrap(),
        ))
        .problem();
        assert_eq!(p.status, 404);
        assert_eq!(p.type_uri, format!("{PROBLEM_TYPE_BASE}not-found"));
        assert_eq!(p.detail, "schedule nightly not found");
        assert_eq!(p.job_id, None);
    }
}
