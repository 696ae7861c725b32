//! The orchestrator's procedures: every group, volume and snapshot transition, and "sync now",
//! runs on the procedure engine (`drover-procedure`), so it outlives the request that
//! asked for it, has one owner at a time, and is resumed by any orchestrator.
//!
//! Each procedure's intent (the transient status and pending op) is written in the same
//! transaction that creates its execution; its steps are idempotent: a step first
//! re-reads the record, and when the record no longer carries its op the work is already
//! done and the step only reports it.

mod adopt;
mod group;
mod snapshot;
mod sync;
mod volume;

pub use adopt::Adopt;
/// The kind of group transitions' executions.
pub const GROUP_KIND: &str = group::KIND;
pub use group::GroupTransition;
pub use snapshot::SnapshotTransition;
pub use sync::SyncNow;
pub use volume::VolumeTransition;

use std::sync::Arc;
use std::time::Duration;

use drover_procedure::{ExecutionStatus, Manager, ProcedureError, Status, SubmitError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::service::Core;

/// Teaches the manager every procedure kind of the orchestrator, for resumes.
pub fn register(manager: &Manager, core: &Arc<Core>) {
    let c = core.clone();
    manager
        .register(group::KIND, Box::new(move |state| Ok(Box::new(GroupTransition::load(c.clone(), state)?) as Box<_>)));
    let c = core.clone();
    manager.register(
        volume::KIND,
        Box::new(move |state| Ok(Box::new(VolumeTransition::load(c.clone(), state)?) as Box<_>)),
    );
    let c = core.clone();
    manager.register(
        snapshot::KIND,
        Box::new(move |state| Ok(Box::new(SnapshotTransition::load(c.clone(), state)?) as Box<_>)),
    );
    let c = core.clone();
    manager.register(sync::KIND, Box::new(move |state| Ok(Box::new(SyncNow::load(c.clone(), state)?) as Box<_>)));
    let c = core.clone();
    manager.register(adopt::KIND, Box::new(move |state| Ok(Box::new(Adopt::load(c.clone(), state)?) as Box<_>)));
    manager.register(crate::runbook::run::KIND, crate::runbook::run::loader(core.clone()));
}

/// A procedure's answer to its caller, kept as the execution's output: the value, or the
/// API error with its code, so a caller that waits gets the same error a synchronous
/// call would have given.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Answer {
    Ok { value: serde_json::Value },
    Err { code: String, message: String },
}

impl Answer {
    /// Wraps an API result.
    pub fn from_result<T: Serialize>(r: ApiResult<T>) -> Self {
        match r {
            Ok(v) => Answer::Ok { value: serde_json::to_value(v).expect("API values serialise") },
            Err(e) => Answer::Err { code: e.code_name().into(), message: e.to_string() },
        }
    }

    /// The execution's "done" status carrying this answer.
    pub fn done(self) -> Result<Status, ProcedureError> {
        Ok(Status::Done { output: serde_json::to_value(self).expect("answers serialise") })
    }
}

/// Maps a step's API error: store trouble is retried, anything else ends the execution.
pub fn step_error(e: ApiError) -> ProcedureError {
    match e {
        ApiError::Unavailable(m) => ProcedureError::Retry(m),
        other => ProcedureError::Fail(other.to_string()),
    }
}

/// Whether the owner running `ctx` still holds its claim on the execution. A step whose
/// own write was refused asks, so that an owner that lost its claim without noticing stops
/// quietly (the engine's writes are refused too) and leaves the outcome to the new owner.
pub async fn still_owner(core: &Core, ctx: &drover_procedure::Context) -> Result<bool, ProcedureError> {
    let probe = drover_store::Txn::new().when(ctx.claim());
    Ok(core.repo.txn(probe).await.map_err(step_error)?.succeeded)
}

/// Maps a refused submit into the API error the caller returns.
pub fn submit_error(e: SubmitError, what: &str) -> ApiError {
    match e {
        SubmitError::Locked { .. } => ApiError::FailedPrecondition(format!("{what}: {e}")),
        SubmitError::Conflict => crate::error::raced(what),
        SubmitError::Store(s) => s.into(),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Waits for an execution to end and returns its answer. A call with a deadline
/// (`grpc-timeout`) stops waiting a margin before it and answers DEADLINE_EXCEEDED naming
/// the execution; a client that leaves drops this future. Either way the execution goes
/// on.
pub async fn wait_output<T: DeserializeOwned>(core: &Core, id: &str) -> ApiResult<T> {
    let deadline = crate::deadline::patience();
    let rec = core.procedures.wait(id, deadline.unwrap_or(Duration::from_secs(7 * 24 * 3600))).await?;
    let follow = format!("see `drover execution show {id}`");
    match rec.status {
        ExecutionStatus::Succeeded => match serde_json::from_value::<Answer>(rec.output) {
            Ok(Answer::Ok { value }) => serde_json::from_value(value)
                .map_err(|e| ApiError::Internal(format!("execution {id} returned an unreadable result: {e}"))),
            Ok(Answer::Err { code, message }) => Err(ApiError::from_code_name(&code, message)),
            Err(e) => Err(ApiError::Internal(format!("execution {id} returned an unreadable answer: {e}"))),
        },
        ExecutionStatus::Failed => Err(ApiError::Aborted(format!("execution {id} failed: {}; {follow}", rec.error))),
        ExecutionStatus::Cancelled => Err(ApiError::Aborted(format!("execution {id} was cancelled; {follow}"))),
        ExecutionStatus::Running if deadline.is_some() => Err(ApiError::DeadlineExceeded(format!(
            "execution {id} is still running at step {} as this call's deadline nears; it goes on without the call: \
             {follow}, or call with a longer deadline (or with no_wait)",
            rec.step
        ))),
        ExecutionStatus::Running => {
            Err(ApiError::Unavailable(format!("execution {id} is still running at step {}; {follow}", rec.step)))
        }
    }
}
