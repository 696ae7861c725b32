//! A runbook run: a procedure of the engine whose state is the plan, each step's items
//! and their outcomes. Group steps submit the same group executions `drover group …`
//! does (as this run's children) and follow them, tier by tier, a bounded number at a
//! time; the engine persists the state after every round, so a run resumed by another
//! orchestrator goes on from where the last one was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, Decision, Procedure, ProcedureError, Status, keys as ekeys};
use drover_proto::v1 as pb;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::kinds::StepKind;
use super::plan::{Item, PlannedStep};
use super::schema::{Loaded, Runbook, Step};
use super::steps;
use crate::model::{GroupRec, keys, now_ms};
use crate::procedures::step_error;
use crate::repo::Versioned;
use crate::service::Core;

/// The procedure kind.
pub const KIND: &str = "runbook";

/// Items of one step checked, submitted or read at once within a pass: a refill's
/// submits all go at once (on etcd, their transactions then share commits).
const ITEM_CONCURRENCY: usize = 64;

/// Item writes in one transaction of `save_intents` (etcd allows 128 operations).
const INTENTS_PER_TXN: usize = 100;

/// A step's progress and outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub kind: String,
    /// pending, running, succeeded, failed, rejected, not-run.
    pub status: String,
    #[serde(default)]
    pub started_ms: i64,
    #[serde(default)]
    pub ended_ms: i64,
    #[serde(default)]
    pub note: String,
    /// The step's items: in memory while the run runs; in the record only until the
    /// run is submitted (see [`RunState::items_apart`]).
    #[serde(default)]
    pub items: Vec<Item>,
    /// A prompt's decision.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// What a prompt showed (per group, whose changes a failback would discard).
    #[serde(default)]
    pub shown: Vec<String>,
    /// A wait's deadline.
    #[serde(default)]
    pub until_ms: i64,
    /// How many of the step's items are in each status, per tier, as of the record's
    /// last save: kept in the record for the step the run is at (when its items are kept
    /// apart), so a watch update need not read every item to count them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub item_counts: Vec<ItemCount>,
}

/// One row of [`StepState::item_counts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCount {
    pub tier: u32,
    pub status: String,
    pub n: usize,
}

/// Counts `items` per tier and status, in tier then status order.
fn count_items(items: &[Item]) -> Vec<ItemCount> {
    let mut counts: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for i in items {
        *counts.entry((i.tier, i.status.as_str())).or_default() += 1;
    }
    counts.into_iter().map(|((tier, status), n)| ItemCount { tier, status: status.to_string(), n }).collect()
}

/// A test clone a `test-clone` step made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestCloneRec {
    pub step: String,
    pub group: String,
    pub volume_id: String,
    pub backend: String,
    pub clone_id: String,
    pub uri: String,
    pub recovery_point_id: String,
    #[serde(default)]
    pub deleted: bool,
}

/// The persisted state of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub file: String,
    pub params: BTreeMap<String, String>,
    pub runbook: Runbook,
    pub steps: Vec<StepState>,
    /// Index of the step running now (`steps.len()` once all ran).
    pub at: usize,
    pub started_ms: i64,
    /// Test clones made so far (and whether removed).
    #[serde(default)]
    pub clones: Vec<TestCloneRec>,
    /// Why the run failed, while its test-cleanup steps still run (clones never outlive
    /// a run that made them, whatever ended it).
    #[serde(default)]
    pub failing: Option<String>,
    /// The project of the member who ran it (its execution is then that project's);
    /// empty when an admin ran it.
    #[serde(default)]
    pub project: String,
    /// Adoption plans made by adopt-plan steps, and the executions applying them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adoptions: Vec<AdoptionRec>,
    /// The items live under [`items_prefix`] (a key each), not in this record, which
    /// then stays the same size however many groups the run moves. Set when the run is
    /// submitted; records written before it kept their items inline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub items_apart: bool,
}

/// Where a run's items are kept: `execution-items/<id>/<step>/<item>`, indexes
/// zero-padded so a range reads them in order.
pub fn items_prefix(execution_id: &str) -> String {
    ekeys::apart(execution_id)
}

fn item_key(execution_id: &str, step: usize, item: usize) -> String {
    format!("{}{step:03}/{item:06}", items_prefix(execution_id))
}

/// The step and item indexes of a key under [`items_prefix`].
fn item_position(key: &[u8], prefix: &str) -> Option<(usize, usize)> {
    let rest = std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?).ok()?;
    let (step, item) = rest.split_once('/')?;
    Some((step.parse().ok()?, item.parse().ok()?))
}

/// Reads every item of a run from the store, per step, in order.
async fn read_items(store: &dyn drover_store::KvStore, execution_id: &str) -> Result<Vec<Vec<Item>>, String> {
    let prefix = items_prefix(execution_id);
    let (kvs, _) = store.range(prefix.as_bytes()).await.map_err(|e| e.to_string())?;
    items_of(execution_id, &prefix, kvs)
}

