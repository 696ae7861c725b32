//! Write throughput of the embedded store against etcd on this machine, measured in the
//! same run: `writers` tasks each commit conditional transactions (compare a key's mod
//! revision, put it and a second key) as fast as the store acknowledges them, for
//! `DROVER_BENCH_SECONDS` (3) per point, at 1, 16 and 64 writers. Printed per point:
//! transactions per second of each store and the ratio embedded / etcd. etcd is measured
//! twice: through the store as the orchestrator uses it (concurrent transactions share
//! etcd transactions) and with every transaction sent alone (`unbatched`, etcd itself).
//!
//! Run with `cargo bench -p drover-tests --bench store`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_store::{Compare, EmbeddedStore, EtcdStore, KvStore, Prefixed, Txn, TxnOp};
use drover_tests::{Etcd, fresh_prefix};

async fn throughput(store: Arc<dyn KvStore>, writers: usize, seconds: u64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
        set.spawn(async move {
            let key = format!("bench/{w:03}");
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let txn = Txn::new()
                    .when(Compare::ModRevisionEquals(key.clone().into_bytes(), last))
                    .and_then(TxnOp::put(key.clone(), vec![1u8; 512]))
                    .and_then(TxnOp::put(format!("{key}/last"), vec![2u8; 64]));
                let r = store.txn(txn).await.expect("the store answers");
                assert!(r.succeeded, "writer {w}: its own key changed under it");
                last = r.revision;
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    while set.join_next().await.is_some() {}
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("DROVER_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    for writers in [1, 16, 64] {
        let embedded: Arc<dyn KvStore> =
            Arc::new(EmbeddedStore::open(&dir.path().join(format!("s{writers}.redb"))).await.unwrap());
        let e = throughput(embedded, writers, seconds).await;
        let x = throughput(etcd.store().await, writers, seconds).await;
        let alone = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
        let alone: Arc<dyn KvStore> = Arc::new(Prefixed::new(Arc::new(alone.unbatched()), fresh_prefix()));
        let u = throughput(alone, writers, seconds).await;
        println!(
            "{writers:>2} writers: embedded {e:>7.0} txn/s, etcd {x:>7.0} txn/s (each alone {u:>7.0}, batched / alone \
             {:.2}), embedded / etcd {:.2}",
            x / u,
            e / x
        );
    }
}
