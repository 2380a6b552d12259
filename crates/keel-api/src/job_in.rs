//! Turning a request body into [`NewJob`]s, reporting every problem at once.
//!
//! A derived `Deserialize` stops at the first bad field. Clients fix requests faster when
//! they see all of them, so the body is first split into `(name, raw JSON)` pairs (any valid
//! JSON object splits; anything else is a `400`), then each field is parsed on its own and
//! every failure — a wrong type, an unknown or duplicate field, an out-of-range value — is
//! collected, then [`NewJob::validate`] adds its bound checks. `args` is kept as the raw
//! text the client sent, byte for byte.
//!
//! The same parser reads the job template of a schedule ([`parse_template`]): the fields a
//! template fixes, with the same defaults and messages.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_core::{
    Backoff, FieldError, JobKind, JobTemplate, NewJob, Priority, QueueName, TenantId, Timestamp,
    Unique, UniqueScope, UniqueScopeKind,
};
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use keel_runtime::Catalog;

use crate::auth::Caller;
use crate::error::ApiError;

/// Most jobs in one batch request.
pub const MAX_BATCH: usize = 1000;

/// The longest `delay_ms`: ten years. (`run_at` is bounded absolutely, by
/// [`keel_core::NewJob::MIN_RUN_AT`] and [`keel_core::NewJob::MAX_RUN_AT`], a range the OpenAPI
/// document can state.) Both keep timestamps well inside the range every layer can
/// represent (nanosecond `chrono` arithmetic ends in 2262), so no client value can overflow
/// one.
pub const MAX_DELAY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The fields of a job body, in a stable order for messages.
const JOB_FIELDS: &[&str] = &[
    "kind",
    "queue",
    "tenant",
    "args",
    "priority",
    "run_at",
    "delay_ms",
    "max_attempts",
    "timeout_ms",
    "backoff",
    "tags",
    "unique",
];

/// The fields of a schedule's job template: a job's, less those a tick decides (tenant, run
/// time) or that make no sense for a recurring job (uniqueness: every tick is a new job).
const TEMPLATE_FIELDS: &[&str] = &[
    "kind",
    "queue",
    "args",
    "priority",
    "max_attempts",
    "timeout_ms",
    "backoff",
    "tags",
];

/// The window of a unique key of scope `period` when the body gives none.
pub(crate) const DEFAULT_UNIQUE_PERIOD: Duration = Duration::from_secs(60);

/// The members of `unique`.
const UNIQUE_FIELDS: &[&str] = &["key", "scope", "period"];

/// The fields of a job waited for by `POST /v1/process`: a job's, less the run time. A job
/// scheduled for later could only outlive its request (and end in a certain `504`), so the
/// fields that delay it are refused rather than half-honoured.
const PROCESS_FIELDS: &[&str] = &[
    "kind",
    "queue",
    "tenant",
    "args",
    "priority",
    "max_attempts",
    "timeout_ms",
    "backoff",
    "tags",
    "unique",
];

/// What is being parsed: a job to enqueue, one to enqueue and wait for, or a schedule's
/// template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Job,
    Process,
    Template,
}

impl Shape {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Shape::Job => JOB_FIELDS,
            Shape::Process => PROCESS_FIELDS,
            Shape::Template => TEMPLATE_FIELDS,
        }
    }
}

/// A JSON object's members as raw JSON, in order, duplicates kept (so they can be
/// reported).
pub(crate) struct Members(pub(crate) Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<Box<RawValue>>()?;
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// Splits a request body into its members; `400` if it is not valid JSON or not an
/// object.
pub(crate) fn members_of_body(body: &[u8]) -> Result<Members, ApiError> {
    serde_json::from_slice::<Members>(body).map_err(|e| {
        let what = if e.is_data() {
            "the request body must be a JSON object"
        } else {
            "the request body is not valid JSON"
        };
        ApiError::BadRequest(format!("{what}: {e}"))
    })
}

/// A serde error message without its " at line 1 column 7" suffix, which points into the
/// field's own text and would only confuse.
fn serde_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map_or(s.clone(), str::to_owned)
}

/// Collects field errors under a path prefix (`""` or `jobs[3].`).
pub(crate) struct Errors<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) list: Vec<FieldError>,
}

