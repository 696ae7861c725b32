//! `exec`: a command on the orchestrator's host; its exit code is the outcome.

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::model::now_ms;
use crate::runbook::plan::Item;
use crate::runbook::run::{RunbookRun, TestCloneRec, exec_item};
use crate::runbook::schema::{Dur, Step};
use crate::runbook::steps;

/// Run a command on the orchestrator's host; exit code 0 is success.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub name: String,
    pub command: Vec<String>,
    pub timeout: Dur,
    #[serde(default)]
    pub continue_on_error: bool,
}

#[async_trait]
impl StepKind for Exec {
    fn kind(&self) -> &'static str {
        "exec"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, _earlier: &[Step]) -> Result<(), String> {
        if self.command.is_empty() {
            return Err(format!("step `{}` (exec) needs a `command` (a list: program, args…)", self.name));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, _ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let live: Vec<&TestCloneRec> = run.state.clones.iter().filter(|c| !c.deleted).collect();
        let clones = serde_json::to_string(&live).expect("clones serialise");
        let outcome =
            steps::exec(&self.command, self.timeout.0, &run.state.params, &[("DROVER_TEST_CLONES", clones)]).await;
        let (Ok(said) | Err(said)) = &outcome;
        run.state.steps[at].items = vec![Item {
            status: if outcome.is_ok() { "succeeded" } else { "failed" }.into(),
            reason: said.clone(),
            ended_ms: now_ms(),
            ..exec_item(&self.command)
        }];
        match outcome {
            Ok(out) => Ok(run.end_step("succeeded", out)),
            Err(why) if self.continue_on_error => Ok(run.end_step("failed", why)),
            Err(why) => {
                run.end_step("failed", why.clone());
                Err(ProcedureError::Fail(format!("step {}: {why}", self.name)))
            }
        }
    }
}
