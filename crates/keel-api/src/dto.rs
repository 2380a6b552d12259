//! The JSON shapes of the HTTP API. Domain types stay in keel-core; these are what clients
//! see, with their OpenAPI schemas derived beside them so the document cannot drift from
//! the serialisation.

use keel_core::store::{JobPage, QueueStats, StateCounts};
use keel_core::{
    AttemptError, Backoff, Job, JobId, JobState, JobTemplate, QueueName, Schedule, Timestamp,
    UniqueHold,
};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

/// The body of `POST /v1/jobs` and `POST /v1/process`. Only `kind` is required. Parsed field
/// by field (see `job_in`) so that every error is reported at once; this type documents the
/// shape.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `job_in`.
pub struct JobIn {
    /// Which executor or handler runs the job (`noop`, `echo`, `webhook`, …).
    #[schema(example = "echo")]
    kind: String,
    /// Queue to run in; default `default`.
    queue: Option<String>,
    /// Tenant; defaults to the API key's tenant (or `default`). Naming another tenant than
    /// the key's is refused with `403`.
    tenant: Option<String>,
    /// Arguments: any JSON of at most `KEEL_MAX_ARGS_BYTES` (1 MiB), nested at most 64
    /// arrays and objects deep, with no lone UTF-16 surrogate escape; stored and returned
    /// byte for byte; default `null`.
    #[schema(value_type = Value, required = false)]
    args: Option<()>,
    /// 0 (most urgent) … 9; default 4.
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<u8>,
    /// Earliest run time (RFC 3339), from 2001 to 2199 (pattern).
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Run no earlier than this many milliseconds after `run_at`, or after now without it;
    /// at most ten years.
    delay_ms: Option<u64>,
    /// Attempts before the job is discarded, 1..=1000; default 25.
    max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds; default 60000.
    timeout_ms: Option<u64>,
    /// Retry delay policy; default exponential with full jitter (1 s base, 1 h cap).
    backoff: Option<BackoffOut>,
    /// Labels, at most 32 of at most 128 characters.
    tags: Option<Vec<String>>,
    /// Uniqueness: when another job of the tenant holds `key` (per `scope`), that job is
    /// returned instead of creating this one (`POST /v1/jobs` answers `200` with
    /// `Keel-Unique-Conflict`). The database enforces it across replicas.
    unique: Option<UniqueIn>,
}

/// The body of `POST /v1/process`: a job body without `run_at` and `delay_ms` (the job runs
/// now and the request waits for it; schedule later jobs with `POST /v1/jobs`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `job_in`.
pub struct ProcessIn {
    /// Which executor or handler runs the job (`noop`, `echo`, `webhook`, …).
    #[schema(example = "echo")]
    kind: String,
    /// Queue to run in; default `default`.
    queue: Option<String>,
    /// Tenant; defaults to the API key's tenant (or `default`).
    tenant: Option<String>,
    /// Arguments: any JSON of at most `KEEL_MAX_ARGS_BYTES` (1 MiB), nested at most 64
    /// arrays and objects deep, with no lone UTF-16 surrogate escape; stored and returned
    /// byte for byte; default `null`.
    #[schema(value_type = Value, required = false)]
    args: Option<()>,
    /// 0 (most urgent) … 9; default 4.
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<u8>,
    /// Attempts before the job is discarded, 1..=1000; default 25.
    max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds; default 60000.
    timeout_ms: Option<u64>,
    /// Retry delay policy.
    backoff: Option<BackoffOut>,
    /// Labels, at most 32 of at most 128 characters.
    tags: Option<Vec<String>>,
    /// Uniqueness: the job holding the key is waited on instead.
    unique: Option<UniqueIn>,
}

/// A uniqueness constraint on a new job.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `job_in`.
pub struct UniqueIn {
    /// The key, 1 to 255 characters without control characters, scoped to the tenant.
    #[schema(example = "invoice-42")]
    key: String,
    /// How long the key is held: `queued` (until the job first starts), `active` (until it
    /// finishes) or `period` (for one window of `period`, whatever the job's state).
    #[schema(example = "active")]
    scope: String,
    /// The window of scope `period`, 1 s to 366 days, as whole milliseconds or a string
    /// such as `"1h"` or `"1h30m"` (units s, m, h, d); 60 s when not given. Windows are
    /// aligned to the Unix epoch. The other scopes ignore it.
    #[schema(value_type = Option<String>, example = "1h")]
    period: Option<()>,
}

