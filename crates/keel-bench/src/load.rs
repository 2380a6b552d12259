//! `keel load`: an HTTP load generator aimed at a running Keel — the seed's "load testing
//! and chaos" experiments made repeatable.
//!
//! Two models, the same as `keel bench` uses (it shares the generator):
//! - **open** (`--rate N`): requests leave on a fixed schedule whatever the server does, as
//!   independent users would. This is the model in which overload is real: a slow server
//!   does not slow its load down. Latency is measured from each request's *scheduled*
//!   instant, so stalls are charged to every request they delay (no coordinated omission).
//! - **closed** (`--concurrency N`): N connections, each sending its next request when the
//!   previous one is answered. It measures capacity.
//!
//! The summary gives the status codes, the goodput, and HDR latency quantiles (p50, p90,
//! p99, p99.9, max) of the accepted (2xx) answers and, separately, of the shed ones (429 and
//! 503): shedding only helps when it is fast. `--json` writes the same figures for scripts.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use hyper::Uri;
use serde_json::json;

use crate::generator::{self, Endpoint, Tally};
use crate::parse_duration;
use crate::progress::Progress;
use crate::stats::Latency;

/// Most requests the open model keeps outstanding unless told otherwise: bounds the
/// generator's own memory when the server stops answering.
const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// `keel load` arguments.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Base URL of the Keel API (plain HTTP).
    #[arg(long, env = "KEEL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key, if the server requires one.
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Open model: requests per second on a fixed schedule.
    #[arg(long, conflicts_with = "concurrency", value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Closed model: connections sending back to back [default: 64 when --rate is absent].
    #[arg(long, value_name = "CONNECTIONS")]
    pub concurrency: Option<usize>,
    /// How long to send, e.g. 30s or 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Request path (and query).
    #[arg(long, default_value = "/v1/jobs")]
    pub path: String,
    /// JSON body to POST; `--get` sends GETs without a body instead.
    #[arg(long, default_value = r#"{"kind":"noop"}"#)]
    pub body: String,
    /// Send GET requests (no body).
    #[arg(long)]
    pub get: bool,
    /// Open model: most requests outstanding at once; requests due beyond it are counted as
    /// not sent.
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Also write the summary as JSON to this file (`-` for stdout, replacing the table).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// The target could not be reached at all (exit code 69 rather than 2).
#[derive(Debug, Clone, Copy)]
pub struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server could not be reached")
    }
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadSummary {
    /// `open` or `closed`.
    pub model: &'static str,
    /// Requests the open schedule held (closed: requests sent).
    pub scheduled: u64,
    /// Open model: requests not sent because `max_in_flight` were outstanding.
    pub unsent: u64,
    /// Open model: requests that left more than 10 ms after their scheduled instant.
    pub late: u64,
    /// Answers and their latencies.
    tally: Tally,
    /// From the first request to the last answer.
    pub elapsed: Duration,
}

impl LoadSummary {
    /// 2xx answers.
    pub fn ok(&self) -> u64 {
        self.tally.ok
    }

    /// 429 and 503 answers.
    pub fn shed(&self) -> u64 {
        self.tally.shed
    }

    fn quantiles(l: &Latency) -> serde_json::Value {
        json!({
            "count": l.count(),
            "p50_ms": l.quantile_ms(0.50),
            "p90_ms": l.quantile_ms(0.90),
            "p99_ms": l.quantile_ms(0.99),
            "p999_ms": l.quantile_ms(0.999),
            "max_ms": l.max_ms(),
        })
    }

    /// The summary as JSON (what `--json` writes).
    pub fn to_json(&self, args: &LoadArgs) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        json!({
            "url": args.url,
            "path": args.path,
            "method": if args.get { "GET" } else { "POST" },
            "model": self.model,
            "rate": args.rate,
            "concurrency": args.concurrency,
            "duration_s": args.duration.as_secs_f64(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "scheduled": self.scheduled,
            "unsent": self.unsent,
            "late": self.late,
            "ok": self.tally.ok,
            "shed": self.tally.shed,
            "other_status": self.tally.other_status,
            "failed": self.tally.failed,
            "goodput_per_s": self.tally.ok as f64 / secs,
            "statuses": self.tally.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "latency_ok": Self::quantiles(&self.tally.latency),
            "latency_shed": Self::quantiles(&self.tally.shed_latency),
            "first_error": self.tally.first_error,
        })
    }

