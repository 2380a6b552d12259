//! What every handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use keel_core::Store;
use keel_resilience::{Chaos, CircuitBreaker, Misconfiguration};
use keel_runtime::{Completer, RuntimeHandle};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::admission::Admission;
use crate::config::ApiConfig;
use crate::job_cache::JobCache;
use crate::rate_limit::RateLimits;
use crate::worker_registry::WorkerRegistry;

/// Whether this process should still receive traffic. The binary flips it when shutdown
/// starts (G6) so that `/readyz` turns `503` and load balancers drain the replica while
/// in-flight requests finish. Cloning shares the flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// A process that is not draining.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the process as shutting down; `/readyz` answers `503` from now on. One-way:
    /// a draining process never becomes ready again.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether [`Readiness::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Everything the handlers need, wired explicitly by the binary (no global state).
///
/// axum clones the state into every layer of every request, so it is one shared pointer:
/// a clone is one atomic increment however many handles the API holds (a struct of a dozen
/// `Arc`s would cost a dozen, twice per layer — measurable on the path that sheds load,
/// where each request must cost next to nothing). Fields are read through `Deref`.
#[derive(Clone)]
pub struct ApiState(Arc<ApiShared>);

impl std::ops::Deref for ApiState {
    type Target = ApiShared;

    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

/// The handles behind an [`ApiState`].
pub struct ApiShared {
    /// Where jobs live.
    pub store: Arc<dyn Store>,
    /// Wakeups, running-job cancellation and job events of this process's runtime.
    pub runtime: RuntimeHandle,
    /// Limits and API keys.
    pub config: Arc<ApiConfig>,
    /// Renders the process's metrics for `GET /metrics`.
    pub metrics: PrometheusHandle,
    /// Flipped by the binary when draining; read by `GET /readyz`.
    pub readiness: Readiness,
    /// The adaptive concurrency limit and backlog cap of the `/v1` routes (G5).
    pub admission: Admission,
    /// Per-tenant and per-key token buckets.
    pub rate_limits: RateLimits,
    /// The read cache of single-job reads. Handlers that change a job invalidate it before
    /// answering; [`ApiState::follow_job_events`] invalidates everything else.
    pub job_cache: JobCache,
    /// Fault injection; the auth layer applies the `auth` faults. Shared with the store
    /// guard and `/debug/chaos`, so a change there reaches every dependency at once.
    pub chaos: Chaos,
    /// The breaker guarding the database, when the store is guarded by one: `/readyz`
    /// reports the database down while it is open (requests are refused then anyway).
    pub database_breaker: Option<CircuitBreaker>,
    /// The store guard's last configuration error: `/readyz` reports it.
    pub database_misconfiguration: Option<Misconfiguration>,
    /// External workers heard from (`GET /v1/workers`, `keel_workers_connected`).
    pub workers: WorkerRegistry,
    /// Writes external workers' completions in batches; started on first use, so it
    /// writes to the store the state ends up with (see [`ApiState::with_store`]).
    completer: OnceLock<Completer>,
}

impl ApiState {
    /// A state whose admission limit and rate limits are built from `config`, with chaos
    /// off and no database breaker (see [`ApiState::with_chaos`] and
    /// [`ApiState::with_database_breaker`]).
    pub fn new(
        store: Arc<dyn Store>,
        runtime: RuntimeHandle,
        config: ApiConfig,
        metrics: PrometheusHandle,
        readiness: Readiness,
    ) -> Self {
        Self(Arc::new(ApiShared {
            store,
            runtime,
            admission: Admission::new(config.admission, config.max_queue_backlog),
            rate_limits: RateLimits::new(&config.rate_limits),
            job_cache: JobCache::new(&config.job_cache),
            config: Arc::new(config),
            metrics,
            readiness,
            chaos: Chaos::default(),
            database_breaker: None,
            database_misconfiguration: None,
            workers: WorkerRegistry::new(),
            completer: OnceLock::new(),
        }))
    }

    /// The shared handles, for the builder methods below (only before the state is shared).
    fn shared_mut(&mut self) -> &mut ApiShared {
        Arc::get_mut(&mut self.0).expect("ApiState builder methods run before it is cloned")
    }

    /// Uses `chaos` (shared with the store guard and the admin listener).
    ///
    /// # Panics
    /// If the state was already cloned (the builder methods run while wiring, before the
    /// router shares it).
    pub fn with_chaos(mut self, chaos: Chaos) -> Self {
        self.shared_mut().chaos = chaos;
        self
    }

    /// Replaces the store (e.g. with a guarded one wrapping it).
    ///
    /// # Panics
    /// If the state was already cloned, as [`ApiState::with_chaos`].
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.shared_mut().store = store;
        self
    }

    /// The task that keeps the job read cache true to job events (see
    /// [`JobCache::follow`]): subscribed to the runtime's events when called, it invalidates
    /// every announced job until `shutdown` resolves. The binary spawns it before serving and
    /// awaits it at shutdown; without it, changes made by workers, maintenance and other
    /// replicas show in `GET /v1/jobs/{id}` only when the entry expires.
    pub fn follow_job_events(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.job_cache
            .clone()
            .follow(self.runtime.events.subscribe(), shutdown)
    }

    /// The completer external workers' completions go through (the batched write the
    /// built-in workers use). It lives as long as the state.
    ///
    /// # Panics
    /// On first use outside a Tokio runtime (it spawns its task).
    pub fn completer(&self) -> &Completer {
        self.completer
            .get_or_init(|| Completer::start(self.store.clone()))
    }

    /// Reports `breaker` in `/readyz`.
    ///
    /// # Panics
    /// If the state was already cloned, as [`ApiState::with_chaos`].
    pub fn with_database_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.shared_mut().database_breaker = Some(breaker);
        self
    }

    /// Reports the configuration errors the store guard meets in `/readyz`.
    ///
    /// # Panics
    /// If the state was already cloned, as [`ApiState::with_chaos`].
    pub fn with_database_misconfiguration(mut self, misconfiguration: Misconfiguration) -> Self {
        self.shared_mut().database_misconfiguration = Some(misconfiguration);
        self
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("config", &self.config)
            .field("readiness", &self.readiness)
            .field("admission", &self.admission)
            .field("rate_limits", &self.rate_limits)
            .field("chaos", &self.chaos.settings())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_shared_by_clones() {
        let r = Readiness::new();
        let seen_by_handler = r.clone();
        assert!(!seen_by_handler.is_draining());
        r.start_draining();
        assert!(seen_by_handler.is_draining());
    }
}
