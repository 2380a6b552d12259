//! W1, W1x and W1g: a backlog inserted into a paused queue, then drained by the built-in
//! workers (W1) or by keel-client's HTTP (W1x) or gRPC (W1g) worker, timed from resume (or
//! the worker's start) to empty.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hyper::Uri;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, DRAIN_POLL, Lane, cores, cpu_since, per_sec};
use crate::bench::machine::CpuSnapshot;
use crate::bench::report::RunRecord;
use crate::generator::Conn;

/// Jobs per `POST /v1/jobs/batch` in W1 (the API's maximum).
const INSERT_BATCH: u64 = 1000;
/// Batch requests in flight at once in W1: enough to overlap the client's and the server's
/// work, few enough not to turn the insert phase into a contention test.
const INSERTERS: usize = 4;
/// How often the drain progress bar is refreshed from the queue counts, when it is drawn.
///
/// Counting is not free: `GET /v1/queues` counts every job the server keeps, finished ones
/// included, and on Postgres after 300k jobs one count took 120 ms of the server's CPU
/// (`pg_stat_statements`), a tenth of a core taken from the drain being measured. So the
/// counts are read only for a bar on a terminal (indicatif hides it on a pipe, as in CI
/// and in `make bench | tee`), and the figures of an interactive run are a little lower.
const COUNT_EVERY: Duration = Duration::from_secs(1);

