//! The mock driver: an in-memory backend for control-plane tests and scale benchmarks.
//!
//! It stores no data. It has configurable latency and failure injection, and keeps a log
//! of every driver call it received (optionally appended to a JSON-lines file), which is
//! how tests prove that the agent did not run an operation twice. It is never the default
//! driver and never evidence that replication moves data.

mod persist;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use drover_agent::driver::{
    AdoptSnapshot, ApplyHeader, Connection, Driver, DriverError, EnableSpec, GroupSnapshotInfo, Incoming, Manageable,
    Peer, ReplicationState, Role, SyncReport, VolumeState, capability,
};
use drover_agent::replica::Shipment;
use drover_agent::roles::{self, RoleFacts, Verdict};

/// Mock driver settings (the `[mock]` table of the agent config).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockConfig {
    /// Added to every driver call.
    #[serde(with = "humantime_serde")]
    pub latency: Option<Duration>,
    /// Operation name (e.g. `promote`) to the probability in [0, 1] that it fails with
    /// Unavailable.
    pub fail: HashMap<String, f64>,
    /// Unmanaged volumes the backend pretends to hold: reference to size in bytes. They
    /// are there from the agent's first start (written to its state then); a restart
    /// reads its state back, with or without this setting, as a backend's disk would.
    pub unmanaged: HashMap<String, u64>,
    /// Append every driver call to this file as a JSON line.
    pub oplog: Option<PathBuf>,
    /// Fault injection for tests: abort the agent process right after the peer committed
    /// a final sync and before this side records it.
    pub die_after_final_commit: bool,
}

/// One driver call, as logged: one JSON line each, written with a single `write` so
/// concurrent calls (and several agents sharing a file) never interleave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpLogEntry {
    /// The driver operation, e.g. `promote`.
    pub op: String,
    /// The volume, group or snapshot it acted on.
    pub target: String,
    /// The agent op_id it ran under; empty outside a guarded mutation (probes, periodic syncs).
    #[serde(default)]
    pub op_id: String,
    /// The epoch it was admitted at (0 outside a guarded mutation).
    #[serde(default)]
    pub epoch: u64,
    /// When the driver was entered, in milliseconds since the epoch.
    #[serde(default)]
    pub at_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MockVolume {
    size_bytes: u64,
    role: Option<Role>,
    peer: Option<Peer>,
    group_id: String,
    /// Demoted: a secondary that may be resynced.
    demoted: bool,
    /// This secondary's primary announced (with a final sync) that it demoted itself.
    peer_demoted: bool,
    /// The newest recovery point this volume has (sent as primary, applied as secondary).
    recovery_point: String,
    /// The points a primary shipped (or began to) since `recovery_point`, each recorded
    /// before it ships (intent first): if the agent dies after the peer committed one, a
    /// later sync finds it at the peer. All of them are kept, not only the newest, as the
    /// qemu driver keeps every unacknowledged layer: a sync that starts while the peer
    /// cannot say what it holds ships a new point, and must not forget the older one the
    /// peer may have committed. Cleared when a point is acknowledged.
    #[serde(default)]
    unconfirmed: Vec<String>,
    last_sync_ms: i64,
    /// Made from a snapshot: (snapshot id, source volume id).
    #[serde(default)]
    origin: Option<(String, String)>,
}

impl MockVolume {
    fn facts(&self) -> RoleFacts {
        RoleFacts { role: self.role, demoted: self.demoted, peer_demoted: self.peer_demoted }
    }

    fn set_facts(&mut self, f: RoleFacts) {
        self.role = f.role;
        self.demoted = f.demoted;
        self.peer_demoted = f.peer_demoted;
    }
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    volumes: HashMap<String, MockVolume>,
    snapshots: HashMap<String, GroupSnapshotInfo>,
    /// Each snapshot's volume sizes at the instant.
    #[serde(default)]
    snapshot_sizes: HashMap<String, HashMap<String, u64>>,
    unmanaged: HashMap<String, u64>,
    /// Test clones: clone id -> (volume id, recovery point).
    #[serde(default)]
    clones: HashMap<String, (String, String)>,
    /// The last journal line this state holds (see `persist`).
    #[serde(default)]
    seq: u64,
}

