//! The etcd store, through the `etcd-client` crate. Production and HA.
//!
//! Every call has a deadline. A transaction whose call fails on the wire has an unknown
//! outcome and is reported as [`StoreError::Unavailable`]: callers re-read, never retry
//! blindly.
//!
//! Transactions that run at the same time share etcd transactions, and reads (single
//! keys and pages of a range) that run at the same time share one read request (see
//! `batch`).

mod batch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn as ETxn, TxnOp as ETxnOp, WatchOptions,
};

/// The largest watch reply this client decodes. etcd's own request limit (1.5 MiB by
/// default, at most 10 MiB in its docs' advice) bounds a fragment well below it.
const WATCH_REPLY_LIMIT: usize = 64 << 20;

use crate::{
    Compare, KeyValue, KvStore, Page, StoreError, Txn, TxnOp, TxnResponse, WatchEvent, WatchStream, page_start,
    prefix_end,
};

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
    /// Where transactions go to share etcd transactions; `None` sends each alone.
    batcher: Option<Arc<batch::Batcher>>,
    /// Where reads (keys and pages) go to share etcd requests; `None` sends each alone.
    reads: Option<Arc<batch::ReadBatcher>>,
}

fn map_err(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::NotFound || s.message().contains("lease not found") =>
        {
            StoreError::Invalid(s.message().to_string())
        }
        // Refused for what the request is (too large, too many operations), not for the
        // server's state: the same request can never succeed.
        etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::InvalidArgument
                || (s.code() == tonic::Code::ResourceExhausted && s.message().contains("larger than max")) =>
        {
            StoreError::Invalid(s.message().to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn lease_err(lease: i64, e: etcd_client::Error) -> StoreError {
    // etcd says so in a gRPC status or, on the keepalive stream, in a keepalive error.
    if e.to_string().contains("lease not found") { StoreError::LeaseNotFound(lease) } else { map_err(e) }
}

fn convert_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn convert_op(op: TxnOp) -> ETxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            ETxnOp::put(key, value, opts)
        }
        TxnOp::Delete { key } => ETxnOp::delete(key, None),
        TxnOp::DeletePrefix { prefix } => ETxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix())),
    }
}

/// The etcd form of a transaction.
fn to_etcd(txn: Txn) -> ETxn {
    let compares: Vec<ECompare> = txn
        .compares
        .into_iter()
        .map(|c| match c {
            Compare::ValueEquals(k, v) => ECompare::value(k, CompareOp::Equal, v),
            Compare::ModRevisionEquals(k, r) => ECompare::mod_revision(k, CompareOp::Equal, r),
            Compare::Absent(k) => ECompare::create_revision(k, CompareOp::Equal, 0),
            Compare::Exists(k) => ECompare::create_revision(k, CompareOp::Greater, 0),
        })
        .collect();
    ETxn::new()
        .when(compares)
        .and_then(txn.success.into_iter().map(convert_op).collect::<Vec<_>>())
        .or_else(txn.failure.into_iter().map(convert_op).collect::<Vec<_>>())
}

/// Sends one etcd transaction, within `timeout`.
async fn call_txn(client: &Client, timeout: Duration, txn: ETxn) -> Result<etcd_client::TxnResponse, StoreError> {
    let mut kv = client.kv_client();
    let call = kv.txn(txn);
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(StoreError::Unavailable(format!("etcd txn timed out after {timeout:?}"))),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("lease not found") => {
            Err(StoreError::Invalid(format!("txn refers to a missing lease: {}", s.message())))
        }
        Ok(r) => r.map_err(map_err),
    }
}

/// etcd's options for `read`: none for a key, the range end and limit for a page.
fn read_options(read: &batch::Read) -> Option<GetOptions> {
    read.page.as_ref().map(|(end, limit)| GetOptions::new().with_range(end.clone()).with_limit(*limit))
}

/// Runs one read with a request of its own, within `timeout`.
async fn read_alone(client: &Client, timeout: Duration, read: &batch::Read) -> Result<Page, StoreError> {
    let mut kv = client.kv_client();
    match tokio::time::timeout(timeout, kv.get(read.key.clone(), read_options(read))).await {
        Err(_) => Err(StoreError::Unavailable(format!("etcd read timed out after {timeout:?}"))),
        Ok(r) => Ok(page_of(&r.map_err(map_err)?)),
    }
}

/// The page an etcd read answered (alone or inside a transaction).
fn page_of(resp: &etcd_client::GetResponse) -> Page {
    Page { kvs: resp.kvs().iter().map(convert_kv).collect(), more: resp.more() }
}

/// Sends `txn` as one etcd transaction of its own.
async fn send_alone(client: &Client, timeout: Duration, txn: Txn) -> Result<TxnResponse, StoreError> {
    let r = call_txn(client, timeout, to_etcd(txn)).await?;
    Ok(TxnResponse { succeeded: r.succeeded(), revision: r.header().map_or(0, |h| h.revision()) })
}

/// Keys per request of a full range read: small enough that a page of large records
/// stays far below the 4 MiB reply limit.
const RANGE_PAGE: i64 = 100;

