//! The agent's durable fencing and idempotency records.
//!
//! Two tables in one redb file: the highest epoch seen per fence scope, and the terminal
//! outcome of each op_id. Both are committed (fsynced) before the agent answers, so a
//! restarted agent still refuses a stale owner and still answers a repeated op_id with the
//! first outcome.
//!
//! A mutation costs two commits, and neither can go:
//! - [`Ledger::admit`] (the epoch check, the fence raise and the "started" mark, in one
//!   transaction) must be durable before the driver acts: if the agent dies after the
//!   driver changed the backend, the mark is what makes a retry of the same op_id answer
//!   "interrupted" instead of running the change a second time; and a raised fence must
//!   outlive a crash, or an old owner could be admitted again after it.
//! - [`Ledger::record`] (the outcome, which clears the mark) must be durable before the
//!   answer leaves, or a caller that saw success could, after an agent crash, find the op
//!   "interrupted" and take a second attempt for a change that happened.
//!
//! Merging them would mean acting on the backend inside a ledger transaction, which holds
//! redb's single writer for the whole driver call.
//!
//! What concurrent operations can share is the fsync: admissions and outcomes that queue
//! while a commit runs go into the next write transaction together (group commit), each
//! applied in arrival order as if alone, and none answered before that commit is durable.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("epochs");
const OPS: TableDefinition<&str, &[u8]> = TableDefinition::new("ops");
/// Operations admitted and handed to the driver whose outcome is not recorded yet. An
/// entry that survives a restart marks an operation the crash interrupted.
const STARTED: TableDefinition<&str, u64> = TableDefinition::new("started");
/// Insertion order of op records, so the oldest can be dropped.
const OPS_ORDER: TableDefinition<u64, &str> = TableDefinition::new("ops_order");

/// How many op outcomes the ledger keeps. A retry comes within minutes of its first
/// attempt; a hundred thousand newer operations later, an op_id is history.
pub const OPS_KEPT: u64 = 100_000;

/// A recorded terminal outcome of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The gRPC code; 0 for success.
    pub code: i32,
    pub message: String,
    /// The encoded response message of a success.
    pub response: Vec<u8>,
}

impl Outcome {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.message.len() + self.response.len());
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(&(self.message.len() as u32).to_le_bytes());
        out.extend_from_slice(self.message.as_bytes());
        out.extend_from_slice(&self.response);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let code = i32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        let len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
        let message = String::from_utf8(bytes.get(8..8 + len)?.to_vec()).ok()?;
        Some(Self { code, message, response: bytes[8 + len..].to_vec() })
    }
}

/// What the ledger says about a mutation about to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// New: it is marked started; run it and record its outcome.
    Run,
    /// It finished before: answer with its outcome, do not run it again.
    Replay(Outcome),
    /// It was started by an earlier run of this agent that died before recording the
    /// outcome. Its effects are unknown here; it must not run again under this op_id.
    Interrupted,
    /// The epoch is older than one this agent has admitted for the scope.
    Stale(StaleEpoch),
}

/// Why a call was fenced off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleEpoch {
    pub scope: String,
    pub presented: u64,
    pub highest: u64,
}

/// Ledger failures: the agent's own disk.
#[derive(Debug, thiserror::Error)]
#[error("agent ledger {0}; check the agent's state directory")]
pub struct LedgerError(String);

fn err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError(e.to_string())
}

/// The durable fencing and idempotency records of one agent.
#[derive(Clone)]
pub struct Ledger {
    db: Arc<Database>,
    /// Writes waiting for the next commit, and the lock whoever commits holds.
    queue: Arc<std::sync::Mutex<Vec<Queued>>>,
    writer: Arc<std::sync::Mutex<()>>,
    /// Commits made (each one fsync), for tests and figures.
    commits: Arc<std::sync::atomic::AtomicU64>,
}

/// A ledger write waiting for a commit.
enum Write {
    Admit { scope: String, epoch: u64, op_id: String },
    AdmitEpoch { scope: String, epoch: u64 },
    Record { op_id: String, outcome: Outcome, keep: u64 },
}

/// What a write answered.
enum Done {
    Admission(Admission),
    Epoch(Result<(), StaleEpoch>),
    Recorded,
}

