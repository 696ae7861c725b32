//! Helpers several services use: loading a writable backend or a group type, mapping an
//! agent's error into an API error, a group's replication info and RPO, and the snapshot
//! a new volume is made from. They live
//! here, below the services, so no service imports another.

use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use tonic::{Code, Status};

use super::Core;
use crate::agents::Deadline;
use crate::error::{ApiError, ApiResult};
use drover_store::Compare;

use crate::model::{
    BackendRec, GroupRec, GroupTypeRec, SnapshotMemberRec, SnapshotRec, VolumeRec, keys, now_ms, snapshot_status,
};
use crate::repo::{Versioned, validate_name};

/// Errors from an agent that no retry can fix (the one classifier decides).
pub fn agent_refused(s: &Status) -> bool {
    crate::agents::classify(s) == crate::agents::Failure::Terminal
}

/// Maps an agent's status into an API error that names the backend.
pub fn from_agent(backend: &str, what: &str, s: &Status) -> ApiError {
    let msg = format!("backend {backend} could not {what}: {}", s.message());
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => ApiError::InvalidArgument(msg),
        Code::NotFound => ApiError::NotFound(msg),
        Code::AlreadyExists => ApiError::AlreadyExists(msg),
        Code::FailedPrecondition | Code::Unimplemented => ApiError::FailedPrecondition(msg),
        Code::Aborted => ApiError::Aborted(format!("{msg}; retry shortly")),
        _ => ApiError::Unavailable(format!("{msg}; check the agent with `drover backend show {backend}`")),
    }
}

/// Loads a backend that must accept management changes.
pub async fn writable_backend(core: &Core, name: &str, capability: &str) -> ApiResult<BackendRec> {
    validate_name("backend", name)?;
    let b = core.repo.get::<BackendRec>(&keys::backend(name)).await?.ok_or_else(|| {
        ApiError::NotFound(format!("backend {name:?} not found; list backends with `drover backend list`"))
    })?;
    if b.rec.frozen {
        return Err(ApiError::FailedPrecondition(format!(
            "backend {name} is frozen: management changes are blocked; thaw it with `drover backend thaw {name}`"
        )));
    }
    if !b.rec.capabilities.iter().any(|c| c == capability) {
        return Err(ApiError::FailedPrecondition(format!(
            "backend {name} (driver {}) lacks the `{capability}` capability",
            b.rec.driver
        )));
    }
    Ok(b.rec)
}

/// Loads a group type by name.
pub async fn group_type(core: &Core, name: &str) -> ApiResult<GroupTypeRec> {
    validate_name("group_type", name)?;
    Ok(core
        .repo
        .get::<GroupTypeRec>(&keys::group_type(name))
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("group type {name:?} not found; list them with `drover group-type list`"))
        })?
        .rec)
}

/// Each volume's replication state, asked of the agent serving it now (all at once, each
/// with the probe deadline, so a dead site costs one deadline, not one per volume).
pub async fn volume_infos(core: &Core, g: &GroupRec) -> ApiResult<Vec<pb::VolumeReplicationInfo>> {
    Ok(volume_infos_with(core, g, false).await?.into_iter().map(|(v, _)| v).collect())
}

/// [`volume_infos`], each with the bytes a sync now would ship (`estimate`; -1 when not
/// asked or unknown).
pub async fn volume_infos_with(
    core: &Core,
    g: &GroupRec,
    estimate: bool,
) -> ApiResult<Vec<(pb::VolumeReplicationInfo, i64)>> {
    let timeout = Deadline::Probe;
    let mut asks = Vec::new();
    for id in &g.volume_ids {
        let vol = core.repo.get::<VolumeRec>(&keys::volume(id)).await?;
        let backend = vol.map(|v| v.rec.active_backend).unwrap_or_else(|| g.active_backend.clone());
        asks.push(async move {
            let req = apb::GetReplicationInfoRequest { volume_id: id.clone(), estimate_pending: estimate };
            let info = core
                .agents
                .call(&backend, timeout, false, |mut c| {
                    let req = req.clone();
                    async move { c.get_replication_info(req).await }
                })
                .await;
            match info {
                Ok(i) => (
                    pb::VolumeReplicationInfo {
                        volume_id: id.clone(),
                        role: match apb::ReplicationRole::try_from(i.role) {
                            Ok(apb::ReplicationRole::Primary) => "primary".into(),
                            Ok(apb::ReplicationRole::Secondary) => "secondary".into(),
                            _ => String::new(),
                        },
                        status: i.status,
                        last_sync_time_ms: i.last_sync_time_ms,
                        last_sync_duration_ms: i.last_sync_duration_ms,
                        last_sync_bytes: i.last_sync_bytes,
                        recovery_point_id: i.recovery_point_id,
                        error: i.error,
                    },
                    i.pending_bytes,
                ),
                Err(s) => (
                    pb::VolumeReplicationInfo {
                        volume_id: id.clone(),
                        status: "error".into(),
                        error: format!("backend {backend}: {}", s.message()),
                        ..Default::default()
                    },
                    -1,
                ),
            }
        });
    }
    Ok(futures::future::join_all(asks).await)
}

