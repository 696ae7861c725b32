//! `drover.v1.ExecutionService`: list, show, watch and cancel executions.

use std::sync::Arc;

use drover_procedure::{ExecutionRec, SubmitError};
use drover_proto::v1 as pb;
use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::Core;
use crate::auth::{Caller, caller};
use crate::error::ApiError;

/// `drover.v1.ExecutionService`.
pub struct ExecutionApi {
    pub core: Arc<Core>,
}

/// The most locks a watch update (or the answer to `RunRunbook`) lists.
pub const WATCHED_LOCKS: usize = 100;

/// An execution as a watcher sees it: as [`to_pb`], listing at most [`WATCHED_LOCKS`]
/// of its locks (`lock_count` counts them all). A run over a site holds one per group;
/// every update would otherwise carry them all.
pub fn to_pb_watched(r: ExecutionRec) -> pb::Execution {
    let mut e = to_pb(r);
    e.locks.truncate(WATCHED_LOCKS);
    e
}

/// An execution as the API shows it.
pub fn to_pb(r: ExecutionRec) -> pb::Execution {
    pb::Execution {
        id: r.id,
        kind: r.kind,
        summary: r.summary,
        status: r.status.as_str().into(),
        step: r.step,
        steps: r
            .steps
            .into_iter()
            .map(|s| pb::ExecutionStep {
                name: s.name,
                started_ms: s.started_ms,
                ended_ms: s.ended_ms,
                note: s.note,
                epoch: s.epoch,
            })
            .collect(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        error: r.error,
        cancel_requested: r.cancel_requested,
        epoch: r.epoch,
        owner: r.owner,
        claims: r.claims,
        lock_count: (r.locks.len() as u32).max(r.locks_apart),
        locks: r.locks,
        output_json: if r.output.is_null() { String::new() } else { r.output.to_string() },
        paused: r.paused,
        parent: r.parent,
        state_json: r.state.to_string(),
        project: r.project,
        trace_id: r.trace_id,
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("execution {id:?} not found; list executions with `drover execution list`"))
}

fn require_id(id: &str) -> Result<(), ApiError> {
    if id.trim().is_empty() {
        return Err(ApiError::InvalidArgument("`id` is required: an execution id from `drover execution list`".into()));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::execution_service_server::ExecutionService for ExecutionApi {
    async fn list_executions(
        &self,
        req: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let want = r.status;
        let limit = crate::repo::PageRequest { limit: r.limit, marker: r.marker.clone() }.limit()?;
        if !want.is_empty() && !["running", "succeeded", "failed", "cancelled"].contains(&want.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "`status` {want:?} is not one of running, succeeded, failed, cancelled"
            ))
            .into());
        }
        // Newest first, from the index of the caller's scope (every execution for an
        // admin, the project's for a member or reader), a page at a time. A status
        // filter reads on until the page is full, or 10 pages' worth were read (the
        // page may then hold fewer; `next_marker` goes on from there).
        let scope = if who.is_admin() { None } else { Some(who.project.as_str()) };
        if want == "running" {
            // The running ones come from the index of pending executions.
            let mut running = self.core.procedures.running().await.map_err(ApiError::from)?;
            running.retain(|e| {
                e.status.as_str() == "running" && who.sees(&e.project) && (r.marker.is_empty() || e.id < r.marker)
            });
            running.sort_by(|a, b| b.id.cmp(&a.id));
            let more = running.len() > limit;
            running.truncate(limit);
            let next_marker =
                if more { running.last().map(|e| e.id.clone()).unwrap_or_default() } else { String::new() };
            let mut executions = Vec::with_capacity(running.len());
            for rec in running {
                executions.push(self.full(rec).await?);
            }
            return Ok(Response::new(pb::ListExecutionsResponse { executions, next_marker }));
        }
        let (mut page, mut marker, mut read) = (Vec::new(), r.marker.clone(), 0);
        loop {
            let (recs, next) =
                self.core.procedures.list_page(scope, &marker, limit - page.len()).await.map_err(ApiError::from)?;
            read += recs.len();
            page.extend(recs.into_iter().filter(|rec| want.is_empty() || rec.status.as_str() == want));
            marker = next;
            if marker.is_empty() || page.len() >= limit || read >= limit * 10 {
                break;
            }
        }
        let next_marker = marker;
        let mut executions = Vec::with_capacity(page.len());
        for rec in page {
            executions.push(self.full(rec).await?);
        }
        Ok(Response::new(pb::ListExecutionsResponse { executions, next_marker }))
    }

    async fn get_execution(&self, req: Request<pb::GetExecutionRequest>) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        let rec = self.visible(&who, &id).await?;
        Ok(Response::new(self.full(rec).await?))
    }

    type WatchExecutionStream = futures::stream::BoxStream<'static, Result<pb::Execution, Status>>;

    async fn watch_execution(
        &self,
        req: Request<pb::GetExecutionRequest>,
    ) -> Result<Response<Self::WatchExecutionStream>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        self.visible(&who, &id).await?;
        let store = self.core.repo.store().clone();
        let stream = self.core.procedures.watch(&id).then(move |r| {
            let store = store.clone();
            async move {
                let rec = r.map_err(|e| Status::from(ApiError::from(e)))?;
                // While it runs, the step it is at (a watcher's progress); once ended, all.
                crate::runbook::run::with_current_items(store.as_ref(), rec)
                    .await
                    .map(to_pb_watched)
                    .map_err(Status::unavailable)
            }
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn cancel_execution(
        &self,
        req: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        self.visible(&who, &id).await?;
        match self.core.procedures.cancel(&id).await {
            Ok(rec) => Ok(Response::new(self.full(rec).await?)),
            Err(SubmitError::NotFound(_)) => Err(not_found(&id).into()),
            Err(e @ SubmitError::Ended { .. }) => Err(ApiError::FailedPrecondition(e.to_string()).into()),
            Err(SubmitError::Store(s)) => Err(ApiError::from(s).into()),
            Err(e) => Err(ApiError::Internal(e.to_string()).into()),
        }
    }

    async fn pause_execution(
        &self,
        req: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        self.visible(&who, &id).await?;
        self.core.procedures.pause(&id).await.map_err(|e| control_error(&id, e))?;
        self.current(&id).await
    }

    async fn resume_execution(
        &self,
        req: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        self.visible(&who, &id).await?;
        self.core.procedures.resume(&id).await.map_err(|e| control_error(&id, e))?;
        self.current(&id).await
    }

    async fn decide_prompt(&self, req: Request<pb::DecidePromptRequest>) -> Result<Response<pb::Execution>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let rec = self.visible(&who, &r.id).await?;
        let prompt = if r.prompt.is_empty() {
            match rec.step.strip_prefix("prompt:") {
                Some(p) if !rec.status.is_terminal() => p.to_string(),
                _ => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "execution {} is not waiting at a prompt (its step is {}, status {}); name the prompt to \
                         decide one ahead",
                        r.id,
                        rec.step,
                        rec.status.as_str()
                    ))
                    .into());
                }
            }
        } else {
            r.prompt.clone()
        };
        if rec.kind != crate::runbook::run::KIND {
            return Err(ApiError::FailedPrecondition(format!(
                "execution {} is a {}, which has no prompts",
                r.id, rec.kind
            ))
            .into());
        }
        let by = if r.by.trim().is_empty() { "unknown".to_string() } else { r.by.clone() };
        self.core
            .procedures
            .decide(&r.id, &prompt, r.approve, &by, &r.comment)
            .await
            .map_err(|e| control_error(&r.id, e))?;
        self.current(&r.id).await
    }

    async fn get_execution_report(
        &self,
        req: Request<pb::GetExecutionReportRequest>,
    ) -> Result<Response<pb::ExecutionReport>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        require_id(&r.id)?;
        let format = if r.format.is_empty() { "json".to_string() } else { r.format.clone() };
        if !["json", "md"].contains(&format.as_str()) {
            return Err(ApiError::InvalidArgument(format!("report format {format:?}: use json or md")).into());
        }
        let rec = self.visible(&who, &r.id).await?;
        runbook_only(&rec, "reports are made for runbook executions")?;
        let rec = crate::runbook::run::with_items(self.core.repo.store().as_ref(), rec)
            .await
            .map_err(|e| ApiError::Unavailable(format!("reading the items of execution {}: {e}; try again", r.id)))?;
        let state: crate::runbook::run::RunState = serde_json::from_value(rec.state.clone())
            .map_err(|e| ApiError::Internal(format!("execution {} has an unreadable state: {e}", r.id)))?;
        let report = crate::runbook::report::build(&self.core, &state, &r.id, rec.status.as_str()).await;
        let text = if format == "md" {
            crate::runbook::report::markdown(&report)
        } else {
            serde_json::to_string_pretty(&report).expect("reports serialise")
        };
        Ok(Response::new(pb::ExecutionReport { format, text }))
    }

    async fn list_execution_items(
        &self,
        req: Request<pb::ListExecutionItemsRequest>,
    ) -> Result<Response<pb::ListExecutionItemsResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let rec = self.visible(&who, &r.id).await?;
        runbook_only(&rec, "only runbook executions have items")?;
        let steps = rec.state.get("steps").and_then(|s| s.as_array()).map_or(0, Vec::len);
        if r.step as usize >= steps {
            return Err(ApiError::InvalidArgument(format!(
                "execution {} has {steps} step(s), numbered from 0; `step` {} is not one of them",
                r.id, r.step
            ))
            .into());
        }
        let page = crate::repo::PageRequest { limit: r.limit, marker: r.marker };
        let (items_json, next_marker) =
            crate::runbook::run::items_page(self.core.repo.store().as_ref(), &rec, r.step as usize, &page).await?;
        Ok(Response::new(pb::ListExecutionItemsResponse { items_json, next_marker, steps: steps as u32 }))
    }
}

