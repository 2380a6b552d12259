//! Progress on stderr while workloads run (stdout carries only the final table, so it can
//! be redirected). indicatif draws only on a terminal; on a pipe (`make bench | tee`) the
//! bars stay silent and the one-line summaries after each workload are what shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Hands out bars and prints notes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress;

impl Progress {
    /// A bar counting `len` items (jobs inserted, jobs drained).
    pub(crate) fn counted(self, prefix: &str, len: u64) -> ProgressBar {
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg} ({elapsed})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(prefix.to_owned());
        bar
    }

    /// A bar filling over `duration`, showing `live` (e.g. accepted requests) as it counts.
    /// The bar is cleared when the returned guard is dropped.
    pub(crate) fn timed(
        self,
        prefix: &str,
        duration: Duration,
        live: Arc<AtomicU64>,
        what: &'static str,
    ) -> Ticker {
        let total_ms = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let bar = ProgressBar::new(total_ms);
        if let Ok(style) = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(prefix.to_owned());
        let shown = bar.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                shown.set_position(ms.min(total_ms));
                shown.set_message(format!(
                    "{:.1}/{:.0} s · {} {what}",
                    elapsed.as_secs_f64(),
                    duration.as_secs_f64(),
                    live.load(Ordering::Relaxed)
                ));
            }
        });
        Ticker { bar, task }
    }

    /// A line on stderr that stays (a workload's summary, a warning).
    pub(crate) fn note(self, line: &str) {
        eprintln!("{line}");
    }
}

/// Keeps a timed bar moving; clears it when dropped.
pub(crate) struct Ticker {
    bar: ProgressBar,
    task: JoinHandle<()>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
