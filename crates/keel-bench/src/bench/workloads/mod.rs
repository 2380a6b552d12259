//! The workloads of SPEC §7, each measured against one running server.
//!
//! Control operations (pause, resume, queue counts, listing jobs back) go through
//! `keel-client`, like any API user; the load itself goes through the lean generator in
//! [`crate::generator`]. Every wait is bounded: a workload that cannot finish in time fails with
//! what it saw rather than hanging the harness.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::Uri;
use keel_client::{Client, JobListQuery};
use keel_core::{JobId, JobState};
use serde::Deserialize;
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::machine::{CpuSnapshot, CpuUsage};
use super::report::RunRecord;
use super::server::{RssSampler, rss_kib};
use super::{Settings, Workload};
use crate::generator::{self, Conn, Endpoint};
use crate::progress::Progress;
use crate::stats::{KIB_PER_MIB, Latency};

/// Where every single-job workload sends its enqueues.
fn jobs_uri() -> Uri {
    Uri::from_static("/v1/jobs")
}

/// Jobs per `POST /v1/jobs/batch` in W1 (the API's maximum).
const INSERT_BATCH: u64 = 1000;
/// Batch requests in flight at once in W1: enough to overlap the client's and the server's
/// work, few enough not to turn the insert phase into a contention test.
const INSERTERS: usize = 4;
/// How often a draining queue is checked. Each check is two index probes (`limit=1` on the
/// available and running jobs of the queue), cheap enough to run this often without taking
/// CPU from the drain it measures; counting every job (`GET /v1/queues`) is left to a
/// once-a-second progress update.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often the drain progress bar is refreshed from the queue counts.
const COUNT_EVERY: Duration = Duration::from_secs(1);
/// Longest the read-back of a workload's job timestamps may take.
const READBACK_TIMEOUT: Duration = Duration::from_secs(180);
/// Page size of the read-back (the API's maximum).
const READBACK_PAGE: u32 = 1000;
/// Idle time before the idle RSS is read (W5): long enough for startup allocations to be
/// released and the first maintenance pass to run.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// What the workloads need to reach and observe the server.
pub(crate) struct Ctx<'a> {
    /// The resolved options.
    pub(crate) settings: &'a Settings,
    /// Where load goes.
    pub(crate) endpoint: Endpoint,
    /// Control-plane client.
    pub(crate) control: Client,
    /// The server's pid, for RSS (spawned, or `--pid`).
    pub(crate) pid: Option<u32>,
    /// Spawn → ready, when the harness started the server.
    pub(crate) ready_after: Option<Duration>,
    /// Bars and notes.
    pub(crate) progress: Progress,
    /// The queue this workload uses (the bench queue, or one of the user-setting queues).
    pub(crate) queue: String,
    /// The job it enqueues there, without its queue: `{"kind": "noop"}` unless a variant
    /// says otherwise.
    pub(crate) job: serde_json::Value,
}

/// The worker counts teams run (SPEC §7: 8–20 workers): Keel's default and 20. W1 and W2
/// also run at each, on a queue of its own (`<queue>-c<N>`) served by the same server, so
/// the figures at the settings users run sit next to the best case.
pub(crate) const USER_CONCURRENCIES: [usize; 2] =
    [20, keel_runtime::QueueConfig::DEFAULT_CONCURRENCY];
/// Length of the 10 ms jobs of W1's variant: long enough that a slot's time goes to the
/// job, so the drain shows how close prefetch and pipelining get to the ideal
/// (concurrency × 100 jobs/s).
const SLOW_JOB_MS: u64 = 10;
/// Ideal seconds of W1's 10 ms variant: its job count is the ideal rate times this.
const SLOW_DRAIN_S: u64 = 5;

/// The queue served with `concurrency` workers for the user-setting variants.
pub(crate) fn user_queue(queue: &str, concurrency: usize) -> String {
    format!("{queue}-c{concurrency}")
}

/// One W1 or W2 measurement: where, with which job, and under which keys.
struct Lane {
    /// Prefix of the figures (`w1`, `w1_20`, `w1_20_10ms`, `w2_8`…).
    key: String,
    /// Label in the notes (`W1@20 10ms`).
    label: String,
    queue: String,
    job: serde_json::Value,
    jobs: u64,
}

