//! The application layer: the business steps behind the API, called by the transport
//! adapters (the HTTP routes today, gRPC later) after they parsed their input, so a step
//! (a fence check, a cache invalidation, an event, a wakeup, a metric) is written once
//! whatever the transport.
//!
//! [`jobs`]: enqueue (idempotency, uniqueness), reads and listings as the caller may see
//! them, cancel, retry, and process (enqueue, then wait for the end). [`workers`]: the
//! worker protocol. [`watch`]: following jobs' state changes. [`schedules`]: cron schedules of a tenant. [`queues`]: counts, pause
//! and resume.

pub mod jobs;
pub mod queues;
pub mod schedules;
pub mod watch;
pub mod workers;
