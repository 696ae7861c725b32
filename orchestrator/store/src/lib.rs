//! Drover's store: key/value with revisions, conditional transactions, leases and watches.
//!
//! The orchestrator holds the store as `Arc<dyn KvStore>`. Two implementations exist:
//! [`EtcdStore`] for production and HA, and [`EmbeddedStore`], a durable single-node store
//! on redb with the same revision semantics. [`Prefixed`] confines a store to a key prefix,
//! and `conformance` (feature `testing`) is the suite both implementations must pass.
//!
//! Semantics follow etcd: every committed write bumps one store-wide revision; a key
//! carries the revision that created it and the one that last modified it; a transaction
//! evaluates all its comparisons and then applies either its success or its failure ops.

mod embedded;
mod etcd;
mod prefixed;

#[cfg(feature = "testing")]
pub mod conformance;

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;
pub use prefixed::Prefixed;

/// A stored key with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision of the write that created the key.
    pub create_revision: i64,
    /// The revision of the last write to the key.
    pub mod_revision: i64,
    /// How many times the key was written since it was created.
    pub version: i64,
    /// The lease the key is bound to, 0 when none.
    pub lease: i64,
}

/// A condition a transaction checks before it applies its ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists and holds exactly this value.
    ValueEquals(Vec<u8>, Vec<u8>),
    /// The key's mod_revision equals this one (0 means: the key is absent).
    ModRevisionEquals(Vec<u8>, i64),
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists.
    Exists(Vec<u8>),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put a value; `lease` 0 binds the key to no lease.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
    },
    /// Delete every key under a prefix.
    DeletePrefix {
        prefix: Vec<u8>,
    },
}

impl TxnOp {
    /// A put without a lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put { key: key.into(), value: value.into(), lease: 0 }
    }

    /// A put bound to a lease.
    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        TxnOp::Put { key: key.into(), value: value.into(), lease }
    }

    /// A delete of one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
}

/// A conditional transaction: if every comparison holds, apply `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a comparison.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    /// Adds an op applied when all comparisons hold.
    pub fn and_then(mut self, op: TxnOp) -> Self {
        self.success.push(op);
        self
    }

    /// Adds ops applied when every comparison holds, in order.
    pub fn and_then_all(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }

    /// Adds an op applied when a comparison fails.
    pub fn or_else(mut self, op: TxnOp) -> Self {
        self.failure.push(op);
        self
    }
}

/// One page of a ranged read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// Whether keys under the prefix follow the last one returned.
    pub more: bool,
}

/// The first key of a page that starts after `after` under `prefix`.
pub fn page_start(prefix: &[u8], after: &[u8]) -> Vec<u8> {
    if after.is_empty() || after < prefix {
        prefix.to_vec()
    } else {
        let mut k = after.to_vec();
        k.push(0);
        k
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every comparison held (and so the success ops were applied).
    pub succeeded: bool,
    /// The store revision after the transaction. When it wrote, this is the mod_revision
    /// of every key it wrote.
    pub revision: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// A deletion; the `mod_revision` is the revision of the delete.
    Delete(KeyValue),
}

impl WatchEvent {
    /// The key the event is about.
    pub fn key(&self) -> &[u8] {
        match self {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => &kv.key,
        }
    }

    /// The revision at which the change happened.
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => kv.mod_revision,
        }
    }
}

/// A stream of watch events, in revision order.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time. The outcome of a write
    /// that failed this way is unknown: read before retrying it.
    #[error("store unavailable: {0}; check that the store is running and reachable")]
    Unavailable(String),
    /// The lease does not exist or has expired.
    #[error("lease {0} not found or expired; grant a new one")]
    LeaseNotFound(i64),
    /// A watch asked for history the store no longer keeps.
    #[error("revision {requested} was compacted (oldest kept is {oldest}); re-read and watch from a newer revision")]
    Compacted { requested: i64, oldest: i64 },
    /// A request the store refuses as malformed.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The store's own data or engine failed.
    #[error("store failure: {0}")]
    Internal(String),
}

/// The key/value store every orchestrator state lives in.
///
/// Implementations must be linearizable for a single client and give revisions with etcd's
/// meaning. Callers never read and then write blindly: every state change is one [`Txn`]
/// that compares what was read.
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key under a prefix, in key order, and the store revision of the read.
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), StoreError>;

    /// Reads at most `limit` keys under `prefix` that sort after `after` (from the first
    /// when `after` is empty), in key order, and whether more follow: one page of a
    /// listing, without reading the rest of the prefix.
    async fn range_page(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Page, StoreError>;

    /// Runs a conditional transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Grants a lease that expires `ttl_secs` after its last keepalive.
    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError>;

    /// Renews a lease; returns the TTL it was renewed for.
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError>;

    /// Revokes a lease, deleting every key bound to it.
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError>;

    /// Watches every key under a prefix, starting at `from_revision` (inclusive); 0 means
    /// from now on.
    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<WatchStream, StoreError>;

    /// Puts one key unconditionally; returns the new revision.
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<i64, StoreError> {
        Ok(self.txn(Txn::new().and_then(TxnOp::put(key, value))).await?.revision)
    }

    /// Deletes one key unconditionally; returns the new revision.
    async fn delete(&self, key: &[u8]) -> Result<i64, StoreError> {
        Ok(self.txn(Txn::new().and_then(TxnOp::delete(key))).await?.revision)
    }

    /// Creates a key only if it is absent; returns whether it was created.
    async fn create(&self, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        let txn = Txn::new().when(Compare::Absent(key.to_vec())).and_then(TxnOp::put(key, value));
        Ok(self.txn(txn).await?.succeeded)
    }
}

/// The smallest key greater than every key that starts with `prefix`, as etcd uses for
/// range ends. `None` when no such key exists (the prefix is all 0xff or empty).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte_and_skips_ff() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff]), Some(vec![b'b']));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
