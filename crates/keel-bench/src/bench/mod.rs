//! `keel bench`: the performance protocol of SPEC §7, as one command.
//!
//! Each run starts a fresh `keel serve` child on a fresh database (a temporary SQLite file,
//! or a scratch schema on the Postgres given by `--database-url`), runs the selected
//! workloads against it over loopback HTTP, stops it, and — on Postgres, when `pgbench` is
//! installed — measures the pgbench reference on the same server. After the runs it prints
//! one table of medians with their spread and issue 4's targets, and writes every run's raw
//! figures as JSON.
//!
//! A fresh server per run keeps the runs independent (no run inherits another's table size
//! or backlog) and makes the start-up time (W5) a per-run figure like the others.
//!
//! Modules: [`crate::generator`] generates HTTP load; [`workloads`] runs W1–W5 with it;
//! [`server`] starts and watches the server under test; [`pgbench`] measures the database's
//! own limit; [`crate::stats`] and [`report`] turn runs into the table and the JSON.

mod machine;
mod pgbench;
mod report;
mod server;
mod workloads;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use keel_client::Client;
use keel_core::QueueName;
use keel_store::DatabaseUrl;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::report::{Backend, RunRecord};
use self::server::{Scratch, ServerSpec, Spawned};
use self::workloads::Ctx;
use crate::generator::Endpoint;
use crate::parse_duration;
use crate::progress::Progress;

/// How long the disk's fdatasync rate is probed before the runs.
const FSYNC_PROBE: Duration = Duration::from_secs(1);

/// One of the workloads of SPEC §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Workload {
    /// Drain: batch-insert N jobs into a paused queue, resume, time until all completed.
    W1,
    /// W1 through external workers: the same jobs in a queue no built-in worker serves,
    /// drained by keel-client's HTTP worker (docs/workers.md) with `--concurrency` slots.
    #[value(name = "w1x")]
    W1x,
    /// W1 through keel-client's gRPC worker (one streaming lease) with 20 slots, against
    /// W1@20.
    #[value(name = "w1g")]
    W1g,
    /// Steady: many HTTP clients enqueue one job per request while workers run them.
    W2,
    /// Paced: the same at a fixed rate (open model), for pickup latency.
    #[value(name = "w2p")]
    W2p,
    /// External pickup: how soon a waiting external worker's lease answers after an
    /// enqueue into its empty queue (the long poll's wakeup), one job at a time.
    #[value(name = "w2x")]
    W2x,
    /// Enqueue only (workers paused): durable enqueues per second and their latency.
    W3,
    /// W3 over gRPC: `JobService/Enqueue` with 64 calls in flight.
    #[value(name = "w3g")]
    W3g,
    /// Overload: offer a multiple of W3's capacity (open model) and watch what holds.
    W4,
    /// Footprint: start-up time and memory.
    W5,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::W1 => "W1",
            Workload::W1x => "W1x",
            Workload::W1g => "W1g",
            Workload::W2 => "W2",
            Workload::W2p => "W2p",
            Workload::W2x => "W2x",
            Workload::W3 => "W3",
            Workload::W3g => "W3g",
            Workload::W4 => "W4",
            Workload::W5 => "W5",
        })
    }
}

