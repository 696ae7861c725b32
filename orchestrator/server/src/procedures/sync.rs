//! "Sync now": the active side takes a recovery point and ships it to its peer.
//!
//! With quiesce (application-consistent), three persisted steps: `quiesce` (the
//! instances using the group's volumes, through the active site's compute side, bounded
//! by the timeout), `sync`, and `unquiesce`, which runs whatever the first two did, also
//! after the orchestrator restarted between them. The point counts as
//! application-consistent only when every instance answered the quiesce in time and
//! the sync succeeded; it is then recorded as the group's `app_consistent_point`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use drover_proto::compute::v1 as cpb;
use serde::{Deserialize, Serialize};

use super::Answer;
use crate::compute::Call;
use crate::model::{BackendRec, GroupRec, keys};
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
    #[serde(default)]
    quiesce: Option<Quiesce>,
}

/// A quiesced sync's progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quiesce {
    timeout_ms: i64,
    /// quiesce, sync or unquiesce.
    phase: String,
    site: String,
    /// The instances asked to quiesce (all are asked to unquiesce).
    instances: Vec<String>,
    /// Every one of them answered the quiesce in time.
    quiesced: bool,
    notes: Vec<String>,
    /// The sync's answer, once it ran.
    answer: Option<serde_json::Value>,
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
            quiesce: None,
        };
        Self { core, state }
    }

    /// With `quiesce`, the group's instances are quiesced (within `timeout_ms`) for the
    /// point.
    pub fn quiesced(mut self, quiesce: bool, timeout_ms: i64) -> Self {
        if quiesce {
            self.state.quiesce = Some(Quiesce {
                timeout_ms,
                phase: "quiesce".into(),
                site: String::new(),
                instances: Vec::new(),
                quiesced: false,
                notes: Vec::new(),
                answer: None,
            });
        }
        self
    }

    /// Rebuilds a persisted sync.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
    }

    async fn sync(&self, epoch: i64) -> Answer {
        // The agent call is idempotent by op_id: a resumed sync asks before it ships again.
        let api = ReplicationApi { core: self.core.clone(), parent: String::new() };
        Answer::from_result(api.sync_step(&self.state.group_id, &self.state.op_id, epoch).await)
    }

    /// Finds and quiesces the group's instances at its active site.
    async fn quiesce(&self, q: &mut Quiesce) -> Result<(), ProcedureError> {
        let g = self.core.repo.get::<GroupRec>(&keys::group(&self.state.group_id)).await.map_err(super::step_error)?;
        let Some(g) = g else {
            return Err(ProcedureError::Fail(format!("group {} no longer exists", self.state.group_name)));
        };
        let backend =
            self.core.repo.get::<BackendRec>(&keys::backend(&g.rec.active_backend)).await.map_err(super::step_error)?;
        q.site = backend.map(|b| b.rec.site).unwrap_or_default();
        let bound = Duration::from_millis(q.timeout_ms as u64);
        if !self.core.hooks.sites().contains(&q.site) {
            q.notes.push(format!(
                "site {} has no compute side: nothing to quiesce, the point is crash-consistent",
                q.site
            ));
            return Ok(());
        }
        let list =
            tokio::time::timeout(bound, self.core.hooks.call(&q.site, &Call::ListInstances(Default::default()))).await;
        let instances = match list {
            Ok(Ok(a)) => a.instances,
            Ok(Err(e)) => {
                q.notes.push(format!("listing the instances at {} failed: {e}; the point is crash-consistent", q.site));
                return Ok(());
            }
            Err(_) => {
                q.notes.push(format!("site {} did not list its instances within {bound:?}; crash-consistent", q.site));
                return Ok(());
            }
        };
        q.instances = instances
            .into_iter()
            .filter(|i| i.volume_ids.iter().any(|v| g.rec.volume_ids.contains(v)))
            .map(|i| i.id)
            .collect();
        if q.instances.is_empty() {
            q.notes.push(format!("no instance at {} uses the group's volumes", q.site));
            return Ok(());
        }
        let req = cpb::InstancesRequest {
            op_id: format!("{}:quiesce", self.state.op_id),
            instance_ids: q.instances.clone(),
            deadline_ms: q.timeout_ms,
        };
        match tokio::time::timeout(bound, self.core.hooks.call(&q.site, &Call::Quiesce(req))).await {
            Ok(Ok(a)) => {
                let ok = |id: &String| a.outcomes.iter().any(|o| &o.instance_id == id && o.result == "success");
                q.quiesced = q.instances.iter().all(ok);
                for o in a.outcomes.iter().filter(|o| o.result != "success") {
                    q.notes.push(format!("{} did not quiesce ({}): {}", o.instance_id, o.result, o.reason));
                }
            }
            Ok(Err(e)) => q.notes.push(format!("quiesce at {} failed: {e}", q.site)),
            Err(_) => q.notes.push(format!("quiesce at {} did not answer within {bound:?}", q.site)),
        }
        if q.quiesced {
            q.notes.push(format!("{} instance(s) quiesced at {}", q.instances.len(), q.site));
        }
        Ok(())
    }

    async fn unquiesce(&self, q: &mut Quiesce) {
        if q.instances.is_empty() {
            return;
        }
        let req = cpb::InstancesRequest {
            op_id: format!("{}:unquiesce", self.state.op_id),
            instance_ids: q.instances.clone(),
            deadline_ms: q.timeout_ms,
        };
        let bound = Duration::from_millis(q.timeout_ms as u64) * 2;
        match tokio::time::timeout(bound, self.core.hooks.call(&q.site, &Call::Unquiesce(req))).await {
            Ok(Ok(a)) => {
                let failed: Vec<String> = a
                    .outcomes
                    .iter()
                    .filter(|o| o.result == "error")
                    .map(|o| format!("{}: {}", o.instance_id, o.reason))
                    .collect();
                match failed.is_empty() {
                    true => q.notes.push(format!("{} instance(s) unquiesced", q.instances.len())),
                    false => q.notes.push(format!("unquiesce failed for {}; resume them by hand", failed.join("; "))),
                }
            }
            Ok(Err(e)) => q.notes.push(format!("unquiesce at {} failed: {e}; resume the instances by hand", q.site)),
            Err(_) => q.notes.push(format!("unquiesce at {} did not answer; resume the instances by hand", q.site)),
        }
    }

    /// Records `point` as the group's newest application-consistent point.
    async fn record_consistent(&self, point: &str) -> Result<(), ProcedureError> {
        for _ in 0..10 {
            let Some(g) =
                self.core.repo.get::<GroupRec>(&keys::group(&self.state.group_id)).await.map_err(super::step_error)?
            else {
                return Ok(());
            };
            let mut rec = g.rec;
            rec.app_consistent_point = point.to_string();
            let txn = drover_store::Txn::new()
                .when(drover_store::Compare::ModRevisionEquals(keys::group(&rec.id).into_bytes(), g.rev))
                .and_then_all(rec.writes());
            if self.core.repo.txn(txn).await.map_err(super::step_error)?.succeeded {
                return Ok(());
            }
        }
        Err(ProcedureError::Retry("the group kept changing while its consistent point was recorded".into()))
    }
}

