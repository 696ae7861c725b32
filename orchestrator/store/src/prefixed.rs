//! A store confined to a key prefix: each test and each deployment gets its own keyspace.

use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;

use crate::{Compare, KeyValue, KvStore, Page, StoreError, Txn, TxnOp, TxnResponse, WatchEvent, WatchStream};

/// Wraps a store so that every key is read and written under `prefix`, and callers see
/// keys without it.
pub struct Prefixed {
    inner: Arc<dyn KvStore>,
    prefix: Vec<u8>,
}

impl Prefixed {
    /// Confines `inner` to `prefix` (for example `/drover/v1/`).
    pub fn new(inner: Arc<dyn KvStore>, prefix: impl Into<Vec<u8>>) -> Self {
        Self { inner, prefix: prefix.into() }
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(key);
        k
    }

    fn strip(&self, mut kv: KeyValue) -> KeyValue {
        kv.key.drain(..self.prefix.len().min(kv.key.len()));
        kv
    }

    fn map_op(&self, op: TxnOp) -> TxnOp {
        match op {
            TxnOp::Put { key, value, lease } => TxnOp::Put { key: self.full(&key), value, lease },
            TxnOp::Delete { key } => TxnOp::Delete { key: self.full(&key) },
            TxnOp::DeletePrefix { prefix } => TxnOp::DeletePrefix { prefix: self.full(&prefix) },
        }
    }
}

#[async_trait]
impl KvStore for Prefixed {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.get(&self.full(key)).await?.map(|kv| self.strip(kv)))
    }

    async fn range(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let (kvs, rev) = self.inner.range(&self.full(prefix)).await?;
        Ok((kvs.into_iter().map(|kv| self.strip(kv)).collect(), rev))
    }

    async fn range_page(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Page, StoreError> {
        let after = if after.is_empty() { Vec::new() } else { self.full(after) };
        let page = self.inner.range_page(&self.full(prefix), &after, limit).await?;
        Ok(Page { kvs: page.kvs.into_iter().map(|kv| self.strip(kv)).collect(), more: page.more })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let compares = txn
            .compares
            .into_iter()
            .map(|c| match c {
                Compare::ValueEquals(k, v) => Compare::ValueEquals(self.full(&k), v),
                Compare::ModRevisionEquals(k, r) => Compare::ModRevisionEquals(self.full(&k), r),
                Compare::Absent(k) => Compare::Absent(self.full(&k)),
                Compare::Exists(k) => Compare::Exists(self.full(&k)),
            })
            .collect();
        let success = txn.success.into_iter().map(|op| self.map_op(op)).collect();
        let failure = txn.failure.into_iter().map(|op| self.map_op(op)).collect();
        self.inner.txn(Txn { compares, success, failure }).await
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        self.inner.grant_lease(ttl_secs).await
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }

    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<WatchStream, StoreError> {
        let strip_len = self.prefix.len();
        let stream = self.inner.watch(&self.full(prefix), from_revision).await?;
        Ok(Box::pin(stream.map(move |ev| {
            ev.map(|ev| match ev {
                WatchEvent::Put(mut kv) => {
                    kv.key.drain(..strip_len.min(kv.key.len()));
                    WatchEvent::Put(kv)
                }
                WatchEvent::Delete(mut kv) => {
                    kv.key.drain(..strip_len.min(kv.key.len()));
                    WatchEvent::Delete(kv)
                }
            })
        })))
    }
}
