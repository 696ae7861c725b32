//! The qemu soak: `cargo xtask soak --minutes N` (a 2-minute run is in the test command).
//!
//! Two qemu agents and an orchestrator (real processes), several replicated groups, and a
//! writer that writes numbered 4 KiB records round-robin over each group's volumes with
//! `qemu-io` (each acknowledged before the next). A random schedule of:
//! - planned failovers and failbacks;
//! - disaster failovers (SIGKILL of site A's agent and its qemu-storage-daemon, forced
//!   failover, restart, failback with consent);
//! - agent restarts without a disaster (SIGKILL of either side's agent and daemon, then a
//!   restart: the active side comes back fenced and serves writes once confirmed); one in
//!   three comes back on a new port, which the primary's periodic syncs must find;
//! - daemon-only kills (either side; its agent restarts it);
//! - disable, an extend of one volume while unreplicated, and enable again (a full copy),
//!   half of them with either agent SIGKILLed and restarted while the disable or the
//!   enable runs;
//! - planned moves with either agent SIGKILLed and restarted while the move runs: the
//!   move must end by itself with the group serving at one side or the other;
//! - group snapshots (since the fifteenth session), half of them with an agent (three
//!   in four: the active side's) SIGKILLed and restarted 0-60 ms after the snapshot was
//!   asked for: one that ends available must
//!   hold every record acknowledged before it (read through volumes made from it), and
//!   the volumes and the snapshot must delete (one left in error too).
//!
//! After every step it checks, with `qemu-io` as the reader:
//! - after a planned move, a restart, a daemon kill or a disable/enable, every
//!   acknowledged record is at the active side;
//! - after a disaster, the records there are an exact prefix, holding at least every
//!   record acknowledged before the last planned move, and site B takes writes at once;
//! - every agent answers, layer counts stay bounded, no daemon is orphaned;
//! - every volume is primary on exactly one side, its group's active backend;
//! - at the end, from the agents' op logs: no op_id entered a driver twice;
//! - no `qemu-io` run takes more than 20 s.
//!
//! It prints a summary and exits non-zero on any violation.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::invariants::project_role_violations;
use drover_tests::{Cluster, StoreChoice};

const RECORD: u64 = 4096;
const VOLUMES: usize = 2;
const GROUPS: usize = 2;
const MIB: u64 = 1 << 20;

struct Group {
    name: String,
    volumes: Vec<String>,
    /// Records 0..acked were acknowledged by the writer (at the side active then).
    acked: u64,
    /// Records 0..floor must survive anything: they were there before the last planned move.
    floor: u64,
    /// Extends done so far (each adds 16 MiB to one volume).
    extends: u64,
}

/// How many warning, error and fenced-on-return lines of each process a failed soak prints.
const LOG_TAIL: usize = 60;

fn pattern(k: u64) -> u64 {
    k % 251 + 1
}

fn place(k: u64) -> (usize, u64) {
    ((k % VOLUMES as u64) as usize, (k / VOLUMES as u64) * RECORD)
}

/// The slowest `qemu-io` run so far (ms), and what it did.
static SLOWEST: std::sync::Mutex<(u128, String)> = std::sync::Mutex::new((0, String::new()));

/// A `qemu-io` run slower than this is reported as a violation: a writer or reader of the
/// active side would have hung that long.
const SLOW_IO: Duration = Duration::from_secs(20);

/// Runs `cmds` in one qemu-io on `uri`; `read_only` opens the export read-only (reads
/// then also work where writes are held).
fn qemu_io(uri: &str, cmds: &[String], read_only: bool) -> Result<String, String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    if read_only {
        cmd.arg("-r");
    }
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let started = Instant::now();
    let out = cmd.arg(uri).output().map_err(|e| e.to_string());
    let took = started.elapsed();
    {
        let mut slowest = SLOWEST.lock().expect("not poisoned");
        if took.as_millis() > slowest.0 {
            let what = cmds.first().map(|c| c.split(' ').next().unwrap_or_default()).unwrap_or_default();
            *slowest = (took.as_millis(), format!("{what} x{} on {uri}", cmds.len()));
        }
    }
    if took > SLOW_IO {
        eprintln!("slow qemu-io: {} ms on {uri}", took.as_millis());
    }
    let out = out?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(text);
    }
    Ok(text)
}

async fn uris(c: &mut Clients, g: &Group) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for v in &g.volumes {
        let r = c
            .volumes
            .attach_volume(pb::AttachVolumeRequest { volume: v.clone(), project: "soak".into() })
            .await
            .map_err(|s| format!("attach {v}: {}", s.message()))?;
        out.push(r.into_inner().uri);
    }
    Ok(out)
}

