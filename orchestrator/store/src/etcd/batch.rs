//! Concurrent transactions share etcd commits.
//!
//! Every [`crate::KvStore::txn`] of an [`super::EtcdStore`] goes through one dispatcher.
//! A transaction that arrives while fewer than [`IN_FLIGHT`] requests are on the wire is
//! sent at once, as it is; those that arrive meanwhile wait, and the next free slot sends
//! as many of them as fit in one etcd transaction, each as a *nested* transaction (etcd
//! 3.3 and later) of an outer one that compares nothing. One client alone therefore waits
//! for nothing, and many at once make one raft entry, one revision and one round trip per
//! batch instead of one each.
//!
//! What each caller gets is what it would have got alone:
//!
//! - **Its own comparisons decide.** etcd evaluates every nested transaction's
//!   comparisons against the store as it was before the batch, and applies each one's
//!   success or failure ops by its own outcome: one caller's failed comparison never
//!   touches another's writes.
//! - **No batch holds two transactions that touch the same key** (a compared, written or
//!   deleted key, or a deleted prefix and any key under it). The batch then equals running
//!   its members one after another in any order: none reads what another writes. Such a
//!   transaction waits for a later batch.
//! - **The revision** is the batch's, shared by its members: still the mod_revision of
//!   every key the caller wrote, and newer than any revision it saw before.
//! - **A batch that etcd refuses as a whole** for what it is (a nested transaction names a
//!   lease that is gone, or the batch is too big after all) is sent again one transaction
//!   at a time, so only the transaction at fault gets the error. A batch lost on the wire
//!   is an unknown outcome for every member, as it would be for each alone.
//!
//! etcd bounds a transaction's operations (`--max-txn-ops`, 128 by default), counting a
//! nested transaction against what its parent has left, and its request size
//! (`--max-request-bytes`, 1.5 MiB by default): [`MAX_OPS`] and [`MAX_BYTES`] keep a batch
//! under both. A transaction too big to share goes alone.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, TxnOp as ETxnOp, TxnOpResponse};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{call_txn, page_of, read_alone, read_options, send_alone, to_etcd};
use crate::{Compare, Page, StoreError, Txn, TxnOp, TxnResponse};

/// Requests on the wire at once. More would send smaller batches sooner; fewer would
/// make a caller alone wait for another's round trip.
const IN_FLIGHT: usize = 4;

/// Operations of one etcd transaction (etcd's default `--max-txn-ops`).
const MAX_OPS: usize = 128;

/// Bytes of keys and values in one batch, well under etcd's default request limit.
const MAX_BYTES: usize = 1 << 20;

/// Waiting transactions looked at when a batch is made (those further back wait).
const LOOK_AHEAD: usize = 1024;

struct Queued {
    txn: Txn,
    reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
}

/// The handle through which transactions reach the dispatcher task.
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
}

impl Batcher {
    /// Starts the dispatcher on the current runtime; it ends when the last handle goes.
    pub(super) fn start(client: Client, timeout: Duration) -> Arc<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(rx, IN_FLIGHT, take_batch, move |batch| {
            let client = client.clone();
            async move { send(&client, timeout, batch).await }
        }));
        Arc::new(Self { queue })
    }

    /// Runs `txn`, alone or in a batch; the answer is the one it would get alone.
    pub(super) async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        // A transaction the dispatcher dropped may have been sent: its outcome is unknown.
        ask(&self.queue, |reply| Queued { txn, reply }, "; read before retrying").await
    }
}

/// Queues what `make` builds around a reply channel for a dispatcher, and waits for the
/// answer; `hint` ends the error if the dispatcher stops before answering.
async fn ask<Q, T>(
    queue: &mpsc::UnboundedSender<Q>,
    make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Q,
    hint: &str,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send(make(reply)).map_err(|_| StoreError::Unavailable("the etcd store's dispatcher has stopped".into()))?;
    answer
        .await
        .map_err(|_| StoreError::Unavailable(format!("the etcd store's dispatcher stopped before answering{hint}")))?
}

