//! Two qemu agents in this process, each with its own qemu-storage-daemon and a real
//! agent server (replica stream and sync scheduler), for the data-plane benchmarks.

use std::path::Path;
use std::sync::Arc;

use drover_agent::driver::{Driver, EnableSpec, Peer, Role};
use drover_agent::ledger::Ledger;
use drover_agent_qemu::{QemuConfig, QemuDriver};
use tokio_util::sync::CancellationToken;

/// Starts agent `name` under `dir`; returns its driver, its endpoint and the token that
/// stops its server. Plain text: the benchmarks compare with tools that use no TLS.
pub async fn agent(dir: &Path, name: &str) -> (Arc<QemuDriver>, String, CancellationToken) {
    let pool = dir.join(format!("pool-{name}"));
    std::fs::create_dir_all(&pool).unwrap();
    let state = dir.join(format!("state-{name}"));
    let driver = QemuDriver::start(QemuConfig { pool_dir: pool, ..Default::default() }, &state, name).await.unwrap();
    let ledger = Ledger::open(&state.join("ledger.log")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = CancellationToken::new();
    let running =
        drover_agent::server::serve(driver.clone(), ledger, None, listener, None, token.clone()).await.unwrap();
    (driver, format!("http://{}", running.local_addr), token)
}

/// Enables replication of `vols` (of `size` bytes) in `group` from `src` (backend `a`) to
/// `dst` (backend `b`, at `dst_ep`), with a sync every `interval_ms`.
pub async fn replicate(
    src: &QemuDriver,
    dst: &QemuDriver,
    dst_ep: &str,
    group: &str,
    vols: &[String],
    size: u64,
    interval_ms: u64,
) {
    for v in vols {
        for (d, role, peer) in [(dst, Role::Secondary, "a"), (src, Role::Primary, "b")] {
            d.enable_replication(&EnableSpec {
                volume_id: v.clone(),
                group_id: group.into(),
                role,
                peer: Peer { backend: peer.into(), endpoint: dst_ep.into() },
                size_bytes: size,
                interval_ms: Some(interval_ms),
            })
            .await
            .unwrap();
        }
    }
}

/// Runs `qemu-io` (raw, on an NBD URI) with the given commands.
pub fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(uri).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
