//! `adopt-plan` and `adopt-apply`: after a disaster, find what a backend holds that
//! Drover does not manage, and take over what is adoptable (docs/adoption.md).

use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, ExecutionStatus, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::model::now_ms;
use crate::procedures::step_error;
use crate::runbook::plan::Item;
use crate::runbook::run::{AdoptionRec, RunbookRun, exec_item};
use crate::runbook::schema::Step;
use crate::service::volumes::VolumeApi;

/// Plan the adoption of `backend`'s unmanaged images (into `project`, or as the mapping
/// file `map`, a path on the orchestrator's host, says).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptPlan {
    pub name: String,
    pub backend: String,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub map: Option<String>,
}

/// Apply the plan the `adopt-plan` step `plan_of` made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptApply {
    pub name: String,
    pub plan_of: String,
}

impl AdoptPlan {
    /// The mapping file, when one is named (an empty parameter names none).
    fn map_path(&self) -> Option<&str> {
        self.map.as_deref().filter(|m| !m.is_empty())
    }
}

/// A plan's item as a runbook item: the image, its category (or outcome) and why.
fn item(i: &drover_proto::v1::AdoptionItem) -> Item {
    let target = if i.reference.is_empty() { i.volume_id.clone() } else { i.reference.clone() };
    let status = match (i.category.as_str(), i.outcome.as_str()) {
        (_, "adopted") => "succeeded",
        (_, "failed") => "failed",
        ("adoptable", _) => "pending",
        _ => "skipped",
    };
    let what = if i.outcome_reason.is_empty() { &i.reason } else { &i.outcome_reason };
    Item {
        target: target.clone(),
        name: match i.name.is_empty() {
            true => target,
            false => format!("{} -> {}", if i.reference.is_empty() { "-" } else { &i.reference }, i.name),
        },
        project: i.project.clone(),
        status: status.into(),
        reason: if what.is_empty() { i.category.clone() } else { format!("{}: {what}", i.category) },
        ended_ms: now_ms(),
        ..exec_item(&[])
    }
}

#[async_trait]
impl StepKind for AdoptPlan {
    fn kind(&self) -> &'static str {
        "adopt-plan"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, _earlier: &[Step]) -> Result<(), String> {
        if self.project.is_empty() && self.map_path().is_none() {
            return Err(format!(
                "step `{}` (adopt-plan) needs a `project` for the adopted volumes, or a `map` that names projects",
                self.name
            ));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, _ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let (map, map_file) = match self.map_path() {
            None => (String::new(), String::new()),
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (text, path.to_string()),
                Err(e) => {
                    let why = format!("cannot read the mapping file {path} on the orchestrator's host: {e}");
                    run.end_step("failed", why.clone());
                    return Err(ProcedureError::Fail(format!("step {}: {why}", self.name)));
                }
            },
        };
        let api = VolumeApi { core: run.core.clone() };
        let req = drover_proto::v1::PlanAdoptionRequest {
            backend: self.backend.clone(),
            project: self.project.clone(),
            map,
            map_file,
        };
        let plan = match api.plan_adoption(&req).await {
            Ok(p) => p,
            Err(e @ crate::error::ApiError::Unavailable(_)) => return Err(step_error(e)),
            Err(e) => {
                run.end_step("failed", e.to_string());
                return Err(ProcedureError::Fail(format!("step {}: {e}", self.name)));
            }
        };
        run.state.steps[at].items = plan.items.iter().map(item).collect();
        run.state.adoptions.retain(|a| a.step != self.name);
        run.state.adoptions.push(AdoptionRec {
            step: self.name.clone(),
            plan_id: plan.id.clone(),
            execution_id: String::new(),
        });
        let adoptable = plan.items.iter().filter(|i| i.category == "adoptable").count();
        let note = format!(
            "plan {}: {adoptable} adoptable of {} item(s) (`drover adopt show {}`)",
            plan.id,
            plan.items.len(),
            plan.id
        );
        Ok(run.end_step("succeeded", note))
    }
}

#[async_trait]
impl StepKind for AdoptApply {
    fn kind(&self) -> &'static str {
        "adopt-apply"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, earlier: &[Step]) -> Result<(), String> {
        if !earlier.iter().any(|s| s.name() == self.plan_of && matches!(s, Step::AdoptPlan(_))) {
            return Err(format!(
                "step `{}` (adopt-apply): `plan_of: {}` names no earlier adopt-plan step",
                self.name, self.plan_of
            ));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let Some(rec) = run.state.adoptions.iter().find(|a| a.step == self.plan_of).cloned() else {
            let why = format!("step {} made no plan", self.plan_of);
            run.end_step("failed", why.clone());
            return Err(ProcedureError::Fail(format!("step {}: {why}", self.name)));
        };
        let api = VolumeApi { core: run.core.clone() };
        // The apply is its own execution; its id is kept first, so a resumed round
        // follows it instead of applying again.
        if rec.execution_id.is_empty() {
            let e = api.apply_adoption(&rec.plan_id).await.map_err(step_error)?;
            if let Some(a) = run.state.adoptions.iter_mut().find(|a| a.step == self.plan_of) {
                a.execution_id = e.id.clone();
            }
            return Ok(Status::Executing {
                note: format!("{}: applying plan {} as execution {}", self.name, rec.plan_id, e.id),
            });
        }
        loop {
            let e =
                run.core.procedures.get(&rec.execution_id).await.map_err(|e| ProcedureError::Retry(e.to_string()))?;
            let Some(e) = e else {
                let why = format!("the apply's execution {} is gone", rec.execution_id);
                run.end_step("failed", why.clone());
                return Err(ProcedureError::Fail(format!("step {}: {why}", self.name)));
            };
            if e.status.is_terminal() {
                let plan = api.adoption_plan(&rec.plan_id).await.map_err(step_error)?;
                run.state.steps[at].items =
                    plan.plan.items.iter().filter(|i| i.category == "adoptable").map(item).collect();
                let items = &run.state.steps[at].items;
                let adopted = items.iter().filter(|i| i.status == "succeeded").count();
                let failed = items.len() - adopted;
                let note = format!("{adopted} adopted, {failed} not (execution {})", e.id);
                if e.status != ExecutionStatus::Succeeded || failed > 0 {
                    let why = if e.error.is_empty() { note.clone() } else { format!("{note}: {}", e.error) };
                    run.end_step("failed", why.clone());
                    return Err(ProcedureError::Fail(format!("step {}: {why}", self.name)));
                }
                return Ok(run.end_step("succeeded", note));
            }
            if run.signalled(ctx).await {
                return Ok(Status::Executing { note: format!("{}: waiting for execution {}", self.name, e.id) });
            }
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}
