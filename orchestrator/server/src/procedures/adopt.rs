//! Applying an adoption plan: a check that the backend's unmanaged images are still
//! those the plan saw (less those it adopted), then a step per adoptable image.
//!
//! Each image is taken over through the volume manage transition (its own execution,
//! with its snapshots), then added to its group when the map named one; its outcome is
//! written into the plan. A resumed step finds a volume of the planned name on the
//! backend whose image is no longer listed: that is the adoption it made before, and it
//! records it instead of managing twice. One apply per backend runs at a time.

use std::sync::Arc;

use async_trait::async_trait;
use drover_procedure::{Context, Procedure, ProcedureError, Status};
use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::{Answer, step_error};
use crate::error::ApiError;
use crate::repo::put;
use crate::service::Core;
use crate::service::adoption::{PlanRec, changes, image_lines, plan_key};
use crate::service::groups::GroupApi;
use crate::service::volumes::VolumeApi;

/// The procedure kind.
pub const KIND: &str = "adopt";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    plan_id: String,
    backend: String,
    checked: bool,
    /// The index of the next plan item to look at.
    next: usize,
    adopted: usize,
    failed: usize,
}

/// Applies one adoption plan.
pub struct Adopt {
    core: Arc<Core>,
    state: State,
}

impl Adopt {
    /// An apply of `plan`.
    pub fn new(core: Arc<Core>, plan: &pb::AdoptionPlan) -> Self {
        let state = State {
            plan_id: plan.id.clone(),
            backend: plan.backend.clone(),
            checked: false,
            next: 0,
            adopted: 0,
            failed: 0,
        };
        Self { core, state }
    }

