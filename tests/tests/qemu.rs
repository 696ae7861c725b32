//! Real replication: an orchestrator on a real etcd, two qemu agents (each with its own
//! qemu-storage-daemon) as separate processes, and qemu-io / qemu-img as the independent
//! clients that write and verify the data.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::cluster::qemu_io;
use drover_tests::{Cluster, Etcd, StoreChoice, consistent_group as group, wait_backend_up};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

async fn uri(c: &mut Clients, volume: &str) -> String {
    c.volumes
        .attach_volume(pb::AttachVolumeRequest { volume: volume.into(), project: "tests".into() })
        .await
        .expect("attach")
        .into_inner()
        .uri
}

async fn volume_id(c: &mut Clients, volume: &str) -> String {
    c.volumes
        .get_volume(pb::GetVolumeRequest { volume: volume.into(), project: "tests".into() })
        .await
        .expect("volume")
        .into_inner()
        .id
}

/// Polls `ok` every 200 ms for up to 30 s.
async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn io(uri: &str, cmds: &[&str]) {
    qemu_io(uri, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
}

async fn enable(c: &mut Clients, group: &str, interval_s: i64) -> pb::ReplicationResult {
    c.replication
        .enable_replication(pb::EnableReplicationRequest {
            no_wait: false,
            group: group.into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: interval_s,
        })
        .await
        .expect("enable replication")
        .into_inner()
}

async fn failover(
    c: &mut Clients,
    group: &str,
    target: &str,
    force: bool,
) -> Result<pb::ReplicationResult, tonic::Status> {
    c.replication
        .failover_group(pb::FailoverGroupRequest {
            no_wait: false,
            group: group.into(),
            project: "tests".into(),
            target_backend: target.into(),
            force,
            discard_changes_on: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn assert_all_succeeded(r: &pb::ReplicationResult) {
    let g = r.group.as_ref().expect("group");
    assert!(r.items.iter().all(|i| i.outcome == "success"), "{:?}; {}", r.items, g.status_reason);
}

/// A member of project `tests`, with nothing but its own token, builds, replicates, fails
/// over and fails back its own qemu group, and the data is verified with qemu-io at each
/// side; a member of another project cannot see or move it, nor read its executions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_fails_over_and_back_its_own_group_and_no_one_else_can() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let admin = cluster.clients().await;
    let ca = drover_tests::cluster::ca_file(cluster.dir.path());
    let as_member = |project: &str| {
        let project = project.to_string();
        let admin = admin.clone();
        let (endpoint, ca) = (cluster.orchestrator.endpoint.clone(), ca.clone());
        async move {
            let mut admin = admin;
            let t = admin
                .tokens
                .create_token(pb::CreateTokenRequest { name: "m".into(), project, role: "member".into() })
                .await
                .unwrap()
                .into_inner();
            Clients::connect(&endpoint, Duration::from_secs(120), Some(&t.secret), Some(&ca)).await.unwrap()
        }
    };
    let mut m = as_member("tests").await;
    let mut other = as_member("other").await;
    let vols = group(&mut m, "mine", 2, 32 * MIB).await;
    for (i, v) in vols.iter().enumerate() {
        io(&uri(&mut m, v).await, &[&format!("write -P {:#x} 0 1M", 0x40 + i)]);
    }
    assert_eq!(enable(&mut m, "mine", 3600).await.group.unwrap().replication_status, "enabled");
    for (i, v) in vols.iter().enumerate() {
        io(&uri(&mut m, v).await, &[&format!("write -P {:#x} 8M 512k", 0x50 + i)]);
    }
    let g = m.groups.get_group(pb::GetGroupRequest { group: "mine".into(), project: "tests".into() }).await;
    let id = g.unwrap().into_inner().id;

    // The other project's member: not found by id, its failover not found, lists empty.
    let s = other.groups.get_group(pb::GetGroupRequest { group: id.clone(), project: String::new() }).await;
    assert_eq!(s.unwrap_err().code(), tonic::Code::NotFound);
    let s = other
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: id.clone(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(s.unwrap_err().code(), tonic::Code::NotFound);
    let list = other.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
    assert!(list.executions.is_empty(), "{list:?}");

    let r = failover(&mut m, "mine", "backend-b", false).await.expect("the member's planned failover");
    assert_all_succeeded(&r);
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut m, v).await;
        assert!(u.contains("agent-backend-b"), "{u}");
        io(&u, &[&format!("read -P {:#x} 0 1M", 0x40 + i), &format!("read -P {:#x} 8M 512k", 0x50 + i)]);
        io(&u, &[&format!("write -P {:#x} 16M 64k", 0x60 + i)]);
    }
    let r = failover(&mut m, "mine", "default", false).await.expect("the member's failback");
    assert_all_succeeded(&r);
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut m, v).await;
        assert!(u.contains("agent-backend-a"), "{u}");
        io(
            &u,
            &[
                &format!("read -P {:#x} 0 1M", 0x40 + i),
                &format!("read -P {:#x} 8M 512k", 0x50 + i),
                &format!("read -P {:#x} 16M 64k", 0x60 + i),
            ],
        );
    }
    // The executions are the member's to read, and the admin's.
    let mine = m.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
    assert!(mine.executions.iter().any(|e| e.summary.contains("failover")), "{mine:?}");
    for e in &mine.executions {
        let s = other.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await;
        assert_eq!(s.unwrap_err().code(), tonic::Code::NotFound);
    }
}

/// (a) Known patterns written at site A are at site B after a planned failover, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failover_moves_every_byte() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "pf", 3, 64 * MIB).await;
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        io(&u, &[&format!("write -P {:#x} 0 4M", 0x10 + i), &format!("write -P {:#x} 20M 1M", 0x20 + i)]);
    }
    let r = enable(&mut c, "pf", 3600).await;
    assert_eq!(r.group.unwrap().replication_status, "enabled");
    let shown = c
        .groups
        .get_group(pb::GetGroupRequest { group: "pf".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(shown.rpo_ms >= 0, "a group with a complete recovery point reports its RPO: {}", shown.rpo_ms);
    // Both sides report the bytes of a point the same way: per volume, data only.
    for id in &shown.volume_ids {
        let mut sides = Vec::new();
        for agent in &cluster.agents {
            let mut a = drover_tests::cluster::agent_client(&agent.endpoint, cluster.dir.path()).await;
            let info = a
                .get_replication_info(drover_proto::agent::v1::GetReplicationInfoRequest {
                    volume_id: id.clone(),
                    estimate_pending: false,
                })
                .await
                .unwrap()
                .into_inner();
            sides.push((info.recovery_point_id, info.last_sync_bytes));
        }
        assert_eq!(sides[0], sides[1], "volume {id}: (point, bytes) at A and at B");
        assert_eq!(sides[0].1, (5 * MIB) as i64, "volume {id}: the initial copy ships the 5 MiB written");
    }
    // Written after the initial copy: travels as a delta with the final sync.
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        io(&u, &[&format!("write -P {:#x} 40M 512k", 0x30 + i), "write -z 0 64k"]);
    }
    let r = failover(&mut c, "pf", "backend-b", false).await.expect("planned failover");
    assert_all_succeeded(&r);
    assert_eq!(r.group.as_ref().unwrap().active_backend, "backend-b");
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-b"), "volume must be served at site B now: {u}");
        io(
            &u,
            &[
                "read -P 0 0 64k",
                &format!("read -P {:#x} 64k 4032k", 0x10 + i),
                &format!("read -P {:#x} 20M 1M", 0x20 + i),
                &format!("read -P {:#x} 40M 512k", 0x30 + i),
                "read -P 0 41M 23M",
            ],
        );
        // Writable at B after promotion.
        io(&u, &["write -P 0x77 60M 64k", "read -P 0x77 60M 64k"]);
    }
}

