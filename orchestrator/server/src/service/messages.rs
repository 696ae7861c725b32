//! User messages (as Cinder's): failures no reply could tell a tenant, kept in the
//! project under `messages/<project>/<id>`. A failure that repeats (a periodic sync
//! failing at every interval) keeps one message per resource and event, with a count.
//! Messages expire `message_retention` after they last happened.
//!
//! Two index keys follow each message, written and deleted in the transactions that
//! write and delete it: `message-times/<project>/<newest first>/<id>`, which lists a
//! project's messages newest first a page at a time, and
//! `message-expiry/<expiry ms>/<project>/<id>`, which the pruner reads from the oldest
//! until the first that has not expired. Each holds `<project>/<id>`, the record's key
//! under `messages/`. Messages written before the indexes get theirs at start.

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
use crate::repo::{PageRequest, Repo, put, validate_name};

const PREFIX: &str = "messages/";
const TIMES: &str = "message-times/";
const EXPIRY: &str = "message-expiry/";
/// Written once every message of the store has its index keys.
const INDEX_BUILT: &str = "migrations/message-index";
/// Latest time a time key can hold: keys store it minus the message's time.
const TIME_TOP: i64 = 9_999_999_999_999;

fn key(project: &str, id: &str) -> String {
    format!("{PREFIX}{project}/{id}")
}

/// The two index keys of `m` as it is stored.
fn index_keys(m: &MessageRec) -> [String; 2] {
    [
        format!("{TIMES}{}/{:013}/{}", m.project, (TIME_TOP - m.updated_ms).max(0), m.id),
        format!("{EXPIRY}{:013}/{}/{}", m.expires_ms.clamp(0, TIME_TOP), m.project, m.id),
    ]
}

/// Writes of `m`'s record and index keys, and deletes of the index keys of `old` (its
/// previous version) that `m` does not keep.
fn writes(m: &MessageRec, old: Option<&MessageRec>) -> Vec<TxnOp> {
    let new = index_keys(m);
    let mut ops = vec![put(&key(&m.project, &m.id), m)];
    ops.extend(new.iter().map(|k| TxnOp::put(k.clone(), format!("{}/{}", m.project, m.id))));
    if let Some(old) = old {
        ops.extend(index_keys(old).into_iter().filter(|k| !new.contains(k)).map(TxnOp::delete));
    }
    ops
}

