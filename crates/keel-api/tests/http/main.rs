//! keel-api driven through `router()` with `tower::ServiceExt::oneshot`, over a real SQLite
//! store in a temporary directory. No runtime runs: tests act as the worker through the
//! store and publish job events themselves.
#![allow(clippy::unwrap_used)]

mod auth;
mod cache;
mod helpers;
mod idempotency;
mod jobs;
mod middleware;
mod probes;
mod process;
mod protection;
mod schedules;
mod unique;