/// Parses "shipped N bytes" out of the newest history event of an action.
fn shipped(g: &pb::Group, action: &str) -> u64 {
    let e = g.history.iter().rev().find(|e| e.action == action).expect("history event");
    let after = e.detail.split("shipped ").nth(1).expect("shipped in the detail");
    after.split(' ').next().unwrap().parse().expect("a byte count")
}

/// Bytes covered by the clusters a write of `len` bytes at `off` touches.
fn cluster_bytes(off: u64, len: u64) -> u64 {
    let first = off / CLUSTER;
    let last = (off + len).div_ceil(CLUSTER);
    (last - first) * CLUSTER
}

/// (c) A failback with reprotect ships only what changed at site B, and site A then holds
/// all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_ships_only_the_delta() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "fb", 2, 64 * MIB).await;
    for v in &vols {
        let u = uri(&mut c, v).await;
        io(&u, &["write -P 0x11 0 16M"]);
    }
    enable(&mut c, "fb", 3600).await;
    assert_all_succeeded(&failover(&mut c, "fb", "backend-b", false).await.unwrap());

    // Changes at B: aligned, unaligned and a zeroed range.
    let writes: [(u64, u64); 3] = [(16 * MIB, 2 * MIB), (40 * MIB + 1000, 100_000), (4 * MIB + 5, 3)];
    let mut changed = 0;
    for v in &vols {
        let u = uri(&mut c, v).await;
        for (off, len) in writes {
            io(&u, &[&format!("write -P 0x5b {off} {len}")]);
            changed += cluster_bytes(off, len);
        }
        io(&u, &["write -z 8M 128k"]);
    }
    let r = failover(&mut c, "fb", "default", false).await.expect("failback");
    assert_all_succeeded(&r);
    let g = r.group.unwrap();
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("enabled", "backend-a"));
    let bytes = shipped(&g, "failback");
    // Payload bytes only; protobuf framing adds at most 32 bytes per chunk of up to 1 MiB
    // and is not counted. The bound: 1.2 x the changed bytes rounded up to clusters.
    let bound = changed * 12 / 10;
    println!("failback shipped {bytes} bytes for {changed} changed bytes (rounded to clusters); bound {bound}");
    assert!(bytes <= bound, "failback shipped {bytes} bytes, more than 1.2 x {changed}");
    assert!(bytes >= 2 * 2 * MIB, "the 2 MiB writes of both volumes must have been shipped ({bytes})");
    for v in &vols {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-a"), "{u}");
        io(
            &u,
            &[
                "read -P 0x11 0 4194309",
                "read -P 0x5b 4194309 3",
                "read -P 0x11 4194312 4194296",
                "read -P 0 8M 128k",
                "read -P 0x5b 16M 2M",
                &format!("read -P 0x5b {} 100000", 40 * MIB + 1000),
            ],
        );
    }
}

/// (b) While writes run to a group of 3 volumes, SIGKILL the source agent and its
/// qemu-storage-daemon, then fail over as a disaster. Site B holds one complete earlier
/// recovery point: every volume at the same point of the write sequence, no torn slot, and
/// the point no older than 2 x the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_failover_lands_on_one_consistent_point() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "dr", 3, 8 * MIB).await;
    let interval = Duration::from_secs(1);
    enable(&mut c, "dr", interval.as_secs() as i64).await;
    let mut uris = Vec::new();
    for v in &vols {
        uris.push(uri(&mut c, v).await);
    }
    let writer = drover_tests::writer::Writer::start(uris.clone());
    tokio::time::sleep(Duration::from_millis(4500)).await;
    cluster.agents[0].proc.kill();
    let killed_at = Instant::now();
    let log = writer.stop();
    let r = failover(&mut c, "dr", "backend-b", true).await.expect("disaster failover");
    assert_all_succeeded(&r);
    let g = r.group.unwrap();
    assert!(!g.divergence_point.is_empty(), "a disaster failover records the divergence point");

    // Read every volume at site B with qemu-img, an independent reader.
    let mut actual: Vec<Vec<u8>> = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        actual.push(drover_tests::writer::slots(cluster.path(), &u, &format!("b{i}")));
    }
    assert!(log.len() > 30, "the writer made only {} writes", log.len());
    // The recovery point is the state after the first k writes, for one k.
    let matches = drover_tests::writer::prefixes(&log, &actual);
    let k = *matches
        .last()
        .unwrap_or_else(|| panic!("site B matches no prefix of the write sequence: not crash-consistent"));
    assert!(k > 0, "site B holds no write at all");
    let point_after = log[k - 1].done_at.expect("a write inside the point completed");
    let age = killed_at.duration_since(point_after);
    println!("site B holds the first {k} of {} writes; the point is at most {age:?} old at the kill", log.len());
    assert!(age <= interval * 2, "recovery point is {age:?} old, more than 2 x {interval:?}");
    cluster.assert_no_op_ran_twice();
}

fn replica_top(agent_dir: &Path, volume_id: &str) -> std::path::PathBuf {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent_dir.join("qemu/state.json")).unwrap()).unwrap();
    let seq = state["volumes"][volume_id]["layers"].as_array().unwrap().last().unwrap()["seq"].as_u64().unwrap();
    let pool = agent_dir.parent().unwrap().join("pool-agent-backend-b");
    pool.join("volumes").join(volume_id).join(format!("L{seq}.qcow2"))
}

