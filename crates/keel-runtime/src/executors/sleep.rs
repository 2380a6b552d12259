use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Handler, JobContext, JobError, json_result};

/// `sleep`: waits `ms` milliseconds, then succeeds with `{"slept_ms": ms}`.
///
/// Args: `{"ms": u64}`, at most 24 h (the longest job timeout). Stands in for a slow job
/// in tests and demos of timeouts, cancellation and graceful shutdown: when the job's
/// cancellation token fires it stops at once with a retryable error.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sleep;

/// Longest accepted sleep: the longest job timeout.
const MAX_MS: u64 = 24 * 3600 * 1000;

/// Sleeps shorter than this use a timer of their own (Linux's timerfd), which fires within
/// microseconds of the deadline. Tokio's timer counts whole milliseconds and overshoots: 20
/// concurrent 10 ms sleeps on the 2-core bench machine lasted 11.13 ms on average with
/// `tokio::time::sleep`, 10.08–10.16 ms with a timerfd. That is 11 % of a 10 ms job, which
/// `keel bench`'s W1 10 ms variant would count against Keel's own overhead between jobs.
/// From a second on the overshoot is under 0.1 %, and a long sleep holds no descriptor.
const PRECISE_BELOW: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct Args {
    ms: u64,
}

/// The milliseconds to sleep, or what is wrong with the args.
fn parse(args: &RawValue) -> Result<u64, String> {
    let Args { ms } = serde_json::from_str(args.get())
        .map_err(|e| format!("args must be {{\"ms\": N}} with N a whole number from 0: {e}"))?;
    if ms > MAX_MS {
        return Err(format!("ms must be at most {MAX_MS} (24 h), got {ms}"));
    }
    Ok(ms)
}

#[async_trait]
impl Handler for Sleep {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let ms = parse(&ctx.job.args)
            .map_err(|e| JobError::permanent(format!("invalid args for a sleep job: {e}")))?;
        let started = tokio::time::Instant::now();
        tokio::select! {
            () = sleep(started, Duration::from_millis(ms)) => {
                json_result(&serde_json::json!({ "slept_ms": ms }))
            }
            () = ctx.cancel.cancelled() => Err(JobError::retry(format!(
                "sleep cancelled after {} of {ms} ms",
                started.elapsed().as_millis()
            ))),
        }
    }

    fn check_args(&self, args: &RawValue) -> Result<(), String> {
        parse(args).map(|_| ())
    }
}

/// Waits until `started + length`: precisely when it is short (on Linux), else on Tokio's
/// timer, which is also the fallback when no timerfd can be had (out of descriptors).
async fn sleep(started: tokio::time::Instant, length: Duration) {
    #[cfg(target_os = "linux")]
    if length < PRECISE_BELOW {
        match timerfd::sleep(length).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "no timerfd for a sleep job; using tokio's timer")
            }
        }
    }
    tokio::time::sleep_until(started + length).await;
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::os::fd::{AsFd, AsRawFd, RawFd};
    use std::time::Duration;

    use nix::errno::Errno;
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    /// nix's timer as Tokio's reactor wants it (`AsRawFd`; nix offers `AsFd`).
    struct Timer(TimerFd);

    impl AsRawFd for Timer {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_fd().as_raw_fd()
        }
    }

    /// Waits `length` on a one-shot monotonic timerfd watched by Tokio's reactor. Dropping
    /// the future (a cancelled job) deregisters and closes the descriptor.
    pub(super) async fn sleep(length: Duration) -> std::io::Result<()> {
        // A zero expiration would disarm the timer rather than fire it.
        if length.is_zero() {
            return Ok(());
        }
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        timer.set(
            Expiration::OneShot(TimeSpec::from_duration(length)),
            TimerSetTimeFlags::empty(),
        )?;
        // Deprecated because a type whose `as_raw_fd` could change or close its descriptor
        // would make registration unsound; `Timer` owns its timerfd and returns the same
        // open descriptor until it is dropped, after the `AsyncFd` deregistered it. The
        // replacement is `unsafe`, which the workspace forbids.
        #[allow(deprecated)]
        let timer = AsyncFd::with_interest(Timer(timer), Interest::READABLE)?;
        loop {
            let mut ready = timer.readable().await?;
            // Reads the expiration count; EAGAIN means the readiness was stale.
            match ready.get_inner().0.wait() {
                Ok(()) => return Ok(()),
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executors::test_support::ctx;

    #[test]
    fn args_are_checked_at_enqueue() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(Sleep.check_args(&raw(r#"{"ms": 5}"#)), Ok(()));
        for bad in [
            r#"{"ms": -1}"#,
            r#"{"ms": 1.5}"#,
            "{}",
            "[]",
            r#"{"ms": 86400001}"#,
        ] {
            assert!(Sleep.check_args(&raw(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn sleeps_then_reports() {
        let out = Sleep.run(ctx("sleep", r#"{"ms": 5}"#, 1)).await.unwrap();
        assert_eq!(out.unwrap().get(), r#"{"slept_ms":5}"#);
    }

    /// A sleep job never ends early, short (timerfd) or not, and many run at once.
    #[tokio::test]
    async fn lasts_at_least_its_length() {
        for ms in [0_u64, 1, 7, 20] {
            let before = std::time::Instant::now();
            let out = Sleep
                .run(ctx("sleep", &format!(r#"{{"ms": {ms}}}"#), 1))
                .await
                .unwrap();
            assert!(before.elapsed() >= Duration::from_millis(ms), "{ms} ms");
            assert_eq!(out.unwrap().get(), format!(r#"{{"slept_ms":{ms}}}"#));
        }
        let before = std::time::Instant::now();
        let all: Vec<_> = (0..200)
            .map(|_| tokio::spawn(async { Sleep.run(ctx("sleep", r#"{"ms": 15}"#, 1)).await }))
            .collect();
        for job in all {
            assert!(job.await.unwrap().is_ok());
        }
        assert!(before.elapsed() >= Duration::from_millis(15));
    }

    #[tokio::test]
    async fn stops_early_when_cancelled() {
        let c = ctx("sleep", r#"{"ms": 600000}"#, 1);
        c.cancel.cancel();
        let err = Sleep.run(c).await.unwrap_err();
        assert!(!err.permanent);
        assert!(err.message.contains("cancelled"), "{err}");
    }

    #[tokio::test]
    async fn bad_args_are_permanent() {
        for args in [r#"{"ms": -1}"#, r#"{}"#, r#""x""#, r#"{"ms": 86400001}"#] {
            let err = Sleep.run(ctx("sleep", args, 1)).await.unwrap_err();
            assert!(err.permanent, "{args}: {err}");
            assert!(err.message.contains("sleep"), "{args}: {err}");
        }
    }
}