/// Deletes of `m`'s record and index keys.
fn deletes(m: &MessageRec) -> Vec<TxnOp> {
    let mut ops = vec![TxnOp::delete(key(&m.project, &m.id))];
    ops.extend(index_keys(m).into_iter().map(TxnOp::delete));
    ops
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
        let txn = Txn::new().when(compare).and_then_all(writes(&m, old.as_ref().map(|v| &v.rec)));
        match repo.txn(txn).await {
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

/// The longest detail a failed execution's message keeps (the whole error stays in the
/// execution's record): the message rides in the end's transaction, which must stay
/// far below the store's request limit.
const DETAIL_MAX: usize = 2048;

fn bounded(mut detail: String) -> String {
    if detail.len() > DETAIL_MAX {
        let mut cut = DETAIL_MAX;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str(" … (cut short; the execution's record has the whole error)");
    }
    detail
}

/// The writes of the message an execution of a project leaves there when it fails (its
/// caller may have left long ago): ended failed, or ended with an error answer (how a
/// refused operation ends). None for any other end. They go in the execution's end
/// transaction (`Manager::on_end_writes`), so the message is stored if and only if the
/// end is: an orchestrator that dies right after an end cannot lose it. Its id names the
/// execution, which ends once, so it is always a new message.
pub fn execution_end_writes(retention: Duration, rec: &ExecutionRec) -> Vec<TxnOp> {
    let answered_error = rec.output.get("result").and_then(|r| r.as_str()) == Some("err");
    if rec.project.is_empty() || !(rec.status == ExecutionStatus::Failed || answered_error) {
        return Vec::new();
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
        detail: bounded(format!("{} failed: {error}", rec.summary)),
        next_step: format!("see `drover execution show {}` for each step, fix the cause and run it again", rec.id),
        created_ms: now_ms(),
        count: 1,
        ..Default::default()
    };
    let m = MessageRec { updated_ms: m.created_ms, expires_ms: m.created_ms + retention.as_millis() as i64, ..m };
    writes(&m, None)
}

/// Deletes expired messages every `every` until the process stops.
pub async fn prune_forever(repo: Repo, every: Duration) {
    loop {
        if let Err(e) = prune(&repo, now_ms()).await {
            tracing::warn!(error = %e, "pruning expired user messages failed; retrying later");
        }
        tokio::time::sleep(every).await;
    }
}

/// Deletes the messages that expired before `now`, read from the expiry index from the
/// oldest on: it reads the expired ones and one page more. Returns how many it deleted.
async fn prune(repo: &Repo, now: i64) -> ApiResult<usize> {
    let horizon = format!("{EXPIRY}{:013}/", now.clamp(0, TIME_TOP));
    let mut deleted = 0;
    let mut after = Vec::new();
    loop {
        let page = repo.store().range_page(EXPIRY.as_bytes(), &after, 100).await?;
        for kv in &page.kvs {
            if kv.key.as_slice() >= horizon.as_bytes() {
                return Ok(deleted);
            }
            let record = format!("{PREFIX}{}", String::from_utf8_lossy(&kv.value));
            let txn = match repo.get::<MessageRec>(&record).await? {
                // Only while the message is as read: one raised again meanwhile lives on.
                Some(m) if m.rec.expires_ms < now => Txn::new()
                    .when(Compare::ModRevisionEquals(record.into_bytes(), m.rev))
                    .and_then_all(deletes(&m.rec)),
                // An index key without its record (cannot happen, as they are written
                // together, but harmless to clear).
                None => Txn::new().when(Compare::Absent(record.into_bytes())).and_then(TxnOp::delete(kv.key.clone())),
                Some(_) => continue,
            };
            if repo.txn(txn).await?.succeeded {
                deleted += 1;
            }
        }
        match page.kvs.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => return Ok(deleted),
        }
    }
}

/// Writes the index keys of messages stored before the indexes, once per store (a
/// marker key is written last): each only while its message is as read.
pub async fn build_index(repo: &Repo) -> ApiResult<()> {
    if repo.store().get(INDEX_BUILT.as_bytes()).await?.is_some() {
        return Ok(());
    }
    let mut built = 0usize;
    let mut after = Vec::new();
    loop {
        let page = repo.store().range_page(PREFIX.as_bytes(), &after, 100).await?;
        for kv in &page.kvs {
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            let Ok(m) = serde_json::from_slice::<MessageRec>(&kv.value) else {
                tracing::warn!(message = %k, "a user message is unreadable; it is left out of the message index");
                continue;
            };
            // The record is written again as it is, with its index keys; a message raised
            // meanwhile was written with them already.
            let txn = Txn::new()
                .when(Compare::ModRevisionEquals(kv.key.clone(), kv.mod_revision))
                .and_then_all(writes(&m, None));
            if repo.txn(txn).await?.succeeded {
                built += 1;
            }
        }
        match page.kvs.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => break,
        }
    }
    repo.store().put(INDEX_BUILT.as_bytes(), b"1").await?;
    if built > 0 {
        tracing::info!(messages = built, "indexed the user messages written before the message index");
    }
    Ok(())
}

/// One page of the unexpired messages in `project`, newest first (every project's for
/// an admin naming none: by project, each newest first), and the next marker.
async fn page(repo: &Repo, project: &str, page: &PageRequest) -> ApiResult<(Vec<MessageRec>, String)> {
    let index = if project.is_empty() { TIMES.to_string() } else { format!("{TIMES}{project}/") };
    let (found, next) = repo.page::<MessageRec>(PREFIX, Some(index), page).await?;
    let now = now_ms();
    // An expired message the pruner has not reached yet is left out (the page may then be
    // short; its marker still goes on).
    Ok((found.into_iter().filter(|m| m.expires_ms >= now).collect(), next))
}

/// drover.v1.MessageService.
pub struct MessageApi {
    pub core: Arc<Core>,
}