/// (d) SIGKILL the target agent in the middle of a transfer: the previous point stays
/// intact, and the next sync completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crash_mid_transfer_keeps_the_previous_point() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "mt", 1, 512 * MIB).await;
    let id = volume_id(&mut c, &vols[0]).await;
    let u = uri(&mut c, &vols[0]).await;
    io(&u, &["write -P 0x11 0 1M"]);
    enable(&mut c, "mt", 3600).await;
    io(&u, &["write -P 0x22 8M 400M"]);

    let mut bg = c.clone();
    let sync = tokio::spawn(async move {
        bg.replication
            .sync_group(pb::SyncGroupRequest { group: "mt".into(), project: "tests".into(), ..Default::default() })
            .await
    });
    let vol_dir = cluster.path().join("pool-agent-backend-b/volumes").join(&id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let partial = std::fs::read_dir(&vol_dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
        if partial {
            break;
        }
        assert!(!sync.is_finished(), "the sync finished before the test could interrupt it");
        assert!(Instant::now() < deadline, "no transfer started within 60 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.agents[1].proc.kill();
    assert!(sync.await.unwrap().is_err(), "a sync whose target died cannot succeed");

    // The previous point, read offline with qemu-io straight from the replica files.
    let top = replica_top(&cluster.agent_dir(1), &id);
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 8M 1M"])
        .arg(&top)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("failed"), "previous point damaged: {text}");

    cluster.restart_agent(1, "qemu");
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        match c
            .replication
            .sync_group(pb::SyncGroupRequest { group: "mt".into(), project: "tests".into(), ..Default::default() })
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(e) if Instant::now() < deadline => {
                println!("retrying sync after the restart: {}", e.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the next sync did not complete: {}", e.message()),
        }
    };
    assert!(done.bytes >= (400 * MIB) as i64, "the interrupted data must travel again ({} bytes)", done.bytes);
    assert_all_succeeded(&failover(&mut c, "mt", "backend-b", false).await.unwrap());
    let u = uri(&mut c, &vols[0]).await;
    io(&u, &["read -P 0x11 0 1M", "read -P 0x22 8M 400M"]);
    cluster.assert_no_op_ran_twice();
}

/// A planned move whose target agent is SIGKILLed in the middle of the final sync waits
/// for it: the execution shows the failure as a transient error and tries again, and once
/// the agent is back the move completes with every byte at site B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_move_waits_for_a_target_that_restarts_mid_final_sync() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "fw", 1, 512 * MIB).await;
    let id = volume_id(&mut c, &vols[0]).await;
    let u = uri(&mut c, &vols[0]).await;
    io(&u, &["write -P 0x11 0 1M"]);
    enable(&mut c, "fw", 3600).await;
    // Travels with the final sync, long enough to be cut off.
    io(&u, &["write -P 0x22 8M 400M"]);
    let asked = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            no_wait: true,
            group: "fw".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            force: false,
            discard_changes_on: String::new(),
        })
        .await
        .expect("planned failover accepted")
        .into_inner();
    let vol_dir = cluster.path().join("pool-agent-backend-b/volumes").join(&id);
    wait_until("the final sync's transfer starts", || {
        std::fs::read_dir(&vol_dir).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.agents[1].proc.kill();
    let get = pb::GetExecutionRequest { id: asked.execution_id.clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let e = c.executions.get_execution(get.clone()).await.unwrap().into_inner();
        assert_eq!(e.status, "running", "the move must wait for its target, not end: {}", e.error);
        if e.error.contains("trying again") {
            break e;
        }
        assert!(Instant::now() < deadline, "no retry shown within 30 s: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("while the target is away: {}", waiting.error);
    assert!(waiting.error.contains("backend-b"), "the error names the side that is away: {}", waiting.error);
    let g = c.groups.get_group(pb::GetGroupRequest { group: "fw".into(), project: "tests".into() }).await.unwrap();
    assert_eq!(g.get_ref().active_backend, "backend-a", "nothing moved while the final sync fails");
    cluster.restart_agent(1, "qemu");
    let deadline = Instant::now() + Duration::from_secs(120);
    let ended = loop {
        let e = c.executions.get_execution(get.clone()).await.unwrap().into_inner();
        if e.status != "running" {
            break e;
        }
        assert!(Instant::now() < deadline, "the move did not end within 120 s of the restart: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: "fw".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.active_backend.as_str(), g.replication_status.as_str()), ("backend-b", "failed-over"), "{g:?}");
    let u = uri(&mut c, &vols[0]).await;
    assert!(u.contains("agent-backend-b"), "served at site B now: {u}");
    io(&u, &["read -P 0x11 0 1M", "read -P 0x22 8M 400M", "read -P 0 408M 104M"]);
    cluster.assert_no_op_ran_twice();
}

/// (e) A qcow2 image created with qemu-img in the pool is listed as manageable, managing
/// it works, and unmanaging hands it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manageable_volumes_are_listed_managed_and_unmanaged() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let pool = cluster.path().join("pool-agent-backend-a");
    let legacy = pool.join("legacy.qcow2");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["qemu-img", "create", "-q", "-f", "qcow2", legacy.to_str().unwrap(), "32M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", legacy.to_str().unwrap()]);
    let child = pool.join("child.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        legacy.to_str().unwrap(),
        "-F",
        "qcow2",
        child.to_str().unwrap(),
    ]);

    let list = c
        .volumes
        .list_manageable_volumes(pb::ListManageableVolumesRequest { backend: "backend-a".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let by: HashMap<_, _> = list.volumes.iter().map(|m| (m.reference.as_str(), m)).collect();
    // Taking legacy over would move it from under child, which reads through it.
    let l = by.get("legacy").expect("legacy listed");
    assert!(!l.safe_to_manage && l.reason_not_safe.contains("backing file of child"), "{l:?}");
    assert_eq!(l.size_bytes, (32 * MIB) as i64);
    let ch = by.get("child").expect("child listed");
    assert!(!ch.safe_to_manage && ch.reason_not_safe.contains("backing"), "{ch:?}");
    assert_eq!(ch.backing_file, legacy.to_str().unwrap());
    // legacy is listed as a layer of child.
    let snaps = c
        .volumes
        .list_manageable_snapshots(pb::ListManageableVolumesRequest {
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let layer = snaps.snapshots.iter().find(|s| s.volume_reference == "child").expect("child's backing layer");
    assert_eq!((layer.reference.as_str(), layer.kind.as_str()), ("legacy", "backing-file"));

    let err = c
        .volumes
        .manage_volume(pb::ManageVolumeRequest {
            backend: "backend-a".into(),
            reference: "child".into(),
            name: "c".into(),
            project: "tests".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
    // With child gone, legacy stands alone.
    std::fs::remove_file(&child).unwrap();

    let v = c
        .volumes
        .manage_volume(pb::ManageVolumeRequest {
            backend: "backend-a".into(),
            reference: "legacy".into(),
            name: "legacy".into(),
            project: "tests".into(),
            ..Default::default()
        })
        .await
        .expect("manage")
        .into_inner();
    assert_eq!((v.status.as_str(), v.size_bytes), ("available", (32 * MIB) as i64));
    let u = uri(&mut c, "legacy").await;
    io(&u, &["read -P 0x5a 0 1M", "read -P 0 1M 31M", "write -P 0x5b 2M 1M"]);

    let r = c
        .volumes
        .unmanage_volume(pb::UnmanageVolumeRequest { volume: "legacy".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    let back = pool.join(format!("{}.qcow2", r.reference));
    run(&[
        "qemu-io",
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0x5b 2M 1M",
        back.to_str().unwrap(),
    ]);
    assert!(
        c.volumes.get_volume(pb::GetVolumeRequest { volume: "legacy".into(), project: "tests".into() }).await.is_err()
    );
}

/// Unmanaging volumes while their agent (and its qemu-storage-daemon with it) is SIGKILLed
/// at random moments of the call: each unmanage ends by itself or on the retry its error
/// asks for, the image handed back holds the volume's data, the volume is gone from
/// Drover and from the agent, and the agent's op log shows no op_id ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmanage_cut_by_agent_kills_completes_on_retry() {
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let pool = cluster.path().join("pool-agent-backend-a");
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut retried, mut entered) = (0, 0);
    // Round 0 is not cut: it measures how long the call takes. The kills of the odd
    // rounds land at random moments within that (and a little after); those of the even
    // rounds 0-4 ms after the agent let its driver start (its op log line), since the
    // driver's part is a few milliseconds of the call.
    let mut call_ms = 0;
    for round in 0..8u8 {
        let name = format!("u{round}");
        let v = c
            .volumes
            .create_volume(pb::CreateVolumeRequest {
                name: name.clone(),
                project: "tests".into(),
                size_bytes: (64 * MIB) as i64,
                backend: "backend-a".into(),
                ..Default::default()
            })
            .await
            .expect("create volume")
            .into_inner();
        let fill = format!("write -P {} 0 8M", 0x30 + round);
        io(&uri(&mut c, &name).await, &[&fill, "write -P 0x7e 32M 1M"]);
        let req = pb::UnmanageVolumeRequest { volume: name.clone(), project: "tests".into() };
        let (delay, mut answer) = if round == 0 {
            let t = Instant::now();
            let answer = c.volumes.unmanage_volume(req).await;
            call_ms = t.elapsed().as_millis() as u64;
            (None, answer)
        } else {
            let log = cluster.op_logs()[0].1.clone();
            let started = |log: &Path| {
                let ops = drover_agent::oplog::read(log).unwrap();
                ops.iter().any(|o| o.op == "unmanage_volume" && o.target == v.id)
            };
            let mut c2 = c.clone();
            let t = Instant::now();
            let first = tokio::spawn(async move { c2.volumes.unmanage_volume(req).await });
            if round % 2 == 1 {
                tokio::time::sleep(Duration::from_millis(rng.u64(0..call_ms + 10))).await;
            } else {
                while !started(&log) && t.elapsed() < Duration::from_secs(10) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(0..5))).await;
            }
            let delay = t.elapsed().as_millis();
            cluster.agents[0].proc.kill();
            // Whether the agent had let its driver start the unmanage when it died.
            entered += started(&log) as usize;
            cluster.restart_agent(0, "qemu");
            wait_backend_up(&mut c, "backend-a").await;
            (Some(delay), first.await.unwrap())
        };
        let mut attempts = 1;
        while let Err(e) = &answer {
            // A failure says to retry (the volume is left in error, not lost).
            assert!(e.message().contains("retry"), "round {round}: {:?}", e);
            assert!(attempts < 10, "round {round}: still failing after {attempts} attempts: {e:?}");
            retried += 1;
            attempts += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            answer = c
                .volumes
                .unmanage_volume(pb::UnmanageVolumeRequest { volume: name.clone(), project: "tests".into() })
                .await;
        }
        let reference = answer.unwrap().into_inner().reference;
        match delay {
            None => println!("round 0: unmanaged in {call_ms} ms, not cut"),
            Some(d) => println!("round {round}: SIGKILL {d} ms into the unmanage; done after {attempts} attempt(s)"),
        }
        assert_eq!(reference, v.id, "the image is handed back under the volume's id");
        let back = pool.join(format!("{reference}.qcow2"));
        let read_p = format!("read -P {} 0 8M", 0x30 + round);
        let out = std::process::Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c", &read_p, "-c", "read -P 0x7e 32M 1M", "-c", "read -P 0 33M 31M"])
            .arg(&back)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !said.contains("Pattern verification failed"), "round {round}: {said}");
        let gone = c.volumes.get_volume(pb::GetVolumeRequest { volume: name.clone(), project: "tests".into() }).await;
        assert_eq!(gone.unwrap_err().code(), tonic::Code::NotFound, "round {round}: Drover forgot the volume");
        let listed = c
            .volumes
            .list_manageable_volumes(pb::ListManageableVolumesRequest {
                backend: "backend-a".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let found = listed.volumes.iter().find(|m| m.reference == reference);
        assert!(found.is_some_and(|m| m.safe_to_manage), "round {round}: the image is manageable again: {found:?}");
    }
    // An unmanage the kill cut inside the driver is refused as interrupted after the
    // restart and run again under a new op_id: two lines for one volume.
    let ops = drover_agent::oplog::read(&cluster.op_logs()[0].1).unwrap();
    let unmanages: Vec<&str> = ops.iter().filter(|o| o.op == "unmanage_volume").map(|o| o.target.as_str()).collect();
    let rerun = unmanages.len() - unmanages.iter().collect::<std::collections::BTreeSet<_>>().len();
    // Cut after the image was moved out and before the agent's state said so: the rerun
    // only forgets the volume.
    let moved_out = cluster.agents[0].proc.log_text().matches("the image was moved out before a restart").count();
    println!(
        "seed {seed}: 7 unmanages cut by SIGKILLs ({entered} after the agent let its driver start, {rerun} run \
         again under a new op_id, {moved_out} of those after the image was moved out), {retried} retries asked for"
    );
    cluster.assert_no_op_ran_twice();
}

/// If qemu-storage-daemon dies, the agent starts it again and its exports come back; the
/// agent's restart counter says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarts_a_dead_daemon() {
    use drover_tests::scrape::{metrics_addr, scrape, value};
    let metrics = ["--set", "metrics_listen=127.0.0.1:0"];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "qemu", &metrics, &[]).await;
    let at = metrics_addr(&cluster.agents[0].proc.log);
    assert_eq!(value(&scrape(&at), "drover_agent_backend_restarts_total"), Some(0.0));
    let mut c = cluster.clients().await;
    c.volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "d".into(),
            project: "tests".into(),
            size_bytes: (16 * MIB) as i64,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let u = uri(&mut c, "d").await;
    io(&u, &["write -P 0x66 0 1M"]);
    let pidfile = cluster.agent_dir(0).join("qemu/qsd.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let new_pid = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().to_string();
        if !new_pid.is_empty() && new_pid != pid && qemu_io(&u, &["read -P 0x66 0 1M".to_string()]).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the export did not come back within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&scrape(&at), "drover_agent_backend_restarts_total"), Some(1.0), "one restart counted");
}

/// With `--nbd-tcp`, exports are served on TCP and attach URIs say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_nbd_exports_attach() {
    use drover_proto::agent::v1 as apb;
    use drover_tests::cluster::{AgentSpec, locate_drover, start_agent};
    let dir = tempfile::tempdir().unwrap();
    let port = drover_tests::free_port();
    let spec = AgentSpec {
        name: "tcp",
        driver: "qemu",
        site: "site-a",
        backend: "backend-a",
        orchestrator: "",
        extra: vec!["--set".into(), format!("qemu.nbd_tcp=127.0.0.1:{port}")],
    };
    let agent = start_agent(&locate_drover().unwrap(), dir.path(), spec).unwrap();
    let mut c = drover_tests::cluster::agent_client(&agent.endpoint, dir.path()).await;
    let ctx = |op: &str| Some(apb::OpContext { op_id: op.into(), epoch: 1, fence_scope: "volume/t".into() });
    c.create_volume(apb::CreateVolumeRequest {
        ctx: ctx("c"),
        volume_id: "t".into(),
        size_bytes: (8 * MIB) as i64,
        ..Default::default()
    })
    .await
    .unwrap();
    let conn =
        c.attach_volume(apb::AttachVolumeRequest { ctx: ctx("a"), volume_id: "t".into() }).await.unwrap().into_inner();
    assert_eq!(conn.uri, format!("nbd://127.0.0.1:{port}/t"));
    io(&conn.uri, &["write -P 0x3c 1M 1M", "read -P 0x3c 1M 1M", "read -P 0 0 1M"]);
}

/// After a disaster failover the old primary may hold writes the new one never got.
/// Failing back needs the operator's recorded consent to discard them; then site A holds
/// exactly site B's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_after_disaster_discards_divergent_writes_only_with_consent() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "sb", 1, 16 * MIB).await;
    enable(&mut c, "sb", 3600).await;
    let at_a = uri(&mut c, &vols[0]).await;
    io(&at_a, &["write -P 0x11 0 1M"]);

    // Fenced on return, the good case: the primary's agent restarts while nothing moved;
    // it holds writes until the orchestrator confirms it, then serves them again.
    cluster.agents[0].proc.kill();
    cluster.restart_agent(0, "qemu");
    wait_until("site A serves writes again after its restart", || {
        qemu_io(&at_a, &["write -P 0x11 0 1M".to_string()]).is_ok()
    })
    .await;

    c.replication
        .sync_group(pb::SyncGroupRequest { group: "sb".into(), project: "tests".into(), ..Default::default() })
        .await
        .expect("sync");
    io(&at_a, &["write -P 0x12 2M 1M"]); // never reaches site B
    cluster.agents[0].proc.kill();
    assert_all_succeeded(&failover(&mut c, "sb", "backend-b", true).await.expect("disaster failover"));
    let u = uri(&mut c, &vols[0]).await;
    io(&u, &["read -P 0x11 0 1M", "read -P 0 2M 1M", "write -P 0x13 4M 1M"]);

    // Fenced on return, the bad case: the old primary comes back after the group moved.
    // It is demoted (the history says so) and its old export takes no write.
    cluster.restart_agent(0, "qemu");
    wait_backend_up(&mut c, "backend-a").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let fenced = loop {
        let g = c
            .groups
            .get_group(pb::GetGroupRequest { group: "sb".into(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        if let Some(e) = g.history.iter().find(|e| e.action == "fenced-on-return") {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "the returning old primary was not fenced: {:?}", g.history);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(fenced.detail.contains("--discard-changes-on backend-a"), "{}", fenced.detail);
    let refused = qemu_io(&at_a, &["write -P 0x14 6M 1M".to_string()]);
    assert!(refused.is_err(), "the returning old primary accepted a write: {refused:?}");

    let refused = failover(&mut c, "sb", "default", false).await.expect_err("failback without consent");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains("--discard-changes-on backend-a"), "{}", refused.message());

    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            no_wait: false,
            group: "sb".into(),
            project: "tests".into(),
            target_backend: "default".into(),
            force: false,
            discard_changes_on: "backend-a".into(),
        })
        .await
        .expect("failback with consent")
        .into_inner();
    assert_all_succeeded(&r);
    let g = r.group.unwrap();
    assert_eq!((g.active_backend.as_str(), g.divergence_point.as_str()), ("backend-a", ""));
    let event = g.history.last().unwrap();
    assert!(event.detail.contains("operator chose to discard the changes on backend-a"), "{}", event.detail);
    let u = uri(&mut c, &vols[0]).await;
    assert!(u.contains("agent-backend-a"), "{u}");
    io(&u, &["read -P 0x11 0 1M", "read -P 0 2M 1M", "read -P 0x13 4M 1M"]);
    cluster.assert_no_op_ran_twice();
}

/// A daemon that stops answering (SIGSTOP) is killed and restarted once a QMP call
/// passes its deadline, and the agent serves again: the backend is up and the data reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarts_a_hung_daemon() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &["--set", "qemu.qmp_timeout=2s"]).await;
    let mut c = cluster.clients().await;
    c.volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "h".into(),
            project: "tests".into(),
            size_bytes: (16 * MIB) as i64,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let u = uri(&mut c, "h").await;
    io(&u, &["write -P 0x5a 0 1M"]);
    let pidfile = cluster.agent_dir(0).join("qemu/qsd.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let stopped = Instant::now();
    // Any call that needs QMP notices: a probe, here through `backend show`.
    let deadline = stopped + Duration::from_secs(2) + Duration::from_secs(15);
    loop {
        let b = c.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
        let new_pid = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().to_string();
        if b.status == "up"
            && !new_pid.is_empty()
            && new_pid != pid
            && qemu_io(&u, &["read -P 0x5a 0 1M".to_string()]).is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the hung daemon was not replaced within its deadline plus 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("hung daemon replaced and serving again {:?} after SIGSTOP", stopped.elapsed());
    let log = cluster.agents[0].proc.log_text();
    assert!(log.contains("qemu-storage-daemon is hung"), "the agent said why it restarted the daemon");
}

fn layer_files(cluster: &Cluster, volume_id: &str) -> usize {
    let dir = cluster.path().join("pool-agent-backend-a").join("volumes").join(volume_id);
    std::fs::read_dir(&dir)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2")).count())
        .unwrap_or(0)
}

/// While the peer is down for two minutes, a group syncing every second keeps a bounded
/// chain (the base, at most two waiting points, the active layer); when the peer is back,
/// one sync catches up and the chain folds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_stay_bounded_while_the_peer_is_down() {
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let names = group(&mut c, "bounded", 1, 16 * MIB).await;
    assert_all_succeeded(&enable(&mut c, "bounded", 1).await);
    let volume = c
        .volumes
        .get_volume(pb::GetVolumeRequest { volume: names[0].clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner()
        .id;
    let u = uri(&mut c, &names[0]).await;
    cluster.agents[1].proc.kill();
    let mut most = 0;
    let down = Instant::now();
    let mut i = 0u64;
    while down.elapsed() < Duration::from_secs(120) {
        io(&u, &[&format!("write -P {:#x} {}M 64k", 0x10 + i % 64, i % 16)]);
        tokio::time::sleep(Duration::from_millis(900)).await;
        most = most.max(layer_files(&cluster, &volume));
        i += 1;
    }
    assert!(most <= 4, "the chain grew to {most} layers while the peer was down");
    // The group's replication info says points are waiting for the peer.
    let info = c
        .replication
        .get_replication_info(pb::GetReplicationInfoRequest {
            group: "bounded".into(),
            project: "tests".into(),
            predict: false,
        })
        .await
        .unwrap()
        .into_inner();
    let said = &info.volumes[0].error;
    assert!(said.contains("recovery points wait for the peer"), "{said}");
    cluster.restart_agent(1, "qemu");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let synced = c
            .replication
            .sync_group(pb::SyncGroupRequest { group: "bounded".into(), project: "tests".into(), ..Default::default() })
            .await;
        if synced.is_ok() && layer_files(&cluster, &volume) <= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "replication did not catch up: {synced:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("at most {most} layers while the peer was down");
    cluster.assert_no_op_ran_twice();
}

/// A replica agent that comes back at another address (a new host, a changed
/// `advertise`) is found by the primary's periodic syncs, through the heartbeat's answer,
/// with no orchestrated sync: a write made after the move reaches site B by them alone,
/// and a disaster failover reads it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_syncs_follow_a_peer_that_comes_back_elsewhere() {
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let names = group(&mut c, "moved", 1, 8 * MIB).await;
    assert_all_succeeded(&enable(&mut c, "moved", 1).await);
    let u = uri(&mut c, &names[0]).await;
    io(&u, &["write -P 0xa1 0 64k"]);
    let before = cluster.agents[1].addr().to_string();
    cluster.agents[1].proc.kill();
    cluster.restart_agent_elsewhere(1, "qemu");
    let after = cluster.agents[1].addr().to_string();
    assert_ne!(before, after, "the agent must come back on another port for this test");
    wait_backend_up(&mut c, "backend-b").await;
    io(&u, &["write -P 0xb2 1M 64k"]);
    let written = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // The newest point complete at B is younger than the write: a periodic sync reached
    // B at its new address. The stored address is the old one, so only the heartbeat's
    // answer can have told A.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let info = c
            .replication
            .get_replication_info(pb::GetReplicationInfoRequest {
                group: "moved".into(),
                project: "tests".into(),
                predict: false,
            })
            .await
            .unwrap()
            .into_inner();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        if info.rpo_ms >= 0 && now - info.rpo_ms > written {
            eprintln!("B holds a point {} ms younger than the write", now - info.rpo_ms - written);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no periodic sync reached backend-b at {after} (it was at {before}): rpo {} ms, {:?}",
            info.rpo_ms,
            info.volumes.iter().map(|v| &v.error).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.agents[0].proc.kill();
    assert_all_succeeded(&failover(&mut c, "moved", "backend-b", true).await.expect("disaster failover"));
    let at_b = uri(&mut c, &names[0]).await;
    io(&at_b, &["read -P 0xa1 0 64k", "read -P 0xb2 1M 64k"]);
    cluster.assert_no_op_ran_twice();
}

/// A killed agent takes its qemu-storage-daemon with it, also when the daemon is
/// restarting at that moment; and a stopped cluster leaves no daemon behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_outlives_its_agent() {
    use drover_tests::cluster::daemons_under;
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let a = cluster.agent_dir(0);
    assert_eq!(daemons_under(&a).len(), 1, "agent A runs one daemon");
    // Kill the daemon, so the agent is restarting it, and kill the agent right away.
    let pid = std::fs::read_to_string(a.join("qemu/qsd.pid")).unwrap().trim().to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    cluster.agents[0].proc.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemons_under(&a), Vec::<String>::new(), "a daemon outlived its agent");
    let dir = cluster.path().to_path_buf();
    drop(cluster);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemons_under(&dir), Vec::<String>::new(), "a daemon outlived the cluster");
}

/// A target never waits on its source while holding the group lock: with a source that
/// opened a recovery point stream and then stalls, a forced promote of the replica goes
/// through (it stops the apply instead of waiting for it), and the stalled point is
/// discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_source_does_not_block_a_promote() {
    use drover_proto::agent::v1 as apb;
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let (g, volume, base) = one_replicated(&mut c, &cluster, "stall").await;
    let mut agent_b = drover_tests::cluster::agent_client(&cluster.agents[1].endpoint, cluster.dir.path()).await;
    // A source that sends the header and one chunk, then nothing.
    let (tx, stream) = raw_source(&cluster, &g, &volume, &base, "stalled-point").await;
    // Wait until the target has taken the chunk in (it is applying).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!stream.is_finished(), "the stalled stream is still open");

    let promoted = tokio::time::timeout(
        Duration::from_secs(20),
        agent_b.promote_volume(apb::PromoteVolumeRequest {
            ctx: Some(apb::OpContext {
                op_id: "promote-during-stall".into(),
                epoch: g.epoch,
                fence_scope: format!("volume/{volume}"),
            }),
            volume_id: volume.clone(),
            force: true,
        }),
    )
    .await
    .expect("the promote waited on the stalled source");
    promoted.expect("forced promote");
    // The promote stopped the apply; the stalled source learns that its point landed nowhere.
    let refused = tokio::time::timeout(Duration::from_secs(20), stream)
        .await
        .expect("the apply ended with the promote")
        .unwrap()
        .expect_err("the stalled point lands nowhere");
    drop(tx);
    assert!(refused.message().contains("changed while recovery point stalled-point arrived"), "{}", refused.message());
    let info = agent_b
        .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume, estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.role, apb::ReplicationRole::Primary as i32);
}

