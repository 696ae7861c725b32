//! Persisted records and their keys. Records are JSON under the store prefix; anything a
//! resume needs is in them (DESIGN.md: the orchestrator holds no authoritative state in
//! memory).

use std::collections::BTreeMap;

use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// Record keys.
pub mod keys {
    pub fn site(name: &str) -> String {
        format!("sites/{name}")
    }
    pub const SITES: &str = "sites/";
    pub fn backend(name: &str) -> String {
        format!("backends/{name}")
    }
    pub const BACKENDS: &str = "backends/";
    /// Every agent registration.
    pub const AGENTS: &str = "agents/";
    pub fn agents_of(backend: &str) -> String {
        format!("agents/{backend}/")
    }
    pub fn agent(backend: &str, agent_id: &str) -> String {
        format!("agents/{backend}/{agent_id}")
    }
    pub fn group_type(name: &str) -> String {
        format!("group_types/{name}")
    }
    pub const GROUP_TYPES: &str = "group_types/";
    pub fn volume(id: &str) -> String {
        format!("volumes/{id}")
    }
    pub const VOLUMES: &str = "volumes/";
    pub fn volume_name(project: &str, name: &str) -> String {
        format!("names/volumes/{project}/{name}")
    }
    pub fn group(id: &str) -> String {
        format!("groups/{id}")
    }
    pub const GROUPS: &str = "groups/";
    /// A group's history events, a key each, newest first in key order (see
    /// [`super::GroupRec::event_writes`]).
    pub fn group_events(id: &str) -> String {
        format!("group-events/{id}/")
    }
    pub const GROUP_EVENTS: &str = "group-events/";
    /// Latest time an event key can hold: keys store it minus the event's time.
    const EVENT_TIME_TOP: i64 = 9_999_999_999_999;
    /// The key of a group's event at `at_ms`: the time inverted (a range reads the
    /// newest first), then `salt` (two events of one group in one millisecond apart).
    pub fn group_event(id: &str, at_ms: i64, salt: u32) -> String {
        format!("{}{:013}-{:06x}", group_events(id), EVENT_TIME_TOP.saturating_sub(at_ms).max(0), salt & 0xff_ffff)
    }
    /// The time of an event from its key's part after `group-events/<id>/`.
    pub fn group_event_time(suffix: &[u8]) -> Option<i64> {
        let inverted = std::str::from_utf8(suffix).ok()?.split('-').next()?.parse::<i64>().ok()?;
        Some(EVENT_TIME_TOP - inverted)
    }
    pub fn group_name(project: &str, name: &str) -> String {
        format!("names/groups/{project}/{name}")
    }
    pub fn snapshot(id: &str) -> String {
        format!("snapshots/{id}")
    }
    pub const SNAPSHOTS: &str = "snapshots/";
    pub fn snapshot_name(project: &str, name: &str) -> String {
        format!("names/snapshots/{project}/{name}")
    }
    /// Index: the snapshots that hold volume `volume` (one key per member of each
    /// snapshot), written and deleted in the transactions that write and delete the
    /// snapshot's record. Read instead of every snapshot when a volume is deleted or
    /// unmanaged.
    pub fn volume_snapshots(volume: &str) -> String {
        format!("index/volume-snapshots/{volume}/")
    }
    pub fn volume_snapshot(volume: &str, snapshot: &str) -> String {
        format!("{}{snapshot}", volume_snapshots(volume))
    }
    /// Index: the volumes made from snapshot `snapshot`, written and deleted with the
    /// volume's record. Read instead of every volume when a snapshot is deleted.
    pub fn snapshot_volumes(snapshot: &str) -> String {
        format!("index/snapshot-volumes/{snapshot}/")
    }
    pub fn snapshot_volume(snapshot: &str, volume: &str) -> String {
        format!("{}{volume}", snapshot_volumes(snapshot))
    }
    /// Present once the two indexes above hold every record of the store (written by
    /// the first orchestrator that starts on a store, after it built them).
    pub const DEPENDENCY_INDEX_BUILT: &str = "migrations/dependency-index";
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The most volumes a group holds, and the most one update adds and removes together.
/// A group's writes put every member's record in one transaction (create, update,
/// delete, each replication step, a group snapshot's submit), beside a few keys of their
/// own; etcd refuses a transaction of more than 128 comparisons or operations (its
/// default `--max-txn-ops`). 100 leaves room for those few on etcd's default, and the
/// embedded store keeps the same rule so a group made on one store works on the other.
pub const MAX_GROUP_VOLUMES: usize = 100;

/// Replication status values (Cinder's vocabulary).
pub mod replication_status {
    pub const DISABLED: &str = "disabled";
    pub const ENABLING: &str = "enabling";
    pub const ENABLED: &str = "enabled";
    pub const FAILING_OVER: &str = "failing-over";
    pub const FAILED_OVER: &str = "failed-over";
    pub const FAILING_BACK: &str = "failing-back";
    pub const DISABLING: &str = "disabling";
    pub const ERROR: &str = "error";
    pub const NOT_CAPABLE: &str = "not-capable";

