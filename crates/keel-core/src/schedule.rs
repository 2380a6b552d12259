//! Cron schedules (G4): a cron expression in a time zone, and the job each tick enqueues.
//!
//! Which ticks are due is pure computation, here; enqueuing each tick exactly once is the
//! store's job ([`crate::ScheduleStore::enqueue_ticks`] inserts a `(schedule, tick)` key in the same
//! transaction as the job, so a tick enqueued twice — by two leaders during a handover, or by
//! a retry — is refused by the database, not by luck).
//!
//! Ticks missed while no replica ran are caught up oldest first, but only within the
//! schedule's [`Schedule::catch_up`] window: a per-second schedule that was down for a day
//! should not flood its queue with 86 400 jobs. The latest due tick is always enqueued.

use std::str::FromStr as _;
use std::time::Duration;

use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::backoff::Backoff;
use crate::clock::Timestamp;
use crate::error::{FieldError, ValidationErrors};
use crate::ids::{JobId, JobKind, QueueName, ScheduleName, TenantId};
use crate::job::{NewJob, Priority};

/// A parsed, validated cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    tz: Tz,
}

/// The first of the second, minute, hour and month fields that matches no value, if any.
fn empty_field(cron: &Cron) -> Option<&'static str> {
    let p = &cron.pattern;
    let none = |values: std::ops::RangeInclusive<u32>, matches: &dyn Fn(u32) -> bool| {
        !values.into_iter().any(matches)
    };
    if none(0..=59, &|v| p.second_match(v).unwrap_or(false)) {
        Some("second")
    } else if none(0..=59, &|v| p.minute_match(v).unwrap_or(false)) {
        Some("minute")
    } else if none(0..=23, &|v| p.hour_match(v).unwrap_or(false)) {
        Some("hour")
    } else if none(1..=12, &|v| p.month_match(v).unwrap_or(false)) {
        Some("month")
    } else {
        None
    }
}

impl CronSpec {
    /// Longest accepted expression, bytes.
    pub const MAX_EXPR_LEN: usize = 256;

