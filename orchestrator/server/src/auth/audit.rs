//! The audit trail: one record per mutating call, accepted or refused. Written by the
//! auth layer after the call answers; old records are pruned after `auth.audit_retention`.
//!
//! Records are kept newest first: under `audit-desc/<T - at_ms>-<uuid, each hex digit
//! d written as f - d>`, with `T` the largest 13-digit time, so an ascending range read
//! (the only kind the store has) meets the newest record first. A page of `ListAudit`
//! reads from its marker on and stops when the page is full, at `since_ms`, or after
//! [`SCAN_MAX`] records; the pruner reads from the retention horizon's key on, which is
//! exactly the records to delete. Neither reads more than a page past what it returns
//! or deletes, however long the trail is.
//!
//! Until 2026-11-30 records were kept oldest first under `audit/<at_ms>-<uuid>`, and a
//! list read all of them. The pruner moves what it finds there to the new layout, a page
//! at a time (each record's move is one transaction of a put and a delete: repeating it
//! is harmless, so several orchestrators may do it at once).

use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_store::{Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::error::{ApiError, ApiResult};
use crate::model::now_ms;
use crate::repo::{Repo, put};
use crate::service::Core;

/// Where records live, newest first.
const PREFIX: &str = "audit-desc/";
/// Where records lived before, oldest first (only moved from now on).
const OLD_PREFIX: &str = "audit/";
/// The largest time a record id can hold (13 decimal digits of ms: year 2286).
const T_MAX: i64 = 9_999_999_999_999;

/// The code an accepted call's record holds (the auth layer writes a code's `Debug`
/// form). Until 2026-11-30 the refused-only filter compared with "OK", which no record
/// holds, and so let every record through.
const OK_CODE: &str = "Ok";

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

    fn matches(&self, r: &pb::ListAuditRequest) -> bool {
        (r.token_id.is_empty() || self.token_id == r.token_id)
            && (r.project.is_empty() || self.project == r.project)
            && (r.method.is_empty() || self.method.contains(&r.method))
            && !(r.refused_only && self.code == OK_CODE)
    }
}

/// The store key of the record with this id (`<at_ms, 13 digits>-<hex>`), or `None` when
/// the id is not of that form.
fn key_of(id: &str) -> Option<String> {
    let (at, rest) = id.split_once('-')?;
    if at.len() != 13 || !at.bytes().all(|b| b.is_ascii_digit()) || rest.is_empty() {
        return None;
    }
    let at: i64 = at.parse().ok()?;
    let mut inverted = String::with_capacity(rest.len());
    for c in rest.chars() {
        inverted.push(char::from_digit(15 - c.to_digit(16)?, 16)?);
    }
    Some(format!("{PREFIX}{:013}-{inverted}", T_MAX - at))
}

/// Writes one record (its id and time are filled in here).
pub async fn record(repo: &Repo, mut rec: AuditRec) {
    rec.at_ms = now_ms();
    rec.id = format!("{:013}-{}", rec.at_ms, uuid::Uuid::now_v7().simple());
    let key = key_of(&rec.id).expect("a fresh id has the key form");
    if let Err(e) = repo.txn(Txn::new().and_then(put(&key, &rec))).await {
        tracing::warn!(method = %rec.method, code = %rec.code, error = %e, "an audit record could not be written");
    }
}

/// Moves records of the old layout to the new one, and deletes records older than
/// `retention`, every `every`, until the process stops.
pub async fn prune_forever(repo: Repo, retention: Duration, every: Duration) {
    loop {
        if let Err(e) = move_old_layout(&repo).await {
            tracing::warn!(error = %e, "moving audit records to the newest-first layout failed; retrying later");
        }
        if let Err(e) = prune(&repo, now_ms() - retention.as_millis() as i64).await {
            tracing::warn!(error = %e, "pruning old audit records failed; retrying later");
        }
        tokio::time::sleep(every).await;
    }
}

/// Records read (and at most deleted or moved) per page.
const PRUNE_PAGE: usize = 500;

