//! The Rust SDK for Keel's HTTP API, used by the `keel` CLI's client commands, by
//! integration tests and by Rust programs that enqueue or inspect jobs.
//!
//! It speaks plain JSON over HTTP with the server's own body types (keel-wire, re-exported
//! here), so a field cannot mean one thing to the server and another to the client; they
//! ignore members they do not know, so a newer server adding fields does not break an
//! older client. Errors carry the server's `application/problem+json` body when there is
//! one, so callers can show the server's own explanation.

#![warn(missing_docs)]

pub mod grpc_worker;
pub mod worker;

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

pub use keel_wire::{
    AttemptErrorOut, Backoff, BatchIn, BatchOut, CompleteBody, HumanDuration, JobIn, JobListQuery,
    JobOut, JobPageOut, JobResultOut, JobTemplateIn, JobTemplateOut, LeaseBody, LeaseOut,
    LeasedOut, Problem, ProblemField, ScheduleIn, ScheduleListQuery, ScheduleOut, SchedulePageOut,
    TenantQuery, UNIT_DURATION_SYNTAX, UniqueIn, UniqueOut, UnitDuration, parse_duration_text,
    raw_json,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{status}: {}", if problem.detail.is_empty() { &problem.title } else { &problem.detail })]
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
    /// The client was given something it cannot use (a CA certificate that is not PEM).
    #[error("invalid client settings: {0}")]
    Settings(String),
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

/// What `POST /v1/jobs` answered.
#[derive(Debug, Clone)]
pub struct Enqueued {
    /// The job.
    pub job: JobOut,
    /// HTTP status (201, or the original status on an idempotent replay).
    pub status: StatusCode,
    /// Whether this was an idempotent replay of an earlier request.
    pub replayed: bool,
    /// Set when the job's unique key was held: the id of the holder, which is the job
    /// returned (status 200), and nothing was created.
    pub unique_conflict: Option<String>,
    /// The raw body, byte for byte.
    pub body: Vec<u8>,
}

/// `prefix`, then `name` percent-encoded so that it stays one path segment whatever it holds
/// (the server then rejects an invalid name itself), then `suffix`.
fn named_path(prefix: &str, name: &str, suffix: &str) -> String {
    let mut path = String::from(prefix);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push_str(suffix);
    path
}

/// `/v1/schedules/{name}` plus `suffix`, the name one path segment ([`named_path`]).
fn schedule_path(name: &str, suffix: &str) -> String {
    named_path("/v1/schedules/", name, suffix)
}

/// `/v1/queues/{name}` plus `suffix`, the name one path segment ([`named_path`]).
fn queue_path(name: &str, suffix: &str) -> String {
    named_path("/v1/queues/", name, suffix)
}

/// The HTTP client: a generous overall timeout (the server bounds each request by its own
/// deadline), and `ca_pem`'s certificates trusted on top of the webpki roots.
fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, ClientError> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(pem) = ca_pem {
        let roots = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientError::Settings(format!("the CA certificate: {e}")))?;
        if roots.is_empty() {
            return Err(ClientError::Settings(
                "the CA certificate file holds no PEM CERTIFICATE block".to_owned(),
            ));
        }
        for root in roots {
            builder = builder.add_root_certificate(root);
        }
    }
    builder
        .build()
        .map_err(|e| ClientError::Settings(format!("building the HTTP client: {e}")))
}

