//! Snapshots on the real backend: an orchestrator, two qemu agents (each with its own
//! qemu-storage-daemon) as processes, and qemu-io / qemu-img as independent clients.
//! A group snapshot taken under a writer holds one prefix of its writes across every
//! volume; volumes made from it are independent of their sources; snapshots survive
//! SIGKILLs of the agent and its daemon, do not inflate replication deltas, and stay at
//! their backend after a failover; bad requests are refused and change nothing.

use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::cluster::qemu_io;
use drover_tests::writer::{Writer, prefixes, slots};
use drover_tests::{Cluster, StoreChoice, consistent_group as group, wait_backend_up};
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn uri(c: &mut Clients, volume: &str) -> String {
    c.volumes
        .attach_volume(pb::AttachVolumeRequest { volume: volume.into(), project: "tests".into() })
        .await
        .expect("attach")
        .into_inner()
        .uri
}

fn io(uri: &str, cmds: &[&str]) {
    qemu_io(uri, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
}

async fn volume(c: &mut Clients, name: &str, size: u64) {
    c.volumes
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            project: "tests".into(),
            size_bytes: size as i64,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .expect("create volume");
}

async fn from_snapshot(
    c: &mut Clients,
    name: &str,
    snapshot: &str,
    of: &str,
    size: i64,
) -> Result<pb::Volume, tonic::Status> {
    c.volumes
        .create_volume(pb::CreateVolumeRequest {
            name: name.into(),
            project: "tests".into(),
            size_bytes: size,
            from_snapshot: snapshot.into(),
            from_volume: of.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) -> tonic::Status {
    let s = r.expect_err(what);
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_is_one_prefix_of_the_writes_and_its_volumes_are_independent() {
    let mut cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "cg", 3, 8 * MIB).await;
    let mut uris = Vec::new();
    for v in &vols {
        uris.push(uri(&mut c, v).await);
    }
    // Ordered writes across the three volumes (`drover_tests::writer`).
    let writer = Writer::start(uris.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = Instant::now();
    let snap = c
        .snapshots
        .create_group_snapshot(pb::CreateGroupSnapshotRequest {
            group: "cg".into(),
            project: "tests".into(),
            name: "cg-s1".into(),
        })
        .await
        .expect("group snapshot")
        .into_inner();
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let log = writer.stop();
    assert_eq!(snap.status, "available", "{snap:?}");
    assert_eq!(snap.members.len(), 3, "{snap:?}");
    assert!(!snap.execution_id.is_empty() && snap.note.is_empty(), "{snap:?}");

    // A volume from each member, read with qemu-img: together one prefix of the writes.
    let mut actual = Vec::new();
    let mut made = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let name = format!("cg-r{i}");
        let m = from_snapshot(&mut c, &name, "cg-s1", v, 0).await.expect("a volume from the snapshot");
        assert_eq!((m.status.as_str(), m.size_bytes as u64, m.backend.as_str()), ("available", 8 * MIB, "backend-a"));
        let u = uri(&mut c, &name).await;
        actual.push(slots(cluster.path(), &u, &name));
        made.push((name, u));
    }
    let matches = prefixes(&log, &actual);
    let k = *matches.last().unwrap_or_else(|| panic!("the volumes made from the snapshot match no prefix: torn"));
    let done_before = log.iter().take_while(|w| w.done_at.is_some_and(|d| d < asked)).count();
    let issued_before = log.iter().filter(|w| w.issued_at < answered).count();
    println!(
        "snapshots: the group snapshot holds the first {k} of {} writes ({done_before} were acknowledged before it was \
         asked, {issued_before} issued before it answered)",
        log.len()
    );
    assert!(done_before <= k && k <= issued_before, "the snapshot's instant is outside the call");
    assert!(k < log.len(), "writes after the snapshot must not be in it");

    // Independent both ways.
    io(&made[0].1, &["write -P 0xee 2560k 64k"]);
    io(&uris[0], &["read -P 0 2560k 64k"]);
    io(&uris[1], &["write -P 0xdd 2624k 64k"]);
    io(&made[1].1, &["read -P 0 2624k 64k"]);

    // Bad input is refused with a clear code and changes nothing.
    expect_code(
        c.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "cg-s1".into(), project: "tests".into() })
            .await,
        Code::FailedPrecondition,
        "deleting a snapshot volumes were made from",
    );
    let small = expect_code(
        from_snapshot(&mut c, "cg-small", "cg-s1", &vols[0], (4 * MIB) as i64).await,
        Code::InvalidArgument,
        "a volume smaller than the snapshot",
    );
    assert!(small.message().contains("smaller"), "{}", small.message());
    expect_code(
        from_snapshot(&mut c, "cg-which", "cg-s1", "", 0).await,
        Code::InvalidArgument,
        "a group snapshot without the volume to copy",
    );
    expect_code(
        c.snapshots
            .create_group_snapshot(pb::CreateGroupSnapshotRequest {
                group: "cg".into(),
                project: "tests".into(),
                name: "cg-s1".into(),
            })
            .await,
        Code::AlreadyExists,
        "a snapshot name that is taken",
    );
    expect_code(
        c.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                volume: vols[0].clone(),
                project: "other".into(),
                name: "x".into(),
            })
            .await,
        Code::NotFound,
        "a volume of another project",
    );
    volume(&mut c, "solo", 4 * MIB).await;
    c.snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "solo".into(),
            project: "tests".into(),
            name: "solo-s".into(),
        })
        .await
        .expect("a volume snapshot");
    expect_code(
        c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: "solo".into(), project: "tests".into() }).await,
        Code::FailedPrecondition,
        "deleting a volume that has snapshots",
    );
    let listed = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest { project: "tests".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["cg-s1", "solo-s"], "nothing else was made");
    let vols_now = c
        .volumes
        .list_volumes(pb::ListVolumesRequest { project: "tests".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vols_now.volumes.len(), 3 + 3 + 1, "the refused requests made no volume: {:?}", vols_now.volumes);
    let grouped = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest { project: "tests".into(), group: "cg".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grouped.snapshots.len(), 1);

    // A group made from the group snapshot: a new volume per member, holding the same.
    let made_group = c
        .groups
        .create_group(pb::CreateGroupRequest {
            name: "cgr".into(),
            project: "tests".into(),
            group_type: "consistent-replication".into(),
            from_group_snapshot: "cg-s1".into(),
            ..Default::default()
        })
        .await
        .expect("a group from the group snapshot")
        .into_inner();
    assert_eq!(made_group.volume_ids.len(), 3);
    for (i, v) in vols.iter().enumerate() {
        let name = format!("cgr-{v}");
        let u = uri(&mut c, &name).await;
        assert_eq!(slots(cluster.path(), &u, &name), actual[i], "{name} holds what {v} held at the snapshot");
    }
    expect_code(
        c.groups
            .create_group(pb::CreateGroupRequest {
                name: "cgx".into(),
                project: "tests".into(),
                group_type: "consistent-replication".into(),
                volumes: vec![vols[0].clone()],
                from_group_snapshot: "cg-s1".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "volumes and a snapshot at once",
    );
    c.groups.delete_group(pb::DeleteGroupRequest { group: "cgr".into(), project: "tests".into() }).await.unwrap();

    // Snapshots and the volumes made from them survive SIGKILLs of the daemon and the agent.
    let before: Vec<Vec<u8>> = made.iter().map(|(n, u)| slots(cluster.path(), u, n)).collect();
    let pidfile = cluster.agent_dir(0).join("qemu/qsd.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = std::fs::read_to_string(&pidfile).unwrap_or_default().trim().to_string();
        if !now.is_empty() && now != pid && qemu_io(&made[2].1, &["read 0 64k".to_string()]).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon and its exports did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.agents[0].proc.kill();
    cluster.restart_agent(0, "qemu");
    wait_backend_up(&mut c, "backend-a").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu_io(&made[2].1, &["read 0 64k".to_string()]).is_err() {
        assert!(Instant::now() < deadline, "the volume made from the snapshot is not served after the agent's restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: Vec<Vec<u8>> = made.iter().map(|(n, u)| slots(cluster.path(), u, n)).collect();
    assert_eq!(before, after, "the volumes made from the snapshot changed across the kills");
    let again = from_snapshot(&mut c, "cg-again", "cg-s1", &vols[2], 0).await.expect("the snapshot is still there");
    let u = uri(&mut c, &again.name).await;
    assert_eq!(slots(cluster.path(), &u, "cg-again"), actual[2], "a new volume from the snapshot holds the same");

    // Clean up in order: the volumes made from it, then the snapshot.
    let group_vols: Vec<String> = vols.iter().map(|v| format!("cgr-{v}")).collect();
    for name in made.iter().map(|(n, _)| n.as_str()).chain(["cg-again"]).chain(group_vols.iter().map(String::as_str)) {
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest { volume: name.into(), project: "tests".into() })
            .await
            .unwrap();
    }
    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "cg-s1".into(), project: "tests".into() })
        .await
        .expect("delete the snapshot once nothing reads through it");
    expect_code(
        c.snapshots.get_snapshot(pb::GetSnapshotRequest { snapshot: "cg-s1".into(), project: "tests".into() }).await,
        Code::NotFound,
        "a deleted snapshot",
    );
    // The sources are whole and writable after all this.
    io(&uris[0], &["write -P 0x42 0 64k", "read -P 0x42 0 64k"]);
}

async fn sync(c: &mut Clients, group: &str) -> pb::SyncGroupResponse {
    c.replication
        .sync_group(pb::SyncGroupRequest {
            no_wait: false,
            group: group.into(),
            project: "tests".into(),
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_a_replicating_group_keep_deltas_small_and_stay_at_their_backend() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let vols = group(&mut c, "rg", 2, 16 * MIB).await;
    let v0 = uri(&mut c, &vols[0]).await;
    io(&v0, &["write -P 0x01 0 1M"]);
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "rg".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 3600,
            no_wait: false,
        })
        .await
        .expect("enable")
        .into_inner();
    assert_eq!(r.group.unwrap().replication_status, "enabled");
    let snap =
        |name: &str| pb::CreateGroupSnapshotRequest { group: "rg".into(), project: "tests".into(), name: name.into() };
    c.snapshots.create_group_snapshot(snap("rg-s1")).await.expect("a snapshot of a replicating group");
    // Each later point ships what changed since the one before, snapshots or not.
    let mut ratios = Vec::new();
    for (i, kib) in [256u64, 128, 512].into_iter().enumerate() {
        io(&v0, &[&format!("write -P 0x{:02x} {}M {kib}k", 0x10 + i, 4 + i)]);
        let shipped = sync(&mut c, "rg").await.bytes as u64;
        let ratio = shipped as f64 / (kib * 1024) as f64;
        ratios.push(format!("{kib} KiB written, {shipped} bytes shipped ({ratio:.2}x)"));
        assert!((1.0..=1.2).contains(&ratio), "{kib} KiB written, {shipped} bytes shipped");
        if i == 0 {
            c.snapshots.create_group_snapshot(snap("rg-s2")).await.expect("a second snapshot between syncs");
        }
    }
    println!("snapshots: deltas with snapshots in the chain: {ratios:?}");

    // A planned failover: the snapshots stay at backend-a and say so.
    let moved = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "rg".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .expect("planned failover")
        .into_inner();
    assert_eq!(moved.group.unwrap().active_backend, "backend-b");
    let s1 = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest { snapshot: "rg-s1".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s1.backend, "backend-a");
    assert!(s1.note.contains("active at backend-b") && s1.note.contains("not replicated"), "{}", s1.note);
    // A volume made from it at backend-a holds the data of its instant only.
    let m = from_snapshot(&mut c, "rg-r0", "rg-s1", &vols[0], 0).await.expect("made at the snapshot's backend");
    assert_eq!(m.backend, "backend-a");
    let u = uri(&mut c, "rg-r0").await;
    io(&u, &["read -P 0x01 0 1M", "read -P 0 4M 256k"]);
    // Back home; every write is there, and the snapshots too.
    c.replication
        .failover_group(pb::FailoverGroupRequest {
            group: "rg".into(),
            project: "tests".into(),
            target_backend: "default".into(),
            ..Default::default()
        })
        .await
        .expect("failback");
    let v0 = uri(&mut c, &vols[0]).await;
    io(&v0, &["read -P 0x01 0 1M", "read -P 0x10 4M 256k", "read -P 0x11 5M 128k", "read -P 0x12 6M 512k"]);
    let m2 = from_snapshot(&mut c, "rg-r1", "rg-s2", &vols[0], 0).await.expect("the second snapshot is there");
    let u2 = uri(&mut c, &m2.name).await;
    io(&u2, &["read -P 0x01 0 1M", "read -P 0x10 4M 256k", "read -P 0 5M 128k"]);

    // Deleting the snapshots of a replicating volume: the next syncs fold their layers
    // and ship only what changed, and the target holds every write.
    for v in ["rg-r0", "rg-r1"] {
        c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: v.into(), project: "tests".into() }).await.unwrap();
    }
    for s in ["rg-s1", "rg-s2"] {
        c.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: s.into(), project: "tests".into() })
            .await
            .expect("delete a snapshot of a replicating volume");
    }
    io(&v0, &["write -P 0x30 8M 192k"]);
    let shipped = sync(&mut c, "rg").await.bytes as u64;
    assert_eq!(shipped, 192 * 1024, "after the deletes a sync ships what changed");
    io(&v0, &["write -P 0x31 9M 64k"]);
    assert_eq!(sync(&mut c, "rg").await.bytes as u64, 64 * 1024);
    c.replication
        .failover_group(pb::FailoverGroupRequest {
            group: "rg".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .expect("planned failover after the deletes");
    let at_b = uri(&mut c, &vols[0]).await;
    io(
        &at_b,
        &[
            "read -P 0x01 0 1M",
            "read -P 0x10 4M 256k",
            "read -P 0x11 5M 128k",
            "read -P 0x12 6M 512k",
            "read -P 0x30 8M 192k",
            "read -P 0x31 9M 64k",
        ],
    );
}
