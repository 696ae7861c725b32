//! RPO under continuous writes: a 1 GiB volume replicated with a sync every
//! `DROVER_BENCH_INTERVAL_MS` (5,000) while a writer puts 64 KiB at random offsets at
//! `DROVER_BENCH_WRITE_MIBS` (4) MiB/s, for `DROVER_BENCH_SECONDS` (300). The agents'
//! own scheduler takes the points, as in production.
//!
//! The RPO is sampled every 100 ms as now minus the creation time of the newest point
//! the peer acknowledged (what a disaster at that instant would lose). Each sync's
//! duration (freeze, ship the delta, the peer's commit) is its delta transfer time.
//! Printed: the number of syncs, delta sizes and transfer times (p50, p99, max), the
//! RPO's p50, p99 and max, and the goal's bound, interval + 2 x the p50 transfer time
//! (also with the p99 transfer time).
//!
//! Run with `cargo bench -p drover-tests --bench rpo`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_agent::driver::Driver;
use drover_agent_qemu::{NbdAddr, NbdClient};
use drover_tests::qemu_pair::{agent, qemu_io, replicate};

const MIB: u64 = 1 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn pct(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let interval_ms = env("DROVER_BENCH_INTERVAL_MS", 5_000);
    let write_mibs = env("DROVER_BENCH_WRITE_MIBS", 4);
    let seconds = env("DROVER_BENCH_SECONDS", 300);
    let dir = tempfile::tempdir().unwrap();
    let (a, _a_ep, _ta) = agent(dir.path(), "a").await;
    let (b, b_ep, _tb) = agent(dir.path(), "b").await;
    let size = 1024 * MIB;
    a.create_volume("v", size).await.unwrap();
    let uri = a.attach_volume("v").await.unwrap().uri;
    qemu_io(&uri, &(0..16).map(|i| format!("write -P {} {}M 64M", i + 1, i * 64)).collect::<Vec<_>>());
    replicate(&a, &b, &b_ep, "g", &["v".to_string()], size, interval_ms).await;
    // The initial copy, before the clock starts.
    let first = a.sync_group("g", false, None).await.unwrap();
    println!("initial sync: {} MiB in {} ms", first.bytes / MIB, first.duration_ms);

    let nbd = match uri {
        u if u.starts_with("nbd+unix") => NbdAddr::Unix(u.split("socket=").nth(1).unwrap().into()),
        u => panic!("unexpected uri {u}"),
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    // 64 KiB writes at random offsets, paced to the rate asked.
    let writer = tokio::spawn(async move {
        let mut c = NbdClient::connect(&nbd, "v").await.unwrap();
        let buf = vec![0x5au8; 64 << 10];
        let per_write = Duration::from_secs_f64(64.0 / 1024.0 / write_mibs as f64);
        let (mut x, mut n, started) = (0x2545_f491_4f6c_dd1du64, 0u64, Instant::now());
        while Instant::now() < until {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.write((x % (size / (64 << 10))) * (64 << 10), &buf).await.unwrap();
            n += 1;
            let due = started + per_write * n as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        c.disconnect().await;
        n
    });
    let (mut rpo_ms, mut syncs) = (Vec::new(), BTreeMap::new());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        let info = a.replication_info("v").await.unwrap();
        rpo_ms.push((now_ms() - info.last_sync_time_ms) as f64);
        syncs.insert(info.last_sync_time_ms, (info.last_sync_duration_ms as f64, info.last_sync_bytes as f64));
    }
    let writes = writer.await.unwrap();
    // The initial copy is not a delta.
    syncs.remove(&(first.created_at_ms));
    let transfer: Vec<f64> = syncs.values().map(|s| s.0).collect();
    let bytes: Vec<f64> = syncs.values().map(|s| s.1 / MIB as f64).collect();
    println!(
        "{seconds} s of writes: {writes} writes of 64 KiB ({:.1} MiB/s), {} periodic syncs at {interval_ms} ms",
        writes as f64 * 64.0 / 1024.0 / seconds as f64,
        syncs.len()
    );
    println!(
        "delta per sync: p50 {:.1} MiB, max {:.1} MiB; transfer time p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(&bytes, 0.5),
        pct(&bytes, 1.0),
        pct(&transfer, 0.5),
        pct(&transfer, 0.99),
        pct(&transfer, 1.0)
    );
    let (p50, p99, max) = (pct(&rpo_ms, 0.5), pct(&rpo_ms, 0.99), pct(&rpo_ms, 1.0));
    let bound = interval_ms as f64 + 2.0 * pct(&transfer, 0.5);
    let bound99 = interval_ms as f64 + 2.0 * pct(&transfer, 0.99);
    println!("RPO over {} samples: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms", rpo_ms.len());
    println!(
        "goal p99 <= interval + 2 x transfer: {bound:.0} ms with the p50 transfer ({}), {bound99:.0} ms with the p99 \
         transfer ({})",
        if p99 <= bound { "met" } else { "not met" },
        if p99 <= bound99 { "met" } else { "not met" }
    );
}