#[async_trait]
impl Procedure for SyncNow {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        match self.state.quiesce {
            Some(_) => format!("sync group {} now, instances quiesced", self.state.group_name),
            None => format!("sync group {} now", self.state.group_name),
        }
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        vec![format!("group/{}", self.state.group_id)]
    }

    fn step(&self) -> String {
        self.state.quiesce.as_ref().map_or("sync".into(), |q| q.phase.clone())
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let Some(mut q) = self.state.quiesce.clone() else {
            return self.sync(ctx.epoch).await.done();
        };
        match q.phase.as_str() {
            "quiesce" => {
                self.quiesce(&mut q).await?;
                q.phase = "sync".into();
                let note = q.notes.last().cloned().unwrap_or_default();
                self.state.quiesce = Some(q);
                Ok(Status::Executing { note })
            }
            "sync" => {
                let answer = self.sync(ctx.epoch).await;
                q.answer = Some(serde_json::to_value(&answer).expect("answers serialise"));
                q.phase = "unquiesce".into();
                self.state.quiesce = Some(q);
                Ok(Status::Executing { note: "point taken".into() })
            }
            _ => {
                // Runs whatever the quiesce and the sync did.
                self.unquiesce(&mut q).await;
                let answer: Answer = q
                    .answer
                    .clone()
                    .and_then(|a| serde_json::from_value(a).ok())
                    .unwrap_or(Answer::Err { code: "internal".into(), message: "the sync left no answer".into() });
                let answer = match answer {
                    Answer::Ok { value } => {
                        let mut resp: drover_proto::v1::SyncGroupResponse =
                            serde_json::from_value(value).map_err(|e| ProcedureError::Fail(e.to_string()))?;
                        resp.application_consistent = q.quiesced;
                        if !q.quiesced {
                            q.notes.push("the point is crash-consistent only".into());
                        }
                        resp.consistency_note = q.notes.join("; ");
                        if q.quiesced {
                            self.record_consistent(&resp.recovery_point_id).await?;
                        }
                        Answer::Ok { value: serde_json::to_value(resp).expect("responses serialise") }
                    }
                    Answer::Err { code, message } => {
                        Answer::Err { code, message: format!("{message} ({})", q.notes.join("; ")) }
                    }
                };
                answer.done()
            }
        }
    }
}
