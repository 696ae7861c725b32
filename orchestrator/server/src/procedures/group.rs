//! Group transitions: enable and disable replication, planned and forced failover,
//! failback with reprotect.

use std::sync::Arc;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{Answer, step_error, still_owner};
use crate::agents::Deadline;
use crate::error::ApiError;
use crate::model::{GroupRec, PendingOp, VolumeRec, keys, replication_status as rs};
use crate::repo::Expect;
use crate::service::Core;
use crate::service::replication::{FailoverProgress, FailoverState, ReplicationApi};

/// The procedure kind.
pub const KIND: &str = "group-transition";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    group_id: String,
    group_name: String,
    /// The project of the group or volume (its executions are that project's).
    #[serde(default)]
    project: String,
    op_id: String,
    /// enable, disable, failover or failback.
    action: String,
    target: String,
    force: bool,
    /// A move's next state, and what its states found so far.
    #[serde(default)]
    state: Option<FailoverState>,
    #[serde(default)]
    progress: FailoverProgress,
    /// The owner epoch last fenced on the group's backends.
    #[serde(default)]
    fenced: i64,
}

/// Drives one group transition whose intent (transient status, pending op) was written
/// with the execution.
pub struct GroupTransition {
    core: Arc<Core>,
    state: State,
    /// The group and its volumes as the intent wrote them, for the first step of a
    /// fresh submit (see [`GroupTransition::as_written`]); never persisted.
    written: Option<(GroupRec, Vec<VolumeRec>)>,
}

impl GroupTransition {
    /// The transition `op` of `group`.
    pub fn new(core: Arc<Core>, group: &GroupRec, op: &PendingOp) -> Self {
        let state = State {
            group_id: group.id.clone(),
            group_name: group.name.clone(),
            project: group.project.clone(),
            op_id: op.op_id.clone(),
            action: op.action.clone(),
            target: op.target.clone(),
            force: op.force,
            state: matches!(op.action.as_str(), "failover" | "failback")
                .then(|| FailoverState::first(op.action == "failback", op.force)),
            progress: FailoverProgress::default(),
            fenced: 0,
        };
        Self { core, state, written: None }
    }

    /// The records the intent's transaction writes, submitted with this execution: its
    /// first step starts from them instead of reading them back. That transaction also
    /// writes the submitter's claim, so they are stored at the revision that is the
    /// first claim's epoch, which the step's writes compare. A changed record (any write
    /// since) fails those comparisons as a change after a read would; a resumed
    /// execution is rebuilt by [`GroupTransition::load`] and reads them.
    pub fn as_written(mut self, mut group: GroupRec, volumes: Vec<VolumeRec>) -> Self {
        // The stored record holds no history (its events were written as keys of their own).
        group.history.clear();
        self.written = Some((group, volumes));
        self
    }

    /// Rebuilds a persisted transition.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())?, written: None })
    }

    /// The group (at the revision read) and its volumes, as the step starts.
    async fn records(
        &mut self,
        ctx: &Context,
    ) -> Result<Option<(crate::repo::Versioned<GroupRec>, Option<Vec<VolumeRec>>)>, ProcedureError> {
        if let Some((rec, volumes)) = self.written.take() {
            return Ok(Some((crate::repo::Versioned { rec, rev: ctx.epoch }, Some(volumes))));
        }
        let key = keys::group(&self.state.group_id);
        Ok(self.core.repo.get::<GroupRec>(&key).await.map_err(step_error)?.map(|g| (g, None)))
    }

    /// What the group says now, as a result: for a transition that had finished when its
    /// execution was resumed.
    async fn report(&self, group: GroupRec) -> Result<pb::ReplicationResult, ApiError> {
        let mut items = Vec::new();
        for id in &group.volume_ids {
            let v = self.core.repo.get::<VolumeRec>(&keys::volume(id)).await?;
            let failed = v.as_ref().is_none_or(|v| v.rec.replication_status == rs::ERROR);
            items.push(pb::ItemOutcome {
                volume_id: id.clone(),
                outcome: if failed { "error" } else { "success" }.into(),
                reason: if failed { group.status_reason.clone() } else { String::new() },
            });
        }
        Ok(pb::ReplicationResult { group: Some(group.to_pb()), items, ..Default::default() })
    }
}

