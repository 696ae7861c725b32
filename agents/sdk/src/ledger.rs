//! The agent's durable fencing and idempotency records.
//!
//! The ledger keeps three things: the highest epoch seen per fence scope, the terminal
//! outcome of each op_id, and the op_ids started but not finished. Each change is durable
//! (fdatasynced) before the agent answers, so a restarted agent still refuses a stale
//! owner and still answers a repeated op_id with the first outcome.
//!
//! A mutation costs two durable writes, and neither can go:
//! - [`Ledger::admit`] (the epoch check, the fence raise and the "started" mark, in one
//!   write) must be durable before the driver acts: if the agent dies after the driver
//!   changed the backend, the mark is what makes a retry of the same op_id answer
//!   "interrupted" instead of running the change a second time; and a raised fence must
//!   outlive a crash, or an old owner could be admitted again after it.
//! - [`Ledger::record`] (the outcome, which clears the mark) must be durable before the
//!   answer leaves, or a caller that saw success could, after an agent crash, find the op
//!   "interrupted" and take a second attempt for a change that happened.
//!
//! Merging them would mean holding the write open across the whole driver call.
//!
//! What concurrent operations share is the fdatasync (group commit): one thread owns the
//! file, and the writes that queue while it commits go into its next commit together,
//! each decided in arrival order as if alone, and none answered before that commit is
//! durable. A write that changes nothing (a replayed op_id, a stale or equal epoch) needs
//! no disk write at all. Callers wait without holding a thread ([`Ledger::admit`] and the
//! others are async; the `_blocking` forms are for threads outside a runtime).
//!
//! # On disk
//!
//! The state lives in memory; the file is a log of the changes that made it. Each commit
//! appends one frame (length, CRC-32 of the payload, payload) holding the changes of its
//! writes, then fdatasyncs. The log is read back at start. A crash can only tear the last
//! frame (the next commit starts after the previous one's fdatasync returned), so a bad
//! frame at the end is cut off; one followed by a good frame means the disk damaged the
//! file, and the ledger refuses to open rather than forget a fence. When the log has
//! grown to four times the state's size (and at least [`COMPACT_MIN`]), the state is
//! written to a new file, fsynced and renamed over the log.
//!
//! Readers ([`Ledger::outcome`], [`Ledger::highest_epoch`], [`Ledger::was_interrupted`])
//! see only durable state: a commit decides its answers against the state plus its own
//! batch, and applies the changes to the shared state after the fdatasync.
//!
//! Before this log the ledger was a redb file (`ledger.redb`, same directory); a ledger
//! found only in that form is imported once at open and the old file renamed to
//! `ledger.redb.imported`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, mpsc};

use tokio::sync::oneshot;

/// How many op outcomes the ledger keeps. A retry comes within minutes of its first
/// attempt; a hundred thousand newer operations later, an op_id is history.
pub const OPS_KEPT: u64 = 100_000;

/// The log is rewritten from the state once it is this large and four times the state.
pub const COMPACT_MIN: u64 = 64 << 20;

/// The first bytes of a ledger log.
const MAGIC: &[u8; 8] = b"DRVLDG01";
/// No frame is larger; a length above it is damage, not data.
const MAX_FRAME: usize = 64 << 20;
/// A compaction writes the state in frames of about this size.
const SNAPSHOT_FRAME: usize = 1 << 20;

/// A recorded terminal outcome of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The gRPC code; 0 for success.
    pub code: i32,
    pub message: String,
    /// The encoded response message of a success.
    pub response: Vec<u8>,
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

/// The durable fencing and idempotency records of one agent. Clones share the ledger;
/// its writer thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
    writes: mpsc::Sender<Queued>,
}

struct Inner {
    /// The durable state: only changes whose frame was fdatasynced are in it.
    state: RwLock<State>,
    /// Commits that wrote to disk (each one fdatasync), for tests and figures.
    commits: AtomicU64,
}

struct Log {
    path: PathBuf,
    file: File,
    /// The log's length, and the length the state took when last written whole.
    bytes: u64,
    state_bytes: u64,
    compact_min: u64,
}

/// The ledger's contents.
#[derive(Default, Debug, PartialEq)]
struct State {
    epochs: HashMap<String, u64>,
    ops: HashMap<String, Outcome>,
    /// Op ids in the order their outcomes were first recorded, oldest first.
    order: VecDeque<String>,
    /// Ops admitted and handed to the driver whose outcome is not recorded yet. One that
    /// survives a restart marks an operation the crash interrupted.
    started: HashMap<String, u64>,
}

