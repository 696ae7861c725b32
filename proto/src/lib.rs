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

/// The compute side of a site (`drover.compute.v1`).
pub mod compute {
    /// Drover to a site's compute service.
    pub mod v1 {
        tonic::include_proto!("drover.compute.v1");
    }
}

pub mod metrics;
pub mod reflection;
pub mod tls;
pub mod trace;

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

/// The connections a server accepts on `listener`, each with TCP_NODELAY set. Without
/// it, small replies (a unary answer, a replica stream's acknowledgement) wait for
/// Nagle's algorithm and the peer's delayed ACK: about 40 ms. tonic does not set it on
/// a listener handed in, so every Drover server accepts through this.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    /// The regression would be silent: read the option back from an accepted socket.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = accepted.next().await.unwrap().unwrap();
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY is set on accepted connections");
    }
}