impl Errors<'_> {
    pub(crate) fn add(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(FieldError {
            field: format!("{}{field}", self.prefix),
            message: message.into(),
        });
    }

    /// Parses `raw` as `T`, recording `message` (or serde's own when `None`) on failure.
    /// A number with no fractional part counts as an integer (`5.0` as `5`), as JSON Schema
    /// says it is: clients whose JSON libraries write every number as a float must not see
    /// their integers refused.
    pub(crate) fn parse<T: DeserializeOwned>(
        &mut self,
        field: &str,
        raw: &RawValue,
        message: Option<&str>,
    ) -> Option<T> {
        let parsed = serde_json::from_str::<T>(raw.get()).or_else(|e| {
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(raw.get()) else {
                return Err(e);
            };
            if integral_floats_to_integers(&mut v) {
                serde_json::from_value::<T>(v)
            } else {
                Err(e)
            }
        });
        match parsed {
            Ok(v) => Some(v),
            Err(e) => {
                let msg = message.map_or_else(|| serde_message(&e), str::to_owned);
                self.add(field, msg);
                None
            }
        }
    }
}

/// Turns every number in `v` that is a float with no fractional part (within the integer
/// range) into an integer; says whether it changed anything.
fn integral_floats_to_integers(v: &mut serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Only exactly representable integers: |f| < 2^53.
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                *v = if f < 0.0 {
                    serde_json::Value::from(f as i64)
                } else {
                    serde_json::Value::from(f as u64)
                };
                true
            } else {
                false
            }
        }
        serde_json::Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, i| integral_floats_to_integers(i) | changed),
        serde_json::Value::Object(members) => members
            .values_mut()
            .fold(false, |changed, m| integral_floats_to_integers(m) | changed),
        _ => false,
    }
}

/// What a duration field accepts, for messages.
pub(crate) const DURATION_SYNTAX: &str = "must be a duration: whole milliseconds, or a string \
    of numbers with units ms, s, m, h, d, such as \"500ms\", \"30s\", \"1h\" or \"1h30m\"";

/// Parses a duration given as whole milliseconds (`3600000`, as the `_ms` fields take) or as
/// a string of `<number><unit>` parts (`"1h"`, `"1h30m"`, `"500ms"`; units ms, s, m, h, d).
pub(crate) fn parse_duration(raw: &RawValue) -> Result<Duration, String> {
    if let Ok(ms) = serde_json::from_str::<u64>(raw.get()) {
        return Ok(Duration::from_millis(ms));
    }
    if let Ok(f) = serde_json::from_str::<f64>(raw.get())
        && f.fract() == 0.0
        && (0.0..9_007_199_254_740_992.0).contains(&f)
    {
        return Ok(Duration::from_millis(f as u64));
    }
    parse_duration_with_unit(raw)
}

/// [`parse_duration`] for a field whose name gives no unit and whose values are minutes or
/// hours (a schedule's `catch_up`): a bare number is refused rather than read as
/// milliseconds, since `5` meant as five minutes would silently become 5 ms.
pub(crate) fn parse_duration_with_unit(raw: &RawValue) -> Result<Duration, String> {
    if serde_json::from_str::<f64>(raw.get()).is_ok() {
        return Err(
            "must be a string with a unit, such as \"30m\" or \"1h\" (a bare number is \
             ambiguous)"
                .to_owned(),
        );
    }
    let s: String = serde_json::from_str(raw.get()).map_err(|_| DURATION_SYNTAX.to_owned())?;
    duration_of_str(s.trim()).ok_or_else(|| DURATION_SYNTAX.to_owned())
}

