//! Request bodies of the worker protocol (docs/workers.md; the types are keel-wire's), read
//! member by member like a job ([`crate::wire_in`]), so a worker author sees every bad
//! field in one `422`, then checked against the protocol's bounds.

use std::time::Duration;

use keel_core::{FieldError, JobId, JobKind, LeaseToken, WorkerId};
use keel_wire::{
    CompleteBody, CompleteItem, FailBody, FailItem, HeartbeatBody, HumanDuration, LeaseBody,
    ReleaseBody,
};
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::wire_in::{Errors, Members, Read, members_of_body, read_body, read_members};

/// Most jobs one lease may take, and most outcomes in one batch.
pub const MAX_LEASE: u32 = 1000;
/// Most kinds in a lease's filter.
pub const MAX_KINDS: usize = 100;
/// The longest a lease may wait for a job: long enough to make idle polling cheap, short
/// enough to sit well inside proxies' idle timeouts.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// The shortest lease: a heartbeat must be able to arrive in time.
pub const MIN_LEASE: Duration = Duration::from_secs(5);
/// The longest lease: past it, a dead worker's jobs wait too long to be rescued.
pub const MAX_LEASE_FOR: Duration = Duration::from_secs(3600);
/// The lease length when none is given.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Most bytes of an error message kept (longer ones are cut at a character boundary).
pub const MAX_ERROR_BYTES: usize = 2048;

/// `POST /v1/queues/{queue}/lease`.
#[derive(Debug, Clone)]
pub struct LeaseIn {
    /// Who leases.
    pub worker: WorkerId,
    /// At most this many jobs.
    pub max: u32,
    /// How long to wait for a first job.
    pub wait: Duration,
    /// How long each lease lasts.
    pub lease_for: Duration,
    /// Only these kinds; empty for every kind.
    pub kinds: Vec<JobKind>,
}

/// `POST /v1/jobs/{id}/heartbeat`.
#[derive(Debug, Clone)]
pub struct HeartbeatIn {
    /// The lease.
    pub token: LeaseToken,
    /// The new lease length from now.
    pub lease_for: Duration,
}

/// One completion: `POST /v1/jobs/{id}/complete`, or one item of `POST /v1/jobs/complete`.
#[derive(Debug, Clone)]
pub struct CompleteIn {
    /// The job.
    pub id: JobId,
    /// The lease.
    pub token: LeaseToken,
    /// The result, as sent (absent is `null`); size and shape are checked by the service.
    pub result: Option<Box<RawValue>>,
}

/// One failure: `POST /v1/jobs/{id}/fail`, or one item of `POST /v1/jobs/fail`.
#[derive(Debug, Clone)]
pub struct FailIn {
    /// The job.
    pub id: JobId,
    /// The lease.
    pub token: LeaseToken,
    /// What went wrong.
    pub error: String,
    /// Discard now, whatever attempts are left.
    pub permanent: bool,
    /// Run again after this long instead of after the backoff.
    pub retry_in: Option<Duration>,
}

/// `"5s"`, or `"1500ms"` when not whole seconds: a bound in a message.
fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("\"{}s\"", d.as_secs())
    } else {
        format!("\"{}ms\"", d.as_millis())
    }
}

/// `d` when given and within `range`, `default` when not given; a bad one is recorded.
fn within(
    errs: &mut Errors<'_>,
    field: &str,
    d: Option<HumanDuration>,
    range: (Duration, Duration),
    default: Duration,
) -> Duration {
    match d {
        None => default,
        Some(HumanDuration(d)) if d >= range.0 && d <= range.1 => d,
        Some(_) => {
            errs.add(
                field,
                format!("must be between {} and {}", human(range.0), human(range.1)),
            );
            default
        }
    }
}

/// A required member: "is required" when the body did not have it; `None` as well when it
/// was there but already failed to read.
fn required<T, W>(read: &Read<W>, errs: &mut Errors<'_>, field: &str, value: T) -> Option<T> {
    if !read.has(field) {
        errs.add(field, "is required");
        None
    } else if errs.names(field) {
        None
    } else {
        Some(value)
    }
}

fn token_of(s: &str, errs: &mut Errors<'_>) -> Option<LeaseToken> {
    LeaseToken::parse(s)
        .map_err(|e| errs.add("token", format!("is not a lease token: {}", e.reason)))
        .ok()
}

fn id_of(s: &str, errs: &mut Errors<'_>) -> Option<JobId> {
    JobId::parse(s).map_err(|e| errs.add("id", e.reason)).ok()
}