/// Writes records from..to, each acknowledged before the next counts.
async fn write(c: &mut Clients, g: &mut Group, n: u64) -> Result<(), String> {
    let uris = uris(c, g).await?;
    for k in g.acked..g.acked + n {
        let (vol, off) = place(k);
        qemu_io(&uris[vol], &[format!("write -P {} {off} {RECORD}", pattern(k))], false)?;
        g.acked = k + 1;
    }
    Ok(())
}

/// [`write`], retrying for up to 30 s while the active side does not take writes (an
/// agent that just restarted holds them until the orchestrator confirms it).
async fn write_when_writable(c: &mut Clients, g: &mut Group, n: u64) -> Result<(), String> {
    let (goal, deadline) = (g.acked + n, Instant::now() + Duration::from_secs(30));
    loop {
        match write(c, g, goal - g.acked).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(format!("no writes for 30 s: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// SIGKILLs the qemu-storage-daemon of agent `i` (its agent restarts it).
fn kill_daemon(cluster: &Cluster, i: usize) -> Result<(), String> {
    let pidfile = cluster.agent_dir(i).join("qemu/qsd.pid");
    let pid = std::fs::read_to_string(&pidfile).map_err(|e| format!("{}: {e}", pidfile.display()))?;
    let status = Command::new("kill").args(["-KILL", pid.trim()]).status().map_err(|e| e.to_string())?;
    if status.success() { Ok(()) } else { Err(format!("kill -KILL {} failed", pid.trim())) }
}

/// An agent SIGKILL inside [`disable_extend_enable`]: which side, after how many ms, and
/// whether while the disable runs (else while the enable runs).
#[derive(Clone, Copy)]
struct Kill {
    side: usize,
    delay_ms: u64,
    in_disable: bool,
}

/// Disables replication of `g`, extends one of its volumes by 16 MiB (at most 4 times
/// per group), and enables it again; with `kill`, that agent is SIGKILLed and restarted
/// while the disable or the enable runs, which must still end disabled or enabled.
/// Returns whether it extended, and whether a kill came while the execution ran.
async fn disable_extend_enable(
    c: &mut Clients,
    cluster: &mut Cluster,
    g: &mut Group,
    volume: usize,
    kill: Option<Kill>,
) -> Result<(bool, bool), String> {
    let in_disable = kill.filter(|k| k.in_disable);
    let disabled = c
        .replication
        .disable_replication(pb::DisableReplicationRequest {
            group: g.name.clone(),
            project: "soak".into(),
            no_wait: in_disable.is_some(),
        })
        .await
        .map_err(|s| format!("disable: {}", s.message()))?
        .into_inner();
    let (grp, mut inside) = match in_disable {
        None => (disabled.group.ok_or("no group in the result")?, false),
        Some(k) => {
            let (e, inside) = kill_during(c, cluster, &disabled.execution_id, k.side, k.delay_ms).await?;
            eprintln!(
                "  disable {} {} {} (agent {} SIGKILLed after {} ms)",
                e.id, e.status, e.error, k.side, k.delay_ms
            );
            (group_rec(c, &g.name).await?, inside)
        }
    };
    if grp.replication_status != "disabled" {
        return Err(format!("disable left {}: {}", grp.replication_status, grp.status_reason));
    }
    let extend = g.extends < 4;
    if extend {
        let v = c
            .volumes
            .get_volume(pb::GetVolumeRequest { volume: g.volumes[volume].clone(), project: "soak".into() })
            .await
            .map_err(|s| format!("get volume: {}", s.message()))?
            .into_inner();
        c.volumes
            .extend_volume(pb::ExtendVolumeRequest {
                volume: g.volumes[volume].clone(),
                project: "soak".into(),
                new_size_bytes: v.size_bytes + (16 * MIB) as i64,
            })
            .await
            .map_err(|s| format!("extend: {}", s.message()))?;
        g.extends += 1;
    }
    let in_enable = kill.filter(|k| !k.in_disable);
    let enabled = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: g.name.clone(),
            project: "soak".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 2,
            no_wait: in_enable.is_some(),
        })
        .await
        .map_err(|s| format!("enable: {}", s.message()))?
        .into_inner();
    let grp = match in_enable {
        None => enabled.group.ok_or("no group in the result")?,
        Some(k) => {
            let (e, killed_inside) = kill_during(c, cluster, &enabled.execution_id, k.side, k.delay_ms).await?;
            eprintln!(
                "  enable {} {} {} (agent {} SIGKILLed after {} ms)",
                e.id, e.status, e.error, k.side, k.delay_ms
            );
            inside = killed_inside;
            group_rec(c, &g.name).await?
        }
    };
    if grp.replication_status != "enabled" {
        return Err(format!("enable left {}: {}", grp.replication_status, grp.status_reason));
    }
    Ok((extend, inside))
}

/// Which of the records 0..upto read back with their pattern at the active side.
async fn present(c: &mut Clients, g: &Group, upto: u64) -> Result<Vec<bool>, String> {
    let uris = uris(c, g).await?;
    present_at(&uris, upto)
}

/// Which of the records 0..upto read back with their pattern from `uris` (one per
/// volume of a group, in its order). A read that cannot run at all (the export cannot be
/// opened) is an error, never a sign that the records are there.
fn present_at(uris: &[String], upto: u64) -> Result<Vec<bool>, String> {
    let mut ok = vec![true; upto as usize];
    for (vol, uri) in uris.iter().enumerate() {
        let ks: Vec<u64> = (0..upto).filter(|k| place(*k).0 == vol).collect();
        for chunk in ks.chunks(200) {
            let cmds: Vec<String> =
                chunk.iter().map(|k| format!("read -P {} {} {RECORD}", pattern(*k), place(*k).1)).collect();
            // A mismatch makes qemu-io fail too: only a failure without one is an error.
            let text = match qemu_io(uri, &cmds, true) {
                Ok(text) => text,
                Err(text) if text.contains("Pattern verification failed") => text,
                Err(e) => return Err(format!("reading {uri}: {}", e.trim())),
            };
            for line in text.lines().filter(|l| l.contains("Pattern verification failed at offset")) {
                let off: u64 = line
                    .split("offset ")
                    .nth(1)
                    .and_then(|r| r.split([',', ' ']).next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u64::MAX);
                let k = off / RECORD * VOLUMES as u64 + vol as u64;
                if let Some(slot) = ok.get_mut(k as usize) {
                    *slot = false;
                }
            }
        }
    }
    Ok(ok)
}

/// A group snapshot of `g` (nothing is written meanwhile), with `kill` = (side, delay):
/// that agent (and its daemon) SIGKILLed that long after the snapshot was asked for, and
/// restarted. A snapshot that ends available must hold every record acknowledged before
/// it: volumes are made from it and read. Then they and the snapshot are deleted (a
/// snapshot left in error too). Returns whether it ended available, and whether the kill
/// came while the call was still waiting.
async fn snapshot_step(
    c: &mut Clients,
    cluster: &mut Cluster,
    g: &Group,
    name: &str,
    kill: Option<(usize, u64)>,
) -> Result<(bool, bool), String> {
    let req = pb::CreateGroupSnapshotRequest { group: g.name.clone(), project: "soak".into(), name: name.into() };
    let mut caller = c.clone();
    let call = tokio::spawn(async move { caller.snapshots.create_group_snapshot(req).await });
    let mut inside = false;
    if let Some((side, delay_ms)) = kill {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.agents[side].proc.kill();
        inside = !call.is_finished();
        cluster.restart_agent(side, "qemu");
        wait_up(c).await?;
    }
    let answer = call.await.map_err(|e| e.to_string())?;
    let get = pb::GetSnapshotRequest { snapshot: name.into(), project: "soak".into() };
    let snap = match c.snapshots.get_snapshot(get).await {
        Ok(s) => s.into_inner(),
        // Refused before a record was made: nothing to check or clean.
        Err(s) if s.code() == tonic::Code::NotFound => {
            eprintln!("  snapshot {name} not made: {answer:?}");
            return Ok((false, inside));
        }
        Err(s) => return Err(format!("snapshot {name}: {}", s.message())),
    };
    eprintln!("  snapshot {name} {} {}", snap.status, snap.status_reason);
    if snap.status.ends_with("ing") {
        return Err(format!("snapshot {name} left {} after its call answered {answer:?}", snap.status));
    }
    let available = snap.status == "available";
    let mut made = Vec::new();
    if available {
        let mut clone_uris = Vec::new();
        for (i, v) in g.volumes.iter().enumerate() {
            let clone = format!("{name}-{i}");
            c.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: clone.clone(),
                    project: "soak".into(),
                    from_snapshot: snap.id.clone(),
                    from_volume: v.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("a volume from snapshot {name}: {}", s.message()))?;
            made.push(clone.clone());
            let r = c
                .volumes
                .attach_volume(pb::AttachVolumeRequest { volume: clone, project: "soak".into() })
                .await
                .map_err(|s| format!("attach a volume from snapshot {name}: {}", s.message()))?;
            clone_uris.push(r.into_inner().uri);
        }
        let held = present_at(&clone_uris, g.acked)?;
        let missing = held.iter().filter(|x| !**x).count();
        if missing > 0 {
            return Err(format!(
                "snapshot {name} of {} lacks {missing} of the {} records acknowledged before it (first: {:?})",
                g.name,
                g.acked,
                held.iter().enumerate().filter(|(_, x)| !**x).map(|(k, _)| k).take(8).collect::<Vec<_>>()
            ));
        }
    }
    for v in made {
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest { volume: v.clone(), project: "soak".into() })
            .await
            .map_err(|s| format!("delete {v}: {}", s.message()))?;
    }
    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: snap.id.clone(), project: "soak".into() })
        .await
        .map_err(|s| format!("delete snapshot {name} ({}): {}", snap.status, s.message()))?;
    // The layers the snapshot pinned are folded by the group's next sync (every 2 s; a
    // replica side that was just killed takes its restart first): the chains are back
    // within their bound by then.
    let (waited, deadline) = (Instant::now(), Instant::now() + Duration::from_secs(15));
    let first = longest_chain(cluster.path());
    loop {
        let (layers, which) = longest_chain(cluster.path());
        if layers <= 6 {
            if first.0 > 6 {
                eprintln!(
                    "  chains back within 6 layers {} ms after the snapshot's deletion (it had {}: {})",
                    waited.elapsed().as_millis(),
                    first.0,
                    first.1
                );
            }
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("15 s after snapshot {name} was deleted a chain still has {layers} layers ({which})"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((available, inside))
}

async fn group_rec(c: &mut Clients, name: &str) -> Result<pb::Group, String> {
    c.groups
        .get_group(pb::GetGroupRequest { group: name.into(), project: "soak".into() })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

async fn wait_up(c: &mut Clients) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let list =
            c.sites.list_backends(pb::ListBackendsRequest::default()).await.map_err(|s| s.message().to_string())?;
        if list.get_ref().backends.iter().filter(|b| b.status == "up").count() == 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("agents not up within 45 s: {:?}", list.get_ref().backends));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn move_request(g: &str, target: &str, force: bool, discard: &str, no_wait: bool) -> pb::FailoverGroupRequest {
    pb::FailoverGroupRequest {
        group: g.into(),
        project: "soak".into(),
        target_backend: target.into(),
        force,
        discard_changes_on: discard.into(),
        no_wait,
    }
}

async fn failover(c: &mut Clients, g: &str, target: &str, force: bool, discard: &str) -> Result<pb::Group, String> {
    let r = c
        .replication
        .failover_group(move_request(g, target, force, discard, false))
        .await
        .map_err(|s| format!("{g}: {}", s.message()))?
        .into_inner();
    let grp = r.group.ok_or("no group in the result")?;
    if grp.replication_status == "error" {
        return Err(format!("{g}: {}", grp.status_reason));
    }
    Ok(grp)
}

/// A planned move of `g` to `target` whose agent `side` (and its daemon) is SIGKILLed
/// `delay_ms` after the move was asked for, then restarted: the move must end on its own
/// (the engine retries the dead agent's calls) with the group at one side or the other,
/// serving. Returns whether the group moved, and whether the kill came while the move
/// still ran.
async fn move_with_kill(
    c: &mut Clients,
    cluster: &mut Cluster,
    g: &str,
    target: &str,
    side: usize,
    delay_ms: u64,
) -> Result<(bool, bool), String> {
    let before = group_rec(c, g).await?;
    let r = c
        .replication
        .failover_group(move_request(g, target, false, "", true))
        .await
        .map_err(|s| format!("{g}: {}", s.message()))?
        .into_inner();
    let (e, inside) = kill_during(c, cluster, &r.execution_id, side, delay_ms).await?;
    let after = group_rec(c, g).await?;
    eprintln!(
        "  move {} {}: {} active on {} ({}) {}",
        e.id, e.status, g, after.active_backend, after.replication_status, e.error
    );
    if after.replication_status == "error" || after.replication_status.ends_with("ing") {
        return Err(format!(
            "the move {} ({}) left {g} {}: {}",
            e.id, e.status, after.replication_status, after.status_reason
        ));
    }
    Ok((after.active_backend != before.active_backend, inside))
}

/// SIGKILLs agent `side` (and its daemon) `delay_ms` from now and restarts it, then waits
/// (up to 120 s) for execution `id` to end. Returns it, and whether the kill came while it
/// still ran.
async fn kill_during(
    c: &mut Clients,
    cluster: &mut Cluster,
    id: &str,
    side: usize,
    delay_ms: u64,
) -> Result<(pb::Execution, bool), String> {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    cluster.agents[side].proc.kill();
    let get = pb::GetExecutionRequest { id: id.into() };
    let inside = c.executions.get_execution(get.clone()).await.map(|e| e.get_ref().status == "running").unwrap_or(true);
    cluster.restart_agent(side, "qemu");
    wait_up(c).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let e = c
            .executions
            .get_execution(get.clone())
            .await
            .map_err(|s| format!("execution {id}: {}", s.message()))?
            .into_inner();
        if e.status != "running" {
            return Ok((e, inside));
        }
        if Instant::now() > deadline {
            return Err(format!("execution {id} ({}) still runs 120 s after the kill, at {}", e.summary, e.step));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The most qcow2 files any volume directory holds (its layers, and the files of its
/// snapshots), and that directory's pool, volume and sorted file names, with what its
/// agent's saved state says of the volume.
fn longest_chain(dir: &Path) -> (usize, String) {
    let mut longest: Option<(&str, String, Vec<String>)> = None;
    for pool in ["pool-agent-backend-a", "pool-agent-backend-b"] {
        if let Ok(vols) = std::fs::read_dir(dir.join(pool).join("volumes")) {
            for v in vols.flatten() {
                let files: Vec<String> = std::fs::read_dir(v.path())
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.ends_with(".qcow2"))
                            .collect()
                    })
                    .unwrap_or_default();
                if files.len() > longest.as_ref().map_or(0, |l| l.2.len()) {
                    longest = Some((pool, v.file_name().to_string_lossy().into_owned(), files));
                }
            }
        }
    }
    let Some((pool, id, mut files)) = longest else { return (0, String::new()) };
    files.sort();
    // The agent's state is read once, for the volume found.
    let view = state_view(dir, pool.trim_start_matches("pool-"), &id);
    (files.len(), format!("{pool}/{id}: {}; {view}", files.join(" ")))
}

/// What an agent's saved state says of one volume: its role, group and layers (`seq`,
/// `p` for a recovery point, `+` once the peer holds it), and the snapshots that pin
/// files of it. Files on disk that are not among the layers are pinned or left over.
fn state_view(dir: &Path, agent: &str, volume: &str) -> String {
    let file = dir.join(agent).join("qemu").join("state.json");
    let Some(st) = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) else {
        return format!("no readable {}", file.display());
    };
    let v = &st["volumes"][volume];
    let layers: Vec<String> = v["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    let rp = if l["rp"].is_null() { "" } else { "p" };
                    let acked = if l["acked"].as_bool() == Some(true) { "+" } else { "" };
                    format!("{}{rp}{acked}", l["seq"])
                })
                .collect()
        })
        .unwrap_or_default();
    let pins: Vec<&String> = st["snapshots"]
        .as_object()
        .map(|m| m.iter().filter(|(_, s)| !s["members"][volume].is_null()).map(|(id, _)| id).collect())
        .unwrap_or_default();
    format!("state: role {}, group {}, layers [{}], snapshots {:?}", v["role"], v["group_id"], layers.join(" "), pins)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let minutes: u64 =
        std::env::args().skip_while(|a| a != "--minutes").nth(1).and_then(|m| m.parse().ok()).unwrap_or(2);
    let seed = std::env::args()
        .skip_while(|a| a != "--seed")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let mut groups = Vec::new();
    for gi in 0..GROUPS {
        let name = format!("soak-{gi}");
        let mut volumes = Vec::new();
        for vi in 0..VOLUMES {
            let v = format!("{name}-v{vi}");
            c.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: v.clone(),
                    project: "soak".into(),
                    size_bytes: (64 * MIB) as i64,
                    backend: "backend-a".into(),
                    ..Default::default()
                })
                .await
                .expect("create volume");
            volumes.push(v);
        }
        c.groups
            .create_group(pb::CreateGroupRequest {
                name: name.clone(),
                project: "soak".into(),
                group_type: "consistent-replication".into(),
                backend: "backend-a".into(),
                volumes: volumes.clone(),
                ..Default::default()
            })
            .await
            .expect("create group");
        c.replication
            .enable_replication(pb::EnableReplicationRequest {
                group: name.clone(),
                project: "soak".into(),
                target_backend: "backend-b".into(),
                sync_interval_seconds: 2,
                no_wait: false,
            })
            .await
            .expect("enable replication");
        groups.push(Group { name, volumes, acked: 0, floor: 0, extends: 0 });
    }
    let (mut steps, mut planned, mut disasters) = (0u64, 0u64, 0u64);
    let (mut restarts, mut daemon_kills, mut reenables, mut extends) = (0u64, 0u64, 0u64, 0u64);
    let mut moved = 0u64;
    let (mut killed_moves, mut killed_moves_moved, mut kills_inside) = (0u64, 0u64, 0u64);
    let (mut killed_enables, mut kills_inside_enables) = (0u64, 0u64);
    let (mut killed_disables, mut kills_inside_disables) = (0u64, 0u64);
    let (mut snapshots, mut snapshots_available, mut killed_snapshots, mut kills_inside_snapshots) =
        (0u64, 0u64, 0u64, 0u64);
    let mut violations: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    while Instant::now() < end && violations.is_empty() {
        steps += 1;
        let gi = rng.usize(..GROUPS);
        let g = &mut groups[gi];
        if let Err(e) = write(&mut c, g, rng.u64(20..80)).await {
            violations.push(format!("step {steps}: writing to {}: {e}", g.name));
            break;
        }
        let rec = match group_rec(&mut c, &g.name).await {
            Ok(r) => r,
            Err(e) => {
                violations.push(format!("step {steps}: {e}"));
                break;
            }
        };
        let away = rec.active_backend != rec.primary_backend;
        eprintln!(
            "step {steps}: {} active on {} ({}), {} records acked, floor {}",
            g.name, rec.active_backend, rec.replication_status, g.acked, g.floor
        );
        let kind = rng.u8(..20);
        if (4..6).contains(&kind) || (6..8).contains(&kind) {
            // An agent restart (agent and daemon SIGKILLed) or a daemon-only kill, on
            // either side, with nothing moved: every acknowledged record must stay.
            let side = rng.usize(..2);
            if kind < 6 {
                restarts += 1;
                cluster.agents[side].proc.kill();
                // One restart in three comes back on a new port, as an agent moved to
                // another host would: the primary's periodic syncs must find it there.
                if rng.u8(..3) == 0 {
                    moved += 1;
                    cluster.restart_agent_elsewhere(side, "qemu");
                    eprintln!(
                        "step {steps}: agent {side} and its daemon SIGKILLed and restarted at {}",
                        cluster.agents[side].addr()
                    );
                } else {
                    cluster.restart_agent(side, "qemu");
                    eprintln!("step {steps}: agent {side} and its daemon SIGKILLed and restarted");
                }
            } else {
                daemon_kills += 1;
                eprintln!("step {steps}: daemon of agent {side} SIGKILLed");
                if let Err(e) = kill_daemon(&cluster, side) {
                    violations.push(format!("step {steps}: {e}"));
                }
            }
            if let Err(e) = wait_up(&mut c).await {
                violations.push(format!("step {steps}: {e}"));
                break;
            }
            for g in groups.iter_mut() {
                // Nothing moved: every acknowledged record is still at the active side.
                // (The floor stays: records not yet shipped may still go in a disaster.)
                match present(&mut c, g, g.acked).await {
                    Ok(p) if p.iter().all(|x| *x) => {}
                    Ok(p) => violations.push(format!(
                        "step {steps}: {} lost {} acknowledged records across a restart",
                        g.name,
                        p.iter().filter(|x| !**x).count()
                    )),
                    Err(e) => violations.push(format!("step {steps}: reading {} after the restart: {e}", g.name)),
                }
                if let Err(e) = write_when_writable(&mut c, g, 5).await {
                    violations.push(format!("step {steps}: writing to {} after the restart: {e}", g.name));
                }
            }
        } else if (8..10).contains(&kind) && !away && rec.replication_status == "enabled" {
            reenables += 1;
            let volume = rng.usize(..VOLUMES);
            eprintln!("step {steps}: disable, extend and enable {}", g.name);
            // Half of them with an agent (either side) killed while the disable or the
            // enable runs.
            // A disable takes tens of ms (an enable copies everything): its kill comes sooner.
            let kill = rng.bool().then(|| {
                let in_disable = rng.bool();
                Kill { side: rng.usize(..2), delay_ms: rng.u64(0..if in_disable { 40 } else { 400 }), in_disable }
            });
            let in_disable = kill.is_some_and(|k| k.in_disable);
            killed_enables += u64::from(kill.is_some() && !in_disable);
            killed_disables += u64::from(in_disable);
            match disable_extend_enable(&mut c, &mut cluster, g, volume, kill).await {
                // Enabling copied everything acknowledged so far to site B.
                Ok((extended, inside)) => {
                    extends += u64::from(extended);
                    kills_inside_enables += u64::from(inside && !in_disable);
                    kills_inside_disables += u64::from(inside && in_disable);
                    g.floor = g.acked;
                }
                Err(e) => violations.push(format!("step {steps}: disable/extend/enable of {}: {e}", g.name)),
            }
            if kill.is_some() {
                // A restarted agent holds writes until the orchestrator confirms it (fenced
                // on return), as after any agent restart.
                for g in groups.iter_mut() {
                    if let Err(e) = write_when_writable(&mut c, g, 5).await {
                        violations.push(format!("step {steps}: writing to {} after the kill: {e}", g.name));
                    }
                }
            }
        } else if kind < 4 && !away {
            // Disaster: the active site (backend-a) dies with its daemon.
            disasters += 1;
            eprintln!("step {steps}: disaster: backend-a's agent and daemon SIGKILLed");
            cluster.agents[0].proc.kill();
            tokio::time::sleep(Duration::from_millis(rng.u64(0..1500))).await;
            for other in groups.iter().map(|g| g.name.clone()) {
                // Groups already active at site B only lose their replica.
                let at_a = group_rec(&mut c, &other).await.map(|r| r.active_backend == "backend-a").unwrap_or(false);
                if at_a && let Err(e) = failover(&mut c, &other, "backend-b", true, "").await {
                    violations.push(format!("step {steps}: forced failover of {other}: {e}"));
                }
            }
            for g in groups.iter_mut() {
                match present(&mut c, g, g.acked).await {
                    Ok(p) => {
                        let prefix = p.iter().take_while(|x| **x).count() as u64;
                        if p.iter().skip(prefix as usize).any(|x| *x) {
                            violations.push(format!("step {steps}: {} is not a prefix after a disaster", g.name));
                        }
                        if prefix < g.floor {
                            violations.push(format!(
                                "step {steps}: {} lost records acknowledged before the last planned move ({prefix} < {})",
                                g.name, g.floor
                            ));
                        }
                        // What came after the prefix is lost by design; the writer goes on from it.
                        g.acked = prefix;
                        g.floor = prefix;
                    }
                    Err(e) => violations.push(format!("step {steps}: reading {}: {e}", g.name)),
                }
                // The site that took over serves writes as soon as the failover returns,
                // with site A still down.
                if let Err(e) = write(&mut c, g, 5).await {
                    violations.push(format!("step {steps}: writing at B to {} right after the failover: {e}", g.name));
                }
            }
            cluster.restart_agent(0, "qemu");
            if let Err(e) = wait_up(&mut c).await {
                violations.push(format!("step {steps}: {e}"));
                break;
            }
            for g in groups.iter_mut() {
                if let Err(e) = write(&mut c, g, 5).await {
                    violations.push(format!("step {steps}: writing at B to {}: {e}", g.name));
                }
                // Fail back with consent to discard A's divergent writes.
                match failover(&mut c, &g.name, "default", false, "backend-a").await {
                    Ok(_) => g.floor = g.acked,
                    Err(e) => violations.push(format!("step {steps}: failback of {} after the disaster: {e}", g.name)),
                }
            }
        } else if (10..13).contains(&kind) && matches!(rec.replication_status.as_str(), "enabled" | "failed-over") {
            // A planned move with an agent (either side) killed at a random moment in it.
            killed_moves += 1;
            let target = if away { "default" } else { "backend-b" };
            let (side, delay) = (rng.usize(..2), rng.u64(0..500));
            eprintln!("step {steps}: planned move of {} to {target}, agent {side} SIGKILLed after {delay} ms", g.name);
            match move_with_kill(&mut c, &mut cluster, &g.name, target, side, delay).await {
                Ok((moved, inside)) => {
                    killed_moves_moved += u64::from(moved);
                    kills_inside += u64::from(inside);
                    // Moved or not, nothing was lost: every acknowledged record is at
                    // the active side, and protected from now on.
                    match present(&mut c, g, g.acked).await {
                        Ok(p) if p.iter().all(|x| *x) => g.floor = g.acked,
                        Ok(p) => violations.push(format!(
                            "step {steps}: {} lost {} acknowledged records in a move with a kill",
                            g.name,
                            p.iter().filter(|x| !**x).count()
                        )),
                        Err(e) => violations.push(format!("step {steps}: reading {}: {e}", g.name)),
                    }
                }
                Err(e) => violations.push(format!("step {steps}: {e}")),
            }
            for g in groups.iter_mut() {
                if let Err(e) = write_when_writable(&mut c, g, 5).await {
                    violations.push(format!("step {steps}: writing to {} after the kill: {e}", g.name));
                }
            }
        } else if (13..15).contains(&kind) && matches!(rec.replication_status.as_str(), "enabled" | "failed-over") {
            snapshots += 1;
            let name = format!("snap-{steps}");
            // Three kills in four hit the side that takes the snapshot (the active one).
            let active = usize::from(rec.active_backend == "backend-b");
            let kill = rng.bool().then(|| (if rng.u8(..4) < 3 { active } else { 1 - active }, rng.u64(0..60)));
            killed_snapshots += u64::from(kill.is_some());
            eprintln!("step {steps}: group snapshot {name} of {} (kill: {kill:?})", g.name);
            let g = &groups[gi];
            match snapshot_step(&mut c, &mut cluster, g, &name, kill).await {
                Ok((available, inside)) => {
                    snapshots_available += u64::from(available);
                    kills_inside_snapshots += u64::from(inside);
                }
                Err(e) => violations.push(format!("step {steps}: {e}")),
            }
            if kill.is_some() {
                for g in groups.iter_mut() {
                    if let Err(e) = write_when_writable(&mut c, g, 5).await {
                        violations.push(format!("step {steps}: writing to {} after the kill: {e}", g.name));
                    }
                }
            }
        } else {
            planned += 1;
            let target = if away { "default" } else { "backend-b" };
            eprintln!("step {steps}: planned move of {} to {target}", g.name);
            match failover(&mut c, &g.name, target, false, "").await {
                Ok(_) => g.floor = g.acked,
                Err(e) => violations.push(format!("step {steps}: planned move of {}: {e}", g.name)),
            }
        }
        for g in groups.iter() {
            match present(&mut c, g, g.floor).await {
                Ok(p) if p.iter().all(|x| *x) => {}
                Ok(p) => violations.push(format!(
                    "step {steps}: {} is missing {} of its {} protected records (first missing: {:?})",
                    g.name,
                    p.iter().filter(|x| !**x).count(),
                    g.floor,
                    p.iter().enumerate().filter(|(_, x)| !**x).map(|(k, _)| k).take(8).collect::<Vec<_>>()
                )),
                Err(e) => violations.push(format!("step {steps}: reading {}: {e}", g.name)),
            }
        }
        // One primary per volume, on its group's active backend.
        let agents =
            [("backend-a", cluster.agents[0].endpoint.clone()), ("backend-b", cluster.agents[1].endpoint.clone())];
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        for v in project_role_violations(&mut c, cluster.dir.path(), &agents, "soak", &names).await {
            violations.push(format!("step {steps}: {v}"));
        }
        let (layers, which) = longest_chain(cluster.path());
        if layers > 6 {
            violations.push(format!("step {steps}: a chain has {layers} layers ({which})"));
        }
        let daemons = drover_tests::cluster::daemons_under(cluster.path()).len();
        if daemons != 2 {
            violations.push(format!("step {steps}: {daemons} live qemu-storage-daemons, expected 2"));
        }
    }
    let slowest = SLOWEST.lock().expect("not poisoned").clone();
    if slowest.0 > SLOW_IO.as_millis() {
        violations.push(format!("a qemu-io run took {} ms ({}): the active side hung", slowest.0, slowest.1));
    }
    let records: u64 = groups.iter().map(|g| g.acked).sum();
    // The agents' op logs, kept across every SIGKILL and restart: no op_id may have
    // entered a driver twice.
    let (twice, mutations) = cluster.repeated_op_ids();
    for t in &twice {
        violations.push(format!("op_id run twice: {t}"));
    }
    if mutations == 0 {
        violations.push("the agents' op logs are empty: the check of op_ids ran on nothing".into());
    }
    // Folds cut short where their block job had re-pointed a layer's header (the agents
    // point it back before anything follows it): how often the soak hit that window.
    let realigned: Vec<String> = cluster
        .agents
        .iter()
        .flat_map(|a| {
            let log = a.proc.log_text();
            log.lines()
                .filter(|l| l.contains("names another backing than the chain has"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    for line in realigned.iter().take(10) {
        eprintln!("realigned: {line}");
    }
    let realigned = realigned.len();
    println!(
        "soak (seed {seed}): {minutes} min, {steps} steps, {planned} planned moves, {disasters} disasters \
         (site A's agent and daemon SIGKILLed), {restarts} agent restarts ({moved} on a new port), {daemon_kills} daemon kills, \
         {reenables} disable/enable ({extends} extends; {killed_enables} with an agent SIGKILLed in the \
         enable, {kills_inside_enables} while it ran; {killed_disables} in the disable, {kills_inside_disables} \
         while it ran), {killed_moves} planned moves with an agent SIGKILLed \
         in them ({kills_inside} while it ran, {killed_moves_moved} moved), {snapshots} group snapshots \
         ({snapshots_available} available; {killed_snapshots} with an agent SIGKILLed, {kills_inside_snapshots} \
         while the call waited), {realigned} layer headers pointed \
         back at the chain, {mutations} agent mutations logged ({} op_ids twice), {records} records verified, slowest qemu-io {} ms ({}), {} violations",
        twice.len(),
        slowest.0,
        slowest.1,
        violations.len()
    );
    for v in &violations {
        println!("violation: {v}");
    }
    if !violations.is_empty() {
        // The evidence for a post-mortem where the directory is gone (CI): each process's
        // last warnings and errors, and the fenced-on-return lines (held writes are
        // logged at info when released or kept).
        let procs = std::iter::once(&cluster.orchestrator.proc).chain(cluster.agents.iter().map(|a| &a.proc));
        for p in procs {
            let text = p.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| ["WARN", "ERROR", "held", "writes released", "promoted"].iter().any(|w| l.contains(w)))
                .collect();
            eprintln!("--- the last warnings, errors and holds of {} ({} in all) ---", p.name, lines.len());
            for l in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
                eprintln!("{l}");
            }
        }
    }
    if !violations.is_empty() && std::env::var_os("DROVER_SOAK_KEEP").is_some() {
        // Keep the processes and the directory for a post-mortem.
        println!("kept for inspection: {}", cluster.path().display());
        std::mem::forget(cluster);
    }
    if violations.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
