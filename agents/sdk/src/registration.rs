//! Registration with the orchestrators, and the heartbeat that keeps it alive.
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

/// What the heartbeats carry for the periodic sync scheduler: its failures go up, and the
/// peers' endpoints come back.
#[derive(Clone, Default)]
pub struct SchedulerLink {
    pub failures: crate::server::SyncFailures,
    pub peers: crate::server::PeerEndpoints,
}

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
/// How soon an agent holding writes asks again.
const HELD_RETRY: Duration = Duration::from_secs(1);

type Registry = AgentRegistryClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// Why a registration round failed, and whether to try the next orchestrator.
struct Failed {
    message: String,
    next_orchestrator: bool,
}

/// The orchestrator endpoints in `list` (comma-separated).
pub fn endpoints(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect()
}

/// Keeps the agent registered until cancelled, with any of the orchestrators in
/// `orchestrators` (comma-separated; they share one store). The registration is a store
/// lease, so any orchestrator can renew it: when one stops answering, the agent renews
/// through the next, and registers again only when the lease itself is gone.
///
/// With `fencing`, each round after a successful registration or heartbeat also asks
/// about the groups the driver holds (see [`crate::returning`]), every second until none
/// is held.
pub async fn run(
    orchestrators: String,
    me: Announcement,
    fencing: Option<crate::returning::Fencing>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    link: SchedulerLink,
    cancel: CancellationToken,
) {
    let list = endpoints(&orchestrators);
    if list.is_empty() {
        return;
    }
    let mut clients: Vec<Option<Registry>> = vec![None; list.len()];
    let mut current = 0usize;
    let mut lease: Option<(i64, Duration)> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        let endpoint = list[current].clone();
        let client = match &clients[current] {
            Some(c) => Ok(c.clone()),
            None => Endpoint::from_shared(endpoint.clone())
                .and_then(|e| match &tls {
                    Some(t) => e.tls_config(t.clone()),
                    None => Ok(e),
                })
                .map(|e| {
                    let channel = e.connect_timeout(CALL_TIMEOUT).timeout(CALL_TIMEOUT).connect_lazy();
                    let stamp: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> =
                        drover_proto::stamp_api_version;
                    AgentRegistryClient::with_interceptor(channel, stamp)
                })
                .map_err(|e| format!("bad orchestrator endpoint {endpoint}: {e}")),
        };
        let round = async {
            let mut client = client.map_err(|message| Failed { message, next_orchestrator: true })?;
            clients[current] = Some(client.clone());
            match lease {
                None => {
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
                        .map_err(|s| Failed {
                            message: format!("registration with {endpoint} refused: {}", s.message()),
                            next_orchestrator: s.code() != tonic::Code::InvalidArgument,
                        })?
                        .into_inner();
                    tracing::info!(lease = reg.lease_id, ttl = reg.ttl_seconds, orchestrator = %endpoint, "registered");
                    let period = Duration::from_secs(reg.ttl_seconds.max(1) as u64) / 3;
                    lease = Some((reg.lease_id, period));
                    Ok(period)
                }
                Some((id, period)) => {
                    // At most once: failures of a heartbeat that does not arrive are not
                    // sent again (a sync that keeps failing is reported at its next try).
                    let beat = client
                        .heartbeat(HeartbeatRequest {
                            agent_id: me.agent_id.clone(),
                            backend: me.backend.clone(),
                            lease_id: id,
                            sync_failures: link.failures.drain(),
                            peer_backends: link.peers.wanted(),
                        })
                        .await;
                    match beat {
                        Ok(answer) => {
                            link.peers.learn(answer.into_inner().peer_endpoints);
                            Ok(period)
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            lease = None;
                            Err(Failed {
                                message: format!("registration lapsed ({}); registering again", s.message()),
                                next_orchestrator: false,
                            })
                        }
                        Err(s) => Err(Failed {
                            message: format!("heartbeat through {endpoint} failed: {}", s.message()),
                            next_orchestrator: true,
                        }),
                    }
                }
            }
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            r = round => r,
        };
        let pause = match outcome {
            Ok(period) => {
                backoff = Duration::from_millis(200);
                match (&fencing, &clients[current]) {
                    (Some(f), Some(client)) => {
                        let held = tokio::select! {
                            _ = cancel.cancelled() => return,
                            n = confirm(client.clone(), &me, f) => n,
                        };
                        if held > 0 { period.min(HELD_RETRY) } else { period }
                    }
                    _ => period,
                }
            }
            Err(f) => {
                if f.next_orchestrator && list.len() > 1 {
                    current = (current + 1) % list.len();
                    tracing::warn!(error = %f.message, next = %list[current], "trying the next orchestrator");
                    // Another orchestrator may answer at once: no pause before it.
                    Duration::ZERO
                } else {
                    tracing::warn!(error = %f.message, retry_in = ?backoff, "agent registration");
                    let b = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    b
                }
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        } else {
            tokio::task::yield_now().await;
        }
        // After a full round of failing orchestrators, back off before the next round.
        if pause.is_zero() && current == 0 {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Asks the orchestrator about every held group and carries out its answers; returns how
/// many groups are still held.
async fn confirm(mut client: Registry, me: &Announcement, fencing: &crate::returning::Fencing) -> usize {
    let claims = fencing.claims();
    if claims.is_empty() {
        return 0;
    }
    let asked = client
        .confirm_primaries(drover_proto::v1::ConfirmPrimariesRequest {
            agent_id: me.agent_id.clone(),
            backend: me.backend.clone(),
            groups: claims.clone(),
        })
        .await;
    match asked {
        Ok(r) => fencing.settle(&claims, r.into_inner().verdicts).await,
        Err(s) => {
            tracing::warn!(error = %s.message(), held = claims.len(), "cannot confirm held groups; writes stay held");
            claims.len()
        }
    }
}
