//! The Rust handler API: what a job kind's code implements, what it is given, and how it
//! reports failure.
//!
//! A [`Handler`] runs one attempt of one job. It is given the job and a cancellation token,
//! and returns a result (stored with the job) or a [`JobError`] saying whether another
//! attempt could help. The runtime owns everything else: leases, heartbeats, the timeout,
//! retries with backoff, panics, shutdown.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Job, JobKind};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookConfig;
use crate::executors;

/// Runs one attempt of a job of the kind it is registered for.
///
/// Attempts are at-least-once (G2): after a crash or a lost lease the same job runs again,
/// so a handler with side effects must make them idempotent (for example keyed by
/// `ctx.job.id`).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs the job. `Ok(Some(json))` is stored as the job's result; `Err` records a failed
    /// attempt, retried with backoff unless [`JobError::permanent`].
    ///
    /// Watch `ctx.cancel`: once it fires (user cancel, lost lease, timeout, shutdown) the
    /// outcome will be discarded or the job released, so return promptly. A handler that
    /// ignores it is aborted a little later at its next `.await`.
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError>;

    /// Checks a job's args when the job is enqueued, so that a job this handler could never
    /// run is refused at once (a `422` naming the problem) rather than failing every
    /// attempt hours later. Must be cheap and touch no network: it runs inside the enqueue
    /// request. The default accepts any args.
    fn check_args(&self, args: &RawValue) -> Result<(), String> {
        let _ = args;
        Ok(())
    }
}

/// What a handler is given for one attempt.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job as leased: `attempt` is this attempt's number (1-based), `args` are the
    /// arguments byte for byte as submitted.
    pub job: Job,
    /// Fires when the attempt should stop: the job was cancelled by a user, its lease was
    /// lost (another worker may be running it), it timed out, or the process is shutting
    /// down and the grace period is over.
    pub cancel: CancellationToken,
}

impl JobContext {
    /// Decodes the job's args into `T`. A decoding failure is a [`JobError::permanent`]
    /// naming the kind and what is wrong: the same args will never decode on a retry.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, JobError> {
        serde_json::from_str(self.job.args.get()).map_err(|e| {
            JobError::permanent(format!("invalid args for a {} job: {e}", self.job.kind))
        })
    }
}

/// Serialises a handler's result. A value that cannot be serialised (a map with non-string
/// keys, a float that is NaN) is a permanent error: retrying produces the same value.
pub fn json_result<T: Serialize>(value: &T) -> Result<Option<Box<RawValue>>, JobError> {
    serde_json::value::to_raw_value(value)
        .map(Some)
        .map_err(|e| JobError::permanent(format!("result is not serialisable as JSON: {e}")))
}

/// Why an attempt failed, and whether another attempt could succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    /// Recorded in the job's `errors` (truncated to 4 KiB). Shown to API clients, so say
    /// what failed without secrets or payloads.
    pub message: String,
    /// `true`: retrying cannot help (bad arguments, a 404); the job is discarded at once.
    /// `false`: the job is retried with backoff while attempts remain.
    pub permanent: bool,
    /// When the failure itself says how long to wait before the next attempt (a receiver's
    /// `Retry-After`, a circuit that will probe again in 20 s): the next attempt runs this
    /// long after the failure is recorded instead of after the job's backoff. `None` (the
    /// usual case) uses the backoff. Ignored when the job is discarded; at most
    /// [`keel_core::Backoff::MAX`].
    pub retry_after: Option<Duration>,
}

impl JobError {
    /// A failure that may go away (a timeout, a 503): retried with backoff.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_after: None,
        }
    }

    /// A failure retrying cannot fix (invalid arguments, a 4xx): the job is discarded.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            retry_after: None,
        }
    }

    /// The same failure, retried `after` this long instead of after the job's backoff.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

/// Which handler runs which job kind. Built once at start-up and shared read-only by every
/// worker, so lookups take no lock.
#[derive(Clone, Default)]
pub struct Handlers {
    by_kind: HashMap<JobKind, Arc<dyn Handler>>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<&str> = self.by_kind.keys().map(JobKind::as_str).collect();
        kinds.sort_unstable();
        f.debug_struct("Handlers").field("kinds", &kinds).finish()
    }
}

impl Handlers {
    /// No handlers at all (embedders that want only their own kinds).
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in executors: `noop`, `sleep`, `echo`, `fail` and `webhook` (see
    /// [`crate::executors`] for their arguments). The webhook executor is built from
    /// `webhook`: SSRF policy, user agent, signing secret, per-host protection and chaos.
    pub fn builtin(webhook: &WebhookConfig) -> Self {
        let mut h = Self::new();
        for (kind, handler) in [
            ("noop", Arc::new(executors::Noop) as Arc<dyn Handler>),
            ("sleep", Arc::new(executors::Sleep)),
            ("echo", Arc::new(executors::Echo)),
            ("fail", Arc::new(executors::Fail)),
            ("webhook", Arc::new(executors::Webhook::new(webhook))),
        ] {
            let kind = JobKind::parse(kind).expect("built-in kind names are valid job kinds");
            h.register(kind, handler);
        }
        h
    }

    /// Registers `handler` for `kind`, replacing any handler registered for it before (so
    /// an embedder can override a built-in).
    pub fn register(&mut self, kind: JobKind, handler: Arc<dyn Handler>) -> &mut Self {
        self.by_kind.insert(kind, handler);
        self
    }

    /// The handler for `kind`, if one is registered.
    pub fn get(&self, kind: &JobKind) -> Option<&Arc<dyn Handler>> {
        self.by_kind.get(kind)
    }

    /// Every registered kind, sorted (for `/debug/config` and enqueue-time checks).
    pub fn kinds(&self) -> Vec<JobKind> {
        let mut kinds: Vec<JobKind> = self.by_kind.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registers_the_documented_kinds() {
        let h = Handlers::builtin(&WebhookConfig::default());
        let kinds: Vec<String> = h.kinds().into_iter().map(String::from).collect();
        assert_eq!(kinds, ["echo", "fail", "noop", "sleep", "webhook"]);
    }

    #[test]
    fn constructors_set_permanence() {
        assert!(!JobError::retry("x").permanent);
        assert!(JobError::permanent("x").permanent);
        assert_eq!(JobError::retry("boom").to_string(), "boom");
        assert_eq!(JobError::retry("x").retry_after, None);
        let later = JobError::retry("x").with_retry_after(Duration::from_secs(3));
        assert_eq!(later.retry_after, Some(Duration::from_secs(3)));
    }
}
