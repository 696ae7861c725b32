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
use serde::{Deserialize, Serialize};

use super::plan::{Item, PlannedStep, eligibility};
use super::schema::{Loaded, Runbook, Step};
use super::steps;
use crate::model::{GroupRec, keys, now_ms};
use crate::procedures::step_error;
use crate::service::Core;

/// The procedure kind.
pub const KIND: &str = "runbook";

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
}

/// A runbook run.
pub struct RunbookRun {
    pub(super) core: Arc<Core>,
    pub(super) state: RunState,
}

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
        };
        Self { core, state }
    }

    pub fn load(core: Arc<Core>, state: serde_json::Value) -> Result<Self, String> {
        Ok(Self { core, state: serde_json::from_value(state).map_err(|e| e.to_string())? })
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
    async fn signalled(&self, ctx: &Context) -> bool {
        let store = self.core.repo.store();
        for key in [ekeys::cancel(&ctx.execution_id), ekeys::pause(&ctx.execution_id)] {
            if matches!(store.get(key.as_bytes()).await, Ok(Some(_))) {
                return true;
            }
        }
        false
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
    fn end_step(&mut self, status: &str, note: String) -> Status {
        let st = &mut self.state.steps[self.state.at];
        st.status = status.into();
        st.ended_ms = now_ms();
        st.note = note.clone();
        let name = st.name.clone();
        self.state.at += 1;
        Status::Executing { note: format!("{name}: {note}") }
    }

    /// One round of a step over many groups: collect what ended, submit what may start,
    /// end the step when every item is done. Returns after a change, a signal, or 5 s.
    async fn fanout(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = self.state.at;
        let def = self.state.runbook.steps[at].clone();
        let (max_parallel, continue_on_error) = def.fanout();
        let round_ends = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut changed = false;
            // 1. Items whose executions ended.
            for i in 0..self.state.steps[at].items.len() {
                let item = self.state.steps[at].items[i].clone();
                if item.status == "running" {
                    if let Some(done) = steps::finished(&self.core, &def, &item, self.state.started_ms).await? {
                        self.state.steps[at].items[i] = done;
                        changed = true;
                    }
                } else if item.status == "starting" {
                    let started = steps::start(&self.core, &def, &item, &ctx.execution_id).await?;
                    self.state.steps[at].items[i] = started;
                    changed = true;
                }
            }
            let items = &mut self.state.steps[at].items;
            let stop = !continue_on_error && items.iter().any(|i| i.status == "failed");
            // 2. Start more: the lowest unfinished tier only, up to max_parallel at once.
            if !stop && !self.signalled(ctx).await {
                let items = &mut self.state.steps[at].items;
                let busy = items.iter().filter(|i| matches!(i.status.as_str(), "running" | "starting")).count();
                let tier = items.iter().filter(|i| !i.done()).map(|i| i.tier).min();
                let mut room = (max_parallel as usize).saturating_sub(busy);
                let core = self.core.clone();
                for item in items.iter_mut() {
                    if room == 0 || Some(item.tier) != tier || item.status != "pending" {
                        continue;
                    }
                    // Checked before the intent is persisted, so an item found at its goal
                    // later (after a crash) can only have been moved by this run.
                    let g = core.repo.get::<GroupRec>(&keys::group(&item.target)).await.map_err(step_error)?;
                    match g.map(|g| eligibility(&def, &g.rec)) {
                        None => {
                            item.status = "skipped".into();
                            item.reason = "the group no longer exists".into();
                        }
                        Some(Err(why)) => {
                            item.status = "skipped".into();
                            item.reason = why;
                        }
                        Some(Ok(())) => {
                            item.status = "starting".into();
                            item.started_ms = now_ms();
                            room -= 1;
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
            if changed || tokio::time::Instant::now() > round_ends || self.signalled(ctx).await {
                let tier = self.state.steps[at].items.iter().filter(|i| !i.done()).map(|i| i.tier).min().unwrap_or(0);
                return Ok(Status::Executing {
                    note: format!("{} tier {tier}: {}", def.name(), Self::progress(&self.state.steps[at].items)),
                });
            }
            tokio::select! {
                _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
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
        serde_json::to_value(&self.state).expect("state serialises")
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let result = self.step_once(ctx).await;
        let live = self.state.clones.iter().any(|c| !c.deleted);
        match result {
            Err(ProcedureError::Fail(why)) if live => {
                // Jump to the next cleanup step for the live clones; fail after it.
                let next = self.state.runbook.steps.iter().enumerate().skip(self.state.at).find(|(_, s)| {
                    matches!(s, Step::TestCleanup { clones_of, .. }
                        if self.state.clones.iter().any(|c| !c.deleted && &c.step == clones_of))
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
            matches!(s, Step::TestCleanup { clones_of, .. }
                if self.state.clones.iter().any(|c| !c.deleted && &c.step == clones_of))
        })
    }

    async fn step_once(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let at = self.state.at;
        let Some(def) = self.state.runbook.steps.get(at).cloned() else {
            let report = super::report::build(&self.core, &self.state, &ctx.execution_id, "succeeded").await;
            return Ok(Status::Done { output: serde_json::json!({"result": "ok", "value": report}) });
        };
        if self.state.steps[at].status == "pending" {
            self.state.steps[at].status = "running".into();
            self.state.steps[at].started_ms = now_ms();
        }
        match &def {
            Step::Sync { .. } | Step::Failover { .. } | Step::Failback { .. } => self.fanout(ctx).await,
            Step::Freeze { .. } | Step::Thaw { .. } => {
                let frozen = matches!(def, Step::Freeze { .. });
                let mut failed = 0;
                for item in &mut self.state.steps[at].items {
                    match steps::set_frozen(&self.core, &item.target, frozen).await {
                        Ok(()) => item.status = "succeeded".into(),
                        Err(e) => {
                            item.status = "failed".into();
                            item.reason = e.to_string();
                            failed += 1;
                        }
                    }
                    item.ended_ms = now_ms();
                }
                let verb = if frozen { "frozen" } else { "thawed" };
                let n = self.state.steps[at].items.len();
                if failed > 0 {
                    self.end_step("failed", format!("{failed} of {n} backends could not be {verb}"));
                    return Err(ProcedureError::Fail(format!(
                        "step {}: {failed} backend(s) could not be {verb}",
                        def.name()
                    )));
                }
                Ok(self.end_step("succeeded", format!("{n} backend(s) {verb}")))
            }
            Step::Verify { status, max_rpo, after_step, .. } => {
                if let Some(earlier) = after_step {
                    let acted: Vec<String> = self
                        .state
                        .steps
                        .iter()
                        .find(|s| &s.name == earlier)
                        .map(|s| s.items.iter().filter(|i| i.status != "skipped").map(|i| i.target.clone()).collect())
                        .unwrap_or_default();
                    self.state.steps[at].items.retain(|i| acted.contains(&i.target));
                }
                let failed = steps::verify(&self.core, &mut self.state.steps[at].items, status.as_deref(), *max_rpo)
                    .await
                    .map_err(step_error)?;
                let n = self.state.steps[at].items.len();
                if failed > 0 {
                    self.end_step("failed", format!("{failed} of {n} groups failed the check"));
                    return Err(ProcedureError::Fail(format!(
                        "step {}: {failed} of {n} groups failed the check; see `drover execution report {}`",
                        def.name(),
                        ctx.execution_id
                    )));
                }
                Ok(self.end_step("succeeded", format!("{n} group(s) checked")))
            }
            Step::Prompt { message, show_divergence, only_if_diverged, .. } => {
                if self.state.steps[at].shown.is_empty()
                    && let Some(sel) = show_divergence
                {
                    let shown = steps::divergence(&self.core, sel).await.map_err(step_error)?;
                    if shown.is_empty() && *only_if_diverged {
                        self.state.steps[at].shown = vec!["no group has diverged".into()];
                        return Ok(self.end_step("skipped", "no group has diverged: nothing to approve".into()));
                    }
                    self.state.steps[at].shown =
                        if shown.is_empty() { vec!["no group has diverged".into()] } else { shown };
                    return Ok(Status::Executing { note: format!("{}: waiting for approve or reject", def.name()) });
                }
                loop {
                    let decided = self.core.procedures.decision(&ctx.execution_id, def.name()).await;
                    match decided {
                        Ok(Some(d)) => {
                            let approve = d.approve;
                            let by = d.by.clone();
                            self.state.steps[at].decision = Some(d);
                            if approve {
                                return Ok(self.end_step("succeeded", format!("approved by {by}")));
                            }
                            self.end_step("rejected", format!("rejected by {by}"));
                            return Err(ProcedureError::Fail(format!(
                                "rejected at prompt {} by {by}: nothing after it ran ({message})",
                                def.name()
                            )));
                        }
                        Ok(None) => {}
                        Err(e) => return Err(ProcedureError::Retry(e.to_string())),
                    }
                    if self.signalled(ctx).await {
                        return Ok(Status::Executing {
                            note: format!("{}: waiting for approve or reject", def.name()),
                        });
                    }
                    tokio::select! {
                        _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    }
                }
            }
            Step::Wait { duration, until, .. } => {
                let st = &mut self.state.steps[at];
                if st.until_ms == 0 {
                    let span = duration.map(|d| d.0).or(until.as_ref().map(|u| u.timeout.0)).unwrap_or_default();
                    st.until_ms = now_ms() + span.as_millis() as i64;
                    return Ok(Status::Executing { note: format!("{}: waiting until {}", def.name(), st.until_ms) });
                }
                let until_ms = st.until_ms;
                loop {
                    if let Some(u) = until {
                        let (ok, missing) = steps::reached(&self.core, &self.state.steps[at].items, &u.status)
                            .await
                            .map_err(step_error)?;
                        if ok {
                            return Ok(self.end_step("succeeded", format!("every group is {}", u.status)));
                        }
                        if now_ms() >= until_ms {
                            let note = format!("timed out waiting for {} to be {}", missing.join(", "), u.status);
                            self.end_step("failed", note.clone());
                            return Err(ProcedureError::Fail(format!("step {}: {note}", def.name())));
                        }
                    } else if now_ms() >= until_ms {
                        return Ok(self.end_step("succeeded", "waited".into()));
                    }
                    if self.signalled(ctx).await {
                        return Ok(Status::Executing { note: format!("{}: waiting", def.name()) });
                    }
                    tokio::select! {
                        _ = ctx.cancelled.cancelled() => return Err(ProcedureError::Retry("the owner is stopping".into())),
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
            Step::TestClone { .. } => {
                let made = steps::test_clones(
                    &self.core,
                    &mut self.state.steps[at].items,
                    def.name(),
                    &ctx.execution_id,
                    ctx.epoch,
                )
                .await?;
                for c in made {
                    if !self.state.clones.iter().any(|k| k.clone_id == c.clone_id) {
                        self.state.clones.push(c);
                    }
                }
                let items = &self.state.steps[at].items;
                let failed = items.iter().filter(|i| i.status == "failed").count();
                let note = format!(
                    "{} clone(s) of {} group(s); {failed} group(s) failed",
                    self.state.clones.iter().filter(|c| c.step == def.name()).count(),
                    items.iter().filter(|i| i.status == "succeeded").count()
                );
                if failed > 0 {
                    self.end_step("failed", note.clone());
                    return Err(ProcedureError::Fail(format!(
                        "step {}: {note}; clean up with a test-cleanup step or `drover execution report {}`",
                        def.name(),
                        ctx.execution_id
                    )));
                }
                Ok(self.end_step("succeeded", note))
            }
            Step::TestCleanup { clones_of, .. } => {
                let mut failed = Vec::new();
                let mut items = Vec::new();
                for c in self.state.clones.iter_mut().filter(|c| &c.step == clones_of) {
                    let mut item = exec_item(std::slice::from_ref(&c.clone_id));
                    item.target = c.clone_id.clone();
                    item.name = format!("{} ({})", c.clone_id, c.group);
                    if !c.deleted {
                        match steps::delete_clone(&self.core, c, &ctx.execution_id, ctx.epoch).await {
                            Ok(()) => c.deleted = true,
                            Err(e) => {
                                item.reason = e.clone();
                                failed.push(e);
                            }
                        }
                    }
                    item.status = if c.deleted { "succeeded" } else { "failed" }.into();
                    item.ended_ms = now_ms();
                    items.push(item);
                }
                let n = items.len();
                self.state.steps[at].items = items;
                if let Some(first) = failed.first() {
                    // A backend that is away: the step is tried again, the clones stay listed.
                    return Err(ProcedureError::Retry(format!("removing test clones: {first}")));
                }
                Ok(self.end_step("succeeded", format!("{n} test clone(s) removed")))
            }
            Step::Exec { command, timeout, continue_on_error, .. } => {
                let live: Vec<&TestCloneRec> = self.state.clones.iter().filter(|c| !c.deleted).collect();
                let clones = serde_json::to_string(&live).expect("clones serialise");
                let outcome =
                    steps::exec(command, timeout.0, &self.state.params, &[("DROVER_TEST_CLONES", clones)]).await;
                let (Ok(said) | Err(said)) = &outcome;
                self.state.steps[at].items = vec![Item {
                    status: if outcome.is_ok() { "succeeded" } else { "failed" }.into(),
                    reason: said.clone(),
                    ended_ms: now_ms(),
                    ..exec_item(command)
                }];
                match outcome {
                    Ok(out) => Ok(self.end_step("succeeded", out)),
                    Err(why) if *continue_on_error => Ok(self.end_step("failed", why)),
                    Err(why) => {
                        self.end_step("failed", why.clone());
                        Err(ProcedureError::Fail(format!("step {}: {why}", def.name())))
                    }
                }
            }
        }
    }
}

fn exec_item(command: &[String]) -> Item {
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
                })
                .collect(),
        })
        .collect()
}