/// The unique key a job holds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UniqueOut {
    /// The key as stored: the caller's key, followed for scope `period` by `@` and the
    /// window's start in Unix milliseconds.
    pub key: String,
    /// `queued`, `active` or `period`.
    pub scope: &'static str,
}

impl From<UniqueHold> for UniqueOut {
    fn from(u: UniqueHold) -> Self {
        Self {
            key: u.key,
            scope: u.scope.as_str(),
        }
    }
}

/// The body of `POST /v1/jobs/batch`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `job_in`.
pub struct BatchIn {
    /// 1 to 1000 jobs, inserted atomically: all or none.
    jobs: Vec<JobIn>,
}

/// A retry delay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackoffOut {
    /// Capped exponential growth with full jitter.
    Exponential {
        /// Upper bound of the first retry window, ms.
        base_ms: u64,
        /// Upper bound of every window, ms.
        cap_ms: u64,
    },
    /// The same delay every time.
    Fixed {
        /// The delay, ms.
        delay_ms: u64,
    },
}

impl From<Backoff> for BackoffOut {
    fn from(b: Backoff) -> Self {
        match b {
            Backoff::Exponential { base_ms, cap_ms } => BackoffOut::Exponential { base_ms, cap_ms },
            Backoff::Fixed { delay_ms } => BackoffOut::Fixed { delay_ms },
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttemptErrorOut {
    /// Which attempt failed (1-based).
    pub attempt: u32,
    /// When (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// What went wrong.
    pub message: String,
}

impl From<AttemptError> for AttemptErrorOut {
    fn from(e: AttemptError) -> Self {
        Self {
            attempt: e.attempt,
            at: e.at,
            message: e.message,
        }
    }
}

/// Who holds a running job and until when. The lease token is never shown: it is the
/// worker's proof of ownership.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LeaseOut {
    /// The lease token: present only in the answer of `POST /v1/queues/{queue}/lease`,
    /// to the worker that took the lease. It proves ownership in heartbeat, complete, fail
    /// and release.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub token: Option<String>,
    /// The worker holding the lease.
    pub owner: String,
    /// When it lapses unless renewed (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobOut {
    /// Time-ordered id (UUIDv7).
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// Queue.
    #[schema(value_type = String)]
    pub queue: QueueName,
    /// Executor or handler.
    pub kind: String,
    /// Tenant.
    pub tenant: String,
    /// Arguments, byte for byte as submitted.
    #[schema(value_type = Value)]
    pub args: Box<RawValue>,
    /// 0 (most urgent) … 9.
    pub priority: u8,
    /// One of scheduled, available, running, retryable, completed, discarded, cancelled.
    #[schema(value_type = String, example = "available")]
    pub state: JobState,
    /// Attempts started so far.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Per-attempt timeout, ms.
    pub timeout_ms: u64,
    /// Retry delay policy.
    pub backoff: BackoffOut,
    /// Labels.
    pub tags: Vec<String>,
    /// Earliest (next) run time (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub run_at: Timestamp,
    /// One entry per failed attempt, oldest first.
    pub errors: Vec<AttemptErrorOut>,
    /// The result reported on completion (any JSON), or null.
    #[schema(value_type = Option<Value>)]
    pub result: Option<Box<RawValue>>,
    /// The current lease, while running.
    pub lease: Option<LeaseOut>,
    /// When it was inserted (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// When the latest attempt started.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub started_at: Option<Timestamp>,
    /// When it reached a terminal state.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    /// Its unique key, when it was enqueued with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique: Option<UniqueOut>,
}

impl From<Job> for JobOut {
    fn from(j: Job) -> Self {
        Self {
            id: j.id,
            queue: j.queue,
            kind: j.kind.into(),
            tenant: j.tenant.into(),
            args: j.args,
            priority: j.priority.get(),
            state: j.state,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            timeout_ms: u64::try_from(j.timeout.as_millis()).unwrap_or(u64::MAX),
            backoff: j.backoff.into(),
            tags: j.tags,
            run_at: j.run_at,
            errors: j.errors.into_iter().map(AttemptErrorOut::from).collect(),
            result: j.result,
            lease: j.lease.map(|l| LeaseOut {
                token: None,
                owner: l.owner.into(),
                expires_at: l.expires_at,
            }),
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            unique: j.unique.map(UniqueOut::from),
        }
    }
}

impl JobOut {
    /// A job as the worker that just leased it sees it: with its lease token.
    pub fn leased(job: Job) -> Self {
        let token = job.lease.as_ref().map(|l| l.token.to_string());
        let mut out = Self::from(job);
        if let Some(lease) = out.lease.as_mut() {
            lease.token = token;
        }
        out
    }
}

/// The response of `POST /v1/jobs/batch`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BatchOut {
    /// The stored jobs, in request order.
    pub jobs: Vec<JobOut>,
}

/// One page of `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobPageOut {
    /// Jobs by ascending id (oldest first).
    pub jobs: Vec<JobOut>,
    /// Pass as `after` to get the next page; null on the last page.
    #[schema(value_type = Option<String>, format = Uuid)]
    pub next: Option<JobId>,
}

