//! Admission control (G5): whether the server takes a request at all.
//!
//! Two checks, both answered at once — a shed request costs a few atomic operations and a
//! small `503`, never a wait in a queue the client cannot see:
//! - **Concurrency**: an [`AdaptiveLimit`] (Netflix's gradient algorithm) learns how many
//!   requests the server can have in flight before latency climbs, and refuses the rest
//!   with `503` and `Retry-After: 1`.
//! - **Backlog** (optional, enqueue routes only): when more jobs are waiting to run than
//!   `max_queue_backlog`, new jobs are refused with `503` and `Retry-After: 5`, so a
//!   backlog the workers cannot drain does not grow without bound. The figure is the one
//!   the binary already counts every few seconds for `keel_queue_depth` ([`Backlog`]), so
//!   the check adds no query per request; it lags by up to that period, which is fine for
//!   a cap meant to stop a flood, not to count exactly.
//!
//! Both are counted in `keel_requests_shed_total{reason}`. The layer is the outermost of
//! the router and guards the `/v1` API only: probes, metrics scrapes and the OpenAPI
//! document must get through an overloaded server, or orchestrators would restart it for
//! being busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_resilience::{AdaptiveLimit, AdaptiveLimitConfig, AdmissionPermit};
use metrics::{Counter, Gauge};

use crate::error::{ApiError, ShedReason};
use crate::middleware::{request_id_of, stamp_request_id};
use crate::state::ApiState;

/// Routes that create jobs: the ones the backlog cap refuses.
const ENQUEUE_ROUTES: [&str; 3] = ["/v1/jobs", "/v1/jobs/batch", "/v1/process"];

/// The route that waits on purpose (for a job to finish): its latency says nothing about the
/// server's, so it holds a slot but feeds no latency sample into the limit.
const WAITING_ROUTE: &str = "/v1/process";

/// Jobs waiting to run (available + scheduled + retryable, over every queue), as last
/// counted by the binary's depth tracker (`track_depths`). Cloning shares the figure.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<AtomicU64>);

impl Backlog {
    /// Records a fresh count.
    pub fn set(&self, jobs: u64) {
        self.0.store(jobs, Ordering::Relaxed);
    }

    /// The last count (0 until the first one).
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct Shared {
    limit: AdaptiveLimit,
    backlog: Backlog,
    max_backlog: u64,
    in_flight: Gauge,
    /// `keel_requests_shed_total{reason}` handles, resolved once: a refusal must not pay
    /// for a registry lookup.
    shed_concurrency: Counter,
    shed_backlog: Counter,
}

/// The admission controller of one API; clones share it.
#[derive(Debug, Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

impl Admission {
    /// A controller with a fresh limit at `limit.initial`, refusing enqueues while the
    /// backlog is above `max_backlog` (0 turns the cap off). Registers the shed counters at
    /// zero, so dashboards see the series before the first shed request.
    pub fn new(limit: AdaptiveLimitConfig, max_backlog: u64) -> Self {
        let shed = |reason: ShedReason| {
            let c = metrics::counter!("keel_requests_shed_total", "reason" => reason.as_str());
            c.increment(0);
            c
        };
        let admission = Self {
            shared: Arc::new(Shared {
                limit: AdaptiveLimit::new(limit),
                backlog: Backlog::default(),
                max_backlog,
                in_flight: metrics::gauge!("keel_admission_in_flight"),
                shed_concurrency: shed(ShedReason::Concurrency),
                shed_backlog: shed(ShedReason::Backlog),
            }),
        };
        admission.report();
        admission
    }

