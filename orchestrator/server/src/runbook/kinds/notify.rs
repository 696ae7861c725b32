//! `notify`: tell the sites' compute sides (docs/compute.md) something, e.g. that a site
//! failover is about to start or is done.

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use drover_proto::compute::v1 as cpb;
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::compute::Call;
use crate::model::now_ms;
use crate::runbook::run::{RunbookRun, exec_item};

/// Send `message` as a `runbook.notify` event to the compute side of each site in
/// `sites` (default: every site that has one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    pub name: String,
    pub message: String,
    #[serde(default)]
    pub sites: Vec<String>,
    #[serde(default)]
    pub continue_on_error: bool,
}

#[async_trait]
impl StepKind for Notify {
    fn kind(&self) -> &'static str {
        "notify"
    }
    fn name(&self) -> &str {
        &self.name
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = run.state.at;
        let hooks = run.core.hooks.clone();
        let sites = if self.sites.is_empty() { hooks.sites() } else { self.sites.clone() };
        let mut failed = Vec::new();
        let mut items = Vec::new();
        for site in &sites {
            // One op_id per execution, step and site: a resumed round sends the same.
            let call = Call::Notify(cpb::NotifyRequest {
                op_id: format!("{}:{}:{site}", ctx.execution_id, self.name),
                event: "runbook.notify".into(),
                execution_id: ctx.execution_id.clone(),
                kind: "runbook".into(),
                summary: self.message.clone(),
                status: "running".into(),
                at_ms: now_ms(),
                ..Default::default()
            });
            let mut item = exec_item(std::slice::from_ref(site));
            match hooks.call(site, &call).await {
                Ok(_) => item.status = "succeeded".into(),
                Err(e) => {
                    item.status = "failed".into();
                    item.reason = e.clone();
                    failed.push(format!("{site}: {e}"));
                }
            }
            item.ended_ms = now_ms();
            items.push(item);
        }
        run.state.steps[at].items = items;
        let note = format!("{} of {} site(s) notified", sites.len() - failed.len(), sites.len());
        match failed.first() {
            None => Ok(run.end_step("succeeded", note)),
            Some(_) if self.continue_on_error => Ok(run.end_step("failed", format!("{note}; {}", failed.join("; ")))),
            Some(first) => {
                run.end_step("failed", note.clone());
                Err(ProcedureError::Fail(format!("step {}: {note}; {first}", self.name)))
            }
        }
    }
}
