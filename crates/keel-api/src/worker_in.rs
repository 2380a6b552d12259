//! Request bodies of the worker protocol (docs/workers.md), parsed member by member like
//! [`crate::job_in`], so a worker author sees every bad field in one `422`.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_core::{FieldError, JobId, JobKind, LeaseToken, WorkerId};
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::job_in::{Errors, Members, members_of_body, parse_duration};

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

/// Ends a parse: the value, or a `422` listing every error.
fn finish<T>(value: T, errs: Errors<'_>) -> Result<T, ApiError> {
    if errs.list.is_empty() {
        Ok(value)
    } else {
        Err(ApiError::Validation(errs.list))
    }
}

/// Fields whose `null` means "not given" (take the default), as in a job body.
const OPTIONAL: &[&str] = &["max", "wait", "lease", "kinds", "permanent", "retry_in"];

/// Records unknown and repeated members; returns the known ones by name, leaving out
/// optional fields sent as `null`.
fn known<'m>(
    members: &'m Members,
    fields: &[&str],
    errs: &mut Errors<'_>,
) -> Vec<(&'m str, &'m RawValue)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (name, raw) in &members.0 {
        if !fields.contains(&name.as_str()) {
            errs.add(
                name,
                format!("unknown field; expected one of {}", fields.join(", ")),
            );
        } else if !seen.insert(name.as_str()) {
            errs.add(name, "given more than once");
        } else if !(OPTIONAL.contains(&name.as_str()) && raw.get().trim() == "null") {
            out.push((name.as_str(), raw.as_ref()));
        }
    }
    out
}

fn duration_in(
    errs: &mut Errors<'_>,
    field: &str,
    raw: &RawValue,
    range: (Duration, Duration),
) -> Option<Duration> {
    match parse_duration(raw) {
        Ok(d) if d >= range.0 && d <= range.1 => Some(d),
        Ok(_) => {
            errs.add(
                field,
                format!("must be between {} and {}", human(range.0), human(range.1)),
            );
            None
        }
        Err(m) => {
            errs.add(field, m);
            None
        }
    }
}

fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("\"{}s\"", d.as_secs())
    } else {
        format!("\"{}ms\"", d.as_millis())
    }
}

fn token_in(errs: &mut Errors<'_>, raw: &RawValue) -> Option<LeaseToken> {
    let s: String = errs.parse("token", raw, Some("must be the lease token, a string"))?;
    match LeaseToken::parse(&s) {
        Ok(t) => Some(t),
        Err(e) => {
            errs.add("token", format!("is not a lease token: {}", e.reason));
            None
        }
    }
}

fn missing(errs: &mut Errors<'_>, field: &str) {
    errs.add(field, "is required");
}

