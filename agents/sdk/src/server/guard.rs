//! The guard around every mutation: claim the target, admit the epoch, replay a recorded
//! outcome, run the driver, record the outcome (DESIGN.md, invariant 3).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use drover_proto::agent::v1 as pb;
use tonic::{Code, Response, Status};
use tracing::Instrument;

use super::AgentService;
use super::convert::require;
use crate::driver::{Driver, DriverError};
use crate::ledger::{Ledger, Outcome};

/// Releases an in-flight claim when the operation ends, however it ends.
struct Claim {
    map: Arc<Mutex<HashMap<String, String>>>,
    target: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.map.lock().expect("in-flight map poisoned").remove(&self.target);
    }
}

pub(super) fn ledger_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Errors worth remembering for an op_id: retrying them cannot succeed. Transient ones
/// (Unavailable, Internal) are not recorded, so a retry runs the operation again.
pub(super) fn is_terminal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition | Code::Unimplemented
    )
}

pub(super) fn validate_ctx(ctx: Option<pb::OpContext>) -> Result<pb::OpContext, Status> {
    let ctx =
        ctx.ok_or_else(|| Status::invalid_argument("`ctx` (op_id, epoch, fence_scope) is required on every mutation"))?;
    require("ctx.op_id", &ctx.op_id)?;
    if ctx.epoch == 0 {
        return Err(Status::invalid_argument("`ctx.epoch` must be positive"));
    }
    if !(ctx.fence_scope.starts_with("group/") || ctx.fence_scope.starts_with("volume/")) || ctx.fence_scope.len() < 7 {
        return Err(Status::invalid_argument(format!(
            "`ctx.fence_scope` must be group/<id> or volume/<id>, got {:?}",
            ctx.fence_scope
        )));
    }
    Ok(ctx)
}

impl AgentService {
    /// A service over `driver`, with its ledger.
    pub fn new(driver: Arc<dyn Driver>, ledger: Ledger) -> Self {
        Self { driver, ledger, in_flight: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Runs one mutation under fencing, idempotency and the one-at-a-time rule.
    ///
    /// Order matters: the target is claimed first (a second mutation gets ABORTED); then
    /// the epoch is checked and raised, so a stale owner learns it is stale even for an op
    /// it already ran; then a recorded outcome is replayed; only then is the driver called.
    pub(super) async fn guarded<M, F, Fut>(
        &self,
        ctx: Option<pb::OpContext>,
        target: &str,
        op: &str,
        f: F,
    ) -> Result<Response<M>, Status>
    where
        M: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<M, DriverError>>,
    {
        let ctx = validate_ctx(ctx)?;
        let span = tracing::info_span!("mutation", op, target, op_id = %ctx.op_id, epoch = ctx.epoch, scope = %ctx.fence_scope);
        self.guarded_in_span(ctx, target, f).instrument(span).await
    }

    pub(super) async fn guarded_in_span<M, F, Fut>(
        &self,
        ctx: pb::OpContext,
        target: &str,
        f: F,
    ) -> Result<Response<M>, Status>
    where
        M: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<M, DriverError>>,
    {
        // The claim comes first: admitting the epoch and running under it are then one
        // step for this target, so a stale caller admitted earlier can never run after a
        // newer owner's call on the same volume or group.
        let _claim = {
            let mut map = self.in_flight.lock().expect("in-flight map poisoned");
            if let Some(running) = map.get(target) {
                return Err(Status::aborted(format!(
                    "{target} has operation {running} in flight; retry after it finishes"
                )));
            }
            map.insert(target.to_string(), ctx.op_id.clone());
            Claim { map: self.in_flight.clone(), target: target.to_string() }
        };
        let ledger = self.ledger.clone();
        let (scope, epoch) = (ctx.fence_scope.clone(), ctx.epoch);
        let verdict = tokio::task::spawn_blocking(move || ledger.admit_epoch(&scope, epoch))
            .await
            .map_err(ledger_status)?
            .map_err(ledger_status)?;
        if let Err(stale) = verdict {
            return Err(Status::failed_precondition(format!(
                "stale epoch {} for {}: this agent has seen epoch {}; the caller no longer owns this operation",
                stale.presented, stale.scope, stale.highest
            )));
        }
        if let Some(outcome) = self.recorded(&ctx.op_id).await? {
            tracing::debug!("replaying recorded outcome");
            return replay(outcome);
        }
        let result = f().await;
        let outcome = match &result {
            Ok(resp) => Some(Outcome { code: 0, message: String::new(), response: resp.encode_to_vec() }),
            Err(e) => {
                let status = e.to_status();
                is_terminal(status.code()).then(|| Outcome {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    response: Vec::new(),
                })
            }
        };
        if let Some(outcome) = outcome {
            let ledger = self.ledger.clone();
            let op_id = ctx.op_id.clone();
            tokio::task::spawn_blocking(move || ledger.record(&op_id, &outcome))
                .await
                .map_err(ledger_status)?
                .map_err(ledger_status)?;
        }
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                tracing::warn!(error = %e, "driver call failed");
                Err(e.to_status())
            }
        }
    }

    pub(super) async fn recorded(&self, op_id: &str) -> Result<Option<Outcome>, Status> {
        let ledger = self.ledger.clone();
        let op_id = op_id.to_string();
        tokio::task::spawn_blocking(move || ledger.outcome(&op_id)).await.map_err(ledger_status)?.map_err(ledger_status)
    }
}

pub(super) fn replay<M: prost::Message + Default>(outcome: Outcome) -> Result<Response<M>, Status> {
    if outcome.code == 0 {
        M::decode(outcome.response.as_slice())
            .map(Response::new)
            .map_err(|e| Status::internal(format!("recorded response is corrupt: {e}")))
    } else {
        Err(Status::new(Code::from_i32(outcome.code), outcome.message))
    }
}
