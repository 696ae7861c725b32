//! The qemu driver: volumes are qcow2 chains served by a supervised qemu-storage-daemon.
//!
//! # Layout
//!
//! A managed volume lives in `<pool>/volumes/<id>/` as a chain of layers `L<n>.qcow2`.
//! Anything else ending in `.qcow2` at the top of the pool is a manageable volume. The
//! driver's state (every volume's chain, role and sync record) is one JSON file, replaced
//! atomically (write, fsync, rename, fsync directory) on every change, so a group's
//! volumes always switch recovery points together.
//!
//! # Replication
//!
//! On the primary, the top layer is the active overlay that the writable NBD export
//! writes into, and the layer below it holds the last recovery point the peer
//! acknowledged. A sync:
//!
//! 1. creates an empty overlay per volume and records it (intent first: an empty overlay
//!    on top changes nothing if the next step never happens);
//! 2. in one QMP `transaction` of `blockdev-snapshot` actions, makes every volume's
//!    overlay the new active layer: the old active layers freeze at one instant, which is
//!    the crash-consistent recovery point;
//! 3. ships, per volume, exactly the clusters allocated in the frozen layers above the
//!    acknowledged one (`qemu-img map`, depth below that layer), read through a read-only
//!    NBD export of the frozen node, to the peer agent over gRPC;
//! 4. after the peer's acknowledgement, block-commits the frozen layers into the
//!    acknowledged one, so the chain is two layers again.
//!
//! The state's list of layers is the chain. The daemon opens each node with its backing
//! named, and the map of step 3 names every layer too (`image::map_chain`): a layer
//! file's own header may name another backing for a while, since the block job of step 4
//! rewrites the header above the folded range before the state drops the folded layers
//! (and a daemon killed before the base is flushed leaves clusters only those layers
//! hold). Before anything follows the headers offline (`qemu-img commit`, a node opened
//! with its backing from the image), they are pointed back at the state's chain
//! (`align_headers`).
//!
//! On the secondary, a recovery point is written into a new `*.partial` overlay on top of
//! the base point it is relative to (through a writable NBD export of that overlay),
//! flushed, fsynced and renamed; then one state write switches every volume of the group
//! to it. A crash before that write leaves the previous point as it was. Old replica
//! layers are merged offline (`qemu-img commit` and an unsafe rebase onto identical
//! data) so replica chains stay at most two layers long.
//!
//! # Snapshots
//!
//! A user snapshot freezes the active layers of its volumes in one QMP `transaction`, like
//! a recovery point, and pins the files each volume read through at that instant; the
//! housekeeping above merges only above the highest pinned layer. Volumes made from a
//! snapshot are chains on top of its files. See `snapshot.rs`.

mod chain;
mod clone;
mod commands;
mod daemon;
mod driver;
mod image;
mod manage;
mod nbd;
mod qmp;
mod snapshot;
mod source;
mod state;
mod target;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use nbd::{NbdAddr, NbdClient};

use daemon::{Daemon, DaemonPaths};
use drover_agent::driver::{
    AdoptSnapshot, ApplyHeader, Connection, Driver, DriverError, EnableSpec, GroupSnapshotInfo, Incoming, Manageable,
    ManageableSnapshot, ReplicationState, Role, ScheduledSync, SyncReport, VolumeState, capability,
};
use drover_agent::replica::{CHUNK_BYTES, Shipment};
use drover_agent::roles::{self, RoleFacts, Verdict};

/// The size of one NBD read of a shipping source, and so of one data chunk on the
/// replica stream and one NBD write on the target. Measured on the 1 GiB initial sync
/// (`--bench replication`): with 4 MiB requests the target's qemu-storage-daemon spent
/// about 2 CPU-seconds per GiB, with 1 MiB about 1; 256 KiB cost more per byte again in
/// the agents (more messages) and 2 MiB was erratic. See docs/performance.md.
const READ_BYTES: u64 = 1 << 20;
const _: () = assert!(READ_BYTES as usize <= CHUNK_BYTES);
/// NBD reads a source keeps in flight while shipping (16 MiB at [`READ_BYTES`]).
const READ_DEPTH: usize = 16;
/// Frozen points a primary keeps waiting for an unreachable peer before it stops
/// freezing new ones (see `source.rs`).
const MAX_WAITING: usize = 2;
/// NBD writes a target keeps in flight while applying.
const WRITE_DEPTH: usize = 16;