impl ExecutionApi {
    /// The execution, if it exists for this caller: another project's (or, for a
    /// non-admin, a deployment-wide one) is not found, exactly like a missing one.
    async fn visible(&self, who: &Caller, id: &str) -> Result<ExecutionRec, Status> {
        require_id(id)?;
        match self.core.procedures.get(id).await.map_err(ApiError::from)? {
            Some(rec) if who.sees(&rec.project) => Ok(rec),
            _ => Err(not_found(id).into()),
        }
    }

    async fn current(&self, id: &str) -> Result<Response<pb::Execution>, Status> {
        let rec = self.core.procedures.get(id).await.map_err(ApiError::from)?.ok_or_else(|| not_found(id))?;
        Ok(Response::new(self.full(rec).await?))
    }

    /// The execution as the API shows it: a runbook's items put back in its state.
    async fn full(&self, mut rec: ExecutionRec) -> Result<pb::Execution, Status> {
        let id = rec.id.clone();
        rec.locks =
            self.core.procedures.locks_of(&rec).await.map_err(|e| {
                ApiError::Unavailable(format!("reading the lock list of execution {id}: {e}; try again"))
            })?;
        crate::runbook::run::with_items(self.core.repo.store().as_ref(), rec)
            .await
            .map(to_pb)
            .map_err(|e| ApiError::Unavailable(format!("reading the items of execution {id}: {e}; try again")).into())
    }
}

