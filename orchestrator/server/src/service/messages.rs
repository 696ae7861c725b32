//! User messages (as Cinder's): failures no reply could tell a tenant, kept in the
//! project under `messages/<project>/<id>`. A failure that repeats (a periodic sync
//! failing at every interval) keeps one message per resource and event, with a count.
//! Messages expire `message_retention` after they last happened.

use std::sync::Arc;
use std::time::Duration;

use drover_procedure::{ExecutionRec, ExecutionStatus};
use drover_proto::v1 as pb;
use drover_store::{Compare, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::Core;
use crate::auth::caller;
use crate::error::{ApiError, ApiResult};
use crate::model::{GroupRec, keys, now_ms};
use crate::repo::{Repo, put, validate_name};

const PREFIX: &str = "messages/";

fn key(project: &str, id: &str) -> String {
    format!("{PREFIX}{project}/{id}")
}

/// A stored message.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessageRec {
    pub id: String,
    pub project: String,
    pub resource_type: String,
    pub resource_id: String,
    pub resource_name: String,
    pub event: String,
    pub detail: String,
    pub next_step: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub count: u32,
    pub expires_ms: i64,
}

impl MessageRec {
    fn to_pb(&self) -> pb::UserMessage {
        pb::UserMessage {
            id: self.id.clone(),
            project: self.project.clone(),
            resource_type: self.resource_type.clone(),
            resource_id: self.resource_id.clone(),
            resource_name: self.resource_name.clone(),
            event: self.event.clone(),
            detail: self.detail.clone(),
            next_step: self.next_step.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            count: self.count,
            expires_ms: self.expires_ms,
        }
    }
}

/// Records `m` (its id names the resource and event): a new message, or the existing one
/// counted once more with the newest detail. Conditional on what was read; a lost race
/// retries once, then gives up with a warning (the failure will be reported again).
pub async fn raise(repo: &Repo, retention: Duration, mut m: MessageRec) {
    let k = key(&m.project, &m.id);
    for _ in 0..2 {
        let now = now_ms();
        let old = match repo.get::<MessageRec>(&k).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(message = %k, error = %e, "a user message could not be read");
                return;
            }
        };
        let compare = match &old {
            Some(v) => Compare::ModRevisionEquals(k.clone().into_bytes(), v.rev),
            None => Compare::Absent(k.clone().into_bytes()),
        };
        m.created_ms = old.as_ref().map_or(now, |v| v.rec.created_ms);
        m.count = old.as_ref().map_or(1, |v| v.rec.count + 1);
        m.updated_ms = now;
        m.expires_ms = now + retention.as_millis() as i64;
        match repo.txn(Txn::new().when(compare).and_then(put(&k, &m))).await {
            Ok(r) if r.succeeded => return,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(message = %k, error = %e, "a user message could not be written");
                return;
            }
        }
    }
}

/// Periodic syncs an agent reported failing: one message per group, in its project.
pub async fn sync_failures(core: &Core, failures: &[pb::SyncFailure]) {
    // One message write per group, with its newest failure, however many a heartbeat holds.
    let mut newest: std::collections::BTreeMap<&str, &pb::SyncFailure> = std::collections::BTreeMap::new();
    for f in failures {
        newest.entry(f.group_id.as_str()).and_modify(|n| *n = if f.at_ms >= n.at_ms { f } else { n }).or_insert(f);
    }
    for f in newest.into_values() {
        let Ok(Some(g)) = core.repo.get::<GroupRec>(&keys::group(&f.group_id)).await else { continue };
        let g = g.rec;
        let (kind, name) = if g.for_volume.is_empty() { ("group", g.name.clone()) } else { ("volume", g.name.clone()) };
        let m = MessageRec {
            id: format!("sync-failed-{}", g.id),
            project: g.project.clone(),
            resource_type: kind.into(),
            resource_id: if g.for_volume.is_empty() { g.id.clone() } else { g.for_volume.clone() },
            resource_name: name.clone(),
            event: "periodic-sync-failed".into(),
            detail: format!("a periodic sync of {kind} {name} at {} failed: {}", g.active_backend, f.error),
            next_step: format!(
                "the RPO grows until syncs succeed again: check the replication target with `drover {kind} \
                 replication-info {name}` and the backends with `drover backend list`; delete this message once handled"
            ),
            ..Default::default()
        };
        raise(&core.repo, core.config.message_retention, m).await;
    }
}

