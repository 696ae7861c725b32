//! Sites, backends and the agent registry.

use std::sync::Arc;

use drover_proto::v1 as pb;
use drover_store::{Compare, StoreError, Txn, TxnOp};
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::{ApiError, ApiResult, raced};
use crate::model::{AgentRec, BackendRec, SiteRec, keys, now_ms};
use crate::repo::{Versioned, put, validate_name};

/// `drover.v1.SiteService` and `drover.v1.AgentRegistry`.
pub struct SiteApi {
    pub core: Arc<Core>,
}

/// How many times registration (or a freeze or thaw) re-reads the backend's record after
/// losing a race with another change of it.
const REGISTER_ATTEMPTS: usize = 5;

/// The most peer backends one heartbeat is told about (an agent ships to a few).
const MAX_PEER_BACKENDS: usize = 32;

impl SiteApi {
    async fn backend(&self, name: &str) -> ApiResult<Versioned<BackendRec>> {
        validate_name("name", name)?;
        self.core.repo.get::<BackendRec>(&keys::backend(name)).await?.ok_or_else(|| {
            ApiError::NotFound(format!("backend {name:?} not found; list backends with `drover backend list`"))
        })
    }

    /// A backend with its agents' liveness: a live lease (the registration exists) and a
    /// successful probe.
    pub async fn describe(&self, b: &BackendRec) -> ApiResult<pb::Backend> {
        let regs = self.core.agents.registrations(&b.name).await?;
        let probes = regs.iter().map(|a| {
            self.core.agents.probe(&a.endpoint, self.core.agents.deadline(&b.name, crate::agents::Deadline::Probe))
        });
        let results = futures::future::join_all(probes).await;
        let agents: Vec<pb::AgentStatus> = regs
            .into_iter()
            .zip(results)
            .map(|(a, probe)| pb::AgentStatus {
                agent_id: a.agent_id,
                endpoint: a.endpoint,
                liveness: if probe.is_ok() { "up" } else { "down" }.into(),
                probe_error: probe.err().unwrap_or_default(),
                driver: a.driver,
                driver_version: a.driver_version,
            })
            .collect();
        let status = if agents.iter().any(|a| a.liveness == "up") { "up" } else { "down" };
        Ok(pb::Backend {
            name: b.name.clone(),
            site: b.site.clone(),
            driver: b.driver.clone(),
            capabilities: b.capabilities.clone(),
            frozen: b.frozen,
            agents,
            status: status.into(),
        })
    }

    /// Sets the flag on the record as it is now. The record also changes when an agent
    /// of the backend registers (a restart); the flag means the same whatever else the
    /// record says, so a write that lost to such a change is made again on the new record
    /// rather than refused.
    async fn set_frozen(&self, name: &str, frozen: bool) -> ApiResult<pb::Backend> {
        for _ in 0..REGISTER_ATTEMPTS {
            let b = self.backend(name).await?;
            if b.rec.frozen == frozen {
                return self.describe(&b.rec).await;
            }
            let mut rec = b.rec.clone();
            rec.frozen = frozen;
            let txn = Txn::new()
                .when(Compare::ModRevisionEquals(keys::backend(name).into_bytes(), b.rev))
                .and_then(put(&keys::backend(name), &rec));
            if self.core.repo.txn(txn).await?.succeeded {
                tracing::info!(backend = name, frozen, "backend freeze state changed");
                return self.describe(&rec).await;
            }
        }
        Err(raced(&format!("backend {name}")))
    }