    /// States an operation is in the middle of; none may be left behind.
    pub fn is_transient(s: &str) -> bool {
        matches!(s, ENABLING | FAILING_OVER | FAILING_BACK | DISABLING)
    }
}

/// Volume status values.
pub mod volume_status {
    pub const CREATING: &str = "creating";
    pub const AVAILABLE: &str = "available";
    pub const EXTENDING: &str = "extending";
    pub const DELETING: &str = "deleting";
    pub const ERROR: &str = "error";
}

/// Snapshot status values.
pub mod snapshot_status {
    pub const CREATING: &str = "creating";
    pub const AVAILABLE: &str = "available";
    pub const DELETING: &str = "deleting";
    pub const ERROR: &str = "error";
}

/// A snapshot of one volume, or of a group's volumes at one instant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRec {
    pub id: String,
    pub name: String,
    pub project: String,
    /// The group of a group snapshot; empty for a volume snapshot.
    #[serde(default)]
    pub group_id: String,
    pub backend: String,
    pub status: String,
    #[serde(default)]
    pub status_reason: String,
    pub created_at_ms: i64,
    pub members: Vec<SnapshotMemberRec>,
    #[serde(default)]
    pub pending: Option<PendingOp>,
    /// The execution that took it, or the last that changed it.
    #[serde(default)]
    pub execution_id: String,
    /// Taken over with its volume by a manage: the backend's reference of it. Such a
    /// snapshot is inside the image, and goes back with it when the volume is unmanaged;
    /// one taken through Drover (empty here) is not, and holds an unmanage off.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub adopted_from: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMemberRec {
    pub volume_id: String,
    pub volume_name: String,
    pub size_bytes: u64,
}

