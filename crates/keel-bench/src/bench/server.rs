//! The Keel under test: a `keel serve` child process on a fresh database, started and
//! stopped by the harness, plus what the harness reads about it from the outside (its
//! resident memory in `/proc`).
//!
//! The child is this very executable (`current_exe() serve`), so `cargo run --release --
//! bench` measures the release build it was started from. It listens on ephemeral loopback
//! ports and announces them in its "keel is serving" log line, which is the only way to
//! learn a port chosen by the kernel.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hyper::{StatusCode, Uri};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::generator::{Conn, Endpoint};

/// Longest the server may take from spawn to a `200` from `/readyz`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is probed while starting: fine enough for a startup measured in
/// tens of milliseconds.
const READY_POLL: Duration = Duration::from_millis(2);
/// The child's shutdown grace: short, because a benchmark server holds no work worth
/// waiting for (a paused backlog is simply abandoned with the database).
const CHILD_GRACE: &str = "5s";
/// How long to wait after SIGTERM before SIGKILL (the grace plus margin).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Server log lines kept to explain a failure.
const LOG_TAIL: usize = 30;

/// Where a started server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Serving {
    /// The HTTP API.
    pub(crate) api: SocketAddr,
    /// The gRPC API, unless switched off.
    pub(crate) grpc: Option<SocketAddr>,
}

/// Extracts the addresses from a `keel serve` JSON log line, if it is the "keel is
/// serving" line (the server logs it once, after binding every listener).
pub(crate) fn parse_serving_line(line: &str) -> Option<Serving> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = v
        .get("message")
        .or_else(|| v.get("fields")?.get("message"))?;
    if message.as_str()? != "keel is serving" {
        return None;
    }
    let field = |name: &str| v.get(name).or_else(|| v.get("fields")?.get(name));
    Some(Serving {
        api: field("addr")?.as_str()?.parse().ok()?,
        grpc: field("grpc_addr")
            .and_then(|a| a.as_str())
            .and_then(|a| a.parse().ok()),
    })
}

/// The last lines the server printed, and how many were warnings or errors.
#[derive(Debug, Default)]
pub(crate) struct LogTail {
    lines: VecDeque<String>,
    warnings: u64,
}

impl LogTail {
    fn push(&mut self, line: String) {
        if line.contains("\"level\":\"WARN\"") || line.contains("\"level\":\"ERROR\"") {
            self.warnings += 1;
        }
        if self.lines.len() == LOG_TAIL {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }
}

/// Reads `stream` line by line until it closes, keeping a tail, and hands the first serving
/// line's address to `addr`. It keeps reading after that so the pipe never fills and blocks
/// the server's logging.
fn drain<R: AsyncRead + Unpin + Send + 'static>(
    stream: R,
    tail: Arc<Mutex<LogTail>>,
    mut addr: Option<oneshot::Sender<Serving>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if addr.is_some()
                && let Some(a) = parse_serving_line(&line)
                && let Some(tx) = addr.take()
            {
                let _ = tx.send(a);
            }
            if let Ok(mut t) = tail.lock() {
                t.push(line);
            }
        }
    })
}

/// How the child is configured beyond its database.
#[derive(Debug, Clone)]
pub(crate) struct ServerSpec {
    /// The job store URL handed to the child.
    pub(crate) database_url: String,
    /// The bench queue and its worker concurrency.
    pub(crate) queue: String,
    /// Workers on the bench queue.
    pub(crate) concurrency: usize,
    /// More queues served, with their workers (the user-setting variants).
    pub(crate) extra_queues: Vec<(String, usize)>,
    /// Extra `KEY=VALUE` settings, applied last.
    pub(crate) extra_env: Vec<(String, String)>,
}

/// A running `keel serve` child.
pub(crate) struct Spawned {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    grpc: Option<SocketAddr>,
    /// From spawn to the first `200` from `/readyz`.
    pub(crate) ready_after: Duration,
    tail: Arc<Mutex<LogTail>>,
    readers: Vec<JoinHandle<()>>,
}

