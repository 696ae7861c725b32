//! The DR report of a runbook execution: the timeline of steps, every item's outcome and
//! reason, per group the achieved RPO and RTO, and totals; as JSON or Markdown.

use serde::{Deserialize, Serialize};

use super::plan::{Item, Predictions};
use super::run::{RunState, StepState};
use crate::service::Core;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Totals {
    pub items: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Started and not ended when the report was made.
    pub running: usize,
    pub not_started: usize,
}

/// A group's result across the run: its last move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupResult {
    pub group: String,
    pub project: String,
    pub tier: u32,
    pub step: String,
    pub outcome: String,
    pub reason: String,
    /// Age of the recovery point promoted (0 for a planned move); -1 when unknown.
    pub rpo_ms: i64,
    /// From the execution's start to the group serving at its new side; -1 when it did not.
    pub rto_ms: i64,
    /// What was predicted when the run was submitted (see [`Predictions`]).
    #[serde(default)]
    pub predicted: Predictions,
    /// What a planned move's final sync shipped, and how long it took; -1 when none ran.
    #[serde(default = "unknown")]
    pub sync_bytes: i64,
    #[serde(default = "unknown")]
    pub sync_ms: i64,
}

fn unknown() -> i64 {
    -1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub execution_id: String,
    pub runbook: String,
    pub file: String,
    pub params: std::collections::BTreeMap<String, String>,
    pub status: String,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub steps: Vec<StepState>,
    pub groups: Vec<GroupResult>,
    pub totals: Totals,
}

/// The report of a run in `state`, whose execution is `status`. Items whose executions
/// were still running when the run ended (a cancel lets them finish) get their outcome
/// from those executions now.
pub async fn build(core: &Core, state: &RunState, execution_id: &str, status: &str) -> Report {
    let mut steps = state.steps.clone();
    for (def, st) in state.runbook.steps.iter().zip(steps.iter_mut()) {
        for item in st.items.iter_mut().filter(|i| i.status == "running") {
            if let Ok(Some(done)) = super::steps::finished(core, def.as_kind(), item, state.started_ms).await {
                *item = done;
            }
        }
        if st.status == "pending" || (st.status == "running" && status != "running") {
            st.status = if st.status == "pending" { "not-run" } else { status }.to_string();
        }
    }
    let all: Vec<&Item> = steps.iter().flat_map(|s| s.items.iter()).collect();
    let count = |f: &dyn Fn(&Item) -> bool| all.iter().filter(|i| f(i)).count();
    let totals = Totals {
        items: all.len(),
        succeeded: count(&|i| i.status == "succeeded"),
        failed: count(&|i| i.status == "failed"),
        skipped: count(&|i| i.status == "skipped"),
        running: count(&|i| i.status == "running"),
        not_started: count(&|i| matches!(i.status.as_str(), "pending" | "starting")),
    };
    let mut groups: Vec<GroupResult> = Vec::new();
    for st in steps.iter().filter(|s| matches!(s.kind.as_str(), "failover" | "failback")) {
        for i in &st.items {
            let r = GroupResult {
                group: i.name.clone(),
                project: i.project.clone(),
                tier: i.tier,
                step: st.name.clone(),
                outcome: i.status.clone(),
                reason: i.reason.clone(),
                rpo_ms: i.rpo_ms,
                rto_ms: i.rto_ms,
                predicted: i.predictions.clone(),
                sync_bytes: i.sync_bytes,
                sync_ms: i.sync_ms,
            };
            match groups.iter_mut().find(|g| g.group == r.group && g.project == r.project) {
                Some(g) if r.outcome != "skipped" => *g = r,
                Some(_) => {}
                None => groups.push(r),
            }
        }
    }
    groups.sort_by(|a, b| (a.tier, &a.group).cmp(&(b.tier, &b.group)));
    let ended_ms = steps.iter().map(|s| s.ended_ms).max().unwrap_or(0);
    Report {
        execution_id: execution_id.to_string(),
        runbook: state.runbook.name.clone(),
        file: state.file.clone(),
        params: state.params.clone(),
        status: status.to_string(),
        started_ms: state.started_ms,
        ended_ms,
        steps,
        groups,
        totals,
    }
}

fn ms(v: i64) -> String {
    if v < 0 { "unknown".into() } else { format!("{:.1} s", v as f64 / 1000.0) }
}

/// A final sync's bytes and time ("-" when none ran or nothing is known).
pub fn shipped(bytes: i64, ms: i64) -> String {
    match (bytes, ms) {
        (b, _) if b < 0 => "-".into(),
        (b, t) if t < 0 => format!("{b} bytes"),
        (b, t) => format!("{b} bytes in {:.1} s", t as f64 / 1000.0),
    }
}

fn time(v: i64) -> String {
    if v <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(v as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let params: Vec<String> = r.params.iter().map(|(k, v)| format!("`{k}={v}`")).collect();
    out.push_str(&format!("# DR report: runbook {}\n\n", r.runbook));
    out.push_str(&format!(
        "- Execution: `{}`\n- File: `{}`\n- Parameters: {}\n- Status: **{}**\n- Started: {}\n- Ended: {}\n\n",
        r.execution_id,
        r.file,
        if params.is_empty() { "none".into() } else { params.join(", ") },
        r.status,
        time(r.started_ms),
        time(r.ended_ms)
    ));
    let t = &r.totals;
    out.push_str(&format!(
        "Items: {} — {} succeeded, {} failed, {} skipped, {} running, {} not started.\n\n",
        t.items, t.succeeded, t.failed, t.skipped, t.running, t.not_started
    ));
    out.push_str(
        "## Timeline\n\n| step | kind | status | started | ended | note |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for s in &r.steps {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            s.name,
            s.kind,
            s.status,
            time(s.started_ms),
            time(s.ended_ms),
            s.note.replace('|', "\\|")
        ));
    }
    for s in r.steps.iter().filter(|s| s.decision.is_some() || !s.shown.is_empty()) {
        out.push_str(&format!("\n### Prompt {}\n\n", s.name));
        for line in &s.shown {
            out.push_str(&format!("- {line}\n"));
        }
        if let Some(d) = &s.decision {
            out.push_str(&format!(
                "\nDecision: **{}** by {} at {}{}\n",
                if d.approve { "approved" } else { "rejected" },
                d.by,
                time(d.at_ms),
                if d.comment.is_empty() { String::new() } else { format!(" ({})", d.comment) }
            ));
        }
    }
    if !r.groups.is_empty() {
        out.push_str(
            "\n## Groups\n\nPredictions were made when the run was submitted.\n\n| tier | group | project | step | \
             outcome | RPO | RPO predicted | final sync | final sync predicted | RTO | reason |\n| --- | --- | --- | --- \
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for g in &r.groups {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                g.tier,
                g.group,
                g.project,
                g.step,
                g.outcome,
                ms(g.rpo_ms),
                ms(g.predicted.rpo_ms),
                shipped(g.sync_bytes, g.sync_ms),
                shipped(g.predicted.sync_bytes, g.predicted.sync_ms),
                ms(g.rto_ms),
                g.reason.replace('|', "\\|")
            ));
        }
    }
    for s in r.steps.iter().filter(|s| !matches!(s.kind.as_str(), "failover" | "failback") && !s.items.is_empty()) {
        out.push_str(&format!(
            "\n## Step {} ({})\n\n| item | outcome | reason |\n| --- | --- | --- |\n",
            s.name, s.kind
        ));
        for i in &s.items {
            out.push_str(&format!("| {} | {} | {} |\n", i.name, i.status, i.reason.replace('|', "\\|")));
        }
    }
    out
}
