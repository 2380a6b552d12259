//! A router over a real SQLite store in a temporary directory, and a few request helpers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use keel_api::{ApiConfig, ApiState, Readiness, router};
use keel_core::store::{Completion, LeaseParams, LeaseRef, ListParams};
use keel_core::{
    Job, JobId, JobState, JobStore, QueueName, StoreError, SystemClock, WorkStore, WorkerId,
};
use keel_runtime::{JobEvent, RuntimeHandle};
use keel_store::testkit::{Intercepted, Interceptor, Op, intercept};
use keel_store::{SqliteOptions, SqliteStore};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::{CancellationToken, DropGuard};
use tower::ServiceExt;

/// The process-wide recorder for this test binary, so `/metrics` shows what the
/// middleware recorded.
fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

/// A failure to inject into the store's request-path operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fault {
    None,
    Transient,
    Permanent,
    /// Wait, without answering, until the test calls [`FaultyStore::release`]: the
    /// operation outlasts any deadline for as long as the test says, with no clock involved.
    Hang,
}

/// The switch that makes the operations a request uses fail or stall, in front of the real
/// store (`Intercepted<FaultyStore>`). Everything else passes straight through.
pub(crate) struct FaultyStore {
    fault: Mutex<Fault>,
    /// Opened by [`FaultyStore::release`]: every hung operation goes on.
    released: tokio::sync::watch::Sender<bool>,
    /// Operations that entered the hang.
    hung: AtomicUsize,
    /// Hung operations that went on after the release (a cancelled one never does).
    hung_finished: AtomicUsize,
    /// Hung operations dropped before the release: the request gave up and took its store
    /// work with it (G7).
    hung_dropped: AtomicUsize,
    /// How many times a job was read (`get`), to see what the job cache saves.
    reads: AtomicUsize,
}

impl FaultyStore {
    pub(crate) fn new() -> Self {
        Self {
            fault: Mutex::new(Fault::None),
            released: tokio::sync::watch::channel(false).0,
            hung: AtomicUsize::new(0),
            hung_finished: AtomicUsize::new(0),
            hung_dropped: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
        }
    }

    /// Job reads (`get`) so far.
    pub(crate) fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    pub(crate) fn set(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }

    /// Lets every hung operation go on (and any later one pass the hang at once).
    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    /// Operations that entered the hang so far.
    pub(crate) fn hung(&self) -> usize {
        self.hung.load(Ordering::SeqCst)
    }

    /// Hung operations that went on after [`FaultyStore::release`].
    pub(crate) fn hung_finished(&self) -> usize {
        self.hung_finished.load(Ordering::SeqCst)
    }

    /// Hung operations dropped while hanging.
    pub(crate) fn hung_dropped(&self) -> usize {
        self.hung_dropped.load(Ordering::SeqCst)
    }
}

/// Counts a hung operation as dropped unless it was let go first.
struct HangGuard<'a> {
    store: &'a FaultyStore,
    finished: bool,
}

