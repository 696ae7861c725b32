//! The agent's gRPC server: `drover.agent.v1.Agent` and `Replica`, health and reflection.
//! Every mutation goes through [`AgentService::guarded`] (see [`guard`]), which fences by
//! epoch, deduplicates by op_id and admits one mutation per volume or group.

mod convert;
mod gate;
mod guard;
mod scheduler;

use std::net::SocketAddr;
use std::sync::Arc;

use drover_proto::agent::v1 as pb;
use drover_proto::agent::v1::agent_server::{Agent, AgentServer};
use tonic::{Request, Response, Status};

use crate::driver::{AdoptSnapshot, Driver, EnableSpec, Peer, Role};
use crate::ledger::Ledger;
use convert::{driver_err, replication_info, require, size, volume_info};
use scheduler::run_scheduler;
pub use scheduler::{PeerEndpoints, SyncFailures};

/// The agent's implementation of `drover.agent.v1.Agent`.
pub struct AgentService {
    driver: Arc<dyn Driver>,
    ledger: Ledger,
    op_log: Option<Arc<crate::oplog::OpLog>>,
    metrics: Arc<crate::metrics::AgentMetrics>,
    /// Volume or group id to the op_id of the mutation running on it.
    in_flight: guard::InFlight,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_capabilities(
        &self,
        _req: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        Ok(Response::new(pb::GetCapabilitiesResponse {
            driver: self.driver.name().to_string(),
            driver_version: self.driver.version().to_string(),
            capabilities: self.driver.capabilities(),
        }))
    }