/// Runs the selected workloads in a fixed order (the footprint first, while the server is
/// fresh; the enqueue-only ones last, because they leave a paused backlog behind), recording
/// each one's figures, or its error, in `rec`.
pub(crate) async fn run_all(ctx: &Ctx<'_>, rec: &mut RunRecord) {
    let order = [
        Workload::W5,
        Workload::W1,
        Workload::W1x,
        Workload::W2,
        Workload::W2p,
        Workload::W2x,
        Workload::W3,
        Workload::W4,
    ];
    for w in order {
        if !ctx.settings.workloads.contains(&w) {
            continue;
        }
        let outcome = match w {
            Workload::W5 => w5_footprint(ctx, rec).await,
            Workload::W1 | Workload::W2 => {
                // Each lane (worker count, job) is measured and reported on its own.
                for lane in lanes(ctx, w) {
                    let at = ctx.at(&lane);
                    let measured = if w == Workload::W1 {
                        w1_drain(&at, rec, &lane).await
                    } else {
                        w2_steady(&at, rec, &lane).await
                    };
                    if let Err(e) = measured {
                        at.progress
                            .note(&format!("  {}: could not be measured: {e:#}", lane.label));
                        rec.errors.push(format!("{}: {e:#}", lane.label));
                    }
                }
                Ok(())
            }
            Workload::W1x => w1x_external_drain(ctx, rec).await,
            Workload::W2p => w2p_paced(ctx, rec).await,
            Workload::W2x => w2x_external_pickup(ctx, rec).await,
            Workload::W3 => w3_enqueue(ctx, rec).await,
            Workload::W4 => w4_overload(ctx, rec).await,
        };
        if let Err(e) = outcome {
            ctx.progress
                .note(&format!("  {w}: could not be measured: {e:#}"));
            rec.errors.push(format!("{w}: {e:#}"));
        }
    }
}

/// Job counts of the bench queue.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct Counts {
    available: u64,
    running: u64,
    completed: u64,
    discarded: u64,
    cancelled: u64,
}

#[derive(Debug, Deserialize)]
struct QueueEntry {
    queue: String,
    counts: Counts,
}

/// W1's or W2's measurements: at `--concurrency` on the bench queue, then (unless
/// `--no-user-settings`) at each of [`USER_CONCURRENCIES`] on its own queue, and for W1
/// also with 10 ms jobs there.
fn lanes(ctx: &Ctx<'_>, w: Workload) -> Vec<Lane> {
    let s = ctx.settings;
    let label = w.to_string();
    let key = label.to_lowercase();
    let (key, label) = (key.as_str(), label.as_str());
    let slow = w == Workload::W1;
    let noop = json!({ "kind": "noop" });
    let mut out = vec![Lane {
        key: key.to_owned(),
        label: label.to_owned(),
        queue: s.queue.clone(),
        job: noop.clone(),
        jobs: s.jobs,
    }];
    if !s.user_settings {
        return out;
    }
    for n in USER_CONCURRENCIES {
        out.push(Lane {
            key: format!("{key}_{n}"),
            label: format!("{label}@{n}"),
            queue: user_queue(&s.queue, n),
            job: noop.clone(),
            jobs: s.jobs,
        });
    }
    if slow {
        for n in USER_CONCURRENCIES {
            let ideal = n as u64 * (1000 / SLOW_JOB_MS);
            out.push(Lane {
                key: format!("{key}_{n}_{SLOW_JOB_MS}ms"),
                label: format!("{label}@{n} {SLOW_JOB_MS}ms"),
                queue: user_queue(&s.queue, n),
                job: json!({ "kind": "sleep", "args": { "ms": SLOW_JOB_MS } }),
                jobs: (ideal * SLOW_DRAIN_S).min(s.jobs),
            });
        }
    }
    out
}

impl<'a> Ctx<'a> {
    /// The same server, with the queue and job of `lane`.
    fn at(&self, lane: &Lane) -> Ctx<'a> {
        Ctx {
            settings: self.settings,
            endpoint: self.endpoint.clone(),
            control: self.control.clone(),
            pid: self.pid,
            ready_after: self.ready_after,
            progress: self.progress,
            queue: lane.queue.clone(),
            job: lane.job.clone(),
        }
    }
}