/// Qemu driver settings (the `[qemu]` table of the agent config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// Where volumes live; unmanaged `*.qcow2` files at its top are manageable.
    pub pool_dir: PathBuf,
    /// Serve NBD exports on this TCP address (HOST:PORT) instead of a unix socket.
    pub nbd_tcp: Option<String>,
    /// How long one QMP command may take; a daemon that does not answer in time is
    /// killed and restarted (its nodes and exports restored).
    #[serde(with = "humantime_serde")]
    pub qmp_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self { pool_dir: PathBuf::new(), nbd_tcp: None, qmp_timeout: Duration::from_secs(60) }
    }
}

use manage::{backing_of, check_reference, internal_snapshots};
use snapshot::check_id;
use state::{Layer, PeerRec, SnapMember, SnapRec, State, SyncStats, Vol};

/// The qemu-storage-daemon driver.
pub struct QemuDriver {
    pool: PathBuf,
    state_file: PathBuf,
    backend: String,
    state: Mutex<State>,
    persist_lock: tokio::sync::Mutex<()>,
    group_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    transfer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Incoming points being applied, per group: sending `true` makes the apply give up
    /// (a promote does, rather than wait for a source that may have stalled).
    applying: Mutex<HashMap<String, tokio::sync::watch::Sender<bool>>>,
    daemon: OnceLock<Arc<Daemon>>,
    /// The agent's fencing records: points shipped carry the group's highest epoch.
    fences: OnceLock<drover_agent::driver::Fences>,
    /// Fenced on return: groups whose primary volumes are exported read-only until the
    /// orchestrator confirms this side (see `drover_agent::returning`), each with the
    /// volumes it held at start. Those stay exported read-only until the group's hold
    /// ends, even if they leave the group meanwhile (a disable), so a hold never ends
    /// without their exports being made writable again.
    held: Mutex<BTreeMap<String, Vec<String>>>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn io(what: &str, e: std::io::Error) -> DriverError {
    DriverError::Internal(format!("{what}: {e}"))
}

fn node(v: &Vol, seq: u32) -> String {
    format!("v{}l{seq}", v.index)
}

/// A volume's own read-only node of the `i`th file of the snapshot it was made from.
fn origin_node(v: &Vol, i: usize) -> String {
    format!("o{}-{i}", v.index)
}

fn export_id(v: &Vol) -> String {
    format!("e{}", v.index)
}

fn nbd_err(e: nbd::NbdError) -> DriverError {
    DriverError::Unavailable(format!("NBD: {e}"))
}

fn not_found(id: &str) -> DriverError {
    DriverError::NotFound(format!("volume {id} does not exist on this qemu backend"))
}

fn fsync_dir(dir: &Path) -> Result<(), DriverError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("fsync of a directory", e))
}

impl QemuDriver {
    /// Opens the pool and state, starts (or takes over) the daemon and restores every
    /// writable volume's nodes and exports.
    pub async fn start(config: QemuConfig, state_dir: &Path, backend: &str) -> Result<Arc<Self>, DriverError> {
        Self::open(config, state_dir, backend, false).await
    }

