//! A full copy whose source chain has a layer header that skips a layer (what a fold cut
//! short by a daemon kill leaves: the block job points the header above the folded range
//! at the base before the base is flushed) still ships every cluster the chain holds.
//! Two qemu agents in this process (real daemons and agent servers), driven through the
//! driver API; `qemu-io` writes at the source and verifies at the target.

use drover_agent::driver::Driver;
use drover_tests::cluster::qemu_io;
use drover_tests::qemu_pair::{agent, replicate};

const MIB: u64 = 1 << 20;

fn io(uri: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io(uri, &cmds).unwrap_or_else(|e| panic!("{e}"));
}

/// The layers of volume `v` in agent `name`'s state, bottom first.
fn layer_files(dir: &std::path::Path, name: &str) -> Vec<std::path::PathBuf> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("state-{name}/qemu/state.json"))).unwrap()).unwrap();
    let vdir = dir.join(format!("pool-{name}/volumes/v")).canonicalize().unwrap();
    state["volumes"]["v"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| vdir.join(format!("L{}.qcow2", l["seq"].as_u64().unwrap())))
        .collect()
}

/// Rewrites, in place, the backing file name in `file`'s qcow2 header to `to` (same
/// length), as QEMU's block-commit does to the layer above the range it commits.
fn point_header_at(file: &std::path::Path, to: &std::path::Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let offset = u64::from_be_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let to = to.to_str().unwrap().as_bytes();
    assert_eq!(to.len(), len, "the new backing name is as long as the old one");
    bytes[offset..offset + len].copy_from_slice(to);
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_copy_ships_the_layers_a_stale_header_skips() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _a_ep, _a_stop) = agent(dir.path(), "a").await;
    let (b, b_ep, _b_stop) = agent(dir.path(), "b").await;
    a.create_volume("v", 16 * MIB).await.unwrap();
    let vols = ["v".to_string()];
    let uri = a.attach_volume("v").await.unwrap().uri;
    io(&uri, &["write -P 0x11 0 64k"]);
    replicate(&a, &b, &b_ep, "g", &vols, 16 * MIB, 3_600_000).await;
    a.sync_group("g", false, None).await.expect("initial sync");

    // A middle layer that no fold touches: a snapshot pins the layers it reads through.
    io(&uri, &["write -P 0x22 1M 192k"]);
    a.create_group_snapshot("s1", &vols).await.unwrap();
    let uri = a.attach_volume("v").await.unwrap().uri;
    io(&uri, &["write -P 0x33 1088k 64k"]);
    let layers = layer_files(dir.path(), "a");
    assert!(layers.len() >= 3, "base, the snapshot's layer, the active layer: {layers:?}");
    let (base, top) = (&layers[0], &layers[layers.len() - 1]);
    // The active layer's header now skips every layer above the base (the daemon still
    // reads the chain the state lists).
    point_header_at(top, base);

    // Disable and enable again: the first sync is a full copy.
    a.disable_replication("v").await.unwrap();
    b.disable_replication("v").await.unwrap();
    replicate(&a, &b, &b_ep, "g", &vols, 16 * MIB, 3_600_000).await;
    let report = a.sync_group("g", false, None).await.expect("full copy");
    assert!(report.full, "the first sync after an enable copies everything");

    // Every acknowledged write is at B.
    b.promote("v", true).await.unwrap();
    let at_b = b.attach_volume("v").await.unwrap().uri;
    io(&at_b, &["read -P 0x11 0 64k", "read -P 0x22 1M 64k", "read -P 0x33 1088k 64k", "read -P 0x22 1152k 64k"]);
}