impl Ctx<'_> {
    fn queue(&self) -> &str {
        &self.queue
    }

    /// The workload's job, in its queue.
    fn job(&self) -> serde_json::Value {
        let mut job = self.job.clone();
        if let Some(o) = job.as_object_mut() {
            o.insert("queue".into(), json!(self.queue()));
        }
        job
    }

    async fn set_paused(&self, paused: bool) -> anyhow::Result<()> {
        self.control
            .set_paused(self.queue(), paused)
            .await
            .with_context(|| {
                let verb = if paused { "pausing" } else { "resuming" };
                format!("{verb} queue {}", self.queue())
            })?;
        Ok(())
    }

    /// The bench queue's counts (zeros before it has any job).
    async fn counts(&self) -> anyhow::Result<Counts> {
        self.counts_of(self.queue()).await
    }

    /// A queue's counts (zeros before it has any job).
    async fn counts_of(&self, queue: &str) -> anyhow::Result<Counts> {
        let v = self
            .control
            .queues()
            .await
            .context("reading queue counts")?;
        let queues: Vec<QueueEntry> = serde_json::from_value(v).context("reading queue counts")?;
        Ok(queues
            .into_iter()
            .find(|q| q.queue == queue)
            .map(|q| q.counts)
            .unwrap_or_default())
    }

    /// Whether the queue has at least one job in `state` (one index probe).
    async fn has(&self, state: JobState) -> anyhow::Result<bool> {
        let page = self
            .control
            .list_jobs(&JobListQuery {
                queue: Some(self.queue().to_owned()),
                state: Some(state),
                limit: Some(1),
                ..JobListQuery::default()
            })
            .await
            .with_context(|| format!("looking for {state} jobs"))?;
        Ok(!page.jobs.is_empty())
    }

    /// Whether the queue has nothing left to run. Available is checked before running:
    /// once nothing is available, nothing can become running (noop jobs never retry), so
    /// two empty answers in that order mean the queue is drained.
    async fn is_idle(&self) -> anyhow::Result<bool> {
        Ok(!self.has(JobState::Available).await? && !self.has(JobState::Running).await?)
    }

    /// Resumes the queue and waits until it is idle, so a workload starts from a quiet
    /// server and is not charged for the previous one's backlog.
    async fn settle(&self, what: &str) -> anyhow::Result<()> {
        self.set_paused(false).await?;
        let deadline = Instant::now() + self.settings.drain_timeout;
        while !self.is_idle().await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "queue {} still had work {:?} after {what}",
                self.queue(),
                self.settings.drain_timeout
            );
            tokio::time::sleep(DRAIN_POLL).await;
        }
        Ok(())
    }

    /// `started_at − created_at` of every completed job of the queue created after
    /// `cursor`, read back with the keyset listing: the server's own clock on both ends,
    /// so the figure is the time from the job's creation to a worker leasing it.
    async fn pickup_latencies(&self, cursor: &str) -> anyhow::Result<Latency> {
        let deadline = Instant::now() + READBACK_TIMEOUT;
        let mut lat = Latency::new();
        let mut after = Some(cursor.parse::<JobId>().context("the readback cursor")?);
        loop {
            let page = self
                .control
                .list_jobs(&JobListQuery {
                    queue: Some(self.queue().to_owned()),
                    state: Some(JobState::Completed),
                    after: after.take(),
                    limit: Some(READBACK_PAGE),
                    ..JobListQuery::default()
                })
                .await
                .context("reading the workload's jobs back")?;
            for job in &page.jobs {
                let Some(started) = &job.started_at else {
                    continue;
                };
                let us = (*started - job.created_at)
                    .num_microseconds()
                    .unwrap_or(i64::MAX);
                lat.record_us(u64::try_from(us).unwrap_or(0));
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "reading back {} jobs took longer than {READBACK_TIMEOUT:?}",
                lat.count()
            );
        }
        Ok(lat)
    }

    fn job_body(&self) -> anyhow::Result<Bytes> {
        let v = self.job();
        Ok(Bytes::from(
            serde_json::to_vec(&v).context("encoding a job")?,
        ))
    }

    fn batch_body(&self, n: u64) -> anyhow::Result<Bytes> {
        let job = self.job();
        let jobs: Vec<&serde_json::Value> = (0..n).map(|_| &job).collect();
        let v = json!({ "jobs": jobs });
        Ok(Bytes::from(
            serde_json::to_vec(&v).context("encoding a batch")?,
        ))
    }
}