    /// The human summary (what stdout gets without `--json -`).
    pub fn render(&self, args: &LoadArgs) -> String {
        let secs = self.elapsed.as_secs_f64().max(f64::EPSILON);
        let t = &self.tally;
        let method = if args.get { "GET" } else { "POST" };
        let shape = match (self.model, args.rate) {
            ("open", Some(rate)) => format!("open model, {rate} req/s"),
            _ => format!(
                "closed model, {} connections",
                args.concurrency.unwrap_or(64)
            ),
        };
        let statuses = t
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(" · ");
        let requests = if self.model == "open" {
            format!(
                "{} scheduled · {} not sent (generator at {} in flight) · {} late",
                self.scheduled, self.unsent, args.max_in_flight, self.late
            )
        } else {
            format!("{} sent", self.scheduled)
        };
        let mut out = format!(
            "keel load · {method} {} · {shape} · {:.1} s\n\
             requests   {requests}\n\
             answers    {} 2xx · {} shed (429/503) · {} other status · {} failed (no answer)\n\
             statuses   {}\n\
             goodput    {:.1} 2xx/s\n",
            args.path,
            self.elapsed.as_secs_f64(),
            t.ok,
            t.shed,
            t.other_status,
            t.failed,
            if statuses.is_empty() {
                "-".to_owned()
            } else {
                statuses
            },
            t.ok as f64 / secs,
        );
        let from = if self.model == "open" {
            "from schedule"
        } else {
            "from send"
        };
        for (name, l) in [("2xx", &t.latency), ("shed", &t.shed_latency)] {
            if l.count() == 0 {
                continue;
            }
            let q = |q: f64| {
                l.quantile_ms(q)
                    .map_or("-".to_owned(), |v| format!("{v:.2}"))
            };
            out.push_str(&format!(
                "latency    {name} ({from}), ms: p50 {} · p90 {} · p99 {} · p99.9 {} · max {}\n",
                q(0.50),
                q(0.90),
                q(0.99),
                q(0.999),
                l.max_ms().map_or("-".to_owned(), |v| format!("{v:.2}")),
            ));
        }
        if let Some(e) = &t.first_error {
            out.push_str(&format!("first error {e}\n"));
        }
        out
    }
}

/// Resolves `url` (http only) to the address to connect to.
async fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "only http:// URLs are supported (got {url:?}); put a TLS-terminating proxy in front for https"
    );
    let host = uri.host().with_context(|| format!("{url:?} has no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    tokio::net::lookup_host((host.trim_matches(|c| c == '[' || c == ']'), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

/// Runs the load described by `args`; errors when the target cannot be reached at all.
pub async fn run(args: &LoadArgs) -> anyhow::Result<LoadSummary> {
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of requests per second"
        );
    }
    anyhow::ensure!(args.max_in_flight > 0, "--max-in-flight must be at least 1");
    anyhow::ensure!(
        !args.duration.is_zero(),
        "--duration must be longer than zero"
    );
    let path: Uri = args
        .path
        .parse()
        .with_context(|| format!("--path {:?} is not a valid request path", args.path))?;
    anyhow::ensure!(
        path.scheme().is_none() && args.path.starts_with('/'),
        "--path must be a path such as /v1/jobs, not a URL"
    );
    let body = if args.get {
        None
    } else {
        serde_json::from_str::<serde_json::Value>(&args.body)
            .with_context(|| "--body is not valid JSON")?;
        Some(Bytes::from(args.body.clone()))
    };
    let addr = resolve(&args.url).await?;
    let endpoint = Endpoint::new(addr, args.api_key.as_deref())?;
    // One connection first, so an absent server is one clear error, not a run of failures.
    drop(
        generator::Conn::open(&endpoint)
            .await
            .map_err(|e| e.context(Unreachable))?,
    );
    let live = Arc::new(AtomicU64::new(0));
    let progress = Progress;
    let summary = if let Some(rate) = args.rate {
        let _ticker = progress.timed("load", args.duration, Arc::clone(&live), "2xx");
        let r = generator::open_loop(
            &endpoint,
            path,
            body,
            rate,
            args.duration,
            args.max_in_flight,
            live,
        )
        .await?;
        LoadSummary {
            model: "open",
            scheduled: r.scheduled,
            unsent: r.unsent,
            late: r.late,
            tally: r.tally,
            elapsed: r.elapsed,
        }
    } else {
        let clients = args.concurrency.unwrap_or(64);
        anyhow::ensure!(clients > 0, "--concurrency must be at least 1");
        let _ticker = progress.timed("load", args.duration, Arc::clone(&live), "2xx");
        let r = generator::closed_loop(&endpoint, path, body, clients, args.duration, live).await?;
        let sent = r.tally.ok + r.tally.shed + r.tally.other_status + r.tally.failed;
        LoadSummary {
            model: "closed",
            scheduled: sent,
            unsent: 0,
            late: 0,
            tally: r.tally,
            elapsed: r.elapsed,
        }
    };
    Ok(summary)
}

/// Prints the summary (and writes the JSON) as `args` asks.
pub fn report(args: &LoadArgs, summary: &LoadSummary) -> anyhow::Result<()> {
    let json_to_stdout = args.json.as_deref() == Some(std::path::Path::new("-"));
    if let Some(path) = args.json.as_deref().filter(|_| !json_to_stdout) {
        let text = serde_json::to_string_pretty(&summary.to_json(args))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    if json_to_stdout {
        writeln!(
            stdout,
            "{}",
            serde_json::to_string_pretty(&summary.to_json(args))?
        )?;
    } else {
        write!(stdout, "{}", summary.render(args))?;
    }
    Ok(())
}