    /// The expressions the OpenAPI document promises [`CronSpec::parse`] accepts, as a
    /// regular expression without anchors: 5 fields (or 6, seconds first) of `*`, `*/step`
    /// or lists of values, or a nickname. Narrower than what is accepted (no ranges, names,
    /// `L`, `W`, `#`; days of the month up to 28) so that every expression it matches is
    /// accepted and fires: a fuzzer drawing from it never meets a refusal. A test checks
    /// that on generated expressions.
    pub const DOCUMENTED_GRAMMAR: &'static str = concat!(
        "@(yearly|annually|monthly|weekly|daily|hourly)|",
        r"((\*(/([1-9]|[1-5][0-9]))?|[0-5]?[0-9](,[0-5]?[0-9])*) )?",
        r"(\*(/([1-9]|[1-5][0-9]))?|[0-5]?[0-9](,[0-5]?[0-9])*) ",
        r"(\*(/([1-9]|1[0-9]|2[0-3]))?|([01]?[0-9]|2[0-3])(,([01]?[0-9]|2[0-3]))*) ",
        r"(\*(/([1-9]|1[0-9]|2[0-8]))?|([1-9]|1[0-9]|2[0-8])(,([1-9]|1[0-9]|2[0-8]))*) ",
        r"(\*(/([1-9]|1[0-2]))?|([1-9]|1[0-2])(,([1-9]|1[0-2]))*) ",
        r"(\*(/[1-7])?|[0-7](,[0-7])*)",
    );

    /// [`CronSpec::DOCUMENTED_GRAMMAR`], anchored.
    pub fn documented_pattern() -> String {
        format!("^({})$", Self::DOCUMENTED_GRAMMAR)
    }

    /// Every IANA time zone name [`CronSpec::parse`] accepts.
    pub fn time_zones() -> Vec<&'static str> {
        chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect()
    }

    /// Parses `expr` (5 fields, or 6 with seconds first; names, ranges, steps, `L`, `W`,
    /// `#` and the `@daily`-style nicknames) in the IANA time zone `timezone` (`UTC`,
    /// `Europe/Paris`). Every problem is reported, under `cron` and `timezone`.
    pub fn parse(expr: &str, timezone: &str) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        let cron = if expr.len() > Self::MAX_EXPR_LEN {
            errors.push(FieldError {
                field: "cron".into(),
                message: format!(
                    "must be at most {} bytes, got {}",
                    Self::MAX_EXPR_LEN,
                    expr.len()
                ),
            });
            None
        } else if !expr.trim_start().starts_with('@')
            && !matches!(expr.split_whitespace().count(), 5 | 6)
        {
            // croner also reads a seventh (year) field; the documented syntax is five fields,
            // or six with seconds first (or a nickname such as `@daily`), so anything else is
            // refused rather than half-read.
            errors.push(FieldError {
                field: "cron".into(),
                message: format!(
                    "{expr:?} has {} fields; use 5 (minute hour day month weekday) or 6 \
                     (seconds first)",
                    expr.split_whitespace().count()
                ),
            });
            None
        } else {
            match Cron::from_str(expr.trim()) {
                Ok(c) => Some(c),
                Err(e) => {
                    errors.push(FieldError {
                        field: "cron".into(),
                        message: format!("{expr:?} is not a cron expression: {e}"),
                    });
                    None
                }
            }
        };
        let tz = match timezone.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(FieldError {
                    field: "timezone".into(),
                    message: format!(
                        "{timezone:?} is not an IANA time zone (e.g. UTC, Europe/Paris)"
                    ),
                });
                None
            }
        };
        match (cron, tz) {
            (Some(cron), Some(tz)) if errors.is_empty() => {
                // An expression that never fires (`0 0 30 2 *`) is refused now, not found
                // out at every maintenance pass. croner looks for a next tick up to the year
                // 5000, one candidate hour (or day) at a time, so the look is kept short: a
                // field that matches no value at all (croner takes `,` as an empty list) is
                // refused before any search (searching for it took 13 s of CPU in a release
                // build, found by the `cron` fuzz target), and the search for a day that
                // exists starts 400 years (one full Gregorian cycle, after which dates and
                // weekdays repeat) before croner's horizon.
                if let Some(field) = empty_field(&cron) {
                    return Err(ValidationErrors(vec![FieldError {
                        field: "cron".into(),
                        message: format!("{expr:?} never fires: its {field} field matches nothing"),
                    }]));
                }
                let spec = Self { cron, tz };
                let probe = chrono::DateTime::parse_from_rfc3339("4599-01-01T00:00:00Z")
                    .map(|t| t.to_utc())
                    .ok();
                if probe.and_then(|p| spec.next_after(p)).is_none() {
                    return Err(ValidationErrors(vec![FieldError {
                        field: "cron".into(),
                        message: format!("{expr:?} never fires"),
                    }]));
                }
                Ok(spec)
            }
            _ => Err(ValidationErrors(errors)),
        }
    }

    /// The first tick strictly after `after`, if there is one.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&whole_second(after).with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.to_utc())
    }

    /// The last tick at or before `at`, if there is one.
    pub fn latest_at_or_before(&self, at: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_previous_occurrence(&whole_second(at).with_timezone(&self.tz), true)
            .ok()
            .map(|t| t.to_utc())
    }

    /// Ticks strictly after `after` and at or before `until`, oldest first, at most `limit`.
    pub fn ticks(&self, after: Timestamp, until: Timestamp, limit: usize) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < limit {
            match self.next_after(cursor) {
                Some(t) if t <= until => {
                    out.push(t);
                    cursor = t;
                }
                _ => break,
            }
        }
        out
    }
}

/// `t` without its fraction of a second: cron's resolution is the second, and croner keeps
/// the fraction of the instant it starts from in the occurrences it returns.
fn whole_second(t: Timestamp) -> Timestamp {
    use chrono::{DurationRound as _, TimeDelta};
    t.duration_trunc(TimeDelta::seconds(1)).unwrap_or(t)
}

/// The job a schedule enqueues at each tick (the fields of [`NewJob`] a schedule fixes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobTemplate {
    /// Queue to run in.
    pub queue: QueueName,
    /// Executor or handler.
    pub kind: JobKind,
    /// Arguments, JSON, passed to every run byte for byte.
    pub args: Box<RawValue>,
    /// 0 (highest) … 9.
    pub priority: Priority,
    /// Attempts allowed per tick's job.
    pub max_attempts: u32,
    /// Per-attempt timeout.
    #[serde(with = "crate::job::duration_ms")]
    pub timeout: Duration,
    /// Retry policy.
    pub backoff: Backoff,
    /// Labels.
    pub tags: Vec<String>,
}

