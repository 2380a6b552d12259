//! W3 and W4: enqueues into a paused queue, so only the enqueue path is measured — its
//! capacity and latency in a closed model (W3), then an open-model offer of a multiple of
//! that capacity (W4) to see what holds under overload.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::json;

use super::{Ctx, cores, cpu_since, jobs_uri, mib, ms, per_sec};
use crate::bench::machine::{CpuSnapshot, CpuUsage};
use crate::bench::report::RunRecord;
use crate::bench::server::RssSampler;
use crate::generator;

/// A closed-model enqueue-only run on the paused queue: W3, and W4's calibration when W3
/// was not selected.
async fn enqueue_only(
    ctx: &Ctx<'_>,
    prefix: &str,
    duration: Duration,
) -> anyhow::Result<(generator::ClosedReport, Option<CpuUsage>)> {
    ctx.set_paused(true).await?;
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let live = Arc::new(AtomicU64::new(0));
    let ticker = ctx
        .progress
        .timed(prefix, duration, Arc::clone(&live), "enqueued");
    let report = generator::closed_loop(
        &ctx.endpoint,
        jobs_uri(),
        Some(ctx.job_body()?),
        ctx.settings.clients,
        duration,
        live,
    )
    .await;
    let cpu = cpu_since(ctx, cpu).await;
    drop(ticker);
    Ok((report?, cpu))
}

/// W3: durable enqueues only (workers paused), closed model.
pub(super) async fn w3_enqueue(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let (report, cpu) = enqueue_only(ctx, "W3", ctx.settings.duration).await?;
    let t = &report.tally;
    rec.set("w3.enqueue_per_s", per_sec(t.ok, report.elapsed));
    rec.set("w3.p50_ms", t.latency.quantile_ms(0.5));
    rec.set("w3.p99_ms", t.latency.quantile_ms(0.99));
    rec.set("w3.p999_ms", t.latency.quantile_ms(0.999));
    rec.set(
        "w3.errors",
        Some((t.failed + t.other_status + t.shed) as f64),
    );
    rec.details.insert(
        "w3".into(),
        json!({
            "clients": ctx.settings.clients,
            "elapsed_s": report.elapsed.as_secs_f64(),
            "accepted": t.ok,
            "statuses": t.statuses,
            "first_error": t.first_error,
            "cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  W3  {:.0} durable enqueues/s, p50 {} p99 {} p99.9 {}{}",
        per_sec(t.ok, report.elapsed).unwrap_or(0.0),
        ms(t.latency.quantile_ms(0.5)),
        ms(t.latency.quantile_ms(0.99)),
        ms(t.latency.quantile_ms(0.999)),
        cores(cpu)
    ));
    Ok(())
}

/// W4: an open-model offer of a multiple of this run's W3 capacity, workers paused as in
/// W3, so the only thing that changes from W3 is the offered load.
pub(super) async fn w4_overload(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let s = ctx.settings;
    let (capacity, source) = match rec.metrics.get("w3.enqueue_per_s") {
        Some(c) => (*c, "w3"),
        None => {
            let (r, _) = enqueue_only(ctx, "W4 calib", s.calibration).await?;
            let c = per_sec(r.tally.ok, r.elapsed).unwrap_or(0.0);
            (c, "calibration")
        }
    };
    anyhow::ensure!(
        capacity > 0.0,
        "no enqueue capacity to overload (W3 accepted nothing)"
    );
    let rate = capacity * s.overload_factor;
    ctx.set_paused(true).await?;
    let rss = ctx.pid.map(RssSampler::start);
    let measured = ctx
        .paced_jobs("W4", rate, s.overload_duration, "accepted")
        .await;
    let peak = match rss {
        Some(r) => r.finish().await,
        None => None,
    };
    let (report, cpu) = measured?;
    let t = &report.tally;
    let goodput = per_sec(t.ok, report.elapsed);
    let scheduled = report.scheduled.max(1) as f64;
    rec.set("w4.offered_per_s", Some(rate));
    rec.set("w4.goodput_per_s", goodput);
    rec.set("w4.goodput_pct", goodput.map(|g| g / capacity * 100.0));
    rec.set("w4.p99_ms", t.latency.quantile_ms(0.99));
    rec.set("w4.shed_pct", Some(t.shed as f64 / scheduled * 100.0));
    rec.set("w4.shed_p99_ms", t.shed_latency.quantile_ms(0.99));
    rec.set("w4.other_errors", Some((t.other_status + t.failed) as f64));
    rec.set(
        "w4.unsent_pct",
        Some(report.unsent as f64 / scheduled * 100.0),
    );
    rec.set("w4.peak_rss_mib", mib(peak));
    if report.late * 100 > report.scheduled {
        rec.notes.push(format!(
            "W4: the generator sent {} of {} requests more than 10 ms late (it shares the CPU with the server); their latency still counts from the schedule",
            report.late, report.scheduled
        ));
    }
    rec.details.insert(
        "w4".into(),
        json!({
            "capacity_per_s": capacity,
            "capacity_from": source,
            "factor": s.overload_factor,
            "duration_s": s.overload_duration.as_secs_f64(),
            "elapsed_s": report.elapsed.as_secs_f64(),
            "scheduled": report.scheduled,
            "accepted": t.ok,
            "shed": t.shed,
            "other_status": t.other_status,
            "failed": t.failed,
            "unsent": report.unsent,
            "late": report.late,
            "connections": report.connections,
            "max_in_flight": s.max_in_flight,
            "statuses": t.statuses,
            "first_error": t.first_error,
            "accepted_p50_ms": t.latency.quantile_ms(0.5),
            "accepted_max_ms": t.latency.max_ms(),
            "cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  W4  offered {rate:.0}/s: goodput {:.0}/s ({:.0}% of {capacity:.0}), p99 {}, shed {}, other errors {}, unsent {}{}",
        goodput.unwrap_or(0.0),
        goodput.map(|g| g / capacity * 100.0).unwrap_or(0.0),
        ms(t.latency.quantile_ms(0.99)),
        t.shed,
        t.other_status + t.failed,
        report.unsent,
        cores(cpu)
    ));
    Ok(())
}
