//! The store conformance suite on Postgres (a schema per test on `KEEL_TEST_DATABASE_URL`;
//! skipped with a notice when it is unset, failing when `KEEL_REQUIRE_SERVICES=1`).
#![allow(clippy::unwrap_used)]

use keel_store::testkit::Harness;

keel_store::conformance_suite!(Harness::postgres);