/// `keel bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Benchmark on Postgres: each run gets a fresh schema on this server (created, then
    /// dropped). Without it, each run uses a fresh temporary SQLite file.
    #[arg(long, value_name = "URL", conflicts_with = "url")]
    pub database_url: Option<String>,
    /// Serve through this PgBouncer in transaction mode, in front of --database-url's
    /// server (e.g. postgres://postgres@127.0.0.1:6432/postgres): each run gets a fresh
    /// database instead of a schema (a transaction pooler cannot choose a schema), reached
    /// through the pooler with KEEL_DATABASE_POOLER=transaction and LISTEN straight to the
    /// server. The pgbench reference still runs on the server directly.
    #[arg(long, value_name = "URL", requires = "database_url")]
    pub pooler_url: Option<String>,
    /// Benchmark an already running Keel instead of starting one (loopback only). Its queue
    /// --queue must be served there and used by nothing else while the bench runs.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The gRPC address of the --url server (`http://127.0.0.1:50051`), for the gRPC
    /// workloads W1g and W3g (ignored without --url; a started server's is found alone).
    #[arg(long, value_name = "URL", requires = "url")]
    pub grpc_url: Option<String>,
    /// API key for --url, if that server requires one (ignored without --url).
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Pid of the --url server, to read its memory from /proc (W4 peak, W5).
    #[arg(long, value_name = "PID", requires = "url")]
    pub pid: Option<u32>,
    /// Workloads to run, comma-separated (always run in the order w5, w1, w1x, w1g, w2, w2p,
    /// w2x, w3, w3g, w4).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "LIST",
        default_value = "w1,w2,w2p,w3,w4,w5"
    )]
    pub workloads: Vec<Workload>,
    /// Runs; the table reports the median of each figure [default: 3, or 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    pub runs: Option<u32>,
    /// A smoke run: short durations, 10k jobs, one run unless --runs says otherwise.
    #[arg(long)]
    pub quick: bool,
    /// Jobs inserted and drained by W1 [default: 100000, or 10000 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub jobs: Option<u64>,
    /// Length of W2, W2p and W3, e.g. 20s [default: 20s, or 3s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// HTTP connections of the closed-model workloads (W2, W3).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: u64,
    /// W2p's schedule, jobs per second.
    #[arg(long, value_name = "N", default_value_t = 500.0)]
    pub paced_rate: f64,
    /// W4 offers this multiple of the W3 capacity measured in the same run.
    #[arg(long, value_name = "X", default_value_t = 3.0)]
    pub overload_factor: f64,
    /// Length of W4 [default: 30s, or 5s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub overload_duration: Option<Duration>,
    /// Most requests the open-model generator keeps outstanding (W2p, W4); beyond it a
    /// scheduled request is counted as unsent, so the generator itself stays bounded.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub max_in_flight: u64,
    /// Worker concurrency of the bench queue in the server started here.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub concurrency: u64,
    /// The queue the workloads use.
    #[arg(long, value_name = "NAME", default_value = "bench")]
    pub queue: String,
    /// Run W1 and W2 only at --concurrency. By default they also run at 20 workers and at
    /// the default 8 (the settings teams use), each on its own queue of the same server, and
    /// W1 also with 10 ms jobs there.
    #[arg(long)]
    pub no_user_settings: bool,
    /// An extra setting for the server started here, KEY=VALUE (repeatable), e.g.
    /// KEEL_DB_POOL_MAX=32. Inherited KEEL_* variables are not passed on.
    #[arg(long = "server-env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub server_env: Vec<(String, String)>,
    /// Directory for the temporary SQLite database (default: the system temp directory).
    /// Put it on the disk you want measured: SQLite commits with fsync.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Skip the pgbench reference.
    #[arg(long)]
    pub no_pgbench: bool,
    /// Length of each pgbench reference run [default: 10s, or 3s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub pgbench_duration: Option<Duration>,
    /// Where to write the JSON results [default: bench/results/<backend>-<unix-time>.json].
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{k:?} is not an environment variable name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// The options after defaults and `--quick` are applied.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Selected workloads.
    pub(crate) workloads: BTreeSet<Workload>,
    /// Number of runs.
    pub(crate) runs: u32,
    /// Smoke mode.
    pub(crate) quick: bool,
    /// W1 job count.
    pub(crate) jobs: u64,
    /// W2/W2p/W3 length.
    pub(crate) duration: Duration,
    /// Closed-model connections.
    pub(crate) clients: usize,
    /// W2p rate.
    pub(crate) paced_rate: f64,
    /// W4 multiple of capacity.
    pub(crate) overload_factor: f64,
    /// W4 length.
    pub(crate) overload_duration: Duration,
    /// W4 calibration length when W3 is not selected.
    pub(crate) calibration: Duration,
    /// Open-model in-flight bound.
    pub(crate) max_in_flight: usize,
    /// Bench queue concurrency (spawned server).
    pub(crate) concurrency: usize,
    /// Bench queue name.
    pub(crate) queue: String,
    /// Whether W1 and W2 also run at the user settings (`workloads::USER_CONCURRENCIES`).
    pub(crate) user_settings: bool,
    /// Longest wait for a queue to drain.
    pub(crate) drain_timeout: Duration,
    /// pgbench program, when the reference runs.
    pub(crate) pgbench: Option<PathBuf>,
    /// pgbench run length.
    pub(crate) pgbench_duration: Duration,
}

