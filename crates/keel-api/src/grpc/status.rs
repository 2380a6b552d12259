//! The one mapping from [`ApiError`] to a gRPC status: the same classification as HTTP (the
//! problem `type` slug becomes the `ErrorInfo` reason), with the richer error model's
//! details: `BadRequest` lists every invalid field, `RetryInfo` says when to come back.
//! An internal error stays opaque, as over HTTP: the cause is logged, never sent.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::ApiError;

/// `ErrorInfo.domain` of every Keel error.
pub const ERROR_DOMAIN: &str = "keel.dev";

/// The gRPC code of each kind of failure (HTTP's status in a comment where it differs in
/// spirit).
fn code(e: &ApiError) -> Code {
    match e {
        ApiError::BadRequest(_)
        | ApiError::InvalidQuery(_)
        | ApiError::UnsupportedMediaType(_)
        | ApiError::Validation(_)
        // 422 "cannot be acted on as a whole": the value itself is refused.
        | ApiError::Unprocessable(_) => Code::InvalidArgument,
        ApiError::Unauthorized => Code::Unauthenticated,
        ApiError::Forbidden(_) => Code::PermissionDenied,
        ApiError::NotFound { .. } => Code::NotFound,
        ApiError::MethodNotAllowed => Code::Unimplemented,
        // 409s about the job's state: retrying the same call will not help until it changes.
        ApiError::IllegalTransition { .. }
        | ApiError::StaleLease { .. }
        | ApiError::QueueServedHere(_)
        | ApiError::JobNotCompleted { .. } => Code::FailedPrecondition,
        ApiError::Conflict { .. } => Code::Aborted,
        ApiError::IdempotencyKeyReused(_) => Code::AlreadyExists,
        ApiError::PayloadTooLarge { .. } | ApiError::RateLimited { .. } => {
            Code::ResourceExhausted
        }
        ApiError::Internal(_) => Code::Internal,
        ApiError::Unavailable { .. } | ApiError::Overloaded { .. } => Code::Unavailable,
        ApiError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
    }
}

/// Seconds a client should wait before retrying, where the error says.
fn retry_after(e: &ApiError) -> Option<u32> {
    match e {
        ApiError::Unavailable {
            retry_after_secs, ..
        }
        | ApiError::RateLimited {
            retry_after_secs, ..
        } => Some(*retry_after_secs),
        ApiError::Overloaded { .. } => Some(1),
        _ => None,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let (_, slug) = e.classify();
        if let Some(cause) = e.cause() {
            tracing::warn!(error = %e, cause, reason = slug, "gRPC call failed");
        }
        let problem = e.problem();
        let mut details = ErrorDetails::new();
        for f in &problem.errors {
            details.add_bad_request_violation(grpc_field(&f.field), f.message.clone());
        }
        let mut metadata = HashMap::new();
        if let Some(id) = problem.job_id {
            metadata.insert("job_id".to_owned(), id.to_string());
        }
        if let Some(state) = problem.state {
            metadata.insert("state".to_owned(), state.to_string());
        }
        details.set_error_info(slug, ERROR_DOMAIN, metadata);
        if let Some(secs) = retry_after(&e) {
            details.set_retry_info(Some(Duration::from_secs(u64::from(secs))));
        }
        Status::with_error_details(code(&e), problem.detail, details)
    }
}

/// A field path as the gRPC messages name it: the HTTP body's `timeout_ms` and `delay_ms`
/// are the `timeout` and `delay` durations of `JobSpec`; every other name is shared.
pub(crate) fn grpc_field(http: &str) -> String {
    let (prefix, last) = match http.rsplit_once('.') {
        Some((p, l)) => (Some(p), l),
        None => (None, http),
    };
    let last = match last {
        "timeout_ms" => "timeout",
        "delay_ms" => "delay",
        other => other,
    };
    match prefix {
        Some(p) => format!("{p}.{last}"),
        None => last.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{FieldError, JobId, JobState};

    use super::*;

    #[test]
    fn validation_lists_every_field_under_its_grpc_name() {
        let status = Status::from(ApiError::Validation(vec![
            FieldError {
                field: "priority".into(),
                message: "must be 0-9".into(),
            },
            FieldError {
                field: "jobs[2].timeout_ms".into(),
                message: "too long".into(),
            },
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["priority", "jobs[2].timeout"]);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("validation", ERROR_DOMAIN)
        );
    }

    #[test]
    fn every_kind_has_its_code_and_retry_info_where_it_says_when() {
        let id = JobId::new();
        for (e, want) in [
            (ApiError::Unauthorized, Code::Unauthenticated),
            (ApiError::Forbidden("no".into()), Code::PermissionDenied),
            (ApiError::job_not_found(id), Code::NotFound),
            (
                ApiError::JobNotCompleted {
                    job_id: id,
                    state: JobState::Cancelled,
                    detail: "cancelled".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ApiError::IdempotencyKeyReused("k".into()),
                Code::AlreadyExists,
            ),
            (
                ApiError::RateLimited {
                    limit: 10,
                    retry_after_secs: 3,
                },
                Code::ResourceExhausted,
            ),
            (ApiError::internal("secret cause"), Code::Internal),
        ] {
            let status = Status::from(e);
            assert_eq!(status.code(), want, "{status:?}");
        }
        let limited = Status::from(ApiError::RateLimited {
            limit: 10,
            retry_after_secs: 3,
        });
        assert_eq!(
            limited.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(3))
        );
        let internal = Status::from(ApiError::internal("secret cause"));
        assert_eq!(internal.message(), "internal error");
        let gone = Status::from(ApiError::job_not_found(id));
        let info = gone.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.metadata.get("job_id"), Some(&id.to_string()));
    }

    #[test]
    fn http_field_names_become_grpc_names() {
        assert_eq!(grpc_field("timeout_ms"), "timeout");
        assert_eq!(grpc_field("jobs[0].delay_ms"), "jobs[0].delay");
        assert_eq!(grpc_field("unique.period"), "unique.period");
        assert_eq!(grpc_field("args"), "args");
    }
}