    async fn probe(&self, _req: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeResponse>, Status> {
        let (ready, detail) = match self.driver.probe().await {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        Ok(Response::new(pb::ProbeResponse { ready, detail }))
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::VolumeInfo>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let bytes = size("size_bytes", r.size_bytes)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        if r.snapshot_id.is_empty() != r.snapshot_volume_id.is_empty() {
            return Err(Status::invalid_argument(
                "`snapshot_id` and `snapshot_volume_id` go together: name the snapshot and which of its volumes",
            ));
        }
        self.guarded(ctx, &target, "create_volume", move |d| async move {
            if r.snapshot_id.is_empty() {
                d.create_volume(&r.volume_id, bytes).await.map(volume_info)
            } else {
                d.create_volume_from_snapshot(&r.volume_id, bytes, &r.snapshot_id, &r.snapshot_volume_id)
                    .await
                    .map(volume_info)
            }
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "delete_volume", move |d| async move {
            d.delete_volume(&r.volume_id).await.map(|()| pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn extend_volume(&self, req: Request<pb::ExtendVolumeRequest>) -> Result<Response<pb::VolumeInfo>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let bytes = size("new_size_bytes", r.new_size_bytes)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "extend_volume", move |d| async move {
            d.extend_volume(&r.volume_id, bytes).await.map(volume_info)
        })
        .await
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::VolumeInfo>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        self.driver.get_volume(&r.volume_id).await.map(|v| Response::new(volume_info(v))).map_err(driver_err)
    }

    async fn create_group_snapshot(
        &self,
        req: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::GroupSnapshot>, Status> {
        let mut r = req.into_inner();
        require("group_id", &r.group_id)?;
        require("snapshot_id", &r.snapshot_id)?;
        if r.volume_ids.is_empty() {
            return Err(Status::invalid_argument("`volume_ids` must name at least one volume"));
        }
        let (ctx, target) = (r.ctx.take(), r.group_id.clone());
        self.guarded(ctx, &target, "create_group_snapshot", move |d| async move {
            d.create_group_snapshot(&r.snapshot_id, &r.volume_ids).await.map(|s| pb::GroupSnapshot {
                snapshot_id: s.snapshot_id,
                volume_ids: s.volume_ids,
                created_at_ms: s.created_at_ms,
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let mut r = req.into_inner();
        require("snapshot_id", &r.snapshot_id)?;
        let (ctx, target) = (r.ctx.take(), r.snapshot_id.clone());
        self.guarded(ctx, &target, "delete_snapshot", move |d| async move {
            d.delete_snapshot(&r.snapshot_id).await.map(|()| pb::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::ConnectionInfo>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "attach_volume", move |d| async move {
            d.attach_volume(&r.volume_id)
                .await
                .map(|c| pb::ConnectionInfo { driver_volume_type: c.driver_volume_type, uri: c.uri })
        })
        .await
    }

    async fn detach_volume(
        &self,
        req: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "detach_volume", move |d| async move {
            d.detach_volume(&r.volume_id).await.map(|()| pb::DetachVolumeResponse {})
        })
        .await
    }

    async fn list_manageable_volumes(
        &self,
        _req: Request<pb::ListManageableVolumesRequest>,
    ) -> Result<Response<pb::ListManageableVolumesResponse>, Status> {
        let list = self.driver.list_manageable().await.map_err(driver_err)?;
        Ok(Response::new(pb::ListManageableVolumesResponse {
            volumes: list
                .into_iter()
                .map(|m| pb::ManageableVolume {
                    reference: m.reference,
                    size_bytes: m.size_bytes as i64,
                    safe_to_manage: m.safe_to_manage,
                    reason_not_safe: m.reason_not_safe,
                    snapshots: m
                        .snapshots
                        .into_iter()
                        .map(|s| pb::ManageableSnapshot {
                            reference: s.reference,
                            size_bytes: s.size_bytes as i64,
                            created_at_ms: s.created_at_ms,
                            kind: s.kind,
                        })
                        .collect(),
                    backing_file: m.backing_file,
                })
                .collect(),
        }))
    }

    async fn manage_volume(&self, req: Request<pb::ManageVolumeRequest>) -> Result<Response<pb::VolumeInfo>, Status> {
        let mut r = req.into_inner();
        require("reference", &r.reference)?;
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "manage_volume", move |d| async move {
            let snaps: Vec<AdoptSnapshot> = r
                .snapshots
                .iter()
                .map(|s| AdoptSnapshot { reference: s.reference.clone(), snapshot_id: s.snapshot_id.clone() })
                .collect();
            d.manage_volume(&r.reference, &r.volume_id, &snaps).await.map(volume_info)
        })
        .await
    }

    async fn unmanage_volume(
        &self,
        req: Request<pb::UnmanageVolumeRequest>,
    ) -> Result<Response<pb::UnmanageVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "unmanage_volume", move |d| async move {
            d.unmanage_volume(&r.volume_id).await.map(|()| pb::UnmanageVolumeResponse {})
        })
        .await
    }

    async fn enable_replication(
        &self,
        req: Request<pb::EnableReplicationRequest>,
    ) -> Result<Response<pb::EnableReplicationResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let role = match pb::ReplicationRole::try_from(r.role) {
            Ok(pb::ReplicationRole::Primary) => Role::Primary,
            Ok(pb::ReplicationRole::Secondary) => Role::Secondary,
            _ => return Err(Status::invalid_argument("`role` must be PRIMARY or SECONDARY")),
        };
        let peer = r.peer.clone().ok_or_else(|| Status::invalid_argument("`peer` is required"))?;
        require("peer.backend", &peer.backend)?;
        let spec = EnableSpec {
            volume_id: r.volume_id.clone(),
            group_id: r.group_id.clone(),
            role,
            peer: Peer { backend: peer.backend, endpoint: peer.endpoint },
            size_bytes: u64::try_from(r.size_bytes).unwrap_or(0),
            interval_ms: match r.parameters.get("sync_interval_ms") {
                None => None,
                Some(v) => Some(v.parse::<u64>().ok().filter(|ms| *ms >= 1000).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "parameter sync_interval_ms = {v:?} must be a whole number of at least 1000"
                    ))
                })?),
            },
        };
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "enable_replication", move |d| async move {
            d.enable_replication(&spec).await.map(|()| pb::EnableReplicationResponse {})
        })
        .await
    }

    async fn disable_replication(
        &self,
        req: Request<pb::DisableReplicationRequest>,
    ) -> Result<Response<pb::DisableReplicationResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "disable_replication", move |d| async move {
            d.disable_replication(&r.volume_id).await.map(|()| pb::DisableReplicationResponse {})
        })
        .await
    }