/// One change to the state; the log is a sequence of these.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    Epoch {
        scope: String,
        epoch: u64,
    },
    Started {
        op_id: String,
        epoch: u64,
    },
    /// The outcome, the started mark cleared, the oldest outcomes beyond `keep` dropped.
    Recorded {
        op_id: String,
        outcome: Outcome,
        keep: u64,
    },
}

impl State {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Epoch { scope, epoch } => {
                self.epochs.insert(scope, epoch);
            }
            Change::Started { op_id, epoch } => {
                self.started.insert(op_id, epoch);
            }
            Change::Recorded { op_id, outcome, keep } => {
                self.started.remove(&op_id);
                if self.ops.insert(op_id.clone(), outcome).is_none() {
                    self.order.push_back(op_id);
                    while self.order.len() as u64 > keep {
                        if let Some(old) = self.order.pop_front() {
                            self.ops.remove(&old);
                        }
                    }
                }
            }
        }
    }

    /// The state as changes that rebuild it, in frames of about [`SNAPSHOT_FRAME`].
    fn snapshot(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut payload = Vec::new();
        let mut push = |change: Change, payload: &mut Vec<u8>| {
            encode_change(&change, payload);
            if payload.len() >= SNAPSHOT_FRAME {
                frames.push(frame(payload));
                payload.clear();
            }
        };
        for (scope, epoch) in &self.epochs {
            push(Change::Epoch { scope: scope.clone(), epoch: *epoch }, &mut payload);
        }
        for op_id in &self.order {
            let outcome = self.ops[op_id].clone();
            push(Change::Recorded { op_id: op_id.clone(), outcome, keep: u64::MAX }, &mut payload);
        }
        for (op_id, epoch) in &self.started {
            push(Change::Started { op_id: op_id.clone(), epoch: *epoch }, &mut payload);
        }
        if !payload.is_empty() {
            frames.push(frame(&payload));
        }
        frames
    }
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
    reply: oneshot::Sender<Result<Done, LedgerError>>,
}

/// The durable state seen through the changes a batch has decided so far, so that each
/// write of the batch is decided as if the earlier ones had been applied.
struct Pending<'a> {
    base: &'a State,
    epochs: HashMap<String, u64>,
    ops: HashMap<String, Outcome>,
    started: HashMap<String, bool>,
    changes: Vec<Change>,
}

impl<'a> Pending<'a> {
    fn new(base: &'a State) -> Self {
        Self { base, epochs: HashMap::new(), ops: HashMap::new(), started: HashMap::new(), changes: Vec::new() }
    }

    fn highest(&self, scope: &str) -> u64 {
        self.epochs.get(scope).or_else(|| self.base.epochs.get(scope)).copied().unwrap_or(0)
    }

    /// Checks `epoch` against the highest seen for `scope`, raising it if newer.
    fn admit_epoch(&mut self, scope: &str, epoch: u64) -> Result<(), StaleEpoch> {
        let highest = self.highest(scope);
        if epoch < highest {
            return Err(StaleEpoch { scope: scope.to_string(), presented: epoch, highest });
        }
        if epoch > highest {
            self.epochs.insert(scope.to_string(), epoch);
            self.changes.push(Change::Epoch { scope: scope.to_string(), epoch });
        }
        Ok(())
    }

    fn admit(&mut self, scope: &str, epoch: u64, op_id: &str) -> Admission {
        if let Err(stale) = self.admit_epoch(scope, epoch) {
            return Admission::Stale(stale);
        }
        if let Some(outcome) = self.ops.get(op_id).or_else(|| self.base.ops.get(op_id)) {
            return Admission::Replay(outcome.clone());
        }
        let started = self.started.get(op_id).copied().unwrap_or_else(|| self.base.started.contains_key(op_id));
        if started {
            return Admission::Interrupted;
        }
        self.started.insert(op_id.to_string(), true);
        self.changes.push(Change::Started { op_id: op_id.to_string(), epoch });
        Admission::Run
    }

    fn record(&mut self, op_id: &str, outcome: &Outcome, keep: u64) {
        self.started.insert(op_id.to_string(), false);
        self.ops.insert(op_id.to_string(), outcome.clone());
        self.changes.push(Change::Recorded { op_id: op_id.to_string(), outcome: outcome.clone(), keep });
    }
}

