//! `drover.v1.RunbookService`: validate, plan and run runbooks the client sends.

use std::collections::BTreeMap;
use std::sync::Arc;

use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::{ApiError, ApiResult};
use crate::runbook::plan::{PlannedStep, plan};
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

impl RunbookApi {
    /// The plan, with each acting group's current RPO as its predicted one (asked of all
    /// groups at once, each with the probe deadline).
    async fn predicted(&self, l: &Loaded, text: &str) -> ApiResult<Vec<PlannedStep>> {
        let mut steps = plan(&self.core, l, text).await?;
        let mut rpo: BTreeMap<String, i64> = BTreeMap::new();
        let ids: Vec<String> = steps
            .iter()
            .filter(|s| matches!(s.kind.as_str(), "failover" | "failback" | "sync"))
            .flat_map(|s| s.items.iter().map(|i| i.target.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let asks = ids.iter().map(|id| async move {
            let g =
                self.core.repo.get::<crate::model::GroupRec>(&crate::model::keys::group(id)).await.ok().flatten()?;
            let infos = super::shared::volume_infos(&self.core, &g.rec).await.ok()?;
            Some((id.clone(), super::shared::rpo_ms(&infos)))
        });
        for (id, r) in futures::future::join_all(asks).await.into_iter().flatten() {
            rpo.insert(id, r);
        }
        // A failover loses what its group's newest complete point does not hold.
        for s in steps.iter_mut().filter(|s| s.kind == "failover") {
            for i in &mut s.items {
                i.rpo_ms = rpo.get(&i.target).copied().unwrap_or(-1);
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
        let mut steps = plan(&self.core, &l, &r.text).await?;
        tenant_scope(&who, &l, &mut steps)?;
        let mut run = RunbookRun::new(self.core.clone(), &l, steps);
        if !who.is_admin() {
            run = run.for_project(&who.project);
        }
        // One execution at a time per group: a group another execution holds is refused
        // with that execution's id, before anything runs.
        for g in run.groups() {
            for key in [format!("group/{g}"), format!("runbook/group/{g}")] {
                let lock = drover_procedure::keys::lock(&key);
                if let Some(kv) = self.core.repo.store().get(lock.as_bytes()).await.map_err(ApiError::from)? {
                    let holder = String::from_utf8_lossy(&kv.value).into_owned();
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
        Ok(Response::new(super::executions::to_pb(rec)))
    }
}
