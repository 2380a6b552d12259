//! Explicit wiring: [`App::build`] opens the store, applies migrations, wraps the store in
//! its guard (bulkhead, circuit breaker, chaos, read retries) and binds every listener
//! (port 0 works: tests read the bound ports back); [`App::run_until_stopped`] runs the
//! API, the admin listener and the runtime until the shutdown future resolves, then stops
//! them in the order G6 requires.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_api::tls::Tls;
use keel_api::{ApiState, Backlog, Readiness};
use keel_core::store::{Layered, QueueStats, StateCounts};
use keel_core::{JobKind, JobState, QueueStore, Store, SystemClock};
use keel_diag::gauges::ProcessGauges;
use keel_resilience::{Chaos, ChaosSettings, CircuitBreaker, Misconfiguration, StoreGuard};
use keel_runtime::{Catalog, Handler, Handlers, Runtime, RuntimeHandle};
use keel_store::{PgOptions, SqliteOptions};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How many job events a slow subscriber may fall behind before it must re-read the store.
const EVENT_CAPACITY: usize = 4096;
/// How often the gauges are refreshed, histogram upkeep runs and idle rate-limit buckets
/// are dropped.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// A built, not yet running, Keel server.
pub struct App {
    config: Config,
    /// The guarded store: what the API and the runtime use.
    store: Arc<dyn Store>,
    /// The guard's database breaker, for `/readyz`.
    database_breaker: CircuitBreaker,
    /// The guard's last configuration error, for `/readyz`.
    misconfiguration: Misconfiguration,
    /// Fault injection, shared by the auth layer, the store guard and `/debug/chaos`.
    chaos: Chaos,
    handle: RuntimeHandle,
    handlers: Handlers,
    api_listener: TcpListener,
    /// `None` when the admin listener is switched off (`--admin-addr off`).
    admin_listener: Option<TcpListener>,
    /// `None` when the gRPC listener is switched off (`--grpc-addr off`).
    grpc_listener: Option<TcpListener>,
    metrics: PrometheusHandle,
    readiness: Readiness,
    /// The certificate every listener serves (`None`: plaintext).
    tls: Option<Tls>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("api", &self.api_listener.local_addr().ok())
            .field(
                "admin",
                &self
                    .admin_listener
                    .as_ref()
                    .and_then(|l| l.local_addr().ok()),
            )
            .finish_non_exhaustive()
    }
}

impl App {
    /// Opens the store (applying migrations), guards it, binds the API and admin
    /// listeners, and prepares the runtime with the built-in executors.
    pub async fn build(config: Config, metrics: PrometheusHandle) -> anyhow::Result<Self> {
        let (store, report) = open_store(&config, SqliteOptions::default(), config.pg_options())
            .await
            .context("opening the job store")?;
        if !report.applied.is_empty() {
            tracing::info!(applied = ?report.applied, version = report.current, "applied migrations");
        }
        // Faults are applied from here on: opening and migrating above used the real store,
        // so a process started with DB_FAILURE still comes up and shows what failing looks
        // like, instead of failing to start.
        let chaos = Chaos::new(config.chaos_settings());
        warn_if_chaos(&chaos.settings());
        let guarded = Layered::new(store, StoreGuard::new(config.store_guard(), chaos.clone()));
        let database_breaker = guarded.breaker().clone();
        let misconfiguration = guarded.misconfiguration().clone();
        let store: Arc<dyn Store> = Arc::new(guarded);
        // Checked when the config was resolved; read again here, as the files may have
        // changed since.
        let tls = config
            .tls_files()
            .map(Tls::load)
            .transpose()
            .context("loading the TLS certificate and key")?;
        let api_listener = TcpListener::bind(config.addr)
            .await
            .map_err(|e| BindError {
                what: "API",
                addr: config.addr,
                source: e,
            })?;
        let admin_listener = bind_optional("admin", config.admin_addr).await?;
        let grpc_listener = bind_optional("gRPC", config.grpc_addr).await?;
        let handle =
            RuntimeHandle::new(config.queues.iter().map(|q| q.name.clone()), EVENT_CAPACITY);
        let handlers = Handlers::builtin(&config.webhook_config(&chaos));
        Ok(Self {
            config,
            store,
            database_breaker,
            misconfiguration,
            chaos,
            handle,
            handlers,
            api_listener,
            admin_listener,
            grpc_listener,
            metrics,
            readiness: Readiness::default(),
            tls,
        })
    }

    /// Registers a Rust handler for `kind` (embedding Keel in a Rust service).
    pub fn with_handler(mut self, kind: JobKind, handler: Arc<dyn Handler>) -> Self {
        self.handlers.register(kind, handler);
        self
    }