impl Settings {
    fn resolve(a: &BenchArgs, postgres: bool) -> anyhow::Result<Self> {
        let q = a.quick;
        QueueName::parse(a.queue.as_str()).map_err(|e| anyhow::anyhow!("--queue: {e}"))?;
        anyhow::ensure!(
            a.paced_rate.is_finite() && a.paced_rate > 0.0 && a.paced_rate <= 1_000_000.0,
            "--paced-rate must be between 0 and 1000000"
        );
        anyhow::ensure!(
            a.overload_factor.is_finite() && a.overload_factor > 0.0 && a.overload_factor <= 100.0,
            "--overload-factor must be between 0 and 100"
        );
        let pick = |given: Option<Duration>, normal: u64, quick: u64| {
            given.unwrap_or(Duration::from_secs(if q { quick } else { normal }))
        };
        let duration = pick(a.duration, 20, 3);
        let overload_duration = pick(a.overload_duration, 30, 5);
        for (name, d) in [
            ("--duration", duration),
            ("--overload-duration", overload_duration),
        ] {
            anyhow::ensure!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3600),
                "{name} must be between 1s and 1h"
            );
        }
        let pgbench = if postgres && !a.no_pgbench {
            pgbench::find_on_path()
        } else {
            None
        };
        let jobs = a.jobs.unwrap_or(if q { 10_000 } else { 100_000 });
        Ok(Self {
            workloads: a.workloads.iter().copied().collect(),
            runs: a.runs.unwrap_or(if q { 1 } else { 3 }),
            quick: q,
            jobs,
            duration,
            clients: usize::try_from(a.clients).unwrap_or(64),
            paced_rate: a.paced_rate,
            overload_factor: a.overload_factor,
            overload_duration,
            calibration: Duration::from_secs(if q { 2 } else { 5 }),
            max_in_flight: usize::try_from(a.max_in_flight).unwrap_or(4096),
            concurrency: usize::try_from(a.concurrency).unwrap_or(256),
            queue: a.queue.clone(),
            user_settings: !a.no_user_settings,
            // Generous: even 1k jobs/s drains W1's default in well under this.
            drain_timeout: Duration::from_secs(120)
                .max(Duration::from_millis(jobs.saturating_mul(2))),
            pgbench,
            pgbench_duration: pick(a.pgbench_duration, 10, 3),
        })
    }

    fn config_json(&self, a: &BenchArgs) -> serde_json::Value {
        json!({
            "workloads": self.workloads.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "runs": self.runs,
            "quick": self.quick,
            "w1_jobs": self.jobs,
            "duration_s": self.duration.as_secs_f64(),
            "clients": self.clients,
            "paced_rate_per_s": self.paced_rate,
            "overload_factor": self.overload_factor,
            "overload_duration_s": self.overload_duration.as_secs_f64(),
            "max_in_flight": self.max_in_flight,
            "queue": self.queue,
            "concurrency": self.concurrency,
            "user_concurrencies": if self.user_settings {
                workloads::USER_CONCURRENCIES.to_vec()
            } else {
                Vec::new()
            },
            "server_env": a.server_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "target": if a.url.is_some() { "url" } else { "spawned" },
            "pgbench": self.pgbench.as_ref().map(|p| p.display().to_string()),
            "pgbench_duration_s": self.pgbench_duration.as_secs_f64(),
            "pgbench_clients": pgbench::CLIENTS,
        })
    }
}

