//! Driver-internal tests that need to build a chain by hand.

use super::*;

fn qemu_io(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("qemu-io").args(args).output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && !text.contains("Pattern verification failed") { Ok(text) } else { Err(text) }
}

/// A temporary directory with a pool whose volume `v` has its directory, and a state
/// directory: (the directory, the pool, the state directory, `v`'s directory).
fn volume_dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir) = (dir.path().join("pool"), dir.path().join("state"));
    let vdir = pool.join("volumes").join("v");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::create_dir_all(state_dir.join("qemu")).unwrap();
    (dir, pool, state_dir, vdir)
}

/// Writes a driver state with one volume, `v` of `size` bytes, primary of group `g`
/// replicating to backend `b`, with `layers`.
fn save_replicated_primary(state_dir: &Path, size: u64, layers: Vec<Layer>) {
    let mut v = Vol::new(0, size, layers, Some(Role::Primary));
    v.group_id = "g".into();
    v.peer = Some(PeerRec { backend: "b".into(), endpoint: "http://127.0.0.1:9".into() });
    v.interval_ms = 3_600_000;
    let state = State {
        next_index: 1,
        volumes: [("v".to_string(), v)].into(),
        clones: Default::default(),
        snapshots: Default::default(),
    };
    std::fs::write(state_dir.join("qemu/state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
}

/// A primary whose chain an older version left long (six points waiting for the peer)
/// starts with at most `MAX_WAITING` waiting, the newest point on top, and reads exactly
/// as before the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_is_merged_at_start() {
    const MIB: u64 = 1 << 20;
    let (_dir, pool, state_dir, vdir) = volume_dirs();
    let path = |seq: u32| vdir.join(format!("L{seq}.qcow2"));
    let mut layers = Vec::new();
    for seq in 0..8u32 {
        let backing = (seq > 0).then(|| path(seq - 1));
        image::create(&path(seq), 16 * MIB, backing.as_deref()).await.unwrap();
        if seq < 7 {
            // Each point changes its own MiB (and the base the first 64 KiB too).
            let p = path(seq);
            let write = format!("write -P {:#x} {}M 64k", 0x10 + seq, seq);
            qemu_io(&["-f", "qcow2", "-c", &write, p.to_str().unwrap()]).unwrap();
        }
        let rp = (seq < 7).then(|| format!("p{seq}"));
        layers.push(Layer { seq, rp, acked: seq == 0, rp_created_ms: i64::from(seq) });
    }
    save_replicated_primary(&state_dir, 16 * MIB, layers);

    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::start(config, &state_dir, "a").await.unwrap();
    let v = driver.vol("v").unwrap();
    let points: Vec<(Option<&str>, bool)> = v.layers.iter().map(|l| (l.rp.as_deref(), l.acked)).collect();
    assert_eq!(
        points,
        [(Some("p0"), true), (Some("p5"), false), (Some("p6"), false), (None, false)],
        "base kept, waiting points merged down to MAX_WAITING ({MAX_WAITING}), newest on top"
    );
    let files = std::fs::read_dir(&vdir).unwrap().count();
    assert_eq!(files, 4, "merged layer files are gone");

    let uri = driver.attach_volume("v").await.unwrap().uri;
    let mut reads: Vec<String> = (0..7u32).map(|seq| format!("read -P {:#x} {}M 64k", 0x10 + seq, seq)).collect();
    reads.push("read -P 0 7M 9M".into());
    let mut args = vec!["-f", "raw"];
    for r in &reads {
        args.extend(["-c", r.as_str()]);
    }
    args.push(&uri);
    qemu_io(&args).unwrap_or_else(|e| panic!("the merged chain reads differently: {e}"));
}

/// A replica made where an earlier one's files were left (a disable cut short between
/// forgetting the volume and removing its files) starts from an empty directory: the old
/// layer files are gone before any new layer is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_does_not_meet_an_earlier_ones_files() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir) = (dir.path().join("pool"), dir.path().join("state"));
    let vdir = pool.join("volumes").join("v");
    std::fs::create_dir_all(&vdir).unwrap();
    for seq in 0..3u32 {
        std::fs::write(vdir.join(format!("L{seq}.qcow2")), b"an earlier replica's layer").unwrap();
    }
    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::start(config, &state_dir, "b").await.unwrap();
    let spec = EnableSpec {
        volume_id: "v".into(),
        group_id: "g".into(),
        role: Role::Secondary,
        peer: drover_agent::driver::Peer { backend: "a".into(), endpoint: "http://127.0.0.1:9".into() },
        size_bytes: 1 << 20,
        interval_ms: None,
    };
    driver.enable_replication(&spec).await.unwrap();
    let left: Vec<String> =
        std::fs::read_dir(&vdir).unwrap().flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.is_empty(), "the earlier replica's files are gone: {left:?}");
    assert_eq!(driver.vol("v").unwrap().role, Some(Role::Secondary));
}