impl From<JobPage> for JobPageOut {
    fn from(p: JobPage) -> Self {
        Self {
            jobs: p.jobs.into_iter().map(JobOut::from).collect(),
            next: p.next,
        }
    }
}

/// `GET /v1/jobs/{id}/result`: the result of a completed job (`200`), or just the state of
/// one still on its way (`202`, `result` absent).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobResultOut {
    /// The job.
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// Its state.
    #[schema(value_type = String, example = "completed")]
    pub state: JobState,
    /// The result (any JSON; null if the job completed without one). Absent while the job
    /// has not finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Value>)]
    pub result: Option<Box<RawValue>>,
}

/// The body of `POST /v1/schedules` and `PUT /v1/schedules/{name}`. Parsed field by field
/// (see `schedule_in`) so that every error is reported at once; this type documents the
/// shape.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only.
pub struct ScheduleIn {
    /// Unique per tenant: letters, digits, `-`, `_`, `.`, `:`, up to 128 bytes. Required
    /// by `POST`; with `PUT` it comes from the path (and must match it if given here).
    #[schema(example = "nightly-report")]
    name: Option<String>,
    /// Tenant; defaults to the API key's tenant (or `default`). Naming another tenant than
    /// the key's is refused with `403`.
    tenant: Option<String>,
    /// Cron expression: 5 fields, or 6 with seconds first; names, ranges, steps, `L`, `W`,
    /// `#` and nicknames such as `@daily`.
    #[schema(example = "0 3 * * *")]
    cron: String,
    /// IANA time zone the expression is read in; default `UTC`.
    #[schema(example = "Europe/Paris")]
    timezone: Option<String>,
    /// The job each tick enqueues.
    job: JobTemplateIn,
    /// A paused schedule enqueues nothing; default false.
    paused: Option<bool>,
    /// How far back ticks missed while no replica ran are caught up (the latest due tick
    /// always is), at most 7 days; whole milliseconds or a string such as `"1h"`. Default
    /// 1 h.
    #[schema(value_type = Option<String>, example = "1h")]
    catch_up: Option<()>,
}

/// The job a schedule enqueues at each tick: the fields of a job body a schedule fixes, with
/// the same defaults.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only.
pub struct JobTemplateIn {
    /// Executor or handler.
    #[schema(example = "webhook")]
    kind: String,
    /// Queue; default `default`.
    queue: Option<String>,
    /// Arguments, passed to every tick's job byte for byte (the limits of a job's `args`);
    /// default `null`.
    #[schema(value_type = Value, required = false)]
    args: Option<()>,
    /// 0 (most urgent) … 9; default 4.
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<u8>,
    /// Attempts per tick's job, 1..=1000; default 25.
    max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds; default 60000.
    timeout_ms: Option<u64>,
    /// Retry delay policy.
    backoff: Option<BackoffOut>,
    /// Labels.
    tags: Option<Vec<String>>,
}