impl JobTemplate {
    /// A template for `kind` with the defaults of [`NewJob::new`].
    pub fn new(kind: JobKind) -> Self {
        let j = NewJob::new(kind);
        Self {
            queue: j.queue,
            kind: j.kind,
            args: j.args,
            priority: j.priority,
            max_attempts: j.max_attempts,
            timeout: j.timeout,
            backoff: j.backoff,
            tags: j.tags,
        }
    }

    /// The job for one tick: due at the tick (so a caught-up tick runs at once).
    pub fn job_for(&self, tenant: &TenantId, tick: Timestamp) -> NewJob {
        NewJob {
            id: JobId::new(),
            queue: self.queue.clone(),
            kind: self.kind.clone(),
            tenant: tenant.clone(),
            args: self.args.clone(),
            priority: self.priority,
            run_at: Some(tick),
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            backoff: self.backoff,
            tags: self.tags.clone(),
            unique: None,
            meta: None,
        }
    }

    /// Checks the template as [`NewJob::validate`] checks a job; field paths are prefixed
    /// with `job.`.
    pub fn validate(&self, max_args_bytes: usize) -> Result<(), ValidationErrors> {
        let probe = self.job_for(&TenantId::default(), chrono::Utc::now());
        probe.validate(max_args_bytes).map_err(|e| {
            ValidationErrors(
                e.0.into_iter()
                    .map(|f| FieldError {
                        field: format!("job.{}", f.field),
                        message: f.message,
                    })
                    .collect(),
            )
        })
    }
}

/// A schedule as submitted (create or replace).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewSchedule {
    /// Tenant it belongs to (its jobs are that tenant's).
    pub tenant: TenantId,
    /// Name, unique per tenant.
    pub name: ScheduleName,
    /// Cron expression ([`CronSpec::parse`]).
    pub cron: String,
    /// IANA time zone the expression is read in.
    pub timezone: String,
    /// The job each tick enqueues.
    pub job: JobTemplate,
    /// A paused schedule enqueues nothing; its missed ticks are not caught up on resume
    /// beyond its catch-up window.
    pub paused: bool,
    /// How far back missed ticks are caught up (the latest due tick always is).
    #[serde(with = "crate::job::duration_ms")]
    pub catch_up: Duration,
}

impl NewSchedule {
    /// Default catch-up window.
    pub const DEFAULT_CATCH_UP: Duration = Duration::from_secs(3600);
    /// Longest catch-up window.
    pub const MAX_CATCH_UP: Duration = Duration::from_secs(7 * 24 * 3600);

    /// Checks every field; returns the parsed expression when all are valid.
    pub fn validate(&self, max_args_bytes: usize) -> Result<CronSpec, ValidationErrors> {
        let mut errors = Vec::new();
        let spec = CronSpec::parse(&self.cron, &self.timezone)
            .map_err(|e| errors.extend(e.0))
            .ok();
        if let Err(e) = self.job.validate(max_args_bytes) {
            errors.extend(e.0);
        }
        if self.catch_up > Self::MAX_CATCH_UP {
            errors.push(FieldError {
                field: "catch_up".into(),
                message: format!(
                    "must be at most {} days, got {} ms",
                    Self::MAX_CATCH_UP.as_secs() / 86_400,
                    self.catch_up.as_millis()
                ),
            });
        }
        match spec {
            Some(spec) if errors.is_empty() => Ok(spec),
            _ => Err(ValidationErrors(errors)),
        }
    }
}

/// A stored schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Schedule {
    /// Tenant it belongs to.
    pub tenant: TenantId,
    /// Name, unique per tenant.
    pub name: ScheduleName,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone.
    pub timezone: String,
    /// The job each tick enqueues.
    pub job: JobTemplate,
    /// Whether ticks are skipped.
    pub paused: bool,
    /// How far back missed ticks are caught up.
    #[serde(with = "crate::job::duration_ms")]
    pub catch_up: Duration,
    /// The latest tick enqueued, if any.
    pub last_tick_at: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it was last replaced, paused or resumed.
    pub updated_at: Timestamp,
}

