//! The manager: submits, owns, runs, resumes and cancels executions (see the crate doc).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use drover_store::{Compare, KvStore, StoreError, Txn, TxnOp};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::record::{ExecutionRec, ExecutionStatus, StepRec, keys, new_trace_id, now_ms};

/// The most locks one transaction takes or frees. etcd refuses a transaction of more
/// than 128 comparisons or operations (its default `--max-txn-ops`), and the submit and
/// end transactions carry a few of their own; an execution with more locks (a site
/// runbook over hundreds of groups) takes and frees them in several.
pub const LOCKS_PER_TXN: usize = 100;

/// The most locks an execution's record lists; more are kept apart (see
/// [`ExecutionRec::locks_apart`]). Transitions hold one or two; a run over 100 groups
/// (as the chaos and active/active tests make) already keeps its list apart.
pub const LOCKS_IN_RECORD: usize = 50;

/// Locks per part of a lock list kept apart.
const LOCKS_PER_LIST: usize = 1000;

/// The least time between two updates of [`Manager::watch`] while the execution runs.
pub const WATCH_PACE: Duration = Duration::from_millis(500);

use crate::{Context, Loader, Procedure, ProcedureError, Status};

mod control;
mod signals;

/// Manager settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This orchestrator's id, written into owner claims.
    pub owner_id: String,
    /// TTL of the owner lease: how long after an owner dies another resumes its work.
    pub lease_ttl: Duration,
    /// How often unowned executions are looked for, besides owner-deletion events.
    pub scan_interval: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            owner_id: format!("orchestrator-{}", uuid::Uuid::now_v7()),
            lease_ttl: Duration::from_secs(10),
            scan_interval: Duration::from_secs(1),
        }
    }
}

/// Why a submit or cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Another execution holds a key this one needs.
    #[error("{key} is held by execution {holder}; wait for it (`drover execution watch {holder}`) or cancel it")]
    Locked { key: String, holder: String },
    /// A comparison of the caller's own intent (see [`Manager::submit_with`]) failed:
    /// what it read has changed.
    #[error("the records this operation was checked against changed meanwhile; re-read and retry")]
    Conflict,
    #[error("execution {0} not found; list executions with `drover execution list`")]
    NotFound(String),
    #[error("execution {id} already ended ({status}); there is nothing to change")]
    Ended { id: String, status: String },
    /// A prompt was decided already; the first decision stands.
    #[error("prompt {prompt} of execution {id} was already {} by {}", if first.approve { "approved" } else { "rejected" }, first.by)]
    Decided { id: String, prompt: String, first: crate::record::Decision },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many ended ids a [`Manager::subscribe_ends`] receiver may fall behind.
pub const ENDED_IDS_KEPT: usize = 4096;

/// An operator's request to a running execution, checked at step boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Cancel,
    Pause,
}

/// Runs procedures for one orchestrator, and resumes those other owners left.
pub struct Manager {
    store: Arc<dyn KvStore>,
    config: ManagerConfig,
    loaders: RwLock<HashMap<String, Loader>>,
    lease: tokio::sync::Mutex<Option<i64>>,
    /// Executions running here: their run number (to tell runs apart), stop token and
    /// trace id (which their children join without reading their record).
    running: Mutex<HashMap<String, (u64, CancellationToken, String)>>,
    /// Executions being submitted here: claimed by their submit, not yet running, so
    /// this member's own scan must not take them for claims whose task is gone.
    submitting: Mutex<std::collections::HashSet<String>>,
    /// Executions this orchestrator is ending: their owner key's deletion is an end, not
    /// a lapsed lease, and wakes no recovery scan (see `watch_owners`).
    ending: Mutex<std::collections::HashSet<String>>,
    runs: std::sync::atomic::AtomicU64,
    shutdown: CancellationToken,
    /// What this orchestrator announces of itself (see [`Manager::announce`]).
    member: Mutex<Option<serde_json::Value>>,
    wake: tokio::sync::Notify,
    /// Called with each execution this orchestrator ends (see [`Manager::on_end`]).
    ended: RwLock<Option<EndHook>>,
    /// Writes that go with an end (see [`Manager::on_end_writes`]).
    end_writes: RwLock<Option<EndWrites>>,
    /// Called with each execution submitted here (see [`Manager::on_start`]).
    started: RwLock<Option<EndHook>>,
    /// Cancel and pause requests, kept by a watch (see `signals.rs`).
    cancels: signals::Watched,
    pauses: signals::Watched,
    /// Woken whenever an execution ends here (see [`Manager::ends`]).
    ends: tokio::sync::Notify,
    /// The id of each execution that ends here (see [`Manager::subscribe_ends`]).
    ended_ids: tokio::sync::broadcast::Sender<String>,
}

/// What [`Manager::on_end`] calls.
pub type EndHook = Arc<dyn Fn(&ExecutionRec) + Send + Sync>;

/// What [`Manager::on_end_writes`] calls: the writes to make with an execution's end.
pub type EndWrites = Arc<dyn Fn(&ExecutionRec) -> Vec<TxnOp> + Send + Sync>;

/// Marks an execution as being submitted here for as long as the submit runs.
struct Submitting<'a> {
    manager: &'a Manager,
    id: String,
}

impl<'a> Submitting<'a> {
    fn new(manager: &'a Manager, id: &str) -> Self {
        manager.submitting.lock().expect("submitting poisoned").insert(id.to_string());
        Self { manager, id: id.to_string() }
    }
}

impl Drop for Submitting<'_> {
    fn drop(&mut self) {
        self.manager.submitting.lock().expect("submitting poisoned").remove(&self.id);
    }
}

fn encode(rec: &ExecutionRec) -> Vec<u8> {
    serde_json::to_vec(rec).expect("execution records serialise")
}

fn decode(bytes: &[u8]) -> Result<ExecutionRec, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Internal(format!("unreadable execution record: {e}")))
}

/// The index entries of an execution (see [`keys::newest`]).
fn index_writes(id: &str, project: &str) -> Vec<TxnOp> {
    let mut ops = vec![TxnOp::put(keys::newest("all", id), id.to_string())];
    if !project.is_empty() {
        ops.push(TxnOp::put(keys::newest(&keys::project_scope(project), id), id.to_string()));
    }
    ops
}