/// Refuses `rec` unless it is a runbook execution, saying `why` only those qualify.
fn runbook_only(rec: &ExecutionRec, why: &str) -> Result<(), ApiError> {
    if rec.kind == crate::runbook::run::KIND {
        return Ok(());
    }
    Err(ApiError::FailedPrecondition(format!(
        "execution {} is a {}; {why} (see `drover execution show {}`)",
        rec.id, rec.kind, rec.id
    )))
}

fn control_error(id: &str, e: SubmitError) -> Status {
    match e {
        SubmitError::NotFound(_) => not_found(id).into(),
        e @ (SubmitError::Ended { .. } | SubmitError::Decided { .. }) => {
            ApiError::FailedPrecondition(e.to_string()).into()
        }
        SubmitError::Store(s) => ApiError::from(s).into(),
        e => ApiError::Internal(e.to_string()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_execution_lists_its_first_locks_and_counts_them_all() {
        let locks: Vec<String> = (0..250).map(|i| format!("runbook/group/g{i:03}")).collect();
        let rec: ExecutionRec = serde_json::from_value(serde_json::json!({
            "id": "run1", "kind": "runbook", "summary": "", "status": "running", "step": "", "steps": [],
            "locks": locks, "created_ms": 0, "updated_ms": 0, "state": {},
        }))
        .unwrap();
        let watched = to_pb_watched(rec.clone());
        assert_eq!((watched.locks.len(), watched.lock_count), (WATCHED_LOCKS, 250));
        assert_eq!(watched.locks[..], locks[..WATCHED_LOCKS]);
        let full = to_pb(rec);
        assert_eq!((full.locks.len(), full.lock_count), (250, 250));
    }
}
