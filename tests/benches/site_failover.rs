//! Site failover at scale, with its floors measured in the same run: N single-volume
//! groups on 4 mock agents (two backends per site) answering every call after 20 ms,
//! the orchestrator on a real etcd, moved by `runbooks/site-failover-planned.yaml`
//! (freeze, final sync, move, check, thaw) with 64 groups in flight.
//!
//! Printed per N: wall time; the agent floor (every agent call the run made, from the
//! mock op logs, × 20 ms ÷ 64 in flight); the store floor (as many conditional etcd
//! transactions as the run made, through the same client at the same concurrency);
//! transactions per group (etcd revisions, heartbeats included); CPU-ms per group
//! across the orchestrator and the agents (from /proc), and etcd's apart; the CPU floor
//! (every process's CPU spread over the machine's cores); etcd's CPU for the store
//! floor's transactions, and the shortest run the CPU goal would allow with it
//! on this machine's cores. Then T(2N)/T(N).
//!
//! Run with `cargo bench -p drover-tests --bench site_failover` (`DROVER_BENCH_GROUPS`
//! sets N, default 1000).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_store::{Compare, KvStore, Txn, TxnOp};
use drover_tests::{Cluster, Etcd, StoreChoice};

const LATENCY_MS: u64 = 20;
const PARALLEL: usize = 64;
/// Issue 15's goal for the orchestrator's and the agents' CPU per group: half of the
/// 5.2 ms measured when it was filed.
const CPU_GOAL_MS: f64 = 2.6;

/// CPU time (user + system) of a process so far, in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks * 1000.0 / clock_ticks()
}

fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(100.0)
}

fn ops(dir: &Path) -> usize {
    ["backend-a", "backend-a2", "backend-b", "backend-b2"]
        .iter()
        .map(|b| std::fs::read_to_string(dir.join(format!("oplog-{b}.jsonl"))).unwrap_or_default().lines().count())
        .sum()
}

