//! Protection for Keel's dependencies and for Keel itself (SPEC G5, G7, §5).
//!
//! Each module does one thing and knows nothing about HTTP:
//! - [`scope`]: the deadline and current step of the request a task works for, so code far
//!   below the HTTP layer (the store guard) can bound its waits by the caller's deadline and
//!   a `504` can name the step that ran out of time.
//! - [`breaker`]: a circuit breaker (closed → open → half-open → closed).
//! - [`limit`]: an adaptive concurrency limit that learns the latency of an unloaded server
//!   and lowers the limit when latency climbs (Netflix's gradient algorithm).
//! - [`chaos`]: fault injection (latency and error rate per dependency), off by default,
//!   switchable at runtime.
//! - [`store`]: [`GuardedStore`], a [`keel_core::Store`] that wraps the real one with a
//!   bulkhead, the breaker, fault injection and retries of transient errors inside the
//!   deadline.
//! - [`telemetry`]: what each of the metrics above counts (HELP text).

pub mod breaker;
pub mod chaos;
pub mod limit;
pub mod scope;
pub mod store;
pub mod telemetry;

pub use breaker::{BreakerConfig, BreakerOpen, BreakerPermit, BreakerState, CircuitBreaker};
pub use chaos::{Chaos, ChaosSettings, Dependency, Fault};
pub use limit::{AdaptiveLimit, AdaptiveLimitConfig, AdmissionPermit};
pub use scope::{RequestScope, Step};
pub use store::{GuardedStore, Misconfiguration, StoreGuard, StoreGuardConfig};
pub use telemetry::describe_metrics;