/// What a mock backend holds ([`MockDriver::holdings`]).
#[derive(Debug, Clone, Default)]
pub struct Holdings {
    /// Volume id -> (size, replication role).
    pub volumes: std::collections::BTreeMap<String, (u64, Option<Role>)>,
    /// Snapshot id -> the volumes it holds.
    pub snapshots: std::collections::BTreeMap<String, Vec<String>>,
    pub clones: std::collections::BTreeSet<String>,
    pub unmanaged: std::collections::BTreeSet<String>,
}

/// The in-memory mock driver.
pub struct MockDriver {
    config: MockConfig,
    state: Mutex<State>,
    /// Where the state is kept across restarts, if anywhere.
    state_file: Option<PathBuf>,
    log: Mutex<Vec<OpLogEntry>>,
    fences: std::sync::OnceLock<drover_agent::driver::Fences>,
    saves: persist::Saves,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl MockDriver {
    /// A mock backend with the given settings.
    pub fn new(config: MockConfig) -> Self {
        let state = State { unmanaged: config.unmanaged.clone(), ..State::default() };
        Self {
            config,
            state: Mutex::new(state),
            state_file: None,
            log: Mutex::new(Vec::new()),
            fences: std::sync::OnceLock::new(),
            saves: persist::Saves::default(),
        }
    }

    /// A mock backend that keeps its volumes in `file` (read back at start), so a
    /// restarted agent still has them.
    pub fn with_state_file(config: MockConfig, file: PathBuf) -> Result<Self, DriverError> {
        let mut driver = Self::new(config);
        let found = persist::load(&file).map_err(DriverError::Internal)?;
        let first_start = found.is_none();
        if let Some(state) = found {
            driver.state = Mutex::new(state);
        }
        driver.state_file = Some(file);
        if first_start && !driver.config.unmanaged.is_empty() {
            // The configured images are on the backend before any call: written now, so
            // an agent restarted without the setting (before any change was saved) still
            // holds them.
            driver.lock().save_whole();
        }
        Ok(driver)
    }

    /// What a mock agent that keeps its state in `file` holds, read from its files (for
    /// tests that look for volumes the orchestrator forgot). `None`: nothing written yet.
    pub fn holdings(file: &std::path::Path) -> Result<Option<Holdings>, String> {
        Ok(persist::load(file)?.map(|st| Holdings {
            volumes: st.volumes.iter().map(|(id, v)| (id.clone(), (v.size_bytes, v.role))).collect(),
            snapshots: st.snapshots.iter().map(|(id, s)| (id.clone(), s.volume_ids.clone())).collect(),
            clones: st.clones.keys().cloned().collect(),
            unmanaged: st.unmanaged.keys().cloned().collect(),
        }))
    }

    fn lock(&self) -> persist::Locked<'_> {
        persist::Locked {
            state: Some(self.state.lock().expect("mock state poisoned")),
            driver: self,
            whole: false,
            touched: Default::default(),
        }
    }

    /// Every driver call so far, in order.
    pub fn op_log(&self) -> Vec<OpLogEntry> {
        self.log.lock().expect("mock log poisoned").clone()
    }

    /// Logs the call, waits the configured latency and applies failure injection.
    async fn enter(&self, op: &str, target: &str) -> Result<(), DriverError> {
        let op_ctx = drover_agent::driver::current_op();
        let entry = OpLogEntry {
            op: op.to_string(),
            target: target.to_string(),
            op_id: op_ctx.as_ref().map(|o| o.op_id.clone()).unwrap_or_default(),
            epoch: op_ctx.map_or(0, |o| o.epoch),
            at_ms: now_ms(),
        };
        if let Some(path) = &self.config.oplog {
            let mut line = serde_json::to_string(&entry).expect("log entry serialises");
            line.push('\n');
            // One write of the whole line to an O_APPEND file: lines never interleave.
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "mock op log append failed");
            }
        }
        self.log.lock().expect("mock log poisoned").push(entry);
        // Latency is for operations; a probe answers at once, as a live backend would.
        if let Some(latency) = self.config.latency.filter(|_| op != "probe") {
            tokio::time::sleep(latency).await;
        }
        if let Some(p) = self.config.fail.get(op)
            && fastrand::f64() < *p
        {
            return Err(DriverError::Unavailable(format!("mock: injected failure of {op} on {target}")));
        }
        Ok(())
    }

    fn with_volume<T>(
        &self,
        volume_id: &str,
        f: impl FnOnce(&mut MockVolume) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let mut state = self.lock();
        let vol = state.volume_mut(volume_id).ok_or_else(|| Self::missing(volume_id))?;
        f(vol)
    }

    /// Like [`MockDriver::with_volume`] for a call that only reads: it writes nothing.
    fn read_volume<T>(
        &self,
        volume_id: &str,
        f: impl FnOnce(&MockVolume) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let state = self.lock();
        f(state.volumes.get(volume_id).ok_or_else(|| Self::missing(volume_id))?)
    }

    fn missing(volume_id: &str) -> DriverError {
        DriverError::NotFound(format!("volume {volume_id} does not exist on this mock backend"))
    }

    fn view(volume_id: &str, v: &MockVolume) -> VolumeState {
        VolumeState { volume_id: volume_id.to_string(), size_bytes: v.size_bytes, role: v.role }
    }
}

