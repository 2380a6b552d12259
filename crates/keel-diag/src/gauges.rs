//! Process, runtime and allocator gauges for `/metrics`, refreshed by the binary's gauge
//! loop every few seconds (reading them costs a few `/proc` reads and atomic loads).
//!
//! | metric | what |
//! |---|---|
//! | `keel_runtime_workers` | tokio worker threads |
//! | `keel_runtime_workers_busy` | workers busy on average over the last interval |
//! | `keel_runtime_busy_ratio` | the same as a share of all workers, 0..1 |
//! | `keel_runtime_workers_blocked` | workers inside one poll since the last refresh (see [`crate::polls`]) |
//! | `keel_runtime_global_queue_depth` | tasks waiting in the shared (injection) queue |
//! | `keel_runtime_local_queue_depth` | tasks waiting in the workers' own queues (sum) |
//! | `keel_runtime_blocking_threads` | threads of the blocking pool (SQLite calls, file I/O) |
//! | `keel_runtime_blocking_queue_depth` | blocking calls waiting for a thread |
//! | `keel_allocator_allocated_bytes` | bytes in live allocations (jemalloc) |
//! | `keel_allocator_resident_bytes` | bytes of resident pages jemalloc holds |
//! | `process_resident_memory_bytes` | RSS |
//! | `process_virtual_memory_bytes` | virtual memory size |
//! | `process_open_fds` / `process_max_fds` | open file descriptors and their limit |
//! | `process_threads` | OS threads |
//! | `process_cpu_seconds_total` | user + system CPU time |
//!
//! A busy ratio near 1 with a growing global queue means the workers are saturated (more
//! work than CPU); a busy ratio near 1 with *idle* requests means something blocks the
//! workers (take a CPU profile). A blocking queue that grows means the blocking pool is the
//! bottleneck (SQLite calls waiting for threads). The allocator gauges exist only when
//! jemalloc is the process's allocator; a resident figure far above the allocated one is
//! fragmentation or memory not yet returned to the OS, not live data.

use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use tokio::runtime::Handle;

use crate::allocator;
use crate::polls::Reading;

/// Keeps the runtime and process gauges current. Holds the previous busy-time total, so
/// each [`record`](ProcessGauges::record) reports the busy share of the interval since the
/// last one rather than since the process started.
#[derive(Debug)]
pub struct ProcessGauges {
    runtime: Handle,
    last_busy: Option<(Instant, Duration)>,
    last_polls: Option<Reading>,
}

impl ProcessGauges {
    /// Gauges of the runtime behind `runtime` (and of the process). Describes the metrics
    /// to the recorder, so `/metrics` carries their help text.
    pub fn new(runtime: Handle) -> Self {
        describe();
        Self {
            runtime,
            last_busy: None,
            last_polls: None,
        }
    }

    /// Reads everything and sets the gauges. A reading that fails (no `/proc`, an old
    /// kernel) leaves its gauge as it was: metrics must never fail the server.
    pub fn record(&mut self) {
        self.record_runtime();
        if let Some(stats) = allocator::stats() {
            gauge!("keel_allocator_allocated_bytes").set(stats.allocated as f64);
            gauge!("keel_allocator_resident_bytes").set(stats.resident as f64);
        }
        record_process();
    }

    fn record_runtime(&mut self) {
        let m = self.runtime.metrics();
        let workers = m.num_workers();
        gauge!("keel_runtime_workers").set(workers as f64);
        gauge!("keel_runtime_global_queue_depth").set(m.global_queue_depth() as f64);
        let busy: Duration = (0..workers).map(|w| m.worker_total_busy_duration(w)).sum();
        let now = Instant::now();
        if let Some((then, busy_then)) = self.last_busy.replace((now, busy)) {
            let wall = now.saturating_duration_since(then).as_secs_f64();
            if wall > 0.0 && workers > 0 {
                let busy_workers = busy.saturating_sub(busy_then).as_secs_f64() / wall;
                let busy_workers = busy_workers.min(workers as f64);
                gauge!("keel_runtime_workers_busy").set(busy_workers);
                gauge!("keel_runtime_busy_ratio").set(busy_workers / workers as f64);
            }
        }
        // A worker still inside the poll it was in at the last refresh, seconds ago, is
        // blocked by a task: the runtime is losing a thread (or all of them).
        if let Some(before) = self.last_polls.take()
            && before.is_watched()
        {
            gauge!("keel_runtime_workers_blocked").set(before.blocked_since() as f64);
        }
        self.last_polls = Some(Reading::now(&self.runtime));
        #[cfg(tokio_unstable)]
        {
            let local: usize = (0..workers).map(|w| m.worker_local_queue_depth(w)).sum();
            gauge!("keel_runtime_local_queue_depth").set(local as f64);
            gauge!("keel_runtime_blocking_threads").set(m.num_blocking_threads() as f64);
            gauge!("keel_runtime_blocking_queue_depth").set(m.blocking_queue_depth() as f64);
        }
    }
}

