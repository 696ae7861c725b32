//! `compute.stop`, `compute.quiesce`, `compute.unquiesce`, `compute.refresh` and
//! `compute.start`: the instances at a site whose volumes belong to the selected groups,
//! through the site's compute side (docs/compute.md).
//!
//! Each round lists the site's instances, keeps those attached to a volume of a selected
//! group, and makes one call per step (per tier for `compute.start`, lowest tier first)
//! under an op_id made of the execution, the step and the site (and tier), so a resumed
//! round repeats the same call and the compute side answers it as before. An item per
//! instance carries its outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use drover_proto::compute::v1 as cpb;
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::compute::{Answer, Call};
use crate::model::{VolumeRec, keys, now_ms};
use crate::runbook::plan::{Item, select};
use crate::runbook::run::{RunbookRun, exec_item};
use crate::runbook::schema::{Dur, Selector};
use crate::service::volumes::VolumeApi;

/// The fields every compute step has.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeFields {
    pub name: String,
    /// The site whose compute side is called.
    pub site: String,
    /// Instances attached to a volume of these groups.
    pub groups: Selector,
    /// And, when given, only instances of this project…
    #[serde(default)]
    pub project: Option<String>,
    /// …carrying every one of these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Stop: the grace time; quiesce: the bound. Also how long the site may take to
    /// answer at all.
    #[serde(default)]
    pub deadline: Option<Dur>,
    /// A site that does not answer within the deadline is skipped, not waited on (for
    /// the lost site of a disaster).
    #[serde(default)]
    pub skip_if_unreachable: bool,
    #[serde(default)]
    pub continue_on_error: bool,
}

macro_rules! compute_kind {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub ComputeFields);

        #[async_trait]
        impl StepKind for $name {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn name(&self) -> &str {
                &self.0.name
            }
            fn groups(&self) -> Option<&Selector> {
                Some(&self.0.groups)
            }
            async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
                run_step(&self.0, $kind, run, ctx).await
            }
        }
    };
}

compute_kind!(ComputeStop, "compute.stop", "Stop the instances gracefully.");
compute_kind!(ComputeQuiesce, "compute.quiesce", "Pause the instances' writes and flush.");
compute_kind!(ComputeUnquiesce, "compute.unquiesce", "Let the instances write again.");
compute_kind!(ComputeRefresh, "compute.refresh", "Hand the instances their volumes' connection info now.");
compute_kind!(ComputeStart, "compute.start", "Start the instances, tier by tier.");

/// One instance the step acts on, with the lowest tier of its groups.
struct Target {
    instance: cpb::Instance,
    tier: u32,
}

async fn targets(run: &RunbookRun, f: &ComputeFields, within: Duration) -> Result<Vec<Target>, String> {
    let groups = select(&run.core, &f.groups).await.map_err(|e| e.to_string())?;
    let mut tier_of: BTreeMap<String, u32> = BTreeMap::new();
    for g in &groups {
        for v in &g.volume_ids {
            let t = tier_of.entry(v.clone()).or_insert(g.tier);
            *t = (*t).min(g.tier);
        }
    }
    let call = Call::ListInstances(cpb::ListInstancesRequest::default());
    let answer = tokio::time::timeout(within, run.core.hooks.call(&f.site, &call))
        .await
        .map_err(|_| format!("site {}'s compute side did not answer within {within:?}", f.site))??;
    Ok(pick(answer.instances, &tier_of, f))
}

/// The instances attached to a volume in `tier_of` (volume id to its group's tier) that
/// match the step's project and labels, lowest tier first.
fn pick(instances: Vec<cpb::Instance>, tier_of: &BTreeMap<String, u32>, f: &ComputeFields) -> Vec<Target> {
    let mut out: Vec<Target> = instances
        .into_iter()
        .filter(|i| f.project.as_ref().is_none_or(|p| &i.project == p))
        .filter(|i| f.labels.iter().all(|(k, v)| i.labels.get(k) == Some(v)))
        .filter_map(|i| {
            let tier = i.volume_ids.iter().filter_map(|v| tier_of.get(v)).min().copied()?;
            Some(Target { instance: i, tier })
        })
        .collect();
    out.sort_by(|a, b| (a.tier, &a.instance.id).cmp(&(b.tier, &b.instance.id)));
    out
}

