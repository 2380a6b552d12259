//! W3g: W3 over gRPC. Enqueues into the paused bench queue through `JobService/Enqueue`,
//! [`STREAMS`] calls in flight at once (a closed model: each caller sends its next call
//! when the previous one is answered) over a few HTTP/2 connections, for the W3 duration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use keel_proto::v1 as pb;
use keel_proto::v1::job_service_client::JobServiceClient;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Endpoint;

use super::{Ctx, cores, cpu_since, ms, per_sec};
use crate::bench::machine::CpuSnapshot;
use crate::bench::report::RunRecord;
use crate::stats::Latency;

/// Calls in flight at once (the 64 concurrent streams).
pub(crate) const STREAMS: usize = 64;
/// HTTP/2 connections they share: several, so one connection's single task is not the
/// bottleneck, few enough that each carries many streams.
const CONNECTIONS: usize = 4;

/// What one caller saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    latency: Option<Latency>,
}

/// W3g: durable enqueues over gRPC, workers paused.
pub(super) async fn w3g_enqueue(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let url = ctx
        .grpc
        .clone()
        .context("the server does not serve gRPC here (pass --grpc-url with --url)")?;
    ctx.set_paused(true).await?;
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(
            Endpoint::from_shared(url.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {url}"))?,
        );
    }
    let key = ctx.api_key.clone();
    let duration = ctx.settings.duration;
    let live = Arc::new(AtomicU64::new(0));
    let ticker = ctx
        .progress
        .timed("W3g", duration, Arc::clone(&live), "enqueued");
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let started = Instant::now();
    let ends = started + duration;
    let mut callers = JoinSet::new();
    for i in 0..STREAMS {
        let mut client = JobServiceClient::new(channels[i % CONNECTIONS].clone());
        let (queue, key, live) = (ctx.queue().to_owned(), key.clone(), Arc::clone(&live));
        callers.spawn(async move {
            let mut t = Tally {
                latency: Some(Latency::new()),
                ..Tally::default()
            };
            while Instant::now() < ends {
                let mut req = tonic::Request::new(pb::EnqueueRequest {
                    job: Some(pb::JobSpec {
                        kind: "noop".to_owned(),
                        queue: Some(queue.clone()),
                        ..pb::JobSpec::default()
                    }),
                });
                if let Some(k) = &key
                    && let Ok(v) = format!("Bearer {k}").parse()
                {
                    req.metadata_mut().insert("authorization", v);
                }
                let sent = Instant::now();
                match client.enqueue(req).await {
                    Ok(_) => {
                        t.ok += 1;
                        if let Some(l) = t.latency.as_mut() {
                            l.record(sent.elapsed());
                        }
                        live.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        t.failed += 1;
                        t.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            t
        });
    }
    let mut total = Tally {
        latency: Some(Latency::new()),
        ..Tally::default()
    };
    while let Some(t) = callers.join_next().await {
        let t = t.context("a W3g caller panicked")?;
        total.ok += t.ok;
        total.failed += t.failed;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
        if let (Some(all), Some(l)) = (total.latency.as_mut(), t.latency.as_ref()) {
            all.merge(l);
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_since(ctx, cpu).await;
    drop(ticker);
    let latency = total.latency.unwrap_or_else(Latency::new);
    rec.set("w3g.enqueue_per_s", per_sec(total.ok, elapsed));
    rec.set("w3g.p50_ms", latency.quantile_ms(0.5));
    rec.set("w3g.p99_ms", latency.quantile_ms(0.99));
    rec.set("w3g.errors", Some(total.failed as f64));
    rec.details.insert(
        "w3g".into(),
        json!({
            "streams": STREAMS,
            "connections": CONNECTIONS,
            "elapsed_s": elapsed.as_secs_f64(),
            "accepted": total.ok,
            "failed": total.failed,
            "first_error": total.first_error,
            "cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  W3g {:.0} durable gRPC enqueues/s ({STREAMS} streams), p50 {} p99 {}{}",
        per_sec(total.ok, elapsed).unwrap_or(0.0),
        ms(latency.quantile_ms(0.5)),
        ms(latency.quantile_ms(0.99)),
        cores(cpu)
    ));
    Ok(())
}
