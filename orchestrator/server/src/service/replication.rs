//! Group replication: enable, disable, failover and failback, as a state machine.
//!
//! Every transition follows one pattern (DESIGN.md invariants 1 and 2):
//!
//! 1. **Begin.** One transaction compares the group and all its volumes at the revisions
//!    just read, and writes the transient status (enabling, failing-over, …) with the
//!    pending op. Its revision is the epoch: every key it wrote now has that mod_revision.
//!    Of many concurrent requests exactly one wins this transaction; the others see the
//!    transient state (FailedPrecondition) or lose the compare (Aborted).
//! 2. **Drive.** Agent calls per volume, each with op_id `<op>/<volume>/<step>` and the
//!    epoch, bounded in parallel. Each volume ends in success or error with a reason; one
//!    failure does not stop its siblings.
//! 3. **Finish.** One transaction compares every key against the epoch and writes the
//!    final state, the per-volume statuses and a history event.
//!
//! A crash between 1 and 3 leaves the pending op in the store; [`ReplicationApi::resume`]
//! claims it (a write, so a higher epoch that fences the dead owner) and drives it again
//! with the same op_ids, which the agents answer from their ledgers.

use std::sync::Arc;

use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use drover_store::{Compare, Txn};
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::Core;
use super::shared::writable_backend;
use super::shared::{group_type, rpo_ms, volume_infos_with};
use crate::agents::{Deadline, ctx};
use crate::error::{ApiError, ApiResult};
use crate::model::{BackendRec, GroupRec, PendingOp, VolumeRec, keys, replication_status as rs};
use crate::repo::{Expect, Versioned, put};
use crate::transitions::{self, GroupAction, Rule, check, position, verify_end};

mod failover;
mod volumes;

pub use failover::{FailoverProgress, FailoverState};
use failover::{Tries, round_op_id, volume_op_id};

/// `drover.v1.ReplicationService`.
pub struct ReplicationApi {
    pub core: Arc<Core>,
    /// The execution that submits through this API and follows what it submits (a
    /// runbook); empty for the gRPC service.
    pub parent: String,
}

/// The target name that means "back to the primary" (Cinder's convention).
pub const DEFAULT_TARGET: &str = "default";

/// What became of one volume.
#[derive(Debug, Clone)]
struct Outcome {
    volume_id: String,
    /// The divergence point a forced promote reported, or why the volume failed.
    result: Result<Option<String>, String>,
}

impl Outcome {
    fn to_pb(&self) -> pb::ItemOutcome {
        match &self.result {
            Ok(_) => {
                pb::ItemOutcome { volume_id: self.volume_id.clone(), outcome: "success".into(), reason: String::new() }
            }
            Err(e) => pb::ItemOutcome { volume_id: self.volume_id.clone(), outcome: "error".into(), reason: e.clone() },
        }
    }
}

/// Why a sync call failed.
struct SyncFailure {
    message: String,
    /// The cause may pass (an agent away, a connection lost): trying again may succeed.
    transient: bool,
    /// The agent recorded every attempt as failed: nothing of the sync runs any more, so
    /// it may be started again under a new op_id.
    spent: bool,
}

/// A group with its member volumes, all read at known revisions.
struct Snapshot {
    group: Versioned<GroupRec>,
    volumes: Vec<Versioned<VolumeRec>>,
}

impl ReplicationApi {
    async fn snapshot(&self, group: Versioned<GroupRec>) -> ApiResult<Snapshot> {
        let mut volumes = Vec::new();
        for id in &group.rec.volume_ids {
            let v = self.core.repo.get::<VolumeRec>(&keys::volume(id)).await?.ok_or_else(|| {
                ApiError::Internal(format!("group {} lists volume {id}, which does not exist", group.rec.name))
            })?;
            volumes.push(v);
        }
        Ok(Snapshot { group, volumes })
    }

