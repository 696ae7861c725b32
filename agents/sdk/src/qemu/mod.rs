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
//! On the secondary, a recovery point is written into a new `*.partial` overlay on top of
//! the base point it is relative to (through a writable NBD export of that overlay),
//! flushed, fsynced and renamed; then one state write switches every volume of the group
//! to it. A crash before that write leaves the previous point as it was. Old replica
//! layers are merged offline (`qemu-img commit` and an unsafe rebase onto identical
//! data) so replica chains stay at most two layers long.

mod daemon;
mod image;
mod nbd;
mod qmp;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use nbd::{NbdAddr, NbdClient};

use crate::driver::{
    ApplyHeader, Connection, Driver, DriverError, EnableSpec, GroupSnapshotInfo, Incoming, Manageable,
    ReplicationState, Role, SyncReport, VolumeState, capability,
};
use crate::replica::{CHUNK_BYTES, Shipment};
use daemon::{Daemon, DaemonPaths};

/// NBD reads a source keeps in flight while shipping.
const READ_DEPTH: usize = 4;
/// NBD writes a target keeps in flight while applying.
const WRITE_DEPTH: usize = 4;

/// Qemu driver settings (the `[qemu]` table of the agent config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// Where volumes live; unmanaged `*.qcow2` files at its top are manageable.
    pub pool_dir: PathBuf,
    /// Serve NBD exports on this TCP address (HOST:PORT) instead of a unix socket.
    pub nbd_tcp: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Layer {
    seq: u32,
    /// The recovery point this layer completes, once frozen.
    rp: Option<String>,
    /// Whether the peer holds this point.
    acked: bool,
    #[serde(default)]
    rp_created_ms: i64,
}