impl Ledger {
    /// Opens or creates the ledger log at `path`, importing a redb ledger found beside it
    /// (`path` with the extension `redb`) when the log does not exist yet.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_with(path, COMPACT_MIN)
    }

    /// [`Ledger::open`] with the log compacted once it passes `compact_min` bytes (and
    /// four times the state), for tests that want compactions to happen often.
    #[doc(hidden)]
    pub fn open_compacting_at(path: &Path, compact_min: u64) -> Result<Self, LedgerError> {
        Self::open_with(path, compact_min)
    }

    fn open_with(path: &Path, compact_min: u64) -> Result<Self, LedgerError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let legacy = path.with_extension("redb");
        if !path.exists() && legacy.exists() {
            let state = import_redb(&legacy)?;
            write_whole(path, &state)?;
            let moved = legacy.with_extension("redb.imported");
            std::fs::rename(&legacy, &moved).map_err(|e| {
                err(format!("imported {} but cannot rename it to {}: {e}", legacy.display(), moved.display()))
            })?;
            sync_dir(dir)?;
            tracing::info!(from = %legacy.display(), to = %path.display(), "agent ledger imported from redb");
        }
        if !path.exists() {
            write_whole(path, &State::default())?;
        }
        let (state, bytes) = read_log(path)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let state_bytes = state.snapshot().iter().map(|f| f.len() as u64).sum::<u64>() + MAGIC.len() as u64;
        let log = Log { path: path.to_path_buf(), file, bytes, state_bytes, compact_min };
        let inner = Arc::new(Inner { state: RwLock::new(state), commits: AtomicU64::new(0) });
        let (writes, queue) = mpsc::channel();
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("drover-ledger".into())
            .spawn(move || writer.write_forever(log, queue))
            .map_err(|e| err(format!("cannot start the ledger's writer thread: {e}")))?;
        Ok(Self { inner, writes })
    }

    /// Queues `write` for the writer thread; the answer comes once it is durable.
    fn submit(&self, write: Write) -> oneshot::Receiver<Result<Done, LedgerError>> {
        let (reply, answer) = oneshot::channel();
        // A send fails only when the writer thread is gone; the dropped reply says so.
        let _ = self.writes.send(Queued { write, reply });
        answer
    }
}

fn writer_gone(_: oneshot::error::RecvError) -> LedgerError {
    err("writer thread stopped; restart the agent")
}

impl Inner {
    /// The writer thread: takes every write queued, commits them together, answers them.
    fn write_forever(&self, mut log: Log, queue: mpsc::Receiver<Queued>) {
        // Set when a write or fdatasync failed: what is on disk is then unknown, so every
        // later write fails until the agent restarts and reads the log back.
        let mut failed: Option<String> = None;
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            batch.extend(queue.try_iter());
            let applied = match &failed {
                Some(why) => Err(err(format!("failed earlier ({why}) and takes no more writes; restart the agent"))),
                None => self.commit(&mut log, &batch),
            };
            match applied {
                Ok(answers) => {
                    for (q, a) in batch.into_iter().zip(answers) {
                        let _ = q.reply.send(Ok(a));
                    }
                }
                Err(e) => {
                    failed.get_or_insert_with(|| e.0.clone());
                    for q in batch {
                        let _ = q.reply.send(Err(err(&e.0)));
                    }
                }
            }
        }
    }

    /// Decides `batch` in arrival order against the durable state, appends the changes
    /// as one frame, fdatasyncs once, and only then applies them to the state.
    fn commit(&self, log: &mut Log, batch: &[Queued]) -> Result<Vec<Done>, LedgerError> {
        let (answers, changes) = {
            let state = self.state.read().expect("ledger state poisoned");
            let mut pending = Pending::new(&state);
            let answers: Vec<Done> = batch
                .iter()
                .map(|q| match &q.write {
                    Write::Admit { scope, epoch, op_id } => Done::Admission(pending.admit(scope, *epoch, op_id)),
                    Write::AdmitEpoch { scope, epoch } => Done::Epoch(pending.admit_epoch(scope, *epoch)),
                    Write::Record { op_id, outcome, keep } => {
                        pending.record(op_id, outcome, *keep);
                        Done::Recorded
                    }
                })
                .collect();
            (answers, pending.changes)
        };
        if changes.is_empty() {
            return Ok(answers);
        }
        let mut payload = Vec::new();
        for change in &changes {
            encode_change(change, &mut payload);
        }
        log.append(&frame(&payload))?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.state.write().expect("ledger state poisoned");
            for change in changes {
                state.apply(change);
            }
        }
        if log.bytes > log.compact_min.max(4 * log.state_bytes) {
            // The log as it is stays valid if this fails; it is tried again later.
            let state = self.state.read().expect("ledger state poisoned");
            if let Err(e) = log.compact(&state) {
                tracing::warn!(error = %e, "agent ledger compaction failed; the log keeps growing until it works");
            }
        }
        Ok(answers)
    }
}

