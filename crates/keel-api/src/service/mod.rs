//! The application layer: the business steps behind the API, called by the transport
//! adapters (the HTTP routes today, gRPC later) after they parsed their input, so a step
//! (a fence check, a cache invalidation, an event, a wakeup, a metric) is written once
//! whatever the transport.
//!
//! The worker protocol lives here ([`workers`]). The job routes' steps (enqueue with
//! idempotency and uniqueness, cancel, retry, process) still sit in `routes::jobs` and move
//! here next.

pub mod workers;
