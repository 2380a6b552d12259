//! CPU profiles: where the process spends its CPU time.
//!
//! pprof-rs arms a process-wide interval timer (`ITIMER_PROF`) that delivers `SIGPROF`
//! [`FREQUENCY_HZ`] times per CPU-second consumed; the handler records the interrupted
//! thread's stack. Nothing is sampled, and nothing costs anything, between profiles. The
//! wait for the samples is a `tokio::time::sleep`, so a 30 s profile holds no thread; the
//! symbolization and encoding at the end are CPU work and run on the blocking pool. A
//! client that goes away mid-profile drops the future, which stops the timer at once.
//!
//! Stacks are unwound inside the signal handler with libgcc's unwinder. On glibc 2.35 and
//! later with GCC 12's libgcc (Debian 12, Ubuntu 22.04 and newer) the unwinder finds frame
//! tables with `_dl_find_object`, which takes no lock, so the classic deadlock of unwinding
//! from a signal handler is gone; samples that land inside the libraries in [`BLOCKLIST`]
//! are not unwound at all.

use std::io::Write as _;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use pprof::protos::Message as _;

use crate::DiagError;
use crate::exclusive::Claim;

/// Samples per second of CPU time. 99 rather than 100 so sampling does not run in lockstep
/// with work that wakes every 10 ms, which would be over- or under-counted.
pub const FREQUENCY_HZ: i32 = 99;
/// Profile length when the caller names none (Go's default too).
pub const DEFAULT_SECONDS: u64 = 30;
/// The longest profile accepted: long enough to catch a periodic spike, short enough that
/// a forgotten request cannot keep the profiler (and the one-at-a-time slot) for long.
pub const MAX_SECONDS: u64 = 300;

/// Shared libraries whose frames are never unwound from the signal handler: the C library,
/// the unwinder itself, thread start-up code and the vDSO are where in-signal unwinding
/// can fault or deadlock, so samples that land there are dropped (pprof-rs's advice).
const BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// The flamegraph of a profile without a single sample (an idle process).
const NO_SAMPLES_SVG: &str = concat!(
    r#"<?xml version="1.0" standalone="no"?>"#,
    r#"<svg version="1.1" width="1200" height="60" xmlns="http://www.w3.org/2000/svg">"#,
    r#"<text x="600" y="35" text-anchor="middle" font-family="Verdana" font-size="14">"#,
    "No CPU samples: the process used (almost) no CPU while it was profiled.",
    "</text></svg>"
);

/// Set while a CPU profile is being taken anywhere in the process.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// How a finished profile is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuFormat {
    /// A gzipped pprof `Profile` protobuf, as Go's `/debug/pprof/profile` serves it:
    /// `go tool pprof` and `pprof` read it (top, graphs, flamegraphs, diffs).
    Pprof,
    /// A self-contained interactive flamegraph SVG, for a browser.
    Flamegraph,
}

/// Samples the whole process's CPU use for `duration`, then renders it as `format`.
///
/// Fails with [`DiagError::Busy`] while another CPU profile is being taken in this process.
pub async fn profile(duration: Duration, format: CpuFormat) -> Result<Vec<u8>, DiagError> {
    let claim = Claim::take(
        &PROFILING,
        "a CPU profile is already being taken in this process; retry when it ends",
    )?;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY_HZ)
        .blocklist(&BLOCKLIST)
        .build()
        .map_err(DiagError::failed("starting the CPU profiler"))?;
    tokio::time::sleep(duration).await;
    tokio::task::spawn_blocking(move || {
        // Symbolizing parses debug info (a second or more on a cold cache): blocking work.
        let report = guard.report().build();
        // Stop sampling before rendering, and only then let the next profile start.
        drop(guard);
        drop(claim);
        let rendered = report
            .map_err(DiagError::failed("building the CPU profile"))
            .and_then(|report| render(&report, format));
        crate::symbols::release();
        rendered
    })
    .await
    .map_err(DiagError::failed("symbolizing the CPU profile"))?
}

fn render(report: &pprof::Report, format: CpuFormat) -> Result<Vec<u8>, DiagError> {
    match format {
        CpuFormat::Pprof => {
            let profile = report
                .pprof()
                .map_err(DiagError::failed("encoding the CPU profile"))?;
            gzip(&profile.encode_to_vec())
        }
        // inferno refuses to draw nothing; say so in an SVG rather than fail the request.
        CpuFormat::Flamegraph if report.data.is_empty() => Ok(NO_SAMPLES_SVG.as_bytes().to_vec()),
        CpuFormat::Flamegraph => {
            let mut options = pprof::flamegraph::Options::default();
            options.title = format!(
                "Keel CPU profile: {} s at {} Hz",
                report.timing.duration.as_secs(),
                report.timing.frequency
            );
            let mut svg = Vec::new();
            report
                .flamegraph_with_options(&mut svg, &mut options)
                .map_err(DiagError::failed("rendering the CPU flamegraph"))?;
            Ok(svg)
        }
    }
}

/// Gzips a profile: pprof files are gzipped by convention, and the tools expect it.
pub(crate) fn gzip(bytes: &[u8]) -> Result<Vec<u8>, DiagError> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::default(),
    );
    encoder
        .write_all(bytes)
        .and_then(|()| encoder.finish())
        .map_err(DiagError::failed("compressing the CPU profile"))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::*;

    /// Burns CPU in a function with a name the test can look for.
    #[inline(never)]
    fn keel_diag_test_spin(stop: &AtomicBool) -> u64 {
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        x
    }

    fn decode(gz: &[u8]) -> pprof::protos::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("the profile is gzipped");
        pprof::protos::Profile::decode(raw.as_slice()).expect("the profile is a pprof protobuf")
    }

    // One test, not two: the profiler is per process and tests run in parallel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn profiles_are_pprof_with_the_hot_function_and_one_at_a_time() {
        let stop = Arc::new(AtomicBool::new(false));
        let spinner = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || keel_diag_test_spin(&stop))
        };
        let first = tokio::spawn(profile(Duration::from_secs(1), CpuFormat::Pprof));
        // Wait until the first profile holds the slot, then ask for a second one.
        while !PROFILING.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = profile(Duration::from_secs(1), CpuFormat::Pprof).await;
        assert!(matches!(second, Err(DiagError::Busy(_))), "{second:?}");
        let gz = first.await.unwrap().unwrap();
        let svg = profile(Duration::from_millis(500), CpuFormat::Flamegraph)
            .await
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        let text = String::from_utf8_lossy(&svg);
        assert!(
            text.contains("<svg") && text.contains("keel_diag_test_spin"),
            "{text:.400}"
        );

        let p = decode(&gz);
        assert!(!p.sample.is_empty(), "no samples in a second of spinning");
        let names: Vec<&str> = p
            .function
            .iter()
            .filter_map(|f| p.string_table.get(usize::try_from(f.name).ok()?))
            .map(String::as_str)
            .collect();
        assert!(
            names.iter().any(|n| n.contains("keel_diag_test_spin")),
            "the spinning function is not in the profile: {names:?}"
        );
    }
}