    /// The backlog figure the binary keeps current.
    pub fn backlog(&self) -> &Backlog {
        &self.shared.backlog
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.shared.limit.in_flight()
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> u32 {
        self.shared.limit.limit()
    }

    /// Sets `keel_admission_limit`. The limit moves with every finished request, but
    /// reading it takes the limiter's lock, so the binary calls this on its gauge period
    /// rather than every request paying for it.
    pub fn report(&self) {
        metrics::gauge!("keel_admission_limit").set(f64::from(self.shared.limit.limit()));
    }

    fn backlog_full(&self) -> bool {
        let max = self.shared.max_backlog;
        max > 0 && self.shared.backlog.get() > max
    }

    /// Counts a refusal.
    fn shed(&self, reason: ShedReason) -> ShedReason {
        match reason {
            ShedReason::Concurrency => self.shared.shed_concurrency.increment(1),
            ShedReason::Backlog => self.shared.shed_backlog.increment(1),
        }
        reason
    }

    /// Admits one request, or sheds it (counted; answer `ApiError::Overloaded`): on a full
    /// backlog when it `enqueues`, then on the concurrency limit. The step every transport
    /// runs first (the HTTP layer below, the gRPC services).
    pub(crate) async fn try_admit(&self, enqueues: bool) -> Result<Admitted, ShedReason> {
        if enqueues && self.backlog_full() {
            return Err(self.shed(ShedReason::Backlog));
        }
        match self.shared.limit.acquire().await {
            Some(permit) => Ok(Admitted::new(permit, &self.shared.in_flight)),
            None => Err(self.shed(ShedReason::Concurrency)),
        }
    }
}

/// A request in flight: its slot in the limit, and its share of `keel_admission_in_flight`
/// (a gauge moved by one atomic add each way, so it is live without taking the limiter's
/// lock).
pub(crate) struct Admitted {
    permit: Option<AdmissionPermit>,
    in_flight: Gauge,
}

impl Admitted {
    fn new(permit: AdmissionPermit, in_flight: &Gauge) -> Self {
        in_flight.increment(1.0);
        Self {
            permit: Some(permit),
            in_flight: in_flight.clone(),
        }
    }

    /// The request was served normally: its latency is a sample of the server's.
    pub(crate) fn success(mut self) {
        if let Some(p) = self.permit.take() {
            p.success();
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// Whether admission control guards `path`: the `/v1` API except its description and
/// the workers' lease. Probes, metrics scrapes and the OpenAPI document must get through an
/// overloaded server. A lease is a long poll that mostly waits: it is no work in progress,
/// and holding a slot (and teaching the limit its wait as latency) would let idle workers
/// shed everyone else. Its store call is still bounded by the store's bulkhead.
fn guarded(path: &str) -> bool {
    path.starts_with("/v1/")
        && path != "/v1/openapi.json"
        && !crate::routes::workers::is_lease_path(path)
}

/// The outermost layer (SPEC §5: admission comes first). Sheds on a full backlog (enqueue
/// routes), then on the concurrency limit, before a request id, a log line, a metric
/// update or a key check is spent on it: under overload the refusals come by the thousand
/// and each must cost next to nothing, or refusing load eats the CPU that serving it
/// needs. A refusal is still a complete problem response with a request id; it is counted
/// in `keel_requests_shed_total` (not in `http_requests_total`) and logged at DEBUG.
///
/// A permit whose request ends in a `5xx`, or is dropped by the deadline layer, frees its
/// slot without a latency sample: a failure's latency (a fast refusal from an open breaker,
/// or a timeout) is not the server's normal latency and would teach the limit the wrong
/// thing. `POST /v1/process` never feeds a sample (it waits on purpose).
pub(crate) async fn admit(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !guarded(path) {
        return next.run(req).await;
    }
    let waits = path == WAITING_ROUTE;
    let enqueues = req.method() == Method::POST && ENQUEUE_ROUTES.contains(&path);
    let admitted = match state.admission.try_admit(enqueues).await {
        Ok(admitted) => admitted,
        Err(reason) => {
            let id = request_id_of(&req);
            tracing::debug!(request_id = %id, path, reason = reason.as_str(), "request shed");
            return stamp_request_id(ApiError::Overloaded { reason }.into_response(), &id);
        }
    };
    let resp = next.run(req).await;
    if !waits && !resp.status().is_server_error() {
        admitted.success();
    }
    resp
}
