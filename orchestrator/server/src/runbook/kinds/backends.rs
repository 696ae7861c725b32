//! `freeze` and `thaw`: refuse, then allow again, management changes on backends.

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::model::now_ms;
use crate::runbook::run::RunbookRun;
use crate::runbook::schema::BackendSelector;
use crate::runbook::steps;

/// Refuse management changes on the selected backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    pub name: String,
    pub backends: BackendSelector,
}

/// Allow them again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thaw {
    pub name: String,
    pub backends: BackendSelector,
}

async fn set_all(run: &mut RunbookRun, ctx: &Context, name: &str, frozen: bool) -> Result<Status, ProcedureError> {
    let at = run.state.at;
    let mut failed = 0;
    for item in &mut run.state.steps[at].items {
        match steps::set_frozen(&run.core, &item.target, frozen, ctx.claim()).await {
            Ok(()) => item.status = "succeeded".into(),
            Err(e) => {
                item.status = "failed".into();
                item.reason = e.to_string();
                failed += 1;
            }
        }
        item.ended_ms = now_ms();
    }
    let verb = if frozen { "frozen" } else { "thawed" };
    let n = run.state.steps[at].items.len();
    if failed > 0 {
        run.end_step("failed", format!("{failed} of {n} backends could not be {verb}"));
        return Err(ProcedureError::Fail(format!("step {name}: {failed} backend(s) could not be {verb}")));
    }
    Ok(run.end_step("succeeded", format!("{n} backend(s) {verb}")))
}

#[async_trait]
impl StepKind for Freeze {
    fn kind(&self) -> &'static str {
        "freeze"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backends(&self) -> Option<&BackendSelector> {
        Some(&self.backends)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        set_all(run, ctx, &self.name, true).await
    }
}

#[async_trait]
impl StepKind for Thaw {
    fn kind(&self) -> &'static str {
        "thaw"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backends(&self) -> Option<&BackendSelector> {
        Some(&self.backends)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        set_all(run, ctx, &self.name, false).await
    }
}