#[async_trait]
impl Procedure for GroupTransition {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        let s = &self.state;
        match s.action.as_str() {
            "enable" => format!("enable replication of group {} to {}", s.group_name, s.target),
            "disable" => format!("disable replication of group {}", s.group_name),
            a => {
                format!("{}{a} of group {} to {}", if s.force { "forced " } else { "planned " }, s.group_name, s.target)
            }
        }
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        vec![format!("group/{}", self.state.group_id)]
    }

    fn step(&self) -> String {
        match self.state.state {
            Some(s) => s.name().to_string(),
            None => format!("drive-{}", self.state.action),
        }
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let records = self.records(ctx).await?;
        let s = &self.state;
        let Some((g, written)) = records else {
            return Answer::from_result::<()>(Err(ApiError::NotFound(format!(
                "group {} was deleted while its {} was pending",
                s.group_name, s.action
            ))))
            .done();
        };
        if g.rec.pending.as_ref().map(|p| p.op_id.as_str()) != Some(s.op_id.as_str()) {
            // The transition finished before this execution was resumed.
            return Answer::from_result(self.report(g.rec).await).done();
        }
        if self.state.fenced != ctx.epoch {
            // A new owner raises the fence on both sides first: from now on the old owner
            // (dead or only paused) is refused everywhere, also where this one has nothing
            // left to ask. A side that cannot be reached (a lost site) is fenced on return.
            // A forced move never waits on the side it leaves (DESIGN.md, invariant 6):
            // that side is the lost one, and the replica stream fences it when it returns.
            let lost = if s.force { g.rec.active_backend.as_str() } else { "" };
            // Each side once (the target is most often the replication target too), all
            // at once: the fences are independent of each other.
            let mut sides: Vec<&String> = Vec::new();
            for backend in [&g.rec.primary_backend, &g.rec.replication_target, &s.target] {
                if !backend.is_empty() && backend.as_str() != lost && !sides.contains(&backend) {
                    sides.push(backend);
                }
            }
            let (scope, agents) = (format!("group/{}", s.group_id), &self.core.agents);
            let fences = sides.iter().map(|backend| {
                let scope = scope.clone();
                async move { (*backend, agents.fence(backend, &scope, ctx.epoch, Deadline::FailedSite).await) }
            });
            for (backend, fenced) in futures::future::join_all(fences).await {
                if let Err(e) = fenced {
                    if e.code() == tonic::Code::FailedPrecondition {
                        return Err(ProcedureError::Fail(format!(
                            "a newer owner holds group {}: {}",
                            s.group_name,
                            e.message()
                        )));
                    }
                    tracing::warn!(backend = %backend, error = %e.message(), "could not fence; going on");
                }
            }
        }
        let s = &self.state;
        let volumes = match written {
            Some(volumes) => volumes,
            None => {
                let mut volumes = Vec::new();
                for id in &g.rec.volume_ids {
                    let v = self.core.repo.get::<VolumeRec>(&keys::volume(id)).await.map_err(step_error)?.ok_or_else(
                        || {
                            ProcedureError::Fail(format!(
                                "group {} lists volume {id}, which does not exist",
                                s.group_name
                            ))
                        },
                    )?;
                    volumes.push(v.rec);
                }
                volumes
            }
        };
        let api = ReplicationApi { core: self.core.clone(), parent: String::new() };
        let at = Expect::of(ctx, g.rev);
        let mut retried: Option<FailoverProgress> = None;
        let result = match (s.action.as_str(), s.state) {
            (action @ ("enable" | "disable"), _) => {
                let mut progress = s.progress.clone();
                let done = if action == "enable" {
                    api.drive_enable(g.rec, volumes, ctx.epoch, &at, &mut progress).await
                } else {
                    api.drive_disable(g.rec, volumes, ctx.epoch, &at, &mut progress).await
                };
                if done.is_err() {
                    retried = Some(progress);
                }
                done
            }
            ("failover" | "failback", Some(first)) => {
                let mut progress = s.progress.clone();
                let mut state = first;
                let ran = loop {
                    let step = api.failover_state(state, g.rec.clone(), volumes.clone(), ctx.epoch, &at, &mut progress);
                    match step.await {
                        // The record follows the promote in the same step: nothing the
                        // promote found needs saving first (one store write less per
                        // move). After a crash between the two the promote runs again:
                        // a no-op for a planned move (the volume is primary already), a
                        // replay by op_id for a forced one, which returns the divergence
                        // point it recorded.
                        Ok(None) if state == FailoverState::Promote => state = FailoverState::Record,
                        other => break other,
                    }
                };
                match ran {
                    Ok(None) => {
                        let note = progress
                            .blocked
                            .clone()
                            .map(|b| format!("blocked: {b}"))
                            .or_else(|| progress.notes.last().cloned())
                            .unwrap_or_else(|| format!("{} done", state.name()));
                        self.state.progress = progress;
                        self.state.state = state.next(self.state.force);
                        self.state.fenced = ctx.epoch;
                        return Ok(Status::Executing { note });
                    }
                    Ok(Some(r)) => Ok(r),
                    Err(e) => {
                        retried = Some(progress);
                        Err(e)
                    }
                }
            }
            (other, _) => return Err(ProcedureError::Fail(format!("unknown group action {other}"))),
        };
        if let Some(tried) = retried {
            self.state.progress.keep_retry_counts(&tried);
        }
        let s = &self.state;
        match result {
            Ok(r) => Answer::from_result(Ok(r)).done(),
            Err(e) => {
                if !still_owner(&self.core, ctx).await? {
                    // This owner lost its claim without noticing (its lease lapsed under
                    // load); its final write was refused. The new owner carries on.
                    return Err(ProcedureError::Retry(format!(
                        "this orchestrator no longer owns the execution ({e}); its new owner carries on"
                    )));
                }
                // Still pending: the final write did not land; run the step again.
                let now = self.core.repo.get::<GroupRec>(&keys::group(&s.group_id)).await.map_err(step_error)?;
                match now {
                    Some(n) if n.rec.pending.as_ref().is_some_and(|p| p.op_id == s.op_id) => Err(step_error(e)),
                    _ => Answer::from_result::<pb::ReplicationResult>(Err(e)).done(),
                }
            }
        }
    }
}