/// A job-id cursor that sorts before every UUIDv7 minted from now on: the current Unix
/// millisecond, version 7, and zero random bits. Listing `after` it returns exactly the jobs
/// created from here on (ids are time-ordered), without tagging jobs in any way that an
/// API key's tenant binding could refuse.
pub(crate) fn v7_cursor(at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70;
    b[8] = 0x80;
    uuid::Uuid::from_bytes(b).to_string()
}

/// Who used the cores between `before` and now.
async fn cpu_since(ctx: &Ctx<'_>, before: Option<CpuSnapshot>) -> Option<CpuUsage> {
    let after = CpuSnapshot::take(ctx.pid).await?;
    before?.usage_until(&after)
}

/// `[cores: keel 0.92 · bench 0.61 · postgres 0.30 · other 0.11]`, for the one-line
/// summaries.
fn cores(u: Option<CpuUsage>) -> String {
    let Some(u) = u else {
        return String::new();
    };
    let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "?".into());
    let pg = u
        .postgres_cores
        .map(|p| format!(" · postgres {p:.2}"))
        .unwrap_or_default();
    format!(
        " [cores: keel {} · bench {:.2}{pg} · other {}]",
        f(u.server_cores),
        u.harness_cores,
        f(u.other_cores)
    )
}

fn per_sec(n: u64, d: Duration) -> Option<f64> {
    let s = d.as_secs_f64();
    (s > 0.0).then(|| n as f64 / s)
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / KIB_PER_MIB)
}

/// W5: start-up time (measured by the harness when it spawned the server) and RSS at idle.
async fn w5_footprint(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    rec.set(
        "w5.ready_ms",
        ctx.ready_after.map(|d| d.as_secs_f64() * 1000.0),
    );
    let Some(pid) = ctx.pid else {
        rec.notes
            .push("W5: no server pid (pass --pid with --url): RSS not measured".into());
        return Ok(());
    };
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = rss_kib(pid).await?;
    rec.set("w5.rss_idle_mib", mib(Some(idle)));
    ctx.progress.note(&format!(
        "  W5  ready in {} · idle RSS {:.1} MiB",
        ctx.ready_after
            .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "(not started here)".into()),
        idle as f64 / KIB_PER_MIB
    ));
    Ok(())
}

