//! The runtime end to end against a real SQLite store: dispatch, retries, panics, timeouts,
//! concurrency, wakeups, cancellation, lease loss, shutdown, webhooks and maintenance; and
//! several runtimes on one database (leadership, cron, cross-replica events).
//!
//! Every wait is bounded and polls the store (or an observable counter) until a condition
//! holds; nothing sleeps and then asserts.

#![allow(clippy::unwrap_used)]

mod flaky;
mod helpers;
mod lifecycle;
mod maintenance;
mod scale_out;
mod shutdown;
mod webhook;
