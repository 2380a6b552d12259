//! The Rust SDK for Keel's HTTP API, used by the `keel` CLI's client commands, by
//! integration tests and by Rust programs that enqueue or inspect jobs.
//!
//! It speaks plain JSON over HTTP and mirrors the API's shapes loosely (`args`, `result`
//! and the like are `serde_json::Value`), so a newer server adding fields does not break an
//! older client. Errors carry the server's `application/problem+json` body when there is
//! one, so callers can show the server's own explanation.

#![warn(missing_docs)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A problem+json error body (RFC 9457) as Keel sends it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Problem {
    /// Problem type URI.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Short summary.
    #[serde(default)]
    pub title: String,
    /// HTTP status.
    #[serde(default)]
    pub status: u16,
    /// What went wrong, for this request.
    #[serde(default)]
    pub detail: Option<String>,
    /// The request id to quote in a bug report.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Field errors (422).
    #[serde(default)]
    pub errors: Vec<FieldError>,
    /// The job concerned, when there is one (e.g. a 504 from `process`).
    #[serde(default)]
    pub job_id: Option<String>,
}

/// One invalid field.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{status}: {}", problem.detail.as_deref().unwrap_or(&problem.title))]
    Api {
        /// The status code.
        status: StatusCode,
        /// The problem body (empty fields if the body was not problem+json). Boxed so the
        /// error stays small on the `Ok` path.
        problem: Box<Problem>,
    },
    /// The server could not be reached or the connection failed.
    #[error("cannot reach Keel at {url}")]
    Unreachable {
        /// Base URL tried.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered something this client does not understand.
    #[error("unexpected response from Keel: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A job to enqueue. Only `kind` is required; everything else takes the server's default.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobIn {
    /// Executor or handler.
    pub kind: String,
    /// Queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// 0 (highest) … 9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Earliest start, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// Delay before the first attempt, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Attempts allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry policy, e.g. `{"type":"fixed","delay_ms":100}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Value>,
    /// Labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

impl JobIn {
    /// A job of `kind` with `args`, everything else defaulted.
    pub fn new(kind: impl Into<String>, args: Value) -> Self {
        Self {
            kind: kind.into(),
            args: Some(args),
            ..Self::default()
        }
    }
}

/// A job as the server reports it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct JobOut {
    /// Id.
    pub id: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Tenant.
    pub tenant: String,
    /// Arguments.
    pub args: Value,
    /// Priority.
    pub priority: u8,
    /// State.
    pub state: String,
    /// Attempts started.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Per-attempt timeout, ms.
    pub timeout_ms: u64,
    /// Retry policy.
    pub backoff: Value,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Next or first run time.
    pub run_at: String,
    /// Failed attempts.
    #[serde(default)]
    pub errors: Vec<AttemptErrorOut>,
    /// Result, once completed.
    #[serde(default)]
    pub result: Option<Value>,
    /// Lease while running.
    #[serde(default)]
    pub lease: Option<Value>,
    /// Creation time.
    pub created_at: String,
    /// Start of the latest attempt.
    #[serde(default)]
    pub started_at: Option<String>,
    /// End time.
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// One failed attempt.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct AttemptErrorOut {
    /// Attempt number.
    pub attempt: u32,
    /// When.
    pub at: String,
    /// Message.
    pub message: String,
}

/// A page of jobs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct JobList {
    /// The jobs, oldest first.
    pub jobs: Vec<JobOut>,
    /// Cursor for the next page.
    pub next: Option<String>,
}

/// Filters for [`Client::list_jobs`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListQuery {
    /// Queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// State.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Cursor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Page size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// What `POST /v1/jobs` answered.
#[derive(Debug, Clone)]
pub struct Enqueued {
    /// The job.
    pub job: JobOut,
    /// HTTP status (201, or the original status on an idempotent replay).
    pub status: StatusCode,
    /// Whether this was an idempotent replay of an earlier request.
    pub replayed: bool,
    /// The raw body, byte for byte.
    pub body: Vec<u8>,
}

/// A Keel API client. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`), authenticating with
    /// `api_key` when given.
    pub fn new(base: impl Into<String>, api_key: Option<String>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Decode(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.into().trim_end_matches('/').to_owned(),
            api_key,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        if status.is_client_error() || status.is_server_error() {
            let bytes = resp.bytes().await.unwrap_or_default();
            let problem = serde_json::from_slice(&bytes).unwrap_or_else(|_| Problem {
                status: status.as_u16(),
                title: status.canonical_reason().unwrap_or("error").to_owned(),
                detail: Some(String::from_utf8_lossy(&bytes).into_owned()),
                ..Problem::default()
            });
            return Err(ClientError::Api {
                status,
                problem: Box::new(problem),
            });
        }
        Ok(resp)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(format!("reading the body: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Enqueues a job; with `idempotency_key`, a retry of the same request returns the
    /// original response instead of creating a second job.
    pub async fn enqueue(
        &self,
        job: &JobIn,
        idempotency_key: Option<&str>,
    ) -> Result<Enqueued, ClientError> {
        let mut req = self.request(Method::POST, "/v1/jobs").json(job);
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = self.send(req).await?;
        let status = resp.status();
        let replayed = resp
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Decode(format!("reading the body: {e}")))?
            .to_vec();
        let job = serde_json::from_slice(&body).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(Enqueued {
            job,
            status,
            replayed,
            body,
        })
    }

    /// Enqueues several jobs atomically: all or none.
    pub async fn enqueue_batch(&self, jobs: &[JobIn]) -> Result<Vec<JobOut>, ClientError> {
        #[derive(Deserialize)]
        struct Batch {
            jobs: Vec<JobOut>,
        }
        let body = serde_json::json!({ "jobs": jobs });
        let b: Batch = self
            .json(self.request(Method::POST, "/v1/jobs/batch").json(&body))
            .await?;
        Ok(b.jobs)
    }

    /// Enqueues a job and waits for it to finish, up to the server's request deadline
    /// (`504` with the job id if it has not).
    pub async fn process(&self, job: &JobIn) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::POST, "/v1/process").json(job))
            .await
    }

    /// One job.
    pub async fn get_job(&self, id: &str) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/jobs/{id}")))
            .await
    }

    /// A job's result: `Ok(Some)` once completed, `Ok(None)` while still pending.
    pub async fn job_result(&self, id: &str) -> Result<Option<Value>, ClientError> {
        let resp = self
            .send(self.request(Method::GET, &format!("/v1/jobs/{id}/result")))
            .await?;
        if resp.status() == StatusCode::ACCEPTED {
            return Ok(None);
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(Some(v.get("result").cloned().unwrap_or(Value::Null)))
    }

    /// Cancels a job.
    pub async fn cancel_job(&self, id: &str) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/cancel")))
            .await
    }

    /// Runs a job again now.
    pub async fn retry_job(&self, id: &str) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/retry")))
            .await
    }

    /// A page of jobs.
    pub async fn list_jobs(&self, q: &ListQuery) -> Result<JobList, ClientError> {
        self.json(self.request(Method::GET, "/v1/jobs").query(q))
            .await
    }

    /// Queues with their counts and paused flags.
    pub async fn queues(&self) -> Result<Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/queues")).await
    }

    /// Pauses (`true`) or resumes (`false`) a queue.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<Value, ClientError> {
        let verb = if paused { "pause" } else { "resume" };
        self.json(self.request(Method::POST, &format!("/v1/queues/{queue}/{verb}")))
            .await
    }
}