impl Spawned {
    /// Starts the server and waits until it is ready, or fails with its last log lines.
    pub(crate) async fn start(spec: &ServerSpec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the keel executable")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve");
        // The child's settings come from here and nowhere else: a KEEL_* variable left in
        // the caller's shell (a config file, API keys, another database) must not change
        // what is measured.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KEEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KEEL_ADDR", "127.0.0.1:0")
            .env("KEEL_ADMIN_ADDR", "127.0.0.1:0")
            .env("KEEL_GRPC_ADDR", "127.0.0.1:0")
            .env("KEEL_DATABASE_URL", &spec.database_url)
            .env(
                "KEEL_QUEUES",
                std::iter::once((spec.queue.clone(), spec.concurrency))
                    .chain(spec.extra_queues.iter().cloned())
                    .chain([("default".to_owned(), 8)])
                    .map(|(q, n)| format!("{q}:{n}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .env("KEEL_LOG_FORMAT", "json")
            // Quiet, except for the line that carries the bound address.
            .env("KEEL_LOG_LEVEL", "warn,keel::app=info")
            .env("KEEL_SHUTDOWN_GRACE", CHILD_GRACE);
        for (k, v) in &spec.extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C reaches the harness only, which then stops the
            // server itself (SIGTERM, then SIGKILL) and cleans up after it.
            .process_group(0)
            // The last resort if the harness itself panics or is dropped mid-run.
            .kill_on_drop(true);

        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let pid = child
            .id()
            .context("the server exited before its pid could be read")?;
        let tail = Arc::new(Mutex::new(LogTail::default()));
        let (tx, rx) = oneshot::channel();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(drain(out, Arc::clone(&tail), Some(tx)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(drain(err, Arc::clone(&tail), None));
        }

        let deadline = spawned_at + STARTUP_TIMEOUT;
        let addr = tokio::select! {
            a = rx => a.ok(),
            status = child.wait() => {
                // Let the readers collect the last words before reporting them.
                tokio::time::sleep(Duration::from_millis(100)).await;
                anyhow::bail!(
                    "the server exited during startup ({}):\n{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail_text(&tail)
                );
            }
            () = tokio::time::sleep_until(deadline) => None,
        };
        let mut server = Self {
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc: None,
            ready_after: Duration::ZERO,
            tail,
            readers,
        };
        let Some(addr) = addr else {
            let text = tail_text(&server.tail);
            server.stop().await;
            anyhow::bail!(
                "the server did not announce its address within {STARTUP_TIMEOUT:?}:\n{text}"
            );
        };
        server.addr = addr.api;
        server.grpc = addr.grpc;
        match wait_ready(&Endpoint::new(addr.api, None)?, deadline).await {
            Ok(at) => server.ready_after = at.saturating_duration_since(spawned_at),
            Err(e) => {
                let text = tail_text(&server.tail);
                server.stop().await;
                return Err(e.context(format!("the server's last lines:\n{text}")));
            }
        }
        Ok(server)
    }

    /// The API address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gRPC address.
    pub(crate) fn grpc(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// The server's pid (for `/proc`).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// How many warning or error lines the server logged so far.
    pub(crate) fn warnings(&self) -> u64 {
        self.tail.lock().map(|t| t.warnings).unwrap_or(0)
    }

    /// The last lines the server logged.
    pub(crate) fn last_lines(&self) -> String {
        tail_text(&self.tail)
    }

    /// Stops the server: SIGTERM (a graceful stop), then SIGKILL if it has not exited
    /// within [`STOP_TIMEOUT`]. Returns its exit status when it could be read.
    pub(crate) async fn stop(mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        if let Ok(raw) = i32::try_from(self.pid) {
            // ESRCH (already gone) is fine: wait() below reaps it either way.
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                self.child.wait().await.ok()
            }
        };
        for r in self.readers.drain(..) {
            // The pipes close with the process; bounded anyway.
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        status
    }
}

fn tail_text(tail: &Mutex<LogTail>) -> String {
    tail.lock()
        .map(|t| t.lines.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// Probes `/readyz` until it answers `200`, returning the instant it did.
pub(crate) async fn wait_ready(endpoint: &Endpoint, deadline: Instant) -> anyhow::Result<Instant> {
    let mut conn: Option<Conn> = None;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if conn.is_none() {
            match Conn::open(endpoint).await {
                Ok(c) => conn = Some(c),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if let Some(c) = conn.as_mut() {
            match c
                .send_timed(endpoint.request(&Uri::from_static("/readyz"), None))
                .await
            {
                Ok((StatusCode::OK, _)) => return Ok(Instant::now()),
                Ok((status, body)) => {
                    last = format!("{status}: {}", String::from_utf8_lossy(&body));
                }
                Err(e) => {
                    last = format!("{e:#}");
                    conn = None;
                }
            }
        }
        tokio::time::sleep(READY_POLL).await;
    }
    anyhow::bail!(
        "{} was not ready before the deadline (last answer: {last})",
        endpoint.addr()
    )
}

/// Parses the `VmRSS` line of `/proc/<pid>/status` into KiB.
pub(crate) fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(n),
        Some(_) => None,
    }
}

/// The resident memory of `pid`, in KiB.
pub(crate) async fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = tokio::fs::read_to_string(&path)
        .await
        .with_context(|| format!("reading {path}"))?;
    parse_vm_rss_kib(&text).with_context(|| format!("no VmRSS line in {path}"))
}

/// Samples a process's RSS every 100 ms until stopped, keeping the peak.
pub(crate) struct RssSampler {
    stop: CancellationToken,
    task: JoinHandle<u64>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub(crate) fn start(pid: u32) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Ok(kib) = rss_kib(pid).await {
                    peak = peak.max(kib);
                }
            }
            // One last sample, so a short workload still has one.
            if let Ok(kib) = rss_kib(pid).await {
                peak = peak.max(kib);
            }
            peak
        });
        Self { stop, task }
    }