    async fn promote_volume(
        &self,
        req: Request<pb::PromoteVolumeRequest>,
    ) -> Result<Response<pb::PromoteVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "promote", move |d| async move {
            d.promote(&r.volume_id, r.force)
                .await
                .map(|d| pb::PromoteVolumeResponse { divergence_point: d.unwrap_or_default() })
        })
        .await
    }

    async fn demote_volume(
        &self,
        req: Request<pb::DemoteVolumeRequest>,
    ) -> Result<Response<pb::DemoteVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "demote", move |d| async move {
            d.demote(&r.volume_id).await.map(|()| pb::DemoteVolumeResponse {})
        })
        .await
    }

    async fn resync_volume(
        &self,
        req: Request<pb::ResyncVolumeRequest>,
    ) -> Result<Response<pb::ResyncVolumeResponse>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let (ctx, target) = (r.ctx.take(), r.volume_id.clone());
        self.guarded(ctx, &target, "resync", move |d| async move {
            d.resync(&r.volume_id).await.map(|ready| pb::ResyncVolumeResponse { ready })
        })
        .await
    }

    async fn get_replication_info(
        &self,
        req: Request<pb::GetReplicationInfoRequest>,
    ) -> Result<Response<pb::ReplicationInfo>, Status> {
        let r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        let state = self.driver.replication_info(&r.volume_id).await.map_err(driver_err)?;
        let pending = if r.estimate_pending {
            self.driver.pending_bytes(&r.volume_id).await.map_err(driver_err)?.map_or(-1, |b| b as i64)
        } else {
            -1
        };
        Ok(Response::new(pb::ReplicationInfo { pending_bytes: pending, ..replication_info(r.volume_id, state) }))
    }

    async fn sync_group(&self, req: Request<pb::SyncGroupRequest>) -> Result<Response<pb::SyncGroupResponse>, Status> {
        let mut r = req.into_inner();
        require("group_id", &r.group_id)?;
        let (ctx, target) = (r.ctx.take(), r.group_id.clone());
        let metrics = self.metrics.clone();
        self.guarded(ctx, &target, "sync_group", move |d| async move {
            let peer = (!r.peer_endpoint.is_empty()).then_some(r.peer_endpoint.as_str());
            let result = d.sync_group(&r.group_id, r.r#final, peer).await;
            metrics.synced(&r.group_id, "asked", &result);
            result.map(|rep| pb::SyncGroupResponse {
                recovery_point_id: rep.recovery_point_id,
                bytes: rep.bytes as i64,
                duration_ms: rep.duration_ms as i64,
                created_at_ms: rep.created_at_ms,
                full: rep.full,
            })
        })
        .await
    }

    async fn clone_recovery_point(
        &self,
        req: Request<pb::CloneRecoveryPointRequest>,
    ) -> Result<Response<pb::CloneInfo>, Status> {
        let mut r = req.into_inner();
        require("volume_id", &r.volume_id)?;
        require("clone_id", &r.clone_id)?;
        let (ctx, target) = (r.ctx.take(), r.clone_id.clone());
        self.guarded(ctx, &target, "clone_recovery_point", move |d| async move {
            d.clone_recovery_point(&r.volume_id, &r.clone_id).await.map(|c| pb::CloneInfo {
                clone_id: c.clone_id,
                volume_id: c.volume_id,
                recovery_point_id: c.recovery_point_id,
                connection: Some(pb::ConnectionInfo {
                    driver_volume_type: c.connection.driver_volume_type,
                    uri: c.connection.uri,
                }),
            })
        })
        .await
    }

    async fn delete_clone(
        &self,
        req: Request<pb::DeleteCloneRequest>,
    ) -> Result<Response<pb::DeleteCloneResponse>, Status> {
        let mut r = req.into_inner();
        require("clone_id", &r.clone_id)?;
        let (ctx, target) = (r.ctx.take(), r.clone_id.clone());
        self.guarded(ctx, &target, "delete_clone", move |d| async move {
            d.delete_clone(&r.clone_id).await.map(|()| pb::DeleteCloneResponse {})
        })
        .await
    }

    async fn fence(&self, req: Request<pb::FenceRequest>) -> Result<Response<pb::FenceResponse>, Status> {
        let mut ctx = req.into_inner().ctx;
        if let Some(c) = ctx.as_mut().filter(|c| c.op_id.is_empty()) {
            c.op_id = "fence".into();
        }
        let ctx = guard::validate_ctx(ctx)?;
        let highest = self.raise_fence(&ctx.fence_scope, ctx.epoch).await?;
        Ok(Response::new(pb::FenceResponse { highest_epoch: highest }))
    }

    async fn get_operation(
        &self,
        req: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::OperationRecord>, Status> {
        let r = req.into_inner();
        require("op_id", &r.op_id)?;
        let running = self.in_flight.lock().expect("in-flight map poisoned").values().any(|op| op.op_id == r.op_id);
        let record = match self.recorded(&r.op_id).await? {
            Some(o) if o.code == 0 => {
                pb::OperationRecord { op_id: r.op_id, state: "succeeded".into(), code: 0, message: String::new() }
            }
            Some(o) => pb::OperationRecord { op_id: r.op_id, state: "failed".into(), code: o.code, message: o.message },
            None if running => {
                pb::OperationRecord { op_id: r.op_id, state: "running".into(), code: 0, message: String::new() }
            }
            None => pb::OperationRecord { op_id: r.op_id, state: "unknown".into(), code: 0, message: String::new() },
        };
        Ok(Response::new(record))
    }
}

/// A running agent server.
pub struct RunningAgent {
    /// The address the server is bound to.
    pub local_addr: SocketAddr,
    /// Resolves when the server stops.
    pub handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Periodic syncs that failed, for the registration's heartbeats to report.
    pub failures: SyncFailures,
    /// Where the periodic syncs' peers are, kept current by the heartbeats' answers.
    pub peers: PeerEndpoints,
    /// The agent's metrics, for its metrics endpoint.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
}

/// Serves `drover.agent.v1`, health and reflection on `listener` until `shutdown` fires;
/// mutations admitted to run are written to `op_log` when given.
pub async fn serve(
    driver: Arc<dyn Driver>,
    ledger: Ledger,
    op_log: Option<Arc<crate::oplog::OpLog>>,
    listener: tokio::net::TcpListener,
    tls: Option<&drover_proto::tls::TlsFiles>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<RunningAgent> {
    let local_addr = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServer<AgentService>>().await;
    let (reflection, reflection_alpha) =
        drover_proto::reflection::services(&[pb::agent_server::SERVICE_NAME, pb::replica_server::SERVICE_NAME])
            .map_err(std::io::Error::other)?;
    driver.attach_fences(crate::driver::Fences(ledger.clone()));
    let metrics = crate::metrics::AgentMetrics::new();
    let replica = pb::replica_server::ReplicaServer::new(crate::replica::ReplicaService {
        driver: driver.clone(),
        ledger: ledger.clone(),
        metrics: metrics.clone(),
    })
    .max_decoding_message_size(64 << 20);
    let failures = SyncFailures::default();
    let peers = PeerEndpoints::default();
    tokio::spawn(run_scheduler(driver.clone(), failures.clone(), peers.clone(), metrics.clone(), shutdown.clone()));
    let accepted = metrics.accepted_connections.clone();
    let incoming = tokio_stream::StreamExt::map(drover_proto::incoming(listener), move |c| {
        if c.is_ok() {
            accepted.inc();
        }
        c
    });
    let mut server = tonic::transport::Server::builder();
    let gated = match tls {
        Some(files) => {
            // Every caller must present a certificate of the cluster's CA; the gate then
            // admits each method only to the roles that may call it.
            let cfg = files.server(true).map_err(std::io::Error::other)?;
            server = server.tls_config(cfg).map_err(std::io::Error::other)?;
            true
        }
        None => {
            tracing::warn!(
                "serving in plain text (insecure): anyone who reaches this port can call mutations; for development only"
            );
            false
        }
    };
    let handle = tokio::spawn(
        server
            .trace_fn(drover_proto::trace::server_span)
            .layer(tower::util::option_layer(gated.then_some(gate::GateLayer)))
            .initial_stream_window_size(Some(crate::replica::WINDOW_BYTES))
            .initial_connection_window_size(Some(2 * crate::replica::WINDOW_BYTES))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(AgentServer::new(AgentService::new(driver.clone(), ledger, op_log, metrics.clone())))
            .add_service(replica)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()),
    );
    Ok(RunningAgent { local_addr, handle, failures, peers, metrics })
}
