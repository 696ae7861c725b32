//! Replication benchmark on the qemu driver, with baselines measured in the same run:
//!
//! 1. the initial sync of a 1 GiB volume, in MB/s, against `qemu-img convert -t
//!    writeback` of the same image on this machine (a baseline that flushes, as Drover's
//!    target does), alternating which runs first, over `DROVER_BENCH_ROUNDS` rounds (3);
//! 2. an incremental sync with 1% of the clusters changed: bytes shipped / bytes changed;
//! 3. the write pause of a group snapshot of 16 volumes: the QMP transaction's duration,
//!    and the worst write latency a writer saw across the sync against its worst latency
//!    in an equally long quiet window.
//!
//! Run with `cargo bench -p drover-tests --bench replication`. Two agents run in this
//! process (each with its own qemu-storage-daemon); volume data crosses real gRPC and NBD.

use std::time::{Duration, Instant};

use drover_agent::driver::Driver;
use drover_agent_qemu::{NbdAddr, NbdClient};
use drover_tests::qemu_pair::{agent, qemu_io, replicate};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _a_ep, _ta) = agent(dir.path(), "a").await;
    let (b, b_ep, _tb) = agent(dir.path(), "b").await;

    // ---- 1. initial sync of 1 GiB, against a flushing qemu-img convert, alternating
    // which runs first, DROVER_BENCH_ROUNDS times (each round a fresh volume and replica).
    let size = 1024 * MIB;
    let rounds: usize = std::env::var("DROVER_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let vol = format!("big{round}");
        a.create_volume(&vol, size).await.unwrap();
        let uri = a.attach_volume(&vol).await.unwrap().uri;
        let cmds: Vec<String> = (0..16).map(|i| format!("write -P {} {}M 64M", i + 1, i * 64)).collect();
        qemu_io(&uri, &cmds);
        replicate(&a, &b, &b_ep, &format!("g{round}"), std::slice::from_ref(&vol), size, 3_600_000).await;
        let image = dir.path().join(format!("pool-a/volumes/{vol}/L0.qcow2"));
        let copy = dir.path().join("convert.qcow2");
        // The baseline writes with the page cache and flushes at the end (-t writeback),
        // as Drover's target flushes what it applied; qemu-img's default (unsafe) never
        // flushes.
        let convert = || {
            let t = Instant::now();
            let out = std::process::Command::new("qemu-img")
                .args(["convert", "-U", "-t", "writeback", "-f", "qcow2", "-O", "qcow2"])
                .arg(&image)
                .arg(&copy)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let s = t.elapsed().as_secs_f64();
            std::fs::remove_file(&copy).unwrap();
            s
        };
        let convert_first = round % 2 == 1;
        let convert_s = if convert_first { Some(convert()) } else { None };
        let t = Instant::now();
        let full = a.sync_group(&format!("g{round}"), false, None).await.unwrap();
        let sync_s = t.elapsed().as_secs_f64();
        let convert_s = convert_s.unwrap_or_else(convert);
        let sync_mbs = full.bytes as f64 / MIB as f64 / sync_s;
        let convert_mbs = size as f64 / MIB as f64 / convert_s;
        println!(
            "round {}: initial sync {:.0} MiB in {sync_s:.2} s = {sync_mbs:.0} MiB/s; qemu-img convert -t writeback \
             {convert_s:.2} s = {convert_mbs:.0} MiB/s ({} first); ratio {:.2}",
            round + 1,
            full.bytes as f64 / MIB as f64,
            if convert_first { "convert" } else { "drover" },
            sync_mbs / convert_mbs
        );
        ratios.push(sync_mbs / convert_mbs);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "ratio drover / qemu-img convert over {rounds} rounds: min {:.2}, median {:.2}, max {:.2}",
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );

    // ---- 2. incremental sync with 1% of clusters changed (round 1's volume)
    let uri = a.attach_volume("big0").await.unwrap().uri;
    let clusters = size / CLUSTER;
    let changed = clusters / 100;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        picked.insert(x % clusters);
    }
    let cmds: Vec<String> = picked.iter().map(|c| format!("write -P 0xee {} 64k", c * CLUSTER)).collect();
    qemu_io(&uri, &cmds);
    let inc = a.sync_group("g0", false, None).await.unwrap();
    let changed_bytes = changed * CLUSTER;
    println!(
        "incremental sync, {changed} of {clusters} clusters changed ({changed_bytes} bytes): shipped {} bytes in {} ms; shipped / changed = {:.3}",
        inc.bytes,
        inc.duration_ms,
        inc.bytes as f64 / changed_bytes as f64
    );

    // ---- 3. write pause of a 16-volume group snapshot
    let small = 64 * MIB;
    let vols: Vec<String> = (0..16).map(|i| format!("s{i}")).collect();
    for v in &vols {
        a.create_volume(v, small).await.unwrap();
    }
    replicate(&a, &b, &b_ep, "g16", &vols, small, 3_600_000).await;
    a.sync_group("g16", false, None).await.unwrap();
    let nbd = match a.attach_volume("s0").await.unwrap().uri {
        u if u.starts_with("nbd+unix") => NbdAddr::Unix(u.split("socket=").nth(1).unwrap().into()),
        u => panic!("unexpected uri {u}"),
    };
    // A writer doing 4 KiB writes back to back; the worst latency in a window.
    async fn worst_latency(nbd: &NbdAddr, window: Duration) -> (Duration, u64) {
        let mut c = NbdClient::connect(nbd, "s0").await.unwrap();
        let buf = vec![0xabu8; 4096];
        let (mut worst, mut n) = (Duration::ZERO, 0u64);
        let end = Instant::now() + window;
        while Instant::now() < end {
            let t = Instant::now();
            c.write((n % 1024) * 4096, &buf).await.unwrap();
            worst = worst.max(t.elapsed());
            n += 1;
        }
        c.disconnect().await;
        (worst, n)
    }
    let window = Duration::from_millis(1500);
    let (quiet, quiet_n) = worst_latency(&nbd, window).await;
    let writer = {
        let nbd = nbd.clone();
        tokio::spawn(async move { worst_latency(&nbd, window).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = a.sync_group("g16", false, None).await.unwrap();
    let (busy, busy_n) = writer.await.unwrap();
    println!(
        "group snapshot of 16 volumes: transaction held writes for {:.2} ms; whole sync {} ms",
        snap.snapshot_pause_us as f64 / 1000.0,
        snap.duration_ms
    );
    println!(
        "writer worst 4 KiB write latency: {:.2} ms across the sync ({busy_n} writes) vs {:.2} ms in a quiet window ({quiet_n} writes); ratio {:.1}",
        busy.as_secs_f64() * 1000.0,
        quiet.as_secs_f64() * 1000.0,
        busy.as_secs_f64() / quiet.as_secs_f64().max(1e-9)
    );
}