/// Enabling replication again copies everything written before it, also when points
/// were left waiting for a peer that was down (the soak found an initial copy that sent
/// an old waiting point again, without the newest writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_enabling_copies_every_write_even_with_points_waiting() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "reen", 1, 16 * MIB).await;
    assert_all_succeeded(&enable(&mut c, "reen", 3600).await);
    let u = uri(&mut c, &vols[0]).await;
    cluster.agents[1].proc.kill();
    for _ in 0..2 {
        // Each failed sync leaves a frozen point waiting for the peer.
        let r = c
            .replication
            .sync_group(pb::SyncGroupRequest { group: "reen".into(), project: "tests".into(), ..Default::default() })
            .await;
        assert!(r.is_err(), "a sync to a dead peer fails");
    }
    io(&u, &["write -P 0x41 0 1M"]);
    cluster.restart_agent(1, "qemu");
    wait_backend_up(&mut c, "backend-b").await;
    let disabled = c
        .replication
        .disable_replication(pb::DisableReplicationRequest {
            group: "reen".into(),
            project: "tests".into(),
            no_wait: false,
        })
        .await
        .expect("disable")
        .into_inner();
    assert_eq!(disabled.group.unwrap().replication_status, "disabled");
    assert_all_succeeded(&enable(&mut c, "reen", 3600).await);
    cluster.agents[0].proc.kill();
    assert_all_succeeded(&failover(&mut c, "reen", "backend-b", true).await.expect("disaster failover"));
    let at_b = uri(&mut c, &vols[0]).await;
    assert!(at_b.contains("agent-backend-b"), "{at_b}");
    io(&at_b, &["read -P 0x41 0 1M"]);
    cluster.assert_no_op_ran_twice();
}