/// The first `cap` items of each of `steps` steps (one bounded read per step), and for
/// each step whether it has more.
async fn read_first_items(
    store: &dyn drover_store::KvStore,
    execution_id: &str,
    steps: std::ops::Range<usize>,
    cap: usize,
) -> Result<Vec<(Vec<Item>, bool)>, String> {
    let prefix = items_prefix(execution_id);
    let reads = steps.map(|s| {
        let (prefix, range) = (prefix.clone(), format!("{prefix}{s:03}/"));
        async move {
            let page = store.range_page(range.as_bytes(), &[], cap).await.map_err(|e| e.to_string())?;
            let more = page.more;
            let mut items = items_of(execution_id, &prefix, page.kvs)?;
            Ok::<_, String>((items.pop().unwrap_or_default(), more))
        }
    });
    futures::future::try_join_all(reads).await
}

/// Items decoded from their keys, by step, in order; a gap is an error.
fn items_of(execution_id: &str, prefix: &str, kvs: Vec<drover_store::KeyValue>) -> Result<Vec<Vec<Item>>, String> {
    let mut steps: Vec<Vec<Item>> = Vec::new();
    for kv in kvs {
        let Some((step, n)) = item_position(&kv.key, prefix) else { continue };
        let item: Item = serde_json::from_slice(&kv.value)
            .map_err(|e| format!("item {step}/{n} of execution {execution_id} is unreadable: {e}"))?;
        if steps.len() <= step {
            steps.resize_with(step + 1, Vec::new);
        }
        if steps[step].len() != n {
            return Err(format!("execution {execution_id} lacks item {} of step {step}", steps[step].len()));
        }
        steps[step].push(item);
    }
    Ok(steps)
}

/// A runbook execution's record as readers want it: with its items put back in its
/// state when they are kept apart (one range read). Other kinds are returned as they are.
pub async fn with_items(
    store: &dyn drover_store::KvStore,
    mut rec: drover_procedure::ExecutionRec,
) -> Result<drover_procedure::ExecutionRec, String> {
    if !items_apart(&rec) {
        return Ok(rec);
    }
    let items = read_items(store, &rec.id).await?;
    if let Some(steps) = rec.state.get_mut("steps").and_then(|s| s.as_array_mut()) {
        for (step, items) in steps.iter_mut().zip(items) {
            step["items"] = serde_json::to_value(items).map_err(|e| e.to_string())?;
        }
    }
    Ok(rec)
}

/// The most items of one step a watch update carries.
pub const WATCHED_ITEMS: usize = 500;

/// What a watcher shows: while the run runs, the first [`WATCHED_ITEMS`] items of the
/// step it is at, with `"item_counts"`: how many of its items are in each status, per
/// tier (`[{"tier", "status", "n"}]`, every item counted, as of the record's last save;
/// records from before the counts were kept are counted from every item); once it ended, the first
/// [`WATCHED_ITEMS`] of every step. A step with more gets `"items_more": true`;
/// `ListExecutionItems` (or `GetExecution`) gives them all. A watch gets an update per
/// saved round (every half second): a run over tens of thousands of groups would
/// otherwise send megabytes with each, past a client's message limit.
pub async fn with_current_items(
    store: &dyn drover_store::KvStore,
    mut rec: drover_procedure::ExecutionRec,
) -> Result<drover_procedure::ExecutionRec, String> {
    if !items_apart(&rec) {
        return Ok(rec);
    }
    let n = rec.state.get("steps").and_then(|s| s.as_array()).map_or(0, Vec::len);
    let at = rec.state.get("at").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let mut shown: Vec<(usize, Vec<Item>, bool, Option<serde_json::Value>)> = Vec::new();
    if rec.status.is_terminal() {
        let firsts = read_first_items(store, &rec.id, 0..n, WATCHED_ITEMS).await?;
        shown.extend(firsts.into_iter().enumerate().map(|(i, (items, more))| (i, items, more, None)));
    } else if at < n {
        let counted =
            rec.state["steps"][at].get("item_counts").is_some_and(|c| c.as_array().is_some_and(|c| !c.is_empty()));
        if counted {
            // The record counts the step's items: its first ones are enough.
            let (items, more) =
                read_first_items(store, &rec.id, at..at + 1, WATCHED_ITEMS).await?.pop().unwrap_or_default();
            shown.push((at, items, more, None));
        } else {
            // A record from before the counts were kept: every item is read to count them.
            let prefix = items_prefix(&rec.id);
            let (kvs, _) = store.range(format!("{prefix}{at:03}/").as_bytes()).await.map_err(|e| e.to_string())?;
            let mut items = items_of(&rec.id, &prefix, kvs)?.pop().unwrap_or_default();
            let counts = serde_json::to_value(count_items(&items)).map_err(|e| e.to_string())?;
            let more = items.len() > WATCHED_ITEMS;
            items.truncate(WATCHED_ITEMS);
            shown.push((at, items, more, Some(counts)));
        }
    }
    if let Some(steps) = rec.state.get_mut("steps").and_then(|s| s.as_array_mut()) {
        for (i, items, more, counts) in shown {
            steps[i]["items"] = serde_json::to_value(items).map_err(|e| e.to_string())?;
            if more {
                steps[i]["items_more"] = serde_json::Value::Bool(true);
            }
            if let Some(c) = counts {
                steps[i]["item_counts"] = c;
            }
        }
    }
    Ok(rec)
}