/// The connection info of every volume of `targets`, where each is active now.
async fn attachments(run: &RunbookRun, targets: &[Target]) -> Result<Vec<cpb::Attachment>, String> {
    let api = VolumeApi { core: run.core.clone() };
    let ids: BTreeSet<&String> = targets.iter().flat_map(|t| t.instance.volume_ids.iter()).collect();
    let mut out = Vec::new();
    for id in ids {
        let v = run.core.repo.get::<VolumeRec>(&keys::volume(id)).await.map_err(|e| e.to_string())?;
        let Some(v) = v else { return Err(format!("volume {id} of an instance is not known to Drover")) };
        let a = api.attach(id, &v.rec.project).await.map_err(|e| format!("volume {}: {e}", v.rec.name))?;
        out.push(cpb::Attachment { volume_id: id.clone(), driver_volume_type: a.driver_volume_type, uri: a.uri });
    }
    Ok(out)
}

fn item_of(t: &Target, site: &str) -> Item {
    let mut item = exec_item(std::slice::from_ref(&t.instance.id));
    item.name = format!("{} ({site})", t.instance.id);
    item.project = t.instance.project.clone();
    item.tier = t.tier;
    item
}

async fn run_step(
    f: &ComputeFields,
    kind: &str,
    run: &mut RunbookRun,
    ctx: &Context,
) -> Result<Status, ProcedureError> {
    let at = run.state.at;
    let within = f.deadline.as_ref().map_or(Duration::from_secs(30), |d| d.0);
    let op = |suffix: &str| format!("{}:{}:{}{suffix}", ctx.execution_id, f.name, f.site);
    // A site without a compute side (or none named) has nothing to stop or start: the
    // shipped site runbooks carry these steps for sites that have one.
    if !run.core.hooks.sites().contains(&f.site) {
        let why = match f.site.is_empty() {
            true => "no site named".to_string(),
            false => format!("site {} has no compute side configured", f.site),
        };
        run.state.steps[at].items = Vec::new();
        return Ok(run.end_step("skipped", why));
    }
    let found = match targets(run, f, within).await {
        Ok(t) => t,
        Err(why) if f.skip_if_unreachable => {
            let mut item = exec_item(std::slice::from_ref(&f.site));
            item.status = "skipped".into();
            item.reason = format!("{why}; not waited on");
            item.ended_ms = now_ms();
            run.state.steps[at].items = vec![item];
            return Ok(run.end_step("skipped", format!("site {} skipped: {why}", f.site)));
        }
        Err(why) => {
            run.end_step("failed", why.clone());
            return Err(ProcedureError::Fail(format!("step {}: {why}", f.name)));
        }
    };
    let mut items: Vec<Item> = found.iter().map(|t| item_of(t, &f.site)).collect();
    let req = |ids: Vec<String>, suffix: &str| cpb::InstancesRequest {
        op_id: op(suffix),
        instance_ids: ids,
        deadline_ms: within.as_millis() as i64,
    };
    // Calls, in order: one per tier for a start, else one for every instance.
    let mut calls: Vec<(Vec<String>, Call)> = Vec::new();
    match kind {
        "compute.start" => {
            let tiers: BTreeSet<u32> = found.iter().map(|t| t.tier).collect();
            for tier in tiers {
                let ids: Vec<String> = found.iter().filter(|t| t.tier == tier).map(|t| t.instance.id.clone()).collect();
                calls.push((ids.clone(), Call::Start(req(ids, &format!(":tier{tier}")))));
            }
        }
        "compute.refresh" => {
            let attached = attachments(run, &found).await.map_err(|why| {
                ProcedureError::Retry(format!("step {}: the volumes' connection info: {why}", f.name))
            })?;
            let ids: Vec<String> = found.iter().map(|t| t.instance.id.clone()).collect();
            let r = cpb::RefreshRequest { op_id: op(""), instance_ids: ids.clone(), attachments: attached };
            calls.push((ids, Call::RefreshAttachments(r)));
        }
        _ => {
            let ids: Vec<String> = found.iter().map(|t| t.instance.id.clone()).collect();
            let r = req(ids.clone(), "");
            calls.push((
                ids,
                match kind {
                    "compute.stop" => Call::Stop(r),
                    "compute.quiesce" => Call::Quiesce(r),
                    _ => Call::Unquiesce(r),
                },
            ));
        }
    }
    let mut failed = 0;
    for (ids, call) in calls {
        if ids.is_empty() {
            continue;
        }
        // The site's own answer time, plus the work's bound; a lost site is given the
        // bound only, and then skipped.
        let bound = if f.skip_if_unreachable { within } else { within * 2 };
        let answer = match tokio::time::timeout(bound, run.core.hooks.call(&f.site, &call)).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) | Err(_) if f.skip_if_unreachable => {
                for item in items.iter_mut().filter(|i| ids.contains(&i.target)) {
                    item.status = "skipped".into();
                    item.reason = format!("site {} did not answer within {bound:?}; not waited on", f.site);
                    item.ended_ms = now_ms();
                }
                continue;
            }
            Ok(Err(why)) => Answer {
                outcomes: ids
                    .iter()
                    .map(|i| crate::compute::Outcome {
                        instance_id: i.clone(),
                        result: "error".into(),
                        reason: why.clone(),
                    })
                    .collect(),
                ..Default::default()
            },
            Err(_) => Answer {
                outcomes: ids
                    .iter()
                    .map(|i| crate::compute::Outcome {
                        instance_id: i.clone(),
                        result: "error".into(),
                        reason: format!("no answer within {bound:?}"),
                    })
                    .collect(),
                ..Default::default()
            },
        };
        for item in items.iter_mut().filter(|i| ids.contains(&i.target)) {
            let o = answer.outcomes.iter().find(|o| o.instance_id == item.target);
            (item.status, item.reason) = match o {
                Some(o) if o.result == "success" => ("succeeded".into(), String::new()),
                Some(o) if o.result == "not-capable" => ("skipped".into(), format!("not capable: {}", o.reason)),
                Some(o) => ("failed".into(), o.reason.clone()),
                None => ("failed".into(), "the compute side gave no outcome for it".into()),
            };
            item.ended_ms = now_ms();
            if item.status == "failed" {
                failed += 1;
            }
        }
        // A tier that failed does not start the next.
        if failed > 0 && kind == "compute.start" && !f.continue_on_error {
            break;
        }
    }
    let n = items.len();
    run.state.steps[at].items = items;
    let note = format!("{} of {n} instance(s) at {} done", n - failed, f.site);
    match failed {
        0 => Ok(run.end_step("succeeded", note)),
        _ if f.continue_on_error => Ok(run.end_step("failed", note)),
        _ => {
            run.end_step("failed", note.clone());
            Err(ProcedureError::Fail(format!(
                "step {}: {note}; see `drover execution report {}`",
                f.name, ctx.execution_id
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_picked_by_their_groups_volumes_project_and_labels_lowest_tier_first() {
        let inst = |id: &str, project: &str, vols: &[&str], labels: &[(&str, &str)]| cpb::Instance {
            id: id.into(),
            project: project.into(),
            volume_ids: vols.iter().map(|v| v.to_string()).collect(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        let all = vec![
            inst("web", "shop", &["v2"], &[("app", "web")]),
            inst("db", "shop", &["v1", "v9"], &[("app", "db")]),
            inst("other", "shop", &["v9"], &[]),
            inst("hr", "hr", &["v3"], &[("app", "web")]),
        ];
        let tiers: BTreeMap<String, u32> = [("v1", 1), ("v2", 2), ("v3", 1)].map(|(v, t)| (v.to_string(), t)).into();
        let fields = |project: Option<&str>, labels: &[(&str, &str)]| ComputeFields {
            name: "s".into(),
            site: "site-b".into(),
            groups: Selector::default(),
            project: project.map(String::from),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            deadline: None,
            skip_if_unreachable: false,
            continue_on_error: false,
        };
        let ids = |t: Vec<Target>| t.into_iter().map(|t| (t.tier, t.instance.id)).collect::<Vec<_>>();
        assert_eq!(
            ids(pick(all.clone(), &tiers, &fields(None, &[]))),
            [(1, "db".to_string()), (1, "hr".into()), (2, "web".into())]
        );
        assert_eq!(
            ids(pick(all.clone(), &tiers, &fields(Some("shop"), &[]))),
            [(1, "db".to_string()), (2, "web".into())]
        );
        assert_eq!(
            ids(pick(all, &tiers, &fields(None, &[("app", "web")]))),
            [(1, "hr".to_string()), (2, "web".into())]
        );
    }
}