/// The daemon killed again and again while a group syncs every second: each restart
/// rebuilds the chains under the group's lock, so no sync interleaves with it and no node
/// of the wrong shape survives (the soak once saw `'v0l0' is not in this backing file
/// chain` and then a chain that grew without end). Afterwards a sync and a planned
/// failover succeed and every write reads back at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_kills_during_syncs_leave_sound_chains() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "dk", 2, 16 * MIB).await;
    assert_all_succeeded(&enable(&mut c, "dk", 1).await);
    let pidfile = cluster.agent_dir(0).join("qemu/qsd.pid");
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..15u64 {
        // Writes go on while the daemon comes back; a write may fail while it is away.
        for v in &vols {
            let u = uri(&mut c, v).await;
            let cmd = format!("write -P {:#x} {}M 64k", 0x20 + round, round);
            let deadline = Instant::now() + Duration::from_secs(30);
            while qemu_io(&u, std::slice::from_ref(&cmd)).is_err() {
                assert!(Instant::now() < deadline, "no writes for 30 s after round {round}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().to_string();
        let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .replication
            .sync_group(pb::SyncGroupRequest { group: "dk".into(), project: "tests".into(), ..Default::default() })
            .await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "syncs keep failing after the kills: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        layer_files(
            &cluster,
            &c.volumes
                .get_volume(pb::GetVolumeRequest { volume: vols[0].clone(), project: "tests".into() })
                .await
                .unwrap()
                .into_inner()
                .id
        ) <= 4
    );
    assert_all_succeeded(&failover(&mut c, "dk", "backend-b", false).await.expect("planned failover"));
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-b"), "{u}");
        let reads: Vec<String> = (0..15u64).map(|r| format!("read -P {:#x} {}M 64k", 0x20 + r, r)).collect();
        qemu_io(&u, &reads).unwrap_or_else(|e| panic!("volume {i} at B: {e}"));
    }
}