/// One page of step `step`'s items, each as JSON, after the item `page.marker` names
/// (its position in the step), and the marker of the next page (empty when none
/// follows). Reads only that page, whether the items are kept apart or in the record.
pub async fn items_page(
    store: &dyn drover_store::KvStore,
    rec: &drover_procedure::ExecutionRec,
    step: usize,
    page: &crate::repo::PageRequest,
) -> crate::error::ApiResult<(Vec<String>, String)> {
    let limit = page.limit()?;
    let after: Option<usize> = match page.marker.as_str() {
        "" => None,
        m => Some(m.parse().map_err(|_| {
            crate::error::ApiError::InvalidArgument(format!(
                "`marker` {m:?} is not a marker this server gave (pass the previous page's next_marker)"
            ))
        })?),
    };
    if items_apart(rec) {
        let range = format!("{}{step:03}/", items_prefix(&rec.id));
        let from = after.map(|n| format!("{range}{n:06}")).unwrap_or_default();
        let got = store.range_page(range.as_bytes(), from.as_bytes(), limit).await?;
        let next = match (got.more, got.kvs.last()) {
            (true, Some(last)) => {
                item_position(&last.key, &items_prefix(&rec.id)).map(|(_, n)| n.to_string()).unwrap_or_default()
            }
            _ => String::new(),
        };
        Ok((got.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.value).into_owned()).collect(), next))
    } else {
        let all = rec.state["steps"][step]["items"].as_array().cloned().unwrap_or_default();
        let start = after.map_or(0, |n| n + 1).min(all.len());
        let end = (start + limit).min(all.len());
        let next = if end < all.len() { (end - 1).to_string() } else { String::new() };
        Ok((all[start..end].iter().map(|v| v.to_string()).collect(), next))
    }
}

fn items_apart(rec: &drover_procedure::ExecutionRec) -> bool {
    rec.kind == KIND && rec.state.get("items_apart").and_then(|v| v.as_bool()) == Some(true)
}

/// An adoption plan a run made, and the execution that applies it (once submitted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdoptionRec {
    pub step: String,
    pub plan_id: String,
    #[serde(default)]
    pub execution_id: String,
}

/// A runbook run.
pub struct RunbookRun {
    pub(super) core: Arc<Core>,
    pub(super) state: RunState,
    /// Whether the items are in memory (a run loaded from a record that keeps them
    /// apart reads them at its first step).
    loaded: bool,
    /// Each step's items as last stored, so only changed ones are written again.
    saved: Vec<Vec<Item>>,
    /// The step the run was at when its items were last stored, if they were. Items
    /// change only in the step the run is at, so a save compares the steps from this
    /// one to the current one, not every step's items.
    saved_at: Option<usize>,
    /// Which children ended here: a pass reads the records of those only, and every
    /// running child's at its first pass, after a lag, and every
    /// [`FULL_CHECK_EVERY`] (children that run on another orchestrator).
    ends: Option<EndWatch>,
    /// Groups read as they were found able to move, by target, for the submit of their
    /// `starting` items in this process (see [`steps::start`]); never persisted.
    read: std::collections::HashMap<String, Versioned<GroupRec>>,
}

/// The executions that ended on this orchestrator since a run last looked at every child.
struct EndWatch {
    rx: tokio::sync::broadcast::Receiver<String>,
    ended: std::collections::HashSet<String>,
    last_full: tokio::time::Instant,
}

/// How often a fan-out reads every running child's record, whatever ended here.
const FULL_CHECK_EVERY: Duration = Duration::from_secs(2);

impl RunbookRun {
    /// A run of `loaded` over the items of `plan`.
    pub fn new(core: Arc<Core>, loaded: &Loaded, plan: Vec<PlannedStep>) -> Self {
        let steps = plan
            .into_iter()
            .map(|p| StepState {
                name: p.name,
                kind: p.kind,
                status: "pending".into(),
                started_ms: 0,
                ended_ms: 0,
                note: String::new(),
                items: p.items,
                decision: None,
                shown: Vec::new(),
                until_ms: 0,
                item_counts: Vec::new(),
            })
            .collect();
        let state = RunState {
            file: loaded.file.clone(),
            params: loaded.params.clone(),
            runbook: loaded.runbook.clone(),
            steps,
            at: 0,
            started_ms: now_ms(),
            clones: Vec::new(),
            failing: None,
            project: String::new(),
            adoptions: Vec::new(),
            items_apart: false,
        };
        Self { core, state, loaded: true, saved: Vec::new(), saved_at: None, ends: None, read: Default::default() }
    }

