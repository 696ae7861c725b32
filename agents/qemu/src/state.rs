//! The driver's persisted state: every volume's chain of layers, role, peer and last
//! sync, in one JSON file replaced atomically on every change. Memory takes a new state
//! only once the disk has it.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Layer {
    pub(crate) seq: u32,
    /// The recovery point this layer completes, once frozen.
    pub(crate) rp: Option<String>,
    /// Whether the peer holds this point.
    pub(crate) acked: bool,
    #[serde(default)]
    pub(crate) rp_created_ms: i64,
}

impl Layer {
    /// An empty, active layer.
    pub(crate) fn fresh() -> Self {
        Self { seq: 0, rp: None, acked: false, rp_created_ms: 0 }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct PeerRec {
    pub(crate) backend: String,
    pub(crate) endpoint: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SyncStats {
    pub(crate) rp_created_ms: i64,
    pub(crate) duration_ms: u64,
    pub(crate) bytes: u64,
    pub(crate) error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Vol {
    pub(crate) index: u32,
    pub(crate) size_bytes: u64,
    pub(crate) layers: Vec<Layer>,
    pub(crate) role: Option<Role>,
    #[serde(default)]
    pub(crate) group_id: String,
    #[serde(default)]
    pub(crate) peer: Option<PeerRec>,
    #[serde(default)]
    pub(crate) interval_ms: u64,
    #[serde(default)]
    pub(crate) demoted: bool,
    #[serde(default)]
    pub(crate) peer_demoted: bool,
    /// The operator allowed the next recovery point to discard local changes.
    #[serde(default)]
    pub(crate) discard_allowed: bool,
    #[serde(default)]
    pub(crate) last: SyncStats,
    /// For a volume made from a snapshot: the snapshot's files its bottom layer reads
    /// through (see `snapshot.rs`).
    #[serde(default)]
    pub(crate) origin: Option<Origin>,
}

/// Where a volume made from a snapshot comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Origin {
    pub(crate) snapshot_id: String,
    pub(crate) volume_id: String,
    /// The snapshot's files, bottom to top.
    pub(crate) files: Vec<PathBuf>,
}

/// A user snapshot of one or more volumes taken at one instant (`snapshot.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapRec {
    pub(crate) created_ms: i64,
    /// For a snapshot adopted with a managed image: the internal snapshot of the image's
    /// bottom layer it was copied from (still there, so unmanaging hands it back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) internal: String,
    /// Per volume: what it read through at that instant.
    pub(crate) members: BTreeMap<String, SnapMember>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapMember {
    /// The layer files, bottom to top; pinned while the snapshot exists.
    pub(crate) files: Vec<PathBuf>,
    pub(crate) size_bytes: u64,
}

impl Vol {
    /// A volume not (yet) replicated, or a fresh replica when `role` is secondary.
    pub(crate) fn new(index: u32, size_bytes: u64, layers: Vec<Layer>, role: Option<Role>) -> Self {
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
            origin: None,
        }
    }

    pub(crate) fn top(&self) -> &Layer {
        self.layers.last().expect("a volume has at least one layer")
    }

    /// Index of the newest layer the peer holds.
    pub(crate) fn acked_index(&self) -> Option<usize> {
        self.layers.iter().rposition(|l| l.acked)
    }

    /// The facts the shared role rules read.
    pub(crate) fn facts(&self) -> RoleFacts {
        RoleFacts { role: self.role, demoted: self.demoted, peer_demoted: self.peer_demoted }
    }

    /// Stores what a role rule decided.
    pub(crate) fn set_facts(&mut self, f: RoleFacts) {
        self.role = f.role;
        self.demoted = f.demoted;
        self.peer_demoted = f.peer_demoted;
    }

    /// Whether this side serves writes.
    pub(crate) fn writable(&self) -> bool {
        self.role != Some(Role::Secondary) && !self.layers.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) next_index: u32,
    pub(crate) volumes: BTreeMap<String, Vol>,
    /// Test clones of recovery points, by clone id.
    #[serde(default)]
    pub(crate) clones: BTreeMap<String, CloneRec>,
    /// User snapshots, by snapshot id.
    #[serde(default)]
    pub(crate) snapshots: BTreeMap<String, SnapRec>,
}

/// A test clone ([`QemuDriver::do_clone`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CloneRec {
    pub(crate) volume_id: String,
    pub(crate) recovery_point_id: String,
    pub(crate) index: u32,
    /// The replica layer files it reads through, kept on disk while it exists.
    pub(crate) backing: Vec<PathBuf>,
}

impl State {
    /// Whether a test clone or a user snapshot reads through this file: it must not be
    /// written into or deleted.
    pub(crate) fn pins(&self, file: &Path) -> bool {
        self.clones.values().any(|c| c.backing.iter().any(|b| b == file))
            || self.snapshots.values().any(|s| s.members.values().any(|m| m.files.iter().any(|f| f == file)))
    }
}

impl QemuDriver {
    pub(crate) fn snapshot_state(&self) -> State {
        self.state.lock().expect("state poisoned").clone()
    }

    pub(crate) fn vol(&self, id: &str) -> Result<Vol, DriverError> {
        self.state.lock().expect("state poisoned").volumes.get(id).cloned().ok_or_else(|| not_found(id))
    }

    /// Applies `f` to the state and writes it durably.
    pub(crate) async fn update<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
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

    /// The lock of a group's local state changes (role changes, freezing, folding,
    /// switching points). Never held while waiting on the peer.
    pub(crate) fn group_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.group_locks.lock().expect("group locks poisoned").entry(group.to_string()).or_default().clone()
    }

    /// The lock that lets one recovery point of a group travel at a time (out on the
    /// source, in on the target); only transfers wait on it, each bounded by its deadline.
    pub(crate) fn transfer_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.transfer_locks.lock().expect("transfer locks poisoned").entry(group.to_string()).or_default().clone()
    }

    /// Removes partial transfers and layer files no volume refers to.
    pub(crate) fn collect_garbage(&self) {
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
                if !keep.contains(&name) && !st.pins(&f.path()) {
                    tracing::info!(volume = %id, file = %name, "removing a leftover layer file");
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}
