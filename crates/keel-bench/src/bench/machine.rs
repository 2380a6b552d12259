//! The machine the figures were measured on. Throughput on a 2-core box depends on what
//! else runs there and on how fast the disk makes a write durable, so both are recorded
//! next to the figures: without them, a figure cannot be compared with another machine's.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::server::PostgresServer;

/// What the machine is: cores, memory, CPU, kernel, and the Postgres server benchmarked.
pub(crate) async fn describe(postgres: Option<&PostgresServer>) -> Value {
    let mem_total_mib = read("/proc/meminfo").await.and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kib| kib / 1024)
    });
    let cpu = read("/proc/cpuinfo").await.and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let kernel = read("/proc/sys/kernel/osrelease")
        .await
        .map(|s| s.trim().to_owned());
    json!({
        "nproc": nproc(),
        "mem_total_mib": mem_total_mib,
        "cpu": cpu,
        "kernel": kernel,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "postgres_version": postgres.map(|p| &p.version),
        "postgres": postgres,
    })
}

/// Cores available to this process.
pub(crate) fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

async fn read(path: &str) -> Option<String> {
    tokio::fs::read_to_string(path).await.ok()
}

/// The 1-minute load average, if the kernel reports one.
pub(crate) async fn load_average() -> Option<f64> {
    read("/proc/loadavg")
        .await
        .as_deref()
        .and_then(parse_load_average)
}

/// The first field of `/proc/loadavg`.
pub(crate) fn parse_load_average(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// How many 8 KiB overwrite + `fdatasync` cycles per second a file in `dir` sustains for
/// `duration` (what `pg_test_fsync` reports as "fdatasync, one 8kB write"): the ceiling of
/// commits per second for anything that flushes each commit, and the first number to
/// compare when figures differ between machines.
pub(crate) async fn fdatasync_rate(dir: &Path, duration: Duration) -> anyhow::Result<f64> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = tempfile::Builder::new()
            .prefix("keel-bench-fsync-")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        let block = [0x5au8; 8192];
        file.write_all(&block).context("writing the probe file")?;
        file.as_file()
            .sync_all()
            .context("syncing the probe file")?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration {
            file.as_file()
                .write_at(&block, 0)
                .context("writing the probe file")?;
            file.as_file()
                .sync_data()
                .context("fdatasync of the probe file")?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .await
    .context("the fsync probe panicked")?
}

/// Clock ticks per second of the CPU times in `/proc` (`USER_HZ`: 100 on every Linux
/// architecture Keel runs on; the kernel keeps it fixed for userspace compatibility).
const USER_HZ: f64 = 100.0;

/// CPU time spent so far: by the whole machine, by this process (the harness and its load
/// generator) and by the server. Two snapshots bracket a workload and tell who used the
/// cores during it — on a machine shared by Postgres, the server and the load generator,
/// the first question about any figure.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSnapshot {
    busy: u64,
    total: u64,
    harness: u64,
    server: Option<u64>,
    postgres: Option<u64>,
}

/// Cores used on average between two snapshots.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct CpuUsage {
    /// All processes (out of `nproc`).
    pub(crate) machine_cores: f64,
    /// The harness: load generator, control calls, progress.
    pub(crate) harness_cores: f64,
    /// The Keel server.
    pub(crate) server_cores: Option<f64>,
    /// Local processes named `postgres` (the server and its backends), when there are any.
    pub(crate) postgres_cores: Option<f64>,
    /// Everything else: other processes, kernel work not charged to a process.
    pub(crate) other_cores: Option<f64>,
}

impl CpuSnapshot {
    /// Reads the counters now; `None` without `/proc`.
    pub(crate) async fn take(server: Option<u32>) -> Option<Self> {
        let (busy, total) = parse_proc_stat(&read("/proc/stat").await?)?;
        let harness = parse_pid_cpu_ticks(&read("/proc/self/stat").await?)?;
        let server = match server {
            Some(pid) => read(&format!("/proc/{pid}/stat"))
                .await
                .as_deref()
                .and_then(parse_pid_cpu_ticks),
            None => None,
        };
        Some(Self {
            busy,
            total,
            harness,
            server,
            postgres: postgres_ticks().await,
        })
    }

    /// The average use of the cores from `self` to `later`.
    pub(crate) fn usage_until(&self, later: &Self) -> Option<CpuUsage> {
        let total = later.total.checked_sub(self.total)?;
        if total == 0 {
            return None;
        }
        // /proc/stat counts ticks summed over all CPUs, so busy/total × nproc is cores.
        let cores = nproc() as f64;
        let wall = total as f64 / cores / USER_HZ;
        let machine = later.busy.saturating_sub(self.busy) as f64 / total as f64 * cores;
        let harness = later.harness.saturating_sub(self.harness) as f64 / USER_HZ / wall;
        let server = match (self.server, later.server) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / USER_HZ / wall),
            _ => None,
        };
        let postgres = match (self.postgres, later.postgres) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / USER_HZ / wall),
            _ => None,
        };
        Some(CpuUsage {
            machine_cores: machine,
            harness_cores: harness,
            server_cores: server,
            postgres_cores: postgres,
            other_cores: server.map(|s| (machine - harness - s - postgres.unwrap_or(0.0)).max(0.0)),
        })
    }
}

/// CPU ticks of every process named `postgres` on this machine (`None` when there is
/// none: a remote or absent database). A backend that exits between two snapshots takes
/// its ticks with it; Keel's pooled connections live for the whole run, so that is rare.
async fn postgres_ticks() -> Option<u64> {
    let mut dir = tokio::fs::read_dir("/proc").await.ok()?;
    let (mut sum, mut found) = (0u64, false);
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(text) = read(&format!("/proc/{pid}/stat")).await else {
            continue;
        };
        if parse_pid_name(&text) == Some("postgres")
            && let Some(t) = parse_pid_cpu_ticks(&text)
        {
            sum += t;
            found = true;
        }
    }
    found.then_some(sum)
}

/// The command name of a `/proc/<pid>/stat` line (between the first `(` and the last `)`).
pub(crate) fn parse_pid_name(text: &str) -> Option<&str> {
    text.get(text.find('(')? + 1..text.rfind(')')?)
}

/// Busy and total ticks from the aggregate `cpu` line of `/proc/stat`.
pub(crate) fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v.as_slice().try_into().ok()?;
    let busy = user + nice + system + irq + softirq + steal;
    Some((busy, busy + idle + iowait))
}

/// utime + stime of a process from its `/proc/<pid>/stat` line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_pid_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_counters_are_parsed() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((160, 1000)));
        let pid =
            "4242 (keel (bench)) S 1 4242 4242 0 -1 4194304 100 0 0 0 730 120 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_pid_cpu_ticks(pid), Some(850));
        assert_eq!(parse_pid_cpu_ticks("garbage"), None);
        assert_eq!(parse_pid_name(pid), Some("keel (bench)"));
    }

    #[test]
    fn the_load_average_is_the_first_field() {
        assert_eq!(
            parse_load_average("0.52 0.58 0.59 1/190 4242\n"),
            Some(0.52)
        );
        assert_eq!(parse_load_average(""), None);
    }
}