/// Sends what arrives on `rx`: at once while a slot is free, else in batches taken by
/// `take` from what waits, each batch sent by `send` in a task of its own.
async fn dispatch<Q, F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Q>,
    in_flight: usize,
    take: fn(&mut VecDeque<Q>) -> Vec<Q>,
    send: F,
) where
    F: Fn(Vec<Q>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut waiting: VecDeque<Q> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(q) => waiting.push_back(q),
                None => return,
            }
        }
        let slot = slots.clone().acquire_owned().await.expect("the slots are never closed");
        // Whatever arrived while the slots were busy goes with this batch.
        while let Ok(q) = rx.try_recv() {
            waiting.push_back(q);
        }
        let sent = send(take(&mut waiting));
        tokio::spawn(async move {
            sent.await;
            drop(slot);
        });
    }
}

/// One read: a key, or a page of up to `limit` keys from `key` to `end`.
pub(super) struct Read {
    pub key: Vec<u8>,
    pub page: Option<(Vec<u8>, i64)>,
}

struct QueuedRead {
    read: Read,
    reply: oneshot::Sender<Result<Page, StoreError>>,
}

/// Reads that run at the same time (single keys, and pages of a range) share one etcd
/// request: a read-only transaction of [`MAX_READS`] reads at most, which etcd serves as
/// one linearizable read (no raft entry, no revision). Each read still sees every write
/// acknowledged before it was asked. At scale most of the orchestrator's store requests
/// are such reads (a site failover made about 22 per group), and etcd's cost is per
/// request far more than per key.
pub(super) struct ReadBatcher {
    queue: mpsc::UnboundedSender<QueuedRead>,
}

/// Reads in one shared request. The reply holds their records whole (up to
/// etcd-client's 4 MiB message limit); a batch that fails for any reason is read again
/// one read at a time, which reads may do.
const MAX_READS: usize = 64;

/// Read requests on the wire at once. One: the reads that arrive meanwhile wait for it
/// and go together in the next. On this 2-core machine, where etcd, the orchestrator and
/// the clients share the cores, each etcd request costs more CPU than the wait: against
/// two, `GetVolume` at 16 calls in flight answered 0.3 ms sooner at the median (six
/// alternating pairs of the `api` bench, 2026-12-01), and a site failover sent half the
/// read requests with no change in its time (docs/performance.md).
const READS_IN_FLIGHT: usize = 1;

impl ReadBatcher {
    /// Starts the dispatcher on the current runtime; it ends when the last handle goes.
    pub(super) fn start(client: Client, timeout: Duration) -> Arc<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(
            rx,
            READS_IN_FLIGHT,
            |waiting: &mut VecDeque<QueuedRead>| waiting.drain(..waiting.len().min(MAX_READS)).collect(),
            move |batch| {
                let client = client.clone();
                async move { send_reads(&client, timeout, batch).await }
            },
        ));
        Arc::new(Self { queue })
    }

    /// Runs `read`, alone or with others.
    pub(super) async fn read(&self, read: Read) -> Result<Page, StoreError> {
        ask(&self.queue, |reply| QueuedRead { read, reply }, "").await
    }
}

async fn send_reads(client: &Client, timeout: Duration, mut batch: Vec<QueuedRead>) {
    if batch.len() > 1 {
        let gets: Vec<ETxnOp> = batch.iter().map(|q| ETxnOp::get(q.read.key.clone(), read_options(&q.read))).collect();
        if let Ok(resp) = call_txn(client, timeout, etcd_client::Txn::new().and_then(gets)).await {
            let answers: Vec<TxnOpResponse> = resp.op_responses();
            if answers.len() == batch.len() {
                for (q, answer) in batch.into_iter().zip(answers) {
                    let value = match answer {
                        TxnOpResponse::Get(r) => Ok(page_of(&r)),
                        _ => Err(StoreError::Unavailable("etcd answered a read with something else".into())),
                    };
                    let _ = q.reply.send(value);
                }
                return;
            }
        }
    }
    futures::future::join_all(batch.drain(..).map(|q| async move {
        let _ = q.reply.send(read_alone(client, timeout, &q.read).await);
    }))
    .await;
}