fn duration_of_str(s: &str) -> Option<Duration> {
    let mut total_ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let per_unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ms = total_ms.checked_add(n.checked_mul(per_unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// Parses `unique` into `job.unique`, recording every problem under `unique.*`. When some
/// member is wrong but the key parsed, a stand-in is still set so that the bound checks of
/// [`NewJob::validate`] report the key's (and period's) problems too; the errors already
/// recorded keep the job from being accepted.
fn parse_unique(raw: &RawValue, job: &mut NewJob, errs: &mut Errors<'_>) {
    let Ok(members) = serde_json::from_str::<Members>(raw.get()) else {
        errs.add(
            "unique",
            "must be an object: {\"key\": \"...\", \"scope\": \"queued\" | \"active\" | \"period\", \"period\": \"1h\"}",
        );
        return;
    };
    let mut seen: Vec<&'static str> = Vec::new();
    let (mut key, mut scope, mut period) = (None, None, None);
    for (name, raw) in members.0 {
        let Some(field) = UNIQUE_FIELDS.iter().copied().find(|f| *f == name) else {
            errs.add(
                &format!("unique.{name}"),
                format!(
                    "unknown field; expected one of {}",
                    UNIQUE_FIELDS.join(", ")
                ),
            );
            continue;
        };
        let path = format!("unique.{field}");
        if seen.contains(&field) {
            errs.add(&path, "duplicate field");
            continue;
        }
        seen.push(field);
        match field {
            "key" => key = errs.parse::<String>(&path, &raw, Some("must be a string")),
            "scope" => {
                let msg = "must be one of queued, active, period";
                match errs
                    .parse::<String>(&path, &raw, Some(msg))
                    .map(|s| UniqueScopeKind::parse(&s))
                {
                    Some(Some(k)) => scope = Some(k),
                    Some(None) => errs.add(&path, msg),
                    None => {}
                }
            }
            // `null` is "not given", as for a job's optional fields.
            _ if raw.get() == "null" => {}
            // Checked whatever the scope, so a bad value never passes unnoticed.
            _ => match parse_duration(&raw) {
                Ok(p) if (UniqueScope::MIN_PERIOD..=UniqueScope::MAX_PERIOD).contains(&p) => {
                    period = Some(p);
                }
                Ok(p) => errs.add(
                    &path,
                    format!(
                        "must be between {} s and {} days, got {} ms",
                        UniqueScope::MIN_PERIOD.as_secs(),
                        UniqueScope::MAX_PERIOD.as_secs() / 86_400,
                        p.as_millis()
                    ),
                ),
                Err(m) => errs.add(&path, m),
            },
        }
    }
    if key.is_none() && !seen.contains(&"key") {
        errs.add("unique.key", "is required");
    }
    // `period` is the window of scope `period` (60 s when not given, Oban's default) and
    // means nothing to the other scopes, which ignore it: no field depends on another, so
    // every body a schema allows is accepted.
    let window = period.unwrap_or(DEFAULT_UNIQUE_PERIOD);
    let scope = match scope {
        Some(UniqueScopeKind::Queued) => UniqueScope::Queued,
        Some(UniqueScopeKind::Active) => UniqueScope::Active,
        Some(UniqueScopeKind::Period) => UniqueScope::Period(window),
        None => {
            if !seen.contains(&"scope") {
                errs.add("unique.scope", "is required (queued, active or period)");
            }
            UniqueScope::Active
        }
    };
    if let Some(key) = key {
        job.unique = Some(Unique { key, scope });
    }
}

/// What parsing a job needs besides its body.
pub(crate) struct JobContext<'a> {
    /// Who is calling: decides the tenant, and refuses another.
    pub(crate) caller: &'a Caller,
    /// What runs here: a job on a queue served here must have a kind with a handler and
    /// args that handler accepts.
    pub(crate) catalog: &'a Catalog,
    /// The cap on `args`.
    pub(crate) max_args_bytes: usize,
    /// "Now", for `delay_ms`.
    pub(crate) now: Timestamp,
}

/// A job that failed to parse: field errors (`422`) or a tenant the caller may not use
/// (`403`, which wins: it is not something the client can fix by editing fields).
enum JobFailure {
    Fields(Vec<FieldError>),
    Forbidden(ApiError),
}

/// Parses one job object (already split into members). Field paths get `prefix`.
fn parse_job(
    members: Members,
    prefix: &str,
    cx: &JobContext<'_>,
    shape: Shape,
) -> Result<NewJob, JobFailure> {
    let (job, errors) = read_job(members, prefix, cx, shape)?;
    if errors.is_empty() {
        Ok(job)
    } else {
        Err(JobFailure::Fields(errors))
    }
}

/// Reads every field of a job object: the job (defaults where a field failed) and every
/// problem found, or the refusal of a tenant the caller may not use.
fn read_job(
    members: Members,
    prefix: &str,
    cx: &JobContext<'_>,
    shape: Shape,
) -> Result<(NewJob, Vec<FieldError>), JobFailure> {
    let mut errs = Errors {
        prefix,
        list: Vec::new(),
    };
    let mut seen: Vec<&'static str> = Vec::new();
    let mut kind = None;
    let mut kind_given = false;
    let mut job = NewJob::new(JobKind::default());
    let mut tenant = None;
    let mut run_at = None;
    let mut delay_ms: Option<u64> = None;

    let fields = shape.fields();
    for (name, raw) in members.0 {
        let Some(field) = fields.iter().copied().find(|f| *f == name) else {
            if shape == Shape::Process && (name == "run_at" || name == "delay_ms") {
                errs.add(
                    &name,
                    "is not accepted by /v1/process, which runs the job now and waits for it; \
                     schedule a job for later with POST /v1/jobs",
                );
            } else {
                errs.add(
                    &name,
                    format!("unknown field; expected one of {}", fields.join(", ")),
                );
            }
            continue;
        };
        if seen.contains(&field) {
            errs.add(field, "duplicate field");
            continue;
        }
        seen.push(field);
        // `null` means "not given" for every optional field.
        if raw.get() == "null" && field != "kind" && field != "args" {
            continue;
        }
        match field {
            "kind" => {
                kind_given = true;
                if let Some(s) = errs.parse::<String>(field, &raw, Some("must be a string")) {
                    match JobKind::parse(s) {
                        Ok(k) => kind = Some(k),
                        Err(e) => errs.add(field, e.reason),
                    }
                }
            }
            "queue" => {
                if let Some(s) = errs.parse::<String>(field, &raw, Some("must be a string")) {
                    match QueueName::parse(s) {
                        Ok(q) => job.queue = q,
                        Err(e) => errs.add(field, e.reason),
                    }
                }
            }
            "tenant" => {
                if let Some(s) = errs.parse::<String>(field, &raw, Some("must be a string")) {
                    match TenantId::parse(s) {
                        Ok(t) => tenant = Some(t),
                        Err(e) => errs.add(field, e.reason),
                    }
                }
            }
            "args" => job.args = raw,
            "priority" => {
                let msg = "must be an integer between 0 (highest) and 9 (lowest)";
                if let Some(n) = errs.parse::<u64>(field, &raw, Some(msg)) {
                    match u8::try_from(n)
                        .map_err(|_| msg.to_owned())
                        .and_then(Priority::new)
                    {
                        Ok(p) => job.priority = p,
                        Err(_) => errs.add(field, format!("{msg}, got {n}")),
                    }
                }
            }
            "run_at" => {
                let msg = "must be an RFC 3339 timestamp, e.g. 2030-01-01T00:00:00Z";
                if let Some(s) = errs.parse::<String>(field, &raw, Some(msg)) {
                    match DateTime::parse_from_rfc3339(&s) {
                        // chrono keeps a leap second (`…:60`) as a nanosecond count past 1e9,
                        // which no store can hold: it would be stored as the next second
                        // while the answer echoed `:60`.
                        Ok(t) if chrono::Timelike::nanosecond(&t) >= 1_000_000_000 => errs.add(
                            field,
                            "is a leap second (:60), which cannot be stored; use the second after it",
                        ),
                        // Bounds are checked with the job (`NewJob::validate`).
                        Ok(t) => run_at = Some(t.with_timezone(&Utc)),
                        Err(_) => errs.add(field, msg),
                    }
                }
            }
            "delay_ms" => {
                let msg = format!("must be a whole number of milliseconds, at most {MAX_DELAY_MS}");
                match errs.parse::<u64>(field, &raw, Some(&msg)) {
                    Some(n) if n <= MAX_DELAY_MS => delay_ms = Some(n),
                    Some(_) => errs.add(field, msg),
                    None => {}
                }
            }
            "max_attempts" => {
                let msg = format!(
                    "must be an integer between 1 and {}",
                    NewJob::MAX_ATTEMPTS_LIMIT
                );
                if let Some(n) = errs.parse::<u32>(field, &raw, Some(&msg)) {
                    job.max_attempts = n;
                }
            }
            "timeout_ms" => {
                let msg = format!(
                    "must be a whole number of milliseconds between 1 and {}",
                    NewJob::MAX_TIMEOUT.as_millis()
                );
                if let Some(n) = errs.parse::<u64>(field, &raw, Some(&msg)) {
                    job.timeout = Duration::from_millis(n);
                }
            }
            "backoff" => {
                if let Some(b) = errs.parse::<Backoff>(field, &raw, None) {
                    job.backoff = b;
                }
            }
            "tags" => {
                if let Some(t) =
                    errs.parse::<Vec<String>>(field, &raw, Some("must be an array of strings"))
                {
                    job.tags = t;
                }
            }
            "unique" => parse_unique(&raw, &mut job, &mut errs),
            _ => errs.add(field, "unknown field"),
        }
    }

    match (kind, kind_given) {
        (Some(k), _) => job.kind = k,
        (None, false) => errs.add("kind", "is required"),
        (None, true) => {}
    }
    // `delay_ms` counts from `run_at` when both are given, from now otherwise: the two
    // compose, so no combination of valid fields is refused (a rule a schema can state).
    match (run_at, delay_ms) {
        (at, Some(ms)) => {
            job.run_at = at
                .unwrap_or(cx.now)
                .checked_add_signed(chrono::TimeDelta::milliseconds(ms as i64));
        }
        (Some(t), None) => job.run_at = Some(t),
        (None, None) => {}
    }
    // A template's bounds are checked with the rest of its schedule
    // (`NewSchedule::validate`), which would report them a second time.
    if shape != Shape::Template
        && let Err(v) = job.validate(cx.max_args_bytes)
    {
        for e in v.0 {
            // The API names the timeout field after its unit.
            let field = if e.field == "timeout" {
                "timeout_ms"
            } else {
                e.field.as_str()
            };
            errs.add(field, e.message);
        }
    }
    // Whether it can ever run here: only once its kind and args are otherwise fine, so a
    // field is reported once.
    let named = |f: &str| {
        let path = format!("{}{f}", errs.prefix);
        errs.list.iter().any(|e| e.field == path)
    };
    if kind_given
        && !named("kind")
        && !named("args")
        && !named("queue")
        && let Err(e) = cx.catalog.check(&job.queue, &job.kind, &job.args)
    {
        errs.add(&e.field, e.message);
    }
    let tenant = cx
        .caller
        .tenant_for(tenant)
        .map_err(JobFailure::Forbidden)?;
    job.tenant = tenant;
    Ok((job, errs.list))
}

/// Parses the body of `POST /v1/jobs`.
pub(crate) fn parse_single(body: &[u8], cx: &JobContext<'_>) -> Result<NewJob, ApiError> {
    parse_one(body, cx, Shape::Job)
}

/// Parses the body of `POST /v1/process`: a job without `run_at` or `delay_ms`.
pub(crate) fn parse_process(body: &[u8], cx: &JobContext<'_>) -> Result<NewJob, ApiError> {
    parse_one(body, cx, Shape::Process)
}

fn parse_one(body: &[u8], cx: &JobContext<'_>, shape: Shape) -> Result<NewJob, ApiError> {
    let members = members_of_body(body)?;
    parse_job(members, "", cx, shape).map_err(|f| match f {
        JobFailure::Fields(errors) => ApiError::Validation(errors),
        JobFailure::Forbidden(e) => e,
    })
}

/// Parses the body of `POST /v1/jobs/batch`: `{"jobs": [job, …]}` with 1..=[`MAX_BATCH`]
/// jobs. Every error of every job is reported, with paths like `jobs[3].priority`.
pub(crate) fn parse_batch(body: &[u8], cx: &JobContext<'_>) -> Result<Vec<NewJob>, ApiError> {
    let members = members_of_body(body)?;
    let mut errors = Vec::new();
    let mut list: Option<Vec<Box<RawValue>>> = None;
    let mut saw_jobs = false;
    for (name, raw) in members.0 {
        if name != "jobs" {
            errors.push(FieldError {
                field: name,
                message: "unknown field; expected jobs".to_owned(),
            });
            continue;
        }
        if saw_jobs {
            errors.push(FieldError {
                field: "jobs".to_owned(),
                message: "duplicate field".to_owned(),
            });
            continue;
        }
        saw_jobs = true;
        match serde_json::from_str::<Vec<Box<RawValue>>>(raw.get()) {
            Ok(v) if (1..=MAX_BATCH).contains(&v.len()) => list = Some(v),
            Ok(v) => errors.push(FieldError {
                field: "jobs".to_owned(),
                message: format!("must hold 1 to {MAX_BATCH} jobs, got {}", v.len()),
            }),
            Err(_) => errors.push(FieldError {
                field: "jobs".to_owned(),
                message: "must be an array of job objects".to_owned(),
            }),
        }
    }
    if !saw_jobs {
        errors.push(FieldError {
            field: "jobs".to_owned(),
            message: "is required".to_owned(),
        });
    }
    let mut jobs = Vec::new();
    let mut forbidden = None;
    for (i, raw) in list.unwrap_or_default().into_iter().enumerate() {
        let prefix = format!("jobs[{i}].");
        let members = match serde_json::from_str::<Members>(raw.get()) {
            Ok(m) => m,
            Err(_) => {
                errors.push(FieldError {
                    field: format!("jobs[{i}]"),
                    message: "must be a JSON object".to_owned(),
                });
                continue;
            }
        };
        match parse_job(members, &prefix, cx, Shape::Job) {
            Ok(job) => jobs.push(job),
            Err(JobFailure::Fields(e)) => errors.extend(e),
            Err(JobFailure::Forbidden(e)) => {
                forbidden.get_or_insert(e);
            }
        }
    }
    if let Some(e) = forbidden {
        return Err(e);
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// Parses a schedule's `job` (its template), recording problems under `job.*` in `errors`.
/// Bounds are left to [`keel_core::NewSchedule::validate`], which the caller runs on the
/// template returned: defaults stand in for the fields that failed, so every field is
/// checked once. `None` only when `job` is not an object.
pub(crate) fn parse_template(
    raw: &RawValue,
    cx: &JobContext<'_>,
    errors: &mut Vec<FieldError>,
) -> Option<JobTemplate> {
    let Ok(members) = serde_json::from_str::<Members>(raw.get()) else {
        errors.push(FieldError {
            field: "job".to_owned(),
            message: "must be a JSON object with at least kind".to_owned(),
        });
        return None;
    };
    // A template has no tenant field, so the caller's own is used: never refused.
    let (job, problems) = read_job(members, "job.", cx, Shape::Template).ok()?;
    errors.extend(problems);
    Some(JobTemplate {
        queue: job.queue,
        kind: job.kind,
        args: job.args,
        priority: job.priority,
        max_attempts: job.max_attempts,
        timeout: job.timeout,
        backoff: job.backoff,
        tags: job.tags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_CATALOG: std::sync::LazyLock<Catalog> = std::sync::LazyLock::new(Catalog::default);

    fn cx(caller: &Caller) -> JobContext<'_> {
        JobContext {
            caller,
            catalog: &NO_CATALOG,
            max_args_bytes: 64,
            now: Utc::now(),
        }
    }

    fn fields(e: ApiError) -> Vec<String> {
        match e {
            ApiError::Validation(v) => v.into_iter().map(|e| e.field).collect(),
            other => panic!("expected validation, got {other:?}"),
        }
    }

    #[test]
    fn a_full_job_parses_and_keeps_args_verbatim() {
        let body =
            br#"{"kind":"echo","queue":"emails","tenant":"acme","args":{"b": 1,  "a":[1, 2]},
            "priority":0,"delay_ms":5000,"max_attempts":3,"timeout_ms":1500,
            "backoff":{"type":"fixed","delay_ms":100},"tags":["x","y"]}"#;
        let open = Caller::unrestricted();
        let job = parse_single(body, &cx(&open)).unwrap();
        assert_eq!(job.kind.as_str(), "echo");
        assert_eq!(job.queue.as_str(), "emails");
        assert_eq!(job.tenant.as_str(), "acme");
        assert_eq!(job.args.get(), r#"{"b": 1,  "a":[1, 2]}"#);
        assert_eq!(job.priority, Priority::HIGHEST);
        assert!(job.run_at.is_some());
        assert_eq!(job.max_attempts, 3);
        assert_eq!(job.timeout, Duration::from_millis(1500));
        assert_eq!(job.backoff, Backoff::Fixed { delay_ms: 100 });
        assert_eq!(job.tags, ["x", "y"]);
    }

    #[test]
    fn every_field_error_is_reported_at_once() {
        let body = br#"{"queue":"bad queue","priority":"high","run_at":"tomorrow",
            "max_attempts":0,"timeout_ms":-1,"backoff":{"type":"linear"},"tags":[1],
            "colour":"red","args":"this is longer than sixty-four bytes for sure, really it is long"}"#;
        let open = Caller::unrestricted();
        let got = fields(parse_single(body, &cx(&open)).unwrap_err());
        for f in [
            "kind",
            "queue",
            "priority",
            "run_at",
            "max_attempts",
            "timeout_ms",
            "backoff",
            "tags",
            "colour",
            "args",
        ] {
            assert!(got.iter().any(|g| g == f), "missing {f} in {got:?}");
        }
    }

    #[test]
    fn duplicates_nulls_and_exclusive_fields() {
        let open = Caller::unrestricted();
        let got = fields(
            parse_single(
                br#"{"kind":"a","kind":"b","run_at":"2030-01-01T00:00:00Z","delay_ms":1}"#,
                &cx(&open),
            )
            .unwrap_err(),
        );
        assert_eq!(got, ["kind"]);
        // delay_ms counts from run_at.
        let job = parse_single(
            br#"{"kind":"a","run_at":"2030-01-01T00:00:00Z","delay_ms":1500}"#,
            &cx(&open),
        )
        .unwrap();
        assert_eq!(
            job.run_at.unwrap().to_rfc3339(),
            "2030-01-01T00:00:01.500+00:00"
        );
        let job = parse_single(br#"{"kind":"a","queue":null,"tags":null}"#, &cx(&open)).unwrap();
        assert_eq!(job.queue, QueueName::default());
        assert!(fields(parse_single(br#"{"kind":null}"#, &cx(&open)).unwrap_err()) == ["kind"]);
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        let open = Caller::unrestricted();
        for body in [&b"{"[..], b"[1,2]", b"\"job\"", b"{\"kind\":}"] {
            assert!(
                matches!(parse_single(body, &cx(&open)), Err(ApiError::BadRequest(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn another_tenant_is_forbidden_not_invalid() {
        let acme = Caller::tenant(TenantId::parse("acme").unwrap());
        let e = parse_single(
            br#"{"kind":"a","tenant":"other","priority":42}"#,
            &cx(&acme),
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Forbidden(_)), "{e:?}");
        let job = parse_single(br#"{"kind":"a"}"#, &cx(&acme)).unwrap();
        assert_eq!(job.tenant.as_str(), "acme");
    }

    #[test]
    fn run_at_stays_within_the_horizon() {
        let open = Caller::unrestricted();
        for far in [
            "2999-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            let body = format!(r#"{{"kind":"a","run_at":"{far}"}}"#);
            assert_eq!(
                fields(parse_single(body.as_bytes(), &cx(&open)).unwrap_err()),
                ["run_at"]
            );
        }
        let soon = (Utc::now() + chrono::TimeDelta::days(365)).to_rfc3339();
        let body = format!(r#"{{"kind":"a","run_at":"{soon}"}}"#);
        assert!(parse_single(body.as_bytes(), &cx(&open)).is_ok());
    }

    #[test]
    fn a_leap_second_is_refused_not_shifted() {
        let open = Caller::unrestricted();
        let e = parse_single(
            br#"{"kind":"a","run_at":"2030-06-30T23:59:60Z"}"#,
            &cx(&open),
        )
        .unwrap_err();
        assert_eq!(fields(e), ["run_at"]);
    }

    #[test]
    fn durations_without_a_unit_in_their_name_need_one_in_their_value() {
        let d = |s: &str| parse_duration_with_unit(&RawValue::from_string(s.to_owned()).unwrap());
        assert_eq!(d(r#""5m""#), Ok(Duration::from_secs(300)));
        for bad in ["5", "3600000", "1.5", r#""5""#] {
            assert!(d(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_milliseconds_or_units() {
        let d = |s: &str| parse_duration(&RawValue::from_string(s.to_owned()).unwrap());
        assert_eq!(d("3600000"), Ok(Duration::from_secs(3600)));
        assert_eq!(d(r#""1h""#), Ok(Duration::from_secs(3600)));
        assert_eq!(d(r#""1h30m""#), Ok(Duration::from_secs(5400)));
        assert_eq!(d(r#""500ms""#), Ok(Duration::from_millis(500)));
        assert_eq!(d(r#""2d""#), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(d(r#"" 45s ""#), Ok(Duration::from_secs(45)));
        for bad in [
            r#""""#,
            r#""h""#,
            r#""1""#,
            r#""1 h""#,
            r#""1w""#,
            r#""-1s""#,
            "-5",
            "1.5",
            "true",
            r#""99999999999999999999d""#,
        ] {
            assert!(d(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unique_parses_each_scope() {
        let open = Caller::unrestricted();
        let parse = |u: &str| {
            parse_single(
                format!(r#"{{"kind":"a","unique":{u}}}"#).as_bytes(),
                &cx(&open),
            )
            .map(|j| j.unique.unwrap())
        };
        assert_eq!(
            parse(r#"{"key":"k","scope":"queued"}"#).unwrap().scope,
            UniqueScope::Queued
        );
        assert_eq!(
            parse(r#"{"key":"k","scope":"active"}"#).unwrap().scope,
            UniqueScope::Active
        );
        let u = parse(r#"{"scope":"period","period":"1h","key":"k"}"#).unwrap();
        assert_eq!(
            (u.key.as_str(), u.scope),
            ("k", UniqueScope::Period(Duration::from_secs(3600)))
        );
        let none = parse_single(br#"{"kind":"a","unique":null}"#, &cx(&open)).unwrap();
        assert_eq!(none.unique, None);
        // Scope period without a period takes the default window; the other scopes ignore one.
        let u = parse(r#"{"scope":"period","key":"k"}"#).unwrap();
        assert_eq!(u.scope, UniqueScope::Period(DEFAULT_UNIQUE_PERIOD));
        let u = parse(r#"{"scope":"queued","period":"1h","key":"k"}"#).unwrap();
        assert_eq!(u.scope, UniqueScope::Queued);
    }

    #[test]
    fn every_unique_problem_is_reported() {
        let open = Caller::unrestricted();
        let got = |u: &str| {
            let mut f = fields(
                parse_single(
                    format!(r#"{{"kind":"a","unique":{u}}}"#).as_bytes(),
                    &cx(&open),
                )
                .unwrap_err(),
            );
            f.sort();
            f
        };
        assert_eq!(got("{}"), ["unique.key", "unique.scope"]);
        assert_eq!(
            got(r#"{"key":7,"scope":"sometimes","period":"x","extra":1}"#),
            [
                "unique.extra",
                "unique.key",
                "unique.period",
                "unique.scope"
            ]
        );
        // A period is checked whatever the scope, so a bad one is reported beside it.
        assert_eq!(
            got(r#"{"key":"k","scope":"queued","period":"1 fortnight"}"#),
            ["unique.period"]
        );
        // The bound checks of the key and the period still run beside a type error.
        let long = "k".repeat(300);
        assert_eq!(
            got(&format!(r#"{{"key":"{long}","scope":1,"period":"100ms"}}"#)),
            ["unique.key", "unique.period", "unique.scope"]
        );
        assert_eq!(got(r#"["k"]"#), ["unique"]);
        assert_eq!(
            got(r#"{"key":"k","key":"l","scope":"active"}"#),
            ["unique.key"]
        );
    }

    #[test]
    fn a_template_refuses_what_a_tick_decides_and_keeps_defaults() {
        let open = Caller::unrestricted();
        let mut errors = Vec::new();
        let raw = RawValue::from_string(
            r#"{"kind":"w","run_at":"2030-01-01T00:00:00Z","unique":{},"tenant":"x","priority":1}"#
                .to_owned(),
        )
        .unwrap();
        let t = parse_template(&raw, &cx(&open), &mut errors).unwrap();
        let mut got: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        got.sort();
        assert_eq!(got, ["job.run_at", "job.tenant", "job.unique"]);
        assert_eq!(t.kind.as_str(), "w");
        assert_eq!(t.priority.get(), 1);
        assert_eq!(t.max_attempts, NewJob::DEFAULT_MAX_ATTEMPTS);

        let mut errors = Vec::new();
        let raw = RawValue::from_string("[1]".to_owned()).unwrap();
        assert!(parse_template(&raw, &cx(&open), &mut errors).is_none());
        assert_eq!(errors[0].field, "job");
    }

    #[test]
    fn batch_errors_carry_their_index() {
        let open = Caller::unrestricted();
        let body = br#"{"jobs":[{"kind":"a"},{"kind":"b","priority":10},7,{"tags":"x"}]}"#;
        let got = fields(parse_batch(body, &cx(&open)).unwrap_err());
        assert_eq!(
            got,
            [
                "jobs[1].priority",
                "jobs[2]",
                "jobs[3].tags",
                "jobs[3].kind"
            ]
        );
        assert_eq!(
            fields(parse_batch(br#"{"jobs":[]}"#, &cx(&open)).unwrap_err()),
            ["jobs"]
        );
        assert_eq!(
            fields(parse_batch(br#"{}"#, &cx(&open)).unwrap_err()),
            ["jobs"]
        );
        let ok = parse_batch(br#"{"jobs":[{"kind":"a"},{"kind":"b"}]}"#, &cx(&open)).unwrap();
        assert_eq!(ok.len(), 2);
    }
}
