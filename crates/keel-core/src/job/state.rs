//! The states a job moves through, and the one function that decides which moves are legal.
//!
//! Both stores derive the `WHERE state IN (…)` guard of every state-changing statement from
//! [`Transition::sources`], so the SQL cannot drift from [`JobState::apply`]; the
//! conformance suite then checks every (state, transition) pair against the database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::clock::Timestamp;

/// Where a job is in its life. See `docs/job-states.md` for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its `run_at`; the promoter makes it available.
    Scheduled,
    /// Ready to be leased by a worker.
    Available,
    /// Leased by a worker; its lease must be renewed by heartbeats or it will be rescued.
    Running,
    /// Failed with attempts left; becomes available again at `run_at`.
    Retryable,
    /// Finished successfully (terminal).
    Completed,
    /// Failed for good: attempts exhausted or a permanent error (terminal).
    Discarded,
    /// Cancelled by a user before it finished (terminal).
    Cancelled,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ];

    /// The terminal states: a job here never runs again unless a user retries it, and
    /// retention deletes it once it is old enough.
    pub const FINISHED: [JobState; 3] = [
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ];

    /// The states of a job that will still run (or is running): the backlog and the work
    /// in hand, what queue depth gauges count.
    pub const UNFINISHED: [JobState; 4] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
    ];

    /// Whether the job is in a terminal state.
    pub fn is_finished(self) -> bool {
        Self::FINISHED.contains(&self)
    }

    /// The lowercase name stored in the database and shown in the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Discarded => "discarded",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state after `transition`, or an error if the move is illegal from here.
    /// This is the single definition of Keel's state machine.
    pub fn apply(self, transition: Transition) -> Result<JobState, IllegalTransition> {
        use JobState::*;
        use Transition as T;
        let to = match (self, transition) {
            (Scheduled | Retryable, T::Promote) => Available,
            (Available, T::Lease) => Running,
            (Running, T::Complete) => Completed,
            (Running, T::Fail { retry: true }) => Retryable,
            (Running, T::Fail { retry: false }) => Discarded,
            (Running, T::Rescue { retry: true }) => Retryable,
            (Running, T::Rescue { retry: false }) => Discarded,
            (Running, T::Release) => Available,
            (Scheduled | Available | Retryable | Running, T::Cancel) => Cancelled,
            (Scheduled | Retryable | Completed | Discarded | Cancelled, T::Retry) => Available,
            (from, transition) => return Err(IllegalTransition { from, transition }),
        };
        Ok(to)
    }
}

/// A state equals its wire name (`state == "completed"`), as clients and tests compare it.
impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for JobState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = crate::ids::InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| crate::ids::InvalidId {
                what: "job state",
                reason: format!(
                    "{s:?} is not one of scheduled, available, running, retryable, completed, discarded, cancelled"
                ),
            })
    }
}

/// Something that happens to a job. Which states it may happen in is decided by
/// [`JobState::apply`] alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    /// `run_at` reached: scheduled or retryable → available.
    Promote,
    /// A worker took it: available → running, `attempt` + 1.
    Lease,
    /// The worker reported success.
    Complete,
    /// The worker reported failure; `retry` is whether attempts remain and the error was not
    /// permanent.
    Fail {
        /// Whether the job gets another attempt.
        retry: bool,
    },
    /// The lease expired without a heartbeat (the worker died or stalled); treated as a
    /// failed attempt.
    Rescue {
        /// Whether the job gets another attempt.
        retry: bool,
    },
    /// The worker gave the job back unfinished (graceful shutdown): the attempt does not
    /// count.
    Release,
    /// A user cancelled it.
    Cancel,
    /// A user asked for it to run again now.
    Retry,
}

impl Transition {
    /// Every transition, for exhaustive tests.
    pub const ALL: [Transition; 10] = [
        Transition::Promote,
        Transition::Lease,
        Transition::Complete,
        Transition::Fail { retry: true },
        Transition::Fail { retry: false },
        Transition::Rescue { retry: true },
        Transition::Rescue { retry: false },
        Transition::Release,
        Transition::Cancel,
        Transition::Retry,
    ];

    /// The states this transition may start from, derived from [`JobState::apply`]. Stores
    /// build their `WHERE state IN (…)` guards from this list.
    pub fn sources(self) -> Vec<JobState> {
        JobState::ALL
            .into_iter()
            .filter(|s| s.apply(self).is_ok())
            .collect()
    }

    /// A short name for messages and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Transition::Promote => "promote",
            Transition::Lease => "lease",
            Transition::Complete => "complete",
            Transition::Fail { .. } => "fail",
            Transition::Rescue { .. } => "rescue",
            Transition::Release => "release",
            Transition::Cancel => "cancel",
            Transition::Retry => "retry",
        }
    }
}

/// When a failed attempt runs again: `Some(run_at)` when attempts remain and the error is
/// not permanent (now + a backoff delay drawn from `rng`), `None` when the job is to be
/// discarded. Shared by `fail` and `rescue` on every backend so they cannot disagree.
pub fn next_attempt_at(
    attempt: u32,
    max_attempts: u32,
    backoff: &Backoff,
    permanent: bool,
    now: Timestamp,
    rng: &mut impl rand::Rng,
) -> Option<Timestamp> {
    if permanent || attempt >= max_attempts {
        return None;
    }
    let delay = backoff.delay(attempt, rng);
    Some(crate::clock::truncate_micros(
        now + crate::clock::to_delta(delay),
    ))
}

/// A move the state machine refuses, e.g. cancelling a completed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a job that is {from}", transition.as_str())]
pub struct IllegalTransition {
    /// The state the job was in.
    pub from: JobState,
    /// What was attempted.
    pub transition: Transition,
}
