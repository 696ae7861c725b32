//! The store conformance suite against both implementations: the embedded store and a
//! real etcd started by the harness.

use std::sync::Arc;

use drover_store::{EmbeddedStore, KvStore, Prefixed, conformance};
use drover_tests::{Etcd, fresh_prefix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let raw: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap());
    conformance::run_all(|| {
        let raw = raw.clone();
        async move { Arc::new(Prefixed::new(raw, fresh_prefix())) as Arc<dyn KvStore> }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let etcd = Etcd::start().await;
    conformance::run_all(|| etcd.store()).await;
}
