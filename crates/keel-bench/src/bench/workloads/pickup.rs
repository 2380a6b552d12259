//! W2, W2p and W2x: jobs enqueued while workers run them, and how soon each is picked up
//! (`started_at − created_at`, the server's clock at both ends): from many closed-model
//! clients (W2), on a paced open-model schedule (W2p), and by a waiting external lease (W2x).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde_json::json;
use tokio::time::Instant;

use super::{Ctx, Lane, cores, cpu_since, jobs_uri, mib, ms, per_sec, v7_cursor};
use crate::bench::machine::CpuSnapshot;
use crate::bench::report::RunRecord;
use crate::bench::server::RssSampler;
use crate::generator;
use crate::stats::Latency;

/// W2: closed-model enqueue from many clients while the workers run the jobs.
pub(super) async fn w2_steady(
    ctx: &Ctx<'_>,
    rec: &mut RunRecord,
    lane: &Lane,
) -> anyhow::Result<()> {
    let s = ctx.settings;
    let (key, label) = (&lane.key, &lane.label);
    ctx.settle("the previous workload").await?;
    let body = ctx.job_body()?;
    let cursor = v7_cursor(SystemTime::now());
    let before = ctx.counts().await?;
    let rss = ctx.pid.map(RssSampler::start);
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let live = Arc::new(AtomicU64::new(0));
    let ticker = ctx
        .progress
        .timed(label, s.duration, Arc::clone(&live), "enqueued");
    let report = generator::closed_loop(
        &ctx.endpoint,
        jobs_uri(),
        Some(body),
        s.clients,
        s.duration,
        live,
    )
    .await;
    // Read at once: the completions of the window, not of the drain after it.
    let after = ctx.counts().await;
    let cpu = cpu_since(ctx, cpu).await;
    drop(ticker);
    let peak = match rss {
        Some(r) => r.finish().await,
        None => None,
    };
    let report = report?;
    let after = after?;
    let t = &report.tally;
    let completed = after.completed.saturating_sub(before.completed);
    rec.set(
        &format!("{key}.enqueue_per_s"),
        per_sec(t.ok, report.elapsed),
    );
    rec.set(
        &format!("{key}.completed_per_s"),
        per_sec(completed, report.elapsed),
    );
    rec.set(
        &format!("{key}.request_p99_ms"),
        t.latency.quantile_ms(0.99),
    );
    rec.set(
        &format!("{key}.errors"),
        Some((t.failed + t.other_status + t.shed) as f64),
    );
    if key == "w2" {
        rec.set("w5.rss_w2_mib", mib(peak));
    }

    // How long the backlog left when the producers stopped takes to run.
    let stopped = Instant::now();
    ctx.settle(&format!("{label}'s window")).await?;
    rec.set(
        &format!("{key}.backlog_gone_ms"),
        Some(stopped.elapsed().as_secs_f64() * 1000.0),
    );
    let lat = ctx.pickup_latencies(&cursor).await?;
    rec.set(&format!("{key}.pickup_p50_ms"), lat.quantile_ms(0.5));
    rec.set(&format!("{key}.pickup_p99_ms"), lat.quantile_ms(0.99));
    rec.details.insert(
        key.clone(),
        json!({
            "queue": ctx.queue(),
            "clients": s.clients,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "accepted": t.ok,
            "completed_in_window": completed,
            "statuses": t.statuses,
            "first_error": t.first_error,
            "pickup_samples": lat.count(),
            "pickup_max_ms": lat.max_ms(),
            "cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  {label}  {:.0} enqueued/s, {:.0} completed/s, backlog gone {:.0} ms after, enqueue→start p50 {} p99 {}{}",
        per_sec(t.ok, report.elapsed).unwrap_or(0.0),
        per_sec(completed, report.elapsed).unwrap_or(0.0),
        rec.metrics
            .get(&format!("{key}.backlog_gone_ms"))
            .copied()
            .unwrap_or(0.0),
        ms(lat.quantile_ms(0.5)),
        ms(lat.quantile_ms(0.99)),
        cores(cpu)
    ));
    Ok(())
}

/// W2p: an open-model schedule at a fixed rate, for pickup latency when the server is far
/// from saturated (where a lost wakeup shows as a poll interval's worth of delay).
pub(super) async fn w2p_paced(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let s = ctx.settings;
    ctx.settle("the previous workload").await?;
    let cursor = v7_cursor(SystemTime::now());
    let (report, cpu) = ctx
        .paced_jobs("W2p", s.paced_rate, s.duration, "enqueued")
        .await?;
    let t = &report.tally;
    rec.set("w2p.request_p99_ms", t.latency.quantile_ms(0.99));
    rec.set(
        "w2p.errors",
        Some((t.failed + t.other_status + t.shed + report.unsent) as f64),
    );
    if report.late > 0 {
        rec.notes.push(format!(
            "W2p: {} of {} requests left more than 10 ms after their scheduled instant",
            report.late, report.scheduled
        ));
    }
    ctx.settle("W2p's window").await?;
    let lat = ctx.pickup_latencies(&cursor).await?;
    rec.set("w2p.pickup_p50_ms", lat.quantile_ms(0.5));
    rec.set("w2p.pickup_p99_ms", lat.quantile_ms(0.99));
    rec.set("w2p.pickup_max_ms", lat.max_ms());
    rec.details.insert(
        "w2p".into(),
        json!({
            "rate_per_s": s.paced_rate,
            "scheduled": report.scheduled,
            "accepted": t.ok,
            "unsent": report.unsent,
            "late": report.late,
            "statuses": t.statuses,
            "first_error": t.first_error,
            "pickup_samples": lat.count(),
            "cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  W2p {:.0}/s paced: enqueue→start p50 {} p99 {} max {}{}",
        s.paced_rate,
        ms(lat.quantile_ms(0.5)),
        ms(lat.quantile_ms(0.99)),
        ms(lat.max_ms()),
        cores(cpu)
    ));
    Ok(())
}

/// Samples of W2x.
const PICKUP_SAMPLES: u32 = 300;

/// W2x: one external worker long-polls an empty queue; each sample enqueues one job and
/// times from sending the enqueue to receiving the lease answer that carries it (so the
/// enqueue's own commit is included), then completes the job so the queue is empty again.
pub(super) async fn w2x_external_pickup(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let queue = format!("{}-pickup", ctx.queue());
    let job = keel_client::JobIn {
        kind: "noop".to_owned(),
        queue: Some(queue.clone()),
        ..keel_client::JobIn::default()
    };
    let bar = ctx.progress.counted("W2x", u64::from(PICKUP_SAMPLES));
    let mut lat = Latency::new();
    for _ in 0..PICKUP_SAMPLES {
        let poller = ctx.control.clone();
        let q = queue.clone();
        let poll = tokio::spawn(async move {
            let got = poller
                .lease(
                    &q,
                    "keel-bench-w2x",
                    1,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                )
                .await;
            (got, Instant::now())
        });
        // Give the poll time to find the queue empty and wait: a poll that has not started
        // waiting yet would take the job on its first look, which measures nothing wrong
        // (only a shorter path).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        ctx.control
            .enqueue(&job, None)
            .await
            .context("enqueueing a W2x job")?;
        let (got, answered) = poll.await.context("the W2x poll panicked")?;
        let jobs = got.context("the W2x lease")?;
        let leased = jobs
            .first()
            .context("the W2x lease answered without the job")?;
        lat.record(answered.saturating_duration_since(sent));
        let token = leased
            .lease
            .as_ref()
            .and_then(|l| l.token.as_deref())
            .context("a leased job without its token")?;
        ctx.control
            .complete(leased.id, token, &serde_json::Value::Null)
            .await
            .context("completing a W2x job")?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    rec.set("w2x.pickup_p50_ms", lat.quantile_ms(0.5));
    rec.set("w2x.pickup_p99_ms", lat.quantile_ms(0.99));
    rec.details.insert(
        "w2x".into(),
        json!({ "samples": lat.count(), "queue": queue, "max_ms": lat.max_ms() }),
    );
    ctx.progress.note(&format!(
        "  W2x {} pickups by a waiting external lease: p50 {:.2} ms, p99 {:.2} ms",
        lat.count(),
        lat.quantile_ms(0.5).unwrap_or(f64::NAN),
        lat.quantile_ms(0.99).unwrap_or(f64::NAN),
    ));
    Ok(())
}