/// The keys a transaction compares or writes, and the prefixes it deletes.
#[derive(Default)]
struct Footprint {
    keys: HashSet<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
}

fn touched(txn: &Txn) -> (Vec<&[u8]>, Vec<&[u8]>) {
    let mut keys = Vec::new();
    let mut prefixes = Vec::new();
    for c in &txn.compares {
        match c {
            Compare::ValueEquals(k, _) | Compare::ModRevisionEquals(k, _) | Compare::Absent(k) | Compare::Exists(k) => {
                keys.push(k.as_slice())
            }
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => keys.push(key.as_slice()),
            TxnOp::DeletePrefix { prefix } => prefixes.push(prefix.as_slice()),
        }
    }
    (keys, prefixes)
}

impl Footprint {
    fn overlaps(&self, txn: &Txn) -> bool {
        let (keys, prefixes) = touched(txn);
        keys.iter().any(|k| self.keys.contains(*k) || self.prefixes.iter().any(|p| k.starts_with(p)))
            || prefixes.iter().any(|p| {
                self.keys.iter().any(|k| k.starts_with(p))
                    || self.prefixes.iter().any(|q| q.starts_with(p) || p.starts_with(q))
            })
    }

    fn add(&mut self, txn: &Txn) {
        let (keys, prefixes) = touched(txn);
        self.keys.extend(keys.into_iter().map(<[u8]>::to_vec));
        self.prefixes.extend(prefixes.into_iter().map(<[u8]>::to_vec));
    }
}

/// The most operations in one branch (or comparisons) of `txn`.
fn width(txn: &Txn) -> usize {
    txn.compares.len().max(txn.success.len()).max(txn.failure.len())
}

/// Bytes of keys and values in `txn`.
fn size(txn: &Txn) -> usize {
    let compares: usize = txn
        .compares
        .iter()
        .map(|c| match c {
            Compare::ValueEquals(k, v) => k.len() + v.len(),
            Compare::ModRevisionEquals(k, _) | Compare::Absent(k) | Compare::Exists(k) => k.len() + 8,
        })
        .sum();
    let ops: usize = txn
        .success
        .iter()
        .chain(&txn.failure)
        .map(|op| match op {
            TxnOp::Put { key, value, .. } => key.len() + value.len() + 8,
            TxnOp::Delete { key } => key.len(),
            TxnOp::DeletePrefix { prefix } => prefix.len() * 2,
        })
        .sum();
    compares + ops
}

/// Takes the next batch from the front of `waiting`: in arrival order, every transaction
/// that touches no key of one taken before and still fits. The first one is always taken.
fn take_batch(waiting: &mut VecDeque<Queued>) -> Vec<Queued> {
    let mut batch: Vec<Queued> = Vec::new();
    let mut footprint = Footprint::default();
    let (mut widest, mut bytes) = (0usize, 0usize);
    let mut i = 0;
    while i < waiting.len() && i < LOOK_AHEAD && batch.len() < MAX_OPS {
        let txn = &waiting[i].txn;
        let (w, s) = (width(txn), size(txn));
        // etcd counts a nested transaction against what the outer one leaves.
        let fits = batch.is_empty()
            || (batch.len() + 1 + widest.max(w) <= MAX_OPS && bytes + s <= MAX_BYTES && !footprint.overlaps(txn));
        if fits {
            footprint.add(txn);
            widest = widest.max(w);
            bytes += s;
            batch.push(waiting.remove(i).expect("index is in range"));
        } else {
            i += 1;
        }
    }
    batch
}

