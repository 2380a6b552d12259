//! Jobs: the body that enqueues one, and the job as the API shows it.

use keel_core::store::JobPage;
use keel_core::{
    AttemptError, Job, JobId, JobState, QueueName, Timestamp, UniqueHold, UniqueScopeKind,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::HumanDuration;

/// The body of `POST /v1/jobs`, of `POST /v1/process` (which refuses `run_at` and
/// `delay_ms`: its job runs now) and of each item of `POST /v1/jobs/batch`. Only `kind` is
/// required.
///
/// The server reads it member by member (`keel_api::wire_in`), so a `422` lists every bad
/// field at once; `null` for an optional field means "not given".
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct JobIn {
    /// Which executor or handler runs the job (`noop`, `echo`, `webhook`, …).
    #[serde(default)]
    #[schema(example = "echo", required = true)]
    pub kind: String,
    /// Queue to run in; default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Tenant; defaults to the API key's tenant (or `default`). Naming another tenant than
    /// the key's is refused with `403`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Arguments: any JSON of at most `KEEL_MAX_ARGS_BYTES` (1 MiB), nested at most 64
    /// arrays and objects deep, with no lone UTF-16 surrogate escape; stored and returned
    /// byte for byte; default `null`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value, required = false)]
    pub args: Option<Box<RawValue>>,
    /// 0 (most urgent) … 9; default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9)]
    pub priority: Option<u8>,
    /// Earliest run time (RFC 3339), from 2001 to 2199 (pattern).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::rfc3339::option"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub run_at: Option<Timestamp>,
    /// Run no earlier than this many milliseconds after `run_at`, or after now without it;
    /// at most ten years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Attempts before the job is discarded, 1..=1000; default 25.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout in milliseconds; default 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry delay policy; default exponential with full jitter (1 s base, 1 h cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Labels, at most 32 of at most 128 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// Uniqueness: when another job of the tenant holds `key` (per `scope`), that job is
    /// returned instead of creating this one (`POST /v1/jobs` answers `200` with
    /// `Keel-Unique-Conflict`; `POST /v1/process` waits for it). The database enforces it
    /// across replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<UniqueIn>,
    /// Annotations: a JSON object of at most 16 KiB (trace ids, who asked, …), stored and
    /// returned byte for byte with the job and handed to its worker. Keel never reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, required = false)]
    pub meta: Option<Box<RawValue>>,
}

impl From<crate::JobTemplateIn> for JobIn {
    /// The job a template describes, for the checks a job and a template share.
    fn from(t: crate::JobTemplateIn) -> Self {
        Self {
            kind: t.kind,
            queue: t.queue,
            args: t.args,
            priority: t.priority,
            max_attempts: t.max_attempts,
            timeout_ms: t.timeout_ms,
            backoff: t.backoff,
            tags: t.tags,
            ..Self::default()
        }
    }
}

impl JobIn {
    /// A job of `kind` with `args`, everything else left to the server's defaults.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "callers build args in place: JobIn::new(\"echo\", json!({...}))"
    )]
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            args: Some(raw_json(&args)),
            ..Self::default()
        }
    }
}

/// `value` as raw JSON text. A `Value` always serialises (its keys are strings).
pub fn raw_json(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| {
        RawValue::from_string("null".to_owned()).unwrap_or_else(|_| unreachable!())
    })
}

/// A uniqueness constraint on a new job. Unknown members are refused (the server checks a
/// body's own members itself; this object is read whole inside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UniqueIn {
    /// The key, 1 to 255 characters without control characters, scoped to the tenant.
    #[schema(example = "invoice-42")]
    pub key: String,
    /// How long the key is held: `queued` (until the job first starts), `active` (until it
    /// finishes) or `period` (for one window of `period`, whatever the job's state).
    #[schema(value_type = String, example = "active")]
    pub scope: UniqueScopeKind,
    /// The window of scope `period`, 1 s to 366 days, as whole milliseconds or a string
    /// such as `"1h"` or `"1h30m"` (units s, m, h, d); 60 s when not given. Windows are
    /// aligned to the Unix epoch. The other scopes ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1h")]
    pub period: Option<HumanDuration>,
}

impl UniqueIn {
    /// Unique by `key` while the job waits or runs (scope `active`).
    pub fn active(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            scope: UniqueScopeKind::Active,
            period: None,
        }
    }

    /// Unique by `key` until the job first starts (scope `queued`).
    pub fn queued(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            scope: UniqueScopeKind::Queued,
            period: None,
        }
    }

    /// Unique by `key` for each window of `period`, whatever the job's state.
    pub fn period(key: impl Into<String>, period: std::time::Duration) -> Self {
        Self {
            key: key.into(),
            scope: UniqueScopeKind::Period,
            period: Some(HumanDuration(period)),
        }
    }
}

/// The unique key a job holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UniqueOut {
    /// The key as stored: the caller's key, followed for scope `period` by `@` and the
    /// window's start in Unix milliseconds.
    pub key: String,
    /// `queued`, `active` or `period`.
    #[schema(value_type = String)]
    pub scope: UniqueScopeKind,
}

impl From<UniqueHold> for UniqueOut {
    fn from(u: UniqueHold) -> Self {
        Self {
            key: u.key,
            scope: u.scope,
        }
    }
}

/// The body of `POST /v1/jobs/batch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct BatchIn {
    /// 1 to 1000 jobs, inserted atomically: all or none.
    #[serde(default)]
    #[schema(required = true)]
    pub jobs: Vec<JobIn>,
}

/// A retry delay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Backoff {
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

impl From<keel_core::Backoff> for Backoff {
    fn from(b: keel_core::Backoff) -> Self {
        match b {
            keel_core::Backoff::Exponential { base_ms, cap_ms } => {
                Backoff::Exponential { base_ms, cap_ms }
            }
            keel_core::Backoff::Fixed { delay_ms } => Backoff::Fixed { delay_ms },
        }
    }
}

impl From<Backoff> for keel_core::Backoff {
    fn from(b: Backoff) -> Self {
        match b {
            Backoff::Exponential { base_ms, cap_ms } => {
                keel_core::Backoff::Exponential { base_ms, cap_ms }
            }
            Backoff::Fixed { delay_ms } => keel_core::Backoff::Fixed { delay_ms },
        }
    }
}

/// One failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    pub backoff: Backoff,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Earliest (next) run time (RFC 3339).
    #[schema(value_type = String, format = DateTime)]
    pub run_at: Timestamp,
    /// One entry per failed attempt, oldest first.
    #[serde(default)]
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
    /// Its annotations, byte for byte as submitted, when it was enqueued with some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Box<RawValue>>,
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
            meta: j.meta,
        }
    }
}

impl JobOut {
    /// `args` as a JSON value (the server sent valid JSON; `null` otherwise).
    pub fn args_value(&self) -> serde_json::Value {
        serde_json::from_str(self.args.get()).unwrap_or(serde_json::Value::Null)
    }

    /// `result` as a JSON value, once there is one.
    pub fn result_value(&self) -> Option<serde_json::Value> {
        self.result
            .as_ref()
            .map(|r| serde_json::from_str(r.get()).unwrap_or(serde_json::Value::Null))
    }

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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchOut {
    /// The stored jobs, in request order.
    pub jobs: Vec<JobOut>,
}

/// One page of `GET /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