fn runbook_request(name: &str, params: &[(&str, &str)]) -> pb::RunbookRequest {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks").join(name);
    pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

async fn run_to_end(c: &mut Clients, req: pb::RunbookRequest) -> pb::Execution {
    let e = c.runbooks.run_runbook(req).await.expect("run runbook").into_inner();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.status != "running" {
            return now;
        }
        assert!(Instant::now() < deadline, "runbook {} still at {}", e.id, now.step);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The site runbooks on real data: a 3-volume qemu group moves to site B with the
/// planned runbook (every byte verified there), comes back with the failback runbook
/// (no prompt: nothing diverged), and after site A is SIGKILLed the disaster runbook
/// lands every volume on the same recovery point: the writes of the last sync, none
/// of those after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_runbooks_move_real_data() {
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "rbq", 3, 16 * MIB).await;
    for (i, v) in vols.iter().enumerate() {
        io(&uri(&mut c, v).await, &[&format!("write -P {:#x} 0 1M", 0x10 + i)]);
    }
    assert_all_succeeded(&enable(&mut c, "rbq", 3600).await);
    for (i, v) in vols.iter().enumerate() {
        io(&uri(&mut c, v).await, &[&format!("write -P {:#x} 2M 1M", 0x20 + i)]);
    }
    let e = run_to_end(&mut c, runbook_request("site-failover-planned.yaml", &[("site", "site-a")])).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-b"), "{u}");
        io(&u, &[&format!("read -P {:#x} 0 1M", 0x10 + i), &format!("read -P {:#x} 2M 1M", 0x20 + i)]);
        io(&u, &[&format!("write -P {:#x} 4M 1M", 0x30 + i)]);
    }
    let e = run_to_end(&mut c, runbook_request("site-failback.yaml", &[("site", "site-a")])).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-a"), "{u}");
        io(&u, &[&format!("read -P {:#x} 4M 1M", 0x30 + i)]);
        io(&u, &[&format!("write -P {:#x} 6M 1M", 0x40 + i)]);
    }
    c.replication
        .sync_group(pb::SyncGroupRequest { group: "rbq".into(), project: "tests".into(), ..Default::default() })
        .await
        .expect("sync");
    for (i, v) in vols.iter().enumerate() {
        io(&uri(&mut c, v).await, &[&format!("write -P {:#x} 8M 1M", 0x50 + i)]); // never shipped
    }
    cluster.agents[0].proc.kill();
    let e = run_to_end(&mut c, runbook_request("site-failover-disaster.yaml", &[("site", "site-a")])).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    for (i, v) in vols.iter().enumerate() {
        let u = uri(&mut c, v).await;
        assert!(u.contains("agent-backend-b"), "{u}");
        io(&u, &[&format!("read -P {:#x} 6M 1M", 0x40 + i), "read -P 0 8M 1M"]);
    }
    let r = c
        .executions
        .get_execution_report(pb::GetExecutionReportRequest { id: e.id.clone(), format: "json".into() })
        .await
        .unwrap()
        .into_inner();
    let r: serde_json::Value = serde_json::from_str(&r.text).unwrap();
    let g = &r["groups"][0];
    assert_eq!(g["outcome"], "succeeded", "{r}");
    assert!(g["rpo_ms"].as_i64().unwrap() >= 0, "the achieved RPO is known: {g}");
    cluster.assert_no_op_ran_twice();
}

