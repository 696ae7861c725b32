//! Replication of one volume outside any group (Cinder v2.1's per-volume replication).
//! The volume replicates through a group of its own (`for_volume` set, named after the
//! volume's id, left out of group listings), so every transition is the group one, with
//! its procedures, fencing and history; the user addresses the volume.

use drover_proto::v1 as pb;
use drover_store::{Compare, Txn};

use super::ReplicationApi;
use crate::error::{ApiError, ApiResult, raced};
use crate::model::{GroupRec, keys};

impl ReplicationApi {
    /// The volume's own replication group, if it has one; an error when the volume is in
    /// an ordinary group (that group is what replicates).
    async fn own_group(&self, volume: &str, project: &str) -> ApiResult<(crate::model::VolumeRec, Option<GroupRec>)> {
        let v = self.core.repo.volume(volume, project).await?.rec;
        if v.group_id.is_empty() {
            return Ok((v, None));
        }
        let g = self.core.repo.get::<GroupRec>(&keys::group(&v.group_id)).await?.map(|g| g.rec);
        match g {
            Some(g) if g.for_volume == v.id => Ok((v, Some(g))),
            Some(g) => Err(ApiError::FailedPrecondition(format!(
                "volume {} is in group {}, which is what replicates it: use `drover group … {}`",
                v.name, g.name, g.name
            ))),
            None => Ok((v, None)),
        }
    }

    fn not_replicated(v: &crate::model::VolumeRec) -> ApiError {
        ApiError::FailedPrecondition(format!(
            "volume {} is not replicated on its own; enable it with `drover volume enable-replication {}`",
            v.name, v.name
        ))
    }

    pub(crate) async fn enable_volume(&self, r: pb::VolumeReplicationRequest) -> ApiResult<pb::ReplicationResult> {
        let (v, own) = self.own_group(&r.volume, &r.project).await?;
        let group = match own {
            Some(g) => g,
            None => {
                let groups = crate::service::groups::GroupApi { core: self.core.clone() };
                let created = groups
                    .create(pb::CreateGroupRequest {
                        name: format!("volume-{}", v.id),
                        project: v.project.clone(),
                        group_type: "replication".into(),
                        backend: v.backend.clone(),
                        volumes: vec![v.id.clone()],
                        ..Default::default()
                    })
                    .await?;
                let current = self.core.repo.get::<GroupRec>(&keys::group(&created.id)).await?.ok_or_else(|| {
                    ApiError::Internal(format!("the group of volume {} vanished as it was made", v.name))
                })?;
                let mut rec = current.rec.clone();
                rec.for_volume = v.id.clone();
                let txn = Txn::new()
                    .when(Compare::ModRevisionEquals(keys::group(&rec.id).into_bytes(), current.rev))
                    .and_then_all(rec.writes());
                if !self.core.repo.txn(txn).await?.succeeded {
                    return Err(raced(&format!("the replication group of volume {}", v.name)));
                }
                rec
            }
        };
        self.enable(pb::EnableReplicationRequest {
            group: group.id,
            project: v.project,
            target_backend: r.target_backend,
            sync_interval_seconds: r.sync_interval_seconds,
            no_wait: r.no_wait,
        })
        .await
    }

    pub(crate) async fn disable_volume(&self, r: pb::VolumeReplicationRequest) -> ApiResult<pb::ReplicationResult> {
        let (v, own) = self.own_group(&r.volume, &r.project).await?;
        let g = own.ok_or_else(|| Self::not_replicated(&v))?;
        self.disable(pb::DisableReplicationRequest { group: g.id, project: v.project, no_wait: r.no_wait }).await
    }

    pub(crate) async fn failover_volume(&self, r: pb::FailoverVolumeRequest) -> ApiResult<pb::ReplicationResult> {
        let (v, own) = self.own_group(&r.volume, &r.project).await?;
        let g = own.ok_or_else(|| Self::not_replicated(&v))?;
        self.failover(pb::FailoverGroupRequest {
            group: g.id,
            project: v.project,
            target_backend: r.target_backend,
            force: r.force,
            discard_changes_on: r.discard_changes_on,
            no_wait: r.no_wait,
        })
        .await
    }

    pub(crate) async fn volume_info(&self, r: pb::VolumeReplicationRequest) -> ApiResult<pb::GroupReplicationInfo> {
        let (v, own) = self.own_group(&r.volume, &r.project).await?;
        let g = own.ok_or_else(|| Self::not_replicated(&v))?;
        self.info(pb::GetReplicationInfoRequest { group: g.id, project: v.project, predict: false }).await
    }
}
