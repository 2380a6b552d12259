//! Cron schedules: the body that creates or replaces one, and the schedule as the API
//! shows it.

use keel_core::{JobTemplate, Schedule, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{Backoff, UnitDuration};

/// The body of `POST /v1/schedules` and `PUT /v1/schedules/{name}`. `cron` and `job` are
/// required, and `name` by `POST`. Read member by member like a job, so a `422` lists every
/// bad field at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ScheduleIn {
    /// Unique per tenant: letters, digits, `-`, `_`, `.`, `:`, up to 128 bytes. Required
    /// by `POST`; with `PUT` it comes from the path (and must match it if given here).
    #[schema(example = "nightly-report")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tenant; defaults to the API key's tenant (or `default`). Naming another tenant than
    /// the key's is refused with `403`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Cron expression: 5 fields, or 6 with seconds first; names, ranges, steps, `L`, `W`,
    /// `#` and nicknames such as `@daily`.
    #[serde(default)]
    #[schema(example = "0 3 * * *", required = true)]
    pub cron: String,
    /// IANA time zone the expression is read in; default `UTC`.
    #[schema(example = "Europe/Paris")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The job each tick enqueues.
    #[serde(default)]
    #[schema(required = true)]
    pub job: JobTemplateIn,
    /// A paused schedule enqueues nothing; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// How far back ticks missed while no replica ran are caught up (the latest due tick
    /// always is), at most 7 days, as a string with a unit such as `"30m"` or `"1h"` (a
    /// bare number is refused: minutes or milliseconds?). Default 1 h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1h")]
    pub catch_up: Option<UnitDuration>,
}

/// The job a schedule enqueues at each tick: the fields of a [`crate::JobIn`] a schedule
/// fixes, with the same defaults. It has no tenant or run time (each tick decides them) and
/// no unique key (every tick is a new job).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JobTemplateIn {
    /// Executor or handler.
    #[serde(default)]
    #[schema(example = "webhook", required = true)]
    pub kind: String,
    /// Queue; default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Arguments, passed to every tick's job byte for byte (the limits of a job's `args`);
    /// default `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value, required = false)]
    pub args: Option<Box<RawValue>>,
    /// 0 (most urgent) … 9; default 4.
    #[schema(minimum = 0, maximum = 9)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Attempts per tick's job, 1..=1000; default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds; default 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry delay policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// The job a schedule enqueues at each tick.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobTemplateOut {
    /// Executor or handler.
    pub kind: String,
    /// Queue.
    pub queue: String,
    /// Arguments, byte for byte as submitted.
    #[schema(value_type = Value)]
    pub args: Box<RawValue>,
    /// 0 (most urgent) … 9.
    pub priority: u8,
    /// Attempts allowed per tick's job.
    pub max_attempts: u32,
    /// Per-attempt timeout, ms.
    pub timeout_ms: u64,
    /// Retry delay policy.
    pub backoff: Backoff,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl From<JobTemplate> for JobTemplateOut {
    fn from(t: JobTemplate) -> Self {
        Self {
            kind: t.kind.into(),
            queue: t.queue.into(),
            args: t.args,
            priority: t.priority.get(),
            max_attempts: t.max_attempts,
            timeout_ms: u64::try_from(t.timeout.as_millis()).unwrap_or(u64::MAX),
            backoff: t.backoff.into(),
            tags: t.tags,
        }
    }
}

/// A cron schedule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduleOut {
    /// Tenant.
    pub tenant: String,
    /// Name, unique per tenant.
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone.
    pub timezone: String,
    /// The job each tick enqueues.
    pub job: JobTemplateOut,
    /// Whether ticks are skipped.
    pub paused: bool,
    /// Catch-up window, ms.
    pub catch_up: u64,
    /// The latest tick enqueued (RFC 3339), if any.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_tick_at: Option<Timestamp>,
    /// The next (up to) 5 tick times after now (RFC 3339); empty while paused.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub next_ticks: Vec<Timestamp>,
    /// When it was created (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// When it was last replaced, paused or resumed (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
}

impl ScheduleOut {
    /// How many upcoming ticks are shown.
    pub const NEXT_TICKS: usize = 5;

    /// `s` as shown at `now`.
    pub fn at(s: Schedule, now: Timestamp) -> Self {
        let next_ticks = match s.spec() {
            Some(spec) if !s.paused => {
                // Far enough for a yearly schedule's five ticks.
                let horizon = now + chrono::TimeDelta::days(366 * 6);
                spec.ticks(now, horizon, Self::NEXT_TICKS)
            }
            _ => Vec::new(),
        };
        Self {
            tenant: s.tenant.into(),
            name: s.name.into(),
            cron: s.cron,
            timezone: s.timezone,
            job: s.job.into(),
            paused: s.paused,
            catch_up: u64::try_from(s.catch_up.as_millis()).unwrap_or(u64::MAX),
            last_tick_at: s.last_tick_at,
            next_ticks,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// One page of `GET /v1/schedules`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SchedulePageOut {
    /// Schedules by name.
    pub schedules: Vec<ScheduleOut>,
    /// Pass as `after` to get the next page; null on the last page.
    pub next: Option<String>,
}