/// The RPO: the age of the newest recovery point complete on every volume; -1 when a
/// volume has none or could not be asked.
pub fn rpo_ms(volumes: &[pb::VolumeReplicationInfo]) -> i64 {
    match volumes.iter().map(|v| v.last_sync_time_ms).min() {
        Some(t) if t > 0 => (now_ms() - t).max(0),
        _ => -1,
    }
}

/// When a recovery point was taken (its id is a UUIDv7).
pub fn point_time_ms(point: &str) -> Option<i64> {
    let u = uuid::Uuid::parse_str(point).ok()?;
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
}

/// The RPO a disaster failover of `g` would achieve now: the age of the newest point
/// every volume holds at the side it would move to, asked of that side alone (the
/// active side may be the one that is lost). -1 when a volume has none there or the
/// side does not answer.
pub async fn target_rpo_ms(core: &Core, g: &GroupRec) -> i64 {
    let to = if g.active_backend == g.replication_target { &g.primary_backend } else { &g.replication_target };
    if to.is_empty() {
        return -1;
    }
    let asks = g.volume_ids.iter().map(|id| async move {
        let req = apb::GetReplicationInfoRequest { volume_id: id.clone(), estimate_pending: false };
        let info = core
            .agents
            .call(to, Deadline::Probe, false, |mut c| {
                let req = req.clone();
                async move { c.get_replication_info(req).await }
            })
            .await
            .ok()?;
        point_time_ms(&info.recovery_point_id)
    });
    let times: Vec<Option<i64>> = futures::future::join_all(asks).await;
    match times.iter().copied().collect::<Option<Vec<i64>>>().and_then(|t| t.into_iter().min()) {
        Some(oldest) if !g.volume_ids.is_empty() => (now_ms() - oldest).max(0),
        _ => -1,
    }
}