/// Where the runs go.
enum Target {
    /// Start a server per run on a fresh SQLite file.
    Sqlite { data_dir: Option<PathBuf> },
    /// Start a server per run in a fresh schema of this Postgres, or in a fresh database
    /// reached through the transaction pooler at `pooler_url`.
    Postgres {
        base_url: String,
        pooler_url: Option<String>,
    },
    /// Use a running server.
    External {
        addr: SocketAddr,
        base: String,
        grpc: Option<String>,
        pid: Option<u32>,
    },
}

/// The server or database to benchmark could not be reached (exit code 69, like the other
/// client commands), as opposed to a harness that failed while running.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// How a bench ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every selected workload was measured (targets may still be missed: that is a
    /// result, not a failure).
    Measured,
    /// At least one workload could not be measured.
    Incomplete,
    /// Stopped by Ctrl-C; what was measured so far was still reported.
    Interrupted,
}

/// Runs the benchmark described by `args`: the runs, then the table on stdout and the JSON
/// file. Errors are failures of the harness itself (bad options, a server that cannot
/// start, a file that cannot be written).
pub async fn run(args: BenchArgs) -> anyhow::Result<Outcome> {
    let target = target(&args)?;
    let backend = match &target {
        Target::Sqlite { .. } => Backend::Sqlite,
        Target::Postgres { .. } => Backend::Postgres,
        Target::External { .. } => Backend::External,
    };
    let settings = Settings::resolve(&args, backend == Backend::Postgres)?;
    let progress = Progress;
    let postgres = match &target {
        Target::Postgres { base_url, .. } => {
            Some(server::postgres_server(base_url).await.map_err(|e| {
                anyhow::Error::new(Unreachable(format!(
                    "cannot reach the Postgres given by --database-url: {e:#}"
                )))
            })?)
        }
        Target::External { addr, .. } => {
            let endpoint = Endpoint::new(*addr, args.api_key.as_deref())?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            server::wait_ready(&endpoint, deadline)
                .await
                .map_err(|e| anyhow::Error::new(Unreachable(format!("--url: {e:#}"))))?;
            None
        }
        Target::Sqlite { .. } => None,
    };
    if backend == Backend::Postgres && settings.pgbench.is_none() && !args.no_pgbench {
        progress.note("note: pgbench is not on the PATH: the Postgres reference is skipped");
    }
    // Recorded before anything runs: a busy machine or a slow disk explains low figures
    // better than any profile.
    let load_before = machine::load_average().await;
    if let Some(l) = load_before
        && l > machine::nproc() as f64 / 2.0
    {
        progress.note(&format!(
            "note: the machine is already busy (1-minute load average {l:.2} on {} cores): figures will be lower than on a quiet machine",
            machine::nproc()
        ));
    }
    let probe_dir = match &target {
        Target::Sqlite {
            data_dir: Some(dir),
        } => dir.clone(),
        _ => std::env::temp_dir(),
    };
    let fdatasync = match machine::fdatasync_rate(&probe_dir, FSYNC_PROBE).await {
        Ok(r) => Some(r),
        Err(e) => {
            progress.note(&format!("note: fsync probe failed: {e:#}"));
            None
        }
    };
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);

    // Ctrl-C cancels the run in progress; its server is still stopped and its schema
    // dropped, and what was measured so far is reported.
    let cancel = CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };

    let mut records = Vec::new();
    let mut harness_error = None;
    for run in 1..=settings.runs {
        progress.note(&format!("{} run {run}/{}", backend.as_str(), settings.runs));
        let mut rec = RunRecord {
            run,
            ..RunRecord::default()
        };
        if let Some(l) = machine::load_average().await {
            rec.details.insert("load_average_at_start".into(), json!(l));
        }
        let outcome = one_run(&target, &settings, &args, &mut rec, &cancel, progress).await;
        rec.derive_ratios();
        records.push(rec);
        if let Err(e) = outcome {
            harness_error = Some(e);
            break;
        }
        if cancel.is_cancelled() {
            break;
        }
    }
    watcher.abort();
    let interrupted = cancel.is_cancelled();

    let summaries = report::summarise(backend, &records);
    let title = format!(
        "keel bench · {} · {} of {} run(s){} · medians (min–max) · keel {}",
        backend.as_str(),
        records.len(),
        settings.runs,
        if interrupted { " (interrupted)" } else { "" },
        env!("CARGO_PKG_VERSION"),
    );
    print_table(&report::table(&title, &summaries));
    progress.note(&format!(
        "machine: {} cores · fdatasync of 8 KiB in {}: {} · 1-minute load average before the runs: {}",
        machine::nproc(),
        probe_dir.display(),
        fdatasync
            .map(|r| format!("{r:.0}/s"))
            .unwrap_or_else(|| "not measured".into()),
        load_before
            .map(|l| format!("{l:.2}"))
            .unwrap_or_else(|| "unknown".into()),
    ));
    if let Some(pg) = &postgres {
        progress.note(&format!(
            "postgres: autovacuum {} · shared_buffers {} · synchronous_commit {} · fsync {}{}",
            pg.autovacuum,
            pg.shared_buffers,
            pg.synchronous_commit,
            pg.fsync,
            if pg.autovacuum == "off" {
                " (Keel's maintenance leader vacuums its tables itself, at autovacuum's pace)"
            } else {
                ""
            }
        ));
    }
    for r in &records {
        for e in &r.errors {
            progress.note(&format!("run {}: not measured: {e}", r.run));
        }
        for n in &r.notes {
            progress.note(&format!("run {}: {n}", r.run));
        }
    }

    let doc = json!({
        "tool": "keel bench",
        "keel_version": env!("CARGO_PKG_VERSION"),
        "started_at_unix": started_unix,
        "backend": backend,
        "interrupted": interrupted,
        "machine": machine::describe(postgres.as_ref()).await,
        "fdatasync_per_s": fdatasync,
        "fdatasync_dir": probe_dir.display().to_string(),
        "load_average_before": load_before,
        "config": settings.config_json(&args),
        "runs": records,
        "summary": summaries,
    });
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("bench/results").join(format!("{}-{started_unix}.json", backend.as_str()))
    });
    write_json(&out, &doc).await?;
    progress.note(&format!("results written to {}", out.display()));

    if let Some(e) = harness_error {
        return Err(e);
    }
    Ok(if interrupted {
        Outcome::Interrupted
    } else if records.iter().any(|r| !r.errors.is_empty()) {
        Outcome::Incomplete
    } else {
        Outcome::Measured
    })
}

