//! Generated types and gRPC stubs for Drover's APIs.
//!
//! - [`v1`]: the user-facing API (`drover.v1`).
//! - [`agent::v1`]: the orchestrator-to-agent API (`drover.agent.v1`).

#![allow(clippy::all, missing_docs)]

/// The user-facing API.
pub mod v1 {
    tonic::include_proto!("drover.v1");
}

/// The agent APIs.
pub mod agent {
    /// Orchestrator to agent.
    pub mod v1 {
        tonic::include_proto!("drover.agent.v1");
    }
}

/// The encoded descriptor set of every Drover proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/drover_descriptor.bin"));

/// The metadata header that carries the client's API version.
pub const API_VERSION_HEADER: &str = "drover-api-version";

/// The API version this build speaks, sent by its clients.
pub const API_VERSION: &str = "1.0";

/// A client interceptor that stamps [`API_VERSION_HEADER`] with [`API_VERSION`].
pub fn stamp_api_version(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(API_VERSION_HEADER, tonic::metadata::MetadataValue::from_static(API_VERSION));
    Ok(req)
}
