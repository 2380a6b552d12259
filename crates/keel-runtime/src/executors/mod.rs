//! The built-in job kinds, each a [`Handler`](crate::Handler) registered by
//! [`Handlers::builtin`](crate::Handlers::builtin):
//!
//! | kind | args | result |
//! |---|---|---|
//! | `noop` | ignored | none |
//! | `sleep` | `{"ms": u64}` (at most 24 h) | `{"slept_ms": n}` |
//! | `echo` | anything | the args, byte for byte |
//! | `fail` | `{"times": n, "permanent": bool?}` | `{"attempts": n}` once attempts exceed `times` |
//! | `webhook` | `{"url": "http(s)://…", "body": any?, "headers": {..}?}` | `{"status": u16}` |
//!
//! `noop`, `sleep`, `echo` and `fail` exist for benchmarks, demos and tests of the runtime
//! itself (retries, timeouts, cancellation, shutdown); `webhook` is the one that does real
//! work.

mod echo;
mod fail;
mod noop;
mod sleep;
mod webhook;

pub use echo::Echo;
pub use fail::Fail;
pub use noop::Noop;
pub use sleep::Sleep;
pub use webhook::Webhook;

#[cfg(test)]
pub(crate) mod test_support {
    use keel_core::{Clock, Job, JobKind, NewJob, SystemClock};
    use serde_json::value::RawValue;
    use tokio_util::sync::CancellationToken;

    use crate::JobContext;

    /// A context for a job of `kind` with `args`, at `attempt`.
    pub(crate) fn ctx(kind: &str, args: &str, attempt: u32) -> JobContext {
        let mut job: Job = NewJob::new(JobKind::parse(kind).unwrap())
            .args(RawValue::from_string(args.to_owned()).unwrap())
            .into_job(SystemClock.now());
        job.attempt = attempt;
        JobContext {
            job,
            cancel: CancellationToken::new(),
        }
    }
}