    /// Stops sampling; the peak in KiB (`None` if nothing could be read).
    pub(crate) async fn finish(mut self) -> Option<u64> {
        self.stop.cancel();
        match (&mut self.task).await {
            Ok(0) | Err(_) => None,
            Ok(kib) => Some(kib),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where one run's jobs live on Postgres, so runs never see each other's jobs and the
/// server is left as it was found: a schema of its own, chosen by `search_path` in the
/// connection options; or, for a run through a transaction pooler (which cannot carry
/// options, so cannot choose a schema), a database of its own.
#[derive(Debug)]
pub(crate) struct Scratch {
    kind: ScratchKind,
    name: String,
    /// The server it was created on.
    base: String,
}

#[derive(Debug, Clone, Copy)]
enum ScratchKind {
    Schema,
    Database,
}

impl ScratchKind {
    fn sql_name(self) -> &'static str {
        match self {
            Self::Schema => "SCHEMA",
            Self::Database => "DATABASE",
        }
    }
}

impl std::fmt::Display for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ScratchKind::Schema => "schema",
            ScratchKind::Database => "database",
        };
        write!(f, "{kind} {}", self.name)
    }
}

impl Scratch {
    /// Creates the schema `<prefix>_<random>` on the server at `base`.
    pub(crate) async fn schema(base: &str, prefix: &str) -> anyhow::Result<Self> {
        Self::create(ScratchKind::Schema, base, prefix).await
    }

    /// Creates the database `<prefix>_<random>` on the server at `base`.
    pub(crate) async fn database(base: &str, prefix: &str) -> anyhow::Result<Self> {
        Self::create(ScratchKind::Database, base, prefix).await
    }

    async fn create(kind: ScratchKind, base: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let scratch = Self {
            kind,
            name,
            base: base.to_owned(),
        };
        execute(
            base,
            &format!("CREATE {} {}", kind.sql_name(), scratch.name),
        )
        .await
        .with_context(|| format!("creating {scratch}"))?;
        Ok(scratch)
    }

    /// The URL that works inside it, on the server it was created on.
    pub(crate) fn url(&self) -> String {
        self.url_on(&self.base)
    }

