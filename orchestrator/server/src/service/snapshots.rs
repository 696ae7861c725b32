//! SnapshotService: snapshots of a volume, or of a group's volumes at one instant.
//!
//! Like every transition, taking and deleting a snapshot is a procedure: its intent (the
//! record with status `creating` or `deleting` and its pending op) is written with its
//! execution, whose owner calls the agent with the op_id (in the fence scope
//! `snapshot/<id>`, so a snapshot never moves a group's fence under a running failover)
//! and writes the outcome if it still holds its claim.
//!
//! A snapshot is taken where its volumes are active and stays on that backend: snapshots
//! are not replicated. After a failover the record says so (`note`), and volumes are
//! still made from it at its backend.

use std::sync::Arc;

use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use drover_store::{Compare, Txn, TxnOp};
use tonic::{Request, Response, Status};

use super::Core;
use super::shared::{agent_refused, from_agent, writable_backend};
use crate::agents::{Deadline, ctx};
use crate::error::{ApiError, ApiResult, raced};
use crate::model::{
    PendingOp, SnapshotMemberRec, SnapshotRec, VolumeRec, keys, now_ms, replication_status, snapshot_status,
    volume_status,
};
use crate::repo::{Expect, put, validate_name, validate_new_name};

/// The backend capabilities a volume snapshot and a group snapshot need.
const SNAPSHOT: &str = "snapshot";
const GROUP_SNAPSHOT: &str = "consistent-group-snapshot";

pub struct SnapshotApi {
    pub core: Arc<Core>,
}

/// A volume that can be snapshotted now, or why not.
fn snapshottable(v: &VolumeRec) -> ApiResult<()> {
    if v.status != volume_status::AVAILABLE {
        return Err(ApiError::FailedPrecondition(format!(
            "volume {} is {}; only an available volume can be snapshotted",
            v.name, v.status
        )));
    }
    if replication_status::is_transient(&v.replication_status) {
        return Err(ApiError::FailedPrecondition(format!(
            "volume {} is {}; take the snapshot once that has finished",
            v.name, v.replication_status
        )));
    }
    Ok(())
}

fn member(v: &VolumeRec) -> SnapshotMemberRec {
    SnapshotMemberRec { volume_id: v.id.clone(), volume_name: v.name.clone(), size_bytes: v.size_bytes }
}

impl SnapshotApi {
    async fn create(&self, r: pb::CreateSnapshotRequest) -> ApiResult<SnapshotRec> {
        validate_new_name("name", &r.name)?;
        let v = self.core.repo.volume(&r.volume, &r.project).await?;
        snapshottable(&v.rec)?;
        let backend = v.rec.active_backend.clone();
        writable_backend(&self.core, &backend, SNAPSHOT).await?;
        let rec = self.new_rec(&r.name, &v.rec.project, String::new(), &backend, vec![member(&v.rec)]);
        let txn = Txn::new().when(Compare::ModRevisionEquals(keys::volume(&v.rec.id).into_bytes(), v.rev));
        self.submit(rec, txn, vec![format!("volume/{}", v.rec.id)], &format!("volume {}", v.rec.name)).await
    }

