//! `keel serve` as a real child process, for the tests that need what an in-process app
//! cannot give: SIGKILL at a random moment, a restart on the same database, the process's
//! own RSS.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// How long a child may take to announce its listeners (a cold Postgres connect and the
/// migrations included).
const STARTUP: Duration = Duration::from_secs(60);

/// Most log lines a child keeps for [`KeelProcess::logs`] (the oldest are dropped past it,
/// so a chatty child cannot grow a test's memory without bound).
const KEPT_LOG_LINES: usize = 10_000;

/// A running `keel serve`.
pub struct KeelProcess {
    child: Child,
    pid: u32,
    /// `http://<api addr>`.
    pub base: String,
    /// `http://<admin addr>`.
    pub admin: String,
    /// `http://<gRPC addr>`.
    pub grpc: String,
    /// Its stdout log lines after the announcement, in order.
    logs: Arc<Mutex<Vec<String>>>,
}

/// The API, admin and gRPC addresses from the "keel is serving" JSON log line.
fn serving_addrs(line: &str) -> Option<(String, String, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| {
        v.get(name)
            .or_else(|| v.get("fields")?.get(name))
            .and_then(|a| a.as_str())
            .map(str::to_owned)
    };
    let message = field("message")?;
    (message == "keel is serving").then_some(())?;
    Some((field("addr")?, field("admin_addr")?, field("grpc_addr")?))
}

impl KeelProcess {
    /// Starts `keel serve` on ephemeral loopback ports against `database_url`, with `env`
    /// on top of a quiet JSON log, and waits until it announces its listeners. Its stderr
    /// and every log line after the announcement go to the test's output.
    pub async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.arg("serve");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("KEEL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KEEL_ADDR", "127.0.0.1:0")
            .env("KEEL_GRPC_ADDR", "127.0.0.1:0")
            .env("KEEL_ADMIN_ADDR", "127.0.0.1:0")
            .env("KEEL_DATABASE_URL", database_url)
            .env("KEEL_LOG_FORMAT", "json")
            .env("KEEL_LOG_LEVEL", "warn,keel::app=info")
            .env("KEEL_DB_POOL_MAX", "8");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn keel serve");
        let pid = child.id().expect("child pid");
        let stdout = child.stdout.take().expect("child stdout");
        let (tx, rx) = oneshot::channel();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = Arc::clone(&logs);
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.is_some()
                    && let Some(addrs) = serving_addrs(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addrs);
                } else if tx.is_none() {
                    eprintln!("[keel {pid}] {line}");
                    let mut kept = kept.lock().unwrap();
                    if kept.len() == KEPT_LOG_LINES {
                        kept.remove(0);
                    }
                    kept.push(line);
                }
            }
        });
        let (api, admin, grpc) = tokio::time::timeout(STARTUP, rx)
            .await
            .expect("keel did not announce its listeners in time")
            .expect("keel exited before announcing its listeners");
        Self {
            child,
            pid,
            base: format!("http://{api}"),
            admin: format!("http://{admin}"),
            grpc: format!("http://{grpc}"),
            logs,
        }
    }

    /// The `message` of every log line since the announcement, in order.
    pub fn log_messages(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v.get("message")
                    .or_else(|| v.get("fields")?.get("message"))
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Absolute URL of `path` on the API listener.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL: no cleanup, no flush, no goodbye — a crash.
    pub async fn kill9(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// Sends `signal` (SIGTERM or SIGINT for a graceful stop).
    pub fn signal(&self, signal: Signal) {
        kill(
            Pid::from_raw(i32::try_from(self.pid).expect("pid fits i32")),
            signal,
        )
        .expect("signal the child");
    }

    /// Waits for the exit status, SIGKILLing the child after `limit` (then `None`).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// SIGTERM, then waits for the exit status (SIGKILL after `limit`, then `None`).
    #[must_use = "a test that stops Keel should check it stopped cleanly (see `stop`)"]
    pub async fn terminate(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait_exit(limit).await
    }

    /// SIGTERM, and asserts a clean exit (status 0) within `limit` (G6).
    pub async fn stop(self, limit: Duration) {
        let pid = self.pid;
        let status = self.terminate(limit).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "keel {pid} did not stop cleanly after SIGTERM: {status:?}"
        );
    }
}

/// Resident memory of process `pid` now, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
