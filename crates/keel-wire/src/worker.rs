//! The worker protocol (docs/workers.md): leases, heartbeats and outcomes, and the workers
//! `GET /v1/workers` shows.

use keel_core::{JobId, JobState, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{HumanDuration, JobOut, Problem};

/// The body of `POST /v1/queues/{queue}/lease` (docs/workers.md). Only `worker` is
/// required.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct LeaseBody {
    /// Who leases: shown in `GET /v1/workers` and as each job's `lease.owner`.
    #[serde(default)]
    #[schema(example = "billing-7f9c:1234", required = true)]
    pub worker: String,
    /// At most this many jobs (the worker's free slots), 1–1000; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// How long to wait for a job when none is available: `"0s"`–`"30s"` or milliseconds;
    /// default `"0s"`.
    #[schema(value_type = Option<String>, example = "10s")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<HumanDuration>,
    /// Each lease's length unless renewed by a heartbeat: `"5s"`–`"1h"`; default `"30s"`.
    #[schema(value_type = Option<String>, example = "30s")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<HumanDuration>,
    /// Take only jobs of these kinds (1–100 names); default every kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
}

/// The answer of a lease: the jobs now held, each with its lease token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeasedOut {
    /// Running jobs, in lease order; empty when the wait ran out.
    pub jobs: Vec<JobOut>,
}

/// The body of `POST /v1/jobs/{id}/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatBody {
    /// The lease token from the lease answer.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
    /// The new lease length from now, `"5s"`–`"1h"`; default `"30s"`.
    #[schema(value_type = Option<String>, example = "30s")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<HumanDuration>,
}

/// The answer of a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatOut {
    /// When the lease now lapses unless renewed again; null once the job was cancelled.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    /// A user cancelled the job: stop the handler. The job already ended `cancelled`.
    pub cancel_requested: bool,
}

/// The body of `POST /v1/jobs/{id}/complete`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompleteBody {
    /// The lease token from the lease answer.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
    /// The result: any JSON within the `args` limits; absent means null.
    #[schema(value_type = Option<Value>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
}

/// The body of `POST /v1/jobs/{id}/fail`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FailBody {
    /// The lease token from the lease answer.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
    /// What went wrong (kept up to 2 KiB).
    #[serde(default)]
    #[schema(required = true)]
    pub error: String,
    /// The error will not go away by retrying: discard the job now. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permanent: Option<bool>,
    /// Run again after this long instead of after the job's backoff.
    #[schema(value_type = Option<String>, example = "10s")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<HumanDuration>,
}

/// The body of `POST /v1/jobs/{id}/release`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ReleaseBody {
    /// The lease token from the lease answer.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
}

/// One completion of `POST /v1/jobs/complete`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompleteItem {
    /// The job.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub id: String,
    /// Its lease token.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
    /// The result; absent means null.
    #[schema(value_type = Option<Value>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
}

/// The body of `POST /v1/jobs/complete`: 1–1000 completions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CompleteManyBody {
    /// The completions, each judged alone.
    #[serde(default)]
    #[schema(required = true)]
    pub outcomes: Vec<CompleteItem>,
}

/// One failure of `POST /v1/jobs/fail`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FailItem {
    /// The job.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub id: String,
    /// Its lease token.
    #[serde(default)]
    #[schema(format = Uuid, required = true)]
    pub token: String,
    /// What went wrong.
    #[serde(default)]
    #[schema(required = true)]
    pub error: String,
    /// Discard now. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permanent: Option<bool>,
    /// Run again after this long instead of after the backoff.
    #[schema(value_type = Option<String>)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<HumanDuration>,
}

/// The body of `POST /v1/jobs/fail`: 1–1000 failures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FailManyBody {
    /// The failures, each judged alone.
    #[serde(default)]
    #[schema(required = true)]
    pub outcomes: Vec<FailItem>,
}

/// The answer to one outcome of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    pub problem: Option<Problem>,
}

/// The answer of `POST /v1/jobs/complete` and `POST /v1/jobs/fail`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutcomesOut {
    /// One answer per outcome, in the order sent.
    pub results: Vec<OutcomeOut>,
}

/// One external worker, as `GET /v1/workers` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerOut {
    /// The name it leases under.
    #[serde(default)]
    #[schema(required = true)]
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

/// `GET /v1/workers`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkersOut {
    /// Workers seen in the last 5 minutes by this process, by tenant and id.
    pub workers: Vec<WorkerOut>,
}