/// Test failover while a writer keeps writing at site A: each clone at site B holds
/// exactly the point it was cloned from (compared byte for byte with that replica
/// layer), replication goes on (B's point advances while the clones exist), and once the
/// run is approved no clone and no extra layer is left in either pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_failover_clones_a_point_while_replication_goes_on() {
    use drover_proto::agent::v1 as apb;
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "tf", 2, 16 * MIB).await;
    for v in &vols {
        io(&uri(&mut c, v).await, &["write -P 0x61 0 1M"]);
    }
    assert_all_succeeded(&enable(&mut c, "tf", 1).await);
    let ids = c
        .groups
        .get_group(pb::GetGroupRequest { group: "tf".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner()
        .volume_ids;
    let uris: Vec<String> = {
        let mut u = Vec::new();
        for v in &vols {
            u.push(uri(&mut c, v).await);
        }
        u
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, uris) = (stop.clone(), uris.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let cmd = format!("write -P {} {} 64k", i % 250 + 1, 4 * MIB + (i % 64) * CLUSTER);
                let _ = qemu_io(&uris[(i % 2) as usize], &[cmd]);
                i += 1;
            }
        })
    };
    let script = cluster.path().join("check.sh");
    let seen = cluster.path().join("clones.json");
    std::fs::write(&script, format!("#!/bin/sh\nprintf '%s' \"$DROVER_TEST_CLONES\" > {}\n", seen.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let e = c
        .runbooks
        .run_runbook(runbook_request("test-failover.yaml", &[("site", "site-a"), ("check", script.to_str().unwrap())]))
        .await
        .expect("run test failover")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.step == "prompt:tested" {
            break;
        }
        assert!(Instant::now() < deadline && now.status == "running", "never reached the prompt: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let clones: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&seen).unwrap()).unwrap();
    assert_eq!(clones.len(), 2, "one clone per volume: {clones:?}");
    let pool_b = cluster.path().join("pool-agent-backend-b");
    for clone in &clones {
        let (u, id) = (clone["uri"].as_str().unwrap(), clone["clone_id"].as_str().unwrap());
        io(u, &["read -P 0x61 0 1M"]);
        // The layer the clone sits on is the point it holds: byte for byte the same.
        let file = pool_b.join("clones").join(format!("{id}.qcow2"));
        let info =
            std::process::Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(&file).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let point = info["full-backing-filename"].as_str().or(info["backing-filename"].as_str()).unwrap().to_string();
        let same = std::process::Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "qcow2", u, &point])
            .output()
            .unwrap();
        assert!(same.status.success(), "clone {id} differs from its point: {}", String::from_utf8_lossy(&same.stdout));
        io(u, &["write -P 0x7e 0 64k", "read -P 0x7e 0 64k"]); // writable, and its own
    }
    // Replication goes on: the replica at B takes new points while the clones exist.
    let mut b = drover_tests::cluster::agent_client(&cluster.agents[1].endpoint, cluster.dir.path()).await;
    let point = |info: apb::ReplicationInfo| info.recovery_point_id;
    let first = point(
        b.get_replication_info(apb::GetReplicationInfoRequest { volume_id: ids[0].clone(), estimate_pending: false })
            .await
            .unwrap()
            .into_inner(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = point(
            b.get_replication_info(apb::GetReplicationInfoRequest {
                volume_id: ids[0].clone(),
                estimate_pending: false,
            })
            .await
            .unwrap()
            .into_inner(),
        );
        if now != first {
            break;
        }
        assert!(Instant::now() < deadline, "no new point at B while the clones exist");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.executions
        .decide_prompt(pb::DecidePromptRequest {
            id: e.id.clone(),
            approve: true,
            by: "tester".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.status != "running" {
            break now;
        }
        assert!(Instant::now() < deadline, "cleanup did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done.status, "succeeded", "{}", done.error);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    for pool in ["pool-agent-backend-a", "pool-agent-backend-b"] {
        let left = std::fs::read_dir(cluster.path().join(pool).join("clones")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "clones left in {pool}");
    }
    // Once a point arrives after the clones went, the replica chain is short again.
    c.replication
        .sync_group(pb::SyncGroupRequest { group: "tf".into(), project: "tests".into(), ..Default::default() })
        .await
        .expect("sync");
    for id in &ids {
        let dir = pool_b.join("volumes").join(id);
        let layers = std::fs::read_dir(&dir).unwrap().count();
        assert!(layers <= 2, "{layers} files left in {}", dir.display());
    }
}

/// A source that goes away in the middle of a point (its stream dropped) leaves nothing
/// open at the target: the next sync applies normally. (The soak once saw every later
/// sync fail on "Failed to get \"write\" lock" of the dropped apply's partial image.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_vanishes_mid_point_leaves_the_target_usable() {
    use drover_proto::agent::v1 as apb;
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let (g, volume, base) = one_replicated(&mut c, &cluster, "gone").await;
    let vol_name = "gone-0";
    let mut b = drover_tests::cluster::agent_client(&cluster.agents[1].endpoint, cluster.dir.path()).await;
    for round in 0..3 {
        let (tx, stream) = raw_source(&cluster, &g, &volume, &base, &format!("vanishing-{round}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The source vanishes: its call is dropped, the stream reset.
        stream.abort();
        drop(tx);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    io(&uri(&mut c, vol_name).await, &["write -P 0x66 0 1M"]);
    c.replication
        .sync_group(pb::SyncGroupRequest { group: "gone".into(), project: "tests".into(), ..Default::default() })
        .await
        .expect("a sync after the vanished sources");
    let now = b
        .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume.clone(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner()
        .recovery_point_id;
    assert_ne!(now, base, "the new point was applied");
    assert!(!now.starts_with("vanishing"), "no vanished point landed: {now}");
}

/// A one-volume group `name` replicating to site B (points only on demand): the group,
/// its volume id, and the point B holds.
async fn one_replicated(c: &mut Clients, cluster: &Cluster, name: &str) -> (pb::Group, String, String) {
    use drover_proto::agent::v1 as apb;
    group(c, name, 1, 16 * MIB).await;
    assert_all_succeeded(&enable(c, name, 3600).await);
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: name.into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    let volume = g.volume_ids[0].clone();
    let mut b = drover_tests::cluster::agent_client(&cluster.agents[1].endpoint, cluster.dir.path()).await;
    let base = b
        .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume.clone(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner()
        .recovery_point_id;
    assert!(!base.is_empty(), "the initial sync left a point at site B");
    (g, volume, base)
}

type Ack = Result<tonic::Response<drover_proto::agent::v1::ApplyAck>, tonic::Status>;

/// A hand-made source: opens a recovery point stream to site B for `point` (a delta on
/// `base`), sends the header and one 64 KiB chunk, and returns the sender (to send more,
/// or drop) and the call.
async fn raw_source(
    cluster: &Cluster,
    g: &pb::Group,
    volume: &str,
    base: &str,
    point: &str,
) -> (tokio::sync::mpsc::Sender<drover_proto::agent::v1::ReplicaMessage>, tokio::task::JoinHandle<Ack>) {
    use drover_proto::agent::v1 as apb;
    use drover_proto::agent::v1::replica_message::Kind;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let begin = apb::ApplyBegin {
        group_id: g.id.clone(),
        recovery_point_id: point.into(),
        base_recovery_point_id: base.into(),
        volumes: vec![apb::VolumeHeader { volume_id: volume.into(), size_bytes: (16 * MIB) as i64 }],
        r#final: false,
        source_backend: "backend-a".into(),
        created_at_ms: 1,
        epoch: g.epoch,
    };
    tx.send(apb::ReplicaMessage { kind: Some(Kind::Begin(begin)) }).await.unwrap();
    let chunk = apb::DeltaChunk { volume_id: volume.into(), offset: 0, data: vec![0x55; 65536].into(), zero_length: 0 };
    tx.send(apb::ReplicaMessage { kind: Some(Kind::Chunk(chunk)) }).await.unwrap();
    let mut replica = apb::replica_client::ReplicaClient::new(
        drover_tests::cluster::agent_role_channel(&cluster.agents[1].endpoint, cluster.dir.path()).await,
    );
    let call =
        tokio::spawn(
            async move { replica.apply_recovery_point(tokio_stream::wrappers::ReceiverStream::new(rx)).await },
        );
    (tx, call)
}

/// The prediction before acting: after known writes at site A, `replication-info` with
/// `predict` and `drover group show` say what a planned failover's final sync would ship,
/// within 5% of what the failover then ships (rounded to clusters), and the RPO a
/// disaster failover would have. The failover runs as a runbook, whose DR report puts
/// the prediction it made at submit beside what the final sync shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_ships_what_was_predicted() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "pr", 2, 16 * MIB).await;
    let (u0, u1) = (uri(&mut c, &vols[0]).await, uri(&mut c, &vols[1]).await);
    // Data before the initial copy, so that the copy measures a rate.
    io(&u0, &["write -P 0x20 12M 2M"]);
    enable(&mut c, "pr", 3600).await;
    io(&u0, &["write -P 0x21 0 3M"]);
    io(&u1, &["write -P 0x22 5M 1M", "write -P 0x23 9M 100k"]);
    let written = cluster_bytes(0, 3 * MIB) + cluster_bytes(5 * MIB, MIB) + cluster_bytes(9 * MIB, 100 << 10);
    let info = c
        .replication
        .get_replication_info(pb::GetReplicationInfoRequest {
            group: "pr".into(),
            project: "tests".into(),
            predict: true,
        })
        .await
        .expect("replication info with a prediction")
        .into_inner();
    let predicted = info.predicted_final_sync_bytes;
    assert!(info.rpo_ms >= 0, "a disaster failover now has a known RPO: {info:?}");
    assert!(info.measured_rate_bytes_per_s > 0 && info.predicted_final_sync_ms >= 0, "{info:?}");
    let out = cluster.cli(&["group", "show", "pr", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["predicted_final_sync_bytes"], predicted, "group show predicts the same: {shown}");
    let e = run_to_end(&mut c, runbook_request("group-failover.yaml", &[("group", "pr"), ("project", "tests")])).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: "pr".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    let actual = shipped(&g, "failover");
    let report = c
        .executions
        .get_execution_report(pb::GetExecutionReportRequest { id: e.id.clone(), format: "json".into() })
        .await
        .unwrap()
        .into_inner()
        .text;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let row = &report["groups"][0];
    assert_eq!(row["sync_bytes"], actual, "the report's achieved final sync is the one the group recorded: {row}");
    assert_eq!(row["predicted"]["sync_bytes"], predicted, "the report's prediction, made at submit: {row}");
    assert!(row["predicted"]["sync_ms"].as_i64().unwrap() >= 0 && row["sync_ms"].as_i64().unwrap() >= 0, "{row}");
    assert_eq!((row["predicted"]["rpo_ms"].as_i64(), row["rpo_ms"].as_i64()), (Some(0), Some(0)), "{row}");
    println!(
        "prediction: {predicted} bytes in about {} ms at {} bytes/s; the final sync shipped {actual} bytes; {written} \
         bytes of clusters written; RPO of a disaster failover was {} ms",
        info.predicted_final_sync_ms, info.measured_rate_bytes_per_s, info.rpo_ms
    );
    let error = (predicted - actual as i64).unsigned_abs() as f64 / actual as f64;
    assert!(error <= 0.05, "predicted {predicted}, shipped {actual}");
    assert_eq!(actual, written, "the final sync shipped the written clusters");
    // Without `predict` nothing is measured.
    let plain = c
        .replication
        .get_replication_info(pb::GetReplicationInfoRequest {
            group: "pr".into(),
            project: "tests".into(),
            predict: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plain.predicted_final_sync_bytes, -1);
}