/// Deletes the records written before `horizon_ms`; returns how many. They are the keys
/// from the horizon's on, so every record read is one to delete.
pub async fn prune(repo: &Repo, horizon_ms: i64) -> Result<usize, drover_store::StoreError> {
    // Keys of records at `horizon_ms` and later sort before this; older ones after it.
    let from = format!("{PREFIX}{:013}.", T_MAX - horizon_ms);
    let mut deleted = 0;
    loop {
        // Deleted keys are gone, so each page starts at the same place.
        let page = repo.store().range_page(PREFIX.as_bytes(), from.as_bytes(), PRUNE_PAGE).await?;
        for chunk in page.kvs.chunks(64) {
            let txn = chunk.iter().fold(Txn::new(), |t, kv| t.and_then(TxnOp::delete(kv.key.clone())));
            repo.store().txn(txn).await?;
        }
        deleted += page.kvs.len();
        if !page.more || page.kvs.is_empty() {
            return Ok(deleted);
        }
    }
}

/// Moves every record under the old prefix to its newest-first key; returns how many.
/// A record whose id has not the key form is deleted with a warning (it could not be
/// listed or pruned).
pub async fn move_old_layout(repo: &Repo) -> Result<usize, drover_store::StoreError> {
    let mut moved = 0;
    loop {
        let page = repo.store().range_page(OLD_PREFIX.as_bytes(), b"", PRUNE_PAGE).await?;
        for chunk in page.kvs.chunks(32) {
            let mut txn = Txn::new();
            for kv in chunk {
                let id = String::from_utf8_lossy(&kv.key[OLD_PREFIX.len()..]).into_owned();
                match key_of(&id) {
                    Some(key) => txn = txn.and_then(TxnOp::put(key, kv.value.clone())),
                    None => tracing::warn!(id = %id, "an audit record with a malformed id was dropped"),
                }
                txn = txn.and_then(TxnOp::delete(kv.key.clone()));
            }
            repo.store().txn(txn).await?;
        }
        moved += page.kvs.len();
        if !page.more || page.kvs.is_empty() {
            if moved > 0 {
                tracing::info!(moved, "audit records moved to the newest-first layout");
            }
            return Ok(moved);
        }
    }
}

/// The most records one page holds.
pub const MAX_PAGE: u32 = 1000;

/// The most records one `ListAudit` call reads. A page whose filters match few records
/// ends here with fewer records than asked (maybe none) and a marker to go on from, so
/// no call reads the whole trail.
pub const SCAN_MAX: usize = 10_000;

/// One page of the trail for `r`, newest first, reading at most `scan_max` records.
pub async fn list_page(repo: &Repo, r: &pb::ListAuditRequest, scan_max: usize) -> ApiResult<pb::ListAuditResponse> {
    let limit = match r.limit {
        0 => 100,
        n if n > MAX_PAGE => {
            return Err(ApiError::InvalidArgument(format!(
                "`limit` {n} is above the maximum page of {MAX_PAGE}; ask for at most {MAX_PAGE} and follow `next_marker`"
            )));
        }
        n => n as usize,
    };
    let mut after = match r.marker.as_str() {
        "" => String::new(),
        m => key_of(m).ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "`marker` {m:?} is not an audit record id (`<13-digit ms>-<hex>`): pass the `next_marker` of the \
                 previous page, or none for the first page"
            ))
        })?,
    };
    let filtered = !r.token_id.is_empty() || !r.project.is_empty() || !r.method.is_empty() || r.refused_only;
    let mut records: Vec<pb::AuditRecord> = Vec::new();
    let mut scanned = 0;
    loop {
        // Unfiltered, a page needs one record past it, to know whether more follow.
        let want = if filtered { PRUNE_PAGE } else { (limit - records.len() + 1).min(PRUNE_PAGE) };
        let want = want.min(scan_max - scanned);
        let page = repo.store().range_page(PREFIX.as_bytes(), after.as_bytes(), want).await?;
        for kv in &page.kvs {
            let a: AuditRec = serde_json::from_slice(&kv.value).map_err(|e| {
                ApiError::Internal(format!("audit record {} is unreadable: {e}", String::from_utf8_lossy(&kv.key)))
            })?;
            if a.at_ms < r.since_ms {
                return Ok(pb::ListAuditResponse { records, next_marker: String::new() });
            }
            if a.matches(r) {
                if records.len() == limit {
                    let next_marker = records.last().map(|l| l.id.clone()).unwrap_or_default();
                    return Ok(pb::ListAuditResponse { records, next_marker });
                }
                records.push(a.to_pb());
            }
            scanned += 1;
            after = String::from_utf8_lossy(&kv.key).into_owned();
            if scanned == scan_max {
                // Read enough for one call (this is the page's last record, as pages
                // are cut to what is left to read): go on from it.
                let next_marker = if page.more { a.id.clone() } else { String::new() };
                return Ok(pb::ListAuditResponse { records, next_marker });
            }
        }
        if !page.more || page.kvs.is_empty() {
            return Ok(pb::ListAuditResponse { records, next_marker: String::new() });
        }
    }
}