struct Queued {
    write: Write,
    reply: std::sync::mpsc::SyncSender<Result<Done, LedgerError>>,
}

impl Ledger {
    /// Opens or creates the ledger file.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let w = db.begin_write().map_err(err)?;
        w.open_table(EPOCHS).map_err(err)?;
        w.open_table(OPS).map_err(err)?;
        w.open_table(OPS_ORDER).map_err(err)?;
        w.open_table(STARTED).map_err(err)?;
        w.commit().map_err(err)?;
        Ok(Self {
            db: Arc::new(db),
            queue: Default::default(),
            writer: Default::default(),
            commits: Default::default(),
        })
    }

    /// Applies `write` and returns its answer once it is durable. Group commit: the
    /// write queues, then its caller takes the writer lock; if the previous holder
    /// committed it already the answer is there, else this caller commits everything
    /// queued (in arrival order, one write transaction, one fsync). A failed commit fails
    /// every write in it: none of them was applied.
    fn commit(&self, write: Write) -> Result<Done, LedgerError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.queue.lock().expect("ledger queue poisoned").push(Queued { write, reply });
        let serial = self.writer.lock().expect("ledger writer poisoned");
        if let Ok(done) = answer.try_recv() {
            return done;
        }
        let batch = std::mem::take(&mut *self.queue.lock().expect("ledger queue poisoned"));
        let applied = (|| {
            let w = self.db.begin_write().map_err(err)?;
            let mut answers = Vec::with_capacity(batch.len());
            for q in &batch {
                answers.push(match &q.write {
                    Write::Admit { scope, epoch, op_id } => Done::Admission(admit_in(&w, scope, *epoch, op_id)?),
                    Write::AdmitEpoch { scope, epoch } => Done::Epoch(admit_epoch_in(&w, scope, *epoch)?),
                    Write::Record { op_id, outcome, keep } => {
                        record_in(&w, op_id, outcome, *keep)?;
                        Done::Recorded
                    }
                });
            }
            w.commit().map_err(err)?;
            self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, LedgerError>(answers)
        })();
        match applied {
            Ok(answers) => {
                for (q, a) in batch.into_iter().zip(answers) {
                    let _ = q.reply.send(Ok(a));
                }
            }
            Err(e) => {
                for q in batch {
                    let _ = q.reply.send(Err(err(&e.0)));
                }
            }
        }
        drop(serial);
        answer.recv().unwrap_or_else(|_| Err(err("the commit lost this write")))
    }

    /// One durable step before a mutation runs: checks the epoch for `scope` (raising the
    /// highest seen), then looks the op_id up. Only [`Admission::Run`] marks the op as
    /// started; the caller must [`Ledger::record`] its outcome, which clears the mark.
    pub fn admit(&self, scope: &str, epoch: u64, op_id: &str) -> Result<Admission, LedgerError> {
        let write = Write::Admit { scope: scope.to_string(), epoch, op_id: op_id.to_string() };
        match self.commit(write)? {
            Done::Admission(a) => Ok(a),
            _ => Err(err("the ledger answered an admission with something else")),
        }
    }

    /// Whether an op was started and never recorded (an agent crash interrupted it).
    pub fn was_interrupted(&self, op_id: &str) -> Result<bool, LedgerError> {
        let r = self.db.begin_read().map_err(err)?;
        let table = r.open_table(STARTED).map_err(err)?;
        Ok(table.get(op_id).map_err(err)?.is_some())
    }

    /// Admits `epoch` for `scope` if it is at least the highest seen, persisting it as the
    /// new highest; otherwise reports the stale epoch.
    pub fn admit_epoch(&self, scope: &str, epoch: u64) -> Result<Result<(), StaleEpoch>, LedgerError> {
        match self.commit(Write::AdmitEpoch { scope: scope.to_string(), epoch })? {
            Done::Epoch(verdict) => Ok(verdict),
            _ => Err(err("the ledger answered an epoch admission with something else")),
        }
    }

    /// The highest epoch seen for a scope (0 when none).
    pub fn highest_epoch(&self, scope: &str) -> Result<u64, LedgerError> {
        let r = self.db.begin_read().map_err(err)?;
        let table = r.open_table(EPOCHS).map_err(err)?;
        Ok(table.get(scope).map_err(err)?.map_or(0, |v| v.value()))
    }

    /// The recorded outcome of an op_id, if it finished.
    pub fn outcome(&self, op_id: &str) -> Result<Option<Outcome>, LedgerError> {
        let r = self.db.begin_read().map_err(err)?;
        let table = r.open_table(OPS).map_err(err)?;
        match table.get(op_id).map_err(err)? {
            Some(v) => {
                Outcome::decode(v.value()).map(Some).ok_or_else(|| err(format!("record of op {op_id} is corrupt")))
            }
            None => Ok(None),
        }
    }

    /// Records the terminal outcome of an op_id.
    pub fn record(&self, op_id: &str, outcome: &Outcome) -> Result<(), LedgerError> {
        self.record_keeping(op_id, outcome, OPS_KEPT)
    }

    /// Records an outcome and drops the oldest records beyond `keep`.
    fn record_keeping(&self, op_id: &str, outcome: &Outcome, keep: u64) -> Result<(), LedgerError> {
        match self.commit(Write::Record { op_id: op_id.to_string(), outcome: outcome.clone(), keep })? {
            Done::Recorded => Ok(()),
            _ => Err(err("the ledger answered a record with something else")),
        }
    }
}

