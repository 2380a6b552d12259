//! Keel's HTTP/JSON API (axum): the jobs, schedules and queues endpoints, probes, metrics and the
//! OpenAPI document, behind one middleware stack (request id, logging, metrics, deadline,
//! body limit, then on the `/v1` routes admission control, API-key auth and per-tenant
//! rate limits), with one [`ApiError`] type that renders every failure as
//! `application/problem+json` (RFC 9457).
//!
//! [`grpc::serve`] serves the same API over gRPC (`keel.v1`, from `proto/keel/v1/keel.proto`):
//! a second adapter over [`service`], with one mapping of [`ApiError`] onto a gRPC status.
//!
//! [`admin::router`] serves the admin listener (loopback by default, a bearer token when
//! not): CPU and heap profiles and task dumps (from keel-diag), the effective configuration
//! and the chaos switches.
//!
//! It depends on keel-core, keel-resilience (the request scope, the adaptive limit, chaos),
//! keel-diag (profilers and dumps, no HTTP) and keel-runtime's [`keel_runtime::RuntimeHandle`], never on a store implementation: the binary hands it an `Arc<dyn Store>` inside [`ApiState`] and
//! serves [`router`] with [`listener::serve`] (connection cap, header and idle timeouts).

#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod auth;
pub mod config;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod grpc;
pub mod job_cache;
pub mod listener;
pub mod middleware;
pub mod openapi;
pub mod rate_limit;
pub mod telemetry;
pub mod tls;

mod extract;
mod job_in;
mod routes;
mod schedule_in;
pub mod service;
mod wire_in;
pub mod worker_in;
pub mod worker_registry;

pub use admission::{Admission, Backlog};
pub use config::{ApiConfig, ApiKey, Role, hash_api_key};
pub use error::{ApiError, Problem, ShedReason};
pub use extract::IDEMPOTENCY_KEY;
pub use job_cache::{JobCache, JobCacheConfig};
pub use job_in::{MAX_BATCH, MAX_DELAY_MS};
pub use listener::ConnectionLimits;
pub use rate_limit::{Rate, RateLimitConfig, RateLimits};
pub use routes::jobs::{DEFAULT_LIST_LIMIT, IDEMPOTENT_REPLAYED, UNIQUE_CONFLICT};
pub use routes::schedules::DEFAULT_SCHEDULE_LIST_LIMIT;
pub use routes::{ROUTES, router};
pub use state::{ApiState, Readiness};
pub use telemetry::describe_metrics;
pub use worker_registry::WorkerRegistry;

mod state;