    /// The address the API listener is bound to.
    pub fn api_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.api_listener.local_addr()?)
    }

    /// The address the admin listener is bound to (`None` when it is switched off).
    pub fn admin_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        Ok(match &self.admin_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        })
    }

    /// The address the gRPC listener is bound to (`None` when it is switched off).
    pub fn grpc_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        Ok(match &self.grpc_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        })
    }

    /// The store as the API and the runtime see it (behind the guard: bulkhead, breaker,
    /// chaos faults), for tests and embedding.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Serves until `shutdown` resolves, then stops gracefully (G6), all within
    /// `shutdown_grace` of the signal:
    /// 1. readiness turns 503 and dispatchers stop leasing (no lease is taken after the
    ///    signal); running jobs carry on;
    /// 2. after `shutdown_delay` (0 by default) the API listener stops accepting;
    /// 3. in-flight requests finish (each is bounded by its own deadline) while workers keep
    ///    running, so requests waiting on running jobs (`/v1/process`) get their answers;
    /// 4. running jobs get what is left of the grace period, then are cancelled and
    ///    released back to `available` without using an attempt;
    /// 5. the store is closed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            store,
            database_breaker,
            misconfiguration,
            chaos,
            handle,
            handlers,
            api_listener,
            admin_listener,
            grpc_listener,
            metrics,
            readiness,
            tls,
        } = self;
        let api_addr = api_listener
            .local_addr()
            .context("reading the API address")?;
        let admin_addr = match &admin_listener {
            Some(l) => Some(l.local_addr().context("reading the admin address")?),
            None => None,
        };
        let grpc_addr = match &grpc_listener {
            Some(l) => Some(l.local_addr().context("reading the gRPC address")?),
            None => None,
        };
        // Every handler is registered by now: the catalog of what runs here is final.
        let handle = handle.with_catalog(Catalog::new(
            config.queues.iter().map(|q| q.name.clone()),
            &handlers,
        ));
        let catalog = handle.catalog.clone();
        let root = CancellationToken::new();
        let runtime = Runtime::start(
            Arc::clone(&store),
            config.runtime_config(&chaos),
            handlers,
            handle.clone(),
        );

        let api_state = ApiState::new(
            Arc::clone(&store),
            handle,
            config.api_config(),
            metrics.clone(),
            readiness.clone(),
        )
        .with_chaos(chaos.clone())
        .with_database_breaker(database_breaker)
        .with_database_misconfiguration(misconfiguration);
        let protection = Protection {
            admission: api_state.admission.clone(),
            rate_limits: api_state.rate_limits.clone(),
            workers: api_state.workers.clone(),
        };
        // Subscribed before the API serves, so no job event is missed by the read cache.
        let cache_events =
            tokio::spawn(api_state.follow_job_events(root.child_token().cancelled_owned()));
        let http_stop = root.child_token();
        let tls_watch = tls
            .clone()
            .map(|tls| tokio::spawn(tls.watch(config.tls_reload_interval, root.child_token())));
        let http_tls = tls.as_ref().map(|tls| tls.acceptor(&[b"http/1.1"]));
        // The gRPC listener closes with the HTTP one; its health service turns NOT_SERVING
        // as soon as readiness fails, before that.
        let grpc = grpc_listener.map(|listener| {
            tokio::spawn(keel_api::grpc::serve(
                api_state.clone(),
                listener,
                tls.clone(),
                http_stop.clone(),
            ))
        });
        let api = tokio::spawn(keel_api::listener::serve(
            api_listener,
            keel_api::router(api_state),
            config.connection_limits(),
            http_tls.clone(),
            http_stop.clone().cancelled_owned(),
        ));
        let admin = match admin_listener {
            Some(listener) => {
                let router = keel_api::admin::router(keel_api::admin::AdminState {
                    config: serde_json::to_value(&config)
                        .context("rendering the effective config")?,
                    chaos,
                    token: config.admin_token.clone(),
                });
                // The API's accept loop with its default limits: the admin listener gets
                // the same TLS, connection cap and slow-client guards.
                Some(tokio::spawn(keel_api::listener::serve(
                    listener,
                    router,
                    keel_api::ConnectionLimits::default(),
                    http_tls,
                    root.child_token().cancelled_owned(),
                )))
            }
            None => None,
        };
        let (depths_tx, depths) = watch::channel(None);
        let depth_tracker = tokio::spawn(track_depths(
            store.clone(),
            protection.admission.backlog().clone(),
            config.queue_depth_interval,
            depths_tx,
            root.child_token(),
        ));
        let gauges = tokio::spawn(refresh_gauges(
            Arc::clone(&store),
            depths,
            metrics,
            protection,
            catalog,
            root.child_token(),
        ));
        tracing::info!(
            addr = %api_addr,
            admin_addr = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            grpc_addr = %grpc_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            tls = tls.is_some(),
            database = %config.database_url_kind(),
            queues = ?config.queues.iter().map(|q| format!("{}:{}", q.name, q.concurrency)).collect::<Vec<_>>(),
            "keel is serving"
        );

        shutdown.await;
        let deadline = Instant::now() + config.shutdown_grace;
        tracing::info!(
            grace_ms = config.shutdown_grace.as_millis() as u64,
            "shutdown requested: draining"
        );
        // Readiness fails and no lease is taken from here on (jobs enqueued during the drain
        // are left to other replicas, or to the next start); the API keeps accepting for
        // `shutdown_delay`, so load balancers that poll /readyz stop routing here before
        // the listener closes and a client never meets a refused connection mid-rollout.
        readiness.start_draining();
        runtime.stop_leasing().await;
        if !config.shutdown_delay.is_zero() {
            tracing::info!(
                delay_ms = config.shutdown_delay.as_millis() as u64,
                "readiness is failing; still accepting requests before closing the listener"
            );
            tokio::time::sleep_until(deadline.min(Instant::now() + config.shutdown_delay)).await;
        }
        http_stop.cancel();
        tracing::info!("API listener closed; in-flight requests finishing");
        match tokio::time::timeout_at(deadline, api).await {
            Ok(Ok(())) => tracing::info!("API drained: in-flight requests finished"),
            Ok(Err(e)) => tracing::error!(error = %e, "API server task failed"),
            Err(_) => tracing::warn!("in-flight requests did not finish within the grace period"),
        }
        if let Some(grpc) = grpc {
            match tokio::time::timeout_at(deadline, grpc).await {
                Ok(Ok(Ok(()))) => tracing::info!("gRPC drained: calls in flight finished"),
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
                Err(_) => tracing::warn!("gRPC calls did not finish within the grace period"),
            }
        }
        let report = runtime
            .shutdown_within(deadline.saturating_duration_since(Instant::now()))
            .await;
        tracing::info!(
            finished_in_grace = report.finished_in_grace,
            released = report.released,
            "workers stopped"
        );
        root.cancel();
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        let _ = cache_events.await;
        let _ = gauges.await;
        let _ = depth_tracker.await;
        if let Some(tls_watch) = tls_watch {
            let _ = tls_watch.await;
        }
        store.close().await;
        tracing::info!("store closed; bye");
        Ok(())
    }
}

