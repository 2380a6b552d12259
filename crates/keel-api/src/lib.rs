//! Keel's network interfaces: the HTTP/JSON API (axum), the gRPC API (tonic), the admin
//! listener (profiles, task dumps, chaos switches), and the one `ApiError` type that maps
//! domain and store errors to `application/problem+json` and `tonic::Status`.
//!
//! It depends on keel-core and keel-runtime, never on a store implementation: the binary
//! hands it an `Arc<dyn Store>`. Empty until the `keel serve` work lands.

#![warn(missing_docs)]