impl Layer {
    /// An empty, active layer.
    fn fresh() -> Self {
        Self { seq: 0, rp: None, acked: false, rp_created_ms: 0 }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PeerRec {
    backend: String,
    endpoint: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SyncStats {
    rp_created_ms: i64,
    duration_ms: u64,
    bytes: u64,
    error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Vol {
    index: u32,
    size_bytes: u64,
    layers: Vec<Layer>,
    role: Option<Role>,
    #[serde(default)]
    group_id: String,
    #[serde(default)]
    peer: Option<PeerRec>,
    #[serde(default)]
    interval_ms: u64,
    #[serde(default)]
    demoted: bool,
    #[serde(default)]
    peer_demoted: bool,
    /// The operator allowed the next recovery point to discard local changes.
    #[serde(default)]
    discard_allowed: bool,
    #[serde(default)]
    last: SyncStats,
}

impl Vol {
    /// A volume not (yet) replicated, or a fresh replica when `role` is secondary.
    fn new(index: u32, size_bytes: u64, layers: Vec<Layer>, role: Option<Role>) -> Self {
        Self {
            index,
            size_bytes,
            layers,
            role,
            group_id: String::new(),
            peer: None,
            interval_ms: 0,
            demoted: role == Some(Role::Secondary),
            peer_demoted: false,
            discard_allowed: false,
            last: SyncStats::default(),
        }
    }

    fn top(&self) -> &Layer {
        self.layers.last().expect("a volume has at least one layer")
    }

    /// Index of the newest layer the peer holds.
    fn acked_index(&self) -> Option<usize> {
        self.layers.iter().rposition(|l| l.acked)
    }

    /// Whether this side serves writes.
    fn writable(&self) -> bool {
        self.role != Some(Role::Secondary) && !self.layers.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    next_index: u32,
    volumes: BTreeMap<String, Vol>,
}

/// The qemu-storage-daemon driver.
pub struct QemuDriver {
    pool: PathBuf,
    state_file: PathBuf,
    backend: String,
    state: Mutex<State>,
    persist_lock: tokio::sync::Mutex<()>,
    group_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    daemon: OnceLock<Arc<Daemon>>,
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
        let driver = Arc::new(Self {
            pool: config.pool_dir.canonicalize().map_err(|e| io("pool_dir", e))?,
            state_file,
            backend: backend.to_string(),
            state: Mutex::new(state),
            persist_lock: tokio::sync::Mutex::new(()),
            group_locks: Mutex::new(HashMap::new()),
            daemon: OnceLock::new(),
        });
        driver.collect_garbage();
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
        let daemon = Daemon::start(paths, restore).await?;
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

    fn snapshot_state(&self) -> State {
        self.state.lock().expect("state poisoned").clone()
    }

    fn vol(&self, id: &str) -> Result<Vol, DriverError> {
        self.state.lock().expect("state poisoned").volumes.get(id).cloned().ok_or_else(|| not_found(id))
    }

    /// Applies `f` to the state and writes it durably.
    async fn update<T>(&self, f: impl FnOnce(&mut State) -> Result<T, DriverError>) -> Result<T, DriverError> {
        // Writers are serialised by the persist lock, so the clone below is the newest
        // state; memory takes the new state only once the disk has it.
        let _serial = self.persist_lock.lock().await;
        let mut next = self.snapshot_state();
        let out = f(&mut next)?;
        let bytes = serde_json::to_vec_pretty(&next).expect("state serialises");
        let tmp = self.state_file.with_extension("json.tmp");
        let path = self.state_file.clone();
        tokio::task::spawn_blocking(move || -> Result<(), DriverError> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("state write", e))?;
            f.write_all(&bytes).map_err(|e| io("state write", e))?;
            f.sync_all().map_err(|e| io("state fsync", e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io("state rename", e))?;
            fsync_dir(path.parent().expect("state dir"))
        })
        .await
        .map_err(|e| DriverError::Internal(e.to_string()))??;
        *self.state.lock().expect("state poisoned") = next;
        Ok(out)
    }

    fn group_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.group_locks.lock().expect("group locks poisoned").entry(group.to_string()).or_default().clone()
    }

    /// Removes partial transfers and layer files no volume refers to.
    fn collect_garbage(&self) {
        let st = self.snapshot_state();
        let Ok(dirs) = std::fs::read_dir(self.pool.join("volumes")) else { return };
        for dir in dirs.flatten() {
            let id = dir.file_name().to_string_lossy().into_owned();
            let keep: Vec<String> = st
                .volumes
                .get(&id)
                .map(|v| v.layers.iter().map(|l| format!("L{}.qcow2", l.seq)).collect())
                .unwrap_or_default();
            if !st.volumes.contains_key(&id) {
                continue;
            }
            for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    tracing::info!(volume = %id, file = %name, "removing a leftover layer file");
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    /// Opens a volume's chain in the daemon and, when it serves writes, exports it.
    async fn open_chain(&self, id: &str, v: &Vol) -> Result<(), DriverError> {
        let d = self.daemon();
        let mut below: Option<String> = None;
        for l in &v.layers {
            let mut args = json!({
                "driver": "qcow2",
                "node-name": node(v, l.seq),
                "file": {"driver": "file", "filename": self.layer_path(id, l.seq)},
            });
            args["backing"] = match &below {
                Some(b) => json!(b),
                None => serde_json::Value::Null,
            };
            match d.qmp("blockdev-add", args).await {
                Ok(_) => {}
                Err(DriverError::Internal(m)) if m.contains("Duplicate") || m.contains("already") => {}
                Err(e) => return Err(e),
            }
            below = Some(node(v, l.seq));
        }
        if v.writable() {
            self.export(id, v).await?;
        }
        Ok(())
    }

    async fn export(&self, id: &str, v: &Vol) -> Result<(), DriverError> {
        let args =
            json!({"type": "nbd", "id": export_id(v), "node-name": node(v, v.top().seq), "name": id, "writable": true});
        match self.daemon().qmp("block-export-add", args).await {
            Ok(_) => Ok(()),
            Err(DriverError::Internal(m)) if m.contains("already") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn unexport(&self, v: &Vol) -> Result<(), DriverError> {
        self.daemon().qmp_lenient("block-export-del", json!({"id": export_id(v), "mode": "hard"})).await?;
        // The export goes away asynchronously; wait until its node is free.
        for _ in 0..100 {
            let exports = self.daemon().qmp("query-block-exports", json!({})).await?;
            if !exports.as_array().is_some_and(|a| a.iter().any(|e| e["id"] == export_id(v))) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(DriverError::Unavailable(format!("export of volume index {} did not go away", v.index)))
    }

    /// Removes a volume's exports and nodes from the daemon (files stay).
    async fn close_chain(&self, v: &Vol) -> Result<(), DriverError> {
        self.unexport(v).await?;
        for l in v.layers.iter().rev() {
            self.daemon().qmp_lenient("blockdev-del", json!({"node-name": node(v, l.seq)})).await?;
        }
        Ok(())
    }

    /// Re-creates nodes and exports after a (re)start of the daemon.
    async fn restore(&self) {
        let st = self.snapshot_state();
        for (id, v) in &st.volumes {
            if v.role == Some(Role::Secondary) || v.layers.is_empty() {
                continue;
            }
            if let Err(e) = self.open_chain(id, v).await {
                tracing::error!(volume = %id, error = %e, "cannot restore volume in qemu-storage-daemon");
            }
        }
    }

    /// Runs a block job to its end and reports its error, if any.
    async fn wait_job(&self, job: &str) -> Result<(), DriverError> {
        loop {
            let jobs = self.daemon().qmp("query-jobs", json!({})).await?;
            let Some(j) = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == job)).cloned() else {
                return Ok(());
            };
            if j["status"] == "concluded" {
                self.daemon().qmp_lenient("job-dismiss", json!({"id": job})).await?;
                if let Some(err) = j.get("error").and_then(|e| e.as_str()) {
                    return Err(DriverError::Internal(format!("block job {job} failed: {err}")));
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads the listed extents of a frozen node and ships them.
    async fn ship_volume(
        &self,
        ship: &Shipment,
        id: &str,
        v: &Vol,
        frozen: usize,
        full: bool,
    ) -> Result<u64, DriverError> {
        let acked = v.acked_index();
        let frozen_seq = v.layers[frozen].seq;
        // Depth counts down from the frozen layer: everything above the acknowledged layer
        // changed since the peer's point.
        let changed_depth = match (full, acked) {
            (false, Some(a)) => (frozen - a) as u32,
            _ => u32::MAX,
        };
        let extents = image::map(&self.layer_path(id, frozen_seq)).await?;
        let export = format!("rp-{id}");
        let rid = format!("r{}", v.index);
        self.daemon()
            .qmp(
                "block-export-add",
                json!({"type": "nbd", "id": rid, "node-name": node(v, frozen_seq), "name": export, "writable": false}),
            )
            .await?;
        // Reading from the daemon and sending to the peer overlap: a reader fills a small
        // queue of chunks while the sender drains it.
        let result = async {
            let mut client = NbdClient::connect(self.daemon().nbd(), &export).await.map_err(nbd_err)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Option<Vec<u8>>, u64)>(4);
            let reader = async {
                for e in extents.iter().filter(|e| e.depth < changed_depth) {
                    if e.data {
                        // Up to READ_DEPTH chunks in flight on the NBD connection at once.
                        let mut off = e.start;
                        while off < e.start + e.length {
                            let mut batch = Vec::new();
                            while off < e.start + e.length && batch.len() < READ_DEPTH {
                                let n = (e.start + e.length - off).min(CHUNK_BYTES as u64) as u32;
                                batch.push((off, n));
                                off += u64::from(n);
                            }
                            let datas = client.read_many(&batch).await.map_err(nbd_err)?;
                            for ((o, _), data) in batch.iter().zip(datas) {
                                if tx.send((*o, Some(data), 0)).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                    } else if e.zero && e.present && !full {
                        // Zeroed in the delta: it must hide what the peer's base holds there.
                        if tx.send((e.start, None, e.length)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                drop(tx);
                Ok::<(), DriverError>(())
            };
            let sender = async {
                // Owned here, so that a failed send closes the queue and stops the reader.
                let mut rx = rx;
                let mut bytes = 0u64;
                let total: u64 = extents.iter().filter(|e| e.depth < changed_depth && e.data).map(|e| e.length).sum();
                let mut reported = 0u64;
                while let Some((off, data, len)) = rx.recv().await {
                    match data {
                        Some(d) => {
                            bytes += d.len() as u64;
                            ship.data(id, off, d).await?;
                            // Progress of long transfers, every 256 MiB.
                            if bytes - reported >= 256 << 20 {
                                reported = bytes;
                                tracing::info!(
                                    volume = id,
                                    shipped = bytes,
                                    of = total,
                                    "recovery point transfer progress"
                                );
                            }
                        }
                        None => ship.zero(id, off, len).await?,
                    }
                }
                Ok::<u64, DriverError>(bytes)
            };
            let (read, sent) = tokio::join!(reader, sender);
            read?;
            let bytes = sent?;
            client.disconnect().await;
            Ok::<u64, DriverError>(bytes)
        }
        .await;
        self.daemon().qmp_lenient("block-export-del", json!({"id": rid, "mode": "hard"})).await?;
        result
    }

    async fn do_sync(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError> {
        let started = Instant::now();
        let (ids, endpoint) = {
            let st = self.state.lock().expect("state poisoned");
            let ids: Vec<String> = st
                .volumes
                .iter()
                .filter(|(_, v)| v.group_id == group_id && v.role == Some(Role::Primary) && !v.demoted)
                .map(|(id, _)| id.clone())
                .collect();
            let endpoint = peer_endpoint
                .map(String::from)
                .or_else(|| ids.first().and_then(|id| st.volumes[id].peer.as_ref().map(|p| p.endpoint.clone())))
                .unwrap_or_default();
            (ids, endpoint)
        };
        if ids.is_empty() {
            return Err(DriverError::FailedPrecondition(format!(
                "no primary volume of group {group_id} on this backend; sync runs on the active side"
            )));
        }
        if let Some(ep) = peer_endpoint {
            self.update(|st| {
                for id in &ids {
                    if let Some(p) = st.volumes.get_mut(id).and_then(|v| v.peer.as_mut()) {
                        p.endpoint = ep.to_string();
                    }
                }
                Ok(())
            })
            .await?;
        }
        if final_sync {
            // Stop writes: the final point must hold everything the volumes ever acknowledged.
            for id in &ids {
                self.unexport(&self.vol(id)?).await?;
            }
        }
        let vols: Vec<Vol> = ids.iter().map(|id| self.vol(id)).collect::<Result<_, _>>()?;
        let bases: Vec<Option<String>> =
            vols.iter().map(|v| v.acked_index().and_then(|i| v.layers[i].rp.clone())).collect();
        let base_rp = match bases.first() {
            Some(Some(b)) if bases.iter().all(|x| x.as_deref() == Some(b.as_str())) => b.clone(),
            _ => String::new(),
        };
        let full = base_rp.is_empty();
        let rp_id = uuid::Uuid::now_v7().to_string();
        let created = now_ms();

        // 1. Empty overlays, recorded before the snapshot (intent first).
        let mut new_seqs = Vec::new();
        for (id, v) in ids.iter().zip(&vols) {
            let seq = v.top().seq + 1;
            image::create(&self.layer_path(id, seq), v.size_bytes, Some(&self.layer_path(id, v.top().seq))).await?;
            new_seqs.push(seq);
        }
        self.update(|st| {
            for (id, seq) in ids.iter().zip(&new_seqs) {
                let v = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                let top = v.layers.last_mut().expect("layers");
                top.rp = Some(rp_id.clone());
                top.rp_created_ms = created;
                v.layers.push(Layer { seq: *seq, rp: None, acked: false, rp_created_ms: 0 });
            }
            Ok(())
        })
        .await?;

        // 2. One transaction freezes every volume at the same instant.
        let mut actions = Vec::new();
        for ((id, v), seq) in ids.iter().zip(&vols).zip(&new_seqs) {
            self.daemon()
                .qmp(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": node(v, *seq), "backing": null,
                           "file": {"driver": "file", "filename": self.layer_path(id, *seq)}}),
                )
                .await?;
            actions.push(
                json!({"type": "blockdev-snapshot", "data": {"node": node(v, v.top().seq), "overlay": node(v, *seq)}}),
            );
        }
        let frozen_at = Instant::now();
        self.daemon().qmp("transaction", json!({"actions": actions})).await?;
        let snapshot_pause_us = frozen_at.elapsed().as_micros() as u64;
        tracing::debug!(group = group_id, snapshot_pause_us, volumes = ids.len(), "group frozen");

        // 3. Ship the delta (or everything, without a common point).
        let vols: Vec<Vol> = ids.iter().map(|id| self.vol(id)).collect::<Result<_, _>>()?;
        let header = ApplyHeader {
            group_id: group_id.to_string(),
            recovery_point_id: rp_id.clone(),
            base_recovery_point_id: base_rp.clone(),
            volumes: ids.iter().zip(&vols).map(|(id, v)| (id.clone(), v.size_bytes)).collect(),
            final_sync,
            source_backend: self.backend.clone(),
            created_at_ms: created,
        };
        let shipped = async {
            let ship = Shipment::open(&endpoint, &header).await?;
            let mut bytes = Vec::new();
            for (id, v) in ids.iter().zip(&vols) {
                match self.ship_volume(&ship, id, v, v.layers.len() - 2, full).await {
                    Ok(b) => bytes.push(b),
                    Err(e) => return Err(ship.fail(e).await),
                }
            }
            ship.commit().await?;
            Ok::<Vec<u64>, DriverError>(bytes)
        }
        .await;
        let per_volume = match shipped {
            Ok(b) => b,
            Err(e) => {
                let msg = e.to_string();
                let _ = self
                    .update(|st| {
                        for id in &ids {
                            if let Some(v) = st.volumes.get_mut(id) {
                                v.last.error = msg.clone();
                            }
                        }
                        Ok(())
                    })
                    .await;
                if final_sync {
                    // Writes resume until a planned failover can finish.
                    for id in &ids {
                        let v = self.vol(id)?;
                        let _ = self.export(id, &v).await;
                    }
                }
                return Err(e);
            }
        };

        // 4. The peer holds the point. Record that first, so that housekeeping trouble
        //    below never makes the next sync start from an older base than the peer has.
        let total: u64 = per_volume.iter().sum();
        let elapsed = started.elapsed().as_millis() as u64;
        self.update(|st| {
            for (id, bytes) in ids.iter().zip(&per_volume) {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                let n = sv.layers.len();
                let frozen = &mut sv.layers[n - 2];
                frozen.acked = true;
                sv.last =
                    SyncStats { rp_created_ms: created, duration_ms: elapsed, bytes: *bytes, error: String::new() };
            }
            Ok(())
        })
        .await?;
        //    Then fold everything below the active layer into the bottom one: the chain is
        //    two layers again, the bottom holding the point the peer has.
        for (id, v) in ids.iter().zip(&vols) {
            let frozen = v.layers.len() - 2;
            if frozen > 0 {
                let job = format!("c{}", v.index);
                self.daemon()
                    .qmp(
                        "block-commit",
                        json!({"job-id": job, "device": node(v, v.top().seq), "top-node": node(v, v.layers[frozen].seq),
                               "base-node": node(v, v.layers[0].seq), "auto-dismiss": false}),
                    )
                    .await?;
                self.wait_job(&job).await?;
                // Top down: a node still serves as the backing of the one above it.
                for l in v.layers[1..=frozen].iter().rev() {
                    self.daemon().qmp_lenient("blockdev-del", json!({"node-name": node(v, l.seq)})).await?;
                }
            }
            let dropped: Vec<u32> = v.layers[1..=frozen].iter().map(|l| l.seq).collect();
            self.update(|st| {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                sv.layers.retain(|l| !dropped.contains(&l.seq));
                let b = &mut sv.layers[0];
                b.rp = Some(rp_id.clone());
                b.acked = true;
                b.rp_created_ms = created;
                Ok(())
            })
            .await?;
            for seq in dropped {
                let _ = std::fs::remove_file(self.layer_path(id, seq));
            }
        }

        // 5. A final sync ends with this side demoted to a clean secondary at the point.
        if final_sync {
            for id in &ids {
                let v = self.vol(id)?;
                self.close_chain(&v).await?;
                let active = v.top().seq;
                self.update(|st| {
                    let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                    sv.layers.retain(|l| l.seq != active);
                    sv.role = Some(Role::Secondary);
                    sv.demoted = true;
                    sv.peer_demoted = false;
                    Ok(())
                })
                .await?;
                let _ = std::fs::remove_file(self.layer_path(id, active));
            }
        }
        Ok(SyncReport {
            recovery_point_id: rp_id,
            bytes: total,
            duration_ms: started.elapsed().as_millis() as u64,
            created_at_ms: created,
            full,
            snapshot_pause_us,
        })
    }

    async fn do_apply(
        &self,
        header: &ApplyHeader,
        incoming: &mut tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError> {
        // Where each volume's new point goes: on top of the layer holding the base point.
        struct Target {
            id: String,
            v: Vol,
            keep: usize,
            seq: u32,
            partial: PathBuf,
            client: Option<NbdClient>,
        }
        let mut targets = Vec::new();
        for (id, size) in &header.volumes {
            let v = self.vol(id)?;
            if v.role != Some(Role::Secondary) {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {id} is not a secondary on this backend; refusing a recovery point from {} (a failback reprotects first)",
                    header.source_backend
                )));
            }
            let local_changes = v.layers.iter().any(|l| l.rp.is_none());
            let keep = if header.base_recovery_point_id.is_empty() {
                if local_changes && !v.discard_allowed {
                    return Err(DriverError::FailedPrecondition(format!(
                        "volume {id} holds local changes; a full copy would discard them without the operator's consent"
                    )));
                }
                0
            } else {
                let Some(i) =
                    v.layers.iter().position(|l| l.rp.as_deref() == Some(header.base_recovery_point_id.as_str()))
                else {
                    return Err(DriverError::FailedPrecondition(format!(
                        "replica of {id} does not hold base recovery point {}; a full copy is needed",
                        header.base_recovery_point_id
                    )));
                };
                // Points received after the base (acknowledged, from this pair's common
                // history) are superseded by a delta relative to the base: dropping them loses
                // nothing. Local changes are another matter: they go only with consent.
                let only_received = v.layers[i + 1..].iter().all(|l| l.rp.is_some() && l.acked);
                if i + 1 != v.layers.len() && !only_received && !v.discard_allowed {
                    return Err(DriverError::FailedPrecondition(format!(
                        "volume {id} holds changes after recovery point {}; resync (failback with --discard-changes-on) first",
                        header.base_recovery_point_id
                    )));
                }
                i + 1
            };
            let seq = v.layers.iter().map(|l| l.seq).max().map_or(0, |m| m + 1);
            let partial = self.vol_dir(id).join(format!("L{seq}.qcow2.partial"));
            let backing = (keep > 0).then(|| self.layer_path(id, v.layers[keep - 1].seq));
            std::fs::create_dir_all(self.vol_dir(id)).map_err(|e| io("replica dir", e))?;
            image::create(&partial, *size, backing.as_deref()).await?;
            targets.push(Target { id: id.clone(), v, keep, seq, partial, client: None });
        }
        let cleanup = |targets: &Vec<Target>| {
            let names: Vec<(String, String, PathBuf)> = targets
                .iter()
                .map(|t| (format!("w{}", t.v.index), format!("a{}", t.v.index), t.partial.clone()))
                .collect();
            async move {
                for (export, node, file) in names {
                    let _ = self.daemon().qmp_lenient("block-export-del", json!({"id": export, "mode": "hard"})).await;
                    for _ in 0..50 {
                        if self.daemon().qmp_lenient("blockdev-del", json!({"node-name": node})).await.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = std::fs::remove_file(file);
                }
            }
        };
        let received = async {
            for t in &mut targets {
                self.daemon()
                    .qmp("blockdev-add", json!({"driver": "qcow2", "node-name": format!("a{}", t.v.index),
                                                 "file": {"driver": "file", "filename": t.partial}}))
                    .await?;
                let name = format!("apply-{}", t.id);
                self.daemon()
                    .qmp("block-export-add", json!({"type": "nbd", "id": format!("w{}", t.v.index),
                                                    "node-name": format!("a{}", t.v.index), "name": name, "writable": true}))
                    .await?;
                t.client = Some(NbdClient::connect(self.daemon().nbd(), &name).await.map_err(nbd_err)?);
            }
            let mut bytes = 0u64;
            loop {
                let msg = incoming.recv().await;
                let (vid, op) = match msg {
                    Some(Incoming::Data { volume_id, offset, data }) => (volume_id, (offset, Some(data), 0)),
                    Some(Incoming::Zero { volume_id, offset, len }) => (volume_id, (offset, None, len)),
                    Some(Incoming::Commit) => break,
                    Some(Incoming::Broken(why)) => return Err(DriverError::Unavailable(why)),
                    None => return Err(DriverError::Unavailable("the recovery point stream ended before commit".into())),
                };
                let t = targets
                    .iter_mut()
                    .find(|t| t.id == vid)
                    .ok_or_else(|| DriverError::InvalidArgument(format!("chunk for volume {vid}, which is not in this point")))?;
                let client = t.client.as_mut().expect("connected");
                match op {
                    (offset, Some(data), _) => {
                        bytes += data.len() as u64;
                        client.write_pipelined(offset, &data, WRITE_DEPTH).await.map_err(nbd_err)?;
                    }
                    (offset, None, len) => client.write_zeroes(offset, len).await.map_err(nbd_err)?,
                }
            }
            for t in &mut targets {
                let mut c = t.client.take().expect("connected");
                c.flush().await.map_err(nbd_err)?;
                c.disconnect().await;
            }
            Ok::<u64, DriverError>(bytes)
        }
        .await;
        let bytes = match received {
            Ok(b) => b,
            Err(e) => {
                cleanup(&targets).await;
                return Err(e);
            }
        };
        // Close the partial images, make them durable, then give them their final names.
        for t in &targets {
            let _ = self
                .daemon()
                .qmp_lenient("block-export-del", json!({"id": format!("w{}", t.v.index), "mode": "hard"}))
                .await;
        }
        for t in &targets {
            let mut deleted = false;
            for _ in 0..100 {
                if self
                    .daemon()
                    .qmp_lenient("blockdev-del", json!({"node-name": format!("a{}", t.v.index)}))
                    .await
                    .is_ok()
                {
                    deleted = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !deleted {
                cleanup(&targets).await;
                return Err(DriverError::Unavailable("could not close a received recovery point".into()));
            }
            std::fs::File::open(&t.partial)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("fsync of a replica layer", e))?;
            std::fs::rename(&t.partial, self.layer_path(&t.id, t.seq))
                .map_err(|e| io("rename of a replica layer", e))?;
            fsync_dir(&self.vol_dir(&t.id))?;
        }
        // The switch: one state write moves every volume of the group to the new point.
        let mut dropped = Vec::new();
        self.update(|st| {
            for t in &targets {
                let v = st.volumes.get_mut(&t.id).ok_or_else(|| not_found(&t.id))?;
                dropped.extend(v.layers.drain(t.keep..).map(|l| (t.id.clone(), l.seq)));
                v.layers.push(Layer {
                    seq: t.seq,
                    rp: Some(header.recovery_point_id.clone()),
                    acked: true,
                    rp_created_ms: header.created_at_ms,
                });
                v.peer_demoted = header.final_sync;
                v.discard_allowed = false;
                v.last = SyncStats { rp_created_ms: header.created_at_ms, duration_ms: 0, bytes, error: String::new() };
            }
            Ok(())
        })
        .await?;
        for (id, seq) in dropped {
            let _ = std::fs::remove_file(self.layer_path(&id, seq));
        }
        for t in &targets {
            if let Err(e) = self.shorten_replica(&t.id).await {
                tracing::warn!(volume = %t.id, error = %e, "could not shorten the replica chain; will retry next time");
            }
        }
        Ok(bytes)
    }

    /// Keeps a replica chain at two layers: merges the oldest point above the base into
    /// the base. Every step leaves the newest point readable.
    async fn shorten_replica(&self, id: &str) -> Result<(), DriverError> {
        loop {
            let v = self.vol(id)?;
            if v.layers.len() <= 2 || v.role != Some(Role::Secondary) {
                return Ok(());
            }
            let (base, mid, above) = (v.layers[0].seq, v.layers[1].seq, v.layers[2].seq);
            image::commit(&self.layer_path(id, mid)).await?;
            image::rebase_unsafe(&self.layer_path(id, above), &self.layer_path(id, base)).await?;
            let mid_layer = v.layers[1].clone();
            self.update(|st| {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                sv.layers[0].rp = mid_layer.rp.clone();
                sv.layers[0].rp_created_ms = mid_layer.rp_created_ms;
                sv.layers.retain(|l| l.seq != mid);
                Ok(())
            })
            .await?;
            let _ = std::fs::remove_file(self.layer_path(id, mid));
        }
    }

    /// Records a new volume whose single layer `L0.qcow2` is in place, and exports it.
    async fn add_volume(&self, volume_id: &str, size_bytes: u64) -> Result<VolumeState, DriverError> {
        let v = self
            .update(|st| {
                let v = Vol::new(st.next_index, size_bytes, vec![Layer::fresh()], None);
                st.next_index += 1;
                st.volumes.insert(volume_id.to_string(), v.clone());
                Ok(v)
            })
            .await?;
        self.open_chain(volume_id, &v).await?;
        Ok(Self::view(volume_id, &v))
    }

    /// Takes an unreplicated volume out of the daemon before it is deleted or handed
    /// back; `None` when it does not exist (already gone).
    async fn close_unreplicated(&self, volume_id: &str) -> Result<Option<Vol>, DriverError> {
        let Ok(v) = self.vol(volume_id) else { return Ok(None) };
        if v.role.is_some() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is replicated; disable replication first"
            )));
        }
        self.close_chain(&v).await?;
        Ok(Some(v))
    }

    fn view(id: &str, v: &Vol) -> VolumeState {
        VolumeState { volume_id: id.to_string(), size_bytes: v.size_bytes, role: v.role }
    }

    async fn lock_for(&self, id: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let group = self.vol(id).ok().map(|v| v.group_id).filter(|g| !g.is_empty())?;
        Some(self.group_lock(&group).lock_owned().await)
    }
}

#[async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &str {
        "qemu"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn capabilities(&self) -> Vec<String> {
        [
            capability::VOLUME,
            capability::EXTEND,
            capability::REPLICATION,
            capability::MANAGE_EXISTING,
            capability::ATTACH,
        ]
        .map(String::from)
        .to_vec()
    }

    async fn probe(&self) -> Result<(), DriverError> {
        self.daemon().qmp("query-version", json!({})).await.map(|_| ())
    }

    async fn create_volume(&self, volume_id: &str, size_bytes: u64) -> Result<VolumeState, DriverError> {
        if let Ok(v) = self.vol(volume_id) {
            return if v.size_bytes == size_bytes {
                Ok(Self::view(volume_id, &v))
            } else {
                Err(DriverError::AlreadyExists(format!(
                    "volume {volume_id} already exists with {} bytes",
                    v.size_bytes
                )))
            };
        }
        std::fs::create_dir_all(self.vol_dir(volume_id)).map_err(|e| io("volume dir", e))?;
        image::create(&self.layer_path(volume_id, 0), size_bytes, None).await?;
        self.add_volume(volume_id, size_bytes).await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        if self.close_unreplicated(volume_id).await?.is_none() {
            return Ok(());
        }
        self.update(|st| {
            st.volumes.remove(volume_id);
            Ok(())
        })
        .await?;
        let _ = std::fs::remove_dir_all(self.vol_dir(volume_id));
        Ok(())
    }

    async fn extend_volume(&self, volume_id: &str, new_size_bytes: u64) -> Result<VolumeState, DriverError> {
        let v = self.vol(volume_id)?;
        if new_size_bytes < v.size_bytes {
            return Err(DriverError::InvalidArgument(format!(
                "new size {new_size_bytes} is smaller than the current {}; volumes only grow",
                v.size_bytes
            )));
        }
        if v.role.is_some() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is replicated; disable replication to extend it"
            )));
        }
        // An NBD export does not share the resize permission: take the export down for the
        // resize (clients reconnect), then bring it back at the new size.
        self.unexport(&v).await?;
        let resized = self
            .daemon()
            .qmp("block_resize", json!({"node-name": node(&v, v.top().seq), "size": new_size_bytes}))
            .await;
        self.export(volume_id, &v).await?;
        resized?;
        let v = self
            .update(|st| {
                let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
                sv.size_bytes = new_size_bytes;
                Ok(sv.clone())
            })
            .await?;
        Ok(Self::view(volume_id, &v))
    }

    async fn get_volume(&self, volume_id: &str) -> Result<VolumeState, DriverError> {
        self.vol(volume_id).map(|v| Self::view(volume_id, &v))
    }

    async fn create_group_snapshot(
        &self,
        _snapshot_id: &str,
        _volume_ids: &[String],
    ) -> Result<GroupSnapshotInfo, DriverError> {
        Err(DriverError::Unsupported(
            "the qemu backend takes crash-consistent group snapshots only as replication recovery points".into(),
        ))
    }

    async fn delete_snapshot(&self, _snapshot_id: &str) -> Result<(), DriverError> {
        Err(DriverError::Unsupported("the qemu backend has no user snapshots".into()))
    }

    async fn attach_volume(&self, volume_id: &str) -> Result<Connection, DriverError> {
        let v = self.vol(volume_id)?;
        if !v.writable() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is a secondary replica here; promote it first"
            )));
        }
        Ok(Connection { driver_volume_type: "nbd".into(), uri: self.daemon().nbd().uri(volume_id) })
    }