    /// Step 1, the intent: the transaction that compares the group and all its volumes at
    /// the revisions read and writes the transient status with the pending op. It is
    /// submitted together with the execution that drives it, so the intent and the
    /// execution exist together or not at all.
    fn begin_txn(snap: Snapshot, status: &str, op: PendingOp) -> (GroupRec, Vec<VolumeRec>, Txn) {
        let mut group = snap.group.rec.clone();
        group.replication_status = status.into();
        group.status_reason.clear();
        group.pending = Some(op);
        let mut txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::group(&group.id).into_bytes(), snap.group.rev))
            .and_then_all(group.writes());
        let mut volumes = Vec::new();
        for v in snap.volumes {
            let mut vol = v.rec;
            vol.replication_status = status.into();
            txn = txn
                .when(Compare::ModRevisionEquals(keys::volume(&vol.id).into_bytes(), v.rev))
                .and_then(put(&keys::volume(&vol.id), &vol));
            volumes.push(vol);
        }
        (group, volumes, txn)
    }

    /// Submits the execution that drives a group transition, with its intent, and waits
    /// for it unless `no_wait`. The work does not run in this call: a client that leaves
    /// leaves the execution running.
    async fn submit_transition(
        &self,
        snap: Snapshot,
        rule: Rule,
        op: PendingOp,
        no_wait: bool,
    ) -> ApiResult<pb::ReplicationResult> {
        let via = rule.via.expect("group transitions have a transient status");
        let status = via.as_str();
        let (group, volumes, txn) = Self::begin_txn(snap, status, op.clone());
        let proc =
            crate::procedures::GroupTransition::new(self.core.clone(), &group, &op).as_written(group.clone(), volumes);
        let submitted = if self.parent.is_empty() {
            self.core.procedures.submit_with(Box::new(proc), txn).await
        } else {
            self.core.procedures.submit_for(&self.parent, Box::new(proc), txn).await
        };
        let (id, rev) = submitted.map_err(|e| crate::procedures::submit_error(e, &format!("group {}", group.name)))?;
        tracing::info!(group = %group.id, status, execution = %id, rev, "group transition submitted");
        if no_wait {
            return Ok(pb::ReplicationResult { group: Some(group.to_pb()), execution_id: id, ..Default::default() });
        }
        let mut result: pb::ReplicationResult = crate::procedures::wait_output(&self.core, &id).await?;
        result.execution_id = id;
        Ok(result)
    }

    /// Step 3: writes the final state if nobody else touched the group since the intent
    /// was written at `rev`.
    async fn finish(&self, action: &str, group: &GroupRec, volumes: &[VolumeRec], at: &Expect) -> ApiResult<()> {
        // The table has the last word on what may be written.
        let action = GroupAction::parse(action)
            .ok_or_else(|| ApiError::Internal(format!("unknown group action {action} in a pending op")))?;
        let via = transitions::via(action).map_or("", |v| v.as_str());
        verify_end(action, via, &group.replication_status)?;
        for v in volumes {
            verify_end(action, via, &v.replication_status)?;
        }
        let mut txn = at.claimed(at.at(Txn::new(), &keys::group(&group.id))).and_then_all(group.writes());
        for v in volumes {
            txn = at.at(txn, &keys::volume(&v.id)).and_then(put(&keys::volume(&v.id), v));
        }
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(ApiError::Aborted(format!(
                "group {} was taken over by another orchestrator (it changed after revision {}, or this one lost its claim on the execution); see `drover group show {}`",
                group.name, at.rev, group.name
            )));
        }
        tracing::info!(group = %group.id, status = %group.replication_status, rev = at.rev, "group transition finished");
        Ok(())
    }

    /// Runs `step` for every volume, at most `volume_parallelism` at a time.
    async fn each_volume<F, Fut>(&self, volumes: &[VolumeRec], step: F) -> Vec<Outcome>
    where
        F: Fn(VolumeRec) -> Fut,
        Fut: Future<Output = Result<Option<String>, String>>,
    {
        futures::stream::iter(volumes.iter().cloned())
            .map(|v| {
                let id = v.id.clone();
                let fut = step(v);
                async move { Outcome { volume_id: id, result: fut.await } }
            })
            .buffer_unordered(self.core.config.volume_parallelism)
            .collect()
            .await
    }

    async fn endpoint(&self, backend: &str) -> String {
        self.core.agents.endpoint(backend).await.unwrap_or_default()
    }

    /// Asks `backend` to take and ship a recovery point of the group to `peer_endpoint`.
    async fn sync_call(
        &self,
        backend: &str,
        group_id: &str,
        op_id: String,
        epoch: i64,
        final_sync: bool,
        peer_endpoint: String,
    ) -> Result<apb::SyncGroupResponse, SyncFailure> {
        let req = apb::SyncGroupRequest {
            ctx: ctx(op_id, epoch as u64, format!("group/{group_id}")),
            group_id: group_id.to_string(),
            r#final: final_sync,
            peer_endpoint,
        };
        self.core
            .agents
            .mutate(backend, Deadline::Sync, req.clone(), |mut c, req| async move { c.sync_group(req).await })
            .await
            .map_err(|s| SyncFailure {
                message: format!("{} sync on {backend}: {}", if final_sync { "final" } else { "initial" }, s.message()),
                transient: crate::agents::classify(&s) != crate::agents::Failure::Terminal,
                spent: crate::agents::attempts_spent(&s),
            })
    }

    /// One line for the failed volumes: each distinct reason once, with the volumes it
    /// names ("2 of 3 volume(s) failed: <reason> (volumes a, b)").
    fn summarize(outcomes: &[Outcome]) -> Option<String> {
        let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
        for o in outcomes {
            let Err(e) = &o.result else { continue };
            match reasons.iter_mut().find(|(r, _)| *r == e.as_str()) {
                Some((_, ids)) => ids.push(&o.volume_id),
                None => reasons.push((e, vec![&o.volume_id])),
            }
        }
        let failed: usize = reasons.iter().map(|(_, ids)| ids.len()).sum();
        let parts: Vec<String> = reasons
            .iter()
            .map(|(r, ids)| format!("{r} (volume{} {})", if ids.len() > 1 { "s" } else { "" }, ids.join(", ")))
            .collect();
        (failed > 0).then(|| format!("{failed} of {} volume(s) failed: {}", outcomes.len(), parts.join("; ")))
    }

    fn result(group: &GroupRec, outcomes: &[Outcome]) -> pb::ReplicationResult {
        pb::ReplicationResult {
            group: Some(group.to_pb()),
            items: outcomes.iter().map(Outcome::to_pb).collect(),
            ..Default::default()
        }
    }

    fn new_op(action: &str, target: &str, force: bool) -> PendingOp {
        PendingOp { force, ..PendingOp::new(action, target) }
    }

    /// Backends that can hold this group's replicas: at another site, replication-capable.
    async fn candidates(&self, g: &GroupRec) -> ApiResult<Vec<BackendRec>> {
        let primary = self.core.repo.get::<BackendRec>(&keys::backend(&g.primary_backend)).await?;
        let primary_site = primary.map(|p| p.rec.site).unwrap_or_default();
        Ok(self
            .core
            .repo
            .list::<BackendRec>(keys::BACKENDS)
            .await?
            .into_iter()
            .map(|b| b.rec)
            .filter(|b| b.site != primary_site && b.capabilities.iter().any(|c| c == "replication"))
            .collect())
    }

    // ------------------------------------------------------------------ enable

    async fn enable(&self, r: pb::EnableReplicationRequest) -> ApiResult<pb::ReplicationResult> {
        let g = self.core.repo.group(&r.group, &r.project).await?;
        let gtype = group_type(&self.core, &g.rec.group_type).await?;
        if !gtype.replicates() {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is of type {}, which does not replicate; use a group of type replication or consistent-replication",
                g.rec.name, gtype.name
            )));
        }
        let rule = check(GroupAction::Enable, &g.rec.replication_status, position(&g.rec), &g.rec.name)?;
        if g.rec.volume_ids.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} has no volumes; add volumes first",
                g.rec.name
            )));
        }
        writable_backend(&self.core, &g.rec.primary_backend, "replication").await?;
        let candidates = self.candidates(&g.rec).await?;
        let target = if r.target_backend.is_empty() {
            match candidates.as_slice() {
                [only] => only.name.clone(),
                [] => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "no replication-capable backend at another site than {}'s; register an agent at the DR site",
                        g.rec.primary_backend
                    )));
                }
                many => {
                    return Err(ApiError::InvalidArgument(format!(
                        "`target_backend` is required: {} backends qualify ({})",
                        many.len(),
                        many.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        } else {
            r.target_backend.clone()
        };
        if target == g.rec.primary_backend {
            return Err(ApiError::InvalidArgument(format!(
                "`target_backend` {target} is the group's own backend; replicate to a backend at another site"
            )));
        }
        if !candidates.iter().any(|b| b.name == target) {
            writable_backend(&self.core, &target, "replication").await?;
            return Err(ApiError::FailedPrecondition(format!(
                "backend {target} is at the same site as {}; replicas must live at another site",
                g.rec.primary_backend
            )));
        }
        writable_backend(&self.core, &target, "replication").await?;
        let interval = match r.sync_interval_seconds {
            0 => crate::model::DEFAULT_SYNC_INTERVAL_SECONDS,
            s if s < 1 => {
                return Err(ApiError::InvalidArgument(format!("`sync_interval_seconds` must be at least 1, got {s}")));
            }
            s if s > 86_400 => {
                return Err(ApiError::InvalidArgument(format!(
                    "`sync_interval_seconds` {s} is over a day; an RPO that long defeats replication"
                )));
            }
            s => s,
        };
        let mut snap = self.snapshot(g).await?;
        snap.group.rec.sync_interval_seconds = interval;
        self.submit_transition(snap, rule, Self::new_op("enable", &target, false), r.no_wait).await
    }

    pub(crate) async fn drive_enable(
        &self,
        mut group: GroupRec,
        mut volumes: Vec<VolumeRec>,
        epoch: i64,
        at: &Expect,
        progress: &mut FailoverProgress,
    ) -> ApiResult<pb::ReplicationResult> {
        let op = group.pending.clone().expect("enable has a pending op");
        let (source, target) = (group.primary_backend.clone(), op.target.clone());
        let source_ep = self.endpoint(&source).await;
        let target_ep = self.endpoint(&target).await;
        let timeout = Deadline::Call;
        let scope = format!("group/{}", group.id);
        let params: std::collections::HashMap<String, String> =
            [("sync_interval_ms".to_string(), (group.sync_interval_seconds * 1000).to_string())].into();
        // As a move does (see `FailoverProgress`), enable runs again, for `move_patience`,
        // while its calls fail for a cause that may pass: until it records the group
        // enabled, the source serves as before.
        let tries = Tries::default();
        let (tries_ref, rounds) = (&tries, &progress.rounds);
        let outcomes = self
            .each_volume(&volumes, |v| {
                let (op_id, scope, params) = (op.op_id.clone(), scope.clone(), params.clone());
                let (source, target, source_ep, target_ep) =
                    (source.clone(), target.clone(), source_ep.clone(), target_ep.clone());
                async move {
                    let key = format!("{}/enable-secondary", v.id);
                    let secondary = apb::EnableReplicationRequest {
                        ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope.clone()),
                        volume_id: v.id.clone(),
                        group_id: v.group_id.clone(),
                        role: apb::ReplicationRole::Secondary as i32,
                        peer: Some(apb::ReplicationPeer { backend: source.clone(), endpoint: source_ep }),
                        size_bytes: v.size_bytes as i64,
                        parameters: params.clone(),
                    };
                    self.core
                        .agents
                        .mutate(&target, timeout, secondary.clone(), |mut c, req| async move {
                            c.enable_replication(req).await
                        })
                        .await
                        .map_err(|s| {
                            tries_ref.note(key, &s);
                            format!("replica on {target}: {}", s.message())
                        })?;
                    let key = format!("{}/enable-primary", v.id);
                    let primary = apb::EnableReplicationRequest {
                        ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope),
                        volume_id: v.id.clone(),
                        group_id: v.group_id.clone(),
                        role: apb::ReplicationRole::Primary as i32,
                        peer: Some(apb::ReplicationPeer { backend: target.clone(), endpoint: target_ep }),
                        size_bytes: v.size_bytes as i64,
                        parameters: params,
                    };
                    self.core
                        .agents
                        .mutate(&source, timeout, primary.clone(), |mut c, req| async move {
                            c.enable_replication(req).await
                        })
                        .await
                        .map_err(|s| {
                            tries_ref.note(key, &s);
                            format!("source on {source}: {}", s.message())
                        })?;
                    Ok(None)
                }
            })
            .await;
        let patience = self.core.config.move_patience;
        let mut failure = Self::summarize(&outcomes);
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        if let Some(left) = progress.again(failed, tries, patience) {
            return Err(ApiError::Unavailable(format!(
                "{}; trying again for up to {} s more, then enabling stops with the volumes in error",
                failure.unwrap_or_default(),
                left.as_secs().max(1)
            )));
        }
        let mut synced = String::new();
        if failure.is_none() {
            // The initial full copy: when enable returns, the target holds a complete point.
            let op_id = round_op_id(format!("{}/initial-sync", op.op_id), progress.sync_rounds);
            match self.sync_call(&source, &group.id, op_id, epoch, false, target_ep.clone()).await {
                Ok(r) => {
                    progress.failing_since_ms = 0;
                    synced = format!(
                        "; initial full copy {} shipped {} bytes in {} ms",
                        r.recovery_point_id, r.bytes, r.duration_ms
                    )
                }
                Err(e) => {
                    if e.transient
                        && let Some(left) = progress.patience_left(patience)
                    {
                        // A round the agent recorded as failed throughout is over; an
                        // unknown outcome is asked about again under the same op_id.
                        if e.spent {
                            progress.sync_rounds += 1;
                        }
                        return Err(ApiError::Unavailable(format!(
                            "{}; trying again for up to {} s more, then enabling stops with the volumes in error",
                            e.message,
                            left.as_secs().max(1)
                        )));
                    }
                    failure = Some(e.message)
                }
            }
        }
        for v in &mut volumes {
            let ok = outcomes.iter().any(|o| o.volume_id == v.id && o.result.is_ok());
            v.replication_status = if ok { rs::ENABLED } else { rs::ERROR }.into();
        }
        group.pending = None;
        group.epoch = epoch as u64;
        group.replication_target = target.clone();
        match &failure {
            None => {
                group.replication_status = rs::ENABLED.into();
                group.record(
                    "enable-replication",
                    format!("replicating to {target} every {} s{synced}", group.sync_interval_seconds),
                    epoch as u64,
                );
            }
            Some(reason) => {
                group.replication_status = rs::ERROR.into();
                group.status_reason = format!(
                    "enabling replication to {target}: {reason}; retry `enable-replication` or disable replication"
                );
                group.record("enable-replication", format!("failed: {reason}"), epoch as u64);
            }
        }
        self.finish(&op.action, &group, &volumes, at).await?;
        Ok(Self::result(&group, &outcomes))
    }

    // ------------------------------------------------------------------ disable

    async fn disable(&self, r: pb::DisableReplicationRequest) -> ApiResult<pb::ReplicationResult> {
        let g = self.core.repo.group(&r.group, &r.project).await?;
        let status = g.rec.replication_status.as_str();
        let failed_over = g.rec.active_backend != g.rec.primary_backend;
        if failed_over {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is active on {} (replication status {status}); fail it back with `--target default` before disabling replication",
                g.rec.name, g.rec.active_backend
            )));
        }
        let rule = check(GroupAction::Disable, status, position(&g.rec), &g.rec.name)?;
        writable_backend(&self.core, &g.rec.primary_backend, "replication").await?;
        let target = g.rec.replication_target.clone();
        let snap = self.snapshot(g).await?;
        self.submit_transition(snap, rule, Self::new_op("disable", &target, false), r.no_wait).await
    }

    pub(crate) async fn drive_disable(
        &self,
        mut group: GroupRec,
        mut volumes: Vec<VolumeRec>,
        epoch: i64,
        at: &Expect,
        progress: &mut FailoverProgress,
    ) -> ApiResult<pb::ReplicationResult> {
        let op = group.pending.clone().expect("disable has a pending op");
        let (source, target) = (group.primary_backend.clone(), op.target.clone());
        let timeout = Deadline::Call;
        let scope = format!("group/{}", group.id);
        // As enable does, disable runs again for `move_patience` while its calls fail for
        // a cause that may pass.
        let tries = Tries::default();
        let (tries_ref, rounds) = (&tries, &progress.rounds);
        let outcomes = self
            .each_volume(&volumes, |v| {
                let (op_id, scope, source, target) = (op.op_id.clone(), scope.clone(), source.clone(), target.clone());
                async move {
                    for (backend, side) in [(&source, "primary"), (&target, "secondary")] {
                        if backend.is_empty() {
                            continue;
                        }
                        let key = format!("{}/disable-{side}", v.id);
                        let req = apb::DisableReplicationRequest {
                            ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope.clone()),
                            volume_id: v.id.clone(),
                        };
                        self.core
                            .agents
                            .mutate(backend, timeout, req.clone(), |mut c, req| async move {
                                c.disable_replication(req).await
                            })
                            .await
                            .map_err(|s| {
                                tries_ref.note(key, &s);
                                format!("{side} on {backend}: {}", s.message())
                            })?;
                    }
                    Ok(None)
                }
            })
            .await;
        let failure = Self::summarize(&outcomes);
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        if let Some(left) = progress.again(failed, tries, self.core.config.move_patience) {
            return Err(ApiError::Unavailable(format!(
                "{}; trying again for up to {} s more, then disabling stops with the volumes in error",
                failure.unwrap_or_default(),
                left.as_secs().max(1)
            )));
        }
        for v in &mut volumes {
            let ok = outcomes.iter().any(|o| o.volume_id == v.id && o.result.is_ok());
            v.replication_status = if ok { rs::DISABLED } else { rs::ERROR }.into();
        }
        group.pending = None;
        group.epoch = epoch as u64;
        match &failure {
            None => {
                group.replication_status = rs::DISABLED.into();
                group.record("disable-replication", format!("stopped replicating to {target}"), epoch as u64);
                group.replication_target.clear();
            }
            Some(reason) => {
                group.replication_status = rs::ERROR.into();
                group.status_reason = format!("disabling replication: {reason}; retry `disable-replication`");
                group.record("disable-replication", format!("failed: {reason}"), epoch as u64);
            }
        }
        self.finish(&op.action, &group, &volumes, at).await?;
        Ok(Self::result(&group, &outcomes))
    }

    // ------------------------------------------------------------------ failover

    pub(crate) async fn failover(&self, r: pb::FailoverGroupRequest) -> ApiResult<pb::ReplicationResult> {
        if r.target_backend.trim().is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "`target_backend` is required: the group's replication target, or `{DEFAULT_TARGET}` to fail back"
            )));
        }
        let g = self.core.repo.group(&r.group, &r.project).await?;
        self.failover_of(g, r).await
    }

    /// [`Self::failover`] of a group already read (a runbook's, read as it checked the
    /// group could move): the intent's transaction compares it at the revision read.
    pub(crate) async fn failover_of(
        &self,
        g: Versioned<GroupRec>,
        r: pb::FailoverGroupRequest,
    ) -> ApiResult<pb::ReplicationResult> {
        let rec = &g.rec;
        let failback = r.target_backend == DEFAULT_TARGET;
        let to = if failback { rec.primary_backend.clone() } else { r.target_backend.clone() };
        if to == rec.active_backend {
            return Err(ApiError::InvalidArgument(format!(
                "group {} is already active on backend {to}; fail over to its replication target{} or `{DEFAULT_TARGET}`",
                rec.name,
                if rec.replication_target.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", rec.replication_target)
                }
            )));
        }
        let action = if failback { GroupAction::Failback } else { GroupAction::Failover };
        let rule = check(action, &rec.replication_status, position(rec), &rec.name)?;
        if !failback && to != rec.replication_target {
            return Err(ApiError::InvalidArgument(format!(
                "backend {to} is not the replication target of group {} (that is {}); list targets with `drover group list-targets {}`",
                rec.name, rec.replication_target, rec.name
            )));
        }
        if failback && !rec.divergence_point.is_empty() && !r.force && r.discard_changes_on != to {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} diverged at recovery point {} in a disaster failover: backend {to} may hold writes that {} \
                 never received. Failing back discards them; confirm with `--discard-changes-on {to}` (recorded in the \
                 group's history)",
                rec.name, rec.divergence_point, rec.active_backend
            )));
        }
        if !r.discard_changes_on.is_empty() && r.discard_changes_on != to {
            return Err(ApiError::InvalidArgument(format!(
                "`discard_changes_on` names {}, but only the backend being failed back to ({to}) can have its changes discarded",
                r.discard_changes_on
            )));
        }
        let snap = self.snapshot(g).await?;
        let mut op = Self::new_op(action.as_str(), &to, r.force);
        op.reference = r.discard_changes_on.clone();
        self.submit_transition(snap, rule, op, r.no_wait).await
    }

    /// Takes and ships a recovery point now.
    pub(crate) async fn sync_now(&self, r: pb::SyncGroupRequest) -> ApiResult<pb::SyncGroupResponse> {
        let g = self.core.repo.group(&r.group, &r.project).await?;
        self.sync_now_of(g, r).await
    }

    /// [`Self::sync_now`] of a group already read; the sync reads it again when it runs.
    pub(crate) async fn sync_now_of(
        &self,
        g: Versioned<GroupRec>,
        r: pb::SyncGroupRequest,
    ) -> ApiResult<pb::SyncGroupResponse> {
        check(GroupAction::Sync, &g.rec.replication_status, position(&g.rec), &g.rec.name)?;
        if r.quiesce_timeout_ms < 0 || r.quiesce_timeout_ms > 600_000 {
            return Err(ApiError::InvalidArgument(format!(
                "`quiesce_timeout_ms` {} is out of range; give 1 to 600000 (0: 10 s)",
                r.quiesce_timeout_ms
            )));
        }
        let proc = crate::procedures::SyncNow::new(self.core.clone(), &g.rec)
            .quiesced(r.quiesce, if r.quiesce_timeout_ms == 0 { 10_000 } else { r.quiesce_timeout_ms });
        let submitted = if self.parent.is_empty() {
            self.core.procedures.submit(Box::new(proc)).await
        } else {
            self.core
                .procedures
                .submit_for(&self.parent, Box::new(proc), drover_store::Txn::new())
                .await
                .map(|(id, _)| id)
        };
        let id = submitted.map_err(|e| crate::procedures::submit_error(e, &format!("group {}", g.rec.name)))?;
        if r.no_wait {
            return Ok(pb::SyncGroupResponse { execution_id: id, ..Default::default() });
        }
        let mut resp: pb::SyncGroupResponse = crate::procedures::wait_output(&self.core, &id).await?;
        resp.execution_id = id;
        Ok(resp)
    }

    /// The sync step of a [`crate::procedures::SyncNow`]: the active side takes a point
    /// and ships it to the peer, under the execution's epoch.
    pub(crate) async fn sync_step(&self, group_id: &str, op_id: &str, epoch: i64) -> ApiResult<pb::SyncGroupResponse> {
        let g = self
            .core
            .repo
            .get::<GroupRec>(&keys::group(group_id))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("group {group_id} no longer exists; nothing to sync")))?;
        let active = g.rec.active_backend.clone();
        let peer = if active == g.rec.primary_backend {
            g.rec.replication_target.clone()
        } else {
            g.rec.primary_backend.clone()
        };
        let peer_ep = self.endpoint(&peer).await;
        let req = apb::SyncGroupRequest {
            ctx: ctx(op_id.to_string(), epoch as u64, format!("group/{}", g.rec.id)),
            group_id: g.rec.id.clone(),
            r#final: false,
            peer_endpoint: peer_ep,
        };
        let resp = self
            .core
            .agents
            .mutate(&active, Deadline::Sync, req, |mut c, req| async move { c.sync_group(req).await })
            .await
            .map_err(|s| super::shared::from_agent(&active, &format!("sync group {}", g.rec.name), &s))?;
        Ok(pb::SyncGroupResponse {
            recovery_point_id: resp.recovery_point_id,
            bytes: resp.bytes,
            duration_ms: resp.duration_ms,
            full: resp.full,
            execution_id: String::new(),
            application_consistent: false,
            consistency_note: String::new(),
        })
    }

    // ------------------------------------------------------------------ info and resume

    async fn info(&self, r: pb::GetReplicationInfoRequest) -> ApiResult<pb::GroupReplicationInfo> {
        let g = self.core.repo.group(&r.group, &r.project).await?;
        let infos = volume_infos_with(&self.core, &g.rec, r.predict).await?;
        let volumes: Vec<pb::VolumeReplicationInfo> = infos.iter().map(|(v, _)| v.clone()).collect();
        let rpo_ms = rpo_ms(&volumes);
        let p = predict(&infos);
        Ok(pb::GroupReplicationInfo {
            group: Some(self.core.repo.group_pb(&g.rec).await?),
            volumes,
            rpo_ms,
            predicted_final_sync_bytes: p.bytes,
            predicted_final_sync_ms: p.ms,
            measured_rate_bytes_per_s: p.rate,
        })
    }
}