    /// [`QemuDriver::start`]; with `hold`, every replicated group this side is primary
    /// for is exported read-only until [`Driver::release_group`] (fenced on return).
    pub async fn open(
        config: QemuConfig,
        state_dir: &Path,
        backend: &str,
        hold: bool,
    ) -> Result<Arc<Self>, DriverError> {
        if config.pool_dir.as_os_str().is_empty() {
            return Err(DriverError::InvalidArgument("`qemu.pool_dir` is required".into()));
        }
        let qdir = state_dir.join("qemu");
        for d in [&config.pool_dir.join("volumes"), &qdir] {
            std::fs::create_dir_all(d).map_err(|e| io(&format!("cannot create {}", d.display()), e))?;
        }
        let state_file = qdir.join("state.json");
        let state: State = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| DriverError::Internal(format!("{} is corrupt: {e}", state_file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io("cannot read the driver state", e)),
        };
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if hold {
            for (id, v) in &state.volumes {
                if v.role == Some(Role::Primary) && v.peer.is_some() && !v.group_id.is_empty() {
                    held.entry(v.group_id.clone()).or_default().push(id.clone());
                }
            }
        }
        if !held.is_empty() {
            let groups: Vec<&String> = held.keys().collect();
            tracing::warn!(
                ?groups,
                "fenced on return: writes held until an orchestrator confirms this side is still primary"
            );
        }
        let driver = Arc::new(Self {
            pool: config.pool_dir.canonicalize().map_err(|e| io("pool_dir", e))?,
            state_file,
            backend: backend.to_string(),
            state: Mutex::new(state),
            persist_lock: tokio::sync::Mutex::new(()),
            group_locks: Mutex::new(HashMap::new()),
            transfer_locks: Mutex::new(HashMap::new()),
            applying: Mutex::new(HashMap::new()),
            daemon: OnceLock::new(),
            fences: OnceLock::new(),
            held: Mutex::new(held),
        });
        driver.collect_garbage();
        driver.merge_waiting().await;
        let nbd = match &config.nbd_tcp {
            Some(addr) => NbdAddr::Tcp(addr.clone()),
            None => NbdAddr::Unix(qdir.join("nbd.sock")),
        };
        let paths = DaemonPaths {
            qmp_socket: qdir.join("qmp.sock"),
            nbd,
            pidfile: qdir.join("qsd.pid"),
            log: qdir.join("qemu-storage-daemon.log"),
        };
        let weak = Arc::downgrade(&driver);
        let restore: daemon::Restore = Arc::new(move || {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(d) = weak.upgrade() {
                    d.restore().await;
                }
            })
        });
        let daemon = Daemon::start(paths, restore, config.qmp_timeout).await?;
        let _ = driver.daemon.set(daemon);
        driver.restore().await;
        Ok(driver)
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.get().expect("daemon started")
    }

    /// The daemon's pid, for tests that kill it.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.get().and_then(|d| d.pid())
    }

    fn vol_dir(&self, id: &str) -> PathBuf {
        self.pool.join("volumes").join(id)
    }

    fn layer_path(&self, id: &str, seq: u32) -> PathBuf {
        self.vol_dir(id).join(format!("L{seq}.qcow2"))
    }

    /// Records a new volume whose single layer `L0.qcow2` is in place, and exports it.
    /// `snapshots` (adopted with a managed image) are recorded with it, in one update.
    pub(crate) async fn add_volume(
        &self,
        volume_id: &str,
        size_bytes: u64,
        snapshots: Vec<(String, state::SnapRec)>,
    ) -> Result<VolumeState, DriverError> {
        let v = self
            .update(|st| {
                let v = Vol::new(st.next_index, size_bytes, vec![Layer::fresh()], None);
                st.next_index += 1;
                st.volumes.insert(volume_id.to_string(), v.clone());
                st.snapshots.extend(snapshots.clone());
                Ok(v)
            })
            .await?;
        self.open_chain(volume_id, &v).await?;
        Ok(Self::view(volume_id, &v))
    }

    /// Takes an unreplicated volume out of the daemon before it is deleted or handed
    /// back; `None` when it does not exist (already gone).
    pub(crate) async fn close_unreplicated(&self, volume_id: &str) -> Result<Option<Vol>, DriverError> {
        let Ok(v) = self.vol(volume_id) else { return Ok(None) };
        if v.role.is_some() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is replicated; disable replication first"
            )));
        }
        self.close_chain(&v).await?;
        Ok(Some(v))
    }

    pub(crate) fn view(id: &str, v: &Vol) -> VolumeState {
        VolumeState { volume_id: id.to_string(), size_bytes: v.size_bytes, role: v.role }
    }

    pub(crate) async fn lock_for(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let group = self.vol(id).ok().map(|v| v.group_id).filter(|g| !g.is_empty())?;
        Some(self.group_lock(&group).lock_owned().await)
    }
}

/// The qemu backend, for the list of backends the `drover` binary can drive.
pub struct QemuBackend;

#[async_trait]
impl drover_agent::launch::Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn open(
        &self,
        config: &drover_config::Layered,
        common: &drover_agent::config::AgentConfig,
    ) -> Result<Arc<dyn Driver>, drover_agent::launch::LaunchError> {
        use drover_agent::launch::LaunchError;
        let qemu: QemuConfig = config.section("qemu")?;
        if qemu.pool_dir.as_os_str().is_empty() {
            return Err(drover_config::ConfigError::Invalid(
                "the qemu driver needs `qemu.pool_dir` (--pool-dir, or DROVER_AGENT_QEMU__POOL_DIR)".into(),
            )
            .into());
        }
        let failed = |message: String| LaunchError::Driver { driver: "qemu".into(), message };
        std::fs::create_dir_all(&qemu.pool_dir)
            .map_err(|e| failed(format!("cannot create the pool {}: {e}", qemu.pool_dir.display())))?;
        let driver = QemuDriver::open(
            qemu,
            &common.state_dir,
            &common.backend,
            common.fence_on_return && common.orchestrator.is_some(),
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        Ok(driver)
    }
}