#[async_trait]
impl Driver for MockDriver {
    fn name(&self) -> &str {
        "mock"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn attach_fences(&self, fences: drover_agent::driver::Fences) {
        let _ = self.fences.set(fences);
    }

    fn capabilities(&self) -> Vec<String> {
        [
            capability::VOLUME,
            capability::EXTEND,
            capability::SNAPSHOT,
            capability::CONSISTENT_GROUP_SNAPSHOT,
            capability::REPLICATION,
            capability::MANAGE_EXISTING,
            capability::ATTACH,
            capability::CLONE_RECOVERY_POINT,
        ]
        .map(String::from)
        .to_vec()
    }

    async fn clone_recovery_point(
        &self,
        volume_id: &str,
        clone_id: &str,
    ) -> Result<drover_agent::driver::CloneInfo, DriverError> {
        self.enter("clone_recovery_point", clone_id).await?;
        let mut state = self.lock();
        let info = |rp: &str| drover_agent::driver::CloneInfo {
            clone_id: clone_id.to_string(),
            volume_id: volume_id.to_string(),
            recovery_point_id: rp.to_string(),
            connection: Connection { driver_volume_type: "mock".into(), uri: format!("mock://clone/{clone_id}") },
        };
        if let Some((v, rp)) = state.clones.get(clone_id) {
            if v != volume_id {
                return Err(DriverError::AlreadyExists(format!("clone {clone_id} exists already, of volume {v}")));
            }
            return Ok(info(rp));
        }
        let vol = state
            .volumes
            .get(volume_id)
            .ok_or_else(|| DriverError::NotFound(format!("volume {volume_id} does not exist on this mock backend")))?;
        if vol.role != Some(Role::Secondary) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is not a replica on this backend; test clones are taken at the replication target"
            )));
        }
        if vol.recovery_point.is_empty() {
            return Err(DriverError::FailedPrecondition(format!(
                "replica of {volume_id} has no complete recovery point yet"
            )));
        }
        let rp = vol.recovery_point.clone();
        state.clones.insert(clone_id.to_string(), (volume_id.to_string(), rp.clone()));
        Ok(info(&rp))
    }

    async fn delete_clone(&self, clone_id: &str) -> Result<(), DriverError> {
        self.enter("delete_clone", clone_id).await?;
        self.lock().clones.remove(clone_id);
        Ok(())
    }

    async fn probe(&self) -> Result<(), DriverError> {
        self.enter("probe", "").await
    }

    async fn create_volume(&self, volume_id: &str, size_bytes: u64) -> Result<VolumeState, DriverError> {
        self.enter("create_volume", volume_id).await?;
        let mut state = self.lock();
        if let Some(v) = state.volumes.get(volume_id) {
            // A retry after a lost answer: the same volume is fine, a different one is not.
            return if v.size_bytes == size_bytes {
                Ok(Self::view(volume_id, v))
            } else {
                Err(DriverError::AlreadyExists(format!(
                    "volume {volume_id} already exists with {} bytes",
                    v.size_bytes
                )))
            };
        }
        let v = MockVolume { size_bytes, ..MockVolume::default() };
        let view = Self::view(volume_id, &v);
        state.put_volume(volume_id, v);
        Ok(view)
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        self.enter("delete_volume", volume_id).await?;
        let mut state = self.lock();
        if let Some(v) = state.volumes.get(volume_id)
            && v.role.is_some()
        {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is replicated; disable replication first"
            )));
        }
        if let Some(s) = state.snapshots.values().find(|s| s.volume_ids.iter().any(|v| v == volume_id)) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} has snapshot {}; delete it before the volume",
                s.snapshot_id
            )));
        }
        // Deleting a missing volume succeeds: the caller wanted it gone.
        state.remove_volume(volume_id);
        Ok(())
    }

    async fn extend_volume(&self, volume_id: &str, new_size_bytes: u64) -> Result<VolumeState, DriverError> {
        self.enter("extend_volume", volume_id).await?;
        self.with_volume(volume_id, |v| {
            if new_size_bytes < v.size_bytes {
                return Err(DriverError::InvalidArgument(format!(
                    "new size {new_size_bytes} is smaller than the current {}; volumes only grow",
                    v.size_bytes
                )));
            }
            v.size_bytes = new_size_bytes;
            Ok(Self::view(volume_id, v))
        })
    }

    async fn get_volume(&self, volume_id: &str) -> Result<VolumeState, DriverError> {
        self.read_volume(volume_id, |v| Ok(Self::view(volume_id, v)))
    }

    async fn create_group_snapshot(
        &self,
        snapshot_id: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshotInfo, DriverError> {
        self.enter("create_group_snapshot", snapshot_id).await?;
        let mut state = self.lock();
        let mut wanted: Vec<String> = volume_ids.to_vec();
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() || wanted.len() != volume_ids.len() {
            return Err(DriverError::InvalidArgument(
                "a snapshot names each of its volumes once, and at least one".into(),
            ));
        }
        if let Some(s) = state.snapshots.get(snapshot_id) {
            let mut have = s.volume_ids.clone();
            have.sort();
            return if have == wanted {
                Ok(s.clone())
            } else {
                Err(DriverError::AlreadyExists(format!(
                    "snapshot {snapshot_id} exists already, of other volumes; pick another id"
                )))
            };
        }
        let mut sizes = HashMap::new();
        for id in volume_ids {
            let Some(v) = state.volumes.get(id) else {
                return Err(DriverError::NotFound(format!("volume {id} does not exist on this mock backend")));
            };
            if v.role == Some(Role::Secondary) {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {id} is a secondary replica on this backend; snapshots are taken where the volume \
                     serves writes (its primary)"
                )));
            }
            sizes.insert(id.clone(), v.size_bytes);
        }
        let snap =
            GroupSnapshotInfo { snapshot_id: snapshot_id.to_string(), volume_ids: wanted, created_at_ms: now_ms() };
        state.snapshots.insert(snapshot_id.to_string(), snap.clone());
        state.snapshot_sizes.insert(snapshot_id.to_string(), sizes);
        Ok(snap)
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), DriverError> {
        self.enter("delete_snapshot", snapshot_id).await?;
        let mut state = self.lock();
        let made: Vec<&String> = state
            .volumes
            .iter()
            .filter(|(_, v)| v.origin.as_ref().is_some_and(|(s, _)| s == snapshot_id))
            .map(|(id, _)| id)
            .collect();
        if !made.is_empty() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume(s) {made:?} were made from snapshot {snapshot_id}; delete them first"
            )));
        }
        state.snapshots.remove(snapshot_id);
        state.snapshot_sizes.remove(snapshot_id);
        Ok(())
    }

    async fn create_volume_from_snapshot(
        &self,
        volume_id: &str,
        size_bytes: u64,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<VolumeState, DriverError> {
        self.enter("create_volume", volume_id).await?;
        let mut state = self.lock();
        let Some(&size) = state.snapshot_sizes.get(snapshot_id).and_then(|m| m.get(source_volume_id)) else {
            return Err(DriverError::NotFound(format!(
                "snapshot {snapshot_id} of volume {source_volume_id} does not exist on this mock backend"
            )));
        };
        if size_bytes < size {
            return Err(DriverError::InvalidArgument(format!(
                "size {size_bytes} is smaller than the snapshot's {size} bytes"
            )));
        }
        let origin = Some((snapshot_id.to_string(), source_volume_id.to_string()));
        if let Some(v) = state.volumes.get(volume_id) {
            return if v.origin == origin && v.size_bytes == size_bytes {
                Ok(Self::view(volume_id, v))
            } else {
                Err(DriverError::AlreadyExists(format!("volume {volume_id} already exists; pick another id")))
            };
        }
        let v = MockVolume { size_bytes, origin, ..MockVolume::default() };
        let view = Self::view(volume_id, &v);
        state.put_volume(volume_id, v);
        Ok(view)
    }

    async fn attach_volume(&self, volume_id: &str) -> Result<Connection, DriverError> {
        self.enter("attach_volume", volume_id).await?;
        self.read_volume(volume_id, |_| {
            Ok(Connection { driver_volume_type: "mock".into(), uri: format!("mock://{volume_id}") })
        })
    }

    async fn detach_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        self.enter("detach_volume", volume_id).await
    }

    async fn list_manageable(&self) -> Result<Vec<Manageable>, DriverError> {
        let state = self.lock();
        let mut out: Vec<_> = state
            .unmanaged
            .iter()
            .map(|(reference, size)| Manageable {
                reference: reference.clone(),
                size_bytes: *size,
                safe_to_manage: true,
                reason_not_safe: String::new(),
                snapshots: Vec::new(),
                backing_file: String::new(),
            })
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    async fn manage_volume(
        &self,
        reference: &str,
        volume_id: &str,
        snapshots: &[AdoptSnapshot],
    ) -> Result<VolumeState, DriverError> {
        self.enter("manage_volume", reference).await?;
        if let Some(s) = snapshots.first() {
            return Err(DriverError::InvalidArgument(format!(
                "mock volume {reference} carries no snapshot {:?}; manage it without snapshots",
                s.reference
            )));
        }
        let mut state = self.lock();
        if let Some(v) = state.volumes.get(volume_id) {
            return Ok(Self::view(volume_id, v));
        }
        let size = state
            .unmanaged
            .remove(reference)
            .ok_or_else(|| DriverError::NotFound(format!("no unmanaged volume {reference} on this mock backend")))?;
        let v = MockVolume { size_bytes: size, ..MockVolume::default() };
        let view = Self::view(volume_id, &v);
        state.put_volume(volume_id, v);
        Ok(view)
    }

    async fn unmanage_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        self.enter("unmanage_volume", volume_id).await?;
        let mut state = self.lock();
        // The image handed back carries no snapshot taken here (the mock adopts none with
        // a manage either): they must go first, as on the qemu backend.
        let mut snaps: Vec<&str> = state
            .snapshots
            .values()
            .filter(|s| s.volume_ids.iter().any(|v| v == volume_id))
            .map(|s| s.snapshot_id.as_str())
            .collect();
        if !snaps.is_empty() {
            snaps.sort_unstable();
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} has {} snapshot(s) ({}); delete them before it can be unmanaged",
                snaps.len(),
                snaps.join(", ")
            )));
        }
        if let Some(v) = state.volumes.remove(volume_id) {
            state.unmanaged.insert(volume_id.to_string(), v.size_bytes);
        }
        Ok(())
    }

    async fn enable_replication(&self, spec: &EnableSpec) -> Result<(), DriverError> {
        self.enter("enable_replication", &spec.volume_id).await?;
        let mut state = self.lock();
        if !state.volumes.contains_key(&spec.volume_id) {
            match spec.role {
                // The replica is created on the secondary side.
                Role::Secondary => state
                    .put_volume(&spec.volume_id, MockVolume { size_bytes: spec.size_bytes, ..MockVolume::default() }),
                Role::Primary => {
                    return Err(DriverError::NotFound(format!(
                        "volume {} does not exist on this mock backend",
                        spec.volume_id
                    )));
                }
            }
        }
        let vol = state.volume_mut(&spec.volume_id).expect("present or just made");
        if let Some(role) = vol.role
            && role != spec.role
        {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {} is already replicated as {}",
                spec.volume_id,
                role.as_str()
            )));
        }
        if vol.role.is_none() {
            // A new replication starts over: its replica holds nothing yet, so no point
            // of an earlier one is a base to build on.
            vol.recovery_point.clear();
            vol.unconfirmed.clear();
        }
        vol.role = Some(spec.role);
        vol.peer = Some(spec.peer.clone());
        vol.group_id = spec.group_id.clone();
        vol.set_facts(roles::on_enable(spec.role));
        Ok(())
    }

    async fn disable_replication(&self, volume_id: &str) -> Result<(), DriverError> {
        self.enter("disable_replication", volume_id).await?;
        let mut state = self.lock();
        let Some(v) = state.volume_mut(volume_id) else { return Ok(()) };
        if v.role == Some(Role::Secondary) {
            // The replica goes away with replication, as a Cinder target's would.
            state.remove_volume(volume_id);
        } else {
            v.role = None;
            v.peer = None;
            v.demoted = false;
            // Its replica is gone: the points it shipped are no base for a later one.
            v.recovery_point.clear();
            v.unconfirmed.clear();
        }
        Ok(())
    }

    async fn promote(&self, volume_id: &str, force: bool) -> Result<Option<String>, DriverError> {
        self.enter("promote", volume_id).await?;
        self.with_volume(volume_id, |v| match roles::promote(volume_id, v.facts(), force)? {
            Verdict::AlreadyDone => Ok(None),
            Verdict::Proceed(facts) => {
                v.set_facts(facts);
                Ok(force.then(|| v.recovery_point.clone()))
            }
        })
    }

    async fn demote(&self, volume_id: &str) -> Result<(), DriverError> {
        self.enter("demote", volume_id).await?;
        self.with_volume(volume_id, |v| {
            if let Verdict::Proceed(facts) = roles::demote(volume_id, v.facts())? {
                v.set_facts(facts);
            }
            Ok(())
        })
    }

    async fn resync(&self, volume_id: &str) -> Result<bool, DriverError> {
        self.enter("resync", volume_id).await?;
        self.with_volume(volume_id, |v| roles::resync(volume_id, v.facts()).map(|_| true))
    }

    async fn replication_info(&self, volume_id: &str) -> Result<ReplicationState, DriverError> {
        self.read_volume(volume_id, |v| {
            Ok(ReplicationState {
                role: v.role,
                status: if v.role.is_some() { "healthy".into() } else { String::new() },
                last_sync_time_ms: v.last_sync_ms,
                last_sync_duration_ms: 0,
                last_sync_bytes: 0,
                recovery_point_id: v.recovery_point.clone(),
                error: String::new(),
            })
        })
    }

    async fn sync_group(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError> {
        self.enter("sync_group", group_id).await?;
        let started = std::time::Instant::now();
        let (first_id, endpoint, recorded, unconfirmed) = {
            let state = self.lock();
            let first = state
                .volumes
                .iter()
                .find(|(_, v)| v.group_id == group_id && v.role == Some(Role::Primary))
                .map(|(id, v)| (id.clone(), v.clone()));
            let Some((id, first)) = first else {
                return Err(DriverError::FailedPrecondition(format!(
                    "no primary volume of group {group_id} on this backend"
                )));
            };
            let endpoint = peer_endpoint
                .map(String::from)
                .or_else(|| first.peer.as_ref().map(|p| p.endpoint.clone()))
                .unwrap_or_default();
            (id, endpoint, first.recovery_point, first.unconfirmed)
        };
        // Reconcile with the peer: if it already holds a point this side was shipping
        // when it was interrupted, that point is the common base now.
        if !unconfirmed.is_empty()
            && let Ok(held) = drover_agent::replica::peer_point(&endpoint, &first_id).await
            && held != recorded
            && unconfirmed.contains(&held)
        {
            tracing::info!(group = group_id, point = %held, "the peer holds the point an interrupted sync was shipping; going on from it");
            let mut state = self.lock();
            for id in state.group_volumes(group_id, Some(Role::Primary)) {
                if let Some(v) = state.volume_mut(&id) {
                    v.recovery_point = held.clone();
                    v.unconfirmed.clear();
                }
            }
        }
        let header = {
            let mut state = self.lock();
            let point = uuid::Uuid::now_v7().to_string();
            let mut members: Vec<(String, MockVolume)> = Vec::new();
            for id in state.group_volumes(group_id, Some(Role::Primary)) {
                if let Some(v) = state.volume_mut(&id) {
                    // Bounded, so a peer gone for good does not grow the state
                    // without end: after 64 ships that were not acknowledged the oldest
                    // is forgotten.
                    if v.unconfirmed.len() == 64 {
                        v.unconfirmed.remove(0);
                    }
                    v.unconfirmed.push(point.clone());
                    members.push((id, v.clone()));
                }
            }
            let first = &members[0].1;
            ApplyHeader {
                group_id: group_id.to_string(),
                recovery_point_id: point,
                base_recovery_point_id: first.recovery_point.clone(),
                volumes: members.iter().map(|(id, v)| (id.clone(), v.size_bytes)).collect(),
                final_sync,
                source_backend: first.peer.as_ref().map(|p| p.backend.clone()).unwrap_or_default(),
                created_at_ms: now_ms(),
                epoch: self.fences.get().map_or(0, |f| f.group_epoch(group_id)),
            }
        };
        Shipment::open(&endpoint, &header, drover_agent::replica::transfer_deadline(0)).await?.commit().await?;
        if final_sync && self.config.die_after_final_commit {
            tracing::error!("fault injection: dying after the peer committed the final sync");
            std::process::abort();
        }
        let mut state = self.lock();
        for (id, _) in &header.volumes {
            if let Some(v) = state.volume_mut(id) {
                v.recovery_point = header.recovery_point_id.clone();
                v.unconfirmed.clear();
                v.last_sync_ms = now_ms();
                if final_sync {
                    v.set_facts(roles::after_final_sync());
                }
            }
        }
        Ok(SyncReport {
            recovery_point_id: header.recovery_point_id.clone(),
            bytes: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            created_at_ms: header.created_at_ms,
            full: header.base_recovery_point_id.is_empty(),
            snapshot_pause_us: 0,
        })
    }

    async fn apply_recovery_point(
        &self,
        header: ApplyHeader,
        mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError> {
        {
            let state = self.lock();
            for (id, _) in &header.volumes {
                let v = state
                    .volumes
                    .get(id)
                    .ok_or_else(|| DriverError::NotFound(format!("no replica of volume {id} here")))?;
                if v.role != Some(Role::Secondary) {
                    return Err(DriverError::FailedPrecondition(format!(
                        "volume {id} is not a secondary here; refusing a recovery point from {}",
                        header.source_backend
                    )));
                }
                if !header.base_recovery_point_id.is_empty() && header.base_recovery_point_id != v.recovery_point {
                    return Err(DriverError::FailedPrecondition(format!(
                        "replica of {id} is at recovery point {:?}, not {:?}",
                        v.recovery_point, header.base_recovery_point_id
                    )));
                }
            }
        }
        let mut bytes = 0u64;
        loop {
            match incoming.recv().await {
                Some(Incoming::Data { data, .. }) => bytes += data.len() as u64,
                Some(Incoming::Zero { .. }) => {}
                Some(Incoming::Commit) => break,
                Some(Incoming::Broken(why)) => return Err(DriverError::Unavailable(why)),
                None => return Err(DriverError::Unavailable("recovery point stream ended before commit".into())),
            }
        }
        let mut state = self.lock();
        for (id, _) in &header.volumes {
            if let Some(v) = state.volume_mut(id) {
                v.recovery_point = header.recovery_point_id.clone();
                v.last_sync_ms = now_ms();
                v.set_facts(roles::after_applied(v.facts(), header.final_sync));
            }
        }
        Ok(bytes)
    }
}

/// The mock backend, for the list of backends the `drover` binary can drive.
pub struct MockBackend;

#[async_trait]
impl drover_agent::launch::Backend for MockBackend {
    fn name(&self) -> &'static str {
        "mock"
    }

    async fn open(
        &self,
        config: &drover_config::Layered,
        common: &drover_agent::config::AgentConfig,
    ) -> Result<std::sync::Arc<dyn Driver>, drover_agent::launch::LaunchError> {
        let mock: MockConfig = config.section("mock")?;
        for (op, p) in &mock.fail {
            if !(0.0..=1.0).contains(p) {
                return Err(drover_config::ConfigError::Invalid(format!(
                    "mock.fail.{op} = {p} is not a probability in [0, 1]"
                ))
                .into());
            }
        }
        let driver = MockDriver::with_state_file(mock, common.state_dir.join("mock-state.json"))
            .map_err(|e| drover_agent::launch::LaunchError::Driver { driver: "mock".into(), message: e.to_string() })?;
        Ok(std::sync::Arc::new(driver))
    }
}