    /// Rebuilds a persisted apply.
    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
    }

    fn volumes(&self) -> VolumeApi {
        VolumeApi { core: self.core.clone() }
    }

    /// Writes the plan's outcomes, only while this owner holds the apply (an owner that
    /// lost its claim unnoticed must not write over its successor's).
    async fn save(&self, plan: &PlanRec, ctx: &Context) -> Result<(), ProcedureError> {
        let txn = drover_store::Txn::new().when(ctx.claim()).and_then(put(&plan_key(&plan.plan.id), plan));
        if !self.core.repo.txn(txn).await.map_err(step_error)?.succeeded {
            return Err(ProcedureError::Retry("this orchestrator no longer owns the apply".into()));
        }
        Ok(())
    }

    /// The backend's images now, against the plan's less those it adopted.
    async fn check(&mut self, plan: &mut PlanRec, ctx: &Context) -> Result<Status, ProcedureError> {
        let execution = ctx.execution_id.as_str();
        let now = image_lines(&self.volumes().list_manageable(&self.state.backend).await.map_err(step_error)?);
        let mut then = plan.images.clone();
        for i in plan.plan.items.iter().filter(|i| i.outcome == "adopted") {
            then.remove(&i.reference);
        }
        let changed = changes(&then, &now);
        if !changed.is_empty() {
            return Err(ProcedureError::Fail(format!(
                "backend {} changed since plan {} was made ({changed}); nothing was adopted by this apply; make a new \
                 plan (`drover adopt plan --backend {}`) and apply that",
                self.state.backend, self.state.plan_id, self.state.backend
            )));
        }
        if !plan.plan.executions.iter().any(|e| e == execution) {
            plan.plan.executions.push(execution.to_string());
            self.save(plan, ctx).await?;
        }
        self.state.checked = true;
        let todo = plan.plan.items.iter().filter(|i| i.category == "adoptable" && i.outcome != "adopted").count();
        Ok(Status::Executing { note: format!("backend unchanged since the plan; {todo} image(s) to adopt") })
    }

    /// Adopts item `n` of the plan and records its outcome.
    async fn adopt(&mut self, plan: &mut PlanRec, n: usize, ctx: &Context) -> Result<String, ProcedureError> {
        let item = plan.plan.items[n].clone();
        let volumes = self.volumes();
        let existing = match self.core.repo.volume(&item.name, &item.project).await {
            Ok(v) => Some(v.rec),
            Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(step_error(e)),
        };
        let (outcome, reason, volume_id) = match existing {
            // The manage this apply submitted before a restart is still running (its own
            // execution, resumed too): wait for its end.
            Some(v)
                if v.backend == self.state.backend
                    && v.pending.as_ref().is_some_and(|p| p.action == "manage" && p.reference == item.reference) =>
            {
                return Err(ProcedureError::Retry(format!(
                    "volume {} is still being taken over from {}",
                    item.name, item.reference
                )));
            }
            // Made by this apply before a restart: the image went into it.
            Some(v)
                if v.backend == self.state.backend && {
                    let listed = volumes.list_manageable(&self.state.backend).await.map_err(step_error)?;
                    !listed.iter().any(|m| m.reference == item.reference)
                } =>
            {
                ("adopted", String::new(), v.id)
            }
            Some(v) => (
                "failed",
                format!(
                    "project {} has had a volume {} (id {}) since the plan; plan again",
                    item.project, item.name, v.id
                ),
                String::new(),
            ),
            None => {
                let req = pb::ManageVolumeRequest {
                    backend: self.state.backend.clone(),
                    reference: item.reference.clone(),
                    name: item.name.clone(),
                    project: item.project.clone(),
                    without_snapshots: false,
                };
                match volumes.manage(req).await {
                    Ok(v) => ("adopted", String::new(), v.id),
                    Err(ApiError::Unavailable(m)) => return Err(ProcedureError::Retry(m)),
                    Err(e) => ("failed", e.to_string(), String::new()),
                }
            }
        };
        let mut reason = reason;
        if outcome == "adopted" && !item.group.is_empty() {
            let groups = GroupApi { core: self.core.clone() };
            let add = pb::UpdateGroupRequest {
                group: item.group.clone(),
                project: item.project.clone(),
                add_volumes: vec![volume_id.clone()],
                ..Default::default()
            };
            let done = match self.core.repo.group(&item.group, &item.project).await {
                Ok(g) if g.rec.volume_ids.contains(&volume_id) => Ok(()),
                Ok(_) => groups.update(add).await.map(|_| ()),
                // Missing, and the map gave its type: the first adoption creates it.
                Err(ApiError::NotFound(_)) if !item.group_type.is_empty() => {
                    let create = pb::CreateGroupRequest {
                        name: item.group.clone(),
                        project: item.project.clone(),
                        group_type: item.group_type.clone(),
                        backend: self.state.backend.clone(),
                        volumes: vec![volume_id.clone()],
                        ..Default::default()
                    };
                    groups.create(create).await.map(|_| ())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                reason =
                    format!("adopted, but not added to group {}: {e}; add it with `drover group update`", item.group);
            }
        }
        let it = &mut plan.plan.items[n];
        it.outcome = outcome.into();
        it.outcome_reason = reason;
        if !volume_id.is_empty() {
            it.volume_id = volume_id;
        }
        self.save(plan, ctx).await?;
        match outcome {
            "adopted" => self.state.adopted += 1,
            _ => self.state.failed += 1,
        }
        Ok(format!("{}: {outcome}", item.reference))
    }
}

#[async_trait]
impl Procedure for Adopt {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        format!("adopt what plan {} found on backend {}", self.state.plan_id, self.state.backend)
    }

    fn locks(&self) -> Vec<String> {
        vec![format!("adopt/{}", self.state.backend)]
    }

    fn step(&self) -> String {
        match self.state.checked {
            false => "check".into(),
            true => format!("item-{}", self.state.next + 1),
        }
    }

    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let volumes = self.volumes();
        let mut plan = match volumes.adoption_plan(&self.state.plan_id).await {
            Ok(p) => p,
            Err(ApiError::Unavailable(m)) => return Err(ProcedureError::Retry(m)),
            Err(e) => return Err(ProcedureError::Fail(e.to_string())),
        };
        if !self.state.checked {
            return self.check(&mut plan, ctx).await;
        }
        let next = (self.state.next..plan.plan.items.len())
            .find(|n| plan.plan.items[*n].category == "adoptable" && plan.plan.items[*n].outcome != "adopted");
        let Some(n) = next else {
            tracing::info!(plan = %self.state.plan_id, adopted = self.state.adopted, failed = self.state.failed, "adoption applied");
            return Answer::Ok { value: serde_json::to_value(&plan.plan).expect("plans serialise") }.done();
        };
        let note = self.adopt(&mut plan, n, ctx).await?;
        self.state.next = n + 1;
        Ok(Status::Executing { note })
    }
}