async fn make_groups(c: &Clients, n: usize) {
    let mut set = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..32 {
        let (mut c, next) = (c.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let (from, to) = if i % 2 == 0 { ("backend-a", "backend-b") } else { ("backend-a2", "backend-b2") };
                let name = format!("g{i:05}");
                let v = c
                    .volumes
                    .create_volume(pb::CreateVolumeRequest {
                        name: format!("{name}-v"),
                        project: "bench".into(),
                        size_bytes: 1 << 30,
                        backend: from.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let g = c
                    .groups
                    .create_group(pb::CreateGroupRequest {
                        name: name.clone(),
                        project: "bench".into(),
                        group_type: "replication".into(),
                        backend: from.into(),
                        volumes: vec![v.id],
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                c.replication
                    .enable_replication(pb::EnableReplicationRequest {
                        group: g.id,
                        project: "bench".into(),
                        target_backend: to.into(),
                        sync_interval_seconds: 0,
                        no_wait: false,
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// `count` conditional writes through the same etcd client, `PARALLEL` at a time, each
/// sent alone (not sharing etcd transactions, as the orchestrator's do): the store's
/// floor for a run that made as many transactions.
async fn store_floor(store: Arc<dyn KvStore>, count: usize) -> Duration {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..PARALLEL {
        let (store, next) = (store.clone(), next.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let key = format!("floor/{}", i % 4096);
                let txn = Txn::new()
                    .when(Compare::Absent(key.clone().into_bytes()))
                    .and_then(TxnOp::put(key.clone(), vec![1u8; 512]))
                    .or_else(TxnOp::put(key, vec![2u8; 512]));
                store.txn(txn).await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    started.elapsed()
}

struct Run {
    wall: Duration,
    agent_floor: Duration,
    store_floor: Duration,
    txns_per_group: f64,
    cpu_ms_per_group: f64,
    /// Of it, the orchestrator's (the rest is the four agents').
    orchestrator_cpu_ms_per_group: f64,
    /// etcd's CPU per group, apart.
    etcd_cpu_ms_per_group: f64,
    /// etcd's CPU for the store floor's transactions (as many as the run made, small,
    /// each alone), per group of the run: the least etcd can spend on them.
    etcd_floor_cpu_ms_per_group: f64,
    /// How busy the machine's cores were during the failover (every process), 0 to 1.
    busy: f64,
}

/// The machine's busy and total CPU ticks so far (the `cpu` line of /proc/stat).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = f.iter().sum();
    // idle and iowait are not busy.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

async fn run(n: usize) -> Run {
    let etcd = Etcd::start().await;
    let sites = [("site-a", "backend-a"), ("site-a", "backend-a2"), ("site-b", "backend-b"), ("site-b", "backend-b2")];
    let latency = format!("mock.latency={LATENCY_MS}ms");
    let agent_extra = ["--set", latency.as_str(), "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"];
    let cluster = Cluster::start_sites(StoreChoice::Etcd(&etcd), "mock", &sites, &agent_extra, &[]).await;
    let c = cluster.clients().await;
    let setup = Instant::now();
    make_groups(&c, n).await;
    eprintln!("bench: {n} replicated groups made in {:.1} s", setup.elapsed().as_secs_f64());

    let probe = etcd.store().await;
    let pids: Vec<u32> =
        std::iter::once(cluster.orchestrator.proc.pid()).chain(cluster.agents.iter().map(|a| a.proc.pid())).collect();
    let cpu_before: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let orchestrator_before = cpu_ms(pids[0]);
    let etcd_before = cpu_ms(etcd.pid());
    let machine_before = machine_ticks();
    let requests_before = etcd.handled_requests();
    let rev_before = probe.put(b"bench/mark", b"before").await.unwrap();
    let ops_before = ops(cluster.path());
    let runbook = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/site-failover-planned.yaml");
    // DROVER_BENCH_PERF=FILE records the orchestrator, the agents and etcd with `perf`
    // (DWARF call chains) during the failover only.
    let perf = std::env::var("DROVER_BENCH_PERF").ok().map(|file| {
        let list: Vec<String> = pids.iter().chain([&etcd.pid()]).map(|p| p.to_string()).collect();
        std::process::Command::new("perf")
            .args([
                "record",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-o",
                &format!("{file}.{n}"),
                "-p",
                &list.join(","),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf runs")
    });
    // DROVER_BENCH_ETCD_PPROF=FILE takes etcd's CPU profile (its `/debug/pprof`, with
    // DROVER_ETCD_EXTRA_ARGS=--enable-pprof) for the failover's expected length.
    let pprof = std::env::var("DROVER_BENCH_ETCD_PPROF").ok().map(|file| {
        let seconds = (n / 300).max(2);
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                &format!("{file}.{n}"),
                &format!("{}/debug/pprof/profile?seconds={seconds}", etcd.endpoint),
            ])
            .spawn()
            .expect("curl runs")
    });
    let started = Instant::now();
    let mut runbooks = c.runbooks.clone();
    let e = runbooks
        .run_runbook(pb::RunbookRequest {
            file_name: runbook.display().to_string(),
            text: std::fs::read_to_string(&runbook).unwrap(),
            params: [("site".to_string(), "site-a".to_string()), ("max_parallel".to_string(), PARALLEL.to_string())]
                .into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Followed as an operator would (`drover execution watch`): one update per saved
    // round, not a poll that reads the whole record every few milliseconds.
    let mut executions = c.executions.clone();
    let mut updates =
        executions.watch_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
    let mut ended = e.clone();
    while let Some(update) = updates.message().await.unwrap() {
        ended = update;
        if ended.status != "running" {
            break;
        }
    }
    let wall = started.elapsed();
    if let Some(mut perf) = perf {
        let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
        let _ = perf.wait();
    }
    if let Some(mut pprof) = pprof {
        let _ = pprof.wait();
    }
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    // Every item (a watch update carries at most 500 per step).
    let ended = executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
    eprintln!("bench: the run's state is {} KiB", ended.state_json.len() / 1024);
    // Child executions per step, read for their phases once the CPU figures are taken.
    let mut sampled = Vec::new();
    if let Ok(state) = serde_json::from_str::<serde_json::Value>(&ended.state_json) {
        for s in state["steps"].as_array().into_iter().flatten() {
            let ms = s["ended_ms"].as_i64().unwrap_or(0) - s["started_ms"].as_i64().unwrap_or(0);
            // How long each item's execution took, and how many ran at once on average
            // (the sum of their durations over the step's).
            let took: Vec<i64> = s["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| Some(i["ended_ms"].as_i64()? - i["started_ms"].as_i64()?))
                .collect();
            let items = if took.is_empty() || ms <= 0 {
                String::new()
            } else {
                let mut sorted = took.clone();
                sorted.sort();
                format!(
                    "; per item p50 {} ms, max {} ms, {:.1} at once on average",
                    sorted[sorted.len() / 2],
                    sorted[sorted.len() - 1],
                    took.iter().sum::<i64>() as f64 / ms as f64
                )
            };
            eprintln!(
                "bench:   step {}: {} ms ({}){items}",
                s["name"].as_str().unwrap_or("?"),
                ms,
                s["note"].as_str().unwrap_or("")
            );
            let children: Vec<(String, i64)> = s["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| Some((i["execution_id"].as_str()?.to_string(), i["started_ms"].as_i64()?)))
                .collect();
            if !children.is_empty() {
                sampled.push((s["name"].as_str().unwrap_or("?").to_string(), children));
            }
        }
    }
    let rev_after = probe.put(b"bench/mark", b"after").await.unwrap();
    let cpu_after: f64 = pids.iter().map(|p| cpu_ms(*p)).sum();
    let orchestrator_after = cpu_ms(pids[0]);
    let etcd_after = cpu_ms(etcd.pid());
    let machine_after = machine_ticks();
    let requests_after = etcd.handled_requests();
    let per_group: Vec<String> = requests_after
        .iter()
        .map(|(m, v)| (m, (v - requests_before.get(m).copied().unwrap_or(0.0)) / n as f64))
        .filter(|(_, v)| *v >= 0.01)
        .map(|(m, v)| format!("{m} {v:.2}"))
        .collect();
    eprintln!("bench: etcd requests per group: {}", per_group.join(", "));
    for (step, children) in &sampled {
        phases(&c, step, children).await;
    }
    footprint(&etcd, cluster.store_prefix().expect("on etcd")).await;
    written(&etcd, cluster.store_prefix().expect("on etcd"), rev_before, rev_after, n).await;
    let calls = ops(cluster.path()) - ops_before;
    let txns = (rev_after - rev_before - 1).max(0) as usize;
    let agent_floor = Duration::from_millis(calls as u64 * LATENCY_MS) / PARALLEL as u32;
    let alone = drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5))
        .await
        .unwrap()
        .unbatched();
    let etcd_floor_before = cpu_ms(etcd.pid());
    let store_floor = store_floor(Arc::new(drover_store::Prefixed::new(Arc::new(alone), "floor-")), txns).await;
    let etcd_floor_cpu = cpu_ms(etcd.pid()) - etcd_floor_before;
    Run {
        wall,
        agent_floor,
        store_floor,
        txns_per_group: txns as f64 / n as f64,
        cpu_ms_per_group: (cpu_after - cpu_before) / n as f64,
        orchestrator_cpu_ms_per_group: (orchestrator_after - orchestrator_before) / n as f64,
        etcd_cpu_ms_per_group: (etcd_after - etcd_before) / n as f64,
        etcd_floor_cpu_ms_per_group: etcd_floor_cpu / n as f64,
        busy: (machine_after.0 - machine_before.0) as f64 / (machine_after.1 - machine_before.1).max(1) as f64,
    }
}

/// What the store holds after the run, by the key's first segment (`executions`,
/// `groups`, ...): keys, bytes, and the largest value. Each write of a record carries
/// the whole value, so this says where etcd's bytes per group come from.
async fn footprint(etcd: &Etcd, prefix: &str) {
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let store = drover_store::Prefixed::new(Arc::new(raw), prefix.to_string());
    let mut by: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
    let mut after = Vec::new();
    loop {
        let page = store.range_page(b"", &after, 1000).await.unwrap();
        for kv in &page.kvs {
            let key = String::from_utf8_lossy(&kv.key);
            let e = by.entry(key.split('/').next().unwrap_or("").to_string()).or_default();
            *e = (e.0 + 1, e.1 + kv.value.len(), e.2.max(kv.value.len()));
        }
        match page.kvs.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => break,
        }
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by_key(|(_, (_, bytes, _))| std::cmp::Reverse(*bytes));
    let shown: Vec<String> = rows
        .iter()
        .take(8)
        .map(|(k, (n, bytes, max))| format!("{k} {n} keys {} KiB (largest {max} B)", bytes / 1024))
        .collect();
    eprintln!("bench: store after the run: {}", shown.join("; "));
}

/// What the run wrote, by the key's first segment: puts and value bytes per group, read
/// back from etcd's history between the two marks (each put carries the whole value, so
/// this is where etcd's bytes per group come from).
async fn written(etcd: &Etcd, prefix: &str, from: i64, to: i64, groups: usize) {
    use tokio_stream::StreamExt;
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let store = drover_store::Prefixed::new(Arc::new(raw), prefix.to_string());
    let mut events = store.watch(b"", from + 1).await.unwrap();
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    loop {
        let event = match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => {
                eprintln!("bench: the run's writes cannot be read back: {e}");
                return;
            }
            Ok(None) | Err(_) => break,
        };
        let drover_store::WatchEvent::Put(kv) = event else { continue };
        if kv.mod_revision >= to {
            break;
        }
        let key = String::from_utf8_lossy(&kv.key);
        let e = by.entry(key.split('/').next().unwrap_or("").to_string()).or_default();
        *e = (e.0 + 1, e.1 + kv.value.len());
    }
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by_key(|(_, (_, bytes))| std::cmp::Reverse(*bytes));
    let total: usize = rows.iter().map(|(_, (_, b))| b).sum();
    let shown: Vec<String> = rows
        .iter()
        .take(10)
        .map(|(k, (puts, bytes))| {
            format!("{k} {:.2} puts {:.0} B", *puts as f64 / groups as f64, *bytes as f64 / groups as f64)
        })
        .collect();
    eprintln!(
        "bench: written during the run per group: {:.0} B of values; {}",
        total as f64 / groups as f64,
        shown.join("; ")
    );
}

/// Where an item's time goes, from a sample of its step's child executions: from the
/// runbook's start of the item to the child's creation, to its first step, each of its
/// steps, the gaps between them (the step's record write and the next step's start),
/// and from its last step to its end. Medians in ms.
async fn phases(c: &Clients, step: &str, children: &[(String, i64)]) {
    let mut executions = c.executions.clone();
    let mut phases: Vec<(String, Vec<i64>)> = Vec::new();
    let mut add = |name: String, ms: i64| match phases.iter_mut().find(|(n, _)| *n == name) {
        Some((_, v)) => v.push(ms),
        None => phases.push((name, vec![ms])),
    };
    let every = (children.len() / 200).max(1);
    for (id, item_started) in children.iter().step_by(every) {
        let Ok(e) = executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await else { continue };
        let e = e.into_inner();
        add("item start to child created".into(), e.created_ms - item_started);
        let mut last = e.created_ms;
        for (k, st) in e.steps.iter().enumerate() {
            add(
                if k == 0 { "created to first step".into() } else { format!("gap before {}", st.name) },
                st.started_ms - last,
            );
            add(format!("step {}", st.name), st.ended_ms - st.started_ms);
            last = st.ended_ms;
        }
        add("last step to end".into(), e.updated_ms - last);
    }
    let line: Vec<String> = phases
        .into_iter()
        .map(|(name, mut v)| {
            v.sort();
            format!("{name} {}", v[v.len() / 2])
        })
        .collect();
    eprintln!("bench:   step {step}, p50 ms: {}", line.join(", "));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("DROVER_BENCH_GROUPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let mut results = Vec::new();
    for size in [n, 2 * n] {
        let r = run(size).await;
        let floor = r.agent_floor.max(r.store_floor);
        println!(
            "site failover of {size} groups: {:.2} s; agent floor {:.2} s, store floor {:.2} s: {:.2}x the floor; \
             {:.1} store transactions and {:.2} CPU-ms per group (orchestrator {:.2}, agents {:.2}; etcd {:.2} apart); \
             cores {:.0}% busy",
            r.wall.as_secs_f64(),
            r.agent_floor.as_secs_f64(),
            r.store_floor.as_secs_f64(),
            r.wall.as_secs_f64() / floor.as_secs_f64(),
            r.txns_per_group,
            r.cpu_ms_per_group,
            r.orchestrator_cpu_ms_per_group,
            r.cpu_ms_per_group - r.orchestrator_cpu_ms_per_group,
            r.etcd_cpu_ms_per_group,
            r.busy * 100.0
        );
        // What this machine allows: every process's CPU for the run (the orchestrator's,
        // the agents' and etcd's) spread over all its cores at once.
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
        let cpu_floor = (r.cpu_ms_per_group + r.etcd_cpu_ms_per_group) * size as f64 / 1000.0 / cores;
        println!(
            "  CPU floor on {cores} cores: {cpu_floor:.2} s (all processes' CPU, {:.2} ms per group); the wall time is \
             {:.2}x it",
            r.cpu_ms_per_group + r.etcd_cpu_ms_per_group,
            r.wall.as_secs_f64() / cpu_floor
        );
        // What the goals allow together here: its CPU goal for the orchestrator
        // and the agents, plus etcd's CPU at the store floor, spread over every core, is
        // the shortest the run can take at that CPU; against 1.5x the floor.
        let goals_floor = (CPU_GOAL_MS + r.etcd_floor_cpu_ms_per_group) * size as f64 / 1000.0 / cores;
        println!(
            "  etcd CPU at the store floor: {:.2} ms per group; at the CPU goal ({CPU_GOAL_MS} ms per group) the run \
             cannot take less than {goals_floor:.2} s on {cores} cores: {:.2}x the floor (goal 1.5x)",
            r.etcd_floor_cpu_ms_per_group,
            goals_floor / floor.as_secs_f64()
        );
        results.push(r);
    }
    println!("T({})/T({n}) = {:.2}", 2 * n, results[1].wall.as_secs_f64() / results[0].wall.as_secs_f64());
}
