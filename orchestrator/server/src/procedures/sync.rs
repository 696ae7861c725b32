//! "Sync now": the active side takes a recovery point and ships it to its peer.

use std::sync::Arc;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::Answer;
use crate::model::GroupRec;
use crate::service::Core;
use crate::service::replication::ReplicationApi;

/// The procedure kind.
pub const KIND: &str = "group-sync";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    group_id: String,
    group_name: String,
    /// The project of the group or volume (its executions are that project's).
    #[serde(default)]
    project: String,
    op_id: String,
}

/// Takes and ships one recovery point of a group now.
pub struct SyncNow {
    core: Arc<Core>,
    state: State,
}

impl SyncNow {
    /// A sync of `group`.
    pub fn new(core: Arc<Core>, group: &GroupRec) -> Self {
        let state = State {
            group_id: group.id.clone(),
            group_name: group.name.clone(),
            project: group.project.clone(),
            op_id: uuid::Uuid::now_v7().to_string(),
        };
        Self { core, state }
    }

    /// Rebuilds a persisted sync.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
    }
}

#[async_trait]
impl Procedure for SyncNow {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        format!("sync group {} now", self.state.group_name)
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        vec![format!("group/{}", self.state.group_id)]
    }

    fn step(&self) -> String {
        "sync".into()
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        // The agent call is idempotent by op_id: a resumed sync asks before it ships again.
        let api = ReplicationApi { core: self.core.clone(), parent: String::new() };
        Answer::from_result(api.sync_step(&self.state.group_id, &self.state.op_id, ctx.epoch).await).done()
    }
}
