//! Volume transitions: create, delete, extend, manage and unmanage.

use std::sync::Arc;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::{Answer, step_error, still_owner};
use crate::error::{ApiError, ApiResult};
use crate::model::{PendingOp, VolumeRec, keys, volume_status};
use crate::repo::Expect;
use crate::service::Core;
use crate::service::volumes::VolumeApi;

/// The procedure kind.
pub const KIND: &str = "volume-transition";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    volume_id: String,
    volume_name: String,
    /// The project of the group or volume (its executions are that project's).
    #[serde(default)]
    project: String,
    op_id: String,
    /// create, delete, extend, manage or unmanage.
    action: String,
    backend: String,
}

/// Drives one volume transition whose intent was written with the execution.
pub struct VolumeTransition {
    core: Arc<Core>,
    state: State,
}

impl VolumeTransition {
    /// The transition `op` of `volume`.
    pub fn new(core: Arc<Core>, volume: &VolumeRec, op: &PendingOp) -> Self {
        let state = State {
            volume_id: volume.id.clone(),
            volume_name: volume.name.clone(),
            project: volume.project.clone(),
            op_id: op.op_id.clone(),
            action: op.action.clone(),
            backend: volume.backend.clone(),
        };
        Self { core, state }
    }

    /// Rebuilds a persisted transition.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
    }

    /// The answer for a transition that had finished when its execution was resumed.
    fn finished(&self, now: Option<VolumeRec>) -> Answer {
        let s = &self.state;
        let value = match (s.action.as_str(), now) {
            ("delete", None) => Ok(serde_json::Value::Null),
            ("unmanage", None) => Ok(serde_json::Value::String(s.volume_id.clone())),
            (_, None) => Err(ApiError::FailedPrecondition(format!(
                "volume {} is gone: the backend refused to {} it",
                s.volume_name, s.action
            ))),
            (_, Some(v)) if v.status == volume_status::ERROR => Err(ApiError::FailedPrecondition(format!(
                "volume {} is in error after {}: {}",
                s.volume_name, s.action, v.status_reason
            ))),
            (_, Some(v)) => Ok(serde_json::to_value(v).expect("records serialise")),
        };
        Answer::from_result(value)
    }
}

#[async_trait]
impl Procedure for VolumeTransition {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        format!("{} volume {} on {}", self.state.action, self.state.volume_name, self.state.backend)
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        vec![format!("volume/{}", self.state.volume_id)]
    }

    fn step(&self) -> String {
        format!("drive-{}", self.state.action)
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let s = &self.state;
        let key = keys::volume(&s.volume_id);
        let v = self.core.repo.get::<VolumeRec>(&key).await.map_err(step_error)?;
        let Some(v) = v.filter(|v| v.rec.pending.as_ref().is_some_and(|p| p.op_id == s.op_id)) else {
            let now = self.core.repo.get::<VolumeRec>(&key).await.map_err(step_error)?.map(|v| v.rec);
            return self.finished(now).done();
        };
        let api = VolumeApi { core: self.core.clone() };
        let (epoch, at) = (ctx.epoch, Expect::of(ctx, v.rev));
        let result: ApiResult<serde_json::Value> = match s.action.as_str() {
            "create" => api.drive_create(v.rec, epoch, &at).await.map(to_json),
            "delete" => api.drive_delete(v.rec, epoch, &at).await.map(to_json),
            "extend" => api.drive_extend(v.rec, epoch, &at).await.map(to_json),
            "manage" => api.drive_manage(v.rec, epoch, &at).await.map(to_json),
            "unmanage" => api.drive_unmanage(v.rec, epoch, &at).await.map(to_json),
            other => return Err(ProcedureError::Fail(format!("unknown volume action {other}"))),
        };
        match result {
            Ok(value) => Answer::Ok { value }.done(),
            Err(e) => {
                if !still_owner(&self.core, ctx).await? {
                    // The claim lapsed unnoticed and the final write was refused: the new
                    // owner carries on.
                    return Err(ProcedureError::Retry(format!(
                        "this orchestrator no longer owns the execution ({e}); its new owner carries on"
                    )));
                }
                let now = self.core.repo.get::<VolumeRec>(&key).await.map_err(step_error)?;
                if now.as_ref().is_some_and(|n| n.rec.pending.as_ref().is_some_and(|p| p.op_id == s.op_id)) {
                    Err(step_error(e))
                } else {
                    Answer::from_result::<()>(Err(e)).done()
                }
            }
        }
    }
}

fn to_json<T: Serialize>(v: T) -> serde_json::Value {
    serde_json::to_value(v).expect("records serialise")
}