#[allow(clippy::print_stdout)] // the table is the command's answer
fn print_table(table: &str) {
    println!("{table}");
}

async fn write_json(path: &std::path::Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_vec_pretty(doc).context("encoding the results")?;
    tokio::fs::write(path, text)
        .await
        .with_context(|| format!("writing {}", path.display()))
}

/// The address of `url`, an `http://` base URL on this machine (`option` names it in
/// errors). A benchmark floods its target; it must never be pointed at someone's
/// production server by accident.
fn loopback(option: &str, url: &str) -> anyhow::Result<SocketAddr> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("{option} {url:?} is not a URL"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "{option} must be http:// (the load generators speak plain text on loopback)"
    );
    anyhow::ensure!(
        uri.path().is_empty() || uri.path() == "/",
        "{option} must be the server's base URL, without a path"
    );
    let host = uri
        .host()
        .with_context(|| format!("{option} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("{option} host {host:?} is not an IP address or localhost"))?
    };
    anyhow::ensure!(
        ip.is_loopback(),
        "{option} must be a loopback address (keel bench only loads servers on this machine)"
    );
    Ok(SocketAddr::new(ip, port))
}

/// Works out what to benchmark from the options, before anything starts.
fn target(args: &BenchArgs) -> anyhow::Result<Target> {
    if let Some(url) = &args.url {
        let addr = loopback("--url", url)?;
        let grpc = args
            .grpc_url
            .as_deref()
            .map(|g| loopback("--grpc-url", g).map(|a| format!("http://{a}")))
            .transpose()?;
        return Ok(Target::External {
            addr,
            base: format!("http://{addr}"),
            grpc,
            pid: args.pid,
        });
    }
    match &args.database_url {
        None => Ok(Target::Sqlite {
            data_dir: args.data_dir.clone(),
        }),
        Some(url) => match DatabaseUrl::parse(url) {
            Ok(DatabaseUrl::Postgres(u)) => Ok(Target::Postgres {
                base_url: u,
                pooler_url: match args.pooler_url.as_deref().map(DatabaseUrl::parse) {
                    None => None,
                    Some(Ok(DatabaseUrl::Postgres(pooler))) => Some(pooler),
                    Some(Ok(DatabaseUrl::Sqlite(_))) => {
                        anyhow::bail!("--pooler-url must be a postgres:// URL")
                    }
                    Some(Err(e)) => anyhow::bail!("--pooler-url: {e}"),
                },
            }),
            Ok(DatabaseUrl::Sqlite(_)) => anyhow::bail!(
                "--database-url is for Postgres; SQLite is the default (use --data-dir to choose where its file goes)"
            ),
            Err(e) => anyhow::bail!("--database-url: {e}"),
        },
    }
}

