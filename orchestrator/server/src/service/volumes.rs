//! Volumes: created, extended and deleted through the owning backend's agent.
//!
//! Each change is intent first: one transaction records the transient status and the
//! pending op (its revision is the epoch stamped on the agent call), then the agent is
//! called with that op_id, then one transaction compares the revision and records the
//! outcome. A crash in between leaves the pending op in the store for [`VolumeApi::resume`].

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
    AdoptedSnapshot, BackendRec, PendingOp, SnapshotMemberRec, SnapshotRec, VolumeRec, keys, now_ms,
    replication_status, snapshot_status, volume_status,
};
use crate::repo::{Expect, Versioned, put, validate_name, validate_size};
use crate::transitions::{VolumeAction, VolumeStatus, check_volume, verify_volume_end};

/// `drover.v1.VolumeService`.
pub struct VolumeApi {
    pub core: Arc<Core>,
}

/// A volume that belongs to a group is changed through its group.
fn require_ungrouped(v: &VolumeRec) -> ApiResult<()> {
    if v.group_id.is_empty() {
        return Ok(());
    }
    Err(ApiError::FailedPrecondition(format!(
        "volume {} is in group {}; remove it from the group first (`drover group remove-volumes`)",
        v.name, v.group_id
    )))
}

impl VolumeApi {
    fn volume_txn(rec: &VolumeRec, expected_rev: i64) -> Txn {
        Txn::new()
            .when(Compare::ModRevisionEquals(keys::volume(&rec.id).into_bytes(), expected_rev))
            .and_then(put(&keys::volume(&rec.id), rec))
    }

    /// Writes `rec` if the volume is still as read and the step still owns its execution;
    /// returns the new revision.
    async fn save(&self, action: VolumeAction, rec: &VolumeRec, at: &Expect) -> ApiResult<i64> {
        verify_volume_end(action, Some(&rec.status))?;
        let resp = self.core.repo.txn(at.claimed(Self::volume_txn(rec, at.rev))).await?;
        if !resp.succeeded {
            return Err(raced(&format!("volume {}", rec.id)));
        }
        Ok(resp.revision)
    }

    /// The intent of a transition: the transient status and pending op, if the volume is
    /// still at the revision read. It is written with the execution that drives it.
    fn begin_txn(v: &Versioned<VolumeRec>, status: &str, op: PendingOp) -> (VolumeRec, Txn) {
        let mut rec = v.rec.clone();
        rec.status = status.to_string();
        rec.status_reason.clear();
        rec.pending = Some(op);
        let txn = Self::volume_txn(&rec, v.rev);
        (rec, txn)
    }

    /// Submits the execution that drives the pending op of `rec`, with its intent `txn`,
    /// and waits for its answer. `conflict` is the error when the intent's comparisons
    /// fail.
    async fn submit_op<T: serde::de::DeserializeOwned>(
        &self,
        rec: &VolumeRec,
        txn: Txn,
        conflict: impl FnOnce() -> ApiError,
    ) -> ApiResult<T> {
        let op = rec.pending.clone().expect("a submitted volume has a pending op");
        let proc = crate::procedures::VolumeTransition::new(self.core.clone(), rec, &op);
        let (id, rev) = match self.core.procedures.submit_with(Box::new(proc), txn).await {
            Ok(x) => x,
            Err(drover_procedure::SubmitError::Conflict) => return Err(conflict()),
            Err(e) => return Err(crate::procedures::submit_error(e, &format!("volume {}", rec.name))),
        };
        tracing::info!(volume = %rec.id, action = %op.action, execution = %id, rev, "volume transition submitted");
        crate::procedures::wait_output(&self.core, &id).await
    }

    /// Removes the volume and its name if it is still as read and the step still owns its
    /// execution; returns whether it did.
    async fn forget(&self, action: VolumeAction, rec: &VolumeRec, at: &Expect) -> ApiResult<bool> {
        self.forget_with(action, rec, at, &[]).await
    }

    /// [`Self::forget`], with the snapshot records `snapshots` removed in the same
    /// transaction.
    async fn forget_with(
        &self,
        action: VolumeAction,
        rec: &VolumeRec,
        at: &Expect,
        snapshots: &[SnapshotRec],
    ) -> ApiResult<bool> {
        verify_volume_end(action, None)?;
        let mut txn = at
            .claimed(at.at(Txn::new(), &keys::volume(&rec.id)))
            .and_then(TxnOp::delete(keys::volume(&rec.id)))
            .and_then(TxnOp::delete(keys::volume_name(&rec.project, &rec.name)));
        if !rec.snapshot_id.is_empty() {
            txn = txn.and_then(TxnOp::delete(keys::snapshot_volume(&rec.snapshot_id, &rec.id)));
        }
        for s in snapshots {
            txn = txn
                .and_then(TxnOp::delete(keys::snapshot(&s.id)))
                .and_then(TxnOp::delete(keys::snapshot_name(&s.project, &s.name)))
                .and_then_all(s.members.iter().map(|m| TxnOp::delete(keys::volume_snapshot(&m.volume_id, &s.id))));
        }
        Ok(self.core.repo.txn(txn).await?.succeeded)
    }

