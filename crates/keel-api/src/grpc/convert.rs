//! Between the gRPC messages and the HTTP API's shapes. A `JobSpec` becomes the JSON body
//! `POST /v1/jobs` reads, so a job sent over gRPC is checked by the very parser HTTP uses
//! (`job_in`), with the same messages; what only a protobuf message can get wrong (JSON
//! text that does not parse, a duration in nanoseconds, a timestamp out of range) is
//! reported here, under the message's field names. Stored jobs go out through
//! [`JobOut`], the HTTP rendering, which is also what an idempotency record holds.

use chrono::{DateTime, SecondsFormat, Utc};
use keel_core::{FieldError, JobId};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::pb;
use crate::error::ApiError;

/// A job in the shape of `POST /v1/jobs`'s body. Integers are as wide as the message's, so
/// an out-of-range value is refused by the shared parser with the value quoted.
#[derive(Serialize)]
struct JobBody {
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unique: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Box<RawValue>>,
}

/// Field errors found while converting, each path prefixed (`jobs[3].` in a batch).
pub(crate) struct Problems {
    prefix: String,
    pub(crate) list: Vec<FieldError>,
}

impl Problems {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            list: Vec::new(),
        }
    }

    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(FieldError {
            field: format!("{}{field}", self.prefix),
            message: message.into(),
        });
    }

    /// JSON text as a raw value, or a problem (and `None`) when it does not parse.
    pub(crate) fn json(&mut self, field: &str, text: Option<String>) -> Option<Box<RawValue>> {
        let text = text?;
        RawValue::from_string(text)
            .map_err(|e| self.add(field, format!("is not valid JSON text: {e}")))
            .ok()
    }

    /// A duration as whole milliseconds.
    pub(crate) fn millis(&mut self, field: &str, d: Option<prost_types::Duration>) -> Option<u64> {
        let d = d?;
        if d.seconds < 0 || d.nanos < 0 {
            self.add(field, "must not be negative");
            return None;
        }
        if d.nanos % 1_000_000 != 0 {
            self.add(field, "must be a whole number of milliseconds");
            return None;
        }
        let ms = u64::try_from(d.seconds)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .and_then(|ms| ms.checked_add(u64::try_from(d.nanos / 1_000_000).ok()?));
        if ms.is_none() {
            self.add(field, "is out of range");
        }
        ms
    }

    /// A timestamp in RFC 3339, as the HTTP body carries it.
    fn rfc3339(&mut self, field: &str, t: Option<prost_types::Timestamp>) -> Option<String> {
        let t = t?;
        let at = u32::try_from(t.nanos)
            .ok()
            .and_then(|n| DateTime::<Utc>::from_timestamp(t.seconds, n));
        match at {
            Some(at) => Some(at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => {
                self.add(field, "is not a valid timestamp");
                None
            }
        }
    }
}

/// `spec` as the JSON body `job_in` parses, with the problems only the message can have.
pub(crate) fn job_body(spec: pb::JobSpec, problems: &mut Problems) -> Vec<u8> {
    let backoff = backoff_body(spec.backoff);
    let unique = spec.unique.map(|u| {
        let mut v = json!({"key": u.key, "scope": u.scope});
        if let Some(ms) = problems.millis("unique.period", u.period) {
            v["period"] = json!(ms);
        }
        v
    });
    let body = JobBody {
        kind: spec.kind,
        queue: spec.queue,
        tenant: spec.tenant,
        args: problems.json("args", spec.args),
        priority: spec.priority,
        run_at: problems.rfc3339("run_at", spec.run_at),
        delay_ms: problems.millis("delay", spec.delay),
        max_attempts: spec.max_attempts,
        timeout_ms: problems.millis("timeout", spec.timeout),
        backoff,
        tags: spec.tags,
        unique,
        meta: problems.json("meta", spec.meta),
    };
    // Strings, integers and values already parsed: serialising cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A schedule's job template in the shape of the HTTP body's `job`; integers as wide as the
/// message's, as in [`JobBody`].
#[derive(Serialize)]
struct TemplateBody {
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backoff: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
}

/// A schedule in the shape of `POST /v1/schedules`'s body.
#[derive(Serialize)]
struct ScheduleBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    cron: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    timezone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<TemplateBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused: Option<bool>,
    /// With its unit, as the body requires (`"90000ms"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    catch_up: Option<String>,
}

