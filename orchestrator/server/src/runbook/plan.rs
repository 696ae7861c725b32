//! From a loaded runbook to concrete work: which groups (or backends) each step touches,
//! in which tier, and what each is predicted to do. `drover runbook plan` shows this; a
//! run starts from it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schema::{BackendSelector, Loaded, Selector};
use crate::error::{ApiError, ApiResult};
use crate::model::{BackendRec, GroupRec, keys};
use crate::service::Core;

/// One group (or backend) a step acts on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    /// Group id, or backend name for freeze/thaw.
    pub target: String,
    /// Group name (or the backend name).
    pub name: String,
    // Fields at their defaults are left out of the record: a run over thousands of
    // groups keeps an item per group and step in one execution record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub project: String,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub tier: u32,
    /// pending, starting, running, succeeded, failed, skipped.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The execution doing the item's work, once submitted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub execution_id: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started_ms: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ended_ms: i64,
    /// Predicted (in a plan) or achieved (after a move) RPO; -1 when unknown.
    #[serde(default = "unknown", skip_serializing_if = "is_unknown")]
    pub rpo_ms: i64,
    /// From the execution's start to the group serving at the target; -1 until then.
    #[serde(default = "unknown", skip_serializing_if = "is_unknown")]
    pub rto_ms: i64,
    /// What the plan expected: `act`, or why the item would be skipped.
    #[serde(default = "act", skip_serializing_if = "is_act")]
    pub predicted: String,
    /// Predictions made when the run was submitted, beside what a move then achieved:
    /// the RPO a disaster failover would have (age of the newest complete point), and
    /// what a planned move's final sync would ship and how long it would take. -1 when
    /// unknown or not asked.
    #[serde(default, skip_serializing_if = "Predictions::is_unknown")]
    pub predictions: Predictions,
    /// What the planned move's final sync shipped and how long it took; -1 when none ran.
    #[serde(default = "unknown", skip_serializing_if = "is_unknown")]
    pub sync_bytes: i64,
    #[serde(default = "unknown", skip_serializing_if = "is_unknown")]
    pub sync_ms: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_unknown(v: &i64) -> bool {
    *v == -1
}

fn act() -> String {
    "act".into()
}

fn is_act(v: &String) -> bool {
    v == "act"
}

/// What was predicted for a group before it moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predictions {
    pub rpo_ms: i64,
    pub sync_bytes: i64,
    pub sync_ms: i64,
}

impl Default for Predictions {
    fn default() -> Self {
        Predictions { rpo_ms: -1, sync_bytes: -1, sync_ms: -1 }
    }
}

impl Predictions {
    fn is_unknown(&self) -> bool {
        *self == Self::default()
    }
}

fn unknown() -> i64 {
    -1
}

impl Item {
    fn new(target: &str, name: &str, project: &str, tier: u32) -> Self {
        Item {
            target: target.into(),
            name: name.into(),
            project: project.into(),
            tier,
            status: "pending".into(),
            reason: String::new(),
            execution_id: String::new(),
            started_ms: 0,
            ended_ms: 0,
            rpo_ms: -1,
            rto_ms: -1,
            predicted: "act".into(),
            predictions: Predictions::default(),
            sync_bytes: -1,
            sync_ms: -1,
        }
    }

    pub fn done(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "skipped")
    }
}

/// A step with its items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedStep {
    pub name: String,
    pub kind: String,
    pub items: Vec<Item>,
}

fn matches(sel: &Selector, g: &GroupRec, backends: &BTreeMap<String, BackendRec>) -> bool {
    let site_of = |b: &str| backends.get(b).map(|r| r.site.as_str()).unwrap_or("");
    sel.site.as_ref().is_none_or(|s| site_of(&g.primary_backend) == s)
        && sel.backend.as_ref().is_none_or(|b| &g.primary_backend == b)
        && sel.target.as_ref().is_none_or(|t| &g.replication_target == t)
        && (sel.names.is_empty() || sel.names.contains(&g.name))
        && sel.project.as_ref().is_none_or(|p| &g.project == p)
        && sel.labels.iter().all(|(k, v)| g.labels.get(k) == Some(v))
        && (sel.tiers.is_empty() || sel.tiers.iter().any(|t| t.0 == g.tier))
}