    /// Where to attach a volume now (its active backend's connection info).
    pub(crate) async fn attach(&self, volume: &str, project: &str) -> ApiResult<pb::AttachVolumeResponse> {
        let v = self.core.repo.volume(volume, project).await?;
        if v.rec.status != volume_status::AVAILABLE {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is {}; only an available volume can be attached",
                v.rec.name, v.rec.status
            )));
        }
        let backend = v.rec.active_backend.clone();
        let op_id = uuid::Uuid::now_v7().to_string();
        let req = apb::AttachVolumeRequest {
            ctx: ctx(op_id, v.rev as u64, format!("volume/{}", v.rec.id)),
            volume_id: v.rec.id.clone(),
        };
        let conn = self
            .core
            .agents
            .mutate(&backend, Deadline::Call, req.clone(), |mut c, req| async move { c.attach_volume(req).await })
            .await
            .map_err(|s| from_agent(&backend, &format!("attach volume {}", v.rec.name), &s))?;
        Ok(pb::AttachVolumeResponse { backend, driver_volume_type: conn.driver_volume_type, uri: conn.uri })
    }

    /// Writes a managed volume and the snapshots it brought, in one transaction.
    async fn save_managed(&self, rec: &VolumeRec, op: &PendingOp, at: &Expect) -> ApiResult<i64> {
        verify_volume_end(VolumeAction::Manage, Some(&rec.status))?;
        let mut txn = at.claimed(Self::volume_txn(rec, at.rev));
        for s in &op.snapshots {
            let snap = SnapshotRec {
                id: s.id.clone(),
                name: s.name.clone(),
                project: rec.project.clone(),
                group_id: String::new(),
                backend: rec.backend.clone(),
                status: snapshot_status::AVAILABLE.into(),
                status_reason: format!("taken over with volume {} from the backend's {:?}", rec.name, s.reference),
                created_at_ms: s.created_at_ms,
                members: vec![SnapshotMemberRec {
                    volume_id: rec.id.clone(),
                    volume_name: rec.name.clone(),
                    size_bytes: s.size_bytes,
                }],
                pending: None,
                execution_id: String::new(),
                adopted_from: s.reference.clone(),
            };
            txn = txn
                .and_then(put(&keys::snapshot(&s.id), &snap))
                .and_then(TxnOp::put(keys::volume_snapshot(&rec.id, &s.id), vec![]));
        }
        let resp = self.core.repo.txn(txn).await?;
        if !resp.succeeded {
            return Err(raced(&format!("volume {}", rec.id)));
        }
        Ok(resp.revision)
    }

    /// Frees the snapshot names a manage that did not happen reserved.
    async fn free_snapshot_names(&self, project: &str, snapshots: &[AdoptedSnapshot]) {
        for s in snapshots {
            let key = keys::snapshot_name(project, &s.name);
            let txn = Txn::new()
                .when(Compare::ValueEquals(key.clone().into_bytes(), s.id.clone().into_bytes()))
                .and_then(TxnOp::delete(key));
            if let Err(e) = self.core.repo.txn(txn).await {
                tracing::warn!(snapshot = %s.name, error = %e, "could not free a reserved snapshot name");
            }
        }
    }

    async fn fail(&self, action: VolumeAction, mut rec: VolumeRec, at: &Expect, reason: String) -> ApiResult<()> {
        rec.status = volume_status::ERROR.into();
        rec.status_reason = reason;
        rec.pending = None;
        self.save(action, &rec, at).await.map(|_| ())
    }

    pub(crate) async fn create(&self, mut r: pb::CreateVolumeRequest) -> ApiResult<VolumeRec> {
        crate::repo::validate_new_name("name", &r.name)?;
        validate_name("project", &r.project)?;
        // From a snapshot: made where the snapshot is, at least as large as its volume was.
        let source = if r.from_snapshot.is_empty() {
            if !r.from_volume.is_empty() {
                return Err(ApiError::InvalidArgument("`from_volume` goes with `from_snapshot`".into()));
            }
            None
        } else {
            let (snap, member, keep) =
                super::shared::snapshot_source(&self.core, &r.project, &r.from_snapshot, &r.from_volume).await?;
            if !r.backend.is_empty() && r.backend != snap.rec.backend {
                return Err(ApiError::InvalidArgument(format!(
                    "snapshot {} is at backend {}; a volume made from it is made there (leave `backend` empty)",
                    snap.rec.name, snap.rec.backend
                )));
            }
            r.backend = snap.rec.backend.clone();
            if r.size_bytes == 0 {
                r.size_bytes = member.size_bytes as i64;
            }
            if (r.size_bytes as u64) < member.size_bytes {
                return Err(ApiError::InvalidArgument(format!(
                    "size_bytes {} is smaller than the {} bytes volume {} had in snapshot {}",
                    r.size_bytes, member.size_bytes, member.volume_name, snap.rec.name
                )));
            }
            Some((snap.rec.clone(), member.volume_id, keep))
        };
        let size = validate_size("size_bytes", r.size_bytes)?;
        writable_backend(&self.core, &r.backend, if source.is_some() { "snapshot" } else { "volume" }).await?;
        let id = uuid::Uuid::now_v7().to_string();
        let rec = VolumeRec {
            id: id.clone(),
            name: r.name.clone(),
            project: r.project.clone(),
            size_bytes: size,
            backend: r.backend.clone(),
            active_backend: r.backend.clone(),
            group_id: String::new(),
            status: volume_status::CREATING.into(),
            replication_status: replication_status::DISABLED.into(),
            status_reason: String::new(),
            created_at_ms: now_ms(),
            pending: Some(PendingOp { new_size_bytes: size, ..PendingOp::new("create", &r.backend) }),
            snapshot_id: source.as_ref().map(|s| s.0.id.clone()).unwrap_or_default(),
            snapshot_volume_id: source.as_ref().map(|s| s.1.clone()).unwrap_or_default(),
        };
        let name_key = keys::volume_name(&r.project, &r.name);
        let mut txn = Txn::new();
        if let Some((snap, _, keep)) = &source {
            // The snapshot stays as read (not being deleted) until this volume's intent is
            // in, and the intent rewrites it: a delete that read it before this volume
            // existed then loses its own comparison and looks again.
            txn = txn
                .when(keep.clone())
                .and_then(put(&keys::snapshot(&snap.id), snap))
                .and_then(TxnOp::put(keys::snapshot_volume(&snap.id, &id), vec![]));
        }
        let txn = txn
            .when(Compare::Absent(name_key.clone().into_bytes()))
            .when(Compare::Absent(keys::volume(&id).into_bytes()))
            .and_then(TxnOp::put(name_key, id.clone()))
            .and_then(put(&keys::volume(&id), &rec));
        tracing::info!(volume = %id, name = %r.name, backend = %r.backend, "creating volume");
        self.submit_op(&rec, txn, || {
            ApiError::AlreadyExists(format!(
                "volume {} already exists in project {}; pick another name",
                r.name, r.project
            ))
        })
        .await
    }

    pub(crate) async fn drive_create(&self, mut rec: VolumeRec, epoch: i64, at: &Expect) -> ApiResult<VolumeRec> {
        let op = rec.pending.clone().expect("create has a pending op");
        let call = self
            .core
            .agents
            .mutate(
                &rec.backend,
                Deadline::Call,
                apb::CreateVolumeRequest {
                    ctx: ctx(op.op_id.clone(), epoch as u64, format!("volume/{}", rec.id)),
                    volume_id: rec.id.clone(),
                    size_bytes: op.new_size_bytes as i64,
                    snapshot_id: rec.snapshot_id.clone(),
                    snapshot_volume_id: rec.snapshot_volume_id.clone(),
                },
                |mut c, req| async move { c.create_volume(req).await },
            )
            .await;
        match call {
            Ok(_) => {
                rec.status = volume_status::AVAILABLE.into();
                rec.pending = None;
                self.save(VolumeAction::Create, &rec, at).await?;
                Ok(rec)
            }
            Err(s) if agent_refused(&s) => {
                // Nothing was created: forget the volume so its name is free again.
                self.forget(VolumeAction::Create, &rec, at).await?;
                Err(from_agent(&rec.backend, &format!("create volume {}", rec.name), &s))
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("create volume {}", rec.name), &s);
                self.fail(
                    VolumeAction::Create,
                    rec.clone(),
                    at,
                    format!("{err}; delete the volume and create it again"),
                )
                .await?;
                Err(err)
            }
        }
    }

    async fn delete(&self, r: pb::DeleteVolumeRequest) -> ApiResult<()> {
        let v = self.core.repo.volume(&r.volume, &r.project).await?;
        require_ungrouped(&v.rec)?;
        let snaps = super::shared::snapshots_of(&self.core, &v.rec.id).await?;
        if !snaps.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} has snapshot(s) {}; delete them first (`drover snapshot delete`)",
                v.rec.name,
                snaps.join(", ")
            )));
        }
        check_volume(VolumeAction::Delete, &v.rec.status, &v.rec.name)?;
        writable_backend(&self.core, &v.rec.backend, "volume").await?;
        let op = PendingOp::new("delete", &v.rec.backend);
        let (rec, txn) = Self::begin_txn(&v, VolumeStatus::Deleting.as_str(), op);
        self.submit_op::<()>(&rec, txn, || raced(&format!("volume {}", rec.name))).await
    }

    pub(crate) async fn drive_delete(&self, rec: VolumeRec, epoch: i64, at: &Expect) -> ApiResult<()> {
        let op = rec.pending.clone().expect("delete has a pending op");
        let call = self
            .core
            .agents
            .mutate(
                &rec.backend,
                Deadline::Call,
                apb::DeleteVolumeRequest {
                    ctx: ctx(op.op_id.clone(), epoch as u64, format!("volume/{}", rec.id)),
                    volume_id: rec.id.clone(),
                },
                |mut c, req| async move { c.delete_volume(req).await },
            )
            .await;
        match call {
            Ok(_) => {
                if !self.forget(VolumeAction::Delete, &rec, at).await? {
                    return Err(raced(&format!("volume {}", rec.id)));
                }
                tracing::info!(volume = %rec.id, "volume deleted");
                Ok(())
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("delete volume {}", rec.name), &s);
                self.fail(VolumeAction::Delete, rec, at, format!("{err}; retry the delete")).await?;
                Err(err)
            }
        }
    }

    async fn extend(&self, r: pb::ExtendVolumeRequest) -> ApiResult<VolumeRec> {
        let new_size = validate_size("new_size_bytes", r.new_size_bytes)?;
        let v = self.core.repo.volume(&r.volume, &r.project).await?;
        let rule = check_volume(VolumeAction::Extend, &v.rec.status, &v.rec.name)?;
        if new_size <= v.rec.size_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "`new_size_bytes` {new_size} is not larger than the current size {}; volumes only grow",
                v.rec.size_bytes
            )));
        }
        if v.rec.replication_status != replication_status::DISABLED
            && v.rec.replication_status != replication_status::NOT_CAPABLE
        {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} has replication {}; disable its group's replication before extending it",
                v.rec.name, v.rec.replication_status
            )));
        }
        writable_backend(&self.core, &v.rec.backend, "extend").await?;
        let op = PendingOp {
            new_size_bytes: new_size,
            prior_status: v.rec.status.clone(),
            ..PendingOp::new("extend", &v.rec.backend)
        };
        let (rec, txn) = Self::begin_txn(&v, rule.via.as_str(), op);
        self.submit_op::<VolumeRec>(&rec, txn, || raced(&format!("volume {}", rec.name))).await
    }

    pub(crate) async fn drive_extend(&self, mut rec: VolumeRec, epoch: i64, at: &Expect) -> ApiResult<VolumeRec> {
        let op = rec.pending.clone().expect("extend has a pending op");
        let call = self
            .core
            .agents
            .mutate(
                &rec.backend,
                Deadline::Call,
                apb::ExtendVolumeRequest {
                    ctx: ctx(op.op_id.clone(), epoch as u64, format!("volume/{}", rec.id)),
                    volume_id: rec.id.clone(),
                    new_size_bytes: op.new_size_bytes as i64,
                },
                |mut c, req| async move { c.extend_volume(req).await },
            )
            .await;
        match call {
            Ok(info) => {
                rec.size_bytes = info.size_bytes as u64;
                rec.status = volume_status::AVAILABLE.into();
                rec.pending = None;
                self.save(VolumeAction::Extend, &rec, at).await?;
                Ok(rec)
            }
            Err(s) if agent_refused(&s) => {
                // The backend refused: the volume is as it was.
                rec.status = op.prior_status();
                rec.pending = None;
                self.save(VolumeAction::Extend, &rec, at).await?;
                Err(from_agent(&rec.backend, &format!("extend volume {}", rec.name), &s))
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("extend volume {}", rec.name), &s);
                self.fail(
                    VolumeAction::Extend,
                    rec,
                    at,
                    format!("{err}; the size is unknown until the extend is retried"),
                )
                .await?;
                Err(err)
            }
        }
    }

    pub(crate) async fn list_manageable(&self, backend: &str) -> ApiResult<Vec<pb::ManageableVolume>> {
        validate_name("backend", backend)?;
        self.core.repo.get::<BackendRec>(&keys::backend(backend)).await?.ok_or_else(|| {
            ApiError::NotFound(format!("backend {backend:?} not found; list backends with `drover backend list`"))
        })?;
        let list = self
            .core
            .agents
            .call(backend, Deadline::Call, false, |mut c| async move {
                c.list_manageable_volumes(apb::ListManageableVolumesRequest {}).await
            })
            .await
            .map_err(|s| from_agent(backend, "list manageable volumes", &s))?;
        Ok(list
            .volumes
            .into_iter()
            .map(|m| pb::ManageableVolume {
                snapshots: m
                    .snapshots
                    .into_iter()
                    .map(|s| pb::ManageableSnapshot {
                        reference: s.reference,
                        volume_reference: m.reference.clone(),
                        size_bytes: s.size_bytes,
                        created_at_ms: s.created_at_ms,
                        safe_to_manage: m.safe_to_manage,
                        reason_not_safe: m.reason_not_safe.clone(),
                        kind: s.kind,
                    })
                    .collect(),
                reference: m.reference,
                size_bytes: m.size_bytes,
                safe_to_manage: m.safe_to_manage,
                reason_not_safe: m.reason_not_safe,
                backing_file: m.backing_file,
            })
            .collect())
    }

    /// A page of the backend's unmanaged volumes, sorted as asked.
    async fn manageable_page(
        &self,
        r: &pb::ListManageableVolumesRequest,
    ) -> ApiResult<pb::ListManageableVolumesResponse> {
        let (limit, by_size) = manageable_paging(r)?;
        let mut list = self.list_manageable(&r.backend).await?;
        if by_size {
            list.sort_by(|a, b| (a.size_bytes, &a.reference).cmp(&(b.size_bytes, &b.reference)));
        }
        let (volumes, next_marker) = page_after(list, &r.marker, limit, |m| m.reference.clone())?;
        Ok(pb::ListManageableVolumesResponse { volumes, next_marker })
    }

    /// A page of the snapshots the backend's unmanaged volumes carry.
    async fn manageable_snapshots_page(
        &self,
        r: &pb::ListManageableVolumesRequest,
    ) -> ApiResult<pb::ListManageableSnapshotsResponse> {
        let (limit, by_size) = manageable_paging(r)?;
        let mut list: Vec<pb::ManageableSnapshot> =
            self.list_manageable(&r.backend).await?.into_iter().flat_map(|m| m.snapshots).collect();
        let key = |s: &pb::ManageableSnapshot| format!("{}/{}", s.volume_reference, s.reference);
        match by_size {
            true => list.sort_by_key(|a| (a.size_bytes, key(a))),
            false => list.sort_by_key(key),
        }
        let (snapshots, next_marker) = page_after(list, &r.marker, limit, key)?;
        Ok(pb::ListManageableSnapshotsResponse { snapshots, next_marker })
    }

    pub(crate) async fn manage(&self, r: pb::ManageVolumeRequest) -> ApiResult<VolumeRec> {
        crate::repo::validate_new_name("name", &r.name)?;
        validate_name("project", &r.project)?;
        if r.reference.trim().is_empty() {
            return Err(ApiError::InvalidArgument(
                "`reference` is required; see `drover volume manageable-list`".into(),
            ));
        }
        if r.reference.len() > 255
            || r.reference.contains('/')
            || r.reference == ".."
            || r.reference.starts_with('.')
            || r.reference.chars().any(char::is_control)
        {
            return Err(ApiError::InvalidArgument(format!(
                "`reference` {:?} must be a volume name of the backend's pool (no path, no leading dot); see \
                 `drover volume manageable-list`",
                r.reference
            )));
        }
        writable_backend(&self.core, &r.backend, "manage-existing").await?;
        let candidates = self.list_manageable(&r.backend).await?;
        let Some(found) = candidates.iter().find(|m| m.reference == r.reference) else {
            return Err(ApiError::NotFound(format!(
                "backend {} has no unmanaged volume {:?}; see `drover volume manageable-list --backend {}`",
                r.backend, r.reference, r.backend
            )));
        };
        if !found.safe_to_manage {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} on backend {} is not safe to manage: {}",
                r.reference, r.backend, found.reason_not_safe
            )));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let snapshots = match r.without_snapshots {
            true => Vec::new(),
            false => adopted_snapshots(&r.name, found)?,
        };
        let rec = VolumeRec {
            id: id.clone(),
            name: r.name.clone(),
            project: r.project.clone(),
            size_bytes: found.size_bytes as u64,
            backend: r.backend.clone(),
            active_backend: r.backend.clone(),
            group_id: String::new(),
            status: volume_status::CREATING.into(),
            replication_status: replication_status::DISABLED.into(),
            status_reason: String::new(),
            created_at_ms: now_ms(),
            pending: Some(PendingOp {
                reference: r.reference.clone(),
                snapshots: snapshots.clone(),
                ..PendingOp::new("manage", &r.backend)
            }),
            snapshot_id: String::new(),
            snapshot_volume_id: String::new(),
        };
        let name_key = keys::volume_name(&r.project, &r.name);
        let mut txn = Txn::new()
            .when(Compare::Absent(name_key.clone().into_bytes()))
            .and_then(TxnOp::put(name_key, id.clone()))
            .and_then(put(&keys::volume(&id), &rec));
        // The snapshots' names are reserved with the volume's.
        for s in &snapshots {
            let key = keys::snapshot_name(&r.project, &s.name);
            txn = txn.when(Compare::Absent(key.clone().into_bytes())).and_then(TxnOp::put(key, s.id.clone()));
        }
        let names: Vec<String> = snapshots.iter().map(|s| s.name.clone()).collect();
        self.submit_op(&rec, txn, || match names.is_empty() {
            true => ApiError::AlreadyExists(format!(
                "volume {} already exists in project {}; pick another name",
                r.name, r.project
            )),
            false => ApiError::AlreadyExists(format!(
                "volume {} or one of the snapshot names it would bring ({}) already exists in project {}; pick \
                 another volume name (the snapshots are named after it), or manage it --without-snapshots",
                r.name,
                names.join(", "),
                r.project
            )),
        })
        .await
    }

    pub(crate) async fn drive_manage(&self, mut rec: VolumeRec, epoch: i64, at: &Expect) -> ApiResult<VolumeRec> {
        let op = rec.pending.clone().expect("manage has a pending op");
        let call = self
            .core
            .agents
            .mutate(
                &rec.backend,
                Deadline::Call,
                apb::ManageVolumeRequest {
                    ctx: ctx(op.op_id.clone(), epoch as u64, format!("volume/{}", rec.id)),
                    reference: op.reference.clone(),
                    volume_id: rec.id.clone(),
                    snapshots: op
                        .snapshots
                        .iter()
                        .map(|s| apb::AdoptSnapshot { reference: s.reference.clone(), snapshot_id: s.id.clone() })
                        .collect(),
                },
                |mut c, req| async move { c.manage_volume(req).await },
            )
            .await;
        match call {
            Ok(info) => {
                rec.size_bytes = info.size_bytes as u64;
                rec.status = volume_status::AVAILABLE.into();
                rec.pending = None;
                self.save_managed(&rec, &op, at).await?;
                tracing::info!(volume = %rec.id, reference = %op.reference, snapshots = op.snapshots.len(), "volume managed");
                Ok(rec)
            }
            Err(s) if agent_refused(&s) => {
                self.forget(VolumeAction::Manage, &rec, at).await?;
                self.free_snapshot_names(&rec.project, &op.snapshots).await;
                Err(from_agent(&rec.backend, &format!("manage {}", op.reference), &s))
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("manage {}", op.reference), &s);
                // Not "delete": the backend may have taken the image before the answer
                // was lost, and a delete would destroy what the admin meant to adopt.
                let next = format!(
                    "{err}; unmanage the volume (`drover volume unmanage {}`), which hands the image back if the \
                     backend took it, then manage it again under the reference `drover volume manageable-list \
                     --backend {}` shows",
                    rec.name, rec.backend
                );
                self.fail(VolumeAction::Manage, rec, at, next).await?;
                Err(err)
            }
        }
    }

    async fn unmanage(&self, r: pb::UnmanageVolumeRequest) -> ApiResult<String> {
        let v = self.core.repo.volume(&r.volume, &r.project).await?;
        require_ungrouped(&v.rec)?;
        // Snapshots taken through Drover are not inside the image handed back, and their
        // records go with the volume's: refused here, before anything changes (the
        // backend refuses too, but then the volume would be left in error).
        let index = keys::volume_snapshots(&v.rec.id);
        let (snaps, _) = super::shared::indexed::<SnapshotRec>(&self.core, &index, keys::snapshot, 1000).await?;
        let mut taken: Vec<String> = snaps
            .into_iter()
            .filter(|s| s.adopted_from.is_empty() && s.members.iter().any(|m| m.volume_id == v.rec.id))
            .map(|s| s.name)
            .collect();
        if !taken.is_empty() {
            if taken.len() > 20 {
                taken.truncate(20);
                taken.push("and more".into());
            }
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} has snapshot(s) {} taken in Drover, which the backend's image does not hold; delete them \
                 first (`drover snapshot delete`), then unmanage it",
                v.rec.name,
                taken.join(", ")
            )));
        }
        let rule = check_volume(VolumeAction::Unmanage, &v.rec.status, &v.rec.name)?;
        writable_backend(&self.core, &v.rec.backend, "manage-existing").await?;
        let op = PendingOp { prior_status: v.rec.status.clone(), ..PendingOp::new("unmanage", &v.rec.backend) };
        let (rec, txn) = Self::begin_txn(&v, rule.via.as_str(), op);
        self.submit_op::<String>(&rec, txn, || raced(&format!("volume {}", rec.name))).await
    }

    pub(crate) async fn drive_unmanage(&self, rec: VolumeRec, epoch: i64, at: &Expect) -> ApiResult<String> {
        let op = rec.pending.clone().expect("unmanage has a pending op");
        let call = self
            .core
            .agents
            .mutate(
                &rec.backend,
                Deadline::Call,
                apb::UnmanageVolumeRequest {
                    ctx: ctx(op.op_id.clone(), epoch as u64, format!("volume/{}", rec.id)),
                    volume_id: rec.id.clone(),
                },
                |mut c, req| async move { c.unmanage_volume(req).await },
            )
            .await;
        match call {
            Ok(_) => {
                // The backend handed back the snapshots the volume was taken over with
                // (it refuses while any other holds it): their records go with it.
                let index = keys::volume_snapshots(&rec.id);
                let (snaps, _) =
                    super::shared::indexed::<SnapshotRec>(&self.core, &index, keys::snapshot, usize::MAX).await?;
                let snaps: Vec<SnapshotRec> = snaps
                    .into_iter()
                    .filter(|s| s.backend == rec.backend && s.members.iter().all(|m| m.volume_id == rec.id))
                    .filter(|s| s.members.len() == 1)
                    .collect();
                if !self.forget_with(VolumeAction::Unmanage, &rec, at, &snaps).await? {
                    return Err(raced(&format!("volume {}", rec.id)));
                }
                Ok(rec.id)
            }
            // The backend refused before doing anything (a snapshot that reads through the
            // volume, one made from a snapshot, …): the volume is whole and still managed,
            // and goes back to the status it had, the refusal its reason.
            Err(s) if agent_refused(&s) => {
                let err = from_agent(&rec.backend, &format!("unmanage volume {}", rec.name), &s);
                let mut back = rec;
                back.status = op.prior_status();
                back.status_reason = format!("{err}; the volume was left as it was");
                back.pending = None;
                self.save(VolumeAction::Unmanage, &back, at).await?;
                Err(err)
            }
            Err(s) => {
                let err = from_agent(&rec.backend, &format!("unmanage volume {}", rec.name), &s);
                self.fail(VolumeAction::Unmanage, rec, at, format!("{err}; retry the unmanage")).await?;
                Err(err)
            }
        }
    }
}