fn describe() {
    describe_gauge!("keel_runtime_workers", "tokio worker threads");
    describe_gauge!(
        "keel_runtime_workers_busy",
        "worker threads busy on average over the last refresh interval"
    );
    describe_gauge!(
        "keel_runtime_busy_ratio",
        "share of worker time spent busy over the last refresh interval, 0..1"
    );
    describe_gauge!(
        "keel_runtime_workers_blocked",
        "worker threads inside the same poll since the last refresh: a task blocking its thread"
    );
    describe_gauge!(
        "keel_runtime_global_queue_depth",
        "tasks waiting in the runtime's shared queue"
    );
    describe_gauge!(
        "keel_runtime_local_queue_depth",
        "tasks waiting in the workers' own queues, summed"
    );
    describe_gauge!(
        "keel_runtime_blocking_threads",
        "threads in the runtime's blocking pool"
    );
    describe_gauge!(
        "keel_runtime_blocking_queue_depth",
        "blocking calls waiting for a blocking-pool thread"
    );
    describe_gauge!(
        "keel_allocator_allocated_bytes",
        metrics::Unit::Bytes,
        "bytes in live allocations, as jemalloc counts them"
    );
    describe_gauge!(
        "keel_allocator_resident_bytes",
        metrics::Unit::Bytes,
        "bytes in resident pages jemalloc holds (live data, metadata, unreturned free pages)"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        metrics::Unit::Bytes,
        "resident set size"
    );
    describe_gauge!(
        "process_virtual_memory_bytes",
        metrics::Unit::Bytes,
        "virtual memory size"
    );
    describe_gauge!("process_open_fds", "open file descriptors");
    describe_gauge!("process_max_fds", "limit on open file descriptors (soft)");
    describe_gauge!("process_threads", "OS threads of the process");
    describe_counter!(
        "process_cpu_seconds_total",
        metrics::Unit::Seconds,
        "user and system CPU time spent, in whole seconds"
    );
}

fn record_process() {
    if let Some(status) = read_status() {
        if let Some(rss) = status.rss_bytes {
            gauge!("process_resident_memory_bytes").set(rss as f64);
        }
        if let Some(vm) = status.virtual_bytes {
            gauge!("process_virtual_memory_bytes").set(vm as f64);
        }
        if let Some(threads) = status.threads {
            gauge!("process_threads").set(threads as f64);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!("process_open_fds").set(fds.count() as f64);
    }
    if let Ok((soft, _hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        gauge!("process_max_fds").set(soft as f64);
    }
    if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
        let secs = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
                + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
        };
        let cpu = secs(usage.user_time()) + secs(usage.system_time());
        // The metrics facade counts in integers: whole seconds, which is plenty for
        // `rate(process_cpu_seconds_total[1m])`.
        counter!("process_cpu_seconds_total").absolute(cpu.as_secs());
    }
}

/// The lines of `/proc/self/status` the gauges use.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProcStatus {
    rss_bytes: Option<u64>,
    virtual_bytes: Option<u64>,
    threads: Option<u64>,
}

fn read_status() -> Option<ProcStatus> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .map(|s| parse_status(&s))
}

fn parse_status(text: &str) -> ProcStatus {
    let kib = |v: &str| {
        v.split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|n| n * 1024)
    };
    let mut status = ProcStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "VmRSS" => status.rss_bytes = kib(value),
            "VmSize" => status.virtual_bytes = kib(value),
            "Threads" => status.threads = value.trim().parse().ok(),
            _ => {}
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_lines_are_read_in_bytes() {
        let text = "Name:\tkeel\nVmSize:\t  123456 kB\nVmRSS:\t   20480 kB\nThreads:\t17\n";
        assert_eq!(
            parse_status(text),
            ProcStatus {
                rss_bytes: Some(20480 * 1024),
                virtual_bytes: Some(123456 * 1024),
                threads: Some(17),
            }
        );
        assert_eq!(parse_status("garbage"), ProcStatus::default());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size_and_threads() {
        let status = read_status().unwrap();
        assert!(status.rss_bytes.unwrap() > 1 << 20, "{status:?}");
        assert!(status.threads.unwrap() >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_share_is_measured_between_two_readings() {
        let mut gauges = ProcessGauges::new(Handle::current());
        gauges.record();
        let first = gauges.last_busy.expect("the first reading is kept");
        // Keep one worker busy for a while.
        tokio::spawn(async {
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        })
        .await
        .unwrap();
        // Workers publish their busy time when they park, a moment after the spin ends.
        let mut second = first;
        let shown = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                gauges.record();
                second = gauges.last_busy.unwrap();
                if second.1.saturating_sub(first.1) >= Duration::from_millis(150) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            shown.is_ok(),
            "the spin's busy time never showed: {first:?} -> {second:?}"
        );
    }
}
