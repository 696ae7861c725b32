//! Unary API overhead against the store underneath, measured in the same run: the
//! orchestrator (on etcd, TLS, a token) answering `GetVolume` (one store read) and
//! `GetGroup` (the record and a page of its history: two reads), against a raw etcd
//! read of the same volume record through the same etcd client, at 1, 16 and 64
//! requests in flight for `DROVER_BENCH_SECONDS` (3) each. Printed per point: p50 and
//! p99 latency and throughput of each, and the differences and ratios the goals name
//! (p50 within 0.5 ms of etcd, p99 within 2x, throughput at 64 at least 0.8x).
//!
//! Run with `cargo bench -p drover-tests --bench api`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_proto::v1 as pb;
use drover_store::{EtcdStore, KvStore, Prefixed};
use drover_tests::{Cluster, Etcd, StoreChoice};

struct Figures {
    p50_ms: f64,
    p99_ms: f64,
    per_second: f64,
}

/// Runs `call` from `inflight` tasks for `seconds`, timing each call.
async fn measure<F, Fut>(inflight: usize, seconds: u64, call: F) -> Figures
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..inflight {
        let call = call.clone();
        set.spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                call().await;
                took.push(t.elapsed());
            }
            took
        });
    }
    let mut all = Vec::new();
    while let Some(t) = set.join_next().await {
        all.extend(t.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    Figures { p50_ms: at(0.50), p99_ms: at(0.99), per_second: all.len() as f64 / elapsed }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("DROVER_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let etcd = Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let mut c = cluster.clients().await;
    let v = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "bench".into(),
            project: "bench".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = c
        .groups
        .create_group(pb::CreateGroupRequest {
            name: "bench".into(),
            project: "bench".into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let raw: Arc<dyn KvStore> = Arc::new(Prefixed::new(
        Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap()),
        cluster.store_prefix().expect("on etcd").to_string(),
    ));
    let key = format!("volumes/{}", v.id);
    assert!(raw.get(key.as_bytes()).await.unwrap().is_some(), "the raw read finds the volume's record");
    for inflight in [1, 16, 64] {
        let (store, key) = (raw.clone(), key.clone());
        let etcd_get = measure(inflight, seconds, move || {
            let (store, key) = (store.clone(), key.clone());
            async move {
                store.get(key.as_bytes()).await.unwrap();
            }
        })
        .await;
        let (volumes, id) = (c.volumes.clone(), v.id.clone());
        let get_volume = measure(inflight, seconds, move || {
            let (mut volumes, id) = (volumes.clone(), id.clone());
            async move {
                volumes.get_volume(pb::GetVolumeRequest { volume: id, project: "bench".into() }).await.unwrap();
            }
        })
        .await;
        let (groups, id) = (c.groups.clone(), g.id.clone());
        let get_group = measure(inflight, seconds, move || {
            let (mut groups, id) = (groups.clone(), id.clone());
            async move {
                groups.get_group(pb::GetGroupRequest { group: id, project: "bench".into() }).await.unwrap();
            }
        })
        .await;
        println!(
            "{inflight:>2} in flight: etcd get p50 {:.2} ms p99 {:.2} ms {:.0}/s",
            etcd_get.p50_ms, etcd_get.p99_ms, etcd_get.per_second
        );
        for (name, f) in [("GetVolume", &get_volume), ("GetGroup", &get_group)] {
            println!(
                "             {name:<9} p50 {:.2} ms (+{:.2}) p99 {:.2} ms ({:.1}x) {:.0}/s ({:.2}x)",
                f.p50_ms,
                f.p50_ms - etcd_get.p50_ms,
                f.p99_ms,
                f.p99_ms / etcd_get.p99_ms,
                f.per_second,
                f.per_second / etcd_get.per_second
            );
        }
    }
}
