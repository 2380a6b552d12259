//! Keel's domain, with no I/O: what a job is, which states it moves through and which moves
//! are legal, how long to wait before a retry, and the [`Store`] contract every durable
//! backend fulfils.
//!
//! Everything above this crate (stores, runtime, API) speaks these types, so a job means the
//! same thing on SQLite, on Postgres, over HTTP and in a worker. Nothing here touches a
//! socket, a file or a database driver; the only impurities are the clock (injected, see
//! [`clock`]) and the random jitter of [`Backoff`] (the caller hands in the RNG).

#![warn(missing_docs)]

pub mod backoff;
pub mod clock;
pub mod error;
pub mod ids;
pub mod job;
pub mod json_text;
pub mod pace;
pub mod schedule;
pub mod store;

pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use error::{FieldError, StoreError, ValidationErrors};
pub use ids::{
    IdempotencyKey, JobId, JobKind, LeaseToken, QueueName, ScheduleName, TenantId, WorkerId,
};
pub use job::{
    AttemptError, IllegalTransition, Job, JobState, Lease, NewJob, Priority, Transition, Unique,
    UniqueHold, UniqueScope, UniqueScopeKind, next_attempt_at,
};
pub use schedule::{CronSpec, JobTemplate, NewSchedule, Schedule};
pub use store::{
    ChangeStream, JobStore, LeaderStore, MaintenanceStore, QueueStore, ScheduleStore, Store,
    WakeupStream, WorkStore,
};
