//! The procedure engine: every operation that changes more than one record or calls an
//! agent runs as a [`Procedure`], persisted in the store and detached from the request
//! that asked for it (DESIGN.md, "Procedures").
//!
//! - **Detached.** [`Manager::submit`] writes the execution and returns its id at once;
//!   the procedure runs in a task of the manager, whether or not the client stays.
//! - **Owned.** Each execution has one owner at a time: the key
//!   `execution-owners/<id>`, bound to the owning orchestrator's lease. The revision of
//!   that claim is the execution's epoch, stamped on agent calls so a stale owner is
//!   refused; every write of the execution compares the claim, so a stale owner's write
//!   fails too.
//! - **Locked.** A procedure declares lock keys (`group/<id>`, …); submitting one whose
//!   key is held fails with the holder's execution id. Locks live until the execution
//!   ends, across owners.
//! - **Resumable.** Unfinished executions are indexed under `executions-pending/`. Every
//!   manager scans that index at start, every second, and at once when an owner key is
//!   deleted (a lease expired); any manager claims an unowned execution and resumes it
//!   from its persisted state. A store outage stops nothing for good: writes are retried
//!   until they land or the claim is gone.
//! - **Cancellable** and **pausable** at step boundaries; **observable** through
//!   [`Manager::watch`]; a step may wait for an operator's [`Decision`] (a prompt).
//!   Requests are keys of their own; every member keeps them in memory through a store
//!   watch, so a step boundary reads nothing (see `manager/signals.rs`).
//!
//! - **Background work runs once without an election.** The only periodic work is the
//!   recovery scan, and every member runs it: exactly-once comes from the claim, one
//!   conditional transaction on the owner key, so of the members that find an unowned
//!   execution one claims it and the others see the claim and pass. A scan is one range
//!   read a second, cheaper than keeping an election, and a member that pauses delays
//!   nothing. Agent liveness is probed when a request needs it, and RPOs are computed
//!   when read, so neither needs a periodic owner.
//! - **Members.** Each orchestrator announces itself under its owner lease
//!   ([`Manager::announce`]); [`Manager::members`] lists the live ones and what each owns.
//!
//! [`Procedure::execute`] runs one step and must be idempotent: after a crash between a
//! step and its persist, the step runs again.

mod manager;
mod record;

pub use manager::{Manager, ManagerConfig, Signal, SubmitError};
pub use record::{Decision, ExecutionRec, ExecutionStatus, StepRec, keys};

use async_trait::async_trait;

/// What one call of [`Procedure::execute`] did.
pub enum Status {
    /// A step finished; persist the state and call again. `note` says what the step did
    /// (shown in the execution's step list).
    Executing { note: String },
    /// Run these procedures as child executions (each with its own locks, owner and
    /// record), then call again once every one has ended; their records are in
    /// [`Context::children`] then. A runbook is a parent of per-group procedures.
    Children { procedures: Vec<Box<dyn Procedure>>, note: String },
    /// The procedure is done; `output` is its result for whoever waits on it.
    Done { output: serde_json::Value },
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Executing { note } => write!(f, "Executing({note})"),
            Status::Children { procedures, note } => write!(f, "Children({} procedures: {note})", procedures.len()),
            Status::Done { output } => write!(f, "Done({output})"),
        }
    }
}

/// Why a step did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcedureError {
    /// Transient (the store or an agent could not be reached, an outcome is unknown):
    /// the same step runs again after a pause.
    #[error("{0}")]
    Retry(String),
    /// Terminal: the execution fails with this message.
    #[error("{0}")]
    Fail(String),
}

/// What a running step may know and use.
#[derive(Debug, Clone)]
pub struct Context {
    /// The execution's id.
    pub execution_id: String,
    /// The owner's epoch: the revision of its claim. Stamp it on agent calls.
    pub epoch: i64,
    /// Fires when the owner loses its claim or shuts down: stop at the next await.
    pub cancelled: tokio_util::sync::CancellationToken,
    /// The ended children of the previous step, when it returned [`Status::Children`].
    pub children: Vec<ExecutionRec>,
}

impl Context {
    /// A comparison that holds only while this owner still holds its claim on the
    /// execution. A step that writes records of its own (outside the engine) puts it in
    /// every such write: an owner that lost its lease without noticing, while another
    /// took the execution over, then changes nothing.
    pub fn claim(&self) -> drover_store::Compare {
        drover_store::Compare::ModRevisionEquals(keys::owner(&self.execution_id).into_bytes(), self.epoch)
    }
}

/// A typed state machine whose state survives crashes.
#[async_trait]
pub trait Procedure: Send + Sync {
    /// The type's stable name; the manager rebuilds the procedure from it on resume.
    fn kind(&self) -> &'static str;
    /// A one-line description for listings, e.g. "failover of group g1 to backend-b".
    fn summary(&self) -> String;
    /// The project whose execution this is (tenants see only their project's); empty for
    /// deployment-wide work (backends, sites, runbooks), which only admins see.
    fn project(&self) -> String {
        String::new()
    }
    /// The store keys it needs for itself (`group/<id>`, `volume/<id>`, `backend/<name>`).
    fn locks(&self) -> Vec<String>;
    /// The name of the step the next [`Procedure::execute`] runs.
    fn step(&self) -> String;
    /// The state to persist; [`Loader`]s rebuild the procedure from it.
    fn dump(&self) -> serde_json::Value;
    /// Runs the next step. Idempotent: it may run again after a crash.
    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError>;
    /// Writes of state kept apart from the record (a runbook's items, one key each, so
    /// its record does not grow with the groups it moves): taken at submit, written
    /// before the submit's transaction (and removed if the submit fails), and after
    /// each step, written while the owner holds its claim: in the record's own
    /// transaction when the step only saved its state and they fit, else just before
    /// it. Never after the record that follows them, so a resumed owner never finds a
    /// record newer than them.
    fn take_writes(&mut self, _execution_id: &str) -> Vec<drover_store::TxnOp> {
        Vec::new()
    }
}

/// Rebuilds a procedure of one kind from its persisted state.
pub type Loader = Box<dyn Fn(serde_json::Value) -> Result<Box<dyn Procedure>, String> + Send + Sync>;
