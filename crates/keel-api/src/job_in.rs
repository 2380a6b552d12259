//! Turning a request body ([`keel_wire::JobIn`]) into [`NewJob`]s, reporting every problem
//! at once: the body's own shape problems, read member by member ([`crate::wire_in`]), then
//! the domain's parse of each field (kind, queue, tenant names, priority, the unique
//! window), then [`NewJob::validate`]'s bound checks. `args` is kept as the raw text the
//! client sent, byte for byte.
//!
//! The same steps read the job template of a schedule ([`parse_template`]): the fields a
//! template fixes ([`keel_wire::JobTemplateIn`]), with the same defaults and messages.

use std::time::Duration;

use keel_core::{
    FieldError, JobKind, JobTemplate, NewJob, Priority, QueueName, TenantId, Timestamp, Unique,
    UniqueScope, UniqueScopeKind,
};
use keel_wire::{JobIn, JobTemplateIn, UniqueIn};
use serde_json::value::RawValue;

use keel_runtime::Catalog;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::wire_in::{Errors, Members, Read, members_of_body, read_members, read_members_on};

/// Most jobs in one batch request.
pub const MAX_BATCH: usize = 1000;

/// The longest `delay_ms`: ten years. (`run_at` is bounded absolutely, by
/// [`keel_core::NewJob::MIN_RUN_AT`] and [`keel_core::NewJob::MAX_RUN_AT`], a range the OpenAPI
/// document can state.) Both keep timestamps well inside the range every layer can
/// represent (nanosecond `chrono` arithmetic ends in 2262), so no client value can overflow
/// one.
pub const MAX_DELAY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// The window of a unique key of scope `period` when the body gives none.
pub(crate) const DEFAULT_UNIQUE_PERIOD: Duration = Duration::from_secs(60);

/// What is being parsed: a job to enqueue, one to enqueue and wait for, or a schedule's
/// template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Job,
    Process,
    Template,
}

/// Every problem inside a `unique` that did not read (replacing the first-problem-only
/// report made while reading the job), and a stand-in built from its good members, so that
/// the bound checks of the key and the period still run beside a type error.
fn unique_problems(raw: &RawValue, errs: &mut Errors<'_>) -> Option<UniqueIn> {
    let Ok(members) = serde_json::from_str::<Members>(raw.get()) else {
        // Not an object: the report already made says so.
        return None;
    };
    let whole = format!("{}unique", errs.prefix);
    errs.list.retain(|e| e.field != whole);
    let prefix = format!("{}unique.", errs.prefix);
    let mut inner = Errors::new(&prefix);
    let read = read_members_on::<UniqueIn>(
        members,
        None,
        &[("key", "\"k\""), ("scope", "\"active\"")],
        &mut inner,
    );
    for field in ["key", "scope"] {
        if !read.has(field) {
            inner.add(field, "is required");
        }
    }
    errs.list.extend(inner.list);
    read.value
}

