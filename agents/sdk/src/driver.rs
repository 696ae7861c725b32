//! The driver trait: what a storage backend must do for Drover.

use async_trait::async_trait;

/// Capabilities a driver may advertise; the orchestrator checks them before it asks.
pub mod capability {
    pub const VOLUME: &str = "volume";
    pub const EXTEND: &str = "extend";
    pub const SNAPSHOT: &str = "snapshot";
    pub const CONSISTENT_GROUP_SNAPSHOT: &str = "consistent-group-snapshot";
    pub const REPLICATION: &str = "replication";
    pub const MANAGE_EXISTING: &str = "manage-existing";
    pub const ATTACH: &str = "attach";
    /// Writable clones of a replica's recovery point, for non-disruptive test failover.
    pub const CLONE_RECOVERY_POINT: &str = "clone-recovery-point";
}

/// A driver failure, mapped to a gRPC code in one place ([`DriverError::to_status`]).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The backend cannot do this at all.
    #[error("{0}")]
    Unsupported(String),
    /// A transient failure: retrying the same op_id may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl DriverError {
    /// The gRPC status for this error.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        match self {
            DriverError::NotFound(m) => Status::not_found(m.clone()),
            DriverError::AlreadyExists(m) => Status::already_exists(m.clone()),
            DriverError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            DriverError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            DriverError::Unsupported(m) => Status::unimplemented(m.clone()),
            DriverError::Unavailable(m) => Status::unavailable(m.clone()),
            DriverError::Internal(m) => Status::internal(m.clone()),
        }
    }
}

/// The replication role of a volume on this backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    /// The lowercase name used in APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// A volume as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    pub volume_id: String,
    pub size_bytes: u64,
    pub role: Option<Role>,
}

/// Where to reach the other side of a replication pair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub backend: String,
    pub endpoint: String,
}

/// One group's periodic sync, as the driver wants it ([`Driver::sync_schedule`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSync {
    pub group_id: String,
    pub interval: std::time::Duration,
    /// The backend the points ship to. The scheduler asks the orchestrator where its
    /// agent is now and passes that endpoint to the sync, so a peer that came back at
    /// another address is reached without waiting for an orchestrated sync.
    pub peer_backend: String,
}

/// What EnableReplication asks of one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnableSpec {
    pub volume_id: String,
    pub group_id: String,
    pub role: Role,
    pub peer: Peer,
    pub size_bytes: u64,
    /// Time between the group's periodic recovery points (parameter `sync_interval_ms`).
    pub interval_ms: Option<u64>,
}

/// A point-in-time view of one volume's replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicationState {
    pub role: Option<Role>,
    /// healthy, degraded or error.
    pub status: String,
    pub last_sync_time_ms: i64,
    pub last_sync_duration_ms: i64,
    pub last_sync_bytes: i64,
    pub recovery_point_id: String,
    pub error: String,
}

/// A volume on the backend that Drover does not manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manageable {
    pub reference: String,
    pub size_bytes: u64,
    pub safe_to_manage: bool,
    pub reason_not_safe: String,
    /// Snapshots the volume carries on the backend, adoptable with it.
    pub snapshots: Vec<ManageableSnapshot>,
    /// The backing file the image names, if any.
    pub backing_file: String,
}

/// A snapshot an unmanaged volume carries on the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManageableSnapshot {
    pub reference: String,
    pub size_bytes: u64,
    pub created_at_ms: i64,
    /// `internal` (adoptable with its image) or `backing-file` (a layer it reads through).
    pub kind: String,
}

/// One of an unmanaged volume's snapshots to take over with it, under `snapshot_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptSnapshot {
    pub reference: String,
    pub snapshot_id: String,
}

/// A crash-consistent snapshot of several volumes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupSnapshotInfo {
    pub snapshot_id: String,
    pub volume_ids: Vec<String>,
    pub created_at_ms: i64,
}

/// How to attach a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub driver_volume_type: String,
    pub uri: String,
}

/// The head of a recovery point arriving from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyHeader {
    pub group_id: String,
    pub recovery_point_id: String,
    /// The point the delta is relative to; empty for a full copy.
    pub base_recovery_point_id: String,
    /// Volume id and size of every volume in the point.
    pub volumes: Vec<(String, u64)>,
    /// The source stopped writes before this point and demotes after it.
    pub final_sync: bool,
    pub source_backend: String,
    pub created_at_ms: i64,
    /// The source's highest admitted epoch for the group (see [`Driver::attach_fences`]).
    pub epoch: u64,
}

