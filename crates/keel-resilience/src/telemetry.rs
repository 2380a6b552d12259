//! HELP text for the metrics of the breaker, the store guard and fault injection, so that
//! every family on `/metrics` says what it counts.

use metrics::{describe_counter, describe_gauge};

/// Registers the descriptions with the installed recorder. Call once after installing it;
/// calling again is harmless.
pub fn describe_metrics() {
    describe_gauge!(
        "keel_circuit_state",
        "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        "keel_circuit_transitions_total",
        "Circuit breaker state changes, by dependency and the state entered."
    );
    describe_gauge!(
        "keel_store_bulkhead_capacity",
        "Most store calls allowed in flight at once (the store bulkhead)."
    );
    describe_counter!(
        "keel_store_misconfigured_total",
        "Store calls that failed on a configuration error (a pooler and Keel's settings \
         disagreeing); /readyz names it."
    );
    describe_counter!(
        "keel_store_retries_total",
        "Store reads retried after a transient error, within the caller's deadline."
    );
    describe_counter!(
        "keel_store_refused_total",
        "Store calls refused without reaching the database, by reason (circuit open, \
         bulkhead full)."
    );
    describe_gauge!(
        "keel_chaos_active",
        "1 while fault injection is switched on, else 0."
    );
    describe_counter!(
        "keel_chaos_faults_total",
        "Errors injected by fault injection, by dependency."
    );
}