impl Ledger {
    /// One durable step before a mutation runs: checks the epoch for `scope` (raising the
    /// highest seen), then looks the op_id up. Only [`Admission::Run`] marks the op as
    /// started; the caller must [`Ledger::record`] its outcome, which clears the mark.
    pub async fn admit(&self, scope: &str, epoch: u64, op_id: &str) -> Result<Admission, LedgerError> {
        admission(self.submit(Self::admit_write(scope, epoch, op_id)).await.map_err(writer_gone)?)
    }

    /// [`Ledger::admit`] for a thread outside an async runtime.
    pub fn admit_blocking(&self, scope: &str, epoch: u64, op_id: &str) -> Result<Admission, LedgerError> {
        admission(self.submit(Self::admit_write(scope, epoch, op_id)).blocking_recv().map_err(writer_gone)?)
    }

    fn admit_write(scope: &str, epoch: u64, op_id: &str) -> Write {
        Write::Admit { scope: scope.to_string(), epoch, op_id: op_id.to_string() }
    }

    /// Whether an op was started and never recorded (an agent crash interrupted it).
    pub fn was_interrupted(&self, op_id: &str) -> Result<bool, LedgerError> {
        Ok(self.inner.state.read().expect("ledger state poisoned").started.contains_key(op_id))
    }

    /// Admits `epoch` for `scope` if it is at least the highest seen, persisting it as the
    /// new highest; otherwise reports the stale epoch.
    pub async fn admit_epoch(&self, scope: &str, epoch: u64) -> Result<Result<(), StaleEpoch>, LedgerError> {
        let write = Write::AdmitEpoch { scope: scope.to_string(), epoch };
        epoch_verdict(self.submit(write).await.map_err(writer_gone)?)
    }

    /// [`Ledger::admit_epoch`] for a thread outside an async runtime.
    pub fn admit_epoch_blocking(&self, scope: &str, epoch: u64) -> Result<Result<(), StaleEpoch>, LedgerError> {
        let write = Write::AdmitEpoch { scope: scope.to_string(), epoch };
        epoch_verdict(self.submit(write).blocking_recv().map_err(writer_gone)?)
    }

    /// The highest epoch seen for a scope (0 when none).
    pub fn highest_epoch(&self, scope: &str) -> Result<u64, LedgerError> {
        Ok(self.inner.state.read().expect("ledger state poisoned").epochs.get(scope).copied().unwrap_or(0))
    }

    /// The recorded outcome of an op_id, if it finished.
    pub fn outcome(&self, op_id: &str) -> Result<Option<Outcome>, LedgerError> {
        Ok(self.inner.state.read().expect("ledger state poisoned").ops.get(op_id).cloned())
    }

    /// Records the terminal outcome of an op_id.
    pub async fn record(&self, op_id: &str, outcome: &Outcome) -> Result<(), LedgerError> {
        let write = Write::Record { op_id: op_id.to_string(), outcome: outcome.clone(), keep: OPS_KEPT };
        recorded(self.submit(write).await.map_err(writer_gone)?)
    }

    /// [`Ledger::record`] for a thread outside an async runtime.
    pub fn record_blocking(&self, op_id: &str, outcome: &Outcome) -> Result<(), LedgerError> {
        self.record_keeping(op_id, outcome, OPS_KEPT)
    }

    /// Records an outcome and drops the oldest records beyond `keep`.
    fn record_keeping(&self, op_id: &str, outcome: &Outcome, keep: u64) -> Result<(), LedgerError> {
        let write = Write::Record { op_id: op_id.to_string(), outcome: outcome.clone(), keep };
        recorded(self.submit(write).blocking_recv().map_err(writer_gone)?)
    }
}

