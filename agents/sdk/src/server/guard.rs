//! The guard around every mutation: claim the target, admit the epoch and mark the op
//! started, replay a recorded outcome, run the driver to the end in its own task, record
//! the outcome (DESIGN.md, invariant 3; "agents finish what they start").

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use drover_proto::agent::v1 as pb;
use tokio::sync::watch;
use tonic::{Code, Response, Status};
use tracing::Instrument;

use super::AgentService;
use super::convert::require;
use crate::driver::{Driver, DriverError, OpInfo, in_op};
use crate::ledger::{Admission, Ledger, Outcome};

/// A mutation running on a target: its op_id and where its outcome will appear.
#[derive(Clone)]
pub(super) struct Running {
    pub(super) op_id: String,
    done: watch::Receiver<Option<Outcome>>,
}

/// Target (volume or group id) to the mutation running on it.
pub(super) type InFlight = Arc<Mutex<HashMap<String, Running>>>;

/// Releases an in-flight claim when the operation ends, however it ends.
struct Claim {
    map: InFlight,
    target: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.map.lock().expect("in-flight map poisoned").remove(&self.target);
    }
}

/// Mutations whose target must be an existing volume. Not among them: creating, managing
/// and deleting one, enabling replication (a secondary's volume is made by it), and
/// group, snapshot and clone operations.
const ON_EXISTING_VOLUME: &[&str] = &[
    "extend_volume",
    "attach_volume",
    "detach_volume",
    "unmanage_volume",
    "disable_replication",
    "promote",
    "demote",
    "resync",
];

/// Mutations whose end state a missing volume already is: disabling replication (a
/// secondary's replica goes away with it; a volume that is not here replicates nothing)
/// and unmanaging (the volume leaves this backend's management). Such a call on a missing
/// volume is answered as done, without admitting its epoch or calling the driver. So is
/// the retry of one that an agent restart interrupted after it removed the volume and
/// before it recorded its outcome (seen in the qemu soak for a disable: the retry was
/// refused as "does not exist", and the disable left the group in error).
const DONE_WHEN_ABSENT: &[&str] = &["disable_replication", "unmanage_volume"];

/// What [`Guard::target_exists`] found.
enum Target {
    /// Run the operation (the volume exists, the op needs none, or its op_id is recorded).
    Run,
    /// The volume is missing and the op's end state is its absence: nothing to do.
    AlreadyDone,
}

pub(super) fn ledger_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

pub(super) fn validate_ctx(ctx: Option<pb::OpContext>) -> Result<pb::OpContext, Status> {
    let ctx =
        ctx.ok_or_else(|| Status::invalid_argument("`ctx` (op_id, epoch, fence_scope) is required on every mutation"))?;
    require("ctx.op_id", &ctx.op_id)?;
    if ctx.epoch == 0 {
        return Err(Status::invalid_argument("`ctx.epoch` must be positive"));
    }
    // A snapshot's operations have a scope of their own, so that taking one never raises
    // the fence of the group it covers under a running transition of that group.
    let known = ["group/", "volume/", "snapshot/"]
        .iter()
        .any(|p| ctx.fence_scope.strip_prefix(p).is_some_and(|id| !id.is_empty()));
    if !known {
        return Err(Status::invalid_argument(format!(
            "`ctx.fence_scope` must be group/<id>, volume/<id> or snapshot/<id>, got {:?}",
            ctx.fence_scope
        )));
    }
    Ok(ctx)
}