#[tonic::async_trait]
impl pb::volume_service_server::VolumeService for VolumeApi {
    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        Ok(Response::new(self.create(crate::auth::scoped(req)?).await?.to_pb()))
    }

    async fn get_volume(&self, req: Request<pb::GetVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let r = crate::auth::scoped(req)?;
        Ok(Response::new(self.core.repo.volume(&r.volume, &r.project).await?.rec.to_pb()))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = crate::auth::scoped(req)?;
        let index = if r.project.is_empty() {
            None
        } else {
            validate_name("project", &r.project)?;
            Some(keys::volume_name(&r.project, ""))
        };
        let paging = crate::repo::PageRequest { limit: r.limit, marker: r.marker };
        let (vols, next_marker) = self.core.repo.page::<VolumeRec>(keys::VOLUMES, index, &paging).await?;
        Ok(Response::new(pb::ListVolumesResponse { volumes: vols.iter().map(VolumeRec::to_pb).collect(), next_marker }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.delete(crate::auth::scoped(req)?).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn extend_volume(&self, req: Request<pb::ExtendVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        Ok(Response::new(self.extend(crate::auth::scoped(req)?).await?.to_pb()))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let r = crate::auth::scoped(req)?;
        Ok(Response::new(self.attach(&r.volume, &r.project).await?))
    }

    async fn list_manageable_volumes(
        &self,
        req: Request<pb::ListManageableVolumesRequest>,
    ) -> Result<Response<pb::ListManageableVolumesResponse>, Status> {
        Ok(Response::new(self.manageable_page(req.get_ref()).await?))
    }

    async fn list_manageable_snapshots(
        &self,
        req: Request<pb::ListManageableVolumesRequest>,
    ) -> Result<Response<pb::ListManageableSnapshotsResponse>, Status> {
        Ok(Response::new(self.manageable_snapshots_page(req.get_ref()).await?))
    }

    async fn plan_adoption(&self, req: Request<pb::PlanAdoptionRequest>) -> Result<Response<pb::AdoptionPlan>, Status> {
        Ok(Response::new(VolumeApi::plan_adoption(self, req.get_ref()).await?))
    }

    async fn get_adoption_plan(
        &self,
        req: Request<pb::GetAdoptionPlanRequest>,
    ) -> Result<Response<pb::AdoptionPlan>, Status> {
        Ok(Response::new(self.adoption_plan(&req.get_ref().plan_id).await?.plan))
    }

    async fn apply_adoption(
        &self,
        req: Request<pb::GetAdoptionPlanRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let rec = VolumeApi::apply_adoption(self, &req.get_ref().plan_id).await?;
        Ok(Response::new(super::executions::to_pb(rec)))
    }

    async fn manage_volume(&self, req: Request<pb::ManageVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        Ok(Response::new(self.manage(crate::auth::scoped(req)?).await?.to_pb()))
    }

    async fn unmanage_volume(
        &self,
        req: Request<pb::UnmanageVolumeRequest>,
    ) -> Result<Response<pb::UnmanageVolumeResponse>, Status> {
        let reference = self.unmanage(crate::auth::scoped(req)?).await?;
        Ok(Response::new(pb::UnmanageVolumeResponse { reference }))
    }
}

/// The most rows a manageable list answers with.
pub const MAX_MANAGEABLE_PAGE: i32 = 1000;

/// A manageable list's page size and whether it sorts by size.
fn manageable_paging(r: &pb::ListManageableVolumesRequest) -> ApiResult<(usize, bool)> {
    let limit = match r.limit {
        0 => MAX_MANAGEABLE_PAGE,
        l if (1..=MAX_MANAGEABLE_PAGE).contains(&l) => l,
        l => {
            return Err(ApiError::InvalidArgument(format!(
                "`limit` {l} is out of range; ask for 1 to {MAX_MANAGEABLE_PAGE} rows (0: {MAX_MANAGEABLE_PAGE})"
            )));
        }
    };
    let by_size = match r.sort.as_str() {
        "" | "name" => false,
        "size" => true,
        other => return Err(ApiError::InvalidArgument(format!("`sort` {other:?} is not known; use name or size"))),
    };
    Ok((limit as usize, by_size))
}

/// The `limit` rows of the sorted `rows` after the one whose key is `marker` (from the
/// start when it is empty), and the marker of the next page (empty on the last).
fn page_after<T>(rows: Vec<T>, marker: &str, limit: usize, key: impl Fn(&T) -> String) -> ApiResult<(Vec<T>, String)> {
    let start = match marker {
        "" => 0,
        m => rows.iter().position(|r| key(r) == m).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "marker {m:?} is not on the backend any more (taken over or deleted since); list again without a marker"
            ))
        })? + 1,
    };
    let page: Vec<T> = rows.into_iter().skip(start).take(limit + 1).collect();
    let mut page = page;
    let next = match page.len() > limit {
        true => {
            page.truncate(limit);
            page.last().map(&key).unwrap_or_default()
        }
        false => String::new(),
    };
    Ok((page, next))
}

