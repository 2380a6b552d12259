//! The Rust SDK for Keel's HTTP API, used by the `keel` CLI's client commands, by
//! `keel bench`/`keel load`, by integration tests and by Rust workers speaking the lease
//! protocol. Empty until the HTTP API exists.

#![warn(missing_docs)]