/// A Keel API client. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    /// Extra trusted roots (PEM) for https:// servers, kept for the gRPC worker's channel.
    ca_pem: Option<Arc<[u8]>>,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:8080`), authenticating with
    /// `api_key` when given.
    pub fn new(base: impl Into<String>, api_key: Option<String>) -> Result<Self, ClientError> {
        Ok(Self {
            http: http_client(None)?,
            base: base.into().trim_end_matches('/').to_owned(),
            api_key,
            ca_pem: None,
        })
    }

    /// Also trusts the certificates in `pem` (one or more PEM `CERTIFICATE` blocks) as
    /// roots for an https:// server, over HTTP and gRPC: for a Keel whose certificate a
    /// private CA signed (`keel --ca-cert`, `KEEL_CA_CERT`). The public webpki roots stay
    /// trusted.
    pub fn with_ca_certificate(mut self, pem: &[u8]) -> Result<Self, ClientError> {
        self.http = http_client(Some(pem))?;
        self.ca_pem = Some(Arc::from(pem));
        Ok(self)
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
                detail: String::from_utf8_lossy(&bytes).into_owned(),
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
        let unique_conflict = resp
            .headers()
            .get("keel-unique-conflict")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
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
            unique_conflict,
            body,
        })
    }

    /// Enqueues several jobs atomically: all or none.
    pub async fn enqueue_batch(&self, jobs: &[JobIn]) -> Result<Vec<JobOut>, ClientError> {
        let body = BatchIn {
            jobs: jobs.to_vec(),
        };
        let b: BatchOut = self
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

    /// Leases up to `max` jobs of an external queue for `worker`, waiting up to `wait` for
    /// one (docs/workers.md). Each job's `lease` carries its token.
    pub async fn lease(
        &self,
        queue: &str,
        worker: &str,
        max: u32,
        wait: Duration,
        lease: Duration,
    ) -> Result<Vec<JobOut>, ClientError> {
        let body = LeaseBody {
            worker: worker.to_owned(),
            max: Some(max),
            wait: Some(HumanDuration(wait)),
            lease: Some(HumanDuration(lease)),
            kinds: None,
        };
        let path = queue_path(queue, "/lease");
        let leased: LeasedOut = self
            .json(self.request(Method::POST, &path).json(&body))
            .await?;
        Ok(leased.jobs)
    }

    /// Records a leased job as completed with `result`; `token` is its lease token.
    pub async fn complete(
        &self,
        id: impl Display,
        token: &str,
        result: &Value,
    ) -> Result<JobOut, ClientError> {
        let body = CompleteBody {
            token: token.to_owned(),
            result: Some(raw_json(result)),
        };
        self.json(
            self.request(Method::POST, &format!("/v1/jobs/{id}/complete"))
                .json(&body),
        )
        .await
    }

    /// One job.
    pub async fn get_job(&self, id: impl Display) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/jobs/{id}")))
            .await
    }

    /// A job's result: `Ok(Some)` once completed, `Ok(None)` while still pending.
    pub async fn job_result(&self, id: impl Display) -> Result<Option<Value>, ClientError> {
        let resp = self
            .send(self.request(Method::GET, &format!("/v1/jobs/{id}/result")))
            .await?;
        if resp.status() == StatusCode::ACCEPTED {
            return Ok(None);
        }
        let out: JobResultOut = resp
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        out.result
            .map_or(Ok(Value::Null), |r| serde_json::from_str(r.get()))
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Cancels a job.
    pub async fn cancel_job(&self, id: impl Display) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/cancel")))
            .await
    }

    /// Runs a job again now.
    pub async fn retry_job(&self, id: impl Display) -> Result<JobOut, ClientError> {
        self.json(self.request(Method::POST, &format!("/v1/jobs/{id}/retry")))
            .await
    }

    /// A page of jobs.
    pub async fn list_jobs(&self, q: &JobListQuery) -> Result<JobPageOut, ClientError> {
        self.json(self.request(Method::GET, "/v1/jobs").query(q))
            .await
    }

    /// Queues with their counts and paused flags.
    pub async fn queues(&self) -> Result<Value, ClientError> {
        self.json(self.request(Method::GET, "/v1/queues")).await
    }

    /// One queue with its counts and paused flag: the same object as its element of
    /// [`queues`](Self::queues), without counting the others. Any valid name answers (a
    /// queue nobody used has zero counts); a tenant key counts only its own jobs.
    pub async fn queue(&self, name: &str) -> Result<Value, ClientError> {
        self.json(self.request(Method::GET, &queue_path(name, "")))
            .await
    }

    /// Pauses (`true`) or resumes (`false`) a queue.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<Value, ClientError> {
        let verb = if paused { "pause" } else { "resume" };
        let path = queue_path(queue, &format!("/{verb}"));
        self.json(self.request(Method::POST, &path)).await
    }

    /// Creates a schedule (`schedule.name` required); a `409` if the name is taken.
    pub async fn create_schedule(&self, schedule: &ScheduleIn) -> Result<ScheduleOut, ClientError> {
        self.json(self.request(Method::POST, "/v1/schedules").json(schedule))
            .await
    }

    /// Creates or replaces the schedule `name`; also says whether it was created.
    pub async fn put_schedule(
        &self,
        name: &str,
        schedule: &ScheduleIn,
    ) -> Result<(ScheduleOut, bool), ClientError> {
        let req = self
            .request(Method::PUT, &schedule_path(name, ""))
            .json(schedule);
        let resp = self.send(req).await?;
        let created = resp.status() == StatusCode::CREATED;
        let s = resp
            .json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((s, created))
    }

    /// One schedule, with its next ticks.
    pub async fn get_schedule(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<ScheduleOut, ClientError> {
        self.json(
            self.request(Method::GET, &schedule_path(name, ""))
                .query(&TenantQuery {
                    tenant: tenant.map(str::to_owned),
                }),
        )
        .await
    }

    /// A page of schedules, by name.
    pub async fn list_schedules(
        &self,
        q: &ScheduleListQuery,
    ) -> Result<SchedulePageOut, ClientError> {
        self.json(self.request(Method::GET, "/v1/schedules").query(q))
            .await
    }

    /// Deletes a schedule (the jobs it enqueued stay).
    pub async fn delete_schedule(
        &self,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<(), ClientError> {
        self.send(
            self.request(Method::DELETE, &schedule_path(name, ""))
                .query(&TenantQuery {
                    tenant: tenant.map(str::to_owned),
                }),
        )
        .await
        .map(drop)
    }

    /// Pauses (`true`) or resumes (`false`) a schedule.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        tenant: Option<&str>,
        paused: bool,
    ) -> Result<ScheduleOut, ClientError> {
        let verb = if paused { "/pause" } else { "/resume" };
        self.json(
            self.request(Method::POST, &schedule_path(name, verb))
                .query(&TenantQuery {
                    tenant: tenant.map(str::to_owned),
                }),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_names_stay_one_path_segment() {
        assert_eq!(
            schedule_path("nightly", "/pause"),
            "/v1/schedules/nightly/pause"
        );
        assert_eq!(schedule_path("a.b:c-d_e", ""), "/v1/schedules/a.b:c-d_e");
        assert_eq!(schedule_path("a/b?c d", ""), "/v1/schedules/a%2Fb%3Fc%20d");
    }

    #[test]
    fn queue_names_stay_one_path_segment() {
        assert_eq!(queue_path("emails", ""), "/v1/queues/emails");
        assert_eq!(
            queue_path("a/b?c d", "/pause"),
            "/v1/queues/a%2Fb%3Fc%20d/pause"
        );
    }

    #[test]
    fn bodies_leave_out_what_is_not_set() {
        let job = JobIn {
            unique: Some(UniqueIn::period("k", Duration::from_secs(3600))),
            ..JobIn::new("sync", serde_json::json!(1))
        };
        assert_eq!(
            serde_json::to_value(&job).unwrap(),
            serde_json::json!({"kind":"sync","args":1,
                "unique":{"key":"k","scope":"period","period":"1h"}})
        );
        let s = ScheduleIn {
            cron: "@daily".into(),
            job: JobTemplateIn {
                kind: "noop".into(),
                ..JobTemplateIn::default()
            },
            ..ScheduleIn::default()
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"cron":"@daily","job":{"kind":"noop"}})
        );
    }
}
