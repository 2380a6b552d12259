//! Extractors that reject with [`ApiError`], so a bad path id, a wrong content type or an
//! oversized body comes out as problem+json like every other error.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use keel_core::store::ListParams;
use keel_core::{FieldError, IdempotencyKey, JobId, QueueName, ScheduleName};

use keel_resilience::{RequestScope, Step};

use crate::error::ApiError;
use crate::state::ApiState;

/// The header making an enqueue idempotent (G3).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Stamps out the extractor of a path's one segment as `$ty`: a `400` saying
/// "invalid `$what` in path" and why when it does not parse, the same for every kind of id.
macro_rules! path_extractor {
    ($(#[$attr:meta])* $name:ident($ty:ty), $what:literal) => {
        $(#[$attr])*
        pub(crate) struct $name(pub(crate) $ty);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                let Path(raw) = Path::<String>::from_request_parts(parts, state).await?;
                <$ty>::parse(&raw).map($name).map_err(|e| {
                    let what = concat!("invalid ", $what, " in path");
                    ApiError::BadRequest(format!("{what}: {}", e.reason))
                })
            }
        }
    };
}

path_extractor!(
    /// A job id from the path (`/v1/jobs/{id}`); `400` when it is not a UUID.
    #[derive(Debug, Clone, Copy)]
    JobIdPath(JobId),
    "job id"
);

path_extractor!(
    /// A queue name from the path (`/v1/queues/{queue}/…`); `400` when it is not a valid name.
    #[derive(Debug, Clone)]
    QueuePath(QueueName),
    "queue name"
);

path_extractor!(
    /// A schedule name from the path (`/v1/schedules/{name}…`); `400` when it is not a valid
    /// name.
    #[derive(Debug, Clone)]
    ScheduleNamePath(ScheduleName),
    "schedule name"
);

/// The `Idempotency-Key` header, if sent; `400` when it is not 1..=255 visible ASCII.
#[derive(Debug, Clone)]
pub(crate) struct IdempotencyKeyHeader(pub(crate) Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(v) = parts.headers.get(&IDEMPOTENCY_KEY) else {
            return Ok(Self(None));
        };
        parse_idempotency_key(v).map(|k| Self(Some(k)))
    }
}

/// An `Idempotency-Key` header's value; `400` naming what is wrong with it.
pub(crate) fn parse_idempotency_key(v: &HeaderValue) -> Result<IdempotencyKey, ApiError> {
    let s = v.to_str().map_err(|_| {
        ApiError::BadRequest(
            "invalid Idempotency-Key: may contain only visible ASCII characters".to_owned(),
        )
    })?;
    parse_idempotency_key_text(s)
}

/// An idempotency key as sent (the `Idempotency-Key` header, or gRPC's `idempotency-key`
/// metadata), `400` / `INVALID_ARGUMENT` saying why when it is not one.
pub(crate) fn parse_idempotency_key_text(s: &str) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(s)
        .map_err(|e| ApiError::BadRequest(format!("invalid Idempotency-Key: {}", e.reason)))
}

/// Parses a query string given as its `(name, value)` pairs, reporting every bad parameter
/// at once: a name not in `known`, a name given more than once, and a value `apply` refuses
/// (with its message). `apply` is called once per known name given, with the name as spelled
/// in `known` and its value. Every error is listed, in the order of the pairs, in a `400`.
pub(crate) fn parse_query_fields(
    pairs: impl IntoIterator<Item = (String, String)>,
    known: &[&str],
    mut apply: impl FnMut(&str, String) -> Result<(), String>,
) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in pairs {
        let Some(field) = known.iter().copied().find(|n| *n == name) else {
            errors.push(FieldError {
                field: name,
                message: format!("unknown parameter; expected one of {}", known.join(", ")),
            });
            continue;
        };
        if seen.contains(&field) {
            errors.push(FieldError {
                field: field.to_owned(),
                message: "given more than once".to_owned(),
            });
            continue;
        }
        seen.push(field);
        if let Err(message) = apply(field, value) {
            errors.push(FieldError {
                field: field.to_owned(),
                message,
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidQuery(errors))
    }
}

/// Parses a `limit` query parameter: a whole number in `1..=ListParams::MAX_LIMIT`.
pub(crate) fn parse_limit(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if (1..=ListParams::MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number between 1 and {}",
            ListParams::MAX_LIMIT
        )),
    }
}

/// Whether a `Content-Type` is JSON: `application/json` or `application/*+json`, with any
/// parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The raw bytes of a JSON request body, unparsed: the handlers parse field by field (to
/// report every error) and hash the exact bytes (idempotency fingerprint). `415` when a
/// non-empty body is not declared as JSON, `413` past `max_body_bytes`.
#[derive(Debug, Clone)]
pub(crate) struct JsonBody(pub(crate) Bytes);

impl FromRequest<ApiState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        let json = is_json(req.headers());
        let limit = state.config.max_body_bytes;
        // A body that does not arrive in time is the client's doing: `408`, not `504`.
        RequestScope::enter_current(Step::ReadBody);
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| match ApiError::from(e) {
                ApiError::PayloadTooLarge { .. } => {
                    ApiError::PayloadTooLarge { limit: Some(limit) }
                }
                other => other,
            })?;
        RequestScope::enter_current(Step::Validate);
        if body.is_empty() {
            return Err(ApiError::BadRequest(
                "the request body is empty; expected a JSON object".to_owned(),
            ));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType(
                "the request body must be sent with Content-Type: application/json".to_owned(),
            ));
        }
        Ok(Self(body))
    }
}

/// A query as axum hands it to [`parse_query_fields`], from literals: for the query parsers'
/// tests.
#[cfg(test)]
pub(crate) fn query_pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
    q.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.keel+json",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ok));
            assert!(is_json(&h), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "json"] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(bad));
            assert!(!is_json(&h), "{bad}");
        }
    }
}
