//! Step kinds. Each is one type: its fields (as the runbook file writes them) and its
//! [`StepKind`] implementation, which says what it selects, what it checks in a file,
//! and what one round of it does in a run. Adding a kind is adding its type here and
//! one line naming it in `schema::Step` (and in `Step::as_kind`).

mod adopt;
mod backends;
mod checks;
mod compute;
mod exec;
mod moves;
mod notify;
mod prompt;
mod testing;

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};

pub use adopt::{AdoptApply, AdoptPlan};
pub use backends::{Freeze, Thaw};
pub use checks::{Verify, Wait, WaitUntil};
pub use compute::{ComputeQuiesce, ComputeRefresh, ComputeStart, ComputeStop, ComputeUnquiesce};
pub use exec::Exec;
pub use moves::{Failback, Failover, SyncNow};
pub use notify::Notify;
pub use prompt::Prompt;
pub use testing::{TestCleanup, TestClone};

use super::run::RunbookRun;
use super::schema::{BackendSelector, Selector, Step};
use crate::error::{ApiError, ApiResult};
use crate::model::GroupRec;
use crate::repo::Versioned;
use crate::service::replication::ReplicationApi;

/// What every step kind does.
#[async_trait]
pub trait StepKind: Send + Sync {
    /// The kind's name in runbook files.
    fn kind(&self) -> &'static str;
    /// The step's own name.
    fn name(&self) -> &str;
    /// The groups it acts on, if it acts on groups.
    fn groups(&self) -> Option<&Selector> {
        None
    }
    /// The backends it acts on, if it acts on backends.
    fn backends(&self) -> Option<&BackendSelector> {
        None
    }
    /// For kinds that move groups through their own executions, tier by tier:
    /// (max_parallel, continue_on_error).
    fn fanout(&self) -> Option<(u32, bool)> {
        None
    }
    /// Whether a group is in a state this kind acts on; else why it is skipped.
    fn eligibility(&self, _g: &GroupRec) -> Result<(), String> {
        Ok(())
    }
    /// Whether a group already is where this kind would take it.
    fn at_goal(&self, _g: &GroupRec) -> bool {
        false
    }
    /// A disaster move (the achieved RPO is the promoted point's age).
    fn forced(&self) -> bool {
        false
    }
    /// Whether a tenant (a member, on its own project's groups) may run this step; else
    /// why not. Only admins run steps on backends, commands and test clones, and
    /// disaster moves.
    fn tenant_may_run(&self) -> Result<(), String> {
        Err(format!("only an admin may run {} steps", self.kind()))
    }
    /// Submits the group's execution (no wait); returns its id.
    async fn submit(&self, _api: &ReplicationApi, g: &Versioned<GroupRec>) -> ApiResult<String> {
        Err(ApiError::Internal(format!("step kind {} has no group executions (group {})", self.kind(), g.rec.name)))
    }
    /// Rules beyond the field types; `earlier` are the steps before this one.
    fn check(&self, _earlier: &[Step]) -> Result<(), String> {
        Ok(())
    }
    /// One round of the step in a run: returns after progress (the engine persists the
    /// run's state then), ends the step with `run.end_step`, or fails it.
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError>;
}
