//! Keel's gRPC contract, generated from `proto/keel/v1/keel.proto` by tonic-prost-build:
//! the messages, the servers keel-api implements and the clients keel-client and the tests
//! call. One crate holds them so that each wire type is defined once, and so that a client
//! does not depend on the server. [`convert`] maps them to and from keel-wire's JSON
//! shapes, which the gRPC and HTTP APIs share.

pub mod convert;

/// Package `keel.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("keel.v1");

    /// The encoded descriptor set of `keel.v1`, for reflection and the compatibility test.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keel_descriptor");
}
