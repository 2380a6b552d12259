use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::{Handler, JobContext, JobError};

/// `echo`: succeeds with its args as the result, byte for byte (whitespace and key order
/// kept), so a round trip through enqueue, lease, complete and result can be checked
/// exactly.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        Ok(Some(ctx.job.args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executors::test_support::ctx;

    #[tokio::test]
    async fn returns_args_byte_for_byte() {
        let args = r#"{ "b": 1,  "a": [true, null] }"#;
        let out = Echo.run(ctx("echo", args, 1)).await.unwrap().unwrap();
        assert_eq!(out.get(), args);
    }
}