/// The epoch check, fence raise and started mark of [`Ledger::admit`], inside `w`.
fn admit_in(w: &redb::WriteTransaction, scope: &str, epoch: u64, op_id: &str) -> Result<Admission, LedgerError> {
    let mut epochs = w.open_table(EPOCHS).map_err(err)?;
    let highest = epochs.get(scope).map_err(err)?.map_or(0, |v| v.value());
    if epoch < highest {
        return Ok(Admission::Stale(StaleEpoch { scope: scope.to_string(), presented: epoch, highest }));
    }
    if epoch > highest {
        epochs.insert(scope, epoch).map_err(err)?;
    }
    let ops = w.open_table(OPS).map_err(err)?;
    let recorded = match ops.get(op_id).map_err(err)? {
        Some(v) => Some(Outcome::decode(v.value()).ok_or_else(|| err(format!("record of op {op_id} is corrupt")))?),
        None => None,
    };
    let mut started = w.open_table(STARTED).map_err(err)?;
    Ok(match recorded {
        Some(outcome) => Admission::Replay(outcome),
        None if started.get(op_id).map_err(err)?.is_some() => Admission::Interrupted,
        None => {
            started.insert(op_id, epoch).map_err(err)?;
            Admission::Run
        }
    })
}

/// [`Ledger::admit_epoch`] inside `w`.
fn admit_epoch_in(w: &redb::WriteTransaction, scope: &str, epoch: u64) -> Result<Result<(), StaleEpoch>, LedgerError> {
    let mut table = w.open_table(EPOCHS).map_err(err)?;
    let highest = table.get(scope).map_err(err)?.map_or(0, |v| v.value());
    if epoch < highest {
        return Ok(Err(StaleEpoch { scope: scope.to_string(), presented: epoch, highest }));
    }
    if epoch > highest {
        table.insert(scope, epoch).map_err(err)?;
    }
    Ok(Ok(()))
}