/// One run: a fresh server (unless --url), the workloads, then the pgbench reference.
async fn one_run(
    target: &Target,
    settings: &Settings,
    args: &BenchArgs,
    rec: &mut RunRecord,
    cancel: &CancellationToken,
    progress: Progress,
) -> anyhow::Result<()> {
    match target {
        Target::External {
            addr,
            base,
            grpc,
            pid,
        } => {
            let server = Server {
                addr: *addr,
                base: base.clone(),
                grpc: grpc.clone(),
                api_key: args.api_key.clone(),
                pid: *pid,
                ready_after: None,
            };
            let control = run_workloads(server, settings, rec, cancel, progress).await?;
            // Someone else's server: leave its queue running, as it was found.
            if let Err(e) = control.set_paused(&settings.queue, false).await {
                rec.notes
                    .push(format!("could not resume queue {}: {e}", settings.queue));
            }
            Ok(())
        }
        Target::Sqlite { data_dir } => {
            let dir = server::sqlite_dir(data_dir.as_ref())?;
            let url = format!("sqlite://{}", dir.path().join("bench.db").display());
            let result = with_server(&url, &[], settings, args, rec, cancel, progress).await;
            drop(dir);
            result
        }
        Target::Postgres {
            base_url,
            pooler_url,
        } => {
            let (scratch, url, env) = match pooler_url {
                None => {
                    let scratch = Scratch::schema(base_url, "keel_bench").await?;
                    let url = scratch.url();
                    (scratch, url, Vec::new())
                }
                Some(pooler) => {
                    let scratch = Scratch::database(base_url, "keel_bench").await?;
                    let env = vec![
                        ("KEEL_DATABASE_POOLER".to_owned(), "transaction".to_owned()),
                        ("KEEL_DATABASE_LISTEN_URL".to_owned(), scratch.url()),
                    ];
                    let url = scratch.url_on(pooler);
                    rec.notes.push(format!(
                        "served through the transaction pooler at {}",
                        url.rsplit_once('@')
                            .map_or(pooler.as_str(), |(_, host)| host)
                    ));
                    (scratch, url, env)
                }
            };
            let result = with_server(&url, &env, settings, args, rec, cancel, progress).await;
            let what = scratch.to_string();
            if let Err(e) = scratch.drop_now().await {
                rec.notes.push(format!("could not drop {what}: {e:#}"));
            }
            result?;
            pgbench_reference(base_url, settings, rec, cancel, progress).await;
            Ok(())
        }
    }
}