/// The job a schedule enqueues at each tick.
#[derive(Debug, Clone, Serialize, ToSchema)]
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
    pub backoff: BackoffOut,
    /// Labels.
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
#[derive(Debug, Clone, Serialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SchedulePageOut {
    /// Schedules by name.
    pub schedules: Vec<ScheduleOut>,
    /// Pass as `after` to get the next page; null on the last page.
    pub next: Option<String>,
}

/// Job counts of one queue, by state.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct QueueCounts {
    /// Waiting for their run time.
    pub scheduled: u64,
    /// Ready to run.
    pub available: u64,
    /// Running.
    pub running: u64,
    /// Waiting for a retry.
    pub retryable: u64,
    /// Completed.
    pub completed: u64,
    /// Discarded.
    pub discarded: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl From<StateCounts> for QueueCounts {
    fn from(c: StateCounts) -> Self {
        Self {
            scheduled: c.scheduled,
            available: c.available,
            running: c.running,
            retryable: c.retryable,
            completed: c.completed,
            discarded: c.discarded,
            cancelled: c.cancelled,
        }
    }
}

/// One queue in `GET /v1/queues`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueueOut {
    /// The queue.
    #[schema(value_type = String)]
    pub queue: QueueName,
    /// Whether leasing from it is paused.
    pub paused: bool,
    /// Its jobs by state.
    pub counts: QueueCounts,
}

impl From<QueueStats> for QueueOut {
    fn from(s: QueueStats) -> Self {
        Self {
            queue: s.queue,
            paused: s.paused,
            counts: s.counts.into(),
        }
    }
}

/// The response of pausing or resuming a queue.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueuePausedOut {
    /// The queue.
    #[schema(value_type = String)]
    pub queue: QueueName,
    /// Whether it is now paused.
    pub paused: bool,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthOut {
    /// Always `ok`: answering at all is the signal.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// One dependency check of `GET /readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CheckOut {
    /// `ok` or `error`.
    #[schema(example = "ok")]
    pub status: &'static str,
    /// How long the check took, when it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why it failed (no internals beyond the operation attempted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The checks of `GET /readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadyChecks {
    /// The job store.
    pub database: CheckOut,
    /// The circuit breaker in front of the job store: `error` while it is open, because the
    /// requests this replica would get are refused until it closes. Absent when the store
    /// has no breaker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_breaker: Option<CheckOut>,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadyOut {
    /// `ready` (`200`) or `unavailable` (`503`).
    #[schema(example = "ready")]
    pub status: &'static str,
    /// Each dependency.
    pub checks: ReadyChecks,
    /// Whether shutdown has begun.
    pub draining: bool,
}

/// The body of `POST /v1/queues/{queue}/lease` (docs/workers.md). Parsed field by field
/// (see `worker_in`); this type documents the shape.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct LeaseBody {
    /// Who leases: shown in `GET /v1/workers` and as each job's `lease.owner`.
    #[schema(example = "billing-7f9c:1234")]
    worker: String,
    /// At most this many jobs (the worker's free slots), 1–1000; default 1.
    max: Option<u32>,
    /// How long to wait for a job when none is available: `"0s"`–`"30s"` or milliseconds;
    /// default `"0s"`.
    #[schema(value_type = Option<String>, example = "10s")]
    wait: Option<String>,
    /// Each lease's length unless renewed by a heartbeat: `"5s"`–`"1h"`; default `"30s"`.
    #[schema(value_type = Option<String>, example = "30s")]
    lease: Option<String>,
    /// Take only jobs of these kinds (1–100 names); default every kind.
    kinds: Option<Vec<String>>,
}

/// The answer of a lease: the jobs now held, each with its lease token.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LeasedOut {
    /// Running jobs, in lease order; empty when the wait ran out.
    pub jobs: Vec<JobOut>,
}

/// The body of `POST /v1/jobs/{id}/heartbeat`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct HeartbeatBody {
    /// The lease token from the lease answer.
    #[schema(format = Uuid)]
    token: String,
    /// The new lease length from now, `"5s"`–`"1h"`; default `"30s"`.
    #[schema(value_type = Option<String>, example = "30s")]
    lease: Option<String>,
}