/// A clone of a recovery point ([`Driver::clone_recovery_point`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneInfo {
    pub clone_id: String,
    pub volume_id: String,
    pub recovery_point_id: String,
    pub connection: Connection,
}

/// A group whose writes the driver holds until the orchestrator confirms its role
/// ([`Driver::held_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGroup {
    pub group_id: String,
    pub volume_ids: Vec<String>,
}

/// What arrives after the header, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Bytes at an offset of a volume.
    Data { volume_id: String, offset: u64, data: bytes::Bytes },
    /// A range that reads as zeroes.
    Zero { volume_id: String, offset: u64, len: u64 },
    /// Everything arrived: apply the point atomically.
    Commit,
    /// The stream broke: discard what arrived.
    Broken(String),
}

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub recovery_point_id: String,
    /// Payload bytes shipped (data and zero ranges are counted by what crossed the wire).
    pub bytes: u64,
    pub duration_ms: u64,
    pub created_at_ms: i64,
    /// Whether this was a full copy rather than a delta.
    pub full: bool,
    /// How long writes were held while the group's volumes froze together.
    pub snapshot_pause_us: u64,
}

/// The agent operation a driver call belongs to: its op_id, epoch and fence scope. The
/// agent's guard sets it around every mutating driver call, so a driver can log or tag
/// its work without the trait carrying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpInfo {
    pub op_id: String,
    pub epoch: u64,
    pub scope: String,
}

tokio::task_local! {
    static CURRENT_OP: OpInfo;
}

/// The operation the running driver call belongs to; `None` outside a guarded mutation
/// (probes, reads, the periodic sync scheduler).
pub fn current_op() -> Option<OpInfo> {
    CURRENT_OP.try_with(Clone::clone).ok()
}

/// Runs `fut` as part of operation `op` (see [`current_op`]).
pub async fn in_op<F: std::future::Future>(op: OpInfo, fut: F) -> F::Output {
    CURRENT_OP.scope(op, fut).await
}

/// Read access to the agent's fencing records, for drivers.
#[derive(Clone)]
pub struct Fences(pub(crate) crate::ledger::Ledger);

impl Fences {
    /// The highest epoch this agent has admitted for a group (0 when none or unreadable).
    pub fn group_epoch(&self, group_id: &str) -> u64 {
        self.0.highest_epoch(&format!("group/{group_id}")).unwrap_or(0)
    }
}

