//! The audit trail: one record per mutating call, accepted or refused, under
//! `audit/<at_ms, zero-padded>-<uuid>` so keys sort by time. Written by the auth layer
//! after the call answers; old records are pruned after `auth.audit_retention`.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_store::{Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::model::now_ms;
use crate::repo::{Repo, put};
use crate::service::Core;

const PREFIX: &str = "audit/";

/// A stored audit record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditRec {
    pub id: String,
    pub at_ms: i64,
    pub token_id: String,
    pub project: String,
    pub role: String,
    pub method: String,
    pub code: String,
    pub message: String,
    pub peer: String,
}

impl AuditRec {
    fn to_pb(&self) -> pb::AuditRecord {
        pb::AuditRecord {
            id: self.id.clone(),
            at_ms: self.at_ms,
            token_id: self.token_id.clone(),
            project: self.project.clone(),
            role: self.role.clone(),
            method: self.method.clone(),
            code: self.code.clone(),
            message: self.message.clone(),
            peer: self.peer.clone(),
        }
    }
}

/// Writes one record (its id and time are filled in here).
pub async fn record(repo: &Repo, mut rec: AuditRec) {
    rec.at_ms = now_ms();
    rec.id = format!("{:013}-{}", rec.at_ms, uuid::Uuid::now_v7().simple());
    let key = format!("{PREFIX}{}", rec.id);
    if let Err(e) = repo.txn(Txn::new().and_then(put(&key, &rec))).await {
        tracing::warn!(method = %rec.method, code = %rec.code, error = %e, "an audit record could not be written");
    }
}

/// Deletes records older than `retention`, every `every`, until the process stops.
pub async fn prune_forever(repo: Repo, retention: Duration, every: Duration) {
    loop {
        if let Err(e) = prune(&repo, now_ms() - retention.as_millis() as i64).await {
            tracing::warn!(error = %e, "pruning old audit records failed; retrying later");
        }
        tokio::time::sleep(every).await;
    }
}

/// Records read (and at most deleted) per page of [`prune`].
const PRUNE_PAGE: usize = 500;

/// Deletes the records written before `horizon_ms`; returns how many. Keys sort by time,
/// so it reads from the oldest a page at a time and stops at the first record it keeps:
/// what it reads is what it deletes, plus one page at most, however many records there
/// are.
pub async fn prune(repo: &Repo, horizon_ms: i64) -> Result<usize, drover_store::StoreError> {
    let horizon = format!("{PREFIX}{horizon_ms:013}");
    let mut deleted = 0;
    loop {
        // Deleted keys are gone, so each page starts at the oldest left.
        let page = repo.store().range_page(PREFIX.as_bytes(), b"", PRUNE_PAGE).await?;
        let old: Vec<&[u8]> =
            page.kvs.iter().map(|kv| kv.key.as_slice()).take_while(|k| *k < horizon.as_bytes()).collect();
        for chunk in old.chunks(64) {
            let txn = chunk.iter().fold(Txn::new(), |t, k| t.and_then(TxnOp::delete(k.to_vec())));
            repo.store().txn(txn).await?;
        }
        deleted += old.len();
        if old.len() < page.kvs.len() || !page.more {
            return Ok(deleted);
        }
    }
}

/// The most records one page holds.
pub const MAX_PAGE: u32 = 1000;

/// drover.v1.AuditService.
pub struct AuditApi {
    pub core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(
                    ApiError::InvalidArgument(format!("`limit` {n} is above the maximum page of {MAX_PAGE}")).into()
                );
            }
            n => n as usize,
        };
        let mut recs = self.core.repo.list::<AuditRec>(PREFIX).await?;
        recs.reverse();
        let mut records = Vec::new();
        let mut next_marker = String::new();
        for v in recs {
            let a = v.rec;
            if (!r.marker.is_empty() && a.id.as_str() >= r.marker.as_str())
                || a.at_ms < r.since_ms
                || (!r.token_id.is_empty() && a.token_id != r.token_id)
                || (!r.project.is_empty() && a.project != r.project)
                || (!r.method.is_empty() && !a.method.contains(&r.method))
                || (r.refused_only && a.code == "OK")
            {
                continue;
            }
            if records.len() == limit {
                next_marker = records.last().map(|l: &pb::AuditRecord| l.id.clone()).unwrap_or_default();
                break;
            }
            records.push(a.to_pb());
        }
        Ok(Response::new(pb::ListAuditResponse { records, next_marker }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Old records go, newer ones stay, across several pages.
    #[tokio::test]
    async fn pruning_deletes_what_is_older_than_the_horizon_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = drover_store::EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap();
        let repo = Repo::new(Arc::new(store));
        // 1,200 records at times 1..=1200 ms (more than two pages), then prune before 1001.
        for at in 1..=1200i64 {
            let rec = AuditRec { id: format!("{at:013}-x"), at_ms: at, ..Default::default() };
            repo.txn(Txn::new().and_then(put(&format!("{PREFIX}{}", rec.id), &rec))).await.unwrap();
        }
        assert_eq!(prune(&repo, 1001).await.unwrap(), 1000);
        let left = repo.list::<AuditRec>(PREFIX).await.unwrap();
        let times: Vec<i64> = left.iter().map(|v| v.rec.at_ms).collect();
        assert_eq!(times, (1001..=1200).collect::<Vec<_>>());
        assert_eq!(prune(&repo, 1001).await.unwrap(), 0, "nothing more to prune");
    }
}