async fn send(client: &Client, timeout: Duration, mut batch: Vec<Queued>) {
    if batch.len() == 1 {
        let q = batch.pop().expect("one");
        let _ = q.reply.send(send_alone(client, timeout, q.txn).await);
        return;
    }
    let nested: Vec<ETxnOp> = batch.iter().map(|q| ETxnOp::txn(to_etcd(q.txn.clone()))).collect();
    match call_txn(client, timeout, etcd_client::Txn::new().and_then(nested)).await {
        Ok(resp) => {
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut answers = resp.op_responses().into_iter();
            for q in batch {
                let answer = match answers.next() {
                    Some(TxnOpResponse::Txn(r)) => Ok(TxnResponse { succeeded: r.succeeded(), revision }),
                    _ => Err(StoreError::Unavailable(
                        "etcd answered a batch of transactions without this one's outcome; read before retrying".into(),
                    )),
                };
                let _ = q.reply.send(answer);
            }
        }
        // Refused for what one member is: each goes again alone, so only that one fails.
        Err(StoreError::Invalid(why)) => {
            tracing::debug!(members = batch.len(), error = %why, "etcd refused a batch; sending its transactions one by one");
            futures::future::join_all(batch.into_iter().map(|q| async move {
                let _ = q.reply.send(send_alone(client, timeout, q.txn).await);
            }))
            .await;
        }
        Err(e) => {
            let why = e.to_string();
            for q in batch {
                let _ = q.reply.send(Err(StoreError::Unavailable(format!(
                    "{why} (in a batch of transactions: the outcome is unknown; read before retrying)"
                ))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(txn: Txn) -> Queued {
        Queued { txn, reply: oneshot::channel().0 }
    }

    fn put(key: &str) -> Txn {
        Txn::new().and_then(TxnOp::put(key.as_bytes().to_vec(), b"v".to_vec()))
    }

    #[test]
    fn a_batch_takes_disjoint_transactions_in_order_and_leaves_the_others() {
        let mut waiting: VecDeque<Queued> = [
            put("a"),
            put("b"),
            // Compares a key the first writes: waits.
            Txn::new().when(Compare::Exists(b"a".to_vec())).and_then(TxnOp::put(b"c".to_vec(), b"v".to_vec())),
            // Deletes a prefix holding "b": waits.
            Txn::new().and_then(TxnOp::DeletePrefix { prefix: b"b".to_vec() }),
            put("d"),
        ]
        .into_iter()
        .map(queued)
        .collect();
        let batch = take_batch(&mut waiting);
        let firsts: Vec<Vec<u8>> = batch.iter().map(|q| touched(&q.txn).0[0].to_vec()).collect();
        assert_eq!(firsts, vec![b"a".to_vec(), b"b".to_vec(), b"d".to_vec()]);
        assert_eq!(waiting.len(), 2, "the two that touch taken keys wait");
        // The next batch takes both: they touch different keys ("a", "c") and prefix "b".
        assert_eq!(take_batch(&mut waiting).len(), 2);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_prefix_under_another_prefix_overlaps_it() {
        let mut fp = Footprint::default();
        fp.add(&Txn::new().and_then(TxnOp::DeletePrefix { prefix: b"x/1/".to_vec() }));
        assert!(fp.overlaps(&Txn::new().and_then(TxnOp::DeletePrefix { prefix: b"x/".to_vec() })));
        assert!(fp.overlaps(&put("x/1/k")));
        assert!(!fp.overlaps(&put("x/2/k")));
        assert!(!fp.overlaps(&Txn::new().and_then(TxnOp::DeletePrefix { prefix: b"x/2/".to_vec() })));
    }

    #[test]
    fn a_batch_stays_within_etcds_operation_limit() {
        let wide = |n: usize, tag: usize| {
            Txn::new().and_then_all((0..n).map(|i| TxnOp::put(format!("{tag}/{i}").into_bytes(), b"v".to_vec())))
        };
        // 100-op transactions: one alone, then 27 more nested ones would pass 128.
        let mut waiting: VecDeque<Queued> = (0..3).map(|t| queued(wide(100, t))).collect();
        for t in 3..200 {
            waiting.push_back(queued(wide(1, t)));
        }
        let batch = take_batch(&mut waiting);
        let widest = batch.iter().map(|q| width(&q.txn)).max().unwrap();
        assert!(batch.len() + widest <= MAX_OPS, "{} nested, widest {widest}", batch.len());
        assert_eq!(width(&batch[0].txn), 100, "the first waiting transaction always goes");
        // Small ones alone fill a batch up to the limit.
        let mut small: VecDeque<Queued> = (0..300).map(|t| queued(wide(1, t))).collect();
        assert_eq!(take_batch(&mut small).len(), MAX_OPS - 1);
    }
}