/// The snapshot a new volume is made from, checked: the member it copies, and a
/// comparison that keeps the snapshot as read until the volume's intent is written.
pub(crate) async fn snapshot_source(
    core: &Core,
    project: &str,
    snapshot: &str,
    volume: &str,
) -> ApiResult<(Versioned<SnapshotRec>, SnapshotMemberRec, Compare)> {
    let snap = core.repo.snapshot(snapshot, project).await?;
    let s = &snap.rec;
    if s.status != snapshot_status::AVAILABLE {
        return Err(ApiError::FailedPrecondition(format!(
            "snapshot {} is {}; volumes are made only from an available snapshot",
            s.name, s.status
        )));
    }
    let m = match volume {
        "" if s.members.len() == 1 => s.members[0].clone(),
        "" => {
            return Err(ApiError::InvalidArgument(format!(
                "snapshot {} holds {} volumes ({}); name one with `from_volume`",
                s.name,
                s.members.len(),
                s.members.iter().map(|m| m.volume_name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        v => s.members.iter().find(|m| m.volume_id == v || m.volume_name == v).cloned().ok_or_else(|| {
            ApiError::InvalidArgument(format!(
                "snapshot {} holds no volume {v:?}; `drover snapshot show {}` lists the volumes it holds",
                s.name, s.name
            ))
        })?,
    };
    let keep = Compare::ModRevisionEquals(keys::snapshot(&s.id).into_bytes(), snap.rev);
    Ok((snap, m, keep))
}

/// The records an index names, read a page of the index at a time: each index key ends
/// with a record id, and `record_key` gives that record's key. A key whose record is gone
/// is skipped, so a stale index key is harmless. At most `max` records; the flag says
/// whether the index holds more.
pub(crate) async fn indexed<T: serde::de::DeserializeOwned>(
    core: &Core,
    index: &str,
    record_key: fn(&str) -> String,
    max: usize,
) -> ApiResult<(Vec<T>, bool)> {
    let mut out = Vec::new();
    let mut after = Vec::new();
    loop {
        let page = core.repo.store().range_page(index.as_bytes(), &after, 100).await?;
        // The page's records at once (one round trip; on etcd the reads share requests).
        let take = page.kvs.len().min(max - out.len());
        let reads = page.kvs[..take].iter().map(|kv| {
            let id = String::from_utf8_lossy(&kv.key[index.len()..]).into_owned();
            async move { core.repo.get::<T>(&record_key(&id)).await }
        });
        out.extend(futures::future::try_join_all(reads).await?.into_iter().flatten().map(|v| v.rec));
        if take < page.kvs.len() {
            return Ok((out, true));
        }
        match page.kvs.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => return Ok((out, false)),
        }
    }
}

/// The snapshots that hold `volume_id`, by name (for refusing to delete the volume): at
/// most 20, then "and more" if the index names others (not counted).
pub(crate) async fn snapshots_of(core: &Core, volume_id: &str) -> ApiResult<Vec<String>> {
    let (snaps, more) = indexed::<SnapshotRec>(core, &keys::volume_snapshots(volume_id), keys::snapshot, 20).await?;
    let mut names: Vec<String> =
        snaps.into_iter().filter(|s| s.members.iter().any(|m| m.volume_id == volume_id)).map(|s| s.name).collect();
    if more {
        names.push("and more".into());
    }
    Ok(names)
}

/// Builds the snapshot dependency indexes ([`keys::volume_snapshots`],
/// [`keys::snapshot_volumes`]) from every volume and snapshot record, once per store: a
/// store written by an orchestrator from before the indexes has records without them.
/// Runs at start, before any execution resumes or any call is served; several
/// orchestrators starting at once each build them (the writes are the same). Each index
/// key is written only while its record is as read, so a record deleted meanwhile leaves
/// none behind (and one changed is read again).
pub async fn build_dependency_index(repo: &crate::repo::Repo) -> ApiResult<()> {
    use drover_store::{Txn, TxnOp};
    if repo.store().get(keys::DEPENDENCY_INDEX_BUILT.as_bytes()).await?.is_some() {
        return Ok(());
    }
    let (mut volumes, mut snapshots) = (0usize, 0usize);
    for prefix in [keys::VOLUMES, keys::SNAPSHOTS] {
        let mut after = Vec::new();
        loop {
            let page = repo.store().range_page(prefix.as_bytes(), &after, 100).await?;
            for kv in &page.kvs {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let mut seen = Some((kv.value.clone(), kv.mod_revision));
                // Until the index keys land with the record as read, or the record is gone.
                while let Some((value, rev)) = seen.take() {
                    let index: Vec<String> = if prefix == keys::VOLUMES {
                        let v: VolumeRec = serde_json::from_slice(&value)
                            .map_err(|e| ApiError::Internal(format!("volume record {key} is unreadable: {e}")))?;
                        [v.snapshot_id.clone()]
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .map(|s| keys::snapshot_volume(&s, &v.id))
                            .collect()
                    } else {
                        let s: SnapshotRec = serde_json::from_slice(&value)
                            .map_err(|e| ApiError::Internal(format!("snapshot record {key} is unreadable: {e}")))?;
                        s.members.iter().map(|m| keys::volume_snapshot(&m.volume_id, &s.id)).collect()
                    };
                    if index.is_empty() {
                        break;
                    }
                    let txn = index
                        .iter()
                        .fold(Txn::new().when(Compare::ModRevisionEquals(key.clone().into_bytes(), rev)), |t, k| {
                            t.and_then(TxnOp::put(k.clone(), Vec::new()))
                        });
                    if repo.txn(txn).await?.succeeded {
                        if prefix == keys::VOLUMES {
                            volumes += 1;
                        } else {
                            snapshots += 1;
                        }
                    } else {
                        seen = repo.store().get(key.as_bytes()).await?.map(|kv| (kv.value, kv.mod_revision));
                    }
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => after = last.key.clone(),
                _ => break,
            }
        }
    }
    repo.store().put(keys::DEPENDENCY_INDEX_BUILT.as_bytes(), b"1").await?;
    if volumes + snapshots > 0 {
        tracing::info!(volumes, snapshots, "built the snapshot dependency indexes for records written before them");
    }
    Ok(())
}