impl SnapshotRec {
    /// The API form; `note` says which members are no longer active at its backend.
    pub fn to_pb(&self, note: String) -> pb::Snapshot {
        pb::Snapshot {
            id: self.id.clone(),
            name: self.name.clone(),
            project: self.project.clone(),
            group_id: self.group_id.clone(),
            backend: self.backend.clone(),
            status: self.status.clone(),
            status_reason: self.status_reason.clone(),
            created_at_ms: self.created_at_ms,
            members: self
                .members
                .iter()
                .map(|m| pb::SnapshotMember {
                    volume_id: m.volume_id.clone(),
                    volume_name: m.volume_name.clone(),
                    size_bytes: m.size_bytes as i64,
                })
                .collect(),
            note,
            execution_id: self.execution_id.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteRec {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendRec {
    pub name: String,
    pub site: String,
    pub driver: String,
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub frozen: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRec {
    pub agent_id: String,
    pub site: String,
    pub backend: String,
    pub endpoint: String,
    pub driver: String,
    pub driver_version: String,
    pub capabilities: Vec<String>,
    pub registered_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupTypeRec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub specs: BTreeMap<String, String>,
    #[serde(default)]
    pub builtin: bool,
}

/// The Cinder spec value that switches a boolean group spec on.
pub const SPEC_TRUE: &str = "<is> True";
pub const SPEC_REPLICATION: &str = "group_replication_enabled";
pub const SPEC_CONSISTENT_SNAPSHOT: &str = "consistent_group_snapshot_enabled";

impl GroupTypeRec {
    /// Whether groups of this type replicate.
    pub fn replicates(&self) -> bool {
        self.specs.get(SPEC_REPLICATION).is_some_and(|v| v == SPEC_TRUE)
    }

    /// The built-in types, seeded at start.
    pub fn builtins() -> Vec<GroupTypeRec> {
        let t = |name: &str, description: &str, specs: &[&str]| GroupTypeRec {
            name: name.into(),
            description: description.into(),
            specs: specs.iter().map(|k| (k.to_string(), SPEC_TRUE.to_string())).collect(),
            builtin: true,
        };
        vec![
            t("consistency", "crash-consistent group snapshots", &[SPEC_CONSISTENT_SNAPSHOT]),
            t("replication", "replicated and failed over together", &[SPEC_REPLICATION]),
            t(
                "consistent-replication",
                "replicated together from crash-consistent group snapshots",
                &[SPEC_CONSISTENT_SNAPSHOT, SPEC_REPLICATION],
            ),
        ]
    }
}

/// An operation in progress, persisted before any agent is called (intent first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    pub op_id: String,
    /// create, delete, extend (volumes); enable, disable, failover, failback (groups).
    pub action: String,
    /// The backend the operation moves to or replicates to, when it has one.
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub new_size_bytes: u64,
    pub started_at_ms: i64,
    /// Manage: the backend's reference of the volume to take over. Failback: the backend
    /// whose divergent changes the operator chose to discard.
    #[serde(default)]
    pub reference: String,
    /// Manage: the snapshots the volume carries on the backend, to take over with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<AdoptedSnapshot>,
    /// Extend and unmanage: the volume's status before it began (empty: available), which
    /// it goes back to when the backend refuses.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prior_status: String,
}

/// A snapshot taken over with a managed volume: the backend's reference, and the id and
/// name it gets (chosen, and the name reserved, when the manage is submitted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedSnapshot {
    pub reference: String,
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub created_at_ms: i64,
}

impl PendingOp {
    /// A new operation with a fresh op_id; callers set the fields their action uses.
    pub fn new(action: &str, target: &str) -> Self {
        Self {
            op_id: uuid::Uuid::now_v7().to_string(),
            action: action.into(),
            target: target.into(),
            force: false,
            new_size_bytes: 0,
            started_at_ms: now_ms(),
            reference: String::new(),
            snapshots: Vec::new(),
            prior_status: String::new(),
        }
    }

    /// The status a refused extend or unmanage puts its volume back to.
    pub fn prior_status(&self) -> String {
        if self.prior_status.is_empty() { volume_status::AVAILABLE.to_string() } else { self.prior_status.clone() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: String,
    pub name: String,
    pub project: String,
    pub size_bytes: u64,
    pub backend: String,
    pub active_backend: String,
    #[serde(default)]
    pub group_id: String,
    pub status: String,
    pub replication_status: String,
    #[serde(default)]
    pub status_reason: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub pending: Option<PendingOp>,
    /// Made from a snapshot: the snapshot, and which of its volumes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot_volume_id: String,
}

impl VolumeRec {
    pub fn to_pb(&self) -> pb::Volume {
        pb::Volume {
            id: self.id.clone(),
            name: self.name.clone(),
            project: self.project.clone(),
            size_bytes: self.size_bytes as i64,
            backend: self.backend.clone(),
            active_backend: self.active_backend.clone(),
            group_id: self.group_id.clone(),
            status: self.status.clone(),
            replication_status: self.replication_status.clone(),
            status_reason: self.status_reason.clone(),
            created_at_ms: self.created_at_ms,
        }
    }
}

impl GroupEventRec {
    pub fn to_pb(&self) -> pb::GroupEvent {
        pb::GroupEvent {
            at_ms: self.at_ms,
            action: self.action.clone(),
            detail: crate::error::tidy(&self.detail),
            epoch: self.epoch,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEventRec {
    pub at_ms: i64,
    pub action: String,
    pub detail: String,
    pub epoch: u64,
}

/// How many of its newest history events a group shows with it (`drover group show`);
/// `drover group history` pages through all it keeps.
pub const HISTORY_LIMIT: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRec {
    pub id: String,
    pub name: String,
    pub project: String,
    pub group_type: String,
    pub volume_ids: Vec<String>,
    pub primary_backend: String,
    pub active_backend: String,
    #[serde(default)]
    pub replication_target: String,
    pub replication_status: String,
    #[serde(default)]
    pub status_reason: String,
    /// The epoch of the latest transition (the store revision that wrote it).
    #[serde(default)]
    pub epoch: u64,
    /// Events not yet in their own keys: those recorded since the record was read (and,
    /// in records written before history moved out, the old inline ones). Every write
    /// of the group stores them with it ([`GroupRec::writes`]), so the stored record
    /// keeps none and stays the same size however many transitions the group has seen.
    #[serde(default, skip_serializing)]
    pub history: Vec<GroupEventRec>,
    pub created_at_ms: i64,
    #[serde(default)]
    pub pending: Option<PendingOp>,
    /// Seconds between recovery points.
    #[serde(default = "default_interval")]
    pub sync_interval_seconds: i64,
    /// Set by a disaster failover: the recovery point the two sides diverged at.
    #[serde(default)]
    pub divergence_point: String,
    /// Free-form labels, for runbook selectors.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Runbook priority tier: 1 runs first, 9 last.
    #[serde(default = "default_tier")]
    pub tier: u32,
    /// The group of one that replicates this volume on its own (hidden from listings).
    #[serde(default)]
    pub for_volume: String,
    /// The newest recovery point taken with the group's instances quiesced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_consistent_point: String,
}

/// The tiers groups may have: 1 (first) to 9 (last).
pub const TIERS: std::ops::RangeInclusive<u32> = 1..=9;

/// The tier of a group nobody placed.
pub const DEFAULT_TIER: u32 = 5;

fn default_tier() -> u32 {
    DEFAULT_TIER
}

/// The default seconds between recovery points.
pub const DEFAULT_SYNC_INTERVAL_SECONDS: i64 = 30;

fn default_interval() -> i64 {
    DEFAULT_SYNC_INTERVAL_SECONDS
}

impl GroupRec {
    pub fn to_pb(&self) -> pb::Group {
        pb::Group {
            id: self.id.clone(),
            name: self.name.clone(),
            project: self.project.clone(),
            group_type: self.group_type.clone(),
            volume_ids: self.volume_ids.clone(),
            primary_backend: self.primary_backend.clone(),
            active_backend: self.active_backend.clone(),
            replication_target: self.replication_target.clone(),
            replication_status: self.replication_status.clone(),
            status_reason: crate::error::tidy(&self.status_reason),
            epoch: self.epoch,
            history: self.history.iter().map(GroupEventRec::to_pb).collect(),
            created_at_ms: self.created_at_ms,
            sync_interval_seconds: self.sync_interval_seconds,
            divergence_point: self.divergence_point.clone(),
            rpo_ms: -1,
            labels: self.labels.clone().into_iter().collect(),
            tier: self.tier,
            for_volume: self.for_volume.clone(),
            predicted_final_sync_bytes: -1,
            predicted_final_sync_ms: -1,
            app_consistent_point: self.app_consistent_point.clone(),
        }
    }

    /// Records a history event; the next write of the group stores it.
    pub fn record(&mut self, action: &str, detail: String, epoch: u64) {
        self.history.push(GroupEventRec { at_ms: now_ms(), action: action.into(), detail, epoch });
    }

    /// The writes that store the group: its record (without history) and a key per
    /// event recorded since it was read. Every write of a group goes through here.
    pub fn writes(&self) -> Vec<drover_store::TxnOp> {
        let mut ops = vec![crate::repo::put(&keys::group(&self.id), self)];
        ops.extend(self.event_writes());
        ops
    }

    /// A key per event in [`GroupRec::history`]: `group-events/<id>/<newest first>`,
    /// the time inverted so a range reads the newest first, then a random suffix (two
    /// events of one group in one millisecond stay apart). Storing an event twice (a
    /// record's old inline events, kept in memory after a write) only writes the same
    /// content under a second key: readers drop such duplicates.
    fn event_writes(&self) -> Vec<drover_store::TxnOp> {
        self.history
            .iter()
            .map(|e| crate::repo::put(&keys::group_event(&self.id, e.at_ms, fastrand::u32(..)), e))
            .collect()
    }
}
