use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::{Handler, JobContext, JobError};

/// `noop`: does nothing and succeeds without a result. The unit of the drain benchmark
/// (W1): what it costs is exactly the runtime's and the store's overhead per job.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn run(&self, _ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        Ok(None)
    }
}
