//! Who may call an agent, checked before any handler runs (over TLS; the handshake has
//! already required a client certificate signed by the cluster's CA). Mutations and
//! fences come only from the orchestrator role; replica streams only from peer agents;
//! the reads a peer agent needs (replication info, probes) from either.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use drover_proto::tls::{PeerRole, peer_certs, peer_role};
use tonic::Status;

/// Agent-service methods peer agents may call too (they change nothing).
const READS: &[&str] = &["GetCapabilities", "Probe", "GetVolume", "GetReplicationInfo", "GetOperation"];

/// The roles a path admits; `None` for paths open to any authenticated peer.
fn admits(path: &str) -> Option<&'static [PeerRole]> {
    if let Some(method) = path.strip_prefix("/drover.agent.v1.Agent/") {
        return Some(if READS.contains(&method) {
            &[PeerRole::Orchestrator, PeerRole::Agent]
        } else {
            &[PeerRole::Orchestrator]
        });
    }
    if path.starts_with("/drover.agent.v1.Replica/") {
        return Some(&[PeerRole::Agent]);
    }
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        return None;
    }
    Some(&[])
}

/// The refusal for a request, if it is refused.
pub fn refusal(path: &str, ext: &http::Extensions) -> Option<Status> {
    let allowed = admits(path)?;
    let certs = peer_certs(ext).unwrap_or_default();
    let role = peer_role(&certs);
    if role.is_some_and(|r| allowed.contains(&r)) {
        return None;
    }
    let who = match role {
        Some(PeerRole::Orchestrator) => "an orchestrator certificate",
        Some(PeerRole::Agent) => "an agent certificate",
        None => "no certificate of a Drover role",
    };
    let needs = match allowed {
        [] => "nothing: the agent does not serve it".to_string(),
        [PeerRole::Orchestrator] => "the orchestrator's certificate".to_string(),
        [PeerRole::Agent] => "a peer agent's certificate".to_string(),
        _ => "an orchestrator or agent certificate".to_string(),
    };
    Some(Status::permission_denied(format!("{path} needs {needs}; the caller presented {who}")))
}

/// A tower layer applying [`refusal`].
#[derive(Clone, Copy)]
pub struct GateLayer;

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner }
    }
}

/// The gated service.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Gate<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        match refusal(req.uri().path(), req.extensions()) {
            Some(status) => Box::pin(async move { Ok(status.into_http()) }),
            None => Box::pin(self.inner.call(req)),
        }
    }
}
