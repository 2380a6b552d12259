//! The workloads of SPEC §7, each measured against one running server.
//!
//! Control operations (pause, resume, queue counts, listing jobs back) go through
//! `keel-client`, like any API user; the load itself goes through the lean generator in
//! [`crate::generator`]. Every wait is bounded: a workload that cannot finish in time fails with
//! what it saw rather than hanging the harness.
//!
//! This module holds what every workload shares (the [`Ctx`], its control-plane calls, the
//! lanes of W1 and W2, the figures' formatting) and the order they run in; each family
//! lives in its own module: [`footprint`] (W5), [`drain`] (W1, W1x), [`pickup`] (W2, W2p,
//! W2x) and [`enqueue`] (W3, W4).

mod drain;
mod enqueue;
mod footprint;
mod grpc;
mod pickup;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::Uri;
use keel_client::{Client, JobListQuery};
use keel_core::{JobId, JobState};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use self::drain::{Transport, external_drain, w1_drain};
use self::enqueue::{w3_enqueue, w4_overload};
use self::footprint::w5_footprint;
use self::grpc::w3g_enqueue;
use self::pickup::{w2_steady, w2p_paced, w2x_external_pickup};
use super::machine::{CpuSnapshot, CpuUsage};
use super::report::RunRecord;
use super::{Settings, Workload};
use crate::generator::{self, Endpoint, OpenReport};
use crate::progress::Progress;
use crate::stats::{KIB_PER_MIB, Latency};

/// Where every single-job workload sends its enqueues.
fn jobs_uri() -> Uri {
    Uri::from_static("/v1/jobs")
}

/// How often a draining queue is checked. Each check is two index probes (`limit=1` on the
/// available and running jobs of the queue), cheap enough to run this often without taking
/// CPU from the drain it measures; counting every job (`GET /v1/queues`) is left to a
/// once-a-second progress update.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Longest the read-back of a workload's job timestamps may take.
const READBACK_TIMEOUT: Duration = Duration::from_secs(180);
/// Page size of the read-back (the API's maximum).
const READBACK_PAGE: u32 = 1000;

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
    /// The server's gRPC base URL, for W1g and W3g.
    pub(crate) grpc: Option<String>,
    /// The API key the load presents, if the server requires one.
    pub(crate) api_key: Option<String>,
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
        Workload::W1g,
        Workload::W2,
        Workload::W2p,
        Workload::W2x,
        Workload::W3,
        Workload::W3g,
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
            Workload::W1x => external_drain(ctx, rec, Transport::Http).await,
            Workload::W1g => external_drain(ctx, rec, Transport::Grpc).await,
            Workload::W2p => w2p_paced(ctx, rec).await,
            Workload::W2x => w2x_external_pickup(ctx, rec).await,
            Workload::W3 => w3_enqueue(ctx, rec).await,
            Workload::W3g => w3g_enqueue(ctx, rec).await,
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
            grpc: self.grpc.clone(),
            api_key: self.api_key.clone(),
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

    /// Whether `queue` has at least one job in `state` (one index probe).
    async fn has_in(&self, queue: &str, state: JobState) -> anyhow::Result<bool> {
        let page = self
            .control
            .list_jobs(&JobListQuery {
                queue: Some(queue.to_owned()),
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
        self.is_idle_of(self.queue()).await
    }

    /// Whether `queue` has nothing available or running: two index probes, cheap enough to
    /// poll every [`DRAIN_POLL`] without the polling becoming part of what is measured (a
    /// count of every queue's jobs would be).
    async fn is_idle_of(&self, queue: &str) -> anyhow::Result<bool> {
        Ok(!self.has_in(queue, JobState::Available).await?
            && !self.has_in(queue, JobState::Running).await?)
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

    /// Enqueues this workload's job on an open-model schedule of `rate` per second for
    /// `duration` (W2p, W4), under a progress bar `label` counting `what`; returns the
    /// generator's report and who used the cores meanwhile.
    async fn paced_jobs(
        &self,
        label: &str,
        rate: f64,
        duration: Duration,
        what: &'static str,
    ) -> anyhow::Result<(OpenReport, Option<CpuUsage>)> {
        let body = self.job_body()?;
        let cpu = CpuSnapshot::take(self.pid).await;
        let live = Arc::new(AtomicU64::new(0));
        let ticker = self
            .progress
            .timed(label, duration, Arc::clone(&live), what);
        let report = generator::open_loop(
            &self.endpoint,
            jobs_uri(),
            Some(body),
            rate,
            duration,
            self.settings.max_in_flight,
            live,
        )
        .await;
        let cpu = cpu_since(self, cpu).await;
        drop(ticker);
        Ok((report?, cpu))
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
fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2} ms"))
        .unwrap_or_else(|| "-".into())
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