    /// `url` (its server's, or a pooler's in front of that server) reaching it.
    pub(crate) fn url_on(&self, url: &str) -> String {
        match self.kind {
            ScratchKind::Schema => keel_store::postgres_url_with_schema(url, &self.name),
            ScratchKind::Database => keel_store::postgres_url_with_database(url, &self.name),
        }
    }

    /// Drops it and everything in it; a database with whatever is still connected to it
    /// (a pooler's server connections).
    pub(crate) async fn drop_now(self) -> anyhow::Result<()> {
        let how = match self.kind {
            ScratchKind::Schema => "CASCADE",
            ScratchKind::Database => "WITH (FORCE)",
        };
        execute(
            &self.base,
            &format!(
                "DROP {} IF EXISTS {} {how}",
                self.kind.sql_name(),
                self.name
            ),
        )
        .await
        .with_context(|| format!("dropping {self}"))
    }
}

/// Runs `sql` on a short-lived connection to `url`.
pub(crate) async fn execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let client = connect(url).await?;
    client.batch_execute(sql).await.context("running SQL")?;
    Ok(())
}

/// What the Postgres at `--database-url` is, recorded beside the figures: its version, and
/// the settings that change what a job table costs over time.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct PostgresServer {
    pub(crate) version: String,
    /// `on` or `off`. Off, the dead rows every lease and completion leaves are never
    /// cleaned while the bench runs: the workloads after a backlog (W2 after W1, W2p after
    /// both) step over all of them.
    pub(crate) autovacuum: String,
    pub(crate) shared_buffers: String,
    pub(crate) synchronous_commit: String,
    pub(crate) fsync: String,
}

/// Reads [`PostgresServer`] from the server at `url`.
pub(crate) async fn postgres_server(url: &str) -> anyhow::Result<PostgresServer> {
    let client = connect(url).await?;
    let row = client
        .query_one(
            "SELECT version(), current_setting('autovacuum'), current_setting('shared_buffers'), \
             current_setting('synchronous_commit'), current_setting('fsync')",
            &[],
        )
        .await
        .context("reading the server's version and settings")?;
    Ok(PostgresServer {
        version: row.try_get(0)?,
        autovacuum: row.try_get(1)?,
        shared_buffers: row.try_get(2)?,
        synchronous_commit: row.try_get(3)?,
        fsync: row.try_get(4)?,
    })
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres")?;
    // The connection task ends when the client is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A temporary directory for the SQLite file, removed when dropped.
pub(crate) fn sqlite_dir(parent: Option<&PathBuf>) -> anyhow::Result<tempfile::TempDir> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("keel-bench-");
    match parent {
        Some(p) => builder
            .tempdir_in(p)
            .with_context(|| format!("creating a directory in {}", p.display())),
        None => builder.tempdir().context("creating a temporary directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_line_yields_the_bound_address() {
        let line = r#"{"timestamp":"2025-01-01T00:00:00.000Z","level":"INFO","message":"keel is serving","addr":"127.0.0.1:43567","admin_addr":"127.0.0.1:40001","database":"sqlite","queues":["bench:256","default:8"],"target":"keel::app"}"#;
        assert_eq!(
            parse_serving_line(line).map(|s| s.api),
            Some("127.0.0.1:43567".parse().unwrap())
        );
        // Also when the fields are nested (a non-flattened JSON layer).
        let nested =
            r#"{"level":"INFO","fields":{"message":"keel is serving","addr":"127.0.0.1:8080"}}"#;
        assert_eq!(
            parse_serving_line(nested).map(|s| s.api),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_serving_line(r#"{"message":"applied migrations","addr":"127.0.0.1:1"}"#),
            None
        );
        assert_eq!(parse_serving_line("keel is serving on 127.0.0.1:1"), None);
        assert_eq!(
            parse_serving_line(r#"{"message":"keel is serving","addr":"nowhere"}"#),
            None
        );
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tkeel\nVmPeak:\t  900000 kB\nVmRSS:\t   23456 kB\nThreads:\t5\n";
        assert_eq!(parse_vm_rss_kib(status), Some(23_456));
        assert_eq!(parse_vm_rss_kib("Name:\tkeel\n"), None);
    }
}