/// A storage backend driver.
///
/// Every mutating method must be safe to call again after a crash with the same arguments
/// (the agent retries an op whose outcome it never recorded); the agent's ledger makes a
/// repeated op_id return the first outcome, so drivers need not track op ids themselves.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// The driver's name, e.g. `mock` or `qemu`.
    fn name(&self) -> &str;
    /// The driver's version.
    fn version(&self) -> &str;
    /// What the driver can do; see [`capability`].
    fn capabilities(&self) -> Vec<String>;
    /// Whether the backend is ready to serve; the error says what is wrong.
    async fn probe(&self) -> Result<(), DriverError>;

    async fn create_volume(&self, volume_id: &str, size_bytes: u64) -> Result<VolumeState, DriverError>;
    async fn delete_volume(&self, volume_id: &str) -> Result<(), DriverError>;
    async fn extend_volume(&self, volume_id: &str, new_size_bytes: u64) -> Result<VolumeState, DriverError>;
    async fn get_volume(&self, volume_id: &str) -> Result<VolumeState, DriverError>;
    /// Snapshots every listed volume at one instant.
    async fn create_group_snapshot(
        &self,
        snapshot_id: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshotInfo, DriverError>;
    /// Deletes a snapshot (one that is gone counts as deleted). A snapshot that volumes
    /// made from it still read through is refused (FailedPrecondition).
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), DriverError>;
    /// A new volume holding `source_volume_id` as snapshot `snapshot_id` saw it, at least
    /// as large; independent of the source from then on. The same call again returns
    /// the same volume.
    async fn create_volume_from_snapshot(
        &self,
        volume_id: &str,
        size_bytes: u64,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<VolumeState, DriverError> {
        let _ = (volume_id, size_bytes, snapshot_id, source_volume_id);
        Err(DriverError::Unsupported(format!(
            "the {} driver cannot make volumes from snapshots (no `{}` capability)",
            self.name(),
            capability::SNAPSHOT
        )))
    }
    async fn attach_volume(&self, volume_id: &str) -> Result<Connection, DriverError>;
    async fn detach_volume(&self, volume_id: &str) -> Result<(), DriverError>;

    async fn list_manageable(&self) -> Result<Vec<Manageable>, DriverError>;
    /// Takes over an existing backend volume under a new id, and those of its snapshots
    /// `snapshots` names as snapshots of it. Idempotent: a volume already taken over is
    /// reported as it is.
    async fn manage_volume(
        &self,
        reference: &str,
        volume_id: &str,
        snapshots: &[AdoptSnapshot],
    ) -> Result<VolumeState, DriverError>;
    /// Forgets a volume without deleting its data.
    async fn unmanage_volume(&self, volume_id: &str) -> Result<(), DriverError>;

    async fn enable_replication(&self, spec: &EnableSpec) -> Result<(), DriverError>;
    async fn disable_replication(&self, volume_id: &str) -> Result<(), DriverError>;
    /// Makes this side primary. Without `force`, a secondary whose primary was not demoted
    /// is refused. Returns the divergence point of a forced promote, if any.
    async fn promote(&self, volume_id: &str, force: bool) -> Result<Option<String>, DriverError>;
    async fn demote(&self, volume_id: &str) -> Result<(), DriverError>;
    /// Resynchronises a demoted volume from its peer. Returns whether it is in sync.
    async fn resync(&self, volume_id: &str) -> Result<bool, DriverError>;
    async fn replication_info(&self, volume_id: &str) -> Result<ReplicationState, DriverError>;
    /// How many times the backend's data-plane process was restarted since the agent
    /// started (after it died or hung); 0 for a backend without one.
    fn backend_restarts(&self) -> u64 {
        0
    }

    /// On a primary: the bytes a sync now would ship for this volume (what changed since
    /// the point the peer holds, or everything without one); `None` when the driver cannot
    /// tell or the volume is not a primary. Used for predictions, so it may cost some work.
    async fn pending_bytes(&self, volume_id: &str) -> Result<Option<u64>, DriverError> {
        let _ = volume_id;
        Ok(None)
    }

    /// Source side: takes a crash-consistent recovery point of the group's primary volumes
    /// on this backend and ships it to the peer. With `final_sync`, writes are stopped
    /// first, and the volumes are demoted once the peer acknowledged the point.
    async fn sync_group(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError>;

    /// Target side: applies one recovery point atomically: after `Incoming::Commit` every
    /// volume of the point is at the new point; on anything else none changed.
    async fn apply_recovery_point(
        &self,
        header: ApplyHeader,
        incoming: tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError>;

    /// Gives the driver the agent's fencing records, so the recovery points it ships carry
    /// its highest epoch for their group ([`Fences::group_epoch`]). Called once by the
    /// server before it serves; drivers that ship points keep it.
    fn attach_fences(&self, _fences: Fences) {}

    /// Secondary side, for a non-disruptive test failover: a writable clone of
    /// `volume_id`'s newest complete recovery point, served like a volume, named
    /// `clone_id`. The replica itself is not touched and keeps taking points. The same
    /// `clone_id` again returns the same clone.
    async fn clone_recovery_point(&self, volume_id: &str, clone_id: &str) -> Result<CloneInfo, DriverError> {
        let _ = (volume_id, clone_id);
        Err(DriverError::Unsupported(format!(
            "the {} driver cannot clone recovery points (no `{}` capability)",
            self.name(),
            capability::CLONE_RECOVERY_POINT
        )))
    }

    /// Removes a clone (one that is gone counts as removed).
    async fn delete_clone(&self, clone_id: &str) -> Result<(), DriverError> {
        let _ = clone_id;
        Ok(())
    }

    /// Fenced on return: the replicated groups this side was primary for when the driver
    /// opened, whose writes it holds (read-only or no export) until the orchestrator
    /// confirms this side is still their primary. Drivers that serve no writes hold none.
    fn held_groups(&self) -> Vec<HeldGroup> {
        Vec::new()
    }

    /// Ends the hold on a group's writes: the orchestrator confirmed this side.
    async fn release_group(&self, _group_id: &str) -> Result<(), DriverError> {
        Ok(())
    }

    /// How often each replicated group on this backend should be synced, and to which
    /// backend, for the agent's scheduler. Only groups this side is primary for.
    fn sync_schedule(&self) -> Vec<ScheduledSync> {
        Vec::new()
    }
}
