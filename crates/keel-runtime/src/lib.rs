//! Keel's runtime: what makes stored jobs run.
//!
//! Per-queue dispatchers lease batches as worker permits free up (woken in-process on
//! enqueue, with a poll fallback), bounded worker pools run executors and Rust handlers
//! under a timeout and a cancellation token, and heartbeats extend leases. One replica
//! among those sharing a database is elected leader through the store; only it runs the
//! maintenance loops (promote scheduled jobs, rescue expired leases, delete finished jobs
//! past retention) and cron (enqueue each schedule's ticks, fenced by its term). State
//! changes made by other replicas are fed into this runtime's events. It talks to storage only through [`keel_core::Store`]; it never imports axum,
//! tonic or a database driver.
//!
//! - [`Runtime::start`] / [`Runtime::shutdown`]: the lifecycle, with G6's two-phase stop.
//! - [`RuntimeConfig`]: queues, leases, polling, grace, maintenance, webhook policy
//!   ([`WebhookConfig`]: SSRF guard, signing, per-host breaker and limits, chaos).
//! - [`Handler`], [`JobContext`], [`JobError`], [`Handlers`]: the Rust handler API, and the
//!   registry that maps job kinds to handlers (the built-ins live in [`executors`]).
//! - [`RuntimeHandle`] is what the API holds: wakeups, cancellation of running jobs, job
//!   state events, whether this replica leads ([`LeaderWatch`]), and the [`Catalog`] of
//!   what runs here (served queues, handled kinds, bounded metric labels).
//! - [`telemetry`]: the metrics the runtime records.

#![warn(missing_docs)]

pub mod catalog;
pub mod config;
pub mod executors;
pub mod handle;
pub mod handler;
pub mod telemetry;

mod completer;
mod cron;
mod dispatcher;
mod heartbeat;
mod inflight;
mod leader;
mod maintenance;
mod runtime;
mod worker;

pub use catalog::Catalog;
pub use completer::{Completer, Receipt};
pub use config::{
    HostRateLimit, InvalidConfig, MaintenanceConfig, QueueConfig, RuntimeConfig, SigningSecret,
    WebhookConfig,
};
pub use handle::{Events, JobEvent, LeaderWatch, RunningJobs, RuntimeHandle, Wakeups};
pub use handler::{Handler, Handlers, JobContext, JobError, json_result};
pub use runtime::{Runtime, ShutdownReport};
pub use telemetry::{Outcome, describe_metrics};
