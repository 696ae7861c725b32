//! Taking over images made outside Drover, on the qemu backend: what is listed as safe
//! and why not, paging and sorting, internal snapshots adopted as Drover snapshots (their
//! data read back through a volume made from them), and unmanage handing the image back
//! with its snapshots.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::cluster::qemu_io;
use drover_tests::{Cluster, StoreChoice};

const MIB: i64 = 1 << 20;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn img(p: &Path) -> &str {
    p.to_str().unwrap()
}

async fn uri(c: &mut Clients, volume: &str) -> String {
    let req = pb::AttachVolumeRequest { volume: volume.into(), project: "tests".into() };
    c.volumes.attach_volume(req).await.expect("attach").into_inner().uri
}

fn io(uri: &str, cmds: &[&str]) {
    qemu_io(uri, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
}

fn listing(backend: &str, limit: i32, marker: &str, sort: &str) -> pb::ListManageableVolumesRequest {
    pb::ListManageableVolumesRequest { backend: backend.into(), limit, marker: marker.into(), sort: sort.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_made_outside_drover_are_classified_and_taken_over_with_their_snapshots() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let pool = cluster.path().join("pool-agent-backend-b");
    let outside_dir = tempfile::tempdir().unwrap();

    // plain: 8 MiB, data only. snappy: 16 MiB, two internal snapshots over changing data.
    let plain = pool.join("plain.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&plain), "8M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x0a 0 1M", img(&plain)]);
    let snappy = pool.join("snappy.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&snappy), "16M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", img(&snappy)]);
    run(&["qemu-img", "snapshot", "-c", "before-upgrade", img(&snappy)]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 0 1M", img(&snappy)]);
    run(&["qemu-img", "snapshot", "-c", "nightly", img(&snappy)]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 1M", img(&snappy)]);
    // outside: 12 MiB over a backing file that is not in the pool.
    let base = outside_dir.path().join("base.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&base), "12M"]);
    let outside = pool.join("outside.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", img(&base), "-F", "qcow2", img(&outside)]);
    // busy: 4 MiB, held open by a writer for the whole test.
    let busy = pool.join("busy.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&busy), "4M"]);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x44 0 64k", "-c", "sleep 600000", img(&busy)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let held = std::time::Instant::now();
    while Command::new("qemu-img").args(["info", img(&busy)]).output().unwrap().status.success() {
        assert!(held.elapsed().as_secs() < 10, "the writer never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let all = c.volumes.list_manageable_volumes(listing("backend-b", 0, "", "")).await.unwrap().into_inner();
    let by: HashMap<_, _> = all.volumes.iter().map(|m| (m.reference.as_str(), m)).collect();
    assert_eq!(all.volumes.len(), 4, "{all:?}");
    assert!(all.next_marker.is_empty());
    assert!(by["plain"].safe_to_manage && by["plain"].snapshots.is_empty(), "{:?}", by["plain"]);
    let s = by["snappy"];
    assert!(s.safe_to_manage && s.size_bytes == 16 * MIB, "{s:?}");
    let names: Vec<&str> = s.snapshots.iter().map(|x| x.reference.as_str()).collect();
    assert_eq!(names, ["before-upgrade", "nightly"]);
    assert!(s.snapshots.iter().all(|x| x.created_at_ms > 0 && x.volume_reference == "snappy"));
    let o = by["outside"];
    assert!(!o.safe_to_manage && o.reason_not_safe.contains("outside the pool"), "{o:?}");
    assert_eq!(o.backing_file, img(&base));
    let b = by["busy"];
    assert!(!b.safe_to_manage && b.reason_not_safe.contains("in use"), "{b:?}");

    // Pages of two, by size: busy (4M), plain (8M) | outside (12M), snappy (16M).
    let p1 = c.volumes.list_manageable_volumes(listing("backend-b", 2, "", "size")).await.unwrap().into_inner();
    let refs =
        |p: &pb::ListManageableVolumesResponse| p.volumes.iter().map(|m| m.reference.clone()).collect::<Vec<_>>();
    assert_eq!((refs(&p1), p1.next_marker.as_str()), (vec!["busy".to_string(), "plain".into()], "plain"));
    let p2 = c.volumes.list_manageable_volumes(listing("backend-b", 2, "plain", "size")).await.unwrap().into_inner();
    assert_eq!((refs(&p2), p2.next_marker.as_str()), (vec!["outside".to_string(), "snappy".into()], ""));
    for (bad, what) in [(listing("backend-b", 5000, "", ""), "limit"), (listing("backend-b", 0, "", "age"), "sort")] {
        let e = c.volumes.list_manageable_volumes(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {}", e.message());
    }
    let e = c.volumes.list_manageable_volumes(listing("backend-b", 2, "nosuch", "")).await.unwrap_err();
    assert!(e.message().contains("list again without a marker"), "{}", e.message());

    // The snapshot listing: both of snappy's, named by volume and snapshot.
    let snaps = c.volumes.list_manageable_snapshots(listing("backend-b", 1, "", "")).await.unwrap().into_inner();
    assert_eq!(snaps.snapshots.len(), 1);
    assert_eq!(snaps.next_marker, "snappy/before-upgrade");
    let rest = c
        .volumes
        .list_manageable_snapshots(listing("backend-b", 0, &snaps.next_marker, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.snapshots.iter().map(|s| s.reference.as_str()).collect::<Vec<_>>(), ["nightly"]);

    // Unsafe images are refused with the reason; a path is refused as bad input.
    for (reference, code) in [
        ("outside", tonic::Code::FailedPrecondition),
        ("busy", tonic::Code::FailedPrecondition),
        ("../pool-agent-backend-a/x", tonic::Code::InvalidArgument),
    ] {
        let req = pb::ManageVolumeRequest {
            backend: "backend-b".into(),
            reference: reference.into(),
            name: "nope".into(),
            project: "tests".into(),
            without_snapshots: false,
        };
        let e = c.volumes.manage_volume(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{reference}: {}", e.message());
    }

    // snappy is taken over with its two snapshots.
    let req = pb::ManageVolumeRequest {
        backend: "backend-b".into(),
        reference: "snappy".into(),
        name: "app".into(),
        project: "tests".into(),
        without_snapshots: false,
    };
    let v = c.volumes.manage_volume(req).await.expect("manage snappy").into_inner();
    assert_eq!((v.status.as_str(), v.size_bytes), ("available", 16 * MIB));
    let listed = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest {
            project: "tests".into(),
            volume: "app".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<&str> = listed.snapshots.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["app.before-upgrade", "app.nightly"]);
    assert!(listed.snapshots.iter().all(|s| s.status == "available" && s.backend == "backend-b"));
    let u = uri(&mut c, "app").await;
    io(&u, &["read -P 0x33 0 1M", "write -P 0x55 2M 1M"]);
    // Each snapshot reads as the image did when it was taken: made into a volume, read.
    for (snap, pattern) in [("app.before-upgrade", "0x11"), ("app.nightly", "0x22")] {
        let name = format!("from-{}", snap.replace('.', "-"));
        let req = pb::CreateVolumeRequest {
            name: name.clone(),
            project: "tests".into(),
            from_snapshot: snap.into(),
            ..Default::default()
        };
        c.volumes.create_volume(req).await.unwrap_or_else(|e| panic!("volume from {snap}: {e}"));
        let u = uri(&mut c, &name).await;
        io(&u, &[&format!("read -P {pattern} 0 1M"), "read -P 0 1M 1M"]);
        let del = pb::DeleteVolumeRequest { volume: name.clone(), project: "tests".into() };
        c.volumes.delete_volume(del).await.unwrap();
    }
    assert!(
        !c.volumes
            .list_manageable_volumes(listing("backend-b", 0, "", ""))
            .await
            .unwrap()
            .into_inner()
            .volumes
            .iter()
            .any(|m| m.reference == "snappy"),
        "a managed image is no longer listed"
    );

    // Unmanage hands the image back with its snapshots; the records go.
    let r = c
        .volumes
        .unmanage_volume(pb::UnmanageVolumeRequest { volume: "app".into(), project: "tests".into() })
        .await
        .expect("unmanage")
        .into_inner();
    let listed = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest { project: "tests".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.snapshots.is_empty(), "{listed:?}");
    let back = pool.join(format!("{}.qcow2", r.reference));
    let snaps = run(&["qemu-img", "snapshot", "-l", img(&back)]);
    assert!(snaps.contains("before-upgrade") && snaps.contains("nightly"), "{snaps}");
    run(&["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x33 0 1M", "-c", "read -P 0x55 2M 1M", img(&back)]);
    let again = c.volumes.list_manageable_volumes(listing("backend-b", 0, "", "")).await.unwrap().into_inner();
    let m = again.volumes.iter().find(|m| m.reference == r.reference).expect("listed again");
    assert!(m.safe_to_manage && m.snapshots.len() == 2, "{m:?}");
    writer.kill().unwrap();
    writer.wait().unwrap();
}
