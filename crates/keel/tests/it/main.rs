//! Keel's integration tests: the real app (the same wiring as `keel serve`) on port 0, a real
//! HTTP client, and real child processes where a test needs signals, exit codes or a
//! metrics recorder of its own. A scenario that involves the store runs on SQLite and on
//! Postgres through `both_backends!` (the Postgres twin is skipped with a notice without
//! `KEEL_TEST_DATABASE_URL`, and fails with `KEEL_REQUIRE_SERVICES=1`). The rest run once:
//! - on Postgres only: `scale_out` (several replicas share one database, which a SQLite
//!   file cannot) and `chaos_outage` (the database sits behind a TCP proxy);
//! - on SQLite only: `api_errors::locked_sqlite_database_is_503_with_retry_after` (another
//!   process holding the file's write lock), and the connection tests of `bad_input`
//!   (`connections_that_stall_are_closed_and_framing_errors_are_4xx`,
//!   `connections_past_the_cap_get_a_503`: they test the listener, not the store);
//! - on the default SQLite store, because the store is not what they test: `config`
//!   (flags, exit codes, redaction) and `diagnostics` (profiles, task dumps, gauges).
//!
//! No test asserts on elapsed time, throughput or percentiles: those are `keel bench`'s.
//! Waits are polls on a condition, bounded by a generous hang guard (`within`).
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs,
    unreachable_pub
)]

mod child;
mod helpers;

mod api_errors;
mod bad_input;
mod chaos_crash;
mod chaos_outage;
mod chaos_overload;
mod chaos_slow;
mod chaos_webhook;
mod config;
mod diagnostics;
mod grpc;
mod grpc_workers;
mod idempotency;
mod jobs;
mod metrics;
mod openapi;
mod pgbouncer;
mod prefetch;
mod resilience_api;
mod scale_out;
mod shutdown;
mod tls;
mod workers;
