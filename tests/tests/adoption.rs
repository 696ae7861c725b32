//! Taking over images made outside Drover, on the qemu backend: what is listed as safe
//! and why not, paging and sorting, internal snapshots adopted as Drover snapshots (their
//! data read back through a volume made from them), and unmanage handing the image back
//! with its snapshots.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_store::{EtcdStore, KvStore, Prefixed, Txn, TxnOp};
use drover_tests::cluster::qemu_io;
use drover_tests::{Cluster, Etcd, StoreChoice};

const MIB: i64 = 1 << 20;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn img(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qemu-io process that holds `image` open for writing (its lock taken) until killed.
/// Readiness is seen in /proc (the image among its open files), not by probing the lock:
/// a probe racing its open makes it fail to lock and exit.
fn hold_open(image: &Path) -> std::process::Child {
    let writer = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x44 0 64k", "-c", "sleep 600000", img(image)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let target = std::fs::canonicalize(image).unwrap();
    let fds = format!("/proc/{}/fd", writer.id());
    let held = std::time::Instant::now();
    while !std::fs::read_dir(&fds)
        .map(|d| d.flatten().any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == target)))
        .unwrap_or(false)
    {
        assert!(held.elapsed().as_secs() < 10, "the writer never opened {}", image.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Its lock is taken right after the open.
    std::thread::sleep(std::time::Duration::from_millis(300));
    writer
}

async fn uri(c: &mut Clients, volume: &str) -> String {
    let req = pb::AttachVolumeRequest { volume: volume.into(), project: "tests".into() };
    c.volumes.attach_volume(req).await.expect("attach").into_inner().uri
}

fn io(uri: &str, cmds: &[&str]) {
    qemu_io(uri, &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
}

/// Polls execution `id` until `ok` holds (within a minute); fails if it ends first.
async fn execution_until(c: &mut Clients, id: &str, what: &str, ok: impl Fn(&pb::Execution) -> bool) -> pb::Execution {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner();
        if ok(&now) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline && now.status == "running",
            "execution {id} never reached {what}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let mut writer = hold_open(&busy);

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
        // It reads through its snapshot, so it is no image to hand back: the backend
        // refuses, and the volume stays available (before the sixteenth session it was
        // left in error, where only a delete was allowed).
        let refused = c
            .volumes
            .unmanage_volume(pb::UnmanageVolumeRequest { volume: name.clone(), project: "tests".into() })
            .await
            .expect_err("unmanage of a volume made from a snapshot");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
        let still = c.volumes.get_volume(pb::GetVolumeRequest { volume: name.clone(), project: "tests".into() });
        let still = still.await.unwrap().into_inner();
        assert_eq!(still.status, "available", "{}", still.status_reason);
        assert!(still.status_reason.contains("reads through it"), "{}", still.status_reason);
        io(&u, &[&format!("read -P {pattern} 0 1M")]);
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

    // A snapshot taken in Drover is no part of the image: the unmanage is refused before
    // anything changes, and says what to do.
    let taken = c
        .snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            volume: "app".into(),
            project: "tests".into(),
            name: "mine".into(),
        })
        .await
        .expect("a snapshot in Drover")
        .into_inner();
    let refused = c
        .volumes
        .unmanage_volume(pb::UnmanageVolumeRequest { volume: "app".into(), project: "tests".into() })
        .await
        .expect_err("unmanage with a Drover snapshot");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(
        refused.message().contains("mine") && refused.message().contains("drover snapshot delete"),
        "{}",
        refused.message()
    );
    let app = c.volumes.get_volume(pb::GetVolumeRequest { volume: "app".into(), project: "tests".into() }).await;
    assert_eq!(app.unwrap().into_inner().status, "available", "a refused unmanage leaves the volume as it was");
    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: taken.id, project: "tests".into() })
        .await
        .expect("delete the Drover snapshot");

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

fn cli_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.cli(args);
    assert!(out.status.success(), "drover {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn items(plan: &serde_json::Value) -> HashMap<String, serde_json::Value> {
    let list = plan["items"].as_array().expect("items");
    list.iter()
        .map(|i| {
            let key = match i["reference"].as_str().unwrap_or_default() {
                "" => format!("missing:{}", i["name"].as_str().unwrap()),
                r => r.to_string(),
            };
            (key, i.clone())
        })
        .collect()
}