    async fn create_group(&self, r: pb::CreateGroupSnapshotRequest) -> ApiResult<SnapshotRec> {
        validate_new_name("name", &r.name)?;
        let g = self.core.repo.group(&r.group, &r.project).await?;
        if g.rec.volume_ids.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} has no volumes; add some with `drover group add-volumes` first",
                g.rec.name
            )));
        }
        if replication_status::is_transient(&g.rec.replication_status) {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is {}; take the snapshot once that has finished",
                g.rec.name, g.rec.replication_status
            )));
        }
        let backend = g.rec.active_backend.clone();
        writable_backend(&self.core, &backend, GROUP_SNAPSHOT).await?;
        let mut members = Vec::new();
        let mut txn = Txn::new().when(Compare::ModRevisionEquals(keys::group(&g.rec.id).into_bytes(), g.rev));
        for id in &g.rec.volume_ids {
            let v = self.core.repo.get::<VolumeRec>(&keys::volume(id)).await?.ok_or_else(|| {
                ApiError::FailedPrecondition(format!("group {} lists volume {id}, which does not exist", g.rec.name))
            })?;
            snapshottable(&v.rec)?;
            if v.rec.active_backend != backend {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is active at {}, the group at {backend}; a group snapshot needs every volume on one backend",
                    v.rec.name, v.rec.active_backend
                )));
            }
            txn = txn.when(Compare::ModRevisionEquals(keys::volume(id).into_bytes(), v.rev));
            members.push(member(&v.rec));
        }
        let rec = self.new_rec(&r.name, &g.rec.project, g.rec.id.clone(), &backend, members);
        self.submit(rec, txn, vec![format!("group/{}", g.rec.id)], &format!("group {}", g.rec.name)).await
    }

    fn new_rec(
        &self,
        name: &str,
        project: &str,
        group_id: String,
        backend: &str,
        members: Vec<SnapshotMemberRec>,
    ) -> SnapshotRec {
        SnapshotRec {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.into(),
            project: project.into(),
            group_id,
            backend: backend.into(),
            status: snapshot_status::CREATING.into(),
            status_reason: String::new(),
            created_at_ms: now_ms(),
            members,
            pending: Some(PendingOp::new("create", backend)),
            execution_id: String::new(),
            adopted_from: String::new(),
        }
    }

    /// Writes the new snapshot's intent with its execution (if `txn`'s comparisons of
    /// what it covers still hold and its name is free) and waits for the answer.
    async fn submit(&self, rec: SnapshotRec, txn: Txn, locks: Vec<String>, of: &str) -> ApiResult<SnapshotRec> {
        let name_key = keys::snapshot_name(&rec.project, &rec.name);
        let txn = txn
            .when(Compare::Absent(name_key.clone().into_bytes()))
            .when(Compare::Absent(keys::snapshot(&rec.id).into_bytes()))
            .and_then(TxnOp::put(name_key.clone(), rec.id.clone()))
            .and_then(put(&keys::snapshot(&rec.id), &rec))
            .and_then_all(rec.members.iter().map(|m| TxnOp::put(keys::volume_snapshot(&m.volume_id, &rec.id), vec![])));
        let taken = async {
            if self.core.repo.store().get(name_key.as_bytes()).await?.is_some() {
                return Err(ApiError::AlreadyExists(format!(
                    "snapshot {} already exists in project {}; pick another name",
                    rec.name, rec.project
                )));
            }
            Err(raced(of))
        };
        let op = rec.pending.clone().expect("a new snapshot has a pending op");
        let proc = crate::procedures::SnapshotTransition::new(self.core.clone(), &rec, &op, locks);
        let id = match self.core.procedures.submit_with(Box::new(proc), txn).await {
            Ok((id, _)) => id,
            Err(drover_procedure::SubmitError::Conflict) => return taken.await,
            Err(e) => return Err(crate::procedures::submit_error(e, &format!("snapshot of {of}"))),
        };
        tracing::info!(snapshot = %rec.id, name = %rec.name, execution = %id, "snapshot submitted");
        crate::procedures::wait_output(&self.core, &id).await
    }

    /// Writes `rec` if it is as the step read it and the step still owns its execution.
    async fn save(&self, rec: &SnapshotRec, at: &Expect) -> ApiResult<()> {
        let key = keys::snapshot(&rec.id);
        let txn = at.claimed(at.at(Txn::new(), &key)).and_then(put(&key, rec));
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(raced(&format!("snapshot {}", rec.name)));
        }
        Ok(())
    }

    /// Removes the record and its name, under the same conditions.
    async fn forget(&self, rec: &SnapshotRec, at: &Expect) -> ApiResult<()> {
        let key = keys::snapshot(&rec.id);
        let txn = at
            .claimed(at.at(Txn::new(), &key))
            .and_then(TxnOp::delete(key.clone()))
            .and_then(TxnOp::delete(keys::snapshot_name(&rec.project, &rec.name)))
            .and_then_all(rec.members.iter().map(|m| TxnOp::delete(keys::volume_snapshot(&m.volume_id, &rec.id))));
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(raced(&format!("snapshot {}", rec.name)));
        }
        Ok(())
    }

    pub(crate) async fn drive_create(&self, mut rec: SnapshotRec, epoch: i64, at: &Expect) -> ApiResult<SnapshotRec> {
        let op = rec.pending.clone().expect("create has a pending op");
        // The agent serialises operations per target: a group's, or the one volume's.
        let target = if rec.group_id.is_empty() { rec.members[0].volume_id.clone() } else { rec.group_id.clone() };
        let req = apb::CreateGroupSnapshotRequest {
            ctx: ctx(op.op_id.clone(), epoch as u64, format!("snapshot/{}", rec.id)),
            group_id: target,
            snapshot_id: rec.id.clone(),
            volume_ids: rec.members.iter().map(|m| m.volume_id.clone()).collect(),
        };
        let call = self
            .core
            .agents
            .mutate(&rec.backend, Deadline::Call, req, |mut c, req| async move { c.create_group_snapshot(req).await })
            .await;
        let what = format!("snapshot {}", rec.name);
        match call {
            Ok(_) => {
                rec.status = snapshot_status::AVAILABLE.into();
                rec.pending = None;
                self.save(&rec, at).await?;
                Ok(rec)
            }
            Err(s) if agent_refused(&s) => {
                // Nothing was taken: forget it so its name is free again.
                self.forget(&rec, at).await?;
                Err(from_agent(&rec.backend, &format!("take {what}"), &s))
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("take {what}"), &s);
                rec.status = snapshot_status::ERROR.into();
                rec.status_reason = format!("{err}; delete the snapshot and take it again");
                rec.pending = None;
                self.save(&rec, at).await?;
                Err(err)
            }
        }
    }

    async fn delete(&self, r: pb::DeleteSnapshotRequest) -> ApiResult<()> {
        let snap = self.core.repo.snapshot(&r.snapshot, &r.project).await?;
        let s = &snap.rec;
        if s.status != snapshot_status::AVAILABLE && s.status != snapshot_status::ERROR {
            return Err(ApiError::FailedPrecondition(format!(
                "snapshot {} is {}; wait for that to finish (`drover snapshot show {}`)",
                s.name, s.status, s.name
            )));
        }
        let (made, more) =
            super::shared::indexed::<VolumeRec>(&self.core, &keys::snapshot_volumes(&s.id), keys::volume, 20).await?;
        let mut made: Vec<String> = made.into_iter().filter(|v| v.snapshot_id == s.id).map(|v| v.name).collect();
        if more {
            made.push("and more".into());
        }
        if !made.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "volume(s) {} were made from snapshot {} and read through it; delete them first",
                made.join(", "),
                s.name
            )));
        }
        writable_backend(&self.core, &s.backend, SNAPSHOT).await?;
        let mut rec = s.clone();
        rec.status = snapshot_status::DELETING.into();
        rec.status_reason.clear();
        let op = PendingOp::new("delete", &rec.backend);
        rec.pending = Some(op.clone());
        let txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::snapshot(&rec.id).into_bytes(), snap.rev))
            .and_then(put(&keys::snapshot(&rec.id), &rec));
        let locks = vec![format!("snapshot/{}", rec.id)];
        let proc = crate::procedures::SnapshotTransition::new(self.core.clone(), &rec, &op, locks);
        let id = match self.core.procedures.submit_with(Box::new(proc), txn).await {
            Ok((id, _)) => id,
            Err(drover_procedure::SubmitError::Conflict) => return Err(raced(&format!("snapshot {}", rec.name))),
            Err(e) => return Err(crate::procedures::submit_error(e, &format!("snapshot {}", rec.name))),
        };
        crate::procedures::wait_output::<Option<()>>(&self.core, &id).await.map(|_| ())
    }

    pub(crate) async fn drive_delete(&self, mut rec: SnapshotRec, epoch: i64, at: &Expect) -> ApiResult<()> {
        let op = rec.pending.clone().expect("delete has a pending op");
        let req = apb::DeleteSnapshotRequest {
            ctx: ctx(op.op_id.clone(), epoch as u64, format!("snapshot/{}", rec.id)),
            snapshot_id: rec.id.clone(),
        };
        let call = self
            .core
            .agents
            .mutate(&rec.backend, Deadline::Call, req, |mut c, req| async move { c.delete_snapshot(req).await })
            .await;
        match call {
            Ok(_) => self.forget(&rec, at).await,
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("delete snapshot {}", rec.name), &s);
                // Refused: it is still there, as it was. Unknown: it may be half gone.
                rec.status = if agent_refused(&s) { snapshot_status::AVAILABLE } else { snapshot_status::ERROR }.into();
                rec.status_reason = format!("delete failed: {err}; retry the delete");
                rec.pending = None;
                self.save(&rec, at).await?;
                Err(err)
            }
        }
    }

    /// Which member volumes are no longer active where the snapshot is.
    async fn note(&self, s: &SnapshotRec) -> ApiResult<String> {
        let mut moved = Vec::new();
        for m in &s.members {
            if let Some(v) = self.core.repo.get::<VolumeRec>(&keys::volume(&m.volume_id)).await?
                && v.rec.active_backend != s.backend
            {
                moved.push(format!("{} is active at {} now", m.volume_name, v.rec.active_backend));
            }
        }
        Ok(if moved.is_empty() {
            String::new()
        } else {
            format!(
                "{}; snapshots are not replicated: this one stays at {}, where volumes can still be made from it",
                moved.join(", "),
                s.backend
            )
        })
    }

    async fn to_pb(&self, s: &SnapshotRec) -> ApiResult<pb::Snapshot> {
        Ok(s.to_pb(self.note(s).await?))
    }

    async fn list(&self, r: pb::ListSnapshotsRequest) -> ApiResult<pb::ListSnapshotsResponse> {
        let index = if r.project.is_empty() {
            None
        } else {
            validate_name("project", &r.project)?;
            Some(keys::snapshot_name(&r.project, ""))
        };
        let group = match r.group.as_str() {
            "" => None,
            g => Some(self.core.repo.group(g, &r.project).await?.rec.id),
        };
        let volume = match r.volume.as_str() {
            "" => None,
            v => Some(self.core.repo.volume(v, &r.project).await?.rec.id),
        };
        let paging = crate::repo::PageRequest { limit: r.limit, marker: r.marker };
        let (snaps, next_marker) = self.core.repo.page::<SnapshotRec>(keys::SNAPSHOTS, index, &paging).await?;
        let mut out = Vec::new();
        for s in snaps.iter().filter(|s| {
            (!r.groups_only || !s.group_id.is_empty())
                && group.as_ref().is_none_or(|g| &s.group_id == g)
                && volume.as_ref().is_none_or(|v| s.members.iter().any(|m| &m.volume_id == v))
        }) {
            out.push(self.to_pb(s).await?);
        }
        Ok(pb::ListSnapshotsResponse { snapshots: out, next_marker })
    }
}

#[tonic::async_trait]
impl pb::snapshot_service_server::SnapshotService for SnapshotApi {
    async fn create_snapshot(&self, req: Request<pb::CreateSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        let s = self.create(crate::auth::scoped(req)?).await?;
        Ok(Response::new(self.to_pb(&s).await?))
    }

    async fn create_group_snapshot(
        &self,
        req: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let s = self.create_group(crate::auth::scoped(req)?).await?;
        Ok(Response::new(self.to_pb(&s).await?))
    }

    async fn get_snapshot(&self, req: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::Snapshot>, Status> {
        let r = crate::auth::scoped(req)?;
        let s = self.core.repo.snapshot(&r.snapshot, &r.project).await?;
        Ok(Response::new(self.to_pb(&s.rec).await?))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list(crate::auth::scoped(req)?).await?))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.delete(crate::auth::scoped(req)?).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }
}
