//! Queues and health: the counts of `GET /v1/queues` and the probes' answers.

use std::borrow::Cow;

use keel_core::QueueName;
use keel_core::store::{QueueStats, StateCounts};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Job counts of one queue, by state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueuePausedOut {
    /// The queue.
    #[schema(value_type = String)]
    pub queue: QueueName,
    /// Whether it is now paused.
    pub paused: bool,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthOut {
    /// Always `ok`: answering at all is the signal.
    #[schema(example = "ok")]
    pub status: Cow<'static, str>,
}

/// One dependency check of `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CheckOut {
    /// `ok` or `error`.
    #[schema(example = "ok")]
    pub status: Cow<'static, str>,
    /// How long the check took, when it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why it failed (no internals beyond the operation attempted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The checks of `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyChecks {
    /// The job store.
    pub database: CheckOut,
    /// The circuit breaker in front of the job store: `error` while it is open, because the
    /// requests this replica would get are refused until it closes. Absent when the store
    /// has no breaker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_breaker: Option<CheckOut>,
    /// Whether store calls met a configuration error lately (a pooler and Keel's settings
    /// disagreeing: named statements through a transaction pooler, say): `error`, with
    /// the database's words and the setting to change, for 30 s after the last one.
    /// Absent when the store has no guard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_config: Option<CheckOut>,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyOut {
    /// `ready` (`200`) or `unavailable` (`503`).
    #[schema(example = "ready")]
    pub status: Cow<'static, str>,
    /// Each dependency.
    pub checks: ReadyChecks,
    /// Whether shutdown has begun.
    pub draining: bool,
}