fn describe(sel: &Selector) -> String {
    let mut parts = Vec::new();
    if let Some(s) = &sel.site {
        parts.push(format!("site={s}"));
    }
    if let Some(b) = &sel.backend {
        parts.push(format!("backend={b}"));
    }
    if let Some(t) = &sel.target {
        parts.push(format!("target={t}"));
    }
    if !sel.names.is_empty() {
        parts.push(format!("names={}", sel.names.join(",")));
    }
    if let Some(p) = &sel.project {
        parts.push(format!("project={p}"));
    }
    for (k, v) in &sel.labels {
        parts.push(format!("label {k}={v}"));
    }
    if !sel.tiers.is_empty() {
        parts.push(format!("tiers={}", sel.tiers.iter().map(|t| t.0.to_string()).collect::<Vec<_>>().join(",")));
    }
    if parts.is_empty() { "every group".into() } else { parts.join(" ") }
}

/// The groups `sel` picks, ordered by tier then name.
pub async fn select(core: &Core, sel: &Selector) -> ApiResult<Vec<GroupRec>> {
    let backends: BTreeMap<String, BackendRec> =
        core.repo.list::<BackendRec>(keys::BACKENDS).await?.into_iter().map(|b| (b.rec.name.clone(), b.rec)).collect();
    let mut groups: Vec<GroupRec> = core
        .repo
        .list::<GroupRec>(keys::GROUPS)
        .await?
        .into_iter()
        .map(|g| g.rec)
        .filter(|g| matches(sel, g, &backends))
        .collect();
    groups.sort_by(|a, b| (a.tier, &a.name).cmp(&(b.tier, &b.name)));
    Ok(groups)
}

async fn select_backends(core: &Core, sel: &BackendSelector) -> ApiResult<Vec<BackendRec>> {
    Ok(core
        .repo
        .list::<BackendRec>(keys::BACKENDS)
        .await?
        .into_iter()
        .map(|b| b.rec)
        .filter(|b| {
            sel.site.as_ref().is_none_or(|s| &b.site == s) && (sel.names.is_empty() || sel.names.contains(&b.name))
        })
        .collect())
}

/// Resolves every step's items. A selector that matches nothing is an error naming the
/// step (and the file position of its name).
pub async fn plan(core: &Core, loaded: &Loaded, text: &str) -> ApiResult<Vec<PlannedStep>> {
    let mut out = Vec::new();
    for step in &loaded.runbook.steps {
        let mut items = Vec::new();
        let nothing = |what: String| {
            let at = super::position_of_step(text, step.name());
            ApiError::FailedPrecondition(format!(
                "{}:{}:{}: step `{}` ({}): {what} matches nothing; fix the selector or the parameters",
                loaded.file,
                at.0,
                at.1,
                step.name(),
                step.kind()
            ))
        };
        match step {
            _ if step.as_kind().backends().is_some() => {
                let backends = step.as_kind().backends().expect("checked");
                let found = select_backends(core, backends).await?;
                if found.is_empty() {
                    return Err(nothing(format!(
                        "the backend selector (site={} names={})",
                        backends.site.as_deref().unwrap_or("any"),
                        backends.names.join(",")
                    )));
                }
                items = found.iter().map(|b| Item::new(&b.name, &b.name, "", 0)).collect();
            }
            _ => {
                if let Some(sel) = step.groups() {
                    let found = select(core, sel).await?;
                    if found.is_empty() {
                        return Err(nothing(format!("the group selector ({})", describe(sel))));
                    }
                    for g in &found {
                        let mut item = Item::new(&g.id, &g.name, &g.project, g.tier);
                        if let Err(why) = step.as_kind().eligibility(g)
                            && step.as_kind().fanout().is_some()
                        {
                            item.predicted = format!("skip: {why}");
                        }
                        items.push(item);
                    }
                }
            }
        }
        out.push(PlannedStep { name: step.name().to_string(), kind: step.kind().to_string(), items });
    }
    Ok(out)
}