impl EtcdStore {
    /// Connects to etcd at the given endpoints (e.g. `http://127.0.0.1:2379`). `timeout`
    /// bounds every call. The task that batches transactions runs on the runtime this is
    /// called on: use the store on that runtime (once it stops, transactions fail as
    /// unavailable).
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts)))
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "connecting to etcd at {} timed out after {timeout:?}",
                    endpoints.join(",")
                ))
            })?
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to etcd at {}: {e}", endpoints.join(","))))?;
        let batcher = Some(batch::Batcher::start(client.clone(), timeout));
        let reads = Some(batch::ReadBatcher::start(client.clone(), timeout));
        Ok(Self { client, timeout, batcher, reads })
    }

    /// The same store, sending every transaction and every read alone (as the bare etcd
    /// client does): for measuring etcd itself.
    pub fn unbatched(mut self) -> Self {
        self.batcher = None;
        self.reads = None;
        self
    }

    /// Compacts etcd's history up to `keep` revisions before the current one, and returns
    /// the revision compacted to; `None` when there is nothing to compact (the store is
    /// younger, or a compaction went further already: another orchestrator's, or the
    /// operator's). etcd keeps every revision of every key until it is compacted, so
    /// without this (or etcd's `--auto-compaction-retention`) its database grows with
    /// every write until its space quota refuses all writes. A watch from a compacted
    /// revision ends with [`StoreError::Compacted`]; the watchers here read again then.
    /// Compaction is cluster-wide: an etcd shared with others should be compacted by its
    /// operator instead.
    pub async fn compact_history(&self, keep: i64) -> Result<Option<i64>, StoreError> {
        let mut kv = self.client.kv_client();
        let now = self
            .deadline("revision read", async {
                kv.get(vec![0u8], Some(GetOptions::new().with_count_only())).await.map_err(map_err)
            })
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let to = now - keep;
        if to <= 1 {
            return Ok(None);
        }
        match self.deadline("compaction", async { kv.compact(to, None).await.map_err(map_err) }).await {
            Ok(_) => Ok(Some(to)),
            Err(e) if e.to_string().contains("has been compacted") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn deadline<T>(&self, what: &str, fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| StoreError::Unavailable(format!("etcd {what} timed out after {:?}", self.timeout)))?
    }
}

#[async_trait]
impl KvStore for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let read = batch::Read { key: key.to_vec(), page: None };
        let page = match &self.reads {
            // The wait for a slot counts against the deadline too.
            Some(reads) => self.deadline("get", reads.read(read)).await?,
            None => read_alone(&self.client, self.timeout, &read).await?,
        };
        Ok(page.kvs.into_iter().next())
    }

    async fn range(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), StoreError> {
        // Read in pages, all at the revision of the first, so no reply passes the gRPC
        // message limit (4 MiB: about 5,000 groups in one reply did) and the result is one
        // consistent snapshot. Each page has the store deadline.
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let (mut out, mut start, mut revision) = (Vec::new(), prefix.to_vec(), 0);
        loop {
            let mut kv = self.client.kv_client();
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(RANGE_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let from = start.clone();
            let resp = self.deadline("range", async move { kv.get(from, Some(opts)).await.map_err(map_err) }).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            out.extend(resp.kvs().iter().map(convert_kv));
            match out.last() {
                Some(last) if resp.more() => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    async fn range_page(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Page, StoreError> {
        // etcd's range end for a prefix; an all-0xff prefix has none: read to the end.
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let read = batch::Read { key: page_start(prefix, after), page: Some((end, limit as i64)) };
        match &self.reads {
            Some(reads) => self.deadline("range", reads.read(read)).await,
            None => read_alone(&self.client, self.timeout, &read).await,
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        match &self.batcher {
            // The wait for a slot counts against the deadline too.
            Some(b) => self.deadline("txn", b.txn(txn)).await,
            None => send_alone(&self.client, self.timeout, txn).await,
        }
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        if ttl_secs <= 0 {
            return Err(StoreError::Invalid(format!("lease TTL must be positive, got {ttl_secs}")));
        }
        let mut lease = self.client.lease_client();
        self.deadline("lease grant", async move { Ok(lease.grant(ttl_secs, None).await.map_err(map_err)?.id()) }).await
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let mut client = self.client.lease_client();
        self.deadline("lease keepalive", async move {
            let (mut keeper, mut stream) = client.keep_alive(lease).await.map_err(|e| lease_err(lease, e))?;
            keeper.keep_alive().await.map_err(|e| lease_err(lease, e))?;
            match stream.message().await.map_err(|e| lease_err(lease, e))? {
                Some(resp) if resp.ttl() > 0 => Ok(resp.ttl()),
                _ => Err(StoreError::LeaseNotFound(lease)),
            }
        })
        .await
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let mut client = self.client.lease_client();
        self.deadline("lease revoke", async move {
            client.revoke(lease).await.map_err(|e| lease_err(lease, e))?;
            Ok(())
        })
        .await
    }

    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<WatchStream, StoreError> {
        // Replayed history can be larger than one gRPC reply may be: etcd sends a watcher
        // that is behind the events of up to 1,000 revisions at once. Fragmented, each
        // reply stays under etcd's request limit (events are handled one by one below, so
        // fragments need no joining); the raised decoding limit covers an etcd whose
        // limit is set above the client's 4 MiB default.
        let mut opts = WatchOptions::new().with_prefix().with_fragment();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let mut client = self.client.watch_client().max_decoding_message_size(WATCH_REPLY_LIMIT);
        let mut stream =
            self.deadline("watch", async move { client.watch(prefix, Some(opts)).await.map_err(map_err) }).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(map_err(e))).await;
                        return;
                    }
                };
                if resp.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted { requested: from_revision, oldest: resp.compact_revision() }))
                        .await;
                    return;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let kv = convert_kv(kv);
                    let ev = match ev.event_type() {
                        EventType::Put => WatchEvent::Put(kv),
                        EventType::Delete => WatchEvent::Delete(kv),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                if resp.canceled() {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
