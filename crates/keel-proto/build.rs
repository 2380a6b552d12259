//! Generates the gRPC server and client code and the descriptor set (for reflection and
//! the wire-compatibility test) from `proto/keel/v1/keel.proto`, with the protoc that
//! protoc-bin-vendored ships: building Keel needs no protoc installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("keel/v1/keel.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("keel_descriptor.bin"))
        .compile_with_config(config, std::slice::from_ref(&proto), &[root, include])?;
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(())
}
