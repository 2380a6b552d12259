//! The store conformance suite through a real PgBouncer in transaction mode (a database of
//! its own per case, statements unnamed, `LISTEN` straight to the server). Skipped with a
//! notice without `KEEL_TEST_DATABASE_URL` or PgBouncer; failing instead with
//! `KEEL_REQUIRE_SERVICES=1`.

#![allow(clippy::unwrap_used)]

use keel_store::testkit::Harness;

keel_store::conformance_suite!(Harness::pgbouncer);
