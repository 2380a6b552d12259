use async_trait::async_trait;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Handler, JobContext, JobError, json_result};

/// `fail`: fails its first `times` attempts, then succeeds with `{"attempts": n}`.
///
/// Args: `{"times": u32, "permanent": bool}` (`permanent` optional, default `false`). While
/// `attempt <= times` it fails with a message naming the attempt; retryable unless
/// `permanent` is true, in which case the job is discarded at once. Exercises retries,
/// backoff and the errors history end to end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fail;

#[derive(Deserialize)]
struct Args {
    times: u32,
    #[serde(default)]
    permanent: bool,
}

#[async_trait]
impl Handler for Fail {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let Args { times, permanent } = ctx.args()?;
        let attempt = ctx.job.attempt;
        if attempt <= times {
            let message = format!("planned failure on attempt {attempt} of {times}");
            return Err(if permanent {
                JobError::permanent(message)
            } else {
                JobError::retry(message)
            });
        }
        json_result(&serde_json::json!({ "attempts": attempt }))
    }

    fn check_args(&self, args: &RawValue) -> Result<(), String> {
        serde_json::from_str::<Args>(args.get())
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "args must be {{\"times\": N, \"permanent\": BOOL}} with N a whole number \
                 from 0 (permanent optional): {e}"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executors::test_support::ctx;

    #[tokio::test]
    async fn fails_the_planned_attempts_then_succeeds() {
        for attempt in 1..=2 {
            let err = Fail
                .run(ctx("fail", r#"{"times": 2}"#, attempt))
                .await
                .unwrap_err();
            assert!(!err.permanent);
            assert!(err.message.contains(&format!("attempt {attempt}")), "{err}");
        }
        let ok = Fail.run(ctx("fail", r#"{"times": 2}"#, 3)).await.unwrap();
        assert_eq!(ok.unwrap().get(), r#"{"attempts":3}"#);
    }

    #[tokio::test]
    async fn permanent_failures_are_permanent() {
        let err = Fail
            .run(ctx("fail", r#"{"times": 1, "permanent": true}"#, 1))
            .await
            .unwrap_err();
        assert!(err.permanent);
        let err = Fail.run(ctx("fail", r#"[]"#, 1)).await.unwrap_err();
        assert!(
            err.permanent && err.message.contains("invalid args"),
            "{err}"
        );
    }
}
