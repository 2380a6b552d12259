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
            () = tokio::time::sleep(Duration::from_millis(ms)) => {
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