/// Parses a lease request.
pub fn parse_lease(body: &[u8]) -> Result<LeaseIn, ApiError> {
    const FIELDS: &[&str] = &["worker", "max", "wait", "lease", "kinds"];
    let members = members_of_body(body)?;
    let mut errs = Errors {
        prefix: "",
        list: Vec::new(),
    };
    let mut worker = None;
    let mut out = LeaseFields {
        max: 1,
        wait: Duration::ZERO,
        lease_for: DEFAULT_LEASE,
        kinds: Vec::new(),
    };
    for (name, raw) in known(&members, FIELDS, &mut errs) {
        match name {
            "worker" => {
                if let Some(s) =
                    errs.parse::<String>("worker", raw, Some("must be a string naming the worker"))
                {
                    match WorkerId::parse(s) {
                        Ok(w) => worker = Some(w),
                        Err(e) => errs.add("worker", e.reason),
                    }
                }
            }
            "max" => {
                let msg = format!("must be a whole number between 1 and {MAX_LEASE}");
                match errs.parse::<u64>("max", raw, Some(&msg)) {
                    Some(n) if (1..=u64::from(MAX_LEASE)).contains(&n) => out.max = n as u32,
                    Some(_) => errs.add("max", msg),
                    None => {}
                }
            }
            "wait" => {
                if let Some(d) = duration_in(&mut errs, "wait", raw, (Duration::ZERO, MAX_WAIT)) {
                    out.wait = d;
                }
            }
            "lease" => {
                if let Some(d) = duration_in(&mut errs, "lease", raw, (MIN_LEASE, MAX_LEASE_FOR)) {
                    out.lease_for = d;
                }
            }
            "kinds" => {
                let msg = format!("must be a list of 1 to {MAX_KINDS} kind names");
                if let Some(list) = errs.parse::<Vec<String>>("kinds", raw, Some(&msg)) {
                    if list.is_empty() || list.len() > MAX_KINDS {
                        errs.add("kinds", msg);
                    }
                    for (i, k) in list.into_iter().take(MAX_KINDS).enumerate() {
                        match JobKind::parse(k) {
                            Ok(k) if !out.kinds.contains(&k) => out.kinds.push(k),
                            Ok(_) => {}
                            Err(e) => errs.add(&format!("kinds[{i}]"), e.reason),
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let Some(worker) = worker else {
        if !errs.list.iter().any(|e| e.field == "worker") {
            missing(&mut errs, "worker");
        }
        return Err(ApiError::Validation(errs.list));
    };
    let LeaseFields {
        max,
        wait,
        lease_for,
        kinds,
    } = out;
    finish(
        LeaseIn {
            worker,
            max,
            wait,
            lease_for,
            kinds,
        },
        errs,
    )
}

/// A lease's optional fields, with their defaults, while the body is read.
struct LeaseFields {
    max: u32,
    wait: Duration,
    lease_for: Duration,
    kinds: Vec<JobKind>,
}

/// Parses a heartbeat.
pub fn parse_heartbeat(body: &[u8]) -> Result<HeartbeatIn, ApiError> {
    const FIELDS: &[&str] = &["token", "lease"];
    let members = members_of_body(body)?;
    let mut errs = Errors {
        prefix: "",
        list: Vec::new(),
    };
    let mut token = None;
    let mut lease_for = DEFAULT_LEASE;
    let mut token_given = false;
    for (name, raw) in known(&members, FIELDS, &mut errs) {
        match name {
            "token" => {
                token_given = true;
                token = token_in(&mut errs, raw);
            }
            "lease" => {
                if let Some(d) = duration_in(&mut errs, "lease", raw, (MIN_LEASE, MAX_LEASE_FOR)) {
                    lease_for = d;
                }
            }
            _ => {}
        }
    }
    if !token_given {
        missing(&mut errs, "token");
    }
    match token {
        Some(token) => finish(HeartbeatIn { token, lease_for }, errs),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// Reads the members of one outcome into `errs` (prefixed) and returns it when whole.
/// `id` comes from the path for the single forms and from the item for the batch forms.
fn read_outcome<T>(
    members: &Members,
    id: Option<JobId>,
    errs: &mut Errors<'_>,
    fail: bool,
    build: impl FnOnce(JobId, LeaseToken, OutcomeFields) -> T,
) -> Option<T> {
    let mut fields: Vec<&str> = vec!["token"];
    if id.is_none() {
        fields.push("id");
    }
    if fail {
        fields.extend(["error", "permanent", "retry_in"]);
    } else {
        fields.push("result");
    }
    let mut job = id;
    let mut token = None;
    let mut given = BTreeSet::new();
    let mut of = OutcomeFields::default();
    for (name, raw) in known(members, &fields, errs) {
        given.insert(name);
        match name {
            "id" => {
                if let Some(s) = errs.parse::<String>("id", raw, Some("must be a job id")) {
                    match JobId::parse(&s) {
                        Ok(i) => job = Some(i),
                        Err(e) => errs.add("id", e.reason),
                    }
                }
            }
            "token" => token = token_in(errs, raw),
            "result" => of.result = Some(raw.to_owned()),
            "error" => {
                if let Some(s) = errs.parse::<String>("error", raw, Some("must be a string")) {
                    of.error = Some(truncate(s, MAX_ERROR_BYTES));
                }
            }
            "permanent" => {
                if let Some(b) = errs.parse::<bool>("permanent", raw, Some("must be true or false"))
                {
                    of.permanent = b;
                }
            }
            "retry_in" => {
                // As far ahead as a job may be delayed at enqueue.
                let max = Duration::from_millis(crate::job_in::MAX_DELAY_MS);
                of.retry_in = duration_in(errs, "retry_in", raw, (Duration::ZERO, max));
            }
            _ => {}
        }
    }
    for required in ["id", "token", "error"] {
        if fields.contains(&required) && !given.contains(required) {
            missing(errs, required);
        }
    }
    if fail && of.error.is_none() {
        return None;
    }
    Some(build(job?, token?, of))
}

/// The optional members of an outcome.
#[derive(Default)]
struct OutcomeFields {
    result: Option<Box<RawValue>>,
    error: Option<String>,
    permanent: bool,
    retry_in: Option<Duration>,
}

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

fn complete_from(id: JobId, token: LeaseToken, f: OutcomeFields) -> CompleteIn {
    CompleteIn {
        id,
        token,
        result: f.result,
    }
}

fn fail_from(id: JobId, token: LeaseToken, f: OutcomeFields) -> FailIn {
    FailIn {
        id,
        token,
        error: f.error.unwrap_or_default(),
        permanent: f.permanent,
        retry_in: f.retry_in,
    }
}

fn single<T>(
    body: &[u8],
    id: JobId,
    fail: bool,
    build: impl FnOnce(JobId, LeaseToken, OutcomeFields) -> T,
) -> Result<T, ApiError> {
    let members = members_of_body(body)?;
    let mut errs = Errors {
        prefix: "",
        list: Vec::new(),
    };
    let out = read_outcome(&members, Some(id), &mut errs, fail, build);
    match out {
        Some(v) => finish(v, errs),
        None => Err(ApiError::Validation(errs.list)),
    }
}

/// Parses `POST /v1/jobs/{id}/complete`.
pub fn parse_complete(body: &[u8], id: JobId) -> Result<CompleteIn, ApiError> {
    single(body, id, false, complete_from)
}

/// Parses `POST /v1/jobs/{id}/fail`.
pub fn parse_fail(body: &[u8], id: JobId) -> Result<FailIn, ApiError> {
    single(body, id, true, fail_from)
}

/// Parses `POST /v1/jobs/{id}/release`: only the token.
pub fn parse_release(body: &[u8]) -> Result<LeaseToken, ApiError> {
    let members = members_of_body(body)?;
    let mut errs = Errors {
        prefix: "",
        list: Vec::new(),
    };
    let mut token = None;
    let mut given = false;
    for (name, raw) in known(&members, &["token"], &mut errs) {
        if name == "token" {
            given = true;
            token = token_in(&mut errs, raw);
        }
    }
    if !given {
        missing(&mut errs, "token");
    }
    match token {
        Some(t) => finish(t, errs),
        None => Err(ApiError::Validation(errs.list)),
    }
}

fn batch<T>(
    body: &[u8],
    fail: bool,
    build: fn(JobId, LeaseToken, OutcomeFields) -> T,
) -> Result<Vec<T>, ApiError> {
    let members = members_of_body(body)?;
    let mut errs = Errors {
        prefix: "",
        list: Vec::new(),
    };
    let mut items = None;
    for (name, raw) in known(&members, &["outcomes"], &mut errs) {
        if name == "outcomes" {
            let msg = format!("must be a list of 1 to {MAX_LEASE} outcomes");
            if let Some(list) = errs.parse::<Vec<Box<RawValue>>>("outcomes", raw, Some(&msg)) {
                if list.is_empty() || list.len() > MAX_LEASE as usize {
                    errs.add("outcomes", msg);
                } else {
                    items = Some(list);
                }
            }
        }
    }
    let Some(items) = items else {
        if errs.list.is_empty() {
            missing(&mut errs, "outcomes");
        }
        return Err(ApiError::Validation(errs.list));
    };
    let mut out = Vec::with_capacity(items.len());
    let mut all: Vec<FieldError> = errs.list;
    for (i, raw) in items.iter().enumerate() {
        let prefix = format!("outcomes[{i}].");
        let mut item_errs = Errors {
            prefix: &prefix,
            list: Vec::new(),
        };
        match serde_json::from_str::<Members>(raw.get()) {
            Ok(m) => {
                if let Some(v) = read_outcome(&m, None, &mut item_errs, fail, build)
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
    batch(body, false, complete_from)
}

/// Parses `POST /v1/jobs/fail`.
pub fn parse_fail_batch(body: &[u8]) -> Result<Vec<FailIn>, ApiError> {
    batch(body, true, fail_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(e: ApiError) -> Vec<String> {
        match e {
            ApiError::Validation(list) => list.into_iter().map(|f| f.field).collect(),
            other => panic!("expected a 422, got {other:?}"),
        }
    }

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
            (r#"{"max":0}"#, vec!["max", "worker"]),
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
            ["token", "permanent", "error"]
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