impl Drop for HangGuard<'_> {
    fn drop(&mut self) {
        let counter = if self.finished {
            &self.store.hung_finished
        } else {
            &self.store.hung_dropped
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Interceptor for FaultyStore {
    async fn before(&self, op: Op) -> Result<(), StoreError> {
        if op == Op::Get {
            self.reads.fetch_add(1, Ordering::SeqCst);
        }
        // The operations a request makes; the runtime's are never faulted here.
        let on_request_path = matches!(
            op,
            Op::Insert
                | Op::Get
                | Op::List
                | Op::Cancel
                | Op::QueueStats
                | Op::InsertIdempotent
                | Op::SaveSchedule
                | Op::GetSchedule
                | Op::ListSchedules
                | Op::DeleteSchedule
                | Op::SetSchedulePaused
                | Op::Ping
        );
        if !on_request_path {
            return Ok(());
        }
        let f = *self.fault.lock().unwrap();
        match f {
            Fault::None => Ok(()),
            Fault::Transient => Err(StoreError::transient(
                op.doing(),
                "injected: connection reset",
            )),
            Fault::Permanent => Err(StoreError::permanent(
                op.doing(),
                "injected: table jobs is corrupt",
            )),
            Fault::Hang => {
                let mut guard = HangGuard {
                    store: self,
                    finished: false,
                };
                let mut released = self.released.subscribe();
                self.hung.fetch_add(1, Ordering::SeqCst);
                // The sender lives in `self`, so the wait ends only by release or drop.
                let _ = released.wait_for(|r| *r).await;
                guard.finished = true;
                Ok(())
            }
        }
    }
}

/// One API over one fresh database.
pub(crate) struct TestApp {
    pub(crate) router: Router,
    pub(crate) store: Arc<Intercepted<FaultyStore>>,
    pub(crate) runtime: RuntimeHandle,
    pub(crate) readiness: Readiness,
    /// Stops the job cache's event follower when the app is dropped.
    _follower: DropGuard,
    _dir: tempfile::TempDir,
}

/// A response, fully read.
#[derive(Debug)]
pub(crate) struct TestResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl TestResponse {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub(crate) fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// Asserts the status, showing the body when it is another: the problem says why.
    pub(crate) fn assert_status(&self, status: StatusCode) {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
    }

    /// Asserts a problem+json response with `status` and problem type `slug`, with every
    /// required member, and `request_id` equal to the `X-Request-Id` header. Returns the
    /// body.
    pub(crate) fn assert_problem(&self, status: u16, slug: &str) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type(), "application/problem+json");
        let p = self.json();
        assert_eq!(
            p["type"],
            format!("https://keel.dev/problems/{slug}"),
            "{p}"
        );
        assert_eq!(p["status"], status, "{p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        let rid = self.header("x-request-id").expect("x-request-id header");
        assert_eq!(p["request_id"], rid, "{p}");
        p
    }
}

pub(crate) const QUEUES: [&str; 2] = ["default", "emails"];

pub(crate) async fn app() -> TestApp {
    app_with(ApiConfig::default()).await
}

pub(crate) async fn app_with(config: ApiConfig) -> TestApp {
    app_wired(config, |state| state).await
}

/// An app whose `POST /v1/process` re-reads its job every `process_poll` and whose requests
/// have an hour before the server's deadline, so only the job's end answers them; shared, for
/// the test's worker task.
pub(crate) async fn process_app(process_poll: Duration) -> Arc<TestApp> {
    Arc::new(
        app_with(ApiConfig {
            request_timeout: Duration::from_secs(3600),
            process_poll,
            ..Default::default()
        })
        .await,
    )
}

/// An app whose state `wire` finishes (chaos, a database breaker).
pub(crate) async fn app_wired(
    config: ApiConfig,
    wire: impl FnOnce(ApiState) -> ApiState,
) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let inner = SqliteStore::open(
        &dir.path().join("keel.db"),
        SqliteOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    inner.migrate().await.unwrap();
    let store = intercept(Arc::new(inner), FaultyStore::new());
    let runtime = RuntimeHandle::new(QUEUES.map(|q| QueueName::parse(q).unwrap()), 1024);
    let readiness = Readiness::new();
    let state = ApiState::new(
        store.clone(),
        runtime.clone(),
        config,
        metrics_handle(),
        readiness.clone(),
    );
    let state = wire(state);
    // As the binary does: job events invalidate the job cache.
    let stop = CancellationToken::new();
    tokio::spawn(state.follow_job_events(stop.clone().cancelled_owned()));
    TestApp {
        router: router(state),
        store,
        runtime,
        readiness,
        _follower: stop.drop_guard(),
        _dir: dir,
    }
}

impl TestApp {
    pub(crate) async fn send(&self, req: Request<Body>) -> TestResponse {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        TestResponse {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> TestResponse {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    pub(crate) async fn post(&self, path: &str) -> TestResponse {
        self.send(Request::post(path).body(Body::empty()).unwrap())
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> TestResponse {
        self.send(Request::delete(path).body(Body::empty()).unwrap())
            .await
    }

    pub(crate) async fn put_json(&self, path: &str, body: &str) -> TestResponse {
        self.send(
            Request::put(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
    }

    pub(crate) async fn post_json(&self, path: &str, body: &str) -> TestResponse {
        self.send(
            json_request(path)
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
    }

    /// Enqueues `body` and returns the created job's JSON.
    pub(crate) async fn enqueue(&self, body: &str) -> Value {
        let r = self.post_json("/v1/jobs", body).await;
        r.assert_status(StatusCode::CREATED);
        r.json()
    }

    /// Leases every available job of `queue` as a worker would.
    pub(crate) async fn lease(&self, queue: &str) -> Vec<Job> {
        self.store
            .lease(LeaseParams {
                queue: QueueName::parse(queue).unwrap(),
                max: 100,
                lease_for: Duration::from_secs(30),
                owner: WorkerId::parse("test-worker").unwrap(),
                tenant: None,
                kinds: Vec::new(),
            })
            .await
            .unwrap()
    }

    /// Completes a leased job with `result` (JSON text; `None` for null) through the store,
    /// as a worker would, but without the event: see [`TestApp::publish_completed`].
    pub(crate) async fn complete_in_store(&self, job: &Job, result: Option<&str>) {
        self.store
            .complete(vec![Completion {
                lease: LeaseRef::of(job).unwrap(),
                result: result.map(|r| RawValue::from_string(r.to_owned()).unwrap()),
            }])
            .await
            .unwrap();
    }

    /// Publishes the event the runtime sends when `job` completes: what wakes a waiting
    /// `POST /v1/process` and drops the job's cache entry.
    pub(crate) fn publish_completed(&self, job: &Job) {
        self.runtime.events.publish(JobEvent {
            id: job.id,
            queue: job.queue.clone(),
            state: JobState::Completed,
        });
    }

    /// Every job in the store.
    pub(crate) async fn all_jobs(&self) -> Vec<Job> {
        self.store
            .list(ListParams {
                limit: 1000,
                ..ListParams::default()
            })
            .await
            .unwrap()
            .jobs
    }
}

/// A POST request builder with a JSON content type.
pub(crate) fn json_request(path: &str) -> axum::http::request::Builder {
    Request::post(path).header("content-type", "application/json")
}

/// The `field` of each of a problem's `errors`, in the order the server listed them.
pub(crate) fn error_fields(p: &Value) -> Vec<&str> {
    p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect()
}

/// [`error_fields`] sorted, for a test that checks which fields were named but not how the
/// parser happened to order them.
pub(crate) fn sorted_error_fields(p: &Value) -> Vec<&str> {
    let mut fields = error_fields(p);
    fields.sort_unstable();
    fields
}

pub(crate) fn job_id(v: &Value) -> JobId {
    JobId::parse(v["id"].as_str().unwrap()).unwrap()
}