/// The Drover snapshots a managed volume named `volume` brings: one per snapshot it
/// carries, named "<volume>.<reference>" (characters a name cannot hold become '_').
fn adopted_snapshots(volume: &str, m: &pb::ManageableVolume) -> ApiResult<Vec<AdoptedSnapshot>> {
    let mut out = Vec::new();
    for s in m.snapshots.iter().filter(|s| s.kind != "backing-file") {
        let clean: String =
            s.reference.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
        let name = format!("{volume}.{clean}");
        validate_name("snapshot name", &name).map_err(|e| {
            ApiError::InvalidArgument(format!(
                "{e} (made from the volume name and the backend's snapshot {:?}); pick a shorter volume name, or manage \
                 it --without-snapshots",
                s.reference
            ))
        })?;
        if out.iter().any(|o: &AdoptedSnapshot| o.name == name) {
            return Err(ApiError::InvalidArgument(format!(
                "two of {}'s snapshots would both be named {name}; rename one on the backend, or manage it \
                 --without-snapshots",
                m.reference
            )));
        }
        out.push(AdoptedSnapshot {
            reference: s.reference.clone(),
            id: uuid::Uuid::now_v7().to_string(),
            name,
            size_bytes: s.size_bytes.max(0) as u64,
            created_at_ms: s.created_at_ms,
        });
    }
    Ok(out)
}
