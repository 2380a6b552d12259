//! HELP text for the metrics the HTTP layer records, so that every family on `/metrics` says
//! what it counts (Prometheus and `promtool check metrics` expect it). The names are
//! recorded where the event happens (middleware, admission, listener, cache, routes); this
//! is the one place that explains them.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Registers the descriptions with the installed recorder. Call once after installing it;
/// calling again is harmless.
pub fn describe_metrics() {
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, matched route and status."
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its response head, by method and matched route."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "gRPC calls answered, by service, method and status code (services and methods this \
         server does not serve count as `unknown`)."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        Unit::Seconds,
        "Time from a gRPC call's arrival to its response head, by service and method."
    );
    describe_counter!(
        "keel_jobs_enqueued_total",
        "Jobs created through the API, by queue and kind (names that are neither configured \
         queues nor registered kinds count as `other`)."
    );
    describe_counter!(
        "keel_requests_shed_total",
        "Requests refused before any work to protect the server (429 or 503), by reason: \
         rate_limit, concurrency, backlog."
    );
    describe_counter!(
        "keel_requests_deadline_exceeded_total",
        "Requests answered 504 because their deadline ran out, by the step that was running."
    );
    describe_gauge!(
        "keel_admission_limit",
        "The adaptive concurrency limit on /v1 requests now."
    );
    describe_gauge!(
        "keel_admission_in_flight",
        "/v1 requests admitted and still running."
    );
    describe_gauge!("keel_connections_open", "HTTP connections open now.");
    describe_counter!(
        "keel_tls_handshake_failures_total",
        "TLS connections dropped before their first request, by listener (http, grpc) and \
         reason: error (a failed handshake: a plaintext client, an untrusted certificate), \
         timeout, or too_many (handshakes already in flight at the cap)."
    );
    describe_counter!(
        "keel_tls_reloads_total",
        "Changes to the TLS certificate or key files, by outcome: ok (served from the next \
         handshake on) or error (unusable; the previous certificate is still served)."
    );
    describe_counter!(
        "keel_connections_refused_total",
        "Connections turned away at accept, by reason: limit (over the connection cap, \
         answered 503) or accept_error."
    );
    describe_counter!(
        "keel_connections_closed_total",
        "Connections Keel closed itself, by reason: header_timeout (the request head did not \
         arrive within the header read timeout)."
    );
    describe_counter!(
        "keel_cache_requests_total",
        "Job reads through the job cache, by result: hit, miss, early_refresh."
    );
    describe_counter!(
        "keel_cache_loads_total",
        "Reads the job cache made from the store (concurrent misses for one job share a load)."
    );
    describe_gauge!(
        "keel_workers_connected",
        "External workers that leased or heartbeated in the last minute, by queue (the first \
         64 external queues have their own label; later ones count under other)."
    );
    describe_counter!(
        "keel_worker_leases_total",
        "Jobs handed to external workers by POST /v1/queues/{queue}/lease, by queue."
    );
    describe_counter!(
        "keel_worker_outcomes_total",
        "Outcomes external workers reported through this process, by queue and outcome \
         (completed, retryable, discarded, released)."
    );
}