/// The pgbench reference on the server at `base_url`, into `rec` (unless disabled).
async fn pgbench_reference(
    base_url: &str,
    settings: &Settings,
    rec: &mut RunRecord,
    cancel: &CancellationToken,
    progress: Progress,
) {
    if let Some(program) = &settings.pgbench
        && !cancel.is_cancelled()
    {
        progress.note(&format!(
            "  pgbench reference: 3 scripts × {:?}, {} clients",
            settings.pgbench_duration,
            pgbench::CLIENTS
        ));
        let figures = tokio::select! {
            f = pgbench::run(program, base_url, settings.pgbench_duration) => f,
            () = cancel.cancelled() => Err(anyhow::anyhow!("interrupted")),
        };
        match figures {
            Ok(f) => {
                rec.set("pgbench.lifecycle_minimal_jobs_per_s", f.lifecycle_minimal);
                rec.set("pgbench.lifecycle_keel_jobs_per_s", f.lifecycle_keel);
                rec.set("pgbench.insert_tps", f.insert_tps);
                rec.errors.extend(f.errors);
                progress.note(&format!(
                    "  pgbench lifecycle {:.0} jobs/s (minimal table), {:.0} jobs/s (Keel's table); one-row insert {:.0} tx/s",
                    f.lifecycle_minimal.unwrap_or(0.0),
                    f.lifecycle_keel.unwrap_or(0.0),
                    f.insert_tps.unwrap_or(0.0)
                ));
            }
            Err(e) => rec.errors.push(format!("pgbench: {e:#}")),
        }
    }
}

/// Starts a server on `database_url`, runs the workloads, and stops it whatever happened.
async fn with_server(
    database_url: &str,
    env: &[(String, String)],
    settings: &Settings,
    args: &BenchArgs,
    rec: &mut RunRecord,
    cancel: &CancellationToken,
    progress: Progress,
) -> anyhow::Result<()> {
    let spec = ServerSpec {
        database_url: database_url.to_owned(),
        queue: settings.queue.clone(),
        concurrency: settings.concurrency,
        extra_queues: if settings.user_settings {
            workloads::USER_CONCURRENCIES
                .iter()
                .map(|&n| (workloads::user_queue(&settings.queue, n), n))
                .collect()
        } else {
            Vec::new()
        },
        // The target's settings first: --server-env may override them.
        extra_env: env.iter().cloned().chain(args.server_env.clone()).collect(),
    };
    let server = tokio::select! {
        s = Spawned::start(&spec) => s?,
        () = cancel.cancelled() => anyhow::bail!("interrupted while the server was starting"),
    };
    let target = Server {
        addr: server.addr(),
        base: format!("http://{}", server.addr()),
        grpc: server.grpc().map(|a| format!("http://{a}")),
        api_key: None,
        pid: Some(server.pid()),
        ready_after: Some(server.ready_after),
    };
    run_workloads(target, settings, rec, cancel, progress).await?;
    let warnings = server.warnings();
    if warnings > 0 {
        rec.notes.push(format!(
            "the server logged {warnings} warning/error lines; the last ones:\n{}",
            server.last_lines()
        ));
    }
    match server.stop().await {
        Some(status) if !status.success() => {
            rec.notes.push(format!("the server exited with {status}"));
        }
        Some(_) => {}
        None => rec
            .notes
            .push("the server's exit status could not be read".into()),
    }
    Ok(())
}