/// After a disaster: site B's pool holds images Drover never managed. The plan
/// classifies each; the apply adopts exactly the adoptable ones with their snapshots and
/// puts them in their group; a second apply changes nothing; an image added after a plan
/// makes its apply refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_plan_classifies_every_image_and_its_apply_adopts_exactly_the_adoptable() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start_with(StoreChoice::Etcd(&etcd), "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let pool = cluster.path().join("pool-agent-backend-b");
    let outside_dir = tempfile::tempdir().unwrap();

    // What Drover already knows at B: volume "taken", and group "apps" holding "seed".
    for name in ["taken", "seed"] {
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            project: "tests".into(),
            size_bytes: 4 * MIB,
            backend: "backend-b".into(),
            ..Default::default()
        };
        c.volumes.create_volume(req).await.unwrap();
    }
    let req = pb::CreateGroupRequest {
        name: "apps".into(),
        project: "tests".into(),
        group_type: "consistent-replication".into(),
        backend: "backend-b".into(),
        volumes: vec!["seed".into()],
        ..Default::default()
    };
    c.groups.create_group(req).await.unwrap();
    let taken = c
        .volumes
        .get_volume(pb::GetVolumeRequest { volume: "taken".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    // A record whose image is gone: a copy of taken's under a new id and name.
    let raw: Arc<dyn KvStore> =
        Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap());
    let store = Prefixed::new(raw, cluster.store_prefix().expect("on etcd").to_string());
    let kv = store.get(format!("volumes/{}", taken.id).as_bytes()).await.unwrap().expect("taken's record");
    let mut ghost: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    let ghost_id = uuid::Uuid::now_v7().to_string();
    ghost["id"] = ghost_id.clone().into();
    ghost["name"] = "ghost".into();
    let put = Txn::new()
        .and_then(TxnOp::put(format!("volumes/{ghost_id}"), serde_json::to_vec(&ghost).unwrap()))
        .and_then(TxnOp::put("names/volumes/tests/ghost".to_string(), ghost_id.clone()));
    store.txn(put).await.unwrap();

    let make = |name: &str, size: &str| {
        let p = pool.join(format!("{name}.qcow2"));
        run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&p), size]);
        p
    };
    let db = make("app-db", "8M");
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", img(&db)]);
    run(&["qemu-img", "snapshot", "-c", "pre-dr", img(&db)]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 1M", img(&db)]);
    let web = make("app-web", "4M");
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x63 1M 1M", img(&web)]);
    make("taken", "4M");
    make("twin-1", "4M");
    make("twin-2", "4M");
    make("stray", "4M");
    make("new-1", "4M");
    make(&taken.id, "4M");
    let base = outside_dir.path().join("base.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&base), "4M"]);
    let out = pool.join("app-out.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", img(&base), "-F", "qcow2", img(&out)]);
    let busy = make("app-busy", "4M");
    let mut writer = hold_open(&busy);

    // A map with a mistake is refused at its line and column.
    let bad_map = cluster.path().join("bad.yaml");
    std::fs::write(&bad_map, "rules:\n  - match: \"app-*\"\n    projct: tests\n").unwrap();
    let out = cluster.cli(&["adopt", "plan", "--backend", "backend-b", "--map", bad_map.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.yaml:3:5") && err.contains("projct"), "{err}");

    let map = cluster.path().join("map.yaml");
    std::fs::write(
        &map,
        "rules:\n  - match: \"app-*\"\n    name: \"prod-{reference}\"\n    group: apps\n  - match: taken\n  \
         - match: \"twin-*\"\n    name: twin\n  - match: \"new-*\"\n    group: fresh\n    type: consistent-replication\n",
    )
    .unwrap();
    let plan =
        cli_ok(&cluster, &["adopt", "plan", "--backend", "backend-b", "--map", map.to_str().unwrap(), "-o", "json"]);
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let plan_id = plan["id"].as_str().unwrap().to_string();
    let by = items(&plan);
    let category = |k: &str| by.get(k).unwrap_or_else(|| panic!("{k} not in the plan: {plan}"))["category"].clone();
    for (k, want) in [
        ("app-db", "adoptable"),
        ("app-web", "adoptable"),
        ("app-out", "unsafe"),
        ("app-busy", "unsafe"),
        ("taken", "duplicate"),
        ("twin-1", "duplicate"),
        ("twin-2", "duplicate"),
        ("stray", "unmatched"),
        (taken.id.as_str(), "managed"),
        ("missing:ghost", "missing"),
        ("new-1", "adoptable"),
    ] {
        assert_eq!(category(k), want, "{k}: {}", by[k]);
    }
    assert_eq!(by.len(), 11, "exactly the images and the ghost: {plan}");
    assert!(by["new-1"]["reason"].as_str().unwrap().contains("created with type"), "{}", by["new-1"]);
    assert_eq!(by["app-db"]["name"], "prod-app-db");
    assert_eq!(by["app-db"]["snapshots"], serde_json::json!(["prod-app-db.pre-dr"]));
    assert!(by["app-out"]["reason"].as_str().unwrap().contains("outside the pool"));
    assert!(by["taken"]["reason"].as_str().unwrap().contains("already has a volume taken"));
    assert_eq!(by["missing:ghost"]["volume_id"], ghost_id.as_str());

    // An image added after a plan makes its apply refuse, and nothing is adopted.
    let stale =
        cli_ok(&cluster, &["adopt", "plan", "--backend", "backend-b", "--map", map.to_str().unwrap(), "-o", "json"]);
    let stale_id = serde_json::from_str::<serde_json::Value>(&stale).unwrap()["id"].as_str().unwrap().to_string();
    let late = make("late", "4M");
    let out = cluster.cli(&["adopt", "apply", &stale_id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("changed since plan") && err.contains("added: late"), "{err}");
    std::fs::remove_file(&late).unwrap();
    let missing = c.volumes.get_volume(pb::GetVolumeRequest { volume: "prod-app-db".into(), project: "tests".into() });
    assert_eq!(missing.await.unwrap_err().code(), tonic::Code::NotFound);

    // The first plan (the late image gone again, so the backend is as it saw it).
    let applied = cli_ok(&cluster, &["adopt", "apply", &plan_id, "-o", "json"]);
    let applied: serde_json::Value = serde_json::from_str(&applied).unwrap();
    let by = items(&applied);
    for (k, v) in &by {
        let want = if ["app-db", "app-web", "new-1"].contains(&k.as_str()) { "adopted" } else { "" };
        assert_eq!(v["outcome"], want, "{k}: {v}");
    }
    let db_vol = c
        .volumes
        .get_volume(pb::GetVolumeRequest { volume: "prod-app-db".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((db_vol.status.as_str(), db_vol.size_bytes, db_vol.group_id.is_empty()), ("available", 8 * MIB, false));
    assert_eq!(by["app-db"]["volume_id"], db_vol.id.as_str());
    let u = uri(&mut c, "prod-app-db").await;
    io(&u, &["read -P 0x62 0 1M", "read -P 0 1M 7M"]);
    let u = uri(&mut c, "prod-app-web").await;
    io(&u, &["read -P 0 0 1M", "read -P 0x63 1M 1M"]);
    let req = pb::CreateVolumeRequest {
        name: "db-pre-dr".into(),
        project: "tests".into(),
        from_snapshot: "prod-app-db.pre-dr".into(),
        ..Default::default()
    };
    c.volumes.create_volume(req).await.expect("a volume from the adopted snapshot");
    let u = uri(&mut c, "db-pre-dr").await;
    io(&u, &["read -P 0x61 0 1M"]);
    let group = c
        .groups
        .get_group(pb::GetGroupRequest { group: "apps".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(group.volume_ids.len(), 3, "seed and the two adopted: {group:?}");
    // The map's new group was created, of its type, holding the adopted volume.
    let fresh = c
        .groups
        .get_group(pb::GetGroupRequest { group: "fresh".into(), project: "tests".into() })
        .await
        .expect("the map's new group")
        .into_inner();
    assert_eq!(fresh.group_type, "consistent-replication");
    assert_eq!(fresh.volume_ids, [by["new-1"]["volume_id"].as_str().unwrap()]);

    // A second apply of the same plan adopts nothing more and changes no outcome.
    let before = c.volumes.list_volumes(pb::ListVolumesRequest { project: "tests".into(), ..Default::default() });
    let before = before.await.unwrap().into_inner().volumes.len();
    let again = cli_ok(&cluster, &["adopt", "apply", &plan_id, "-o", "json"]);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(items(&again), by, "the second apply changed an outcome");
    assert_eq!(again["executions"].as_array().unwrap().len(), 2);
    let after = c.volumes.list_volumes(pb::ListVolumesRequest { project: "tests".into(), ..Default::default() });
    assert_eq!(after.await.unwrap().into_inner().volumes.len(), before);
    writer.kill().unwrap();
    writer.wait().unwrap();
}

/// The shipped adopt-after-dr runbook: the plan is there to read at the prompt; once
/// approved, the adoptable image is taken over with its snapshot, and the report lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adopt_after_dr_runbook_plans_waits_for_approval_and_adopts() {
    let cluster = Cluster::start_with(StoreChoice::Embedded, "qemu", &[]).await;
    let mut c = cluster.clients().await;
    let pool = cluster.path().join("pool-agent-backend-b");
    let one = pool.join("restored.qcow2");
    run(&["qemu-img", "create", "-q", "-f", "qcow2", img(&one), "4M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 1M", img(&one)]);
    run(&["qemu-img", "snapshot", "-c", "last-good", img(&one)]);
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks/adopt-after-dr.yaml");
    let req = pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: [("backend", "backend-b"), ("project", "tests")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let e = c.runbooks.run_runbook(req).await.unwrap().into_inner();
    let waiting = execution_until(&mut c, &e.id, "the prompt", |x| x.step == "prompt:review").await;
    // Nothing is adopted before the approval; the plan is in the first step's items.
    let state: serde_json::Value = serde_json::from_str(&waiting.state_json).unwrap();
    let items = state["steps"][0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!((items[0]["target"].as_str(), items[0]["status"].as_str()), (Some("restored"), Some("pending")));
    let none = c.volumes.get_volume(pb::GetVolumeRequest { volume: "restored".into(), project: "tests".into() });
    assert_eq!(none.await.unwrap_err().code(), tonic::Code::NotFound);
    let decide = pb::DecidePromptRequest { id: e.id.clone(), approve: true, by: "tester".into(), ..Default::default() };
    c.executions.decide_prompt(decide).await.unwrap();
    let done = execution_until(&mut c, &e.id, "its end", |x| x.status != "running").await;
    assert_eq!(done.status, "succeeded", "{}", done.error);
    let u = uri(&mut c, "restored").await;
    io(&u, &["read -P 0x71 0 1M"]);
    let snaps = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest {
            project: "tests".into(),
            volume: "restored".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.snapshots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["restored.last-good"]);
    let md = c
        .executions
        .get_execution_report(pb::GetExecutionReportRequest { id: e.id.clone(), format: "md".into() })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert!(md.contains("restored") && md.contains("succeeded"), "{md}");
}

/// An apply outlives its caller and the orchestrator: the CLI that asked is killed at
/// once, the orchestrator is SIGKILLed after a random number of adoptions while the next
/// image's manage is in flight, and the resumed apply adopts every image exactly once (the mock agent's op log has one manage
/// per image, each under its own op_id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_survives_its_caller_and_an_orchestrator_kill_and_adopts_each_image_once() {
    apply_under(Fault::Orchestrator).await;
}

/// The same with the backend's agent SIGKILLed (and restarted) instead, while a manage is
/// in flight: the manage it cut is refused as interrupted and run again under a new
/// op_id, and every image is still adopted exactly once (one volume per image; at most
/// the image in flight managed twice, idempotently, never two volumes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_survives_an_agent_kill_mid_manage_and_adopts_each_image_once() {
    apply_under(Fault::Agent).await;
}

/// The same with etcd SIGKILLed while a manage is in flight and restarted 1-3 s later:
/// the apply waits out the outage in the same orchestrator, with no restart of it, and
/// adopts every image exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_survives_an_etcd_kill_mid_manage_and_adopts_each_image_once() {
    apply_under(Fault::Etcd).await;
}

enum Fault {
    Orchestrator,
    Agent,
    Etcd,
}

async fn apply_under(fault: Fault) {
    const IMAGES: usize = 8;
    let mut extra: Vec<String> =
        ["--set", "mock.latency=300ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"].map(String::from).into();
    for i in 0..IMAGES {
        extra.extend(["--set".to_string(), format!("mock.unmanaged.img-{i}={}", 4 * MIB)]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut etcd = match fault {
        Fault::Etcd => Some(Etcd::start().await),
        _ => None,
    };
    let store = etcd.as_ref().map_or(StoreChoice::Embedded, StoreChoice::Etcd);
    let mut cluster = Cluster::start(store, &extra).await;
    let mut c = cluster.clients().await;
    let plan = c
        .volumes
        .plan_adoption(pb::PlanAdoptionRequest {
            backend: "backend-b".into(),
            project: "tests".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plan.items.iter().filter(|i| i.category == "adoptable").count(), IMAGES, "{plan:?}");

    // The caller leaves at once.
    let mut caller = Command::new(&cluster.bin)
        .args(["adopt", "apply", &plan.id, "--endpoint", &cluster.orchestrator.endpoint, "--project", "tests"])
        .env("DROVER_TOKEN_FILE", drover_tests::cluster::token_file(cluster.path()))
        .env("DROVER_CA_FILE", cluster.path().join("certs").join("ca.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let get = |c: &mut Clients| {
        let mut c = c.clone();
        let id = plan.id.clone();
        async move { c.volumes.get_adoption_plan(pb::GetAdoptionPlanRequest { plan_id: id }).await.unwrap().into_inner() }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get(&mut c).await.executions.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the apply never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    caller.kill().unwrap();
    caller.wait().unwrap();

    // The orchestrator dies after 1 to IMAGES - 2 adoptions.
    let kill_after = 1
        + (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as usize
            % (IMAGES - 2));
    eprintln!("killing after {kill_after} adoption(s)");
    let adopted = |p: &pb::AdoptionPlan| p.items.iter().filter(|i| i.outcome == "adopted").count();
    // … while the next image's manage is in flight (its volume still being created).
    let creating = |c: &mut Clients| {
        let mut c = c.clone();
        async move {
            let req = pb::ListVolumesRequest { project: "tests".into(), ..Default::default() };
            c.volumes.list_volumes(req).await.unwrap().into_inner().volumes.iter().any(|v| v.status == "creating")
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while adopted(&get(&mut c).await) < kill_after || !creating(&mut c).await {
        assert!(std::time::Instant::now() < deadline, "adoptions stalled before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match fault {
        Fault::Orchestrator => cluster.restart_orchestrator().await,
        Fault::Agent => {
            cluster.agents[1].proc.kill();
            cluster.restart_agent_with(1, "mock", &extra);
        }
        Fault::Etcd => {
            let etcd = etcd.as_mut().expect("the etcd variant runs on etcd");
            etcd.kill();
            tokio::time::sleep(Duration::from_millis(1000 + fastrand::u64(0..2000))).await;
            etcd.restart().await;
        }
    }
    let mut c = cluster.clients().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let done = loop {
        let p = get(&mut c).await;
        if adopted(&p) == IMAGES {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "not every image adopted after the restart: {p:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done.executions.len(), 1, "one apply, resumed: {:?}", done.executions);
    let e = execution_until(&mut c, &done.executions[0], "its end", |x| x.status != "running").await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    let vols = c.volumes.list_volumes(pb::ListVolumesRequest { project: "tests".into(), ..Default::default() });
    let vols = vols.await.unwrap().into_inner().volumes;
    let mut names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, (0..IMAGES).map(|i| format!("img-{i}")).collect::<Vec<_>>(), "each image once, nothing else");
    assert!(vols.iter().all(|v| v.status == "available"), "{vols:?}");

    // The agent's op log: exactly one manage per image, no op_id twice.
    let log = std::fs::read_to_string(cluster.path().join("oplog-backend-b.jsonl")).unwrap();
    let manages: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["op"] == "manage_volume")
        .collect();
    let mut targets: Vec<&str> = manages.iter().map(|e| e["target"].as_str().unwrap()).collect();
    targets.sort_unstable();
    let mut ops: Vec<&str> = manages.iter().map(|e| e["op_id"].as_str().unwrap()).collect();
    ops.sort_unstable();
    ops.dedup();
    assert_eq!(ops.len(), manages.len(), "no op_id ran twice");
    match fault {
        Fault::Orchestrator | Fault::Etcd => {
            assert_eq!(targets, (0..IMAGES).map(|i| format!("img-{i}")).collect::<Vec<_>>(), "one manage per image");
        }
        Fault::Agent => {
            assert!(manages.len() <= IMAGES + 1, "only the manage the kill cut ran again: {targets:?}");
            targets.dedup();
            assert_eq!(targets, (0..IMAGES).map(|i| format!("img-{i}")).collect::<Vec<_>>(), "every image managed");
        }
    }
    cluster.assert_no_op_ran_twice();
}