/// What a planned failover now would do: the bytes its final sync would ship (the sum
/// of what each volume's source measured; -1 when any is unknown), the rate the group's
/// last syncs ran at (bytes over time, the volumes of one point shipping together), and
/// so the time the final sync would take.
pub(crate) struct Prediction {
    pub bytes: i64,
    pub ms: i64,
    pub rate: i64,
}

pub(crate) fn predict(infos: &[(pb::VolumeReplicationInfo, i64)]) -> Prediction {
    let bytes =
        if infos.is_empty() || infos.iter().any(|(_, p)| *p < 0) { -1 } else { infos.iter().map(|(_, p)| p).sum() };
    // The last point's volumes shipped in one sync: its bytes over its duration.
    let shipped: i64 = infos.iter().map(|(v, _)| v.last_sync_bytes).sum();
    let took = infos.iter().map(|(v, _)| v.last_sync_duration_ms).max().unwrap_or(0);
    let rate = if took > 0 && shipped > 0 { shipped * 1000 / took } else { 0 };
    let ms = match (bytes, rate) {
        (b, _) if b < 0 => -1,
        (0, _) => 0,
        (_, 0) => -1,
        (b, r) => (b * 1000 / r).max(1),
    };
    Prediction { bytes, ms, rate }
}

#[tonic::async_trait]
impl pb::replication_service_server::ReplicationService for ReplicationApi {
    async fn enable_replication(
        &self,
        req: Request<pb::EnableReplicationRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        Ok(Response::new(self.enable(crate::auth::scoped(req)?).await?))
    }

