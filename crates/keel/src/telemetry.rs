//! Logs and metrics setup.
//!
//! Logs: `tracing` to stdout, JSON by default (one object per line, what log pipelines
//! ingest) or pretty for a terminal, filtered by `KEEL_LOG_LEVEL`.
//!
//! Metrics: the `metrics` facade with a Prometheus recorder. The facade's recorder is
//! process-wide by design (it is how every crate reports without threading a registry
//! through every call); it is installed once, here, and everything else only holds the
//! [`PrometheusHandle`] that renders it.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Installs the log subscriber. Fails if one is already installed (a second `serve` in one
/// process), which callers may ignore.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_target(true),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init()?,
    }
    Ok(())
}

/// Latency buckets (seconds) for request and job histograms: from sub-millisecond (a cached
/// read) to a minute (a long job), roughly ×2.5 apart.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The Prometheus handle, installing the recorder on first use. Every `App` in a process
/// (the server, or several in one test binary) renders the same recorder.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|_| "a different metrics recorder is already installed".to_owned())?;
            describe_metrics();
            Ok(handle)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Every metric family Keel exports gets its HELP text here, once the recorder is in place:
/// each crate describes what it records, and this binary the gauges its refresh loop sets.
fn describe_metrics() {
    keel_api::describe_metrics();
    keel_resilience::describe_metrics();
    keel_runtime::describe_metrics();
    metrics::describe_gauge!(
        "keel_tasks_alive",
        "Async tasks alive in the process (requests, jobs, background loops); a level that \
         does not come back down is work outliving the client it was for."
    );
    metrics::describe_gauge!(
        "keel_db_pool_connections",
        "Database pool connections, by state: max, idle, in_use, waiting (callers queued \
         for a connection)."
    );
    metrics::describe_counter!(
        "keel_db_pool_closed_unanswered_total",
        "Database connections closed because the call using them ended before every answer \
         came back (a caller that gave up, a transaction ended by an error). Only behind a \
         transaction pooler (KEEL_DATABASE_POOLER=transaction), where the next call must not \
         be pipelined behind an unanswered request; a steady rise means calls time out."
    );
    metrics::describe_gauge!(
        "keel_queue_depth",
        "Unfinished jobs (scheduled, available, running, retryable) per queue and state, \
         counted by the store on each gauge refresh (queues this process does not serve \
         are summed under `other`). Finished jobs are counted by keel_jobs_finished_total."
    );
    metrics::describe_gauge!("keel_queue_paused", "1 if the queue is paused, else 0.");
}