impl MessageApi {
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
        if project.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "name the project of message {:?} (`--project`; `drover message list --all-projects` shows it)",
                r.id
            )));
        }
        let found =
            self.core.repo.get::<MessageRec>(&key(&project, &r.id)).await?.filter(|m| m.rec.expires_ms >= now_ms());
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
        let r = req.into_inner();
        let project = who.scope(&r.project)?;
        if !project.is_empty() {
            validate_name("project", &project)?;
        }
        let (found, next_marker) =
            page(&self.core.repo, &project, &PageRequest { limit: r.limit, marker: r.marker }).await?;
        let messages = found.iter().map(MessageRec::to_pb).collect();
        Ok(Response::new(pb::ListMessagesResponse { messages, next_marker }))
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
        let txn = Txn::new().when(Compare::ModRevisionEquals(k.into_bytes(), m.rev)).and_then_all(deletes(&m.rec));
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(ApiError::Aborted(format!("message {} changed meanwhile; read it again", m.rec.id)).into());
        }
        Ok(Response::new(pb::DeleteMessageResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::repo::temp_repo as repo;

    fn msg(project: &str, id: &str, updated_ms: i64, expires_ms: i64) -> MessageRec {
        MessageRec {
            id: id.into(),
            project: project.into(),
            event: "execution-failed".into(),
            created_ms: updated_ms,
            updated_ms,
            expires_ms,
            count: 1,
            ..Default::default()
        }
    }

    async fn count(repo: &Repo, prefix: &str) -> usize {
        repo.store().range(prefix.as_bytes()).await.unwrap().0.len()
    }

    async fn ids(repo: &Repo, project: &str, limit: u32) -> (Vec<Vec<String>>, usize) {
        let (mut pages, mut calls, mut marker) = (Vec::new(), 0, String::new());
        loop {
            let (found, next) = page(repo, project, &PageRequest { limit, marker }).await.unwrap();
            calls += 1;
            pages.push(found.into_iter().map(|m| format!("{}/{}", m.project, m.id)).collect());
            if next.is_empty() {
                return (pages, calls);
            }
            marker = next;
        }
    }

    #[tokio::test]
    async fn a_failed_execution_of_a_project_leaves_a_message_through_its_end_writes() {
        let (_dir, repo) = repo().await;
        let rec = |id: &str, project: &str, status: &str, output: serde_json::Value| -> ExecutionRec {
            serde_json::from_value(serde_json::json!({
                "id": id, "kind": "group-transition", "summary": format!("failover of {id}"), "status": status,
                "step": "", "steps": [], "locks": [], "created_ms": 0, "updated_ms": 0, "project": project,
                "error": "the target is unreachable", "output": output, "state": {},
            }))
            .unwrap()
        };
        let retention = Duration::from_secs(600);
        let ok = serde_json::json!({"result": "ok", "value": {}});
        let refused = serde_json::json!({"result": "err", "message": "refused: not replicated"});
        assert!(execution_end_writes(retention, &rec("e0", "p", "succeeded", ok.clone())).is_empty());
        assert!(execution_end_writes(retention, &rec("e1", "", "failed", ok)).is_empty(), "no project, no message");
        let failed = execution_end_writes(retention, &rec("e2", "p", "failed", serde_json::Value::Null));
        let answered = execution_end_writes(retention, &rec("e3", "p", "succeeded", refused));
        repo.txn(Txn::new().and_then_all(failed).and_then_all(answered)).await.unwrap();
        let (found, _) = page(&repo, "p", &PageRequest { limit: 10, marker: String::new() }).await.unwrap();
        let mut found: Vec<(String, String, u32)> =
            found.into_iter().map(|m| (m.id.clone(), m.detail.clone(), m.count)).collect();
        found.sort();
        assert_eq!(
            found,
            [
                ("execution-failed-e2".into(), "failover of e2 failed: the target is unreachable".into(), 1),
                ("execution-failed-e3".into(), "failover of e3 failed: refused: not replicated".into(), 1),
            ]
        );
        let stored = repo.get::<MessageRec>(&key("p", "execution-failed-e2")).await.unwrap().unwrap().rec;
        assert_eq!(stored.expires_ms - stored.updated_ms, 600_000, "kept for the retention");
        // A huge error is cut short in the message (it rides in the end's transaction).
        let mut huge = rec("e4", "p", "failed", serde_json::Value::Null);
        huge.error = "é".repeat(100_000);
        let writes = execution_end_writes(retention, &huge);
        let bytes: usize = writes
            .iter()
            .map(|w| match w {
                TxnOp::Put { key, value, .. } => key.len() + value.len(),
                other => panic!("only puts: {other:?}"),
            })
            .sum();
        assert!(bytes < 4_000, "{bytes} bytes of writes for a 200 KB error");
        assert_eq!((count(&repo, TIMES).await, count(&repo, EXPIRY).await), (2, 2), "indexed for listing and pruning");
    }

    #[tokio::test]
    async fn a_message_raised_again_keeps_one_record_and_one_key_per_index() {
        let (_dir, repo) = repo().await;
        let m = msg("p", "sync-failed-g1", 0, 0);
        raise(&repo, Duration::from_secs(60), m.clone()).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        raise(&repo, Duration::from_secs(60), m).await;
        let stored = repo.get::<MessageRec>(&key("p", "sync-failed-g1")).await.unwrap().unwrap().rec;
        assert_eq!(stored.count, 2);
        assert_eq!((count(&repo, TIMES).await, count(&repo, EXPIRY).await), (1, 1), "the first raise's keys went");
        let (pages, _) = ids(&repo, "p", 10).await;
        assert_eq!(pages, vec![vec!["p/sync-failed-g1".to_string()]]);
    }

    #[tokio::test]
    async fn pages_are_newest_first_per_project_and_skip_the_expired() {
        let (_dir, repo) = repo().await;
        let far = now_ms() + 3_600_000;
        let mut txn = Txn::new();
        for (i, at) in [5, 1, 4, 2, 3].into_iter().enumerate() {
            txn = txn.and_then_all(writes(&msg("p", &format!("m{i}"), at * 1000, far), None));
        }
        txn = txn.and_then_all(writes(&msg("p", "old", 6000, 1), None));
        txn = txn.and_then_all(writes(&msg("q", "theirs", 9000, far), None));
        repo.txn(txn).await.unwrap();
        let (pages, calls) = ids(&repo, "p", 2).await;
        let flat: Vec<String> = pages.concat();
        // Newest first: m0 (5 s), m2 (4 s), m4 (3 s), m3 (2 s), m1 (1 s); the expired one
        // (the newest) left out, and q's not among them.
        assert_eq!(flat, ["p/m0", "p/m2", "p/m4", "p/m3", "p/m1"]);
        assert_eq!(calls, 3, "pages of at most 2: {pages:?}");
        assert!(pages[0].len() == 1, "the expired message leaves its page short: {pages:?}");
        let (all, _) = ids(&repo, "", 0).await;
        assert_eq!(all.concat().len(), 6, "an admin's listing: every project");
        assert_eq!(all.concat()[5], "q/theirs", "by project");
        let bad = page(&repo, "p", &PageRequest { limit: 5000, marker: String::new() }).await;
        assert!(matches!(bad, Err(ApiError::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn pruning_reads_the_expired_and_deletes_them_with_their_keys() {
        let (_dir, repo) = repo().await;
        let mut txn = Txn::new();
        for i in 0..150 {
            // Expired: 0..120 (at 1,000..120,000 ms); the rest expire later.
            txn = txn.and_then_all(writes(&msg("p", &format!("m{i:03}"), 0, 1000 + i * 1000), None));
        }
        repo.txn(txn).await.unwrap();
        assert_eq!(prune(&repo, 120_500).await.unwrap(), 120);
        assert_eq!((count(&repo, PREFIX).await, count(&repo, TIMES).await, count(&repo, EXPIRY).await), (30, 30, 30));
        assert_eq!(prune(&repo, 120_500).await.unwrap(), 0, "nothing more to do");
        // A message raised again after its key was read lives on: the delete is
        // conditional on the record as read, and its expiry moved.
        let again = msg("p", "m120", 0, 10_000_000);
        let old = repo.get::<MessageRec>(&key("p", "m120")).await.unwrap().unwrap();
        repo.txn(Txn::new().and_then_all(writes(&again, Some(&old.rec)))).await.unwrap();
        assert_eq!(prune(&repo, 200_000).await.unwrap(), 29);
        assert!(repo.get::<MessageRec>(&key("p", "m120")).await.unwrap().is_some());
        assert_eq!((count(&repo, TIMES).await, count(&repo, EXPIRY).await), (1, 1));
    }

    #[tokio::test]
    async fn messages_stored_before_the_index_are_indexed_once() {
        let (_dir, repo) = repo().await;
        let far = now_ms() + 3_600_000;
        for i in 0..3 {
            let m = msg("p", &format!("m{i}"), i * 1000, far);
            repo.txn(Txn::new().and_then(put(&key("p", &m.id), &m))).await.unwrap();
        }
        assert!(ids(&repo, "p", 0).await.0.concat().is_empty(), "not listed before");
        build_index(&repo).await.unwrap();
        assert_eq!(ids(&repo, "p", 0).await.0.concat(), ["p/m2", "p/m1", "p/m0"]);
        assert_eq!(count(&repo, EXPIRY).await, 3);
        // Once: the marker stops a second build (a message without keys stays unlisted).
        let m = msg("p", "late", 9000, far);
        repo.txn(Txn::new().and_then(put(&key("p", &m.id), &m))).await.unwrap();
        build_index(&repo).await.unwrap();
        assert_eq!(count(&repo, TIMES).await, 3);
    }
}