    async fn disable_replication(
        &self,
        req: Request<pb::DisableReplicationRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        Ok(Response::new(self.disable(crate::auth::scoped(req)?).await?))
    }

    async fn failover_group(
        &self,
        req: Request<pb::FailoverGroupRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        let who = crate::auth::caller(&req);
        let r = crate::auth::scoped(req)?;
        disaster_needs_admin(&self.core, &who, &r.project, r.force, &r.discard_changes_on).await?;
        Ok(Response::new(self.failover(r).await?))
    }

    async fn list_replication_targets(
        &self,
        req: Request<pb::ListReplicationTargetsRequest>,
    ) -> Result<Response<pb::ListReplicationTargetsResponse>, Status> {
        let r = crate::auth::scoped(req)?;
        let g = self.core.repo.group(&r.group, &r.project).await?;
        let mut targets = Vec::new();
        for b in self.candidates(&g.rec).await? {
            let regs = self.core.agents.registrations(&b.name).await?;
            let mut up = false;
            for a in &regs {
                if self
                    .core
                    .agents
                    .probe(&a.endpoint, self.core.agents.deadline(&b.name, crate::agents::Deadline::Probe))
                    .await
                    .is_ok()
                {
                    up = true;
                    break;
                }
            }
            targets.push(pb::ReplicationTarget {
                backend: b.name,
                site: b.site,
                status: if up { "up" } else { "down" }.into(),
            });
        }
        Ok(Response::new(pb::ListReplicationTargetsResponse { targets }))
    }

