//! `drover.v1.RunbookService`: validate, plan and run runbooks the client sends.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::{ApiError, ApiResult};
use crate::runbook::plan::{PlannedStep, Predictions, plan};

use crate::runbook::run::{RunbookRun, plan_to_pb};
use crate::runbook::schema::{Loaded, load};

/// `drover.v1.RunbookService`.
pub struct RunbookApi {
    pub core: Arc<Core>,
}

fn loaded(r: &pb::RunbookRequest, require_all: bool) -> ApiResult<Loaded> {
    let file = if r.file_name.is_empty() { "runbook.yaml" } else { &r.file_name };
    let params: BTreeMap<String, String> = r.params.clone().into_iter().collect();
    load(file, &r.text, &params, require_all).map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

fn to_plan(l: &Loaded, steps: &[PlannedStep]) -> pb::RunbookPlan {
    pb::RunbookPlan {
        name: l.runbook.name.clone(),
        description: l.runbook.description.clone(),
        params: l.params.clone().into_iter().collect(),
        steps: plan_to_pb(steps),
    }
}

/// What a non-admin may run: only step kinds open to tenants, and only on its own
/// project's groups (others are dropped from the plan, never named to it).
fn tenant_scope(who: &crate::auth::Caller, l: &Loaded, steps: &mut [PlannedStep]) -> ApiResult<()> {
    if who.is_admin() {
        return Ok(());
    }
    for s in &l.runbook.steps {
        s.as_kind().tenant_may_run().map_err(|why| {
            ApiError::PermissionDenied(format!("step {:?}: {why}; ask an admin to run this runbook", s.name()))
        })?;
    }
    for s in steps.iter_mut() {
        s.items.retain(|i| i.project == who.project);
    }
    Ok(())
}

/// The most groups one run moves. Its lock list (a lock per group) is kept apart from
/// its record since 2026-11-30, so the record no longer bounds this; runs this large
/// are what has been measured (submit, planning, a test failover's clone list, which
/// stays in the record), and larger ones are refused until they are.
pub const MAX_RUN_GROUPS: usize = 20_000;

impl RunbookApi {
    /// The plan, with predictions for each acting group (asked of up to 256 groups at
    /// once, each with the probe deadline): the RPO a disaster failover would achieve
    /// (asked of the side it would move to), and for a planned move the bytes its final
    /// sync would ship and the time that would take (the active side's estimate; a
    /// forced move's side, which may be lost, is not asked).
    async fn predicted(&self, l: &Loaded, text: &str) -> ApiResult<Vec<PlannedStep>> {
        use futures::StreamExt;
        let mut steps = plan(&self.core, l, text).await?;
        // Group id -> whether some step moves it planned (so its source is asked too).
        let mut ids: BTreeMap<String, bool> = BTreeMap::new();
        for (def, s) in l.runbook.steps.iter().zip(&steps) {
            if !matches!(s.kind.as_str(), "failover" | "failback" | "sync") {
                continue;
            }
            let planned = matches!(s.kind.as_str(), "failover" | "failback") && !def.as_kind().forced();
            for i in &s.items {
                *ids.entry(i.target.clone()).or_default() |= planned;
            }
        }
        let asks = ids.into_iter().map(|(id, planned)| async move {
            let g =
                self.core.repo.get::<crate::model::GroupRec>(&crate::model::keys::group(&id)).await.ok().flatten()?;
            let rpo_ms = super::shared::target_rpo_ms(&self.core, &g.rec).await;
            let (sync_bytes, sync_ms) = if planned {
                let infos = super::shared::volume_infos_with(&self.core, &g.rec, true).await.ok()?;
                let p = super::replication::predict(&infos);
                (p.bytes, p.ms)
            } else {
                (-1, -1)
            };
            Some((id, Predictions { rpo_ms, sync_bytes, sync_ms }))
        });
        let found: BTreeMap<String, Predictions> =
            futures::stream::iter(asks).buffer_unordered(256).filter_map(|p| async { p }).collect().await;
        for (def, s) in l.runbook.steps.iter().zip(steps.iter_mut()) {
            if !matches!(s.kind.as_str(), "failover" | "failback") {
                continue;
            }
            let forced = def.as_kind().forced();
            for i in &mut s.items {
                let Some(p) = found.get(&i.target) else { continue };
                // A failover loses what its group's newest complete point does not hold.
                if s.kind == "failover" {
                    i.rpo_ms = p.rpo_ms;
                }
                i.predictions = Predictions {
                    rpo_ms: if forced { p.rpo_ms } else { 0 },
                    sync_bytes: if forced { -1 } else { p.sync_bytes },
                    sync_ms: if forced { -1 } else { p.sync_ms },
                };
            }
        }
        Ok(steps)
    }
}

#[tonic::async_trait]
impl pb::runbook_service_server::RunbookService for RunbookApi {
    async fn validate_runbook(&self, req: Request<pb::RunbookRequest>) -> Result<Response<pb::RunbookPlan>, Status> {
        let who = crate::auth::caller(&req);
        let l = loaded(req.get_ref(), false)?;
        tenant_scope(&who, &l, &mut [])?;
        let steps = l
            .runbook
            .steps
            .iter()
            .map(|s| PlannedStep { name: s.name().into(), kind: s.kind().into(), items: Vec::new() })
            .collect::<Vec<_>>();
        Ok(Response::new(to_plan(&l, &steps)))
    }

    async fn plan_runbook(&self, req: Request<pb::RunbookRequest>) -> Result<Response<pb::RunbookPlan>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let l = loaded(&r, true)?;
        let mut steps = self.predicted(&l, &r.text).await?;
        tenant_scope(&who, &l, &mut steps)?;
        Ok(Response::new(to_plan(&l, &steps)))
    }

    async fn run_runbook(&self, req: Request<pb::RunbookRequest>) -> Result<Response<pb::Execution>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let l = loaded(&r, true)?;
        // Predictions first, so the report can set each beside what the move achieves.
        let mut steps = self.predicted(&l, &r.text).await?;
        tenant_scope(&who, &l, &mut steps)?;
        let mut run = RunbookRun::new(self.core.clone(), &l, steps);
        if !who.is_admin() {
            run = run.for_project(&who.project);
        }
        let groups = run.groups();
        if groups.len() > MAX_RUN_GROUPS {
            return Err(ApiError::InvalidArgument(format!(
                "runbook {} would move {} groups, and one run moves at most {MAX_RUN_GROUPS}; narrow its \
                 selectors (project, labels, tiers, names) and run it in parts",
                l.runbook.name,
                groups.len()
            ))
            .into());
        }
        // The run's items (one per group and step) are kept a key each, apart from its
        // record, so a run over any number of groups fits the store's request limit.
        // One execution at a time per group: a group another execution holds is refused
        // with that execution's id, before anything runs. The held group locks are read
        // in two ranges (as many keys as executions hold), not one read per group.
        let mut held = std::collections::HashSet::new();
        for prefix in ["group/", "runbook/group/"] {
            let lock_prefix = drover_procedure::keys::lock(prefix);
            let (kvs, _) = self.core.repo.store().range(lock_prefix.as_bytes()).await.map_err(ApiError::from)?;
            for kv in kvs {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                held.insert(key[lock_prefix.len() - prefix.len()..].to_string());
            }
        }
        for g in groups {
            for key in [format!("group/{g}"), format!("runbook/group/{g}")] {
                if !held.contains(&key) {
                    continue;
                }
                if let Some(holder) = self.core.procedures.lock_holder(&key).await.map_err(ApiError::from)? {
                    return Err(ApiError::FailedPrecondition(format!(
                        "group {g} is held by execution {holder}; wait for it (`drover execution watch {holder}`) \
                         or cancel it, then run again"
                    ))
                    .into());
                }
            }
        }
        let id = self
            .core
            .procedures
            .submit(Box::new(run))
            .await
            .map_err(|e| crate::procedures::submit_error(e, &format!("runbook {}", l.runbook.name)))?;
        let rec = self
            .core
            .procedures
            .get(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Internal(format!("execution {id} vanished right after it was submitted")))?;
        // As a watch shows it (at most 500 items of the first step, and counts): the
        // caller follows it from here. With every item, the answer to a run over about
        // 6,000 groups passed a client's default 4 MiB limit (5.4 MiB at 7,000).
        let rec = crate::runbook::run::with_current_items(self.core.repo.store().as_ref(), rec)
            .await
            .map_err(|e| ApiError::Unavailable(format!("execution {id} was submitted; reading its items: {e}")))?;
        Ok(Response::new(super::executions::to_pb_watched(rec)))
    }
}
