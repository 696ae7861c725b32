//! Request validation and conversions between the agent protocol and driver types.

use drover_proto::agent::v1 as pb;
use tonic::Status;

use crate::driver::{DriverError, ReplicationState, Role, VolumeState};

pub(super) fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is required")));
    }
    Ok(())
}

pub(super) fn size(field: &str, v: i64) -> Result<u64, Status> {
    u64::try_from(v)
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| Status::invalid_argument(format!("`{field}` must be positive, got {v}")))
}

pub(super) fn volume_info(v: VolumeState) -> pb::VolumeInfo {
    pb::VolumeInfo {
        volume_id: v.volume_id,
        size_bytes: v.size_bytes as i64,
        replication_role: v.role.map(|r| r.as_str().to_string()).unwrap_or_default(),
    }
}

pub(super) fn role_to_pb(role: Option<Role>) -> i32 {
    match role {
        None => pb::ReplicationRole::Unspecified as i32,
        Some(Role::Primary) => pb::ReplicationRole::Primary as i32,
        Some(Role::Secondary) => pb::ReplicationRole::Secondary as i32,
    }
}

pub(super) fn replication_info(volume_id: String, s: ReplicationState) -> pb::ReplicationInfo {
    pb::ReplicationInfo {
        volume_id,
        role: role_to_pb(s.role),
        status: s.status,
        last_sync_time_ms: s.last_sync_time_ms,
        last_sync_duration_ms: s.last_sync_duration_ms,
        last_sync_bytes: s.last_sync_bytes,
        recovery_point_id: s.recovery_point_id,
        error: s.error,
        pending_bytes: -1,
    }
}

pub(super) fn driver_err(e: DriverError) -> Status {
    e.to_status()
}