/// W1: insert N jobs into the paused queue in batches, resume it, time the drain.
async fn w1_drain(ctx: &Ctx<'_>, rec: &mut RunRecord, lane: &Lane) -> anyhow::Result<()> {
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
        if now.duration_since(counted_at) >= COUNT_EVERY {
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

/// W1x: W1's jobs in a queue no built-in worker serves, drained by keel-client's HTTP
/// worker (lease, heartbeat, batched completions) with the bench queue's concurrency, so
/// the figure compares with W1 at the same `--concurrency`.
async fn w1x_external_drain(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    use keel_client::worker::{JobFailure, Worker, WorkerConfig};

    let n = ctx.settings.jobs;
    let queue = format!("{}-external", ctx.queue());
    let before = ctx.counts_of(&queue).await?;
    let bar = ctx.progress.counted("W1x insert", n);
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
            .context("inserting a W1x batch")?;
        left -= count;
        bar.inc(count);
    }
    bar.finish_and_clear();

    let bar = ctx.progress.counted("W1x drain", n);
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let config = WorkerConfig::new([queue.clone()])
        .concurrency(ctx.settings.concurrency)
        .wait(Duration::from_secs(1))
        .grace(Duration::from_secs(5))
        .worker_id("keel-bench-w1x");
    let worker = Worker::new(ctx.control.clone(), config).handle("noop", |_, _| async {
        Ok::<_, JobFailure>(serde_json::Value::Null)
    });
    let started = Instant::now();
    let running = tokio::spawn(worker.run(stop.clone()));
    let deadline = started + ctx.settings.drain_timeout;
    let drained = loop {
        let c = ctx.counts_of(&queue).await?;
        let done = c.completed.saturating_sub(before.completed);
        bar.set_position(done);
        if done >= n {
            break Ok(started.elapsed());
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "external workers completed {done} of {n} jobs within {:?}",
                ctx.settings.drain_timeout
            ));
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
    rec.set("w1x.drain_jobs_per_s", per_sec(n, drain));
    rec.details.insert(
        "w1x".into(),
        json!({
            "jobs": n,
            "queue": queue,
            "drain_s": drain.as_secs_f64(),
            "concurrency": ctx.settings.concurrency,
            "completed": report.completed,
            "refused": report.refused,
            "drain_cpu": cpu,
        }),
    );
    ctx.progress.note(&format!(
        "  W1x {n} jobs through external workers ({} slots): drained in {:.2} s ({:.0}/s){}",
        ctx.settings.concurrency,
        drain.as_secs_f64(),
        per_sec(n, drain).unwrap_or(0.0),
        cores(cpu)
    ));
    Ok(())
}

/// Samples of W2x.
const PICKUP_SAMPLES: u32 = 300;

/// W2x: one external worker long-polls an empty queue; each sample enqueues one job and
/// times from sending the enqueue to receiving the lease answer that carries it (so the
/// enqueue's own commit is included), then completes the job so the queue is empty again.
async fn w2x_external_pickup(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
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

/// W2: closed-model enqueue from many clients while the workers run the jobs.
async fn w2_steady(ctx: &Ctx<'_>, rec: &mut RunRecord, lane: &Lane) -> anyhow::Result<()> {
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

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2} ms"))
        .unwrap_or_else(|| "-".into())
}

/// W2p: an open-model schedule at a fixed rate, for pickup latency when the server is far
/// from saturated (where a lost wakeup shows as a poll interval's worth of delay).
async fn w2p_paced(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
    let s = ctx.settings;
    ctx.settle("the previous workload").await?;
    let body = ctx.job_body()?;
    let cursor = v7_cursor(SystemTime::now());
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let live = Arc::new(AtomicU64::new(0));
    let ticker = ctx
        .progress
        .timed("W2p", s.duration, Arc::clone(&live), "enqueued");
    let report = generator::open_loop(
        &ctx.endpoint,
        jobs_uri(),
        Some(body),
        s.paced_rate,
        s.duration,
        s.max_in_flight,
        live,
    )
    .await;
    let cpu = cpu_since(ctx, cpu).await;
    drop(ticker);
    let report = report?;
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
async fn w3_enqueue(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
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
async fn w4_overload(ctx: &Ctx<'_>, rec: &mut RunRecord) -> anyhow::Result<()> {
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
    let cpu = CpuSnapshot::take(ctx.pid).await;
    let live = Arc::new(AtomicU64::new(0));
    let ticker = ctx
        .progress
        .timed("W4", s.overload_duration, Arc::clone(&live), "accepted");
    let report = generator::open_loop(
        &ctx.endpoint,
        jobs_uri(),
        Some(ctx.job_body()?),
        rate,
        s.overload_duration,
        s.max_in_flight,
        live,
    )
    .await;
    let cpu = cpu_since(ctx, cpu).await;
    drop(ticker);
    let peak = match rss {
        Some(r) => r.finish().await,
        None => None,
    };
    let report = report?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_sorts_before_ids_minted_in_the_same_millisecond() {
        let at = UNIX_EPOCH + Duration::from_millis(1_736_000_000_123);
        let cursor = uuid::Uuid::parse_str(&v7_cursor(at)).unwrap();
        assert_eq!(cursor.get_version_num(), 7);
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, 1_736_000_000, 123_000_000);
        let same_ms = uuid::Uuid::new_v7(ts);
        assert!(cursor < same_ms, "{cursor} !< {same_ms}");
        let earlier = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            1_736_000_000,
            122_000_000,
        ));
        assert!(earlier < cursor);
    }
}