/// Binds an optional listener (`None`: switched off).
async fn bind_optional(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, BindError> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| BindError { what, addr, source }),
        None => Ok(None),
    }
}

/// A listener could not be bound (the address is in use, or not this host's): `keel serve`
/// exits with [`crate::EX_OSERR`] for it.
#[derive(Debug, thiserror::Error)]
#[error("binding the {what} listener on {addr}")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Opens (and migrates) the store, retrying while the database is not up yet: a pod often
/// starts before its database. Only transient failures (refused, unreachable, starting up)
/// are retried, with capped exponential backoff, each attempt logged, for at most
/// `database_wait`; a bad URL, bad credentials or a missing database fail at once.
async fn open_store(
    config: &Config,
    sqlite: SqliteOptions,
    pg: PgOptions,
) -> Result<(Arc<dyn Store>, keel_store::MigrationReport), keel_core::StoreError> {
    const FIRST_DELAY: Duration = Duration::from_millis(250);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    let give_up = Instant::now() + config.database_wait;
    let mut delay = FIRST_DELAY;
    let mut attempt = 1u32;
    loop {
        let opened = keel_store::open(
            &config.database_url,
            sqlite.clone(),
            pg.clone(),
            Arc::new(SystemClock),
        )
        .await;
        match opened {
            Err(e) if e.is_transient() && Instant::now() + delay < give_up => {
                tracing::warn!(
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    waited_ms = (config.database_wait
                        - give_up.saturating_duration_since(Instant::now()))
                    .as_millis() as u64,
                    error = %error_chain(&e),
                    "the database is not reachable yet; retrying (KEEL_DATABASE_WAIT)"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELAY);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// `e` and its sources, `: `-separated, for a log line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Says, loudly and once, that faults are being injected: a server that fails on purpose
/// must never be mistaken for one failing by accident.
fn warn_if_chaos(settings: &ChaosSettings) {
    if !settings.is_active() {
        return;
    }
    let faults: Vec<String> = keel_resilience::Dependency::ALL
        .iter()
        .filter_map(|dep| {
            let f = settings.fault(*dep);
            let mut parts = Vec::new();
            if f.latency_ms > 0 {
                parts.push(format!("{}.latency_ms={}", dep.as_str(), f.latency_ms));
            }
            if f.error_rate > 0.0 {
                parts.push(format!("{}.error_rate={}", dep.as_str(), f.error_rate));
            }
            (!parts.is_empty()).then(|| parts.join(","))
        })
        .collect();
    tracing::warn!(
        faults = %faults.join(","),
        "CHAOS IS ON: faults are being injected on purpose (KEEL_CHAOS, SLOW_AUTH, DB_FAILURE); \
         change or clear them with PUT /debug/chaos on the admin listener"
    );
}

/// The protection state the gauge loop maintains.
struct Protection {
    admission: keel_api::Admission,
    rate_limits: keel_api::RateLimits,
    workers: keel_api::WorkerRegistry,
}

/// States whose jobs are waiting to run: the backlog admission control caps.
const BACKLOG_STATES: [JobState; 3] = [
    JobState::Available,
    JobState::Scheduled,
    JobState::Retryable,
];

/// Reads the queue depths `every` period (`KEEL_QUEUE_DEPTH_INTERVAL`) and sets admission control's backlog figure from them,
/// so that the backlog cap (`KEEL_MAX_QUEUE_BACKLOG`) costs no query per request. Each read
/// is also published for the depth gauges, which would otherwise count the same rows again.
/// Unfinished jobs only: the finished counts would read every job kept for retention, every
/// few seconds, on every replica. A failed read keeps the last figure (and is logged).
async fn track_depths(
    store: Arc<dyn QueueStore>,
    backlog: Backlog,
    every: Duration,
    depths: watch::Sender<Option<Arc<Vec<QueueStats>>>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.queue_depths().await {
            Ok(stats) => {
                backlog.set(
                    stats
                        .iter()
                        .flat_map(|s| BACKLOG_STATES.iter().map(|st| s.counts.get(*st)))
                        .sum(),
                );
                depths.send_replace(Some(Arc::new(stats)));
            }
            Err(e) => tracing::warn!(error = %e, "could not read queue depths"),
        }
    }
}

/// Keeps `keel_queue_depth{queue,state}` and `keel_queue_paused{queue}` (from the depths
/// [`track_depths`] last read), `keel_db_pool_connections{state}`,
/// `keel_db_pool_closed_unanswered_total`, `keel_tasks_alive`,
/// `keel_admission_limit` and the runtime, allocator and process gauges ([`ProcessGauges`])
/// current, drops idle rate-limit buckets (bounding their memory), and runs the Prometheus
/// histogram upkeep.
async fn refresh_gauges(
    store: Arc<dyn Store>,
    depths: watch::Receiver<Option<Arc<Vec<QueueStats>>>>,
    metrics: PrometheusHandle,
    protection: Protection,
    catalog: Catalog,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut process = ProcessGauges::new(tokio::runtime::Handle::current());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        metrics.run_upkeep();
        process.record();
        // Every task of the process (requests, jobs, background loops): a task that outlives
        // the client it worked for shows here as a level that does not come back down.
        metrics::gauge!("keel_tasks_alive").set(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks() as f64,
        );
        protection.admission.report();
        protection.rate_limits.retain_recent();
        protection.workers.record_gauges();
        let pool = store.pool_stats();
        for (state, n) in [
            ("max", pool.max),
            ("idle", pool.idle),
            ("in_use", pool.in_use),
            ("waiting", pool.waiting),
        ] {
            metrics::gauge!("keel_db_pool_connections", "state" => state).set(n as f64);
        }
        metrics::counter!("keel_db_pool_closed_unanswered_total").absolute(pool.closed_unanswered);
        // None until the first read: a zero then would be a guess, not a count.
        let stats = depths.borrow().clone();
        if let Some(stats) = stats {
            record_depths(&stats, &catalog);
        }
    }
}

/// Sets the depth and paused gauges from one read of the queue depths.
fn record_depths(stats: &[QueueStats], catalog: &Catalog) {
    // Queues not served here are summed under `other`: any client can name a
    // queue, so one series per name would be unbounded.
    let mut by_label: std::collections::BTreeMap<&str, (StateCounts, bool)> =
        std::collections::BTreeMap::new();
    by_label.entry(keel_runtime::catalog::OTHER).or_default();
    for served in catalog.queues() {
        by_label.entry(served.as_str()).or_default();
    }
    for s in stats {
        let entry = by_label.entry(catalog.queue_label(&s.queue)).or_default();
        for state in JobState::UNFINISHED {
            entry.0.add(state, s.counts.get(state));
        }
        entry.1 |= s.paused;
    }
    for (queue, (counts, paused)) in by_label {
        for state in JobState::UNFINISHED {
            metrics::gauge!(
                "keel_queue_depth",
                "queue" => queue.to_owned(),
                "state" => state.as_str()
            )
            .set(counts.get(state) as f64);
        }
        // Paused or not is a property of one queue: not summed under `other`.
        if queue != keel_runtime::catalog::OTHER {
            metrics::gauge!("keel_queue_paused", "queue" => queue.to_owned()).set(if paused {
                1.0
            } else {
                0.0
            });
        }
    }
}
