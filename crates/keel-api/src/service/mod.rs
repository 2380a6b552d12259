//! The application layer: the business steps behind the API, called by the transport
//! adapters (the HTTP routes today, gRPC later) after they parsed their input, so a step
//! (a fence check, a cache invalidation, an event, a wakeup, a metric) is written once
//! whatever the transport.
//!
//! [`jobs`]: enqueue (idempotency, uniqueness), reads as the caller may see them, cancel and
//! retry. [`workers`]: the worker protocol. `POST /v1/process`'s wait for the job's end
//! still sits in its route and moves here next.

pub mod jobs;
pub mod workers;
