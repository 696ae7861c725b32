//! How executions are kept in the store.

use serde::{Deserialize, Serialize};

/// Store keys of the engine, below the store's prefix.
pub mod keys {
    /// An execution record.
    pub fn execution(id: &str) -> String {
        format!("executions/{id}")
    }
    pub const EXECUTIONS: &str = "executions/";
    /// Index of executions that have not ended: what recovery scans.
    pub fn pending(id: &str) -> String {
        format!("executions-pending/{id}")
    }
    pub const PENDING: &str = "executions-pending/";
    /// The owner's claim, bound to its lease; its revision is the epoch.
    pub fn owner(id: &str) -> String {
        format!("execution-owners/{id}")
    }
    pub const OWNERS: &str = "execution-owners/";
    /// A request to cancel, read by the owner at step boundaries.
    pub fn cancel(id: &str) -> String {
        format!("{CANCELS}{id}")
    }
    pub const CANCELS: &str = "execution-cancels/";
    /// A request to pause, read by the owner at step boundaries; removed to resume.
    pub fn pause(id: &str) -> String {
        format!("{PAUSES}{id}")
    }
    pub const PAUSES: &str = "execution-pauses/";
    /// An operator's decision on a prompt of an execution.
    pub fn decision(id: &str, prompt: &str) -> String {
        format!("execution-decisions/{id}/{prompt}")
    }
    /// Every decision of an execution.
    pub fn decisions(id: &str) -> String {
        format!("execution-decisions/{id}/")
    }
    /// A member of the orchestrator cluster, bound to its owner lease.
    pub fn member(owner_id: &str) -> String {
        format!("orchestrators/{owner_id}")
    }
    pub const MEMBERS: &str = "orchestrators/";
    /// An execution whose locks did not fit one transaction, while it takes the rest
    /// (the value is when it started, in ms): it runs once they are all taken.
    pub fn acquiring(id: &str) -> String {
        format!("executions-acquiring/{id}")
    }
    pub const ACQUIRING: &str = "executions-acquiring/";
    /// Where a procedure keeps state apart from its record (`Procedure::take_writes`):
    /// removed with the record when an ended execution is pruned.
    pub fn apart(id: &str) -> String {
        format!("{APART}{id}/")
    }
    pub const APART: &str = "execution-items/";
    /// Part `n` of the lock list of an execution that holds more locks than its record
    /// lists (see [`ExecutionRec::locks_apart`]), with the state it keeps apart.
    pub fn lock_list(id: &str, n: usize) -> String {
        format!("{}locks/{n:05}", apart(id))
    }
    pub fn lock_lists(id: &str) -> String {
        format!("{}locks/", apart(id))
    }
    /// Index of executions, newest first: `executions-newest/<scope>/<inverted id>`
    /// naming the id, scope `all` for every execution and `p/<project>` for a
    /// project's, so a listing reads one page of its own scope at a time.
    pub fn newest(scope: &str, id: &str) -> String {
        format!("{}{}", newest_scope(scope), inverted(id))
    }
    pub fn newest_scope(scope: &str) -> String {
        format!("executions-newest/{scope}/")
    }
    /// The scope of a project's executions in the index.
    pub fn project_scope(project: &str) -> String {
        format!("p/{project}")
    }
    /// Set once the index holds every execution written before it existed.
    pub const NEWEST_BUILT: &str = "executions-newest-built";
    /// `id` with each byte inverted, in hex, then `ff`: ascending order of these is
    /// descending order of the ids (ids are time-ordered), a longer id before its prefix.
    fn inverted(id: &str) -> String {
        let mut out: String = id.bytes().map(|b| format!("{:02x}", 255 - b)).collect();
        out.push_str("ff");
        out
    }
    /// A lock: the key a procedure holds, naming the execution that holds it.
    pub fn lock(key: &str) -> String {
        format!("locks/{key}")
    }
}

/// Where an execution is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl ExecutionStatus {
    /// The lowercase name used in APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Running => "running",
            ExecutionStatus::Succeeded => "succeeded",
            ExecutionStatus::Failed => "failed",
            ExecutionStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the execution has ended.
    pub fn is_terminal(self) -> bool {
        self != ExecutionStatus::Running
    }
}

/// One finished step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRec {
    pub name: String,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// What the step did, or why it is being retried.
    pub note: String,
    /// The owner epoch it ran under.
    pub epoch: i64,
}

/// An execution as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRec {
    pub id: String,
    pub kind: String,
    pub summary: String,
    pub status: ExecutionStatus,
    /// The procedure's persisted state.
    pub state: serde_json::Value,
    /// The step the procedure runs next (or ran last, once ended).
    pub step: String,
    pub steps: Vec<StepRec>,
    /// The locks it holds; empty when they are kept apart (see `locks_apart`).
    pub locks: Vec<String>,
    /// How many locks it holds when there are more than a record lists (a run over a
    /// site holds one per group): they are stored once, at submit, under
    /// [`keys::lock_lists`], so the record, written at every step, stays the same size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub locks_apart: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The procedure's output once it succeeded.
    #[serde(default)]
    pub output: serde_json::Value,
    /// Why it failed, or the last transient error while it retries.
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The epoch of the owner that wrote this record last.
    #[serde(default)]
    pub epoch: i64,
    /// The orchestrator that owns (or last owned) it.
    #[serde(default)]
    pub owner: String,
    /// How many times an owner claimed it (1 unless it was resumed).
    #[serde(default)]
    pub claims: u32,
    /// The execution that started this one as a child, if any.
    #[serde(default)]
    pub parent: String,
    /// The children the next step waits for.
    #[serde(default)]
    pub children: Vec<String>,
    /// Paused by an operator: no step starts until it is resumed.
    #[serde(default)]
    pub paused: bool,
    /// The project it belongs to (see `Procedure::project`).
    #[serde(default)]
    pub project: String,
    /// The trace (W3C trace id, 32 hex digits) its spans carry; a child's is its
    /// parent's. Kept here so a resumed execution continues its trace.
    #[serde(default)]
    pub trace_id: String,
}

/// An operator's answer to a prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub approve: bool,
    /// Who decided (free text the client sends, e.g. the OS user).
    pub by: String,
    pub at_ms: i64,
    #[serde(default)]
    pub comment: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A new trace id for an execution that starts a trace: 32 hex digits (W3C Trace Context).
pub fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}