fn admission(done: Result<Done, LedgerError>) -> Result<Admission, LedgerError> {
    match done? {
        Done::Admission(a) => Ok(a),
        _ => Err(err("the ledger answered an admission with something else")),
    }
}

fn epoch_verdict(done: Result<Done, LedgerError>) -> Result<Result<(), StaleEpoch>, LedgerError> {
    match done? {
        Done::Epoch(verdict) => Ok(verdict),
        _ => Err(err("the ledger answered an epoch admission with something else")),
    }
}

fn recorded(done: Result<Done, LedgerError>) -> Result<(), LedgerError> {
    match done? {
        Done::Recorded => Ok(()),
        _ => Err(err("the ledger answered a record with something else")),
    }
}

impl Log {
    /// Appends one frame and makes it durable.
    fn append(&mut self, frame: &[u8]) -> Result<(), LedgerError> {
        let path = self.path.display();
        self.file.write_all(frame).map_err(|e| err(format!("cannot write {path}: {e}")))?;
        self.file.sync_data().map_err(|e| err(format!("cannot sync {path}: {e}")))?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Rewrites the log as the state alone.
    fn compact(&mut self, state: &State) -> Result<(), LedgerError> {
        let bytes = write_whole(&self.path, state)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| err(format!("cannot open {}: {e}", self.path.display())))?;
        self.bytes = bytes;
        self.state_bytes = bytes;
        Ok(())
    }
}

/// Writes `state` as a complete log at `path` (through a temporary file, fsynced and
/// renamed over it, the directory fsynced), returning its length.
fn write_whole(path: &Path, state: &State) -> Result<u64, LedgerError> {
    let temp = path.with_extension("compacting");
    let mut file = File::create(&temp).map_err(|e| err(format!("cannot create {}: {e}", temp.display())))?;
    let mut bytes = MAGIC.len() as u64;
    file.write_all(MAGIC).map_err(|e| err(format!("cannot write {}: {e}", temp.display())))?;
    for f in state.snapshot() {
        file.write_all(&f).map_err(|e| err(format!("cannot write {}: {e}", temp.display())))?;
        bytes += f.len() as u64;
    }
    file.sync_all().map_err(|e| err(format!("cannot sync {}: {e}", temp.display())))?;
    std::fs::rename(&temp, path)
        .map_err(|e| err(format!("cannot rename {} to {}: {e}", temp.display(), path.display())))?;
    sync_dir(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> Result<(), LedgerError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err(format!("cannot sync directory {}: {e}", dir.display())))
}

/// Reads the log back: the state and the length of its good part. A torn last frame is
/// cut off the file; damage before a good frame is refused.
fn read_log(path: &Path) -> Result<(State, u64), LedgerError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if data.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
        return Err(err(format!(
            "{} is not a Drover agent ledger log; move it away if it is not needed, or restore the state directory",
            path.display()
        )));
    }
    let mut state = State::default();
    let mut at = MAGIC.len();
    while at < data.len() {
        let Some(payload) = frame_at(&data, at) else {
            // A torn frame is the last thing in the file; a good frame after it means damage.
            let len = data.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
            let next = len.and_then(|len| at.checked_add(8 + len)).filter(|next| *next < data.len());
            if next.is_some_and(|next| frame_at(&data, next).is_some()) {
                return Err(err(format!(
                    "{} is damaged at byte {at} with good records after it; restore the state directory \
                     from a backup, or move the file away to start with an empty ledger (fences and \
                     op outcomes are then forgotten)",
                    path.display()
                )));
            }
            tracing::warn!(path = %path.display(), at, dropped = data.len() - at, "agent ledger: cutting off a torn last write (a crash interrupted it before it was acknowledged)");
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
            file.set_len(at as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| err(format!("cannot cut the torn end off {}: {e}", path.display())))?;
            break;
        };
        let mut cursor = Cursor { data: payload, at: 0 };
        while cursor.at < payload.len() {
            let change = decode_change(&mut cursor)
                .ok_or_else(|| err(format!("{} holds a record this agent cannot read at byte {at}", path.display())))?;
            state.apply(change);
        }
        at += 8 + payload.len();
    }
    Ok((state, at as u64))
}

