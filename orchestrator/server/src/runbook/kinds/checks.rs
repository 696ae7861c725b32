//! `verify` (each group has a status and an RPO bound) and `wait` (a while, or until
//! every group has a status).

use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::model::now_ms;
use crate::procedures::step_error;
use crate::runbook::run::RunbookRun;
use crate::runbook::schema::{Dur, Selector, Step};
use crate::runbook::steps;

/// Check the selected groups: each has `status` and, when given, an RPO at most
/// `max_rpo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    pub name: String,
    pub groups: Selector,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub max_rpo: Option<Dur>,
    /// Check only the groups this earlier step acted on (not those it skipped).
    #[serde(default)]
    pub after_step: Option<String>,
}

/// Wait a duration, or until the selected groups reach `status` (within `timeout`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wait {
    pub name: String,
    #[serde(default)]
    pub duration: Option<Dur>,
    #[serde(default)]
    pub until: Option<WaitUntil>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitUntil {
    pub groups: Selector,
    pub status: String,
    pub timeout: Dur,
}

#[async_trait]
impl StepKind for Verify {
    fn tenant_may_run(&self) -> Result<(), String> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "verify"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        Some(&self.groups)
    }
    fn check(&self, earlier: &[Step]) -> Result<(), String> {
        match &self.after_step {
            Some(e) if !earlier.iter().any(|s| s.name() == e) => {
                Err(format!("step `{}` (verify): `after_step: {e}` names no earlier step", self.name))
            }
            _ => Ok(()),
        }
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        if let Some(earlier) = &self.after_step {
            let acted: std::collections::HashSet<String> = run
                .state
                .steps
                .iter()
                .find(|s| &s.name == earlier)
                .map(|s| s.items.iter().filter(|i| i.status != "skipped").map(|i| i.target.clone()).collect())
                .unwrap_or_default();
            run.state.steps[at].items.retain(|i| acted.contains(&i.target));
        }
        let failed = steps::verify(&run.core, &mut run.state.steps[at].items, self.status.as_deref(), self.max_rpo)
            .await
            .map_err(step_error)?;
        let n = run.state.steps[at].items.len();
        if failed > 0 {
            run.end_step("failed", format!("{failed} of {n} groups failed the check"));
            return Err(ProcedureError::Fail(format!(
                "step {}: {failed} of {n} groups failed the check; see `drover execution report {}`",
                self.name, ctx.execution_id
            )));
        }
        Ok(run.end_step("succeeded", format!("{n} group(s) checked")))
    }
}

#[async_trait]
impl StepKind for Wait {
    fn tenant_may_run(&self) -> Result<(), String> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "wait"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        self.until.as_ref().map(|u| &u.groups)
    }
    fn check(&self, _earlier: &[Step]) -> Result<(), String> {
        if self.duration.is_some() == self.until.is_some() {
            return Err(format!("step `{}` (wait) needs either `duration` or `until`, not both", self.name));
        }
        Ok(())
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let st = &mut run.state.steps[at];
        if st.until_ms == 0 {
            let span = self.duration.map(|d| d.0).or(self.until.as_ref().map(|u| u.timeout.0)).unwrap_or_default();
            st.until_ms = now_ms() + span.as_millis() as i64;
            return Ok(Status::Executing { note: format!("{}: waiting until {}", self.name, st.until_ms) });
        }
        let until_ms = st.until_ms;
        loop {
            if let Some(u) = &self.until {
                let (ok, missing) =
                    steps::reached(&run.core, &run.state.steps[at].items, &u.status).await.map_err(step_error)?;
                if ok {
                    return Ok(run.end_step("succeeded", format!("every group is {}", u.status)));
                }
                if now_ms() >= until_ms {
                    let note = format!("timed out waiting for {} to be {}", missing.join(", "), u.status);
                    run.end_step("failed", note.clone());
                    return Err(ProcedureError::Fail(format!("step {}: {note}", self.name)));
                }
            } else if now_ms() >= until_ms {
                return Ok(run.end_step("succeeded", "waited".into()));
            }
            if run.signalled(ctx).await {
                return Ok(Status::Executing { note: format!("{}: waiting", self.name) });
            }
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}
