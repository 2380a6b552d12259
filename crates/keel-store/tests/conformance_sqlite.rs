//! The store conformance suite on SQLite (a temporary file per test).
#![allow(clippy::unwrap_used)]

use keel_store::testkit::Harness;

keel_store::conformance_suite!(|_test: &'static str| async { Some(Harness::sqlite().await) });