/// drover.v1.AuditService.
pub struct AuditApi {
    pub core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        Ok(Response::new(list_page(&self.core.repo, req.get_ref(), SCAN_MAX).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::repo::temp_repo as repo;

    /// A record at `at` ms with id suffix `n` (hex), a Create call unless `f` says else.
    fn rec(at: i64, n: u32, f: impl FnOnce(&mut AuditRec)) -> AuditRec {
        let mut a = AuditRec {
            id: format!("{at:013}-{n:08x}"),
            at_ms: at,
            method: "/drover.v1.GroupService/CreateGroup".into(),
            code: format!("{:?}", tonic::Code::Ok),
            ..Default::default()
        };
        f(&mut a);
        a
    }

    /// Writes `recs` under `key`, 100 to a transaction.
    async fn write(repo: &Repo, recs: &[AuditRec], key: impl Fn(&AuditRec) -> String) {
        for chunk in recs.chunks(100) {
            let txn = chunk.iter().fold(Txn::new(), |t, a| t.and_then(put(&key(a), a)));
            repo.txn(txn).await.unwrap();
        }
    }

    fn new_key(a: &AuditRec) -> String {
        key_of(&a.id).unwrap()
    }

    /// Lists page after page with `req`; returns the times of each page.
    async fn pages(repo: &Repo, mut req: pb::ListAuditRequest, scan_max: usize) -> Vec<Vec<i64>> {
        let mut out = Vec::new();
        loop {
            let page = list_page(repo, &req, scan_max).await.unwrap();
            out.push(page.records.iter().map(|r| r.at_ms).collect());
            if page.next_marker.is_empty() {
                return out;
            }
            req.marker = page.next_marker;
            assert!(out.len() < 1000, "paging does not end");
        }
    }

    #[test]
    fn keys_sort_newest_first_and_refuse_malformed_ids() {
        let k = |id: &str| key_of(id).unwrap();
        assert!(k("0000000000002-0000") < k("0000000000001-ffff"), "a later time sorts first");
        assert!(k("0000000000001-0002") < k("0000000000001-0001"), "in one ms, the later id sorts first");
        for bad in ["", "abc", "123-ab", "000000000000a-ab", "0000000000001-", "0000000000001-xyz"] {
            assert_eq!(key_of(bad), None, "{bad:?}");
        }
    }

    /// Old records go, newer ones stay, across several pages.
    #[tokio::test]
    async fn pruning_deletes_what_is_older_than_the_horizon_only() {
        let (_dir, repo) = repo().await;
        // 1,200 records at times 1..=1200 ms (more than two pages), then prune before 1001.
        let recs: Vec<AuditRec> = (1..=1200).map(|at| rec(at, at as u32, |_| {})).collect();
        write(&repo, &recs, new_key).await;
        assert_eq!(prune(&repo, 1001).await.unwrap(), 1000);
        let left = repo.list::<AuditRec>(PREFIX).await.unwrap();
        let times: Vec<i64> = left.iter().map(|v| v.rec.at_ms).collect();
        assert_eq!(times, (1001..=1200).rev().collect::<Vec<_>>());
        assert_eq!(prune(&repo, 1001).await.unwrap(), 0, "nothing more to prune");
    }

    /// Pages come newest first, each read bounded, with every filter, and a marker to go
    /// on from when a read bound ends a page early.
    #[tokio::test]
    async fn listing_pages_newest_first_and_reads_a_bounded_stretch() {
        let (_dir, repo) = repo().await;
        // 300 records at 1..=300 ms; every tenth refused; the one at 3 ms of project "rare".
        let recs: Vec<AuditRec> = (1..=300)
            .map(|at| {
                rec(at, 1, |a| {
                    if at % 10 == 0 {
                        a.code = format!("{:?}", tonic::Code::PermissionDenied);
                    }
                    if at == 3 {
                        a.project = "rare".into();
                    }
                })
            })
            .collect();
        write(&repo, &recs, new_key).await;
        // Two calls in one ms: the later id first.
        write(&repo, &[rec(301, 1, |_| {}), rec(301, 2, |a| a.token_id = "later".into())], new_key).await;
        let all = pb::ListAuditRequest { limit: 100, ..Default::default() };
        let got = pages(&repo, all.clone(), SCAN_MAX).await;
        assert_eq!(got.len(), 4, "302 records in pages of 100");
        let flat: Vec<i64> = got.concat();
        let mut want: Vec<i64> = (1..=300).rev().collect();
        want.splice(0..0, [301, 301]);
        assert_eq!(flat, want);
        let first = list_page(&repo, &pb::ListAuditRequest { limit: 1, ..Default::default() }, SCAN_MAX).await.unwrap();
        assert_eq!(first.records[0].token_id, "later");

        // Refused calls, 5 a page, at most 50 records read per call: 30 refused in all.
        let refused = pb::ListAuditRequest { refused_only: true, limit: 5, ..Default::default() };
        let got = pages(&repo, refused, 50).await;
        assert_eq!(got.concat(), (1..=30).rev().map(|i| i * 10).collect::<Vec<_>>());
        assert!(got.iter().all(|p| p.len() <= 5));

        // One matching record near the end: calls end early, empty, with a marker.
        let rare = pb::ListAuditRequest { project: "rare".into(), ..Default::default() };
        let got = pages(&repo, rare.clone(), 50).await;
        // 302 records read 50 at a time: the sixth call reads 52..=3, the seventh the rest.
        let mut want = vec![Vec::new(); 7];
        want[5] = vec![3];
        assert_eq!(got, want);
        assert_eq!(pages(&repo, rare, SCAN_MAX).await, vec![vec![3]], "one call when the bound allows");

        // A time bound ends the listing where the records get older.
        let since = pb::ListAuditRequest { since_ms: 250, limit: 1000, ..Default::default() };
        let got = pages(&repo, since, SCAN_MAX).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), 53, "301, 301 and 300..=250");

        // A method filter.
        let method = pb::ListAuditRequest { method: "DeleteGroup".into(), ..Default::default() };
        assert_eq!(pages(&repo, method, SCAN_MAX).await, vec![Vec::<i64>::new()]);

        // Bad input says what to pass.
        let bad = pb::ListAuditRequest { marker: "yesterday".into(), ..Default::default() };
        let e = list_page(&repo, &bad, SCAN_MAX).await.unwrap_err();
        assert!(matches!(e, ApiError::InvalidArgument(ref m) if m.contains("next_marker")), "{e}");
        let big = pb::ListAuditRequest { limit: MAX_PAGE + 1, ..Default::default() };
        assert!(matches!(list_page(&repo, &big, SCAN_MAX).await, Err(ApiError::InvalidArgument(_))));
    }

    /// Records of the old oldest-first layout move to the new one, and list from there.
    #[tokio::test]
    async fn old_layout_records_move_and_list_newest_first() {
        let (_dir, repo) = repo().await;
        let recs: Vec<AuditRec> = (1..=700).map(|at| rec(at, at as u32, |_| {})).collect();
        write(&repo, &recs, |a| format!("{OLD_PREFIX}{}", a.id)).await;
        repo.store().put(format!("{OLD_PREFIX}garbage").as_bytes(), b"{}").await.unwrap();
        write(&repo, &[rec(701, 1, |_| {})], new_key).await;
        assert_eq!(move_old_layout(&repo).await.unwrap(), 701, "700 records and the malformed one");
        assert!(repo.store().range(OLD_PREFIX.as_bytes()).await.unwrap().0.is_empty());
        let got = pages(&repo, pb::ListAuditRequest { limit: 1000, ..Default::default() }, SCAN_MAX).await;
        assert_eq!(got, vec![(1..=701).rev().collect::<Vec<i64>>()]);
        assert_eq!(move_old_layout(&repo).await.unwrap(), 0);
    }
}