/// One unreplicated volume `v` of three layers in a new pool: L0 holds 64 KiB at 0
/// (0x11), L1 192 KiB at 1 MiB (0x22), L2 (active) the middle 64 KiB of L1's range
/// (0x33). Returns the pool, the state directory and the volume's directory.
async fn three_layer_volume(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (pool, state_dir) = (dir.join("pool"), dir.join("state"));
    let vdir = pool.join("volumes").join("v");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::create_dir_all(state_dir.join("qemu")).unwrap();
    let (pool, vdir) = (pool.canonicalize().unwrap(), vdir.canonicalize().unwrap());
    let writes = ["write -P 0x11 0 64k", "write -P 0x22 1M 192k", "write -P 0x33 1088k 64k"];
    for seq in 0..3u32 {
        let path = vdir.join(format!("L{seq}.qcow2"));
        let backing = (seq > 0).then(|| vdir.join(format!("L{}.qcow2", seq - 1)));
        image::create(&path, 16 << 20, backing.as_deref()).await.unwrap();
        qemu_io(&["-f", "qcow2", "-c", writes[seq as usize], path.to_str().unwrap()]).unwrap();
    }
    let layers = (0..3u32)
        .map(|seq| Layer { seq, rp: (seq < 2).then(|| format!("p{seq}")), acked: false, rp_created_ms: 0 })
        .collect();
    let state = State {
        next_index: 1,
        volumes: [("v".to_string(), Vol::new(0, 16 << 20, layers, None))].into(),
        clones: Default::default(),
        snapshots: Default::default(),
    };
    std::fs::write(state_dir.join("qemu/state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    (pool, state_dir, vdir)
}

/// What [`three_layer_volume`]'s chain reads.
const THREE_LAYER_READS: [&str; 4] =
    ["read -P 0x11 0 64k", "read -P 0x22 1M 64k", "read -P 0x33 1088k 64k", "read -P 0x22 1152k 64k"];

/// A fold cut short after its block job ended leaves the header of the layer above the
/// folded range naming the base, while the state (and the daemon) still read through the
/// folded layers; if the base's metadata was not flushed, the header skips clusters only
/// those layers hold. What the agent computes from the chain follows the state, not the
/// headers: a start points the headers back at the state's chain, a sync's map (here the
/// pending bytes, the same map) reads through the state's layers even with a header
/// rewritten under the running daemon, and a flatten (unmanage) keeps the newer data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_skips_a_layer_is_not_followed() {
    const KIB: u64 = 1 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir, vdir) = three_layer_volume(dir.path()).await;
    let path = |seq: u32| vdir.join(format!("L{seq}.qcow2"));
    // What a block-commit of L1 into L0 does to L2's header before the base is flushed.
    let name_l0 = |file: &Path| {
        let named = image::backing_of(file).unwrap().expect("a backing file");
        let mut bytes = std::fs::read(file).unwrap();
        let at = bytes.windows(named.len()).position(|w| w == named.as_bytes()).unwrap();
        let l0 = path(0);
        assert_eq!(l0.as_os_str().len(), named.len(), "L0 and L1 paths are the same length");
        bytes[at..at + named.len()].copy_from_slice(l0.to_str().unwrap().as_bytes());
        std::fs::write(file, bytes).unwrap();
    };
    name_l0(&path(2));
    assert_eq!(image::backing_of(&path(2)).unwrap().as_deref(), path(0).to_str());

    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::start(config, &state_dir, "a").await.unwrap();
    assert_eq!(
        image::backing_of(&path(2)).unwrap().as_deref(),
        path(1).to_str(),
        "the start pointed L2's header back at L1"
    );

    // Again, under the running daemon (a header rewritten in place, as the block job does).
    name_l0(&path(2));
    let pending = driver.pending_bytes("v").await.unwrap();
    assert_eq!(
        pending,
        Some(256 * KIB),
        "every data cluster of the chain the state holds (the header-following map finds 128 KiB)"
    );
    // A daemon killed there (as in a fold cut short): the restore points it back too.
    let pid = driver.daemon_pid().expect("a daemon");
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while driver.daemon_pid() == Some(pid) || image::backing_of(&path(2)).unwrap().as_deref() != path(1).to_str() {
        assert!(std::time::Instant::now() < deadline, "no restore pointed L2's header back at L1 within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let uri = driver.attach_volume("v").await.unwrap().uri;
    let reads = THREE_LAYER_READS;
    let mut args = vec!["-f", "raw"];
    for r in &reads {
        args.extend(["-c", *r]);
    }
    args.push(&uri);
    qemu_io(&args).unwrap_or_else(|e| panic!("the chain reads differently: {e}"));

    // A flatten commits each layer into the one its header names: aligned first, L2's
    // newer data stays on top of L1's.
    driver.unmanage_volume("v").await.unwrap();
    let image = pool.join("v.qcow2");
    assert_eq!(image::backing_of(&image).unwrap(), None, "the unmanaged image stands alone");
    let mut args = vec!["-f", "qcow2"];
    for r in &reads {
        args.extend(["-c", *r]);
    }
    let image = image.to_str().unwrap().to_string();
    args.push(&image);
    qemu_io(&args).unwrap_or_else(|e| panic!("the flattened image reads differently: {e}"));
}

/// The real window behind `a_header_that_skips_a_layer_is_not_followed`: a fold's block
/// job ends (QEMU points the header above the folded range at the base) and the daemon
/// is SIGKILLed before the agent flushes the base. After the restart the chain reads as
/// before, and the map a sync ships from still counts every cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_cut_short_by_a_daemon_kill_keeps_every_cluster_in_the_map() {
    const KIB: u64 = 1 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir, vdir) = three_layer_volume(dir.path()).await;
    let path = |seq: u32| vdir.join(format!("L{seq}.qcow2"));
    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::start(config, &state_dir, "a").await.unwrap();

    // The first half of `fold(v, 0, 1)`: the job, to its end.
    let v = driver.vol("v").unwrap();
    driver.daemon().start_commit("c0", &node(&v, 2), &node(&v, 1), &node(&v, 0)).await.unwrap();
    driver.wait_job("c0").await.unwrap();
    assert_eq!(
        image::backing_of(&path(2)).unwrap().as_deref(),
        path(0).to_str(),
        "the ended job pointed L2's header at the base (what this test is about)"
    );
    let pid = driver.daemon_pid().expect("a daemon");
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let base_map = image::map(&path(0)).await.unwrap();
    let base_lost = !base_map.iter().any(|e| e.data && e.start <= 1 << 20 && e.start + e.length > 1 << 20);
    eprintln!("after the kill, the base's own map lacks the folded clusters: {base_lost}");
    let uri = driver.attach_volume("v").await.unwrap().uri;
    let mut args = vec!["-f", "raw"];
    for r in THREE_LAYER_READS {
        args.extend(["-c", r]);
    }
    args.push(&uri);
    // Restored once a new daemon serves the volume again.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let read = qemu_io(&args);
        if driver.daemon_pid().is_some_and(|p| p != pid) && read.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the chain did not read as before within 30 s: {read:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The state still lists L1 (the fold never recorded its end): the map counts it.
    assert_eq!(driver.vol("v").unwrap().layers.len(), 3);
    assert_eq!(driver.pending_bytes("v").await.unwrap(), Some(256 * KIB));
    assert_eq!(image::backing_of(&path(2)).unwrap().as_deref(), path(1).to_str(), "the restore pointed L2 back at L1");
}

/// An unmanage cut short by a restart after it moved the flattened image out (the state
/// still lists the volume) completes on its retry, handing back the same image; a file
/// already at the destination is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmanage_cut_short_after_the_move_completes_on_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir) = (dir.path().join("pool"), dir.path().join("state"));
    std::fs::create_dir_all(state_dir.join("qemu")).unwrap();
    for v in ["v", "w"] {
        let vdir = pool.join("volumes").join(v);
        std::fs::create_dir_all(&vdir).unwrap();
        let l0 = vdir.join("L0.qcow2");
        image::create(&l0, 16 << 20, None).await.unwrap();
        qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 0 64k", l0.to_str().unwrap()]).unwrap();
    }
    let layer = || vec![Layer { seq: 0, rp: None, acked: false, rp_created_ms: 0 }];
    let state = State {
        next_index: 2,
        volumes: [
            ("v".to_string(), Vol::new(0, 16 << 20, layer(), None)),
            ("w".to_string(), Vol::new(1, 16 << 20, layer(), None)),
        ]
        .into(),
        clones: Default::default(),
        snapshots: Default::default(),
    };
    std::fs::write(state_dir.join("qemu/state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    // v: the image already moved out, the state not yet written (as a kill there leaves it).
    std::fs::rename(pool.join("volumes/v/L0.qcow2"), pool.join("v.qcow2")).unwrap();
    // w: someone's file where its image would go.
    std::fs::write(pool.join("w.qcow2"), b"not ours").unwrap();

    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::start(config, &state_dir, "a").await.unwrap();
    driver.unmanage_volume("v").await.expect("the retry completes");
    assert!(driver.vol("v").is_err(), "v is forgotten");
    assert!(!pool.join("volumes/v").exists(), "its directory is gone");
    let image = pool.join("v.qcow2");
    qemu_io(&["-f", "qcow2", "-c", "read -P 0x44 0 64k", image.to_str().unwrap()]).expect("the handed-back image");

    let e = driver.unmanage_volume("w").await.expect_err("a file in the way");
    assert!(e.to_string().contains("move that file away, then unmanage again"), "{e}");
    assert_eq!(std::fs::read(pool.join("w.qcow2")).unwrap(), b"not ours", "the file in the way is untouched");
    assert!(driver.vol("w").is_ok(), "w stays managed");
    let uri = driver.attach_volume("w").await.unwrap().uri;
    qemu_io(&["-f", "raw", "-c", "read -P 0x44 0 64k", &uri]).expect("w still serves its data");
}

/// A driver started with one replicated primary volume `v` of group `g` in its state,
/// holding its writes (fenced on return); with its directory and the volume's URI.
async fn held_primary() -> (tempfile::TempDir, Arc<QemuDriver>, String) {
    const MIB: u64 = 1 << 20;
    let (dir, pool, state_dir, vdir) = volume_dirs();
    let path = |seq: u32| vdir.join(format!("L{seq}.qcow2"));
    image::create(&path(0), 16 * MIB, None).await.unwrap();
    image::create(&path(1), 16 * MIB, Some(&path(0))).await.unwrap();
    let layers = vec![
        Layer { seq: 0, rp: Some("p0".into()), acked: true, rp_created_ms: 1 },
        Layer { seq: 1, rp: None, acked: false, rp_created_ms: 0 },
    ];
    save_replicated_primary(&state_dir, 16 * MIB, layers);

    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::open(config, &state_dir, "a", true).await.unwrap();
    let uri = driver.attach_volume("v").await.unwrap().uri;
    (dir, driver, uri)
}

/// Fenced on return, then moved away and back before a confirmation round: an agent that
/// started holding a group's writes, saw the group demoted here (a move away) and then
/// promoted here again (a forced failover back) serves writes on the promoted volume. The
/// promote is the orchestrator's confirmation; a hold left over from the start must not
/// export the new primary read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_ends_a_hold_left_from_the_agents_start() {
    let (_dir, driver, uri) = held_primary().await;
    let write = |pattern: &str| qemu_io(&["-f", "raw", "-c", &format!("write -P {pattern} 0 64k"), &uri]);
    assert!(write("0x21").is_err(), "a group held at start took a write");
    assert_eq!(driver.held_groups().len(), 1, "the group is held");

    // The move away demotes this side; no confirmation round runs before the promote.
    driver.demote("v").await.unwrap();
    assert!(driver.is_held("g"), "the hold is only forgotten by the next confirmation round");
    driver.promote("v", true).await.unwrap();
    assert!(!driver.is_held("g"), "the promote ended the hold");
    write("0x22").unwrap_or_else(|e| panic!("the promoted volume took no write: {e}"));
    qemu_io(&["-f", "raw", "-r", "-c", "read -P 0x22 0 64k", &uri]).unwrap();
}

/// Fenced on return, then disabled before a confirmation round: a volume that leaves its
/// group while held keeps its read-only export, and the group's hold is kept for it until
/// the orchestrator answers. Forgetting the hold then (as the agent did when no primary
/// of the group was left) left the volume read-only for good, through a later enable too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_disabled_while_held_serves_writes_once_released() {
    let (_dir, driver, uri) = held_primary().await;
    let write = |pattern: &str| qemu_io(&["-f", "raw", "-c", &format!("write -P {pattern} 0 64k"), &uri]);
    driver.disable_replication("v").await.unwrap();
    assert!(write("0x31").is_err(), "a volume held at start took a write before the orchestrator answered");
    let claims = driver.held_groups();
    assert_eq!(claims.len(), 1, "the hold outlives the disable");
    assert_eq!((claims[0].group_id.as_str(), claims[0].volume_ids.as_slice()), ("g", &["v".to_string()][..]));
    driver.release_group("g").await.unwrap();
    assert!(driver.held_groups().is_empty(), "released");
    write("0x32").unwrap_or_else(|e| panic!("the released volume took no write: {e}"));
    qemu_io(&["-f", "raw", "-r", "-c", "read -P 0x32 0 64k", &uri]).unwrap();
}