    /// The run as a member of `project` asked for it: its execution is that project's.
    pub fn for_project(mut self, project: &str) -> Self {
        self.state.project = project.to_string();
        self
    }

    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        let state: RunState = serde_json::from_value(state).map_err(|e| e.to_string())?;
        let loaded = !state.items_apart;
        Ok(Self { core, state, loaded, saved: Vec::new(), saved_at: None, ends: None, read: Default::default() })
    }

    /// Every group the run may touch.
    pub fn groups(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .state
            .runbook
            .steps
            .iter()
            .zip(&self.state.steps)
            .filter(|(def, _)| def.groups().is_some())
            .flat_map(|(_, s)| s.items.iter().map(|i| i.target.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Whether an operator asked this execution to stop or pause: then a round ends at
    /// once, so the engine sees it.
    pub(super) async fn signalled(&self, ctx: &Context) -> bool {
        let procedures = &self.core.procedures;
        procedures.requested(&ctx.execution_id, drover_procedure::Signal::Cancel).await
            || procedures.requested(&ctx.execution_id, drover_procedure::Signal::Pause).await
    }

    /// Takes the ends announced since the last pass; returns whether this pass must look
    /// at every running item (the first, after a lag, or a full check is due), which
    /// also forgets ends kept so far (the full look covers them).
    fn note_ends(&mut self, procedures: &drover_procedure::Manager) -> bool {
        let now = tokio::time::Instant::now();
        let w = self.ends.get_or_insert_with(|| EndWatch {
            rx: procedures.subscribe_ends(),
            ended: Default::default(),
            // Due at once: ends before the subscription are unknown.
            last_full: now - FULL_CHECK_EVERY,
        });
        let mut full = now.duration_since(w.last_full) >= FULL_CHECK_EVERY;
        loop {
            match w.rx.try_recv() {
                Ok(id) => {
                    w.ended.insert(id);
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => full = true,
                Err(_) => break,
            }
        }
        if full {
            w.ended.clear();
            w.last_full = now;
        }
        full
    }

    fn progress(items: &[Item]) -> String {
        let count = |s: &str| items.iter().filter(|i| i.status == s).count();
        format!(
            "{} succeeded, {} failed, {} skipped, {} running, {} pending",
            count("succeeded"),
            count("failed"),
            count("skipped"),
            count("running") + count("starting"),
            count("pending")
        )
    }

    /// Ends the current step with `status` and moves to the next.
    pub(super) fn end_step(&mut self, status: &str, note: String) -> Status {
        self.read.clear();
        let st = &mut self.state.steps[self.state.at];
        st.status = status.into();
        st.ended_ms = now_ms();
        st.note = note.clone();
        let name = st.name.clone();
        self.state.at += 1;
        Status::Executing { note: format!("{name}: {note}") }
    }

    /// Saves the items changed since they were last stored (items just marked
    /// `starting` among them), in writes that hold only while this owner holds its claim.
    /// If a write fails, the items marked `starting` go back to `pending` here (the store
    /// has them pending, or starting unsubmitted, which a resume handles), so none is
    /// submitted without its intent stored; and every item of the writes that did not
    /// land counts as unsaved, so the next save writes it again.
    async fn save_intents(&mut self, ctx: &Context) -> Result<(), ProcedureError> {
        let ops = self.take_writes(&ctx.execution_id);
        let store = self.core.repo.store();
        let mut failure = None;
        for (n, chunk) in ops.chunks(INTENTS_PER_TXN).enumerate() {
            let txn = drover_store::Txn::new().when(ctx.claim()).and_then_all(chunk.iter().cloned());
            let why = match store.txn(txn).await {
                Ok(r) if r.succeeded => continue,
                Ok(_) => "this orchestrator no longer owns the run; its new owner carries on".to_string(),
                Err(e) => format!("saving the items about to start failed: {e}"),
            };
            failure = Some((n * INTENTS_PER_TXN, why));
            break;
        }
        let Some((unsaved_from, why)) = failure else { return Ok(()) };
        let prefix = items_prefix(&ctx.execution_id);
        for op in &ops[unsaved_from..] {
            if let drover_store::TxnOp::Put { key, .. } = op
                && let Some((step, item)) = item_position(key, &prefix)
                && let Some(saved) = self.saved.get_mut(step).and_then(|s| s.get_mut(item))
            {
                // No item has an empty status: it differs from the item, which is written again.
                saved.status.clear();
            }
        }
        for item in self.state.steps[self.state.at].items.iter_mut().filter(|i| i.status == "starting") {
            item.status = "pending".into();
            item.started_ms = 0;
        }
        self.read.clear();
        Err(ProcedureError::Retry(why))
    }

    /// One round of a step over many groups: collect what ended, submit what may start,
    /// end the step when every item is done. Returns after a change, a signal, or 5 s.
    pub(super) async fn fanout(&mut self, def: &dyn StepKind, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = self.state.at;
        let (max_parallel, continue_on_error) = def.fanout().unwrap_or((1, false));
        let round_started = tokio::time::Instant::now();
        let round_ends = round_started + Duration::from_secs(5);
        let procedures = self.core.procedures.clone();
        loop {
            let mut changed = false;
            // Whether this pass marked items `starting`: their intent must be saved before
            // they are submitted (the next pass submits them).
            let mut intents = false;
            // Armed before this pass looks, so an end while it looks still wakes the wait.
            let ended_here = procedures.ends().notified();
            tokio::pin!(ended_here);
            ended_here.as_mut().enable();
            // 1. Items whose executions ended, and items whose intent is saved (submitted
            // now), several at a time: each is a few store reads and writes of its own.
            // A running item is looked at when its execution ended here, or at a full
            // check (the first pass, after missed ends, and every FULL_CHECK_EVERY).
            let full = self.note_ends(&procedures);
            let ended = &self.ends.as_ref().expect("noted").ended;
            let work: Vec<(usize, Item)> = self.state.steps[at]
                .items
                .iter()
                .enumerate()
                .filter(|(_, i)| match i.status.as_str() {
                    "starting" => true,
                    "running" => full || ended.contains(&i.execution_id),
                    _ => false,
                })
                .map(|(n, i)| (n, i.clone()))
                .collect();
            let read = &mut self.read;
            let work: Vec<(usize, Item, Option<Versioned<GroupRec>>)> = work
                .into_iter()
                .map(|(n, i)| {
                    let g = if i.status == "starting" { read.remove(&i.target) } else { None };
                    (n, i, g)
                })
                .collect();
            let (core, run_started, parent) = (&self.core, self.state.started_ms, ctx.execution_id.as_str());
            let outcomes: Vec<(usize, Result<Option<Item>, ProcedureError>)> = futures::stream::iter(work)
                .map(|(n, item, g)| async move {
                    let outcome = if item.status == "running" {
                        steps::finished(core, def, &item, run_started).await
                    } else {
                        steps::start(core, def, &item, parent, g).await.map(Some)
                    };
                    (n, outcome)
                })
                .buffer_unordered(ITEM_CONCURRENCY)
                .collect()
                .await;
            // Every outcome is kept before an error is returned: an item submitted in
            // this pass must not be forgotten because another one's read failed.
            let mut first_error = None;
            for (n, outcome) in outcomes {
                match outcome {
                    Ok(Some(item)) => {
                        if item.done()
                            && let Some(w) = self.ends.as_mut()
                        {
                            w.ended.remove(&item.execution_id);
                        }
                        self.state.steps[at].items[n] = item;
                        changed = true;
                    }
                    Ok(None) => {}
                    Err(e) => first_error = first_error.or(Some(e)),
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            let items = &mut self.state.steps[at].items;
            let stop = !continue_on_error && items.iter().any(|i| i.status == "failed");
            // 2. Start more: the lowest unfinished tier only, up to max_parallel at once.
            if !stop && !self.signalled(ctx).await {
                let items = &mut self.state.steps[at].items;
                let busy = items.iter().filter(|i| matches!(i.status.as_str(), "running" | "starting")).count();
                let tier = items.iter().filter(|i| !i.done()).map(|i| i.tier).min();
                let mut room = (max_parallel as usize).saturating_sub(busy);
                // Refill in batches (an eighth of the slots, or whatever is left), so a
                // step over thousands of groups saves its record tens of times a second,
                // not once per group.
                let pending = items.iter().filter(|i| i.status == "pending" && Some(i.tier) == tier).count();
                if busy > 0 && room < (max_parallel as usize / 8).max(1).min(pending) {
                    room = 0;
                }
                // Checked before the intent is persisted, so an item found at its goal
                // later (after a crash) can only have been moved by this run. The groups
                // are read several at a time; one found ineligible leaves its slot to the
                // next pass.
                let candidates: Vec<usize> = items
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| Some(i.tier) == tier && i.status == "pending")
                    .map(|(n, _)| n)
                    .take(room)
                    .collect();
                let repo = &self.core.repo;
                let groups: Vec<(usize, crate::error::ApiResult<Option<Versioned<GroupRec>>>)> =
                    futures::stream::iter(candidates)
                        .map(|n| {
                            let key = keys::group(&items[n].target);
                            async move { (n, repo.get::<GroupRec>(&key).await) }
                        })
                        .buffered(ITEM_CONCURRENCY)
                        .collect()
                        .await;
                for (n, g) in groups {
                    let item = &mut items[n];
                    let g = g.map_err(step_error)?;
                    match g.map(|g| (def.eligibility(&g.rec), g)) {
                        None => {
                            item.status = "skipped".into();
                            item.reason = "the group no longer exists".into();
                        }
                        Some((Err(why), _)) => {
                            item.status = "skipped".into();
                            item.reason = why;
                        }
                        Some((Ok(()), g)) => {
                            item.status = "starting".into();
                            item.started_ms = now_ms();
                            intents = true;
                            self.read.insert(item.target.clone(), g);
                        }
                    }
                    changed = true;
                }
            }
            // 3. The step ends when nothing runs and nothing more may start.
            let items = &mut self.state.steps[at].items;
            let busy = items.iter().any(|i| matches!(i.status.as_str(), "running" | "starting"));
            let waiting = items.iter().any(|i| i.status == "pending");
            if !busy && (!waiting || stop) {
                for i in items.iter_mut().filter(|i| i.status == "pending") {
                    i.status = "skipped".into();
                    i.reason = "not started: an earlier item failed and continue_on_error is false".into();
                }
                let failed = items.iter().filter(|i| i.status == "failed").count();
                let note = Self::progress(items);
                if failed > 0 && !continue_on_error {
                    let first =
                        items.iter().find(|i| i.status == "failed").map(|i| format!("{}: {}", i.name, i.reason));
                    self.end_step("failed", note);
                    return Err(ProcedureError::Fail(format!(
                        "step {} failed for {failed} group(s), first {}; see `drover execution report {}`",
                        def.name(),
                        first.unwrap_or_default(),
                        ctx.execution_id
                    )));
                }
                return Ok(self.end_step(if failed > 0 { "failed" } else { "succeeded" }, note));
            }
            // The intents are saved here, with the items alone, and the next pass submits
            // them at once: returning to the engine to save them with the record (which
            // they do not need) cost every refill a second round trip before its submit.
            // The record itself is saved about once a second (what watchers see).
            // Items that only ended are saved with the next batch (or after a second): a
            // resume finds their outcomes in their executions anyway.
            let settle = round_started.elapsed() >= Duration::from_secs(1);
            let due = (changed && settle) || tokio::time::Instant::now() > round_ends || self.signalled(ctx).await;
            if intents {
                self.save_intents(ctx).await?;
                if !due {
                    continue;
                }
            }
            if due {
                let tier = self.state.steps[at].items.iter().filter(|i| !i.done()).map(|i| i.tier).min().unwrap_or(0);
                return Ok(Status::Executing {
                    note: format!("{} tier {tier}: {}", def.name(), Self::progress(&self.state.steps[at].items)),
                });
            }
            // Woken by an execution ending here (an item's, most often), else polled:
            // children that run on another orchestrator are seen at the next pass.
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                _ = &mut ended_here => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

#[async_trait]
impl Procedure for RunbookRun {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn summary(&self) -> String {
        let params: Vec<String> = self.state.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("runbook {} ({})", self.state.runbook.name, params.join(" "))
    }

    fn project(&self) -> String {
        self.state.project.clone()
    }

    fn locks(&self) -> Vec<String> {
        self.groups().into_iter().map(|g| format!("runbook/group/{g}")).collect()
    }

    fn step(&self) -> String {
        match self.state.steps.get(self.state.at) {
            Some(s) => format!("{}:{}", s.kind, s.name),
            None => "report".into(),
        }
    }

    fn dump(&self) -> serde_json::Value {
        if !self.state.items_apart {
            return serde_json::to_value(&self.state).expect("state serialises");
        }
        // The record without the items (they are stored apart, see `take_writes`).
        let steps: Vec<StepState> = self
            .state
            .steps
            .iter()
            .enumerate()
            .map(|(n, s)| StepState {
                name: s.name.clone(),
                kind: s.kind.clone(),
                status: s.status.clone(),
                started_ms: s.started_ms,
                ended_ms: s.ended_ms,
                note: s.note.clone(),
                items: Vec::new(),
                decision: s.decision.clone(),
                shown: s.shown.clone(),
                until_ms: s.until_ms,
                item_counts: if n == self.state.at { count_items(&s.items) } else { Vec::new() },
            })
            .collect();
        let st = &self.state;
        let state = RunState {
            file: st.file.clone(),
            params: st.params.clone(),
            runbook: st.runbook.clone(),
            steps,
            at: st.at,
            started_ms: st.started_ms,
            clones: st.clones.clone(),
            failing: st.failing.clone(),
            project: st.project.clone(),
            adoptions: st.adoptions.clone(),
            items_apart: true,
        };
        serde_json::to_value(&state).expect("state serialises")
    }

    fn take_writes(&mut self, execution_id: &str) -> Vec<drover_store::TxnOp> {
        if !self.loaded {
            return Vec::new();
        }
        // Every item at submit; after that only those changed since they were stored
        // (and the keys of items a step no longer has).
        self.state.items_apart = true;
        self.saved.resize_with(self.state.steps.len(), Vec::new);
        // Steps before the one the last save was at are as stored, and so are the steps
        // after the current one (not started); debug builds check that.
        let at = self.state.at.min(self.state.steps.len().saturating_sub(1));
        let from = self.saved_at.map_or(0, |s| s.min(at));
        let to = if self.saved_at.is_some() { at + 1 } else { self.state.steps.len() };
        #[cfg(debug_assertions)]
        for (n, (step, saved)) in self.state.steps.iter().zip(&self.saved).enumerate() {
            assert!(
                (from..to).contains(&n) || step.items == *saved,
                "runbook run: items of step {n} changed while the run was at step {at} (last saved at {:?})",
                self.saved_at
            );
        }
        let mut ops = Vec::new();
        for (n, (step, saved)) in self.state.steps.iter().zip(self.saved.iter_mut()).enumerate().take(to).skip(from) {
            for (i, item) in step.items.iter().enumerate() {
                match saved.get_mut(i) {
                    Some(s) if s == item => continue,
                    Some(s) => s.clone_from(item),
                    None => saved.push(item.clone()),
                }
                let value = serde_json::to_vec(item).expect("items serialise");
                ops.push(drover_store::TxnOp::put(item_key(execution_id, n, i), value));
            }
            // From the last one down, so a reader between two transactions of these
            // writes still finds each step's items without a gap.
            for i in (step.items.len()..saved.len()).rev() {
                ops.push(drover_store::TxnOp::delete(item_key(execution_id, n, i)));
            }
            saved.truncate(step.items.len());
        }
        self.saved_at = Some(at);
        ops
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        if !self.loaded {
            let items =
                read_items(self.core.repo.store().as_ref(), &ctx.execution_id).await.map_err(ProcedureError::Retry)?;
            if items.len() > self.state.steps.len() {
                return Err(ProcedureError::Fail(format!(
                    "execution {} has items for {} steps, its runbook {}",
                    ctx.execution_id,
                    items.len(),
                    self.state.steps.len()
                )));
            }
            for (step, items) in self.state.steps.iter_mut().zip(items) {
                step.items = items;
            }
            self.saved = self.state.steps.iter().map(|s| s.items.clone()).collect();
            self.saved_at = Some(self.state.at);
            self.loaded = true;
        }
        let result = self.step_once(ctx).await;
        let live = self.state.clones.iter().any(|c| !c.deleted);
        match result {
            Err(ProcedureError::Fail(why)) if live => {
                // Jump to the next cleanup step for the live clones; fail after it.
                let next = self.state.runbook.steps.iter().enumerate().skip(self.state.at).find(|(_, s)| {
                    matches!(s, Step::TestCleanup(t)
                        if self.state.clones.iter().any(|c| !c.deleted && c.step == t.clones_of))
                });
                match next {
                    Some((i, _)) => {
                        self.state.failing = Some(why.clone());
                        for s in &mut self.state.steps[self.state.at..i] {
                            if s.status == "pending" {
                                s.status = "not-run".into();
                            }
                        }
                        self.state.at = i;
                        Ok(Status::Executing { note: format!("removing test clones before failing: {why}") })
                    }
                    None => Err(ProcedureError::Fail(why)),
                }
            }
            Ok(Status::Executing { note }) if self.state.failing.is_some() && !self.cleanup_left() => {
                Err(ProcedureError::Fail(self.state.failing.clone().unwrap_or(note)))
            }
            other => other,
        }
    }
}

impl RunbookRun {
    /// Whether a cleanup step for live clones is still ahead.
    fn cleanup_left(&self) -> bool {
        self.state.runbook.steps.iter().skip(self.state.at).any(|s| {
            matches!(s, Step::TestCleanup(t)
                if self.state.clones.iter().any(|c| !c.deleted && c.step == t.clones_of))
        })
    }

    async fn step_once(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = self.state.at;
        let Some(def) = self.state.runbook.steps.get(at).cloned() else {
            let report = super::report::build(&self.core, &self.state, &ctx.execution_id, "succeeded").await;
            // With the items apart, the answer is the report's summary (the record stays
            // small); `drover execution report` builds the whole report from the items.
            let value = match self.state.items_apart {
                false => serde_json::to_value(&report).expect("reports serialise"),
                true => serde_json::json!({
                    "execution_id": report.execution_id,
                    "runbook": report.runbook,
                    "status": report.status,
                    "started_ms": report.started_ms,
                    "ended_ms": report.ended_ms,
                    "totals": report.totals,
                    "report": format!("drover execution report {}", ctx.execution_id),
                }),
            };
            return Ok(Status::Done { output: serde_json::json!({"result": "ok", "value": value}) });
        };
        if self.state.steps[at].status == "pending" {
            self.state.steps[at].status = "running".into();
            self.state.steps[at].started_ms = now_ms();
        }
        def.as_kind().run(self, ctx).await
    }
}

/// An item for a step that acts on something other than a group (a command, a clone).
pub(super) fn exec_item(command: &[String]) -> Item {
    Item {
        target: command.join(" "),
        name: command.first().cloned().unwrap_or_default(),
        project: String::new(),
        tier: 0,
        status: "pending".into(),
        reason: String::new(),
        execution_id: String::new(),
        started_ms: now_ms(),
        ended_ms: 0,
        rpo_ms: -1,
        rto_ms: -1,
        predicted: "act".into(),
        predictions: Default::default(),
        sync_bytes: -1,
        sync_ms: -1,
    }
}

/// The runbook kind's loader, for the engine.
pub fn loader(core: Arc<Core>) -> drover_procedure::Loader {
    Box::new(move |state| Ok(Box::new(RunbookRun::load(core.clone(), state)?) as Box<dyn Procedure>))
}

/// A plan as the API shows it.
pub fn plan_to_pb(steps: &[PlannedStep]) -> Vec<pb::PlannedStep> {
    steps
        .iter()
        .map(|s| pb::PlannedStep {
            name: s.name.clone(),
            kind: s.kind.clone(),
            items: s
                .items
                .iter()
                .map(|i| pb::PlannedItem {
                    target: i.target.clone(),
                    name: i.name.clone(),
                    project: i.project.clone(),
                    tier: i.tier,
                    predicted: i.predicted.clone(),
                    rpo_ms: i.rpo_ms,
                    predicted_final_sync_bytes: i.predictions.sync_bytes,
                    predicted_final_sync_ms: i.predictions.sync_ms,
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod item_tests {
    use super::*;
    use drover_store::{KvStore, Txn, TxnOp};

    /// A runbook execution record at step `at`, its items apart: 1,200 in step 0 and 3 in
    /// step 1, each stored under its key.
    async fn stored(status: &str, at: usize) -> (tempfile::TempDir, Arc<dyn KvStore>, drover_procedure::ExecutionRec) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KvStore> =
            Arc::new(drover_store::EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap());
        let rec: drover_procedure::ExecutionRec = serde_json::from_value(serde_json::json!({
            "id": "run1", "kind": KIND, "summary": "", "status": status, "step": "", "steps": [], "locks": [],
            "created_ms": 0, "updated_ms": 0,
            "state": {"items_apart": true, "at": at, "steps": [{"name": "move"}, {"name": "check"}]},
        }))
        .unwrap();
        for (step, n) in [(0usize, 1200usize), (1, 3)] {
            for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
                let txn = chunk.iter().fold(Txn::new(), |t, i| {
                    let item =
                        serde_json::json!({"target": format!("g{i}"), "name": format!("g{i}"), "status": "succeeded"});
                    t.and_then(TxnOp::put(item_key("run1", step, *i), item.to_string()))
                });
                store.txn(txn).await.unwrap();
            }
        }
        (dir, store, rec)
    }

    fn items(rec: &drover_procedure::ExecutionRec, step: usize) -> (usize, bool) {
        let s = &rec.state["steps"][step];
        (s["items"].as_array().map_or(0, Vec::len), s["items_more"].as_bool().unwrap_or(false))
    }

    #[tokio::test]
    async fn watch_updates_carry_a_bounded_number_of_items() {
        let (_dir, store, running) = stored("running", 1).await;
        let shown = with_current_items(store.as_ref(), running).await.unwrap();
        assert_eq!((items(&shown, 0), items(&shown, 1)), ((0, false), (3, false)), "only the current step");
        let (_dir, store, running) = stored("running", 0).await;
        let shown = with_current_items(store.as_ref(), running).await.unwrap();
        assert_eq!(items(&shown, 0), (WATCHED_ITEMS, true), "at most {WATCHED_ITEMS}");
        assert_eq!(
            shown.state["steps"][0]["item_counts"],
            serde_json::json!([{"tier": 0, "status": "succeeded", "n": 1200}]),
            "every item counted"
        );
        // Counts kept in the record are shown as they are, and only the first items read.
        let (_dir, store, mut running) = stored("running", 0).await;
        let kept = serde_json::json!([{"tier": 0, "status": "running", "n": 1200}]);
        running.state["steps"][0]["item_counts"] = kept.clone();
        let shown = with_current_items(store.as_ref(), running).await.unwrap();
        assert_eq!(items(&shown, 0), (WATCHED_ITEMS, true));
        assert_eq!(shown.state["steps"][0]["item_counts"], kept, "the record's counts");
        let (_dir, store, ended) = stored("succeeded", 2).await;
        let shown = with_current_items(store.as_ref(), ended.clone()).await.unwrap();
        assert_eq!((items(&shown, 0), items(&shown, 1)), ((WATCHED_ITEMS, true), (3, false)), "ended: every step");
        let all = with_items(store.as_ref(), ended).await.unwrap();
        assert_eq!((items(&all, 0), items(&all, 1)), ((1200, false), (3, false)), "GetExecution: all");
    }

    #[tokio::test]
    async fn items_page_in_order_from_their_keys_or_the_record() {
        let (_dir, store, rec) = stored("succeeded", 2).await;
        let page = |marker: &str, limit: u32| crate::repo::PageRequest { limit, marker: marker.into() };
        let (first, next) = items_page(store.as_ref(), &rec, 0, &page("", 0)).await.unwrap();
        assert_eq!((first.len(), next.as_str()), (1000, "999"));
        let (rest, next) = items_page(store.as_ref(), &rec, 0, &page("999", 0)).await.unwrap();
        assert_eq!((rest.len(), next.as_str()), (200, ""));
        assert!(rest[0].contains("\"g1000\""), "{}", rest[0]);
        let (small, next) = items_page(store.as_ref(), &rec, 1, &page("", 2)).await.unwrap();
        assert_eq!((small.len(), next.as_str()), (2, "1"));
        assert!(items_page(store.as_ref(), &rec, 0, &page("x", 0)).await.is_err(), "a marker not given");
        // Items kept in the record (runs from before items were apart).
        let mut inline = rec.clone();
        inline.state = serde_json::json!({"steps": [{"items": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}]});
        let (one, next) = items_page(store.as_ref(), &inline, 0, &page("", 2)).await.unwrap();
        assert_eq!((one.len(), next.as_str()), (2, "1"));
        let (two, next) = items_page(store.as_ref(), &inline, 0, &page("1", 2)).await.unwrap();
        assert_eq!((two, next.as_str()), (vec![r#"{"name":"c"}"#.to_string()], ""));
    }
}