    async fn register(&self, r: pb::RegisterAgentRequest) -> ApiResult<pb::RegisterAgentResponse> {
        validate_name("agent_id", &r.agent_id)?;
        validate_name("site", &r.site)?;
        validate_name("backend", &r.backend)?;
        if !(r.endpoint.starts_with("http://") || r.endpoint.starts_with("https://")) {
            return Err(ApiError::InvalidArgument(format!(
                "`endpoint` {:?} must be an http:// or https:// URI",
                r.endpoint
            )));
        }
        let ttl = self.core.config.agent_lease_ttl.as_secs() as i64;
        let store = self.core.repo.store();
        let lease = store.grant_lease(ttl).await?;
        for _ in 0..REGISTER_ATTEMPTS {
            let site = self.core.repo.get::<SiteRec>(&keys::site(&r.site)).await?;
            let backend = self.core.repo.get::<BackendRec>(&keys::backend(&r.backend)).await?;
            if let Some(b) = &backend
                && b.rec.site != r.site
            {
                let _ = store.revoke_lease(lease).await;
                return Err(ApiError::FailedPrecondition(format!(
                    "backend {} belongs to site {}, not {}; fix the agent's `site` setting",
                    r.backend, b.rec.site, r.site
                )));
            }
            let frozen = backend.as_ref().is_some_and(|b| b.rec.frozen);
            let rec = BackendRec {
                name: r.backend.clone(),
                site: r.site.clone(),
                driver: r.driver.clone(),
                capabilities: r.capabilities.clone(),
                frozen,
            };
            let agent = AgentRec {
                agent_id: r.agent_id.clone(),
                site: r.site.clone(),
                backend: r.backend.clone(),
                endpoint: r.endpoint.clone(),
                driver: r.driver.clone(),
                driver_version: r.driver_version.clone(),
                capabilities: r.capabilities.clone(),
                registered_at_ms: now_ms(),
            };
            let mut txn = Txn::new()
                .when(Compare::ModRevisionEquals(keys::site(&r.site).into_bytes(), site.as_ref().map_or(0, |s| s.rev)))
                .when(Compare::ModRevisionEquals(
                    keys::backend(&r.backend).into_bytes(),
                    backend.as_ref().map_or(0, |b| b.rev),
                ))
                .and_then(put(&keys::backend(&r.backend), &rec))
                .and_then(TxnOp::put_with_lease(
                    keys::agent(&r.backend, &r.agent_id).into_bytes(),
                    serde_json::to_vec(&agent).expect("records serialise"),
                    lease,
                ));
            if site.is_none() {
                txn = txn
                    .and_then(put(&keys::site(&r.site), &SiteRec { name: r.site.clone(), description: String::new() }));
            }
            if self.core.repo.txn(txn).await?.succeeded {
                tracing::info!(agent = %r.agent_id, backend = %r.backend, site = %r.site, endpoint = %r.endpoint, lease, "agent registered");
                return Ok(pb::RegisterAgentResponse { lease_id: lease, ttl_seconds: ttl });
            }
        }
        let _ = store.revoke_lease(lease).await;
        Err(raced(&format!("backend {}", r.backend)))
    }
}

#[tonic::async_trait]
impl pb::site_service_server::SiteService for SiteApi {
    async fn create_site(&self, req: Request<pb::CreateSiteRequest>) -> Result<Response<pb::Site>, Status> {
        let r = req.into_inner();
        validate_name("name", &r.name)?;
        let rec = SiteRec { name: r.name.clone(), description: r.description.clone() };
        let created = self
            .core
            .repo
            .txn(
                Txn::new()
                    .when(Compare::Absent(keys::site(&r.name).into_bytes()))
                    .and_then(put(&keys::site(&r.name), &rec)),
            )
            .await?;
        if !created.succeeded {
            return Err(ApiError::AlreadyExists(format!("site {} already exists", r.name)).into());
        }
        Ok(Response::new(pb::Site { name: rec.name, description: rec.description }))
    }

    async fn list_sites(&self, _req: Request<pb::ListSitesRequest>) -> Result<Response<pb::ListSitesResponse>, Status> {
        let sites = self.core.repo.list::<SiteRec>(keys::SITES).await?;
        Ok(Response::new(pb::ListSitesResponse {
            sites: sites.into_iter().map(|s| pb::Site { name: s.rec.name, description: s.rec.description }).collect(),
        }))
    }

    async fn list_backends(
        &self,
        req: Request<pb::ListBackendsRequest>,
    ) -> Result<Response<pb::ListBackendsResponse>, Status> {
        let who = crate::auth::caller(&req);
        let site = req.into_inner().site;
        let all = self.core.repo.list::<BackendRec>(keys::BACKENDS).await?;
        let chosen: Vec<_> = all.into_iter().filter(|b| site.is_empty() || b.rec.site == site).collect();
        let described = futures::future::join_all(chosen.iter().map(|b| self.describe(&b.rec))).await;
        let backends = described.into_iter().map(|b| b.map(|b| redact(&who, b))).collect::<ApiResult<Vec<_>>>()?;
        Ok(Response::new(pb::ListBackendsResponse { backends }))
    }