    async fn detach_volume(&self, _volume_id: &str) -> Result<(), DriverError> {
        Ok(())
    }

    async fn list_manageable(&self) -> Result<Vec<Manageable>, DriverError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.pool).map_err(|e| io("pool listing", e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("qcow2") || !path.is_file() {
                continue;
            }
            let reference = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let shared = image::info(&path, true).await;
            let (size, mut reason) = match &shared {
                Ok(i) if i["format"] != "qcow2" => (0, format!("format is {}, not qcow2", i["format"])),
                Ok(i) if i.get("backing-filename").is_some() => {
                    (i["virtual-size"].as_u64().unwrap_or(0), "it has a backing file; flatten it first".to_string())
                }
                Ok(i) => (i["virtual-size"].as_u64().unwrap_or(0), String::new()),
                Err(e) => (0, format!("unreadable: {e}")),
            };
            if reason.is_empty() && image::info(&path, false).await.is_err() {
                reason = "it is in use by another process".into();
            }
            out.push(Manageable {
                reference,
                size_bytes: size,
                safe_to_manage: reason.is_empty(),
                reason_not_safe: reason,
            });
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    async fn manage_volume(&self, reference: &str, volume_id: &str) -> Result<VolumeState, DriverError> {
        if let Ok(v) = self.vol(volume_id) {
            return Ok(Self::view(volume_id, &v));
        }
        if reference.contains('/') || reference.starts_with('.') {
            return Err(DriverError::InvalidArgument(format!(
                "reference {reference:?} is not a file name in the pool"
            )));
        }
        let src = self.pool.join(format!("{reference}.qcow2"));
        let found = self.list_manageable().await?.into_iter().find(|m| m.reference == reference);
        let Some(m) = found else {
            return Err(DriverError::NotFound(format!(
                "no unmanaged volume {reference} in pool {}",
                self.pool.display()
            )));
        };
        if !m.safe_to_manage {
            return Err(DriverError::FailedPrecondition(format!(
                "{reference} is not safe to manage: {}",
                m.reason_not_safe
            )));
        }
        std::fs::create_dir_all(self.vol_dir(volume_id)).map_err(|e| io("volume dir", e))?;
        std::fs::rename(&src, self.layer_path(volume_id, 0)).map_err(|e| io("moving the image into the pool", e))?;
        fsync_dir(&self.pool)?;
        self.add_volume(volume_id, m.size_bytes).await
    }

    async fn unmanage_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        let Some(v) = self.close_unreplicated(volume_id).await? else { return Ok(()) };
        // Flatten into the bottom layer so the file stands alone.
        for l in v.layers.iter().skip(1).rev() {
            image::commit(&self.layer_path(volume_id, l.seq)).await?;
        }
        let dest = self.pool.join(format!("{volume_id}.qcow2"));
        std::fs::rename(self.layer_path(volume_id, v.layers[0].seq), &dest)
            .map_err(|e| io("moving the image out", e))?;
        self.update(|st| {
            st.volumes.remove(volume_id);
            Ok(())
        })
        .await?;
        let _ = std::fs::remove_dir_all(self.vol_dir(volume_id));
        Ok(())
    }

    async fn enable_replication(&self, spec: &EnableSpec) -> Result<(), DriverError> {
        let interval_ms = 30_000;
        let peer = PeerRec { backend: spec.peer.backend.clone(), endpoint: spec.peer.endpoint.clone() };
        match (spec.role, self.vol(&spec.volume_id)) {
            (Role::Primary, Err(_)) => Err(not_found(&spec.volume_id)),
            (role, Ok(v)) if v.role.is_some() && v.role != Some(role) => Err(DriverError::FailedPrecondition(format!(
                "volume {} is already replicated as {}",
                spec.volume_id,
                v.role.map_or("", Role::as_str)
            ))),
            (Role::Primary, Ok(_)) => {
                self.update(|st| {
                    let v = st.volumes.get_mut(&spec.volume_id).ok_or_else(|| not_found(&spec.volume_id))?;
                    v.role = Some(Role::Primary);
                    v.group_id = spec.group_id.clone();
                    v.peer = Some(peer);
                    v.interval_ms = spec.interval_ms.unwrap_or(interval_ms);
                    Ok(())
                })
                .await
            }
            (Role::Secondary, Ok(_)) => Ok(()),
            (Role::Secondary, Err(_)) => {
                std::fs::create_dir_all(self.vol_dir(&spec.volume_id)).map_err(|e| io("replica dir", e))?;
                self.update(|st| {
                    let mut v = Vol::new(st.next_index, spec.size_bytes, Vec::new(), Some(Role::Secondary));
                    v.group_id = spec.group_id.clone();
                    v.peer = Some(peer);
                    v.interval_ms = spec.interval_ms.unwrap_or(interval_ms);
                    st.next_index += 1;
                    st.volumes.insert(spec.volume_id.clone(), v);
                    Ok(())
                })
                .await
            }
        }
    }

    async fn disable_replication(&self, volume_id: &str) -> Result<(), DriverError> {
        let _g = self.lock_for(volume_id).await;
        let Ok(v) = self.vol(volume_id) else { return Ok(()) };
        match v.role {
            None => Ok(()),
            Some(Role::Primary) => {
                self.update(|st| {
                    let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
                    sv.role = None;
                    sv.peer = None;
                    sv.group_id.clear();
                    for l in &mut sv.layers {
                        l.acked = false;
                    }
                    Ok(())
                })
                .await
            }
            Some(Role::Secondary) => {
                self.update(|st| {
                    st.volumes.remove(volume_id);
                    Ok(())
                })
                .await?;
                let _ = std::fs::remove_dir_all(self.vol_dir(volume_id));
                Ok(())
            }
        }
    }

    async fn promote(&self, volume_id: &str, force: bool) -> Result<Option<String>, DriverError> {
        let _g = self.lock_for(volume_id).await;
        let v = self.vol(volume_id)?;
        match v.role {
            None => {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {volume_id} is not replicated; enable replication first"
                )));
            }
            Some(Role::Primary) => return Ok(None),
            Some(Role::Secondary) => {}
        }
        let Some(top) = v.layers.last().cloned() else {
            return Err(DriverError::FailedPrecondition(format!(
                "replica of {volume_id} has no complete recovery point yet; wait for the initial sync"
            )));
        };
        if !force && !v.peer_demoted {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is a healthy secondary whose primary was not demoted; fail over as planned (final sync) or promote with force"
            )));
        }
        let seq = top.seq + 1;
        image::create(&self.layer_path(volume_id, seq), v.size_bytes, Some(&self.layer_path(volume_id, top.seq)))
            .await?;
        let v = self
            .update(|st| {
                let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
                // Every point of a replica came from the peer, so the peer holds it.
                for l in &mut sv.layers {
                    l.acked = l.rp.is_some();
                }
                sv.layers.push(Layer { seq, rp: None, acked: false, rp_created_ms: 0 });
                sv.role = Some(Role::Primary);
                sv.demoted = false;
                sv.peer_demoted = false;
                sv.discard_allowed = false;
                Ok(sv.clone())
            })
            .await?;
        self.open_chain(volume_id, &v).await?;
        Ok(force.then(|| top.rp.clone().unwrap_or_default()))
    }

    async fn demote(&self, volume_id: &str) -> Result<(), DriverError> {
        let _g = self.lock_for(volume_id).await;
        let v = self.vol(volume_id)?;
        match v.role {
            None => {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {volume_id} is not replicated; enable replication first"
                )));
            }
            Some(Role::Secondary) => return Ok(()),
            Some(Role::Primary) => {}
        }
        self.close_chain(&v).await?;
        // An active layer with nothing in it carries no changes: drop it. Anything else
        // stays, unsynced, until an operator chooses to discard it (resync).
        let active = v.top().seq;
        let changed = image::map(&self.layer_path(volume_id, active)).await?.iter().any(|e| e.depth == 0 && e.present);
        self.update(|st| {
            let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
            if !changed {
                sv.layers.retain(|l| l.seq != active);
            }
            sv.role = Some(Role::Secondary);
            sv.demoted = true;
            sv.peer_demoted = false;
            Ok(())
        })
        .await?;
        if !changed {
            let _ = std::fs::remove_file(self.layer_path(volume_id, active));
        }
        Ok(())
    }

    async fn resync(&self, volume_id: &str) -> Result<bool, DriverError> {
        let v = self.vol(volume_id)?;
        if v.role != Some(Role::Secondary) || !v.demoted {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is not demoted; demote it before a resync"
            )));
        }
        self.update(|st| {
            let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
            sv.discard_allowed = true;
            Ok(())
        })
        .await?;
        Ok(true)
    }

    async fn replication_info(&self, volume_id: &str) -> Result<ReplicationState, DriverError> {
        let v = self.vol(volume_id)?;
        let rp = match v.role {
            Some(Role::Secondary) => v.layers.last().and_then(|l| l.rp.clone()),
            _ => v.acked_index().and_then(|i| v.layers[i].rp.clone()),
        };
        let status = match (&v.role, v.last.error.is_empty()) {
            (None, _) => String::new(),
            (_, true) => "healthy".into(),
            (_, false) if rp.is_some() => "degraded".into(),
            (_, false) => "error".into(),
        };
        Ok(ReplicationState {
            role: v.role,
            status,
            last_sync_time_ms: v.last.rp_created_ms,
            last_sync_duration_ms: v.last.duration_ms as i64,
            last_sync_bytes: v.last.bytes as i64,
            recovery_point_id: rp.unwrap_or_default(),
            error: v.last.error.clone(),
        })
    }

    async fn sync_group(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError> {
        let lock = self.group_lock(group_id);
        let _g = lock.lock().await;
        self.do_sync(group_id, final_sync, peer_endpoint).await
    }

    async fn apply_recovery_point(
        &self,
        header: ApplyHeader,
        mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError> {
        let lock = self.group_lock(&header.group_id);
        let _g = lock.lock().await;
        self.do_apply(&header, &mut incoming).await
    }

    fn sync_schedule(&self) -> Vec<(String, Duration)> {
        let st = self.state.lock().expect("state poisoned");
        let mut out: BTreeMap<String, Duration> = BTreeMap::new();
        for v in st.volumes.values() {
            if v.role == Some(Role::Primary) && !v.demoted && v.peer.is_some() && !v.group_id.is_empty() {
                out.insert(v.group_id.clone(), Duration::from_millis(v.interval_ms.max(1000)));
            }
        }
        out.into_iter().collect()
    }
}
