//! Compiles the Drover protos with protox (pure Rust), so no system protoc is needed, and
//! keeps the descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["drover/v1/drover.proto", "drover/agent/v1/agent.proto", "drover/compute/v1/compute.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let bytes = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("drover_descriptor.bin"), bytes)?;

    tonic_prost_build::configure()
        // The CLI prints user-API messages as JSON.
        // Procedures keep results as JSON, and read them back.
        .type_attribute(".drover.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        // Webhooks and commands get the compute calls as JSON.
        .type_attribute(".drover.compute.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        // Webhooks and commands answer with only the fields they have.
        .message_attribute(".drover.compute.v1", "#[serde(default)]")
        // Volume data crosses the replica stream as `Bytes`: decoding takes a slice of
        // the receive buffer instead of copying every chunk into a new vector.
        .bytes(".drover.agent.v1.DeltaChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