    async fn get_replication_info(
        &self,
        req: Request<pb::GetReplicationInfoRequest>,
    ) -> Result<Response<pb::GroupReplicationInfo>, Status> {
        Ok(Response::new(self.info(crate::auth::scoped(req)?).await?))
    }

    async fn enable_volume_replication(
        &self,
        req: Request<pb::VolumeReplicationRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        Ok(Response::new(self.enable_volume(crate::auth::scoped(req)?).await?))
    }

    async fn disable_volume_replication(
        &self,
        req: Request<pb::VolumeReplicationRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        Ok(Response::new(self.disable_volume(crate::auth::scoped(req)?).await?))
    }

    async fn failover_volume(
        &self,
        req: Request<pb::FailoverVolumeRequest>,
    ) -> Result<Response<pb::ReplicationResult>, Status> {
        let who = crate::auth::caller(&req);
        let r = crate::auth::scoped(req)?;
        disaster_needs_admin(&self.core, &who, &r.project, r.force, &r.discard_changes_on).await?;
        Ok(Response::new(ReplicationApi::failover_volume(self, r).await?))
    }

    async fn get_volume_replication_info(
        &self,
        req: Request<pb::VolumeReplicationRequest>,
    ) -> Result<Response<pb::GroupReplicationInfo>, Status> {
        Ok(Response::new(self.volume_info(crate::auth::scoped(req)?).await?))
    }