/// Parses a lease request.
pub fn parse_lease(body: &[u8]) -> Result<LeaseIn, ApiError> {
    let mut errs = Errors::new("");
    let read = read_body::<LeaseBody>(body, &mut errs)?;
    let worker = required(&read, &mut errs, "worker", read.value.worker.clone()).and_then(|w| {
        WorkerId::parse(w)
            .map_err(|e| errs.add("worker", e.reason))
            .ok()
    });
    let b = read.value;
    let max = match b.max {
        None => 1,
        Some(n) if (1..=MAX_LEASE).contains(&n) => n,
        Some(_) => {
            errs.add(
                "max",
                format!("must be a whole number between 1 and {MAX_LEASE}"),
            );
            1
        }
    };
    let wait = within(
        &mut errs,
        "wait",
        b.wait,
        (Duration::ZERO, MAX_WAIT),
        Duration::ZERO,
    );
    let lease_for = within(
        &mut errs,
        "lease",
        b.lease,
        (MIN_LEASE, MAX_LEASE_FOR),
        DEFAULT_LEASE,
    );
    let mut kinds = Vec::new();
    if let Some(list) = b.kinds {
        if list.is_empty() || list.len() > MAX_KINDS {
            errs.add(
                "kinds",
                format!("must be a list of 1 to {MAX_KINDS} kind names"),
            );
        }
        for (i, k) in list.into_iter().take(MAX_KINDS).enumerate() {
            match JobKind::parse(k) {
                Ok(k) if !kinds.contains(&k) => kinds.push(k),
                Ok(_) => {}
                Err(e) => errs.add(&format!("kinds[{i}]"), e.reason),
            }
        }
    }
    match worker {
        Some(worker) => errs.finish(LeaseIn {
            worker,
            max,
            wait,
            lease_for,
            kinds,
        }),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// Parses a heartbeat.
pub fn parse_heartbeat(body: &[u8]) -> Result<HeartbeatIn, ApiError> {
    let mut errs = Errors::new("");
    let read = read_body::<HeartbeatBody>(body, &mut errs)?;
    let token = required(&read, &mut errs, "token", read.value.token.as_str())
        .and_then(|t| token_of(t, &mut errs));
    let lease_for = within(
        &mut errs,
        "lease",
        read.value.lease,
        (MIN_LEASE, MAX_LEASE_FOR),
        DEFAULT_LEASE,
    );
    match token {
        Some(token) => errs.finish(HeartbeatIn { token, lease_for }),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// The longest `retry_in`: as far ahead as a job may be delayed at enqueue.
const MAX_RETRY_IN: Duration = Duration::from_millis(crate::job_in::MAX_DELAY_MS);

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// A completion from its members; `id` comes from the path for the single form.
fn complete_of(
    read: Read<CompleteItem>,
    id: Option<JobId>,
    errs: &mut Errors<'_>,
) -> Option<CompleteIn> {
    let item = &read.value;
    let id = match id {
        Some(id) => Some(id),
        None => required(&read, errs, "id", item.id.as_str()).and_then(|s| id_of(s, errs)),
    };
    let token = required(&read, errs, "token", item.token.as_str()).and_then(|t| token_of(t, errs));
    Some(CompleteIn {
        id: id?,
        token: token?,
        result: read.value.result,
    })
}

/// A failure from its members; `id` comes from the path for the single form.
fn fail_of(read: Read<FailItem>, id: Option<JobId>, errs: &mut Errors<'_>) -> Option<FailIn> {
    let item = &read.value;
    let id = match id {
        Some(id) => Some(id),
        None => required(&read, errs, "id", item.id.as_str()).and_then(|s| id_of(s, errs)),
    };
    let token = required(&read, errs, "token", item.token.as_str()).and_then(|t| token_of(t, errs));
    let error = required(&read, errs, "error", ());
    let retry_in = item.retry_in.map(|d| {
        within(
            errs,
            "retry_in",
            Some(d),
            (Duration::ZERO, MAX_RETRY_IN),
            d.0,
        )
    });
    let item = read.value;
    error?;
    Some(FailIn {
        id: id?,
        token: token?,
        error: truncate(item.error, MAX_ERROR_BYTES),
        permanent: item.permanent.unwrap_or(false),
        retry_in,
    })
}

/// Reads a single-outcome body (the batch item's shape less `id`).
fn single<B, I, T>(
    body: &[u8],
    id: JobId,
    into_item: fn(B) -> I,
    of: fn(Read<I>, Option<JobId>, &mut Errors<'_>) -> Option<T>,
) -> Result<T, ApiError>
where
    B: serde::de::DeserializeOwned + Default,
{
    let mut errs = Errors::new("");
    let read = read_body::<B>(body, &mut errs)?;
    let read = Read {
        value: into_item(read.value),
        given: read.given,
    };
    checked(read, id, errs, of)
}

/// The outcome `of` makes of `read` for job `id`, or every problem found on the way.
fn checked<I, T>(
    read: Read<I>,
    id: JobId,
    mut errs: Errors<'_>,
    of: fn(Read<I>, Option<JobId>, &mut Errors<'_>) -> Option<T>,
) -> Result<T, ApiError> {
    match of(read, Some(id), &mut errs) {
        Some(v) => errs.finish(v),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// A completion of job `id` from a message that is not JSON (gRPC's `Outcome`, whose
/// fields are always present): the checks the body's members get, without writing the
/// body and reading it back, since it is on every streamed outcome's way.
pub fn complete_item(
    id: JobId,
    token: String,
    result: Option<Box<RawValue>>,
) -> Result<CompleteIn, ApiError> {
    let read = Read {
        value: CompleteItem {
            id: String::new(),
            token,
            result,
        },
        given: vec!["token", "result"],
    };
    checked(read, id, Errors::new(""), complete_of)
}

/// A failure of job `id` from a message that is not JSON; see [`complete_item`].
pub fn fail_item(
    id: JobId,
    token: String,
    error: String,
    permanent: bool,
    retry_in: Option<Duration>,
) -> Result<FailIn, ApiError> {
    let read = Read {
        value: FailItem {
            id: String::new(),
            token,
            error,
            permanent: Some(permanent),
            retry_in: retry_in.map(HumanDuration),
        },
        given: vec!["token", "error", "permanent", "retry_in"],
    };
    checked(read, id, Errors::new(""), fail_of)
}

/// Parses `POST /v1/jobs/{id}/complete`.
pub fn parse_complete(body: &[u8], id: JobId) -> Result<CompleteIn, ApiError> {
    single(
        body,
        id,
        |b: CompleteBody| CompleteItem {
            id: String::new(),
            token: b.token,
            result: b.result,
        },
        complete_of,
    )
}

/// Parses `POST /v1/jobs/{id}/fail`.
pub fn parse_fail(body: &[u8], id: JobId) -> Result<FailIn, ApiError> {
    single(
        body,
        id,
        |b: FailBody| FailItem {
            id: String::new(),
            token: b.token,
            error: b.error,
            permanent: b.permanent,
            retry_in: b.retry_in,
        },
        fail_of,
    )
}

/// Parses `POST /v1/jobs/{id}/release`: only the token.
pub fn parse_release(body: &[u8]) -> Result<LeaseToken, ApiError> {
    let mut errs = Errors::new("");
    let read = read_body::<ReleaseBody>(body, &mut errs)?;
    let token = required(&read, &mut errs, "token", read.value.token.as_str())
        .and_then(|t| token_of(t, &mut errs));
    match token {
        Some(t) => errs.finish(t),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// Reads `{"outcomes": [item, …]}`: every item's problems under `outcomes[i].`.
fn batch<I, T>(
    body: &[u8],
    of: fn(Read<I>, Option<JobId>, &mut Errors<'_>) -> Option<T>,
) -> Result<Vec<T>, ApiError>
where
    I: serde::de::DeserializeOwned + Default,
{
    let members = members_of_body(body)?;
    let mut errs = Errors::new("");
    let mut items: Option<Vec<Box<RawValue>>> = None;
    let msg = format!("must be a list of 1 to {MAX_LEASE} outcomes");
    for (name, raw) in members.0 {
        if name != "outcomes" {
            errs.add(&name, "unknown field; expected outcomes");
        } else if items.is_some() || errs.names("outcomes") {
            errs.add("outcomes", "duplicate field");
        } else {
            match serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()) {
                Ok(list) if (1..=MAX_LEASE as usize).contains(&list.len()) => items = Some(list),
                _ => errs.add("outcomes", msg.clone()),
            }
        }
    }
    let Some(items) = items else {
        if !errs.names("outcomes") {
            errs.add("outcomes", "is required");
        }
        return Err(ApiError::Validation(errs.list));
    };
    let mut out = Vec::with_capacity(items.len());
    let mut all: Vec<FieldError> = errs.list;
    for (i, raw) in items.iter().enumerate() {
        let prefix = format!("outcomes[{i}].");
        let mut item_errs = Errors::new(&prefix);
        match serde_json::from_str::<Members>(raw.get()) {
            Ok(m) => {
                let read = read_members::<I>(m, Some(raw.get()), &mut item_errs);
                if let Some(v) = of(read, None, &mut item_errs)
                    && item_errs.list.is_empty()
                {
                    out.push(v);
                }
            }
            Err(_) => all.push(FieldError {
                field: format!("outcomes[{i}]"),
                message: "must be an object".to_owned(),
            }),
        }
        all.extend(item_errs.list);
    }
    if all.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::Validation(all))
    }
}

/// Parses `POST /v1/jobs/complete`.
pub fn parse_complete_batch(body: &[u8]) -> Result<Vec<CompleteIn>, ApiError> {
    batch(body, complete_of)
}

/// Parses `POST /v1/jobs/fail`.
pub fn parse_fail_batch(body: &[u8]) -> Result<Vec<FailIn>, ApiError> {
    batch(body, fail_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::validation_fields as fields;

    #[test]
    fn a_lease_takes_defaults_and_lists_every_bad_field() {
        let l = parse_lease(br#"{"worker":"w-1"}"#).unwrap();
        assert_eq!(
            (l.max, l.wait, l.lease_for),
            (1, Duration::ZERO, DEFAULT_LEASE)
        );
        let l = parse_lease(br#"{"worker":"w","max":null,"wait":null,"lease":null,"kinds":null}"#)
            .unwrap();
        assert_eq!(
            (l.max, l.wait, l.lease_for, l.kinds.len()),
            (1, Duration::ZERO, DEFAULT_LEASE, 0),
            "null is the default"
        );
        let l = parse_lease(
            br#"{"worker":"w","max":1000,"wait":"30s","lease":"1h","kinds":["a","b","a"]}"#,
        )
        .unwrap();
        assert_eq!(l.max, 1000);
        assert_eq!(l.kinds.len(), 2, "duplicates folded");
        for (body, bad) in [
            (r#"{"max":0}"#, vec!["worker", "max"]),
            (r#"{"worker":"w","max":1001}"#, vec!["max"]),
            (
                r#"{"worker":"w","max":-1,"wait":"31s"}"#,
                vec!["max", "wait"],
            ),
            (r#"{"worker":"w","lease":"4s"}"#, vec!["lease"]),
            (
                r#"{"worker":"w","lease":"2h","kinds":[]}"#,
                vec!["lease", "kinds"],
            ),
            (
                r#"{"worker":"w w","kinds":["ok","no way"]}"#,
                vec!["worker", "kinds[1]"],
            ),
            (
                r#"{"worker":"w","extra":1,"max":2,"max":3}"#,
                vec!["extra", "max"],
            ),
        ] {
            assert_eq!(
                fields(parse_lease(body.as_bytes()).unwrap_err()),
                bad,
                "{body}"
            );
        }
        assert!(matches!(parse_lease(b"[1]"), Err(ApiError::BadRequest(_))));
    }

    #[test]
    fn outcomes_need_a_token_and_batches_name_the_item() {
        let id = JobId::new();
        let token = LeaseToken::new();
        let c = parse_complete(
            format!(r#"{{"token":"{token}","result":{{"a":1}}}}"#).as_bytes(),
            id,
        )
        .unwrap();
        assert_eq!(c.result.unwrap().get(), r#"{"a":1}"#);
        let c = parse_complete(format!(r#"{{"token":"{token}"}}"#).as_bytes(), id).unwrap();
        assert!(c.result.is_none());
        assert_eq!(
            fields(parse_complete(br#"{"result":1}"#, id).unwrap_err()),
            ["token"]
        );
        assert_eq!(
            fields(parse_fail(br#"{"token":"nope","permanent":"yes"}"#, id).unwrap_err()),
            ["permanent", "token", "error"]
        );
        let f = parse_fail(
            format!(
                r#"{{"token":"{token}","error":"{}","retry_in":"10s"}}"#,
                "x".repeat(5000)
            )
            .as_bytes(),
            id,
        )
        .unwrap();
        assert_eq!(f.error.len(), MAX_ERROR_BYTES);
        assert_eq!(f.retry_in, Some(Duration::from_secs(10)));

        let ok = format!(r#"{{"id":"{id}","token":"{token}"}}"#);
        let batch = format!(r#"{{"outcomes":[{ok},{{"token":"{token}"}},3]}}"#);
        assert_eq!(
            fields(parse_complete_batch(batch.as_bytes()).unwrap_err()),
            ["outcomes[1].id", "outcomes[2]"]
        );
        assert_eq!(
            parse_complete_batch(format!(r#"{{"outcomes":[{ok},{ok}]}}"#).as_bytes())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            fields(parse_fail_batch(br#"{"outcomes":[]}"#).unwrap_err()),
            ["outcomes"]
        );
        assert_eq!(fields(parse_release(br#"{}"#).unwrap_err()), ["token"]);
    }
}
