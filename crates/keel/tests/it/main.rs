//! Keel's integration tests: the real app (the same wiring as `keel serve`) on port 0, a real
//! HTTP client, and real child processes where a test needs signals or exit codes. Each
//! scenario runs on SQLite and on Postgres (skipped with a notice without
//! `KEEL_TEST_DATABASE_URL`, failing with `KEEL_REQUIRE_SERVICES=1`).
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
mod chaos_crash;
mod chaos_outage;
mod chaos_overload;
mod chaos_slow;
mod chaos_webhook;
mod config;
mod diagnostics;
mod idempotency;
mod jobs;
mod metrics;
mod resilience_api;
mod scale_out;
mod shutdown;