/// The domain form of `unique`, with its window's bounds checked.
fn unique_of(u: UniqueIn, errs: &mut Errors<'_>) -> Unique {
    // `period` is the window of scope `period` (60 s when not given, Oban's default) and
    // means nothing to the other scopes, which ignore it; it is checked whatever the scope,
    // so a bad value never passes unnoticed.
    let mut window = u.period.map_or(DEFAULT_UNIQUE_PERIOD, |p| p.0);
    if !(UniqueScope::MIN_PERIOD..=UniqueScope::MAX_PERIOD).contains(&window) {
        // Reported here, with the value; the default stands in so that the job's own
        // checks do not report it again.
        window = DEFAULT_UNIQUE_PERIOD;
        errs.add(
            "unique.period",
            format!(
                "must be between {} s and {} days, got {} ms",
                UniqueScope::MIN_PERIOD.as_secs(),
                UniqueScope::MAX_PERIOD.as_secs() / 86_400,
                u.period.map_or(0, |p| p.0.as_millis())
            ),
        );
    }
    let scope = match u.scope {
        UniqueScopeKind::Queued => UniqueScope::Queued,
        UniqueScopeKind::Active => UniqueScope::Active,
        UniqueScopeKind::Period => UniqueScope::Period(window),
    };
    Unique { key: u.key, scope }
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

/// What [`read_job`] found, as a job only when it found no problem: a job and a batch item
/// must be whole, while a schedule's template keeps the defaults to report its own errors.
fn whole_job((job, errors): (NewJob, Vec<FieldError>)) -> Result<NewJob, JobFailure> {
    if errors.is_empty() {
        Ok(job)
    } else {
        Err(JobFailure::Fields(errors))
    }
}

/// Reads one job object (already split into members), field paths prefixed with `prefix`:
/// the job (defaults where a field failed) and every problem found, or
/// the refusal of a tenant the caller may not use.
fn read_job(
    members: Members,
    text: Option<&str>,
    prefix: &str,
    cx: &JobContext<'_>,
    shape: Shape,
) -> Result<(NewJob, Vec<FieldError>), JobFailure> {
    let mut errs = Errors::new(prefix);
    let unique_raw = members
        .0
        .iter()
        .find(|(name, _)| name == "unique")
        .map(|(_, raw)| raw.clone());
    let read = match shape {
        Shape::Job => read_members::<JobIn>(members, text, &mut errs),
        // A job scheduled for later could only outlive its request (and end in a certain
        // `504`), so the fields that delay it are refused rather than half-honoured.
        Shape::Process => {
            let (refused, rest): (Vec<_>, Vec<_>) = members
                .0
                .into_iter()
                .partition(|(name, _)| name == "run_at" || name == "delay_ms");
            for (name, _) in &refused {
                errs.add(
                    name,
                    "is not accepted by /v1/process, which runs the job now and waits for it; \
                     schedule a job for later with POST /v1/jobs",
                );
            }
            let text = if refused.is_empty() { text } else { None };
            read_members::<JobIn>(Members(rest), text, &mut errs)
        }
        Shape::Template => {
            let read = read_members::<JobTemplateIn>(members, text, &mut errs);
            Read {
                value: JobIn::from(read.value),
                given: read.given,
            }
        }
    };
    let kind_given = read.has("kind");
    let body = read.value;

    let mut job = NewJob::new(JobKind::default());
    if !kind_given {
        errs.add("kind", "is required");
    } else if !errs.names("kind") {
        match JobKind::parse(body.kind) {
            Ok(k) => job.kind = k,
            Err(e) => errs.add("kind", e.reason),
        }
    }
    if let Some(q) = body.queue {
        match QueueName::parse(q) {
            Ok(q) => job.queue = q,
            Err(e) => errs.add("queue", e.reason),
        }
    }
    let tenant = body.tenant.and_then(|t| {
        TenantId::parse(t)
            .map_err(|e| errs.add("tenant", e.reason))
            .ok()
    });
    if let Some(args) = body.args {
        job.args = args;
    }
    if let Some(n) = body.priority {
        match Priority::new(n) {
            Ok(p) => job.priority = p,
            Err(_) => errs.add(
                "priority",
                format!("must be an integer between 0 (highest) and 9 (lowest), got {n}"),
            ),
        }
    }
    // chrono keeps a leap second (`…:60`) as a nanosecond count past 1e9, which no store can
    // hold: it would be stored as the next second while the answer echoed `:60`. Bounds are
    // checked with the job (`NewJob::validate`).
    let run_at = body.run_at.filter(|t| {
        let leap = chrono::Timelike::nanosecond(t) >= 1_000_000_000;
        if leap {
            errs.add(
                "run_at",
                "is a leap second (:60), which cannot be stored; use the second after it",
            );
        }
        !leap
    });
    let delay_ms = body.delay_ms.filter(|n| {
        let ok = *n <= MAX_DELAY_MS;
        if !ok {
            errs.add(
                "delay_ms",
                format!("must be a whole number of milliseconds, at most {MAX_DELAY_MS}"),
            );
        }
        ok
    });
    if let Some(n) = body.max_attempts {
        job.max_attempts = n;
    }
    if let Some(ms) = body.timeout_ms {
        job.timeout = Duration::from_millis(ms);
    }
    if let Some(b) = body.backoff {
        job.backoff = b.into();
    }
    if let Some(t) = body.tags {
        job.tags = t;
    }
    job.meta = body.meta;
    let unique = match unique_raw {
        // `unique` is an object with required members: its problems are found member by
        // member, like the job's (`unique.key`, `unique.scope`, …).
        Some(raw) if shape != Shape::Template && errs.names("unique") => {
            unique_problems(&raw, &mut errs)
        }
        _ => body.unique,
    };
    job.unique = unique.map(|u| unique_of(u, &mut errs));

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
    if kind_given
        && !errs.names("kind")
        && !errs.names("args")
        && !errs.names("queue")
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
    let text = std::str::from_utf8(body).ok();
    read_job(members, text, "", cx, shape)
        .and_then(whole_job)
        .map_err(|f| match f {
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
        match read_job(members, Some(raw.get()), &prefix, cx, Shape::Job).and_then(whole_job) {
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
    let (job, problems) = read_job(members, Some(raw.get()), "job.", cx, Shape::Template).ok()?;
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
    use chrono::Utc;
    use keel_core::Backoff;

    use super::*;
    use crate::error::validation_fields as fields;

    static NO_CATALOG: std::sync::LazyLock<Catalog> = std::sync::LazyLock::new(Catalog::default);

    fn cx(caller: &Caller) -> JobContext<'_> {
        JobContext {
            caller,
            catalog: &NO_CATALOG,
            max_args_bytes: 64,
            now: Utc::now(),
        }
    }

    #[test]
    fn a_full_job_parses_and_keeps_args_verbatim() {
        let body =
            br#"{"kind":"echo","queue":"emails","tenant":"acme","args":{"b": 1,  "a":[1, 2]},
            "priority":0,"delay_ms":5000,"max_attempts":3,"timeout_ms":1500,
            "backoff":{"type":"fixed","delay_ms":100},"tags":["x","y"],"meta":{"trace": "t1"}}"#;
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
        assert_eq!(
            job.meta.as_ref().map(|m| m.get()),
            Some(r#"{"trace": "t1"}"#)
        );
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
        // An unknown member of a valid object too (schemathesis found it accepted once).
        assert_eq!(got(r#"{"key":"k","scope":"active","x":1}"#), ["unique.x"]);
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