/// W1: insert N jobs into the paused queue in batches, resume it, time the drain.
pub(super) async fn w1_drain(
    ctx: &Ctx<'_>,
    rec: &mut RunRecord,
    lane: &Lane,
) -> anyhow::Result<()> {
    let n = lane.jobs;
    let (key, label) = (&lane.key, &lane.label);
    ctx.settle("the previous workload").await?;
    ctx.set_paused(true).await?;
    let before = ctx.counts().await?;

    let full = ctx.batch_body(INSERT_BATCH.min(n))?;
    let rest = n % INSERT_BATCH;
    let tail = if rest > 0 && n > INSERT_BATCH {
        Some(ctx.batch_body(rest)?)
    } else {
        None
    };
    let batches = n.div_ceil(INSERT_BATCH);
    let next = Arc::new(AtomicU64::new(0));
    let bar = ctx.progress.counted(&format!("{label} insert"), n);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..INSERTERS {
        let endpoint = ctx.endpoint.clone();
        let (full, tail, next, bar) = (full.clone(), tail.clone(), Arc::clone(&next), bar.clone());
        set.spawn(async move {
            let mut conn = Conn::open(&endpoint).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= batches {
                    return anyhow::Ok(());
                }
                let (body, count) = match &tail {
                    Some(t) if i == batches - 1 => (t.clone(), rest),
                    _ => (full.clone(), INSERT_BATCH.min(n)),
                };
                let (status, resp) = conn
                    .send_timed(endpoint.request(&Uri::from_static("/v1/jobs/batch"), Some(body)))
                    .await
                    .with_context(|| format!("inserting batch {i}"))?;
                anyhow::ensure!(
                    status.is_success(),
                    "batch {i} was refused with {status}: {}",
                    String::from_utf8_lossy(&resp[..resp.len().min(300)])
                );
                bar.inc(count);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("an inserter panicked")??;
    }
    let insert = started.elapsed();
    bar.finish_and_clear();
    rec.set(&format!("{key}.insert_jobs_per_s"), per_sec(n, insert));

    let bar = ctx.progress.counted(&format!("{label} drain"), n);
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let started = Instant::now();
    ctx.set_paused(false).await?;
    let deadline = started + ctx.settings.drain_timeout;
    let mut counted_at = started;
    loop {
        if ctx.is_idle().await? {
            break;
        }
        let now = Instant::now();
        anyhow::ensure!(
            now < deadline,
            "the queue did not drain within {:?}",
            ctx.settings.drain_timeout
        );
        if !bar.is_hidden() && now.duration_since(counted_at) >= COUNT_EVERY {
            let c = ctx.counts().await?;
            bar.set_position(c.completed.saturating_sub(before.completed));
            counted_at = now;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let drain = started.elapsed();
    let cpu = cpu_since(ctx, cpu).await;
    bar.finish_and_clear();
    let after = ctx.counts().await?;
    let completed = after.completed.saturating_sub(before.completed);
    let other =
        (after.discarded + after.cancelled).saturating_sub(before.discarded + before.cancelled);
    anyhow::ensure!(
        completed + other >= n,
        "the queue went idle with {completed} of {n} jobs completed"
    );
    if other > 0 {
        rec.notes.push(format!(
            "{label}: {other} jobs ended discarded or cancelled"
        ));
    }
    rec.set(&format!("{key}.drain_jobs_per_s"), per_sec(n, drain));
    rec.details.insert(
        key.clone(),
        json!({
            "queue": ctx.queue(),
            "job": ctx.job,
            "jobs": n,
            "insert_s": insert.as_secs_f64(),
            "drain_s": drain.as_secs_f64(),
            "completed": completed,
            "discarded_or_cancelled": other,
            "batch_size": INSERT_BATCH,
            "inserters": INSERTERS,
            "drain_cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  {label}  {n} jobs: inserted in {:.2} s ({:.0}/s), drained in {:.2} s ({:.0}/s){}",
        insert.as_secs_f64(),
        per_sec(n, insert).unwrap_or(0.0),
        drain.as_secs_f64(),
        per_sec(n, drain).unwrap_or(0.0),
        cores(cpu)
    ));
    Ok(())
}

/// How an external drain's worker reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    /// keel-client's HTTP worker (lease, heartbeat, batched completions): W1x, with the
    /// bench queue's concurrency, so the figure compares with W1 at the same
    /// `--concurrency`.
    Http,
    /// keel-client's gRPC worker (one streaming lease): W1g, with 20 slots, so the figure
    /// compares with W1@20.
    Grpc,
}

/// W1x and W1g: W1's jobs in a queue no built-in worker serves, drained by keel-client's
/// worker over `transport` with its default settings but the slots.
pub(super) async fn external_drain(
    ctx: &Ctx<'_>,
    rec: &mut RunRecord,
    transport: Transport,
) -> anyhow::Result<()> {
    use keel_client::worker::{JobFailure, Worker, WorkerConfig};

    let (key, label, concurrency) = match transport {
        Transport::Http => ("w1x", "W1x", ctx.settings.concurrency),
        Transport::Grpc => ("w1g", "W1g", super::USER_CONCURRENCIES[0]),
    };
    let grpc = match transport {
        Transport::Http => None,
        Transport::Grpc => Some(
            ctx.grpc
                .clone()
                .context("the server does not serve gRPC here (pass --grpc-url with --url)")?,
        ),
    };
    let n = ctx.settings.jobs;
    let queue = format!("{}-{key}", ctx.queue());
    let before = ctx.counts_of(&queue).await?;
    let bar = ctx.progress.counted(&format!("{label} insert"), n);
    let mut left = n;
    let job = keel_client::JobIn {
        kind: "noop".to_owned(),
        queue: Some(queue.clone()),
        ..keel_client::JobIn::default()
    };
    while left > 0 {
        let count = left.min(INSERT_BATCH);
        let jobs = vec![job.clone(); usize::try_from(count).unwrap_or(1000)];
        ctx.control
            .enqueue_batch(&jobs)
            .await
            .with_context(|| format!("inserting a {label} batch"))?;
        left -= count;
        bar.inc(count);
    }
    bar.finish_and_clear();

    let bar = ctx.progress.counted(&format!("{label} drain"), n);
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let config = WorkerConfig::new([queue.clone()])
        .concurrency(concurrency)
        .wait(Duration::from_secs(1))
        .grace(Duration::from_secs(5))
        .worker_id(format!("keel-bench-{key}"));
    let worker = Worker::new(ctx.control.clone(), config).handle("noop", |_, _| async {
        Ok::<_, JobFailure>(serde_json::Value::Null)
    });
    let started = Instant::now();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move {
            match grpc {
                Some(url) => worker.run_grpc(&url, stop).await,
                None => worker.run(stop).await,
            }
        })
    };
    let deadline = started + ctx.settings.drain_timeout;
    let mut counted_at = started;
    let drained = loop {
        if ctx.is_idle_of(&queue).await? {
            break Ok(started.elapsed());
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(anyhow::anyhow!(
                "external workers did not drain {n} jobs within {:?}",
                ctx.settings.drain_timeout
            ));
        }
        if !bar.is_hidden() && now.duration_since(counted_at) >= COUNT_EVERY {
            let c = ctx.counts_of(&queue).await?;
            bar.set_position(c.completed.saturating_sub(before.completed));
            counted_at = now;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    stop.cancel();
    let report = running
        .await
        .context("the external worker panicked")?
        .context("the external worker failed")?;
    let cpu = cpu_since(ctx, cpu).await;
    bar.finish_and_clear();
    let drain = drained?;
    let done = ctx
        .counts_of(&queue)
        .await?
        .completed
        .saturating_sub(before.completed);
    anyhow::ensure!(
        done >= n,
        "the queue went idle with {done} of {n} jobs completed"
    );
    rec.set(&format!("{key}.drain_jobs_per_s"), per_sec(n, drain));
    rec.details.insert(
        key.into(),
        json!({
            "jobs": n,
            "queue": queue,
            "transport": format!("{transport:?}").to_lowercase(),
            "drain_s": drain.as_secs_f64(),
            "concurrency": concurrency,
            "completed": report.completed,
            "refused": report.refused,
            "drain_cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  {label} {n} jobs through external {} workers ({concurrency} slots): drained in {:.2} s ({:.0}/s){}",
        match transport {
            Transport::Http => "HTTP",
            Transport::Grpc => "gRPC",
        },
        drain.as_secs_f64(),
        per_sec(n, drain).unwrap_or(0.0),
        cores(cpu)
    ));
    Ok(())
}
