//! Unary API overhead against the store underneath, measured in the same run: the
//! orchestrator (TLS, a token) answering `GetVolume` (one store read) and `GetGroup` (the
//! record and a page of its history: two reads), against a raw read of the same volume
//! record, at 1, 16 and 64 requests in flight for `DROVER_BENCH_SECONDS` (3) each.
//! Printed per point: p50 and p99 latency and throughput of each, and the differences and
//! ratios the goals name (p50 within 0.5 ms of the raw read, p99 within 2x, throughput at
//! 64 at least 0.8x).
//!
//! Two stores, `DROVER_BENCH_STORE` = `etcd`, `embedded` or `both` (the default):
//! - on etcd, the raw read is an etcd get through the same etcd client the orchestrator
//!   uses, each read a request of its own (`EtcdStore::unbatched`), interleaved with the
//!   API figures at each point;
//! - on the embedded store, the raw read is the same redb file opened in this process
//!   while the orchestrator is stopped (redb allows one process), then the orchestrator
//!   is started again on it and the API is measured.
//!
//! Run with `cargo bench -p drover-tests --bench api`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_proto::v1 as pb;
use drover_store::{EmbeddedStore, EtcdStore, KvStore, Prefixed};
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

const POINTS: [usize; 3] = [1, 16, 64];

/// A group of one volume to read, made through the API: (volume id, group id).
async fn records(cluster: &Cluster) -> (String, String) {
    let mut c = cluster.clients().await;
    let group = drover_tests::plain_group_in(&mut c, "bench", "bench", 1).await;
    let g = c.groups.get_group(pb::GetGroupRequest { group: group.clone(), project: "bench".into() }).await.unwrap();
    (g.into_inner().volume_ids[0].clone(), group)
}

async fn raw_get(store: Arc<dyn KvStore>, key: String, inflight: usize, seconds: u64) -> Figures {
    assert!(store.get(key.as_bytes()).await.unwrap().is_some(), "the raw read finds the volume's record");
    measure(inflight, seconds, move || {
        let (store, key) = (store.clone(), key.clone());
        async move {
            store.get(key.as_bytes()).await.unwrap();
        }
    })
    .await
}

/// `GetVolume` and `GetGroup` at `inflight`.
async fn api_gets(cluster: &Cluster, ids: &(String, String), inflight: usize, seconds: u64) -> (Figures, Figures) {
    let c = cluster.clients().await;
    let (volumes, id) = (c.volumes.clone(), ids.0.clone());
    let get_volume = measure(inflight, seconds, move || {
        let (mut volumes, id) = (volumes.clone(), id.clone());
        async move {
            volumes.get_volume(pb::GetVolumeRequest { volume: id, project: "bench".into() }).await.unwrap();
        }
    })
    .await;
    let (groups, id) = (c.groups.clone(), ids.1.clone());
    let get_group = measure(inflight, seconds, move || {
        let (mut groups, id) = (groups.clone(), id.clone());
        async move {
            groups.get_group(pb::GetGroupRequest { group: id, project: "bench".into() }).await.unwrap();
        }
    })
    .await;
    (get_volume, get_group)
}

fn print_point(store: &str, inflight: usize, raw: &Figures, api: &(Figures, Figures)) {
    println!(
        "{store:<8} {inflight:>2} in flight: raw get p50 {:.2} ms p99 {:.2} ms {:.0}/s",
        raw.p50_ms, raw.p99_ms, raw.per_second
    );
    for (name, f) in [("GetVolume", &api.0), ("GetGroup", &api.1)] {
        println!(
            "                      {name:<9} p50 {:.2} ms (+{:.2}) p99 {:.2} ms ({:.1}x) {:.0}/s ({:.2}x)",
            f.p50_ms,
            f.p50_ms - raw.p50_ms,
            f.p99_ms,
            f.p99_ms / raw.p99_ms,
            f.per_second,
            f.per_second / raw.per_second
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("DROVER_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let which = std::env::var("DROVER_BENCH_STORE").unwrap_or_else(|_| "both".into());
    if which == "etcd" || which == "both" {
        let etcd = Etcd::start().await;
        let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
        let ids = records(&cluster).await;
        // Each read a request of its own, as the bare etcd client sends it (the store
        // shares one request among reads that run at the same time).
        let bare = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
        let raw: Arc<dyn KvStore> =
            Arc::new(Prefixed::new(Arc::new(bare.unbatched()), cluster.store_prefix().expect("on etcd").to_string()));
        for inflight in POINTS {
            let r = raw_get(raw.clone(), format!("volumes/{}", ids.0), inflight, seconds).await;
            let api = api_gets(&cluster, &ids, inflight, seconds).await;
            print_point("etcd", inflight, &r, &api);
        }
    }
    if which == "embedded" || which == "both" {
        let mut cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
        let ids = records(&cluster).await;
        // The raw reads first, on the orchestrator's own file while it is stopped.
        cluster.orchestrator.proc.kill();
        let mut raw_figures = Vec::new();
        {
            let path = cluster.path().join("orchestrator.redb");
            // Under the orchestrator's default key prefix, as it reads them.
            let raw: Arc<dyn KvStore> =
                Arc::new(Prefixed::new(Arc::new(EmbeddedStore::open(&path).await.unwrap()), "/drover/v1/"));
            for inflight in POINTS {
                raw_figures.push(raw_get(raw.clone(), format!("volumes/{}", ids.0), inflight, seconds).await);
            }
        }
        cluster.restart_orchestrator().await;
        for (inflight, r) in POINTS.into_iter().zip(&raw_figures) {
            let api = api_gets(&cluster, &ids, inflight, seconds).await;
            print_point("embedded", inflight, r, &api);
        }
    }
}
