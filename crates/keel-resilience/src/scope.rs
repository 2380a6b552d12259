//! The request a task is working for: its deadline and the step it is in.
//!
//! The HTTP deadline layer runs each request inside [`RequestScope::run`]. Code far below
//! it — the store guard waiting for a bulkhead slot or backing off before a retry — reads
//! [`RequestScope::current`] to bound its waits by the caller's deadline (G7) without every
//! `Store` method growing a deadline parameter, and marks the [`Step`] it is in so that a
//! `504` can say where the time went ("deadline exceeded while authenticating").
//!
//! The scope is a tokio task-local: it follows the request's future across awaits and is
//! absent in tasks that serve no request (dispatchers, maintenance), which then use their
//! own bounds.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static SCOPE: RequestScope;
}

/// Where a request is spending its time. Stored as one byte so marking a step is a single
/// atomic store on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// Received, not yet past the first check.
    Received = 0,
    /// Checking the API key (and the `SLOW_AUTH` chaos switch).
    Auth = 1,
    /// Waiting on the per-tenant rate limit.
    RateLimit = 2,
    /// Reading and validating the body.
    Validate = 3,
    /// Waiting for, or working in, the store.
    Store = 4,
    /// Waiting on purpose for a job to finish (`POST /v1/process`).
    WaitJob = 5,
    /// Receiving the request body. A deadline that passes here is the client's slowness
    /// (a trickled body, or fewer bytes than its `Content-Length`), not the server's: the
    /// API answers `408`, not `504`.
    ReadBody = 6,
}

impl Step {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Step::Auth,
            2 => Step::RateLimit,
            3 => Step::Validate,
            4 => Step::Store,
            5 => Step::WaitJob,
            6 => Step::ReadBody,
            _ => Step::Received,
        }
    }

    /// A stable name, for problem bodies and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Received => "received",
            Step::Auth => "auth",
            Step::RateLimit => "rate_limit",
            Step::Validate => "validate",
            Step::Store => "store",
            Step::WaitJob => "wait_job",
            Step::ReadBody => "read_body",
        }
    }

    /// What the request was doing, phrased to follow "deadline exceeded while".
    pub fn doing(self) -> &'static str {
        match self {
            Step::Received => "starting the request",
            Step::Auth => "authenticating",
            Step::RateLimit => "waiting for the rate limit",
            Step::Validate => "reading and validating the request",
            Step::Store => "waiting for the database",
            Step::WaitJob => "waiting for the job to finish",
            Step::ReadBody => "receiving the request body",
        }
    }
}

/// The deadline and current step of one request. Cloning shares the step, so the deadline
/// layer that created the scope sees the step its inner future last entered even after
/// that future was dropped on timeout.
#[derive(Debug, Clone)]
pub struct RequestScope {
    deadline: Instant,
    step: Arc<AtomicU8>,
}

impl RequestScope {
    /// A scope that must be done by `deadline`.
    pub fn new(deadline: Instant) -> Self {
        Self {
            deadline,
            step: Arc::new(AtomicU8::new(Step::Received as u8)),
        }
    }

    /// The scope of the request the current task works for, if any.
    pub fn current() -> Option<RequestScope> {
        SCOPE.try_with(Clone::clone).ok()
    }

    /// Marks the current task's request, if any, as being in `step`.
    pub fn enter_current(step: Step) {
        let _ = SCOPE.try_with(|s| s.enter(step));
    }

    /// Runs `fut` with this scope as [`RequestScope::current`].
    pub async fn run<F: Future>(self, fut: F) -> F::Output {
        SCOPE.scope(self, fut).await
    }

    /// When the request must be answered.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left (zero once the deadline has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Records that the request is now in `step`.
    pub fn enter(&self, step: Step) {
        self.step.store(step as u8, Ordering::Relaxed);
    }

    /// The step the request last entered.
    pub fn step(&self) -> Step {
        Step::from_u8(self.step.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_scope_follows_the_future_and_shares_its_step() {
        assert!(RequestScope::current().is_none());
        let scope = RequestScope::new(Instant::now() + Duration::from_secs(5));
        let seen = scope.clone();
        let inner = scope
            .run(async {
                tokio::task::yield_now().await;
                RequestScope::enter_current(Step::Store);
                RequestScope::current().map(|s| s.deadline())
            })
            .await;
        assert_eq!(inner, Some(seen.deadline()));
        assert_eq!(seen.step(), Step::Store);
        // Outside the scope nothing is marked and nothing panics.
        RequestScope::enter_current(Step::Auth);
        assert_eq!(seen.step(), Step::Store);
    }

    #[test]
    fn every_step_round_trips_through_its_byte() {
        for s in [
            Step::Received,
            Step::Auth,
            Step::RateLimit,
            Step::Validate,
            Step::Store,
            Step::WaitJob,
        ] {
            assert_eq!(Step::from_u8(s as u8), s);
        }
    }
}