/// An execution of a project that failed (its caller may have left long ago): ended
/// failed, or ended with an error answer (how a refused operation ends).
pub fn execution_ended(core: &Arc<Core>, rec: &ExecutionRec) {
    let answered_error = rec.output.get("result").and_then(|r| r.as_str()) == Some("err");
    if rec.project.is_empty() || !(rec.status == ExecutionStatus::Failed || answered_error) {
        return;
    }
    let error = if answered_error {
        rec.output.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string()
    } else {
        rec.error.clone()
    };
    let m = MessageRec {
        id: format!("execution-failed-{}", rec.id),
        project: rec.project.clone(),
        resource_type: "execution".into(),
        resource_id: rec.id.clone(),
        resource_name: rec.summary.clone(),
        event: "execution-failed".into(),
        detail: format!("{} failed: {error}", rec.summary),
        next_step: format!("see `drover execution show {}` for each step, fix the cause and run it again", rec.id),
        ..Default::default()
    };
    let (repo, retention) = (core.repo.clone(), core.config.message_retention);
    tokio::spawn(async move { raise(&repo, retention, m).await });
}

/// Deletes expired messages every `every` until the process stops.
pub async fn prune_forever(repo: Repo, every: Duration) {
    loop {
        if let Ok(all) = repo.list::<MessageRec>(PREFIX).await {
            let now = now_ms();
            for m in all.into_iter().filter(|m| m.rec.expires_ms < now) {
                let k = key(&m.rec.project, &m.rec.id);
                let txn = Txn::new()
                    .when(Compare::ModRevisionEquals(k.clone().into_bytes(), m.rev))
                    .and_then(TxnOp::delete(k));
                if let Err(e) = repo.txn(txn).await {
                    tracing::warn!(error = %e, "pruning expired user messages failed; retrying later");
                    break;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// drover.v1.MessageService.
pub struct MessageApi {
    pub core: Arc<Core>,
}

impl MessageApi {
    /// The unexpired messages the caller may see in `project` (every project for an admin
    /// naming none).
    async fn visible(&self, project: &str) -> ApiResult<Vec<crate::repo::Versioned<MessageRec>>> {
        let prefix = if project.is_empty() { PREFIX.to_string() } else { format!("{PREFIX}{project}/") };
        let now = now_ms();
        Ok(self.core.repo.list::<MessageRec>(&prefix).await?.into_iter().filter(|m| m.rec.expires_ms >= now).collect())
    }

    async fn find(&self, req: Request<pb::GetMessageRequest>) -> ApiResult<crate::repo::Versioned<MessageRec>> {
        let who = caller(&req);
        let r = req.into_inner();
        let project = who.scope(&r.project)?;
        if r.id.is_empty() || r.id.len() > 200 || r.id.contains('/') || r.id.chars().any(char::is_control) {
            return Err(ApiError::InvalidArgument(format!(
                "`id` {:?} is not a message id; see `drover message list`",
                r.id
            )));
        }
        let found = if project.is_empty() {
            self.visible("").await?.into_iter().find(|m| m.rec.id == r.id)
        } else {
            self.core.repo.get::<MessageRec>(&key(&project, &r.id)).await?.filter(|m| m.rec.expires_ms >= now_ms())
        };
        found.ok_or_else(|| {
            ApiError::NotFound(format!("message {:?} not found (or expired); see `drover message list`", r.id))
        })
    }
}

#[tonic::async_trait]
impl pb::message_service_server::MessageService for MessageApi {
    async fn list_messages(
        &self,
        req: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let who = caller(&req);
        let project = who.scope(&req.into_inner().project)?;
        if !project.is_empty() {
            validate_name("project", &project)?;
        }
        let mut messages: Vec<pb::UserMessage> = self.visible(&project).await?.iter().map(|m| m.rec.to_pb()).collect();
        messages.sort_by_key(|m| std::cmp::Reverse(m.updated_ms));
        Ok(Response::new(pb::ListMessagesResponse { messages }))
    }

    async fn get_message(&self, req: Request<pb::GetMessageRequest>) -> Result<Response<pb::UserMessage>, Status> {
        Ok(Response::new(self.find(req).await?.rec.to_pb()))
    }

    async fn delete_message(
        &self,
        req: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::DeleteMessageResponse>, Status> {
        let m = self.find(req).await?;
        let k = key(&m.rec.project, &m.rec.id);
        let txn = Txn::new().when(Compare::ModRevisionEquals(k.clone().into_bytes(), m.rev)).and_then(TxnOp::delete(k));
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(ApiError::Aborted(format!("message {} changed meanwhile; read it again", m.rec.id)).into());
        }
        Ok(Response::new(pb::DeleteMessageResponse {}))
    }
}
