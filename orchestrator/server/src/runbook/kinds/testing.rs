//! Non-disruptive test failover: `test-clone` makes writable clones of the newest
//! complete recovery points at the replication target; `test-cleanup` removes them.

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::model::now_ms;
use crate::runbook::run::{RunbookRun, exec_item};
use crate::runbook::schema::{Selector, Step};
use crate::runbook::steps;

/// At each selected group's replication target, a writable clone of the newest complete
/// recovery point of every volume. Replication goes on; the clones' URIs reach `exec`
/// steps as `DROVER_TEST_CLONES` (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestClone {
    pub name: String,
    pub groups: Selector,
}

/// Removes every clone the `test-clone` step `clones_of` made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCleanup {
    pub name: String,
    pub clones_of: String,
}

#[async_trait]
impl StepKind for TestClone {
    fn kind(&self) -> &'static str {
        "test-clone"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        Some(&self.groups)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let made =
            steps::test_clones(&run.core, &mut run.state.steps[at].items, &self.name, &ctx.execution_id, ctx.epoch)
                .await?;
        for c in made {
            if !run.state.clones.iter().any(|k| k.clone_id == c.clone_id) {
                run.state.clones.push(c);
            }
        }
        let items = &run.state.steps[at].items;
        let failed = items.iter().filter(|i| i.status == "failed").count();
        let note = format!(
            "{} clone(s) of {} group(s); {failed} group(s) failed",
            run.state.clones.iter().filter(|c| c.step == self.name).count(),
            items.iter().filter(|i| i.status == "succeeded").count()
        );
        if failed > 0 {
            run.end_step("failed", note.clone());
            return Err(ProcedureError::Fail(format!(
                "step {}: {note}; see `drover execution report {}`",
                self.name, ctx.execution_id
            )));
        }
        Ok(run.end_step("succeeded", note))
    }
}

#[async_trait]
impl StepKind for TestCleanup {
    fn kind(&self) -> &'static str {
        "test-cleanup"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, earlier: &[Step]) -> Result<(), String> {
        if !earlier.iter().any(|s| s.name() == self.clones_of && matches!(s, Step::TestClone(_))) {
            return Err(format!(
                "step `{}` (test-cleanup): `clones_of: {}` names no earlier test-clone step",
                self.name, self.clones_of
            ));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let mut failed = Vec::new();
        let mut items = Vec::new();
        let core = run.core.clone();
        for c in run.state.clones.iter_mut().filter(|c| c.step == self.clones_of) {
            let mut item = exec_item(std::slice::from_ref(&c.clone_id));
            item.target = c.clone_id.clone();
            item.name = format!("{} ({})", c.clone_id, c.group);
            if !c.deleted {
                match steps::delete_clone(&core, c, &ctx.execution_id, ctx.epoch).await {
                    Ok(()) => c.deleted = true,
                    Err(e) => {
                        item.reason = e.clone();
                        failed.push(e);
                    }
                }
            }
            item.status = if c.deleted { "succeeded" } else { "failed" }.into();
            item.ended_ms = now_ms();
            items.push(item);
        }
        let n = items.len();
        run.state.steps[at].items = items;
        if let Some(first) = failed.first() {
            // A backend that is away: the step is tried again, the clones stay listed.
            return Err(ProcedureError::Retry(format!("removing test clones: {first}")));
        }
        Ok(run.end_step("succeeded", format!("{n} test clone(s) removed")))
    }
}