    async fn sync_group(&self, req: Request<pb::SyncGroupRequest>) -> Result<Response<pb::SyncGroupResponse>, Status> {
        Ok(Response::new(self.sync_now(crate::auth::scoped(req)?).await?))
    }
}

/// A disaster failover (which may leave two diverged copies) and discarding a side's
/// changes are an admin's decision, unless an admin allowed the project's members
/// (`ProjectPolicy.allow_member_disaster_failover`); members fail over and back planned.
async fn disaster_needs_admin(
    core: &Core,
    who: &crate::auth::Caller,
    project: &str,
    force: bool,
    discard_on: &str,
) -> Result<(), Status> {
    if who.is_admin() || (!force && discard_on.is_empty()) {
        return Ok(());
    }
    if super::projects::policy(&core.repo, project).await?.allow_member_disaster_failover {
        return Ok(());
    }
    Err(ApiError::PermissionDenied(format!(
        "a forced (disaster) failover and --discard-changes-on need an admin token, unless an admin allows them for \
         project {} (`drover project allow-disaster-failover {}`); this token is a {} of it: ask an admin, or fail \
         over without --force while both sites answer",
        who.project,
        who.project,
        who.role.as_str()
    ))
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str, result: Result<Option<String>, &str>) -> Outcome {
        Outcome { volume_id: id.into(), result: result.map_err(str::to_string) }
    }

    #[test]
    fn a_prediction_sums_the_sources_and_divides_by_the_measured_rate() {
        let v = |bytes: i64, ms: i64| pb::VolumeReplicationInfo {
            last_sync_bytes: bytes,
            last_sync_duration_ms: ms,
            ..Default::default()
        };
        let p = predict(&[(v(4_000_000, 1000), 1_000_000), (v(4_000_000, 800), 3_000_000)]);
        assert_eq!((p.bytes, p.rate, p.ms), (4_000_000, 8_000_000, 500));
        let unknown = predict(&[(v(1, 1), -1), (v(1, 1), 5)]);
        assert_eq!((unknown.bytes, unknown.ms), (-1, -1));
        let unmeasured = predict(&[(v(0, 0), 10)]);
        assert_eq!((unmeasured.bytes, unmeasured.ms, unmeasured.rate), (10, -1, 0));
        assert_eq!(predict(&[(v(10, 10), 0)]).ms, 0, "nothing to ship takes no time");
    }

    #[test]
    fn a_summary_names_each_reason_once_with_its_volumes() {
        let all_ok = [outcome("a", Ok(None)), outcome("b", Ok(None))];
        assert_eq!(ReplicationApi::summarize(&all_ok), None);
        let mixed = [
            outcome("a", Err("stale epoch 4")),
            outcome("b", Ok(None)),
            outcome("c", Err("no space")),
            outcome("d", Err("stale epoch 4")),
        ];
        assert_eq!(
            ReplicationApi::summarize(&mixed).as_deref(),
            Some("3 of 4 volume(s) failed: stale epoch 4 (volumes a, d); no space (volume c)")
        );
    }
}
