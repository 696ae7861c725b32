//! Driver-internal tests that need to build a chain by hand.

use super::*;

fn qemu_io(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("qemu-io").args(args).output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && !text.contains("Pattern verification failed") { Ok(text) } else { Err(text) }
}

/// A primary whose chain an older version left long (six points waiting for the peer)
/// starts with at most `MAX_WAITING` waiting, the newest point on top, and reads exactly
/// as before the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_chain_is_merged_at_start() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (pool, state_dir) = (dir.path().join("pool"), dir.path().join("state"));
    let vdir = pool.join("volumes").join("v");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::create_dir_all(state_dir.join("qemu")).unwrap();
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
    let mut v = Vol::new(0, 16 * MIB, layers, Some(Role::Primary));
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