/// The server the workloads load, spawned here or found at `--url`.
struct Server {
    addr: SocketAddr,
    /// Its base URL, for the control-plane client.
    base: String,
    /// Its gRPC base URL, when it serves gRPC (the gRPC workloads need it).
    grpc: Option<String>,
    api_key: Option<String>,
    pid: Option<u32>,
    /// Spawn → ready, when the harness started it.
    ready_after: Option<Duration>,
}

/// Runs every workload against `server` until done or cancelled; returns the control-plane
/// client, for whatever the caller tidies up afterwards.
async fn run_workloads(
    server: Server,
    settings: &Settings,
    rec: &mut RunRecord,
    cancel: &CancellationToken,
    progress: Progress,
) -> anyhow::Result<Client> {
    let ctx = Ctx {
        settings,
        endpoint: Endpoint::new(server.addr, server.api_key.as_deref())?,
        control: control_client(&server.base, server.api_key.clone())?,
        pid: server.pid,
        grpc: server.grpc,
        api_key: server.api_key.clone(),
        ready_after: server.ready_after,
        progress,
        queue: settings.queue.clone(),
        job: json!({ "kind": "noop" }),
    };
    tokio::select! {
        () = workloads::run_all(&ctx, rec) => {}
        () = cancel.cancelled() => rec.errors.push("interrupted".into()),
    }
    Ok(ctx.control)
}

fn control_client(base: &str, api_key: Option<String>) -> anyhow::Result<Client> {
    Client::new(base, api_key).map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let mut all = vec!["keel-bench"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().bench
    }

    #[test]
    fn quick_shortens_everything_but_explicit_values_win() {
        let s = Settings::resolve(&parse(&["--quick"]), false).unwrap();
        assert_eq!((s.runs, s.jobs), (1, 10_000));
        assert_eq!(s.duration, Duration::from_secs(3));
        assert_eq!(s.overload_duration, Duration::from_secs(5));
        let s = Settings::resolve(
            &parse(&["--quick", "--runs", "2", "--duration", "4s"]),
            false,
        )
        .unwrap();
        assert_eq!((s.runs, s.duration), (2, Duration::from_secs(4)));
        let s = Settings::resolve(&parse(&[]), false).unwrap();
        assert_eq!((s.runs, s.jobs, s.clients), (3, 100_000, 64));
        assert_eq!(s.workloads.len(), 6);
    }

    #[test]
    fn workloads_and_server_settings_parse() {
        let a = parse(&[
            "--workloads",
            "w1,w2p",
            "--server-env",
            "KEEL_DB_POOL_MAX=32",
        ]);
        assert_eq!(a.workloads, [Workload::W1, Workload::W2p]);
        assert_eq!(a.server_env, [("KEEL_DB_POOL_MAX".into(), "32".into())]);
        assert!(parse_env_pair("NOPE").is_err());
        assert!(parse_env_pair("A B=1").is_err());
    }

    #[test]
    fn only_loopback_servers_are_loaded() {
        let t = target(&parse(&["--url", "http://127.0.0.1:8080"])).unwrap();
        assert!(matches!(t, Target::External { addr, .. } if addr.port() == 8080));
        assert!(target(&parse(&["--url", "http://localhost:9"])).is_ok());
        let err = target(&parse(&["--url", "http://10.0.0.1:8080"]))
            .err()
            .unwrap();
        assert!(err.to_string().contains("loopback"), "{err}");
        assert!(target(&parse(&["--url", "https://127.0.0.1:1"])).is_err());
        assert!(target(&parse(&["--database-url", "sqlite://x.db"])).is_err());
        assert!(matches!(
            target(&parse(&["--database-url", "postgres://u@127.0.0.1/db"])).unwrap(),
            Target::Postgres { .. }
        ));
    }
}