impl Schedule {
    /// The parsed expression. `None` only if the stored expression no longer parses (a
    /// time zone removed from the tz database after an upgrade): the schedule is skipped
    /// and reported rather than failing maintenance.
    pub fn spec(&self) -> Option<CronSpec> {
        CronSpec::parse(&self.cron, &self.timezone).ok()
    }

    /// The ticks due at `now`, oldest first, at most `limit`: after the last enqueued tick
    /// (or the schedule's creation) and within the catch-up window; when every due tick is
    /// older than the window, the latest one alone. Empty while paused. When the window
    /// holds more than `limit` ticks the oldest come first and the next call continues
    /// after the last one enqueued.
    pub fn due_ticks(&self, spec: &CronSpec, now: Timestamp, limit: usize) -> Vec<Timestamp> {
        if self.paused || limit == 0 {
            return Vec::new();
        }
        let since = self.last_tick_at.unwrap_or(self.created_at);
        let Some(latest) = spec.latest_at_or_before(now).filter(|t| *t > since) else {
            return Vec::new();
        };
        let window_start = now
            .checked_sub_signed(crate::clock::to_delta(self.catch_up))
            .unwrap_or(since);
        let mut ticks = spec.ticks(since.max(window_start), now, limit);
        if ticks.is_empty() {
            ticks.push(latest);
        }
        ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn schedule(cron: &str, created: &str, last: Option<&str>, catch_up_s: u64) -> Schedule {
        Schedule {
            tenant: TenantId::default(),
            name: ScheduleName::parse("s").unwrap(),
            cron: cron.into(),
            timezone: "UTC".into(),
            job: JobTemplate::new(JobKind::default()),
            paused: false,
            catch_up: Duration::from_secs(catch_up_s),
            last_tick_at: last.map(at),
            created_at: at(created),
            updated_at: at(created),
        }
    }

    proptest::proptest! {
        /// Every expression the OpenAPI document describes is accepted.
        #[test]
        fn documented_expressions_parse(
            expr in proptest::strategy::Strategy::prop_filter(
                CronSpec::DOCUMENTED_GRAMMAR,
                "the document also bounds the length",
                |e| e.len() <= CronSpec::MAX_EXPR_LEN,
            )
        ) {
            proptest::prop_assert!(
                CronSpec::parse(&expr, "UTC").is_ok(),
                "{:?}",
                CronSpec::parse(&expr, "UTC").err()
            );
        }
    }

    mod twin {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// The twin of the `cron` fuzz target: any expression and zone is parsed or refused
            /// with errors under `cron` and `timezone` only; a parsed one ticks strictly forward.
            #[test]
            fn any_expression_is_parsed_or_refused_and_ticks_forward(
                fields in prop::collection::vec(
                    prop_oneof![
                        prop::sample::select(vec![
                            "*", "?", "L", "W", "LW", "5L", "15W", "MON#2", "1-5", "*/15", "0/0",
                            "60", "24", "31", "32", "0", "JAN", "FEB-DEC", "SUN,SAT", "@daily",
                            "@reboot", "99999999999", "-1", "1-", ",",
                        ])
                        .prop_map(str::to_owned),
                        "[0-9A-Z*/,#?LW-]{1,6}",
                    ],
                    0..8,
                ),
                tz in prop_oneof![
                    prop::sample::select(vec![
                        "UTC", "Europe/Paris", "Australia/Lord_Howe", "Asia/Kathmandu",
                        "America/St_Johns", "Pacific/Chatham", "utc", "", "Etc/GMT+14", "../etc",
                    ])
                    .prop_map(str::to_owned),
                    "[ -~]{0,20}",
                ],
            ) {
                let expr = fields.join(" ");
                match CronSpec::parse(&expr, &tz) {
                    Ok(spec) => {
                        let mut t = at("2026-03-29T00:30:00Z");
                        for _ in 0..4 {
                            let Some(next) = spec.next_after(t) else { break };
                            prop_assert!(next > t, "{expr:?} in {tz:?}: {next} after {t}");
                            t = next;
                        }
                    }
                    Err(e) => {
                        prop_assert!(!e.0.is_empty());
                        for f in &e.0 {
                            prop_assert!(f.field == "cron" || f.field == "timezone", "{}", f.field);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_listed_time_zone_parses() {
        for tz in CronSpec::time_zones() {
            assert!(CronSpec::parse("* * * * *", tz).is_ok(), "{tz}");
        }
    }

    #[test]
    fn parses_five_and_six_fields_and_refuses_garbage_with_field_errors() {
        assert!(CronSpec::parse("*/5 * * * *", "UTC").is_ok());
        assert!(CronSpec::parse("* * * * * *", "Europe/Paris").is_ok());
        let err = CronSpec::parse("61 * * * *", "Mars/Olympus").unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["cron", "timezone"], "{err}");
        assert!(CronSpec::parse("0 0 30 2 *", "UTC").is_err(), "never fires");
        // Empty lists: refused at once, without a search to the year 5000.
        for expr in [
            " , * * * *",
            "0 , * * *",
            "0 0 * , *",
            "0 0 , * *",
            ", * * * * *",
        ] {
            let err = CronSpec::parse(expr, "UTC").unwrap_err();
            assert!(err.to_string().contains("never fires"), "{expr}: {err}");
        }
        // Rare but real: 29 February fires every four years.
        assert!(CronSpec::parse("0 0 29 2 *", "UTC").is_ok());
        assert!(CronSpec::parse(&"*".repeat(300), "UTC").is_err());
        for fields in ["* * * *", "0 0 0 * * * 2030", "0 0 0 * * * * *"] {
            let err = CronSpec::parse(fields, "UTC").unwrap_err();
            assert!(err.to_string().contains("fields"), "{fields}: {err}");
        }
    }

    #[test]
    fn ticks_are_strictly_after_and_at_most_until_in_the_time_zone() {
        let s = CronSpec::parse("0 9 * * *", "Europe/Paris").unwrap();
        let ticks = s.ticks(at("2026-06-01T00:00:00Z"), at("2026-06-03T07:00:00Z"), 10);
        // 09:00 in Paris is 07:00 UTC in summer.
        assert_eq!(
            ticks,
            [
                at("2026-06-01T07:00:00Z"),
                at("2026-06-02T07:00:00Z"),
                at("2026-06-03T07:00:00Z")
            ]
        );
        assert_eq!(s.ticks(ticks[0], ticks[0], 10), Vec::<Timestamp>::new());
    }

    #[test]
    fn due_ticks_catch_up_within_the_window_oldest_first() {
        let s = schedule(
            "* * * * * *",
            "2026-01-01T00:00:00Z",
            Some("2026-01-01T00:00:10Z"),
            5,
        );
        let spec = s.spec().unwrap();
        let due = s.due_ticks(&spec, at("2026-01-01T00:00:20.5Z"), 100);
        assert_eq!(due.first(), Some(&at("2026-01-01T00:00:16Z")));
        assert_eq!(due.last(), Some(&at("2026-01-01T00:00:20Z")));
        assert_eq!(due.len(), 5);
    }

    #[test]
    fn due_ticks_always_include_the_latest_and_respect_the_limit() {
        let s = schedule("0 * * * *", "2026-01-01T00:00:00Z", None, 0);
        let spec = s.spec().unwrap();
        assert_eq!(
            s.due_ticks(&spec, at("2026-01-01T05:30:00Z"), 100),
            [at("2026-01-01T05:00:00Z")]
        );
        let s = schedule("* * * * * *", "2026-01-01T00:00:00Z", None, 3600);
        let due = s.due_ticks(&spec_of(&s), at("2026-01-01T00:10:00Z"), 7);
        assert_eq!(due.len(), 7);
        assert_eq!(due[0], at("2026-01-01T00:00:01Z"));
        let mut paused = s.clone();
        paused.paused = true;
        assert!(
            paused
                .due_ticks(&spec_of(&s), at("2026-01-01T00:10:00Z"), 7)
                .is_empty()
        );
    }

    fn spec_of(s: &Schedule) -> CronSpec {
        s.spec().unwrap()
    }

    #[test]
    fn nothing_is_due_before_the_first_tick_after_creation() {
        let s = schedule("0 0 * * *", "2026-01-01T00:00:00Z", None, 3600);
        assert!(
            s.due_ticks(&spec_of(&s), at("2026-01-01T12:00:00Z"), 10)
                .is_empty()
        );
    }
}
