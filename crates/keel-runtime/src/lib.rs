//! Keel's runtime: what makes stored jobs run.
//!
//! This crate will hold the per-queue dispatchers (leasing batches as worker permits free
//! up, woken in-process or by Postgres `LISTEN/NOTIFY`), the bounded worker pools and the
//! built-in executors, the maintenance loops (promote scheduled jobs, rescue expired leases,
//! delete past retention) run by the elected leader, and the resilience primitives (bulkhead,
//! circuit breaker, retry inside a deadline). It talks to storage only through
//! [`keel_core::Store`]; it never imports axum, tonic or a database driver.
//!
//! It is empty until the `keel serve` work lands: the foundation issue only lays the store.

#![warn(missing_docs)]