/// The answer of a heartbeat.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HeartbeatOut {
    /// When the lease now lapses unless renewed again; null once the job was cancelled.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// A user cancelled the job: stop the handler. The job already ended `cancelled`.
    pub cancel_requested: bool,
}

/// The body of `POST /v1/jobs/{id}/complete`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct CompleteBody {
    /// The lease token from the lease answer.
    #[schema(format = Uuid)]
    token: String,
    /// The result: any JSON within the `args` limits; absent means null.
    #[schema(value_type = Option<Value>)]
    result: Option<serde_json::Value>,
}

/// The body of `POST /v1/jobs/{id}/fail`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct FailBody {
    /// The lease token from the lease answer.
    #[schema(format = Uuid)]
    token: String,
    /// What went wrong (kept up to 2 KiB).
    error: String,
    /// The error will not go away by retrying: discard the job now. Default false.
    permanent: Option<bool>,
    /// Run again after this long instead of after the job's backoff.
    #[schema(value_type = Option<String>, example = "10s")]
    retry_in: Option<String>,
}

/// The body of `POST /v1/jobs/{id}/release`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct ReleaseBody {
    /// The lease token from the lease answer.
    #[schema(format = Uuid)]
    token: String,
}

/// One completion of `POST /v1/jobs/complete`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct CompleteItem {
    /// The job.
    #[schema(format = Uuid)]
    id: String,
    /// Its lease token.
    #[schema(format = Uuid)]
    token: String,
    /// The result; absent means null.
    #[schema(value_type = Option<Value>)]
    result: Option<serde_json::Value>,
}

/// The body of `POST /v1/jobs/complete`: 1–1000 completions.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct CompleteManyBody {
    /// The completions, each judged alone.
    outcomes: Vec<CompleteItem>,
}

/// One failure of `POST /v1/jobs/fail`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct FailItem {
    /// The job.
    #[schema(format = Uuid)]
    id: String,
    /// Its lease token.
    #[schema(format = Uuid)]
    token: String,
    /// What went wrong.
    error: String,
    /// Discard now. Default false.
    permanent: Option<bool>,
    /// Run again after this long instead of after the backoff.
    #[schema(value_type = Option<String>)]
    retry_in: Option<String>,
}

/// The body of `POST /v1/jobs/fail`: 1–1000 failures.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // Documentation only: the body is parsed by `worker_in`.
pub struct FailManyBody {
    /// The failures, each judged alone.
    outcomes: Vec<FailItem>,
}

/// The answer to one outcome of a batch.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutcomeOut {
    /// The job.
    #[schema(value_type = String, format = Uuid)]
    pub id: JobId,
    /// What the single-outcome route would have answered: 200, or the error's status.
    pub status: u16,
    /// On success, the job's state now (`completed`, `retryable` or `discarded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub state: Option<JobState>,
    /// On failure, why (a stale token says what happened to the job).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<crate::error::Problem>,
}

/// The answer of `POST /v1/jobs/complete` and `POST /v1/jobs/fail`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutcomesOut {
    /// One answer per outcome, in the order sent.
    pub results: Vec<OutcomeOut>,
}

/// One external worker, as `GET /v1/workers` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerOut {
    /// The name it leases under.
    pub id: String,
    /// The tenant whose key it uses.
    pub tenant: String,
    /// Queues it leased from.
    pub queues: Vec<String>,
    /// Its latest lease or heartbeat (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub last_seen: Timestamp,
    /// Running jobs whose lease it holds.
    pub jobs_held: usize,
}

impl From<crate::worker_registry::WorkerInfo> for WorkerOut {
    fn from(w: crate::worker_registry::WorkerInfo) -> Self {
        Self {
            id: w.id.into(),
            tenant: w.tenant.into(),
            queues: w.queues.into_iter().map(String::from).collect(),
            last_seen: w.last_seen,
            jobs_held: w.jobs_held,
        }
    }
}

/// `GET /v1/workers`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkersOut {
    /// Workers seen in the last 5 minutes by this process, by tenant and id.
    pub workers: Vec<WorkerOut>,
}