/// Fenced on return with a demote verdict for a group of two volumes, one of which was
/// disabled while held (so it can no longer be demoted): the other is demoted all the
/// same. Before, the first failure ended the demote, and the group's remaining primary
/// stayed a primary, held, for as long as the disabled volume kept the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demote_verdict_demotes_every_primary_it_can() {
    use drover_proto::v1 as pb;
    const MIB: u64 = 1 << 20;
    let (dir, pool, state_dir, _) = volume_dirs();
    let mut volumes = BTreeMap::new();
    for (index, id) in ["v", "w"].into_iter().enumerate() {
        let vdir = pool.join("volumes").join(id);
        std::fs::create_dir_all(&vdir).unwrap();
        let (l0, l1) = (vdir.join("L0.qcow2"), vdir.join("L1.qcow2"));
        image::create(&l0, 16 * MIB, None).await.unwrap();
        image::create(&l1, 16 * MIB, Some(&l0)).await.unwrap();
        let layers = vec![
            Layer { seq: 0, rp: Some("p0".into()), acked: true, rp_created_ms: 1 },
            Layer { seq: 1, rp: None, acked: false, rp_created_ms: 0 },
        ];
        let mut v = Vol::new(index as u32, 16 * MIB, layers, Some(Role::Primary));
        v.group_id = "g".into();
        v.peer = Some(PeerRec { backend: "b".into(), endpoint: "http://127.0.0.1:9".into() });
        v.interval_ms = 3_600_000;
        volumes.insert(id.to_string(), v);
    }
    let state = State { next_index: 2, volumes, clones: Default::default(), snapshots: Default::default() };
    std::fs::write(state_dir.join("qemu/state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    let config = QemuConfig { pool_dir: pool.clone(), ..Default::default() };
    let driver = QemuDriver::open(config, &state_dir, "a", true).await.unwrap();
    driver.disable_replication("v").await.unwrap();

    let ledger = drover_agent::ledger::Ledger::open(&dir.path().join("ledger")).unwrap();
    let fencing = drover_agent::returning::Fencing { driver: driver.clone(), ledger };
    let claims = fencing.claims();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert_eq!(claims[0].volume_ids, vec!["v".to_string(), "w".to_string()], "the disabled volume comes first");
    let demote = pb::PrimaryVerdict {
        group_id: "g".into(),
        decision: pb::PrimaryDecision::Demote as i32,
        epoch: 7,
        reason: "failed over away".into(),
    };
    let still_held = fencing.settle(&claims, vec![demote]).await;
    let w = driver.vol("w").unwrap();
    assert_eq!((w.role, w.demoted), (Some(Role::Secondary), true), "w is demoted");
    assert_eq!(driver.vol("v").unwrap().role, None, "v stays a plain volume");
    assert_eq!(still_held, 1, "v, which could not be demoted, still holds the group (read-only)");
}
