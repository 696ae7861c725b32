//! Registration with the orchestrator, and the heartbeat that keeps it alive.
//!
//! The orchestrator binds the registration to a store lease; the agent renews it with
//! Heartbeat at a third of the TTL. When the lease is gone (expired, or the store lost it)
//! the agent registers again. Orchestrator outages are retried forever with capped backoff:
//! an agent keeps serving its backend whether or not an orchestrator is up.

use std::time::Duration;

use drover_proto::v1::agent_registry_client::AgentRegistryClient;
use drover_proto::v1::{HeartbeatRequest, RegisterAgentRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

/// What the agent tells the orchestrator about itself.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub agent_id: String,
    pub site: String,
    pub backend: String,
    pub endpoint: String,
    pub driver: String,
    pub driver_version: String,
    pub capabilities: Vec<String>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keeps the agent registered with the orchestrator at `orchestrator` until cancelled.
pub async fn run(orchestrator: String, me: Announcement, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let channel = Endpoint::from_shared(orchestrator.clone())
                .map_err(|e| format!("bad orchestrator endpoint {orchestrator}: {e}"))?
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect()
                .await
                .map_err(|e| format!("cannot reach orchestrator {orchestrator}: {e}"))?;
            let mut client = AgentRegistryClient::with_interceptor(channel, drover_proto::stamp_api_version);
            let reg = client
                .register_agent(RegisterAgentRequest {
                    agent_id: me.agent_id.clone(),
                    site: me.site.clone(),
                    backend: me.backend.clone(),
                    endpoint: me.endpoint.clone(),
                    driver: me.driver.clone(),
                    driver_version: me.driver_version.clone(),
                    capabilities: me.capabilities.clone(),
                })
                .await
                .map_err(|s| format!("registration refused: {}", s.message()))?
                .into_inner();
            tracing::info!(lease = reg.lease_id, ttl = reg.ttl_seconds, "registered with orchestrator");
            let period = Duration::from_secs(reg.ttl_seconds.max(1) as u64) / 3;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(period) => {}
                }
                let beat = client
                    .heartbeat(HeartbeatRequest {
                        agent_id: me.agent_id.clone(),
                        backend: me.backend.clone(),
                        lease_id: reg.lease_id,
                    })
                    .await;
                match beat {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        return Err(format!("registration lapsed ({}); registering again", s.message()));
                    }
                    Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed; will retry"),
                }
            }
        };
        let result: Result<(), String> = tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "agent registration");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
