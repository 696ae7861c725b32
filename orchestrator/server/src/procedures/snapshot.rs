//! Snapshot transitions: take and delete a snapshot of a volume or of a group.

use std::sync::Arc;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::{Answer, step_error, still_owner};
use crate::error::ApiError;
use crate::model::{PendingOp, SnapshotRec, keys, snapshot_status};
use crate::repo::Expect;
use crate::service::Core;
use crate::service::snapshots::SnapshotApi;

/// The procedure kind.
pub const KIND: &str = "snapshot-transition";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    snapshot_id: String,
    name: String,
    project: String,
    op_id: String,
    /// create or delete.
    action: String,
    /// What it locks: `group/<id>` or `volume/<id>`.
    locks: Vec<String>,
}

/// Drives one snapshot transition whose intent was written with the execution.
pub struct SnapshotTransition {
    core: Arc<Core>,
    state: State,
}

impl SnapshotTransition {
    /// The transition `op` of `snap`, holding `locks`.
    pub fn new(core: Arc<Core>, snap: &SnapshotRec, op: &PendingOp, locks: Vec<String>) -> Self {
        let state = State {
            snapshot_id: snap.id.clone(),
            name: snap.name.clone(),
            project: snap.project.clone(),
            op_id: op.op_id.clone(),
            action: op.action.clone(),
            locks,
        };
        Self { core, state }
    }

    /// Rebuilds a persisted transition.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
    }

    /// The answer for a transition that had finished when its execution was resumed.
    fn finished(&self, now: Option<SnapshotRec>) -> Answer {
        let s = &self.state;
        let value = match (s.action.as_str(), now) {
            ("delete", None) => Ok(serde_json::Value::Null),
            (_, None) => Err(ApiError::FailedPrecondition(format!(
                "snapshot {} is gone: the backend refused to take it",
                s.name
            ))),
            (_, Some(n)) if n.status == snapshot_status::ERROR => {
                Err(ApiError::FailedPrecondition(format!("snapshot {} is in error: {}", s.name, n.status_reason)))
            }
            (_, Some(n)) => Ok(serde_json::to_value(n).expect("records serialise")),
        };
        Answer::from_result(value)
    }
}

#[async_trait]
impl Procedure for SnapshotTransition {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        format!("{} snapshot {}", if self.state.action == "delete" { "delete" } else { "take" }, self.state.name)
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        self.state.locks.clone()
    }

    fn step(&self) -> String {
        format!("{}-snapshot", self.state.action)
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let s = &self.state;
        let key = keys::snapshot(&s.snapshot_id);
        let now = self.core.repo.get::<SnapshotRec>(&key).await.map_err(step_error)?;
        let Some(snap) = now.filter(|n| n.rec.pending.as_ref().is_some_and(|p| p.op_id == s.op_id)) else {
            let now = self.core.repo.get::<SnapshotRec>(&key).await.map_err(step_error)?.map(|n| n.rec);
            return self.finished(now).done();
        };
        let api = SnapshotApi { core: self.core.clone() };
        let at = Expect::of(ctx, snap.rev);
        let mut rec = snap.rec;
        rec.execution_id = ctx.execution_id.clone();
        let result = match s.action.as_str() {
            "create" => api.drive_create(rec, ctx.epoch, &at).await.map(|r| serde_json::to_value(r).expect("json")),
            "delete" => api.drive_delete(rec, ctx.epoch, &at).await.map(|()| serde_json::Value::Null),
            other => return Err(ProcedureError::Fail(format!("unknown snapshot action {other}"))),
        };
        match result {
            Ok(value) => Answer::Ok { value }.done(),
            Err(e) => {
                if !still_owner(&self.core, ctx).await? {
                    return Err(ProcedureError::Retry(format!(
                        "this orchestrator no longer owns the execution ({e}); its new owner carries on"
                    )));
                }
                let now = self.core.repo.get::<SnapshotRec>(&key).await.map_err(step_error)?;
                if now.as_ref().is_some_and(|n| n.rec.pending.as_ref().is_some_and(|p| p.op_id == s.op_id)) {
                    Err(step_error(e))
                } else {
                    Answer::from_result::<()>(Err(e)).done()
                }
            }
        }
    }
}