/// Waits `d`, or less if `token` fires; returns whether it fired.
async fn pause(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

impl Manager {
    /// A manager on `store`. Register loaders, then [`Manager::start`] it.
    pub fn new(store: Arc<dyn KvStore>, config: ManagerConfig, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            store,
            config,
            loaders: RwLock::new(HashMap::new()),
            lease: tokio::sync::Mutex::new(None),
            running: Mutex::new(HashMap::new()),
            submitting: Mutex::new(Default::default()),
            ending: Mutex::new(Default::default()),
            runs: std::sync::atomic::AtomicU64::new(0),
            shutdown,
            member: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            ended: RwLock::new(None),
            end_writes: RwLock::new(None),
            started: RwLock::new(None),
            ends: tokio::sync::Notify::new(),
            ended_ids: tokio::sync::broadcast::channel(ENDED_IDS_KEPT).0,
            cancels: Default::default(),
            pauses: Default::default(),
        })
    }

    /// This manager's owner id.
    pub fn owner_id(&self) -> &str {
        &self.config.owner_id
    }

    /// Teaches the manager to rebuild procedures of `kind` on resume.
    pub fn register(&self, kind: &str, loader: Loader) {
        self.loaders.write().expect("loaders poisoned").insert(kind.to_string(), loader);
    }

    /// Starts the lease keeper and the recovery loop (which resumes unowned executions
    /// at once, then whenever an owner's claim disappears, and every scan interval).
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(self.clone().build_index());
        tokio::spawn(self.clone().keep_lease());
        tokio::spawn(self.clone().recover());
        tokio::spawn(self.clone().watch_owners());
        for (which, prefix) in [(Signal::Cancel, keys::CANCELS), (Signal::Pause, keys::PAUSES)] {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let why = tokio::select! {
                        _ = me.shutdown.cancelled() => return,
                        why = me.watched(which).follow(me.store.as_ref(), prefix) => why,
                    };
                    tracing::debug!(error = %why, prefix, "the watch of operator requests broke; reading them per step until it is back");
                    if pause(Duration::from_secs(1), &me.shutdown).await {
                        return;
                    }
                }
            });
        }
    }

    fn watched(&self, which: Signal) -> &signals::Watched {
        match which {
            Signal::Cancel => &self.cancels,
            Signal::Pause => &self.pauses,
        }
    }

    /// Whether an operator asked execution `id` to stop (`Signal::Cancel`) or to pause:
    /// from the watched view, or from the store while the view is not live.
    pub async fn requested(&self, id: &str, which: Signal) -> bool {
        let key = match which {
            Signal::Cancel => keys::cancel(id),
            Signal::Pause => keys::pause(id),
        };
        match self.watched(which).is_set(&key) {
            Some(set) => set,
            None => matches!(self.store.get(key.as_bytes()).await, Ok(Some(_))),
        }
    }

    async fn lease(&self) -> Result<i64, StoreError> {
        let mut lease = self.lease.lock().await;
        if let Some(l) = *lease {
            return Ok(l);
        }
        let l = self.store.grant_lease(self.config.lease_ttl.as_secs().max(1) as i64).await?;
        tracing::info!(lease = l, owner = %self.config.owner_id, "owner lease granted");
        *lease = Some(l);
        Ok(l)
    }

    /// Stops every local run: their claims are gone (or about to be).
    fn drop_runs(&self, why: &str) {
        let mut running = self.running.lock().expect("running poisoned");
        if !running.is_empty() {
            tracing::warn!(count = running.len(), why, "stopping local executions; another owner will resume them");
        }
        for (_, (_, token, _)) in running.drain() {
            token.cancel();
        }
    }

    async fn keep_lease(self: Arc<Self>) {
        let period = self.config.lease_ttl / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            self.put_member().await;
            if pause(period, &self.shutdown).await {
                return;
            }
            let Some(lease) = *self.lease.lock().await else { continue };
            match self.store.keep_alive(lease).await {
                Ok(_) => last_ok = tokio::time::Instant::now(),
                Err(StoreError::LeaseNotFound(_)) => {
                    *self.lease.lock().await = None;
                    self.drop_runs("the owner lease expired");
                    self.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "owner lease keepalive failed");
                    if last_ok.elapsed() > self.config.lease_ttl {
                        // Past the TTL the store may have expired the lease: assume so.
                        *self.lease.lock().await = None;
                        self.drop_runs("the owner lease could not be renewed within its TTL");
                    }
                }
            }
        }
    }

    async fn watch_owners(self: Arc<Self>) {
        loop {
            match self.store.watch(keys::OWNERS.as_bytes(), 0).await {
                Ok(mut events) => {
                    while let Some(ev) = tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        ev = events.next() => ev,
                    } {
                        match ev {
                            // A claim gone: a lapsed lease (scan now, to resume the
                            // execution) or an end. Ends made here are known and skipped:
                            // at scale they are many a second, and each scan reads the
                            // pending index. An end elsewhere still wakes a scan, which
                            // finds nothing to do.
                            Ok(drover_store::WatchEvent::Delete(kv)) => {
                                let id = String::from_utf8_lossy(&kv.key[keys::OWNERS.len().min(kv.key.len())..]);
                                if !self.ending.lock().expect("ending poisoned").remove(id.as_ref()) {
                                    self.wake.notify_one()
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch execution owners; scanning on a timer"),
            }
            if pause(Duration::from_secs(1), &self.shutdown).await {
                return;
            }
        }
    }

    async fn recover(self: Arc<Self>) {
        loop {
            if let Err(e) = self.scan().await {
                tracing::warn!(error = %e, "looking for executions to resume failed; retrying");
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.scan_interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Claims and resumes every pending execution nobody owns.
    async fn scan(self: &Arc<Self>) -> Result<(), StoreError> {
        self.abandon_stalled().await?;
        let (pending, _) = self.store.range(keys::PENDING.as_bytes()).await?;
        for kv in pending {
            let id = String::from_utf8_lossy(&kv.key[keys::PENDING.len()..]).into_owned();
            if self.running.lock().expect("running poisoned").contains_key(&id) {
                continue;
            }
            let owner = self.store.get(keys::owner(&id).as_bytes()).await?;
            // Asked again after the read, and in this order: a submit here inserts its
            // run before it stops marking the execution as being submitted.
            if self.submitting.lock().expect("submitting poisoned").contains(&id)
                || self.running.lock().expect("running poisoned").contains_key(&id)
            {
                continue;
            }
            let mine = *self.lease.lock().await;
            let expected = match owner {
                None => None,
                // A claim of ours whose task is gone (it stopped on a store error): claim again.
                Some(o) if Some(o.lease) == mine => Some(o.mod_revision),
                Some(_) => continue,
            };
            let Some(epoch) = self.claim(&id, expected).await? else { continue };
            let Some(kv) = self.store.get(keys::execution(&id).as_bytes()).await? else { continue };
            let rec = decode(&kv.value)?;
            let loaded = self.load(&rec.kind, rec.state.clone());
            match loaded {
                Ok(proc) => {
                    tracing::info!(execution = %id, kind = %rec.kind, epoch, step = %rec.step, "resuming execution");
                    self.spawn_run(id, proc, epoch, &rec, false);
                }
                Err(e) => {
                    let mut rec = rec;
                    rec.status = ExecutionStatus::Failed;
                    rec.error = format!("cannot resume: {e}; upgrade every orchestrator to the same version");
                    self.finish(&id, rec, epoch, &CancellationToken::new()).await;
                }
            }
        }
        Ok(())
    }

    fn load(&self, kind: &str, state: serde_json::Value) -> Result<Box<dyn Procedure>, String> {
        let loaders = self.loaders.read().expect("loaders poisoned");
        match loaders.get(kind) {
            Some(load) => load(state),
            None => Err(format!("this orchestrator does not know procedures of kind {kind}")),
        }
    }

    /// Announces this orchestrator as a cluster member (`orchestrators/<owner id>`, bound
    /// to its owner lease, so it disappears with the lease): `value` says what it is
    /// (endpoint, version, started-at). Written again with every lease renewal.
    pub fn announce(&self, value: serde_json::Value) {
        *self.member.lock().expect("member poisoned") = Some(value);
    }

    async fn put_member(&self) {
        let Some(value) = self.member.lock().expect("member poisoned").clone() else { return };
        let Ok(lease) = self.lease().await else { return };
        let bytes = serde_json::to_vec(&value).expect("members serialise");
        let txn = Txn::new().and_then(TxnOp::put_with_lease(keys::member(&self.config.owner_id), bytes, lease));
        if let Err(e) = self.store.txn(txn).await {
            tracing::warn!(error = %e, "cannot announce this orchestrator; retrying");
        }
    }

    /// The live members of the cluster (their announcements), and how many executions
    /// each owns now, by owner id.
    pub async fn members(&self) -> Result<(Vec<serde_json::Value>, HashMap<String, usize>), StoreError> {
        let (kvs, _) = self.store.range(keys::MEMBERS.as_bytes()).await?;
        let members = kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
        let (claims, _) = self.store.range(keys::OWNERS.as_bytes()).await?;
        let mut owned: HashMap<String, usize> = HashMap::new();
        for kv in claims {
            if let Some(o) = serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v["owner"].as_str().map(str::to_string))
            {
                *owned.entry(o).or_default() += 1;
            }
        }
        Ok((members, owned))
    }

    /// Takes ownership of an execution: absent claim (or our own stale one at
    /// `expected`) becomes ours; returns the new epoch.
    async fn claim(&self, id: &str, expected: Option<i64>) -> Result<Option<i64>, StoreError> {
        let lease = self.lease().await?;
        let key = keys::owner(id);
        let value = serde_json::json!({ "owner": self.config.owner_id, "lease": lease, "at_ms": now_ms() });
        let compare = match expected {
            None => Compare::Absent(key.clone().into_bytes()),
            Some(rev) => Compare::ModRevisionEquals(key.clone().into_bytes(), rev),
        };
        // Only while it is pending: a scan's list may be older than the execution's end.
        let txn = Txn::new()
            .when(compare)
            .when(Compare::Exists(keys::pending(id).into_bytes()))
            .and_then(TxnOp::put_with_lease(key, value.to_string(), lease));
        let resp = self.store.txn(txn).await?;
        Ok(resp.succeeded.then_some(resp.revision))
    }

    /// Persists a new execution with its locks and starts it here. Returns its id.
    pub async fn submit(self: &Arc<Self>, proc: Box<dyn Procedure>) -> Result<String, SubmitError> {
        Ok(self.submit_with(proc, Txn::new()).await?.0)
    }

    /// Like [`Manager::submit`], but a held lock is waited for (up to `patience`) instead
    /// of refused: `make` builds the procedure again for each try. The caller chooses:
    /// refuse at once ([`Manager::submit`]) or queue behind the holder (this).
    pub async fn submit_waiting(
        self: &Arc<Self>,
        make: impl Fn() -> Box<dyn Procedure>,
        patience: Duration,
    ) -> Result<String, SubmitError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match self.submit(make()).await {
                Err(SubmitError::Locked { holder, key }) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(key = %key, holder = %holder, "waiting for a lock");
                    while self.get(&holder).await?.is_some_and(|h| !h.status.is_terminal())
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                other => return other,
            }
        }
    }

    /// Like [`Manager::submit`], with the caller's intent in the same transaction: its
    /// comparisons guard the submit and its writes land with it (DESIGN.md: intent
    /// first, one conditional transaction). Returns the execution id and the revision
    /// the transaction wrote at (the mod_revision of every key it wrote).
    pub async fn submit_with(
        self: &Arc<Self>,
        proc: Box<dyn Procedure>,
        intent: Txn,
    ) -> Result<(String, i64), SubmitError> {
        let id = uuid::Uuid::now_v7().to_string();
        self.submit_as(id, String::new(), proc, intent).await
    }

    /// Submits a child of `parent` under a deterministic id, so a parent resumed after a
    /// crash finds the children it already submitted instead of submitting them twice. A
    /// held lock is waited for (the child runs once its holder ended).
    async fn submit_child(
        self: &Arc<Self>,
        id: String,
        parent: &str,
        proc: Box<dyn Procedure>,
        token: &CancellationToken,
    ) -> Result<(), SubmitError> {
        if self.get(&id).await?.is_some() {
            return Ok(());
        }
        match self.submit_as(id.clone(), parent.to_string(), proc, Txn::new()).await {
            Ok(_) => Ok(()),
            Err(SubmitError::Locked { holder, key }) => {
                tracing::info!(child = %id, key = %key, holder = %holder, "child waits for a lock");
                // Wait for the holder to end; the step then runs again and submits the child.
                while self.get(&holder).await?.is_some_and(|h| !h.status.is_terminal()) {
                    if pause(Duration::from_millis(200), token).await {
                        break;
                    }
                }
                Err(SubmitError::Locked { key, holder })
            }
            Err(e) => Err(e),
        }
    }

    async fn submit_as(
        self: &Arc<Self>,
        id: String,
        parent: String,
        mut proc: Box<dyn Procedure>,
        intent: Txn,
    ) -> Result<(String, i64), SubmitError> {
        let locks = proc.locks();
        // State kept apart from the record is stored first: nothing reads it before the
        // record exists, and a submit that fails removes it again.
        let mut apart = proc.take_writes(&id);
        for chunk in apart.chunks(LOCKS_PER_TXN) {
            self.store.txn(Txn::new().and_then_all(chunk.iter().cloned())).await?;
        }
        // So is a lock list longer than a record lists: a part per transaction (each
        // part is up to about 60 KB).
        if locks.len() > LOCKS_IN_RECORD {
            for (n, part) in locks.chunks(LOCKS_PER_LIST).enumerate() {
                let put = TxnOp::put(keys::lock_list(&id, n), serde_json::to_vec(part).expect("locks serialise"));
                apart.push(put.clone());
                if let Err(e) = self.store.txn(Txn::new().and_then(put)).await {
                    self.remove_writes(&apart).await;
                    return Err(e.into());
                }
            }
        }
        let submitted = self.submit_record(id, parent, proc, intent, &locks).await;
        if submitted.is_err() && !apart.is_empty() {
            self.remove_writes(&apart).await;
        }
        submitted
    }

    /// Removes the keys `writes` put (best effort: a failed submit's leftovers).
    async fn remove_writes(&self, writes: &[TxnOp]) {
        for chunk in writes.chunks(LOCKS_PER_TXN) {
            let deletes = chunk.iter().filter_map(|op| match op {
                TxnOp::Put { key, .. } => Some(TxnOp::Delete { key: key.clone() }),
                _ => None,
            });
            if let Err(e) = self.store.txn(Txn::new().and_then_all(deletes)).await {
                tracing::warn!(error = %e, "could not remove the state a failed submit stored");
            }
        }
    }

    /// The submit itself: record, claim, pending mark and the first locks in one
    /// transaction (see [`Manager::submit_as`]).
    async fn submit_record(
        self: &Arc<Self>,
        id: String,
        parent: String,
        proc: Box<dyn Procedure>,
        intent: Txn,
        locks: &[String],
    ) -> Result<(String, i64), SubmitError> {
        let now = now_ms();
        // A child is part of its parent's trace (known here when the parent runs here, as
        // a runbook submitting its groups' executions does); anything else starts one.
        let local = self.running.lock().expect("running poisoned").get(&parent).map(|(_, _, t)| t.clone());
        let trace_id = match (parent.is_empty(), local) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => self.get(&parent).await?.map(|p| p.trace_id).filter(|t| !t.is_empty()),
        }
        .unwrap_or_else(new_trace_id);
        let rec = ExecutionRec {
            id: id.clone(),
            kind: proc.kind().to_string(),
            summary: proc.summary(),
            status: ExecutionStatus::Running,
            state: proc.dump(),
            step: proc.step(),
            steps: Vec::new(),
            locks: if locks.len() > LOCKS_IN_RECORD { Vec::new() } else { locks.to_vec() },
            locks_apart: if locks.len() > LOCKS_IN_RECORD { locks.len() as u32 } else { 0 },
            created_ms: now,
            updated_ms: now,
            output: serde_json::Value::Null,
            error: String::new(),
            cancel_requested: false,
            // The submitter's claim is part of the submit, so the record names it from
            // the start; the epoch (the submit's revision) is known only after it, and
            // the first step's write records it.
            epoch: 0,
            owner: self.config.owner_id.clone(),
            claims: 1,
            parent,
            children: Vec::new(),
            paused: false,
            project: proc.project(),
            trace_id,
        };
        // Locks beyond what one transaction holds are taken after the record is written
        // (see `acquire_rest`); the execution is not pending (runnable) until then.
        let (first, rest) = locks.split_at(locks.len().min(LOCKS_PER_TXN));
        // The submitter's claim is part of the submit, so no other member's scan can
        // take a new execution between its being made pending and its being claimed;
        // the epoch is the submit's revision (the claim key's mod revision).
        let lease = self.lease().await?;
        let _submitting = Submitting::new(self, &id);
        let claim = serde_json::json!({ "owner": self.config.owner_id, "lease": lease, "at_ms": now });
        let mut txn = intent
            .when(Compare::Absent(keys::execution(&id).into_bytes()))
            .and_then(TxnOp::put(keys::execution(&id), encode(&rec)))
            .and_then(TxnOp::put_with_lease(keys::owner(&id), claim.to_string(), lease))
            .and_then(match rest.is_empty() {
                true => TxnOp::put(keys::pending(&id), rec.project.clone()),
                false => TxnOp::put(keys::acquiring(&id), now.to_string()),
            })
            .and_then_all(index_writes(&id, &rec.project));
        for l in first {
            txn = txn.when(Compare::Absent(keys::lock(l).into_bytes())).and_then(TxnOp::put(keys::lock(l), id.clone()));
        }
        let mut resp = self.store.txn(txn.clone()).await?;
        if !resp.succeeded && self.free_stale_locks(first).await? {
            resp = self.store.txn(txn).await?;
        }
        if !resp.succeeded {
            return Err(self.locked(first, &id).await?);
        }
        let epoch = resp.revision;
        if !rest.is_empty() {
            match self.acquire_rest(&id, &rec.project, rest).await {
                Ok(revision) => resp.revision = revision,
                Err(e) => {
                    self.abandon(&id, locks, true).await;
                    return Err(e);
                }
            }
        }
        tracing::info!(execution = %id, kind = %rec.kind, summary = %rec.summary, epoch, "execution submitted");
        if let Some(hook) = self.started.read().expect("start hook").clone() {
            hook(&rec);
        }
        // Run it here at once. Should the lease lapse meanwhile, the claim goes with it:
        // this run's first write is refused and recovery (here or elsewhere) runs it.
        self.spawn_run(id.clone(), proc, epoch, &rec, true);
        Ok((id, resp.revision))
    }

    /// Why a transaction taking `locks` for `id` failed: the first lock another
    /// execution holds, or a conflict with the caller's own comparisons.
    async fn locked(&self, locks: &[String], id: &str) -> Result<SubmitError, StoreError> {
        for l in locks {
            if let Some(kv) = self.store.get(keys::lock(l).as_bytes()).await?
                && kv.value != id.as_bytes()
            {
                return Ok(SubmitError::Locked {
                    key: l.clone(),
                    holder: String::from_utf8_lossy(&kv.value).into_owned(),
                });
            }
        }
        Ok(SubmitError::Conflict)
    }

    /// The execution holding `lock`, if one that has not ended does. A lock whose holder
    /// ended (its locks are freed after its end when they did not fit the end's
    /// transaction, and a crash can fall in between) or never came to be is freed here.
    pub async fn lock_holder(&self, lock: &str) -> Result<Option<String>, StoreError> {
        let Some(kv) = self.store.get(keys::lock(lock).as_bytes()).await? else { return Ok(None) };
        let holder = String::from_utf8_lossy(&kv.value).into_owned();
        let live = match self.get(&holder).await? {
            Some(rec) => !rec.status.is_terminal(),
            // No record: the holder is mid-submit only while its acquisition is marked.
            None => self.store.get(keys::acquiring(&holder).as_bytes()).await?.is_some(),
        };
        if live {
            return Ok(Some(holder));
        }
        let free = Txn::new()
            .when(Compare::ModRevisionEquals(kv.key.clone(), kv.mod_revision))
            .and_then(TxnOp::delete(kv.key.clone()));
        self.store.txn(free).await?;
        tracing::info!(lock, holder = %holder, "freed a lock its ended execution left");
        Ok(None)
    }

    /// Frees the locks among `locks` whose holders ended; whether any was freed.
    async fn free_stale_locks(&self, locks: &[String]) -> Result<bool, StoreError> {
        let mut freed = false;
        for l in locks {
            if self.store.get(keys::lock(l).as_bytes()).await?.is_some() && self.lock_holder(l).await?.is_none() {
                freed = true;
            }
        }
        Ok(freed)
    }

    /// Takes the locks that did not fit the submit's transaction, a transaction per
    /// [`LOCKS_PER_TXN`], each only while the acquisition is still marked (a scan that
    /// gives up a stalled acquisition removes the mark first); then makes the execution
    /// pending. Returns the last transaction's revision.
    async fn acquire_rest(&self, id: &str, project: &str, rest: &[String]) -> Result<i64, SubmitError> {
        let mark = keys::acquiring(id).into_bytes();
        for chunk in rest.chunks(LOCKS_PER_TXN) {
            let mut txn = Txn::new().when(Compare::Exists(mark.clone()));
            for l in chunk {
                txn = txn
                    .when(Compare::Absent(keys::lock(l).into_bytes()))
                    .and_then(TxnOp::put(keys::lock(l), id.to_string()));
            }
            let mut r = self.store.txn(txn.clone()).await?;
            if !r.succeeded && self.free_stale_locks(chunk).await? {
                r = self.store.txn(txn).await?;
            }
            if !r.succeeded {
                return Err(self.locked(chunk, id).await?);
            }
        }
        let start = Txn::new()
            .when(Compare::Exists(mark.clone()))
            .and_then(TxnOp::put(keys::pending(id), project.to_string()))
            .and_then(TxnOp::delete(mark));
        let r = self.store.txn(start).await?;
        if !r.succeeded {
            return Err(SubmitError::Conflict);
        }
        Ok(r.revision)
    }

    /// Undoes a submit whose locks could not all be taken: the mark goes first (so no
    /// further lock is taken for it), then every lock it holds, then its record and
    /// claim. The mark is removed only if it is still there: a scan that read it before
    /// the submitter finished (`own` false) must not undo an execution that started.
    async fn abandon(&self, id: &str, locks: &[String], own: bool) {
        let mark = keys::acquiring(id);
        let unmark = Txn::new().when(Compare::Exists(mark.clone().into_bytes())).and_then(TxnOp::delete(mark));
        match self.store.txn(unmark).await {
            Ok(r) if !r.succeeded && !own => return,
            Ok(_) => {}
            Err(e) => {
                // The mark stays, so a later scan gives the acquisition up again.
                tracing::warn!(execution = %id, error = %e, "could not give up the execution's locks; a later scan will");
                return;
            }
        }
        self.release(id, locks).await;
        // Its index entries go too (the project's is named by the record, if readable).
        let project = self.get(id).await.ok().flatten().map(|r| r.project).unwrap_or_default();
        let forget = Txn::new()
            .and_then(TxnOp::delete(keys::execution(id)))
            .and_then(TxnOp::delete(keys::owner(id)))
            .and_then(TxnOp::delete(keys::pending(id)))
            .and_then(TxnOp::DeletePrefix { prefix: keys::apart(id).into_bytes() })
            .and_then_all(index_writes(id, &project).into_iter().filter_map(|op| match op {
                TxnOp::Put { key, .. } => Some(TxnOp::Delete { key }),
                _ => None,
            }));
        if let Err(e) = self.store.txn(forget).await {
            tracing::warn!(execution = %id, error = %e, "could not delete an abandoned execution's record");
        }
        tracing::info!(execution = %id, "gave up taking the execution's locks");
    }

    /// Every lock `rec` holds: its own list, or the one kept apart.
    pub async fn locks_of(&self, rec: &ExecutionRec) -> Result<Vec<String>, StoreError> {
        if rec.locks_apart == 0 {
            return Ok(rec.locks.clone());
        }
        let (parts, _) = self.store.range(keys::lock_lists(&rec.id).as_bytes()).await?;
        let mut locks = Vec::with_capacity(rec.locks_apart as usize);
        for part in parts {
            let list: Vec<String> = serde_json::from_slice(&part.value).map_err(|e| {
                StoreError::Internal(format!("the lock list of execution {} is unreadable: {e}", rec.id))
            })?;
            locks.extend(list);
        }
        if locks.len() != rec.locks_apart as usize {
            return Err(StoreError::Internal(format!(
                "execution {} holds {} locks and {} are listed",
                rec.id,
                rec.locks_apart,
                locks.len()
            )));
        }
        Ok(locks)
    }

    /// Deletes those of `locks` that `id` holds, each compared with its holder, so a
    /// lock someone else took since is left alone. [`LOCKS_PER_TXN`] go in one
    /// transaction while `id` holds all of them (a run over a site frees one per group);
    /// when one of them is no longer `id`'s, that batch goes a lock at a time.
    async fn release(&self, id: &str, locks: &[String]) {
        let held = |l: &String| Compare::ValueEquals(keys::lock(l).into_bytes(), id.as_bytes().to_vec());
        for chunk in locks.chunks(LOCKS_PER_TXN) {
            if chunk.len() > 1 {
                let all = chunk.iter().fold(Txn::new(), |t, l| t.when(held(l)).and_then(TxnOp::delete(keys::lock(l))));
                if matches!(self.store.txn(all).await, Ok(r) if r.succeeded) {
                    continue;
                }
            }
            for l in chunk {
                let txn = Txn::new().when(held(l)).and_then(TxnOp::delete(keys::lock(l)));
                if let Err(e) = self.store.txn(txn).await {
                    tracing::warn!(execution = %id, lock = %l, error = %e, "could not free a lock; the next taker frees it");
                }
            }
        }
    }

    /// Gives up acquisitions marked for over a minute: their submitter died mid-way.
    async fn abandon_stalled(&self) -> Result<(), StoreError> {
        let (marks, _) = self.store.range(keys::ACQUIRING.as_bytes()).await?;
        for kv in marks {
            let id = String::from_utf8_lossy(&kv.key[keys::ACQUIRING.len()..]).into_owned();
            let since: i64 = String::from_utf8_lossy(&kv.value).parse().unwrap_or(0);
            if now_ms() - since < 60_000 {
                continue;
            }
            let locks = match self.get(&id).await? {
                Some(rec) => self.locks_of(&rec).await?,
                None => Vec::new(),
            };
            self.abandon(&id, &locks, false).await;
        }
        Ok(())
    }

    /// Runs an execution here: `rec` is its record as just written by the submit
    /// (`fresh`) or as read right after this member claimed it.
    fn spawn_run(self: &Arc<Self>, id: String, proc: Box<dyn Procedure>, epoch: i64, rec: &ExecutionRec, fresh: bool) {
        let token = self.shutdown.child_token();
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let me = self.clone();
        // The execution's span starts (or, resumed, continues) its trace; every step,
        // agent call and child below it carries the trace id.
        let trace = if rec.trace_id.is_empty() { new_trace_id() } else { rec.trace_id.clone() };
        self.running.lock().expect("running poisoned").insert(id.clone(), (run, token.clone(), trace.clone()));
        let group = rec.locks.iter().find_map(|l| l.strip_prefix("group/")).unwrap_or_default();
        let span = tracing::info_span!(parent: None, "execution", execution = %id, kind = %rec.kind, epoch, group, trace_id = %trace);
        let rec = rec.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                me.run(&id, proc, epoch, token.clone(), rec, fresh).await;
                let mut running = me.running.lock().expect("running poisoned");
                // Remove only our own entry: a later claim may have replaced it.
                if running.get(&id).is_some_and(|(r, _, _)| *r == run) {
                    running.remove(&id);
                }
            },
            span,
        ));
    }

    /// Runs an execution's steps while this member's claim stands. Only the owner writes
    /// the record (each write compares the claim), so the record is read once, before
    /// the run, not again at every step.
    async fn run(
        self: &Arc<Self>,
        id: &str,
        mut proc: Box<dyn Procedure>,
        epoch: i64,
        token: CancellationToken,
        mut rec: ExecutionRec,
        fresh: bool,
    ) {
        if rec.status.is_terminal() {
            return;
        }
        rec.epoch = epoch;
        rec.owner = self.config.owner_id.clone();
        // A fresh submit wrote its record with its claim in the same transaction; a
        // resumed run records its claim before its first step.
        if !fresh {
            rec.claims += 1;
            if !self.persist(id, &mut rec, epoch, &token).await {
                return;
            }
        }
        let mut retry_wait = Duration::from_millis(200);
        loop {
            if token.is_cancelled() {
                return;
            }
            // Cancellation is its own key, so a cancel sent to any orchestrator counts and
            // no write of the record can lose it.
            if self.requested(id, Signal::Cancel).await {
                rec.status = ExecutionStatus::Cancelled;
                rec.cancel_requested = true;
                rec.error = format!("cancelled before step {}", proc.step());
                self.finish(id, rec, epoch, &token).await;
                return;
            }
            // Paused: no step starts (children already running go on) until resumed.
            let paused = self.requested(id, Signal::Pause).await;
            if paused != rec.paused {
                rec.paused = paused;
                tracing::info!(execution = %id, paused, "pause state changed");
                if !self.persist(id, &mut rec, epoch, &token).await {
                    return;
                }
            }
            if paused {
                if pause(Duration::from_millis(200), &token).await {
                    return;
                }
                continue;
            }
            // A step that started children resumes once every one of them has ended.
            let mut children = Vec::new();
            for child in rec.children.clone() {
                loop {
                    match self.get(&child).await {
                        Ok(Some(c)) if c.status.is_terminal() => {
                            children.push(c);
                            break;
                        }
                        Ok(None) => break,
                        _ => {}
                    }
                    if self.requested(id, Signal::Cancel).await {
                        let _ = self.cancel(&child).await;
                    }
                    if pause(Duration::from_millis(200), &token).await {
                        return;
                    }
                }
            }
            let step = proc.step();
            let started = now_ms();
            let ctx = Context { execution_id: id.to_string(), epoch, cancelled: token.clone(), children };
            let result = tokio::select! {
                biased;
                _ = token.cancelled() => return,
                r = tracing::Instrument::instrument(proc.execute(&ctx), tracing::info_span!("step", step = %step)) => r,
            };
            let mut writes = proc.take_writes(id);
            // A step that only saves its state carries the writes that fit in the record's
            // own transaction (one commit instead of two); any other outcome, or more
            // writes, stores them first.
            let with_record = matches!(result, Ok(Status::Executing { .. })) && writes.len() < LOCKS_PER_TXN;
            if !with_record && !self.save_writes(id, epoch, std::mem::take(&mut writes), &token).await {
                return;
            }
            let record_step = |rec: &mut ExecutionRec, note: String| {
                rec.steps.push(StepRec { name: step.clone(), started_ms: started, ended_ms: now_ms(), note, epoch });
            };
            match result {
                Ok(Status::Children { procedures, note }) => {
                    let base = format!("{id}-s{}", rec.steps.len());
                    let mut ids = Vec::new();
                    let mut restart_step = false;
                    for (n, child) in procedures.into_iter().enumerate() {
                        let cid = format!("{base}-{n}");
                        let mut child = Some(child);
                        while let Some(c) = child.take() {
                            match self.submit_child(cid.clone(), id, c, &token).await {
                                Ok(()) => {}
                                Err(_) if token.is_cancelled() => return,
                                Err(SubmitError::Locked { key, holder }) => {
                                    // The holder has ended: the step runs again and submits it.
                                    tracing::info!(child = %cid, key = %key, holder = %holder, "lock released; retrying the step");
                                    restart_step = true;
                                }
                                Err(e) => {
                                    // The child is gone with the error; the step runs again and
                                    // rebuilds it (children already submitted are found by id).
                                    tracing::warn!(child = %cid, error = %e, "could not start a child; retrying the step");
                                    rec.error = format!("starting child {cid}: {e}");
                                    let _ = self.persist(id, &mut rec, epoch, &token).await;
                                    if pause(retry_wait, &token).await {
                                        return;
                                    }
                                    retry_wait = (retry_wait * 2).min(Duration::from_secs(5));
                                    restart_step = true;
                                }
                            }
                        }
                        if restart_step {
                            break;
                        }
                        ids.push(cid);
                    }
                    if restart_step {
                        // The step runs again from the state persisted before it.
                        match self.load(&rec.kind, rec.state.clone()) {
                            Ok(p) => proc = p,
                            Err(e) => tracing::error!(error = %e, "cannot rebuild the procedure to retry its step"),
                        }
                        continue;
                    }
                    tracing::info!(step = %step, children = ids.len(), "step started children");
                    record_step(&mut rec, note);
                    rec.children = ids;
                    rec.state = proc.dump();
                    rec.step = proc.step();
                    rec.error.clear();
                    if !self.persist(id, &mut rec, epoch, &token).await {
                        return;
                    }
                }
                Ok(Status::Executing { note }) => {
                    tracing::info!(step = %step, note = %note, "step done");
                    // Rounds of one step (a runbook step over many groups returns after
                    // each batch) update one record, so the execution record does not
                    // grow with every round; a new owner's rounds get their own.
                    match rec.steps.last_mut() {
                        Some(last) if last.name == step && last.epoch == epoch => {
                            last.ended_ms = now_ms();
                            last.note = note;
                        }
                        _ => record_step(&mut rec, note),
                    }
                    rec.state = proc.dump();
                    rec.step = proc.step();
                    rec.error.clear();
                    rec.children.clear();
                    if !self.persist_with(id, &mut rec, epoch, &token, writes).await {
                        return;
                    }
                    retry_wait = Duration::from_millis(200);
                }
                Ok(Status::Done { output }) => {
                    tracing::info!(step = %step, "execution succeeded");
                    record_step(&mut rec, "done".into());
                    rec.state = proc.dump();
                    rec.status = ExecutionStatus::Succeeded;
                    rec.output = output;
                    rec.children.clear();
                    rec.error.clear();
                    self.finish(id, rec, epoch, &token).await;
                    return;
                }
                Err(ProcedureError::Fail(msg)) => {
                    tracing::warn!(step = %step, error = %msg, "execution failed");
                    record_step(&mut rec, format!("failed: {msg}"));
                    rec.state = proc.dump();
                    rec.status = ExecutionStatus::Failed;
                    rec.error = msg;
                    self.finish(id, rec, epoch, &token).await;
                    return;
                }
                Err(ProcedureError::Retry(msg)) => {
                    tracing::warn!(step = %step, error = %msg, "step will be retried");
                    rec.error = format!("retrying step {step}: {msg}");
                    if !self.persist(id, &mut rec, epoch, &token).await {
                        return;
                    }
                    let jitter = Duration::from_millis(fastrand::u64(0..100));
                    if pause(retry_wait + jitter, &token).await {
                        return;
                    }
                    retry_wait = (retry_wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Stores a procedure's [`Procedure::take_writes`], in transactions of at most
    /// [`LOCKS_PER_TXN`] operations, each only while the claim stands. False when the
    /// claim is gone or the store refuses them for good (the execution then stops here;
    /// a new owner resumes from the record and the writes stored before).
    async fn save_writes(&self, id: &str, epoch: i64, writes: Vec<TxnOp>, token: &CancellationToken) -> bool {
        for chunk in writes.chunks(LOCKS_PER_TXN) {
            let txn = Txn::new()
                .when(Compare::ModRevisionEquals(keys::owner(id).into_bytes(), epoch))
                .and_then_all(chunk.iter().cloned());
            match self.try_write(id, txn, token).await {
                Ok(true) => {}
                Ok(false) => return false,
                Err(why) => {
                    tracing::error!(execution = %id, error = %why, "the store refuses the execution's own writes");
                    return false;
                }
            }
        }
        true
    }

    /// Writes the record if our claim still stands; retries while the store is away.
    /// Returns false when the claim is gone (another owner has the execution), or when
    /// the store refuses the record for good (past its request limit): retrying could
    /// never succeed, so the execution ends as failed, without its state, saying why.
    async fn persist(&self, id: &str, rec: &mut ExecutionRec, epoch: i64, token: &CancellationToken) -> bool {
        self.persist_with(id, rec, epoch, token, Vec::new()).await
    }

    /// [`Manager::persist`], with `extra` writes (the procedure's, fewer than
    /// [`LOCKS_PER_TXN`]) in the same transaction.
    async fn persist_with(
        &self,
        id: &str,
        rec: &mut ExecutionRec,
        epoch: i64,
        token: &CancellationToken,
        extra: Vec<TxnOp>,
    ) -> bool {
        rec.updated_ms = now_ms();
        let txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::owner(id).into_bytes(), epoch))
            .and_then_all(extra)
            .and_then(TxnOp::put(keys::execution(id), encode(rec)));
        match self.try_write(id, txn, token).await {
            Ok(saved) => saved,
            Err(why) => {
                tracing::error!(execution = %id, error = %why, "the store refuses the execution's record; ending it as failed");
                let mut failed = rec.clone();
                failed.state = serde_json::Value::Null;
                failed.status = ExecutionStatus::Failed;
                failed.error = format!(
                    "the store refused this execution's record ({why}): it grew past what one store write holds; \
                     what its steps started is in its child executions (`drover execution list`); run it again over \
                     fewer groups"
                );
                self.finish(id, failed, epoch, token).await;
                false
            }
        }
    }

    /// Ends an execution: the record, the pending index, the locks and the claim go in
    /// one transaction that compares the claim.
    async fn finish(&self, id: &str, mut rec: ExecutionRec, epoch: i64, token: &CancellationToken) {
        rec.updated_ms = now_ms();
        rec.paused = false;
        // The locks that fit go with the end; the others are freed right after it (a
        // crash in between leaves them to `lock_holder`, which frees an ended holder's,
        // as it does should the list kept apart not be read).
        let locks = self.locks_of(&rec).await.unwrap_or_else(|e| {
            tracing::warn!(execution = %id, error = %e, "cannot read the execution's lock list; its next takers free them");
            Vec::new()
        });
        let (with_end, after) = locks.split_at(locks.len().min(LOCKS_PER_TXN));
        let hook = self.end_writes.read().expect("end writes hook").clone();
        let extra = hook.map(|h| h(&rec)).unwrap_or_default();
        let end = |rec: &ExecutionRec| {
            let mut txn = Txn::new()
                .when(Compare::ModRevisionEquals(keys::owner(id).into_bytes(), epoch))
                .and_then(TxnOp::put(keys::execution(id), encode(rec)))
                .and_then(TxnOp::delete(keys::pending(id)))
                .and_then(TxnOp::delete(keys::owner(id)))
                .and_then(TxnOp::delete(keys::cancel(id)))
                .and_then(TxnOp::delete(keys::pause(id)))
                .and_then(TxnOp::DeletePrefix { prefix: keys::decisions(id).into_bytes() });
            for l in with_end {
                txn = txn.and_then(TxnOp::delete(keys::lock(l)));
            }
            txn.and_then_all(extra.iter().cloned())
        };
        // Marked before the write, whose deletion of the claim the owners watch may see
        // before the write returns. A mark left behind (an end whose outcome was lost)
        // delays the resume of that execution to the next timed scan at most.
        self.ending.lock().expect("ending poisoned").insert(id.to_string());
        let ended = match self.try_write(id, end(&rec), token).await {
            Ok(ended) => ended,
            // The store refuses the end for good (a record past its request limit): end
            // it without its state and output, so it is not resumed and ended again and
            // again, and say what was dropped.
            Err(why) => {
                tracing::error!(execution = %id, error = %why, "the store refuses the execution's end; ending it without its state");
                rec.state = serde_json::Value::Null;
                rec.output = serde_json::Value::Null;
                rec.error = format!(
                    "{}the store refused this execution's full record ({why}); it ended {} without its state and \
                     output; its child executions keep their outcomes",
                    if rec.error.is_empty() { String::new() } else { format!("{}; ", rec.error) },
                    rec.status.as_str()
                );
                self.write(id, end(&rec), token).await
            }
        };
        if !ended {
            // Refused (the claim was lost): this end deleted nothing.
            self.ending.lock().expect("ending poisoned").remove(id);
        }
        if ended {
            self.release(id, after).await;
            tracing::info!(execution = %id, status = rec.status.as_str(), "execution ended");
            // The id first, so a follower woken below finds it.
            let _ = self.ended_ids.send(id.to_string());
            self.ends.notify_waiters();
            let hook = self.ended.read().expect("end hook").clone();
            if let Some(hook) = hook {
                hook(&rec);
            }
        }
    }

    /// Calls `hook` with every execution submitted to this orchestrator, right after its
    /// submit is stored (once per execution; children included).
    pub fn on_start(&self, hook: EndHook) {
        *self.started.write().expect("start hook") = Some(hook);
    }

    /// Woken (`notify_waiters`) each time an execution ends on this orchestrator, so a
    /// parent following its children here learns of an end at once instead of at its
    /// next poll. Ends elsewhere are not announced: followers still poll.
    pub fn ends(&self) -> &tokio::sync::Notify {
        &self.ends
    }

    /// The ids of executions that end on this orchestrator from now on, so a parent
    /// following many children reads only those that ended instead of every one at each
    /// wake. Ends elsewhere are not announced, and a receiver that falls more than
    /// `ENDED_IDS_KEPT` behind is told it lagged: followers still look at every child
    /// from time to time.
    pub fn subscribe_ends(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.ended_ids.subscribe()
    }

    /// Calls `hook` with every execution this orchestrator ends, right after its end is
    /// stored (once per end; not again if the orchestrator dies in between).
    pub fn on_end(&self, hook: EndHook) {
        *self.ended.write().expect("end hook") = Some(hook);
    }

    /// Asks `hook`, as each execution is about to end here, for writes to make in the
    /// end's own transaction: they are stored if and only if the end is, so a crash right
    /// after an end cannot lose them (as it can what [`Manager::on_end`] does). At most a
    /// few writes: the transaction also frees up to [`LOCKS_PER_TXN`] locks, and etcd
    /// refuses one of more than 128 operations.
    pub fn on_end_writes(&self, hook: EndWrites) {
        *self.end_writes.write().expect("end writes hook") = Some(hook);
    }

    async fn write(&self, id: &str, txn: Txn, token: &CancellationToken) -> bool {
        matches!(self.try_write(id, txn, token).await, Ok(true))
    }

    /// [`Manager::write`], telling a write the store refuses for good (`Err`: a record
    /// past its request limit) from one the claim lost (`Ok(false)`).
    async fn try_write(&self, id: &str, txn: Txn, token: &CancellationToken) -> Result<bool, String> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.store.txn(txn.clone()).await {
                Ok(r) if r.succeeded => return Ok(true),
                Ok(_) => {
                    tracing::warn!(execution = %id, "the claim on this execution is gone; another owner has it");
                    return Ok(false);
                }
                Err(StoreError::Invalid(m)) => return Err(m),
                Err(e) => tracing::warn!(execution = %id, error = %e, "persisting the execution failed; retrying"),
            }
            if pause(wait, token).await {
                return Ok(false);
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// One execution.
    /// The executions that have not ended (read through the pending index).
    pub async fn running(&self) -> Result<Vec<ExecutionRec>, StoreError> {
        let (index, _) = self.store.range(keys::PENDING.as_bytes()).await?;
        let mut out = Vec::new();
        for kv in index {
            let id = String::from_utf8_lossy(&kv.key[keys::PENDING.len()..]).into_owned();
            if let Some(rec) = self.get(&id).await? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// How many executions of `project` have not ended, from the pending index alone
    /// (its value names the project; an entry written before it did is read through
    /// its record).
    pub async fn running_in(&self, project: &str) -> Result<usize, StoreError> {
        let (index, _) = self.store.range(keys::PENDING.as_bytes()).await?;
        let mut n = 0;
        for kv in index {
            if !kv.value.is_empty() {
                n += usize::from(kv.value == project.as_bytes());
                continue;
            }
            let id = String::from_utf8_lossy(&kv.key[keys::PENDING.len()..]).into_owned();
            if let Some(rec) = self.get(&id).await? {
                n += usize::from(rec.project == project && !rec.status.is_terminal());
            }
        }
        Ok(n)
    }

    pub async fn get(&self, id: &str) -> Result<Option<ExecutionRec>, StoreError> {
        match self.store.get(keys::execution(id).as_bytes()).await? {
            Some(kv) => Ok(Some(decode(&kv.value)?)),
            None => Ok(None),
        }
    }

    /// Puts every execution written before the newest-first index existed into it, once
    /// (marked done by [`keys::NEWEST_BUILT`]); retried while the store is away.
    async fn build_index(self: Arc<Self>) {
        let mut wait = Duration::from_millis(200);
        loop {
            match self.try_build_index().await {
                Ok(n) => {
                    if n > 0 {
                        tracing::info!(executions = n, "indexed the executions written before the index existed");
                    }
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "building the execution index failed; retrying"),
            }
            if pause(wait, &self.shutdown).await {
                return;
            }
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }

    async fn try_build_index(&self) -> Result<usize, StoreError> {
        if self.store.get(keys::NEWEST_BUILT.as_bytes()).await?.is_some() {
            return Ok(0);
        }
        let (mut after, mut n) = (Vec::new(), 0);
        loop {
            let page = self.store.range_page(keys::EXECUTIONS.as_bytes(), &after, 200).await?;
            let mut ops = Vec::new();
            for kv in &page.kvs {
                let rec = decode(&kv.value)?;
                ops.extend(index_writes(&rec.id, &rec.project));
                n += 1;
            }
            for chunk in ops.chunks(LOCKS_PER_TXN) {
                self.store.txn(Txn::new().and_then_all(chunk.iter().cloned())).await?;
            }
            match page.kvs.last() {
                Some(last) if page.more => after = last.key.clone(),
                _ => break,
            }
        }
        self.store.put(keys::NEWEST_BUILT.as_bytes(), b"1").await?;
        Ok(n)
    }

    /// One page of executions, newest first: of every project (`project` None) or of
    /// one, after the execution `after` (empty: from the newest), at most `limit`; the
    /// id to go on from (the page's last index entry, also when its record is gone:
    /// an entry left by an abandoned submit must not stall a listing), empty when no
    /// more follow.
    pub async fn list_page(
        &self,
        project: Option<&str>,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<ExecutionRec>, String), StoreError> {
        let scope = project.map_or_else(|| "all".to_string(), keys::project_scope);
        let prefix = keys::newest_scope(&scope);
        let start = if after.is_empty() { Vec::new() } else { keys::newest(&scope, after).into_bytes() };
        let page = self.store.range_page(prefix.as_bytes(), &start, limit).await?;
        let ids: Vec<String> = page.kvs.iter().map(|kv| String::from_utf8_lossy(&kv.value).into_owned()).collect();
        let next = if page.more { ids.last().cloned().unwrap_or_default() } else { String::new() };
        let recs: Vec<Result<Option<ExecutionRec>, StoreError>> =
            futures::stream::iter(ids).map(|id| async move { self.get(&id).await }).buffered(16).collect().await;
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            if let Some(rec) = r? {
                out.push(rec);
            }
        }
        Ok((out, next))
    }

    /// Deletes executions that ended more than `retention` ago: the record, its index
    /// entries and the state it kept apart, each only if the record is still as read.
    /// Executions are read oldest first (ids are time-ordered) until one newer than
    /// the horizon; running ones are kept whatever their age. Returns how many went.
    pub async fn prune_ended(&self, retention: Duration) -> Result<usize, StoreError> {
        let horizon = now_ms() - retention.as_millis() as i64;
        let (mut after, mut pruned) = (Vec::new(), 0);
        loop {
            let page = self.store.range_page(keys::EXECUTIONS.as_bytes(), &after, 200).await?;
            for kv in &page.kvs {
                let rec = decode(&kv.value)?;
                if rec.created_ms >= horizon {
                    return Ok(pruned);
                }
                if !rec.status.is_terminal() || rec.updated_ms >= horizon {
                    continue;
                }
                let mut txn = Txn::new()
                    .when(Compare::ModRevisionEquals(kv.key.clone(), kv.mod_revision))
                    .and_then(TxnOp::delete(kv.key.clone()))
                    .and_then(TxnOp::DeletePrefix { prefix: keys::apart(&rec.id).into_bytes() });
                for op in index_writes(&rec.id, &rec.project) {
                    if let TxnOp::Put { key, .. } = op {
                        txn = txn.and_then(TxnOp::Delete { key });
                    }
                }
                if self.store.txn(txn).await?.succeeded {
                    pruned += 1;
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => after = last.key.clone(),
                _ => return Ok(pruned),
            }
        }
    }

    /// Deletes the kept-apart state (`execution-items/<id>/`) of executions that have no
    /// record and were submitted over `min_age` ago: a submit stores its items before the
    /// transaction that writes the record, and a submitter that died between the two left
    /// them behind where [`Manager::prune_ended`] (which finds state through records)
    /// never looks. Skips from one execution's items to the next (one bounded read per
    /// execution, not per item); an id that is not a time-ordered UUID is never taken
    /// for old. Each delete is one transaction that compares the record's absence.
    /// Returns the executions swept.
    pub async fn sweep_orphan_items(&self, min_age: Duration) -> Result<usize, StoreError> {
        let horizon = now_ms() - min_age.as_millis() as i64;
        let (mut after, mut swept) = (Vec::new(), 0);
        loop {
            let page = self.store.range_page(keys::APART.as_bytes(), &after, 1).await?;
            let Some(kv) = page.kvs.first() else { return Ok(swept) };
            let rest = String::from_utf8_lossy(&kv.key[keys::APART.len()..]).into_owned();
            let id = rest.split('/').next().unwrap_or_default().to_string();
            // Past every key of this execution: its prefix ends in '/', and 0xff sorts
            // after any UTF-8 byte of an item's name.
            after = keys::apart(&id).into_bytes();
            after.push(0xff);
            let submitted_ms = uuid::Uuid::parse_str(&id).ok().and_then(|u| u.get_timestamp()).map(|t| {
                let (s, n) = t.to_unix();
                s as i64 * 1000 + i64::from(n / 1_000_000)
            });
            if submitted_ms.is_none_or(|ms| ms >= horizon) {
                continue;
            }
            // One conditional transaction: it deletes only while the record is absent.
            let txn = Txn::new()
                .when(Compare::Absent(keys::execution(&id).into_bytes()))
                .and_then(TxnOp::DeletePrefix { prefix: keys::apart(&id).into_bytes() });
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(execution = %id, "deleted the items of a submit that never wrote its record");
                swept += 1;
            }
        }
    }

    /// Every execution, newest first.
    pub async fn list(&self) -> Result<Vec<ExecutionRec>, StoreError> {
        let (kvs, _) = self.store.range(keys::EXECUTIONS.as_bytes()).await?;
        let mut out: Vec<ExecutionRec> = kvs.iter().map(|kv| decode(&kv.value)).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(out)
    }

    /// Asks a running execution to stop at its next step boundary.
    pub async fn cancel(&self, id: &str) -> Result<ExecutionRec, SubmitError> {
        let rec = self.get(id).await?.ok_or_else(|| SubmitError::NotFound(id.to_string()))?;
        if rec.status.is_terminal() {
            return Err(SubmitError::Ended { id: id.to_string(), status: rec.status.as_str().into() });
        }
        // Only while the execution is pending: a cancel key never outlives its execution.
        let txn = Txn::new()
            .when(Compare::Exists(keys::pending(id).into_bytes()))
            .and_then(TxnOp::put(keys::cancel(id), Vec::new()));
        if !self.store.txn(txn).await?.succeeded {
            let status = self.get(id).await?.map_or("ended".to_string(), |r| r.status.as_str().to_string());
            return Err(SubmitError::Ended { id: id.to_string(), status });
        }
        self.cancels.note(&keys::cancel(id), true);
        Ok(ExecutionRec { cancel_requested: true, ..rec })
    }

    /// The execution's record each time it changes, starting with the current one, until
    /// it ends; while it runs, at most one update per [`WATCH_PACE`] (the latest state: a
    /// run over thousands of groups saves its record several times a second, and what a
    /// watcher makes of each update can cost more than the save). The end is sent at once.
    /// Falls back to polling when the store's watch breaks.
    pub fn watch(self: &Arc<Self>, id: &str) -> futures::stream::BoxStream<'static, Result<ExecutionRec, StoreError>> {
        let me = self.clone();
        let id = id.to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<ExecutionRec> = None;
            let mut sent_at: Option<tokio::time::Instant> = None;
            loop {
                let current = match me.store.get(keys::execution(&id).as_bytes()).await {
                    Ok(Some(kv)) => decode(&kv.value).map(|r| (r, kv.mod_revision)),
                    Ok(None) => Err(StoreError::Invalid(format!("execution {id} not found"))),
                    Err(e) => Err(e),
                };
                let (rec, rev) = match current {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                // Wake on the next change of the record (or after `after` regardless).
                let changed = |after: Duration| {
                    let me = me.clone();
                    let key = keys::execution(&id);
                    async move {
                        tokio::select! {
                            _ = async {
                                if let Ok(mut events) = me.store.watch(key.as_bytes(), rev + 1).await {
                                    let _ = events.next().await;
                                } else {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            } => {}
                            _ = tokio::time::sleep(after) => {}
                        }
                    }
                };
                if last.as_ref() != Some(&rec) {
                    let ended = rec.status.is_terminal();
                    let early = sent_at.map_or(Duration::ZERO, |t| WATCH_PACE.saturating_sub(t.elapsed()));
                    if !ended && !early.is_zero() {
                        // Too soon after the last update: send the state as it is once the
                        // pace allows, or the end as soon as it comes.
                        tokio::select! {
                            _ = changed(early) => {}
                            _ = tx.closed() => return,
                        }
                        continue;
                    }
                    if tx.send(Ok(rec.clone())).await.is_err() || ended {
                        return;
                    }
                    last = Some(rec);
                    sent_at = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    _ = changed(Duration::from_secs(2)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        tokio_stream_from(rx)
    }

    /// Waits until the execution ends, or `timeout` passes; returns its latest record.
    pub async fn wait(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<ExecutionRec, StoreError> {
        let mut stream = self.watch(id);
        let mut latest = None;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                next = stream.next() => match next {
                    Some(Ok(rec)) => {
                        let ended = rec.status.is_terminal();
                        latest = Some(rec);
                        if ended { break; }
                    }
                    Some(Err(e)) => return Err(e),
                    None => break,
                }
            }
        }
        match latest {
            Some(r) => Ok(r),
            None => self.get(id).await?.ok_or_else(|| StoreError::Invalid(format!("execution {id} not found"))),
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> futures::stream::BoxStream<'static, T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[cfg(test)]
mod tests;