impl AgentService {
    /// A service over `driver`, with its ledger (and its op log, when kept).
    pub fn new(
        driver: Arc<dyn Driver>,
        ledger: Ledger,
        op_log: Option<Arc<crate::oplog::OpLog>>,
        metrics: Arc<crate::metrics::AgentMetrics>,
    ) -> Self {
        Self { driver, ledger, op_log, metrics, in_flight: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Runs one mutation under fencing, idempotency and the one-at-a-time rule, to the
    /// end whether or not the caller stays.
    ///
    /// Order matters:
    /// 1. The target is claimed first. The same op_id already running joins it and gets
    ///    its outcome; another op gets ABORTED. Admitting the epoch and running under it
    ///    are then one step for this target, so a stale caller admitted earlier can never
    ///    run after a newer owner's call on the same volume or group.
    /// 2. One ledger write admits the epoch and marks the op started, or finds it
    ///    recorded (replayed, never run again) or interrupted by an agent crash (refused
    ///    under this op_id, since what it did is unknown; the caller retries with a new one).
    /// 3. The driver runs in a task of its own, which records the outcome (success or
    ///    failure) before it releases the target; the caller only waits for that outcome.
    pub(super) async fn guarded<M, F, Fut>(
        &self,
        ctx: Option<pb::OpContext>,
        target: &str,
        op: &str,
        f: F,
    ) -> Result<Response<M>, Status>
    where
        M: prost::Message + Default + 'static,
        F: FnOnce(Arc<dyn Driver>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<M, DriverError>> + Send + 'static,
    {
        let ctx = validate_ctx(ctx)?;
        let span = tracing::info_span!("mutation", op, target, op_id = %ctx.op_id, epoch = ctx.epoch, scope = %ctx.fence_scope);
        let started = std::time::Instant::now();
        self.metrics.in_flight.inc();
        let result = async {
            match self.target_exists(op, target, &ctx.op_id).await? {
                Target::Run => self.guarded_in_span(ctx, target, op, f).await,
                Target::AlreadyDone => {
                    tracing::info!("the volume is not here: nothing to do, answered as done");
                    Ok(Response::new(M::default()))
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.in_flight.dec();
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        let labels = crate::metrics::OpLabels { op: op.to_string(), outcome };
        self.metrics.op_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        result
    }

    async fn guarded_in_span<M, F, Fut>(
        &self,
        ctx: pb::OpContext,
        target: &str,
        op: &str,
        f: F,
    ) -> Result<Response<M>, Status>
    where
        M: prost::Message + Default + 'static,
        F: FnOnce(Arc<dyn Driver>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<M, DriverError>> + Send + 'static,
    {
        enum Claimed {
            Join(watch::Receiver<Option<Outcome>>),
            Busy(String),
            Mine(watch::Sender<Option<Outcome>>),
        }
        let claimed = {
            let mut map = self.in_flight.lock().expect("in-flight map poisoned");
            match map.get(target) {
                Some(running) if running.op_id == ctx.op_id => Claimed::Join(running.done.clone()),
                Some(running) => Claimed::Busy(running.op_id.clone()),
                None => {
                    let (tx, done) = watch::channel(None);
                    map.insert(target.to_string(), Running { op_id: ctx.op_id.clone(), done });
                    Claimed::Mine(tx)
                }
            }
        };
        let tx = match claimed {
            Claimed::Join(done) => {
                tracing::debug!("joining the running operation with this op_id");
                return outcome_of(done).await;
            }
            Claimed::Busy(op) => {
                return Err(Status::aborted(format!("{target} has operation {op} in flight; retry after it finishes")));
            }
            Claimed::Mine(tx) => tx,
        };
        let claim = Claim { map: self.in_flight.clone(), target: target.to_string() };
        let admission = self.ledger.admit(&ctx.fence_scope, ctx.epoch, &ctx.op_id).await.map_err(ledger_status)?;
        match admission {
            Admission::Stale(stale) => {
                return Err(Status::failed_precondition(format!(
                    "stale epoch {} for {}: this agent has seen epoch {}; the caller no longer owns this operation",
                    stale.presented, stale.scope, stale.highest
                )));
            }
            Admission::Replay(outcome) => {
                tracing::debug!("replaying recorded outcome");
                return replay(outcome);
            }
            Admission::Interrupted => {
                let outcome = Outcome {
                    code: Code::Unavailable as i32,
                    message: format!(
                        "operation {} was interrupted by a restart of this agent before it finished; what it did \
                         is unknown here, so it is not run again under this op_id: retry with a new op_id",
                        ctx.op_id
                    ),
                    response: Vec::new(),
                };
                self.record(&ctx.op_id, &outcome).await?;
                tracing::warn!("refusing an operation an agent restart interrupted");
                return replay(outcome);
            }
            Admission::Run => {}
        }
        if let Some(log) = &self.op_log {
            log.append(&crate::oplog::OpLogEntry {
                op: op.to_string(),
                target: target.to_string(),
                op_id: ctx.op_id.clone(),
                epoch: ctx.epoch,
                scope: ctx.fence_scope.clone(),
                at_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64),
            });
        }
        let (driver, ledger, op_id) = (self.driver.clone(), self.ledger.clone(), ctx.op_id.clone());
        let info = OpInfo { op_id: ctx.op_id.clone(), epoch: ctx.epoch, scope: ctx.fence_scope.clone() };
        let done = tx.subscribe();
        tokio::spawn(
            async move {
                let _claim = claim;
                let outcome = match in_op(info, f(driver)).await {
                    Ok(resp) => Outcome { code: 0, message: String::new(), response: resp.encode_to_vec() },
                    Err(e) => {
                        tracing::warn!(error = %e, "driver call failed");
                        let status = e.to_status();
                        Outcome {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                            response: Vec::new(),
                        }
                    }
                };
                // Recorded before the target is released, so a repeat of this op_id finds
                // either the running op (and joins it) or its record.
                if let Err(e) = ledger.record(&op_id, &outcome).await {
                    tracing::error!(error = %e, "could not record the outcome; a retry will be refused as interrupted");
                }
                let _ = tx.send(Some(outcome));
            }
            .in_current_span(),
        );
        outcome_of(done).await
    }

    /// A request on a volume this backend does not have is refused before it is admitted,
    /// so it cannot move the fence: otherwise one call naming a missing volume with a huge
    /// epoch in a real group's scope would lock the orchestrator out of that group. An
    /// op_id already recorded is left to replay its outcome. An op whose end state is the
    /// volume's absence ([`DONE_WHEN_ABSENT`]) is done, and admits nothing either.
    async fn target_exists(&self, op: &str, target: &str, op_id: &str) -> Result<Target, Status> {
        if !ON_EXISTING_VOLUME.contains(&op) || self.recorded(op_id).await?.is_some() {
            return Ok(Target::Run);
        }
        match self.driver.get_volume(target).await {
            Err(DriverError::NotFound(_)) if DONE_WHEN_ABSENT.contains(&op) => Ok(Target::AlreadyDone),
            Err(DriverError::NotFound(_)) => Err(Status::not_found(format!(
                "volume {target} does not exist on this backend; nothing was done (and no epoch was admitted)"
            ))),
            _ => Ok(Target::Run),
        }
    }

    /// Admits `epoch` for `scope` (durably), refusing a stale one.
    pub(super) async fn raise_fence(&self, scope: &str, epoch: u64) -> Result<u64, Status> {
        let verdict = self.ledger.admit_epoch(scope, epoch).await.map_err(ledger_status)?;
        match verdict {
            Ok(()) => Ok(epoch),
            Err(stale) => Err(Status::failed_precondition(format!(
                "stale epoch {} for {}: this agent has seen epoch {}; the caller no longer owns this scope",
                stale.presented, stale.scope, stale.highest
            ))),
        }
    }

    async fn record(&self, op_id: &str, outcome: &Outcome) -> Result<(), Status> {
        self.ledger.record(op_id, outcome).await.map_err(ledger_status)
    }

    pub(super) async fn recorded(&self, op_id: &str) -> Result<Option<Outcome>, Status> {
        self.ledger.outcome(op_id).map_err(ledger_status)
    }
}

/// Waits for a running operation's outcome.
async fn outcome_of<M: prost::Message + Default>(
    mut done: watch::Receiver<Option<Outcome>>,
) -> Result<Response<M>, Status> {
    let outcome = done
        .wait_for(Option::is_some)
        .await
        .map_err(|_| Status::internal("the operation's task ended without an outcome; ask GetOperation"))?
        .clone()
        .expect("waited for Some");
    replay(outcome)
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