/// [`Ledger::record`] inside `w`: the outcome, the started mark cleared, the oldest
/// records beyond `keep` dropped.
fn record_in(w: &redb::WriteTransaction, op_id: &str, outcome: &Outcome, keep: u64) -> Result<(), LedgerError> {
    w.open_table(STARTED).map_err(err)?.remove(op_id).map_err(err)?;
    let mut ops = w.open_table(OPS).map_err(err)?;
    let mut order = w.open_table(OPS_ORDER).map_err(err)?;
    if ops.insert(op_id, outcome.encode().as_slice()).map_err(err)?.is_none() {
        let next = order.last().map_err(err)?.map_or(0, |(k, _)| k.value() + 1);
        order.insert(next, op_id).map_err(err)?;
        if next >= keep {
            let oldest = order.first().map_err(err)?.map(|(k, v)| (k.value(), v.value().to_string()));
            if let Some((seq, old)) = oldest {
                order.remove(seq).map_err(err)?;
                ops.remove(old.as_str()).map_err(err)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_runs_once_replays_after_and_knows_an_interrupted_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        {
            let ledger = Ledger::open(&path).unwrap();
            assert_eq!(ledger.admit("volume/v1", 5, "op-1").unwrap(), Admission::Run);
            let done = Outcome { code: 0, message: String::new(), response: vec![1, 2] };
            ledger.record("op-1", &done).unwrap();
            assert_eq!(ledger.admit("volume/v1", 5, "op-1").unwrap(), Admission::Replay(done));
            assert_eq!(ledger.admit("volume/v1", 6, "op-2").unwrap(), Admission::Run);
            assert!(matches!(ledger.admit("volume/v1", 5, "op-3").unwrap(), Admission::Stale(_)));
            // op-2 never records: the agent "crashes" here.
        }
        let ledger = Ledger::open(&path).unwrap();
        assert!(ledger.was_interrupted("op-2").unwrap());
        assert_eq!(ledger.admit("volume/v1", 6, "op-2").unwrap(), Admission::Interrupted);
        let failed = Outcome { code: 14, message: "interrupted".into(), response: vec![] };
        ledger.record("op-2", &failed).unwrap();
        assert!(!ledger.was_interrupted("op-2").unwrap());
        assert_eq!(ledger.admit("volume/v1", 6, "op-2").unwrap(), Admission::Replay(failed));
    }

    #[test]
    fn epochs_only_grow_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        {
            let ledger = Ledger::open(&path).unwrap();
            assert_eq!(ledger.admit_epoch("group/g1", 10).unwrap(), Ok(()));
            assert_eq!(ledger.admit_epoch("group/g1", 10).unwrap(), Ok(()), "equal epoch is the same owner");
            let stale = ledger.admit_epoch("group/g1", 9).unwrap().unwrap_err();
            assert_eq!((stale.presented, stale.highest), (9, 10));
            assert_eq!(ledger.admit_epoch("group/g2", 3).unwrap(), Ok(()), "scopes are independent");
        }
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(ledger.highest_epoch("group/g1").unwrap(), 10);
        assert!(ledger.admit_epoch("group/g1", 5).unwrap().is_err());
    }

    #[test]
    fn oldest_outcomes_are_dropped_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb")).unwrap();
        let o = Outcome { code: 0, message: String::new(), response: vec![] };
        for i in 0..5 {
            ledger.record_keeping(&format!("op-{i}"), &o, 3).unwrap();
        }
        assert_eq!(ledger.outcome("op-0").unwrap(), None);
        assert_eq!(ledger.outcome("op-1").unwrap(), None);
        for i in 2..5 {
            assert!(ledger.outcome(&format!("op-{i}")).unwrap().is_some(), "op-{i} kept");
        }
    }

    /// 16 threads each admit and record 100 operations at once: every one runs once,
    /// every outcome is there after a reopen, and the writes shared commits.
    #[test]
    fn concurrent_operations_share_commits_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.redb");
        let ledger = Ledger::open(&path).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let op = format!("op-{t}-{i}");
                        assert_eq!(ledger.admit(&format!("volume/v{t}"), i, &op).unwrap(), Admission::Run);
                        let o = Outcome { code: 0, message: String::new(), response: vec![t as u8] };
                        ledger.record(&op, &o).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let commits = ledger.commits.load(std::sync::atomic::Ordering::Relaxed);
        println!("ledger: 3,200 writes in {commits} commits");
        assert!(commits < 3_200, "concurrent writes shared no commit");
        drop(ledger);
        let ledger = Ledger::open(&path).unwrap();
        for t in 0..16u64 {
            assert_eq!(ledger.highest_epoch(&format!("volume/v{t}")).unwrap(), 99);
            for i in 0..100 {
                let op = format!("op-{t}-{i}");
                assert!(!ledger.was_interrupted(&op).unwrap(), "{op} left started");
                assert_eq!(ledger.outcome(&op).unwrap().unwrap().response, vec![t as u8], "{op}");
            }
        }
    }

    #[test]
    fn outcomes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb")).unwrap();
        assert_eq!(ledger.outcome("op-1").unwrap(), None);
        let o = Outcome { code: 9, message: "volume v is busy".into(), response: vec![1, 2, 3] };
        ledger.record("op-1", &o).unwrap();
        assert_eq!(ledger.outcome("op-1").unwrap(), Some(o));
    }
}