/// A backoff message as the JSON body's object.
fn backoff_body(b: Option<pb::Backoff>) -> Option<Value> {
    b.and_then(|b| match b.policy? {
        pb::backoff::Policy::Exponential(e) => Some(json!({
            "type": "exponential", "base_ms": e.base_ms, "cap_ms": e.cap_ms,
        })),
        pb::backoff::Policy::Fixed(f) => Some(json!({"type": "fixed", "delay_ms": f.delay_ms})),
    })
}

/// `spec` as the JSON body `schedule_in` parses, with the problems only the message can
/// have (the template's under `job.`).
pub(crate) fn schedule_body(spec: pb::ScheduleSpec, problems: &mut Problems) -> Vec<u8> {
    let job = spec.job.map(|t| TemplateBody {
        kind: t.kind,
        queue: t.queue,
        args: problems.json("job.args", t.args),
        priority: t.priority,
        max_attempts: t.max_attempts,
        timeout_ms: problems.millis("job.timeout", t.timeout),
        backoff: backoff_body(t.backoff),
        tags: t.tags,
    });
    let body = ScheduleBody {
        name: spec.name,
        tenant: spec.tenant,
        cron: spec.cron,
        timezone: spec.timezone,
        job,
        paused: spec.paused,
        catch_up: problems
            .millis("catch_up", spec.catch_up)
            .map(|ms| format!("{ms}ms")),
    };
    // Strings, integers and values already parsed: serialising cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// The outcome of the shared parser, with the conversion's own problems listed first; the
/// field names become the message's (`timeout_ms` is `timeout`).
pub(crate) fn checked<T>(
    parsed: Result<T, ApiError>,
    problems: Vec<FieldError>,
) -> Result<T, ApiError> {
    match (parsed, problems.is_empty()) {
        (Ok(v), true) => Ok(v),
        (Ok(_), false) => Err(ApiError::Validation(problems)),
        (Err(ApiError::Validation(more)), _) => {
            let mut all = problems;
            all.extend(more);
            Err(ApiError::Validation(all))
        }
        (Err(e), _) => Err(e),
    }
}

/// A job id from a request, `INVALID_ARGUMENT` naming `field` when it is not one.
pub(crate) fn job_id(field: &str, s: &str) -> Result<JobId, ApiError> {
    JobId::parse(s).map_err(|e| {
        ApiError::Validation(vec![FieldError {
            field: field.to_owned(),
            message: e.reason,
        }])
    })
}

pub(crate) use keel_proto::convert::{state, state_of};

#[cfg(test)]
mod tests {
    use super::*;

    fn body(spec: pb::JobSpec) -> (Value, Vec<FieldError>) {
        let mut p = Problems::new(String::new());
        let bytes = job_body(spec, &mut p);
        (serde_json::from_slice(&bytes).unwrap(), p.list)
    }

    #[test]
    fn a_spec_becomes_the_http_body() {
        let (v, problems) = body(pb::JobSpec {
            kind: "echo".into(),
            args: Some(r#"{"b": 1,  "a": [1]}"#.into()),
            priority: Some(2),
            timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            run_at: Some(prost_types::Timestamp {
                seconds: 1_900_000_000,
                nanos: 0,
            }),
            backoff: Some(keel_wire::Backoff::Fixed { delay_ms: 5 }.into()),
            tags: vec!["x".into()],
            meta: Some(r#"{"trace":"t"}"#.into()),
            ..Default::default()
        });
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            v,
            json!({"kind": "echo", "args": {"b": 1, "a": [1]}, "priority": 2,
                   "timeout_ms": 1500, "run_at": "2030-03-17T17:46:40Z",
                   "backoff": {"type": "fixed", "delay_ms": 5}, "tags": ["x"],
                   "meta": {"trace": "t"}})
        );
    }

    #[test]
    fn what_only_a_message_can_get_wrong_is_named() {
        let (_, problems) = body(pb::JobSpec {
            kind: "echo".into(),
            args: Some("{nope".into()),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            delay: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            run_at: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            ..Default::default()
        });
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["args", "run_at", "delay", "timeout"]);
    }
}