    async fn get_backend(&self, req: Request<pb::GetBackendRequest>) -> Result<Response<pb::Backend>, Status> {
        let who = crate::auth::caller(&req);
        let b = self.backend(&req.into_inner().name).await?;
        Ok(Response::new(redact(&who, self.describe(&b.rec).await?)))
    }

    async fn freeze_backend(&self, req: Request<pb::FreezeBackendRequest>) -> Result<Response<pb::Backend>, Status> {
        Ok(Response::new(self.set_frozen(&req.into_inner().name, true).await?))
    }

    async fn thaw_backend(&self, req: Request<pb::ThawBackendRequest>) -> Result<Response<pb::Backend>, Status> {
        Ok(Response::new(self.set_frozen(&req.into_inner().name, false).await?))
    }
}

impl SiteApi {
    /// Binds an agent id to the certificate it first registers with: a later
    /// registration of that id with another certificate (another agent's, or a stolen
    /// id) is refused. The binding outlives the registration's lease.
    async fn bind_certificate(&self, agent_id: &str, fingerprint: &str) -> Result<(), Status> {
        validate_name("agent_id", agent_id)?;
        let key = format!("agent-certs/{agent_id}");
        let bound = self
            .core
            .repo
            .txn(
                Txn::new()
                    .when(Compare::Absent(key.clone().into_bytes()))
                    .and_then(TxnOp::put(key.clone(), fingerprint.to_string())),
            )
            .await?;
        if bound.succeeded {
            return Ok(());
        }
        let held = self.core.repo.store().get(key.as_bytes()).await.map_err(ApiError::from)?;
        match held {
            Some(kv) if kv.value == fingerprint.as_bytes() => Ok(()),
            Some(kv) => Err(ApiError::PermissionDenied(format!(
                "agent id {agent_id} is bound to another certificate (SHA-256 {}); this one is {fingerprint}. \
                 An agent keeps its certificate; to move the id to a new one, delete the store key {key}",
                String::from_utf8_lossy(&kv.value)
            ))
            .into()),
            None => {
                Err(ApiError::Aborted(format!("the binding of agent id {agent_id} changed meanwhile; retry")).into())
            }
        }
    }
}

/// A backend as a non-admin sees it: name, site, driver, capabilities and status, but
/// not its agents (their ids and endpoints are the deployment's, not a tenant's).
fn redact(who: &crate::auth::Caller, mut b: pb::Backend) -> pb::Backend {
    if !who.is_admin() {
        b.agents.clear();
    }
    b
}

#[tonic::async_trait]
impl pb::agent_registry_server::AgentRegistry for SiteApi {
    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        // Over TLS the layer admitted only an agent certificate; bind the id to it.
        let cert = req.peer_certs().and_then(|c| c.first().map(drover_proto::tls::fingerprint));
        let r = req.into_inner();
        if let Some(fingerprint) = cert {
            self.bind_certificate(&r.agent_id, &fingerprint).await?;
        }
        Ok(Response::new(self.register(r).await?))
    }

    async fn confirm_primaries(
        &self,
        req: Request<pb::ConfirmPrimariesRequest>,
    ) -> Result<Response<pb::ConfirmPrimariesResponse>, Status> {
        Ok(Response::new(self.confirm_primaries(req.into_inner()).await?))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        if !r.sync_failures.is_empty() {
            // User messages in the groups' projects; the heartbeat does not wait for them.
            let core = self.core.clone();
            let failures = r.sync_failures.clone();
            tokio::spawn(async move { super::messages::sync_failures(&core, &failures).await });
        }
        match self.core.repo.store().keep_alive(r.lease_id).await {
            Ok(ttl) => {
                // Where the agent's peers are now, from the registration view (no store
                // read while it is live). Bounded: an agent ships to a few backends.
                let mut peer_endpoints = std::collections::HashMap::new();
                let named = r.peer_backends.iter().filter(|b| validate_name("peer_backends", b).is_ok());
                for backend in named.take(MAX_PEER_BACKENDS) {
                    if let Some(ep) = self.core.agents.endpoint(backend).await {
                        peer_endpoints.insert(backend.clone(), ep);
                    }
                }
                Ok(Response::new(pb::HeartbeatResponse { ttl_seconds: ttl, peer_endpoints }))
            }
            Err(StoreError::LeaseNotFound(_)) => Err(Status::not_found(format!(
                "registration lease {} of agent {} has expired; register again",
                r.lease_id, r.agent_id
            ))),
            Err(e) => Err(ApiError::from(e).into()),
        }
    }
}