/// The payload of the good frame at `at`, if there is one.
fn frame_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(at + 4..at + 8)?.try_into().ok()?);
    if len > MAX_FRAME {
        return None;
    }
    let payload = data.get(at + 8..at + 8 + len)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn encode_change(change: &Change, out: &mut Vec<u8>) {
    match change {
        Change::Epoch { scope, epoch } => {
            out.push(1);
            put_bytes(out, scope.as_bytes());
            out.extend_from_slice(&epoch.to_le_bytes());
        }
        Change::Started { op_id, epoch } => {
            out.push(2);
            put_bytes(out, op_id.as_bytes());
            out.extend_from_slice(&epoch.to_le_bytes());
        }
        Change::Recorded { op_id, outcome, keep } => {
            out.push(3);
            put_bytes(out, op_id.as_bytes());
            out.extend_from_slice(&keep.to_le_bytes());
            out.extend_from_slice(&outcome.code.to_le_bytes());
            put_bytes(out, outcome.message.as_bytes());
            put_bytes(out, &outcome.response);
        }
    }
}

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let out = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        Some(self.take(len)?.to_vec())
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

fn decode_change(c: &mut Cursor) -> Option<Change> {
    Some(match c.take(1)?[0] {
        1 => Change::Epoch { scope: c.string()?, epoch: c.u64()? },
        2 => Change::Started { op_id: c.string()?, epoch: c.u64()? },
        3 => {
            let op_id = c.string()?;
            let keep = c.u64()?;
            let code = i32::from_le_bytes(c.take(4)?.try_into().ok()?);
            Change::Recorded { op_id, keep, outcome: Outcome { code, message: c.string()?, response: c.bytes()? } }
        }
        _ => return None,
    })
}

/// Reads a ledger kept by earlier versions in redb: the same four tables it had.
fn import_redb(path: &Path) -> Result<State, LedgerError> {
    use redb::{ReadableDatabase, ReadableTable};
    let fail = |e: &dyn std::fmt::Display| err(format!("cannot import the redb ledger {}: {e}", path.display()));
    let db = redb::Database::open(path).map_err(|e| fail(&e))?;
    let r = db.begin_read().map_err(|e| fail(&e))?;
    let mut state = State::default();
    for entry in r.open_table(legacy::EPOCHS).map_err(|e| fail(&e))?.iter().map_err(|e| fail(&e))? {
        let (k, v) = entry.map_err(|e| fail(&e))?;
        state.epochs.insert(k.value().to_string(), v.value());
    }
    let ops = r.open_table(legacy::OPS).map_err(|e| fail(&e))?;
    for entry in r.open_table(legacy::OPS_ORDER).map_err(|e| fail(&e))?.iter().map_err(|e| fail(&e))? {
        let (_, op_id) = entry.map_err(|e| fail(&e))?;
        let op_id = op_id.value().to_string();
        let Some(bytes) = ops.get(op_id.as_str()).map_err(|e| fail(&e))? else { continue };
        let outcome =
            legacy::decode(bytes.value()).ok_or_else(|| fail(&format!("the record of op {op_id} is corrupt")))?;
        state.apply(Change::Recorded { op_id, outcome, keep: u64::MAX });
    }
    for entry in r.open_table(legacy::STARTED).map_err(|e| fail(&e))?.iter().map_err(|e| fail(&e))? {
        let (k, v) = entry.map_err(|e| fail(&e))?;
        state.started.insert(k.value().to_string(), v.value());
    }
    Ok(state)
}

/// The redb ledger's layout, kept to import it.
mod legacy {
    use super::Outcome;
    use redb::TableDefinition;

    pub const EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("epochs");
    pub const OPS: TableDefinition<&str, &[u8]> = TableDefinition::new("ops");
    pub const STARTED: TableDefinition<&str, u64> = TableDefinition::new("started");
    pub const OPS_ORDER: TableDefinition<u64, &str> = TableDefinition::new("ops_order");

    pub fn decode(bytes: &[u8]) -> Option<Outcome> {
        let code = i32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
        let len = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
        let message = String::from_utf8(bytes.get(8..8 + len)?.to_vec()).ok()?;
        Some(Outcome { code, message, response: bytes[8 + len..].to_vec() })
    }

    #[cfg(test)]
    pub fn encode(o: &Outcome) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&o.code.to_le_bytes());
        out.extend_from_slice(&(o.message.len() as u32).to_le_bytes());
        out.extend_from_slice(o.message.as_bytes());
        out.extend_from_slice(&o.response);
        out
    }
}

#[cfg(test)]
mod tests;
