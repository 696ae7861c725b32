//! `prompt`: wait for an operator's approve or reject (persisted: an orchestrator
//! restart keeps waiting); optionally list, per group, whose writes a failback discards.

use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::procedures::step_error;
use crate::runbook::run::RunbookRun;
use crate::runbook::schema::{Selector, Step};
use crate::runbook::steps;

/// Wait for an operator's `approve` or `reject`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    pub name: String,
    pub message: String,
    /// List, per selected group that diverged, whose changes a failback would discard.
    #[serde(default)]
    pub show_divergence: Option<Selector>,
    /// With `show_divergence`: go on without asking when no selected group diverged
    /// (a failback after a planned failover discards nothing).
    #[serde(default)]
    pub only_if_diverged: bool,
}

#[async_trait]
impl StepKind for Prompt {
    fn tenant_may_run(&self) -> Result<(), String> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "prompt"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn check(&self, _earlier: &[Step]) -> Result<(), String> {
        if self.message.trim().is_empty() {
            return Err(format!("step `{}` (prompt) needs a non-empty `message`", self.name));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        if run.state.steps[at].shown.is_empty()
            && let Some(sel) = &self.show_divergence
        {
            let shown = steps::divergence(&run.core, sel).await.map_err(step_error)?;
            if shown.is_empty() && self.only_if_diverged {
                run.state.steps[at].shown = vec!["no group has diverged".into()];
                return Ok(run.end_step("skipped", "no group has diverged: nothing to approve".into()));
            }
            run.state.steps[at].shown = if shown.is_empty() { vec!["no group has diverged".into()] } else { shown };
            return Ok(Status::Executing { note: format!("{}: waiting for approve or reject", self.name) });
        }
        loop {
            match run.core.procedures.decision(&ctx.execution_id, &self.name).await {
                Ok(Some(d)) => {
                    let (approve, by) = (d.approve, d.by.clone());
                    run.state.steps[at].decision = Some(d);
                    if approve {
                        return Ok(run.end_step("succeeded", format!("approved by {by}")));
                    }
                    run.end_step("rejected", format!("rejected by {by}"));
                    return Err(ProcedureError::Fail(format!(
                        "rejected at prompt {} by {by}: nothing after it ran ({})",
                        self.name, self.message
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(ProcedureError::Retry(e.to_string())),
            }
            if run.signalled(ctx).await {
                return Ok(Status::Executing { note: format!("{}: waiting for approve or reject", self.name) });
            }
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
    }
}
