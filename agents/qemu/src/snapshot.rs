//! User snapshots, and volumes made from them.
//!
//! A snapshot costs no copy. Like a recovery point it freezes each volume's active layer,
//! with one QMP `transaction` of `blockdev-snapshot` actions for every volume it covers,
//! so a group snapshot is crash-consistent: all its volumes freeze at one instant, and a
//! new empty layer takes each volume's writes from then on. The snapshot is the list of
//! files each volume read through at that instant, bottom to top. Those files are pinned:
//! nothing writes into them or deletes them while the snapshot exists. Chain housekeeping
//! (folding synced points, shortening replicas, merging waiting points) only merges above
//! the highest pinned layer, so each live snapshot costs its volume one layer, and its
//! files stay on disk as long as it exists, also when the volume's chain stops reading
//! through them (a replica that took a full copy).
//!
//! qcow2 internal snapshots were the other choice. They were not taken: an internal
//! snapshot lives inside one file of the chain, while the view a user snapshots is the
//! whole chain, whose upper layers a replicated volume folds down at every sync.
//!
//! A volume made from a snapshot is a new chain whose bottom layer is an overlay on the
//! snapshot's top file. It opens its own read-only nodes of the snapshot's files (without
//! file locks: pinned files never change), so it shares no node with the source and is
//! independent of it: writes to either land in their own active layers. Deleting a
//! snapshot that such a volume reads through is refused, not flattened: delete the volume
//! first. Deleting or unmanaging a volume that has snapshots is refused the same way.
//!
//! Snapshots are local to the backend they were taken on: they are not replicated.

use std::collections::BTreeSet;

use super::*;
use state::{Origin, SnapMember, SnapRec};

/// Ids name files and nodes: letters, digits, '-', '_' and '.' only.
pub(crate) fn check_id(what: &str, id: &str) -> Result<(), DriverError> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(DriverError::InvalidArgument(format!(
            "{what} id {id:?} must be 1 to 128 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

impl QemuDriver {
    /// The lock that orders changes to a volume's chain: its group's, or its own when it is
    /// in no replicated group.
    fn chain_lock(&self, id: &str, v: &Vol) -> Arc<tokio::sync::Mutex<()>> {
        if v.group_id.is_empty() { self.group_lock(&format!("volume/{id}")) } else { self.group_lock(&v.group_id) }
    }

    /// The snapshots `volume_id` is a member of.
    pub(crate) fn snapshots_of(&self, volume_id: &str) -> Vec<String> {
        let st = self.state.lock().expect("state poisoned");
        st.snapshots.iter().filter(|(_, s)| s.members.contains_key(volume_id)).map(|(id, _)| id.clone()).collect()
    }

    /// Refuses to delete or hand back a volume that snapshots read through.
    pub(crate) fn refuse_with_snapshots(&self, volume_id: &str, verb: &str) -> Result<(), DriverError> {
        let snaps = self.snapshots_of(volume_id);
        if snaps.is_empty() {
            return Ok(());
        }
        Err(DriverError::FailedPrecondition(format!(
            "volume {volume_id} has {} snapshot(s) ({}); delete them before it can be {verb}",
            snaps.len(),
            snaps.join(", ")
        )))
    }

    fn info(snapshot_id: &str, s: &SnapRec) -> GroupSnapshotInfo {
        GroupSnapshotInfo {
            snapshot_id: snapshot_id.to_string(),
            volume_ids: s.members.keys().cloned().collect(),
            created_at_ms: s.created_ms,
        }
    }

    pub(crate) async fn do_snapshot(
        &self,
        snapshot_id: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshotInfo, DriverError> {
        check_id("snapshot", snapshot_id)?;
        let wanted: BTreeSet<&String> = volume_ids.iter().collect();
        if wanted.is_empty() || wanted.len() != volume_ids.len() {
            return Err(DriverError::InvalidArgument(
                "a snapshot names each of its volumes once, and at least one".into(),
            ));
        }
        let same = |s: &SnapRec| s.members.keys().collect::<BTreeSet<_>>() == wanted;
        if let Some(s) = self.snapshot_state().snapshots.get(snapshot_id) {
            return if same(s) {
                Ok(Self::info(snapshot_id, s))
            } else {
                Err(DriverError::AlreadyExists(format!(
                    "snapshot {snapshot_id} exists already, of other volumes; pick another id"
                )))
            };
        }
        // Every chain involved is locked (in one order, so two snapshots cannot deadlock).
        let mut locks = BTreeMap::new();
        for id in volume_ids {
            let v = self.vol(id)?;
            let key = if v.group_id.is_empty() { format!("volume/{id}") } else { v.group_id.clone() };
            locks.insert(key, self.chain_lock(id, &v));
        }
        let mut _held = Vec::new();
        for lock in locks.values() {
            _held.push(lock.clone().lock_owned().await);
        }
        let vols: Vec<Vol> = volume_ids.iter().map(|id| self.vol(id)).collect::<Result<_, _>>()?;
        for (id, v) in volume_ids.iter().zip(&vols) {
            if !v.writable() {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {id} is a secondary replica on this backend; snapshots are taken where the volume \
                     serves writes (its primary)"
                )));
            }
        }
        // 1. Empty overlays, recorded before the freeze (intent first: an empty layer on
        //    top changes nothing if the freeze never happens).
        let mut seqs = Vec::new();
        for (id, v) in volume_ids.iter().zip(&vols) {
            let seq = v.top().seq + 1;
            image::create(&self.layer_path(id, seq), v.size_bytes, Some(&self.layer_path(id, v.top().seq))).await?;
            seqs.push(seq);
        }
        self.update(|st| {
            for (id, seq) in volume_ids.iter().zip(&seqs) {
                let v = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                v.layers.push(Layer { seq: *seq, rp: None, acked: false, rp_created_ms: 0 });
            }
            Ok(())
        })
        .await?;
        // 2. One transaction freezes every volume at the same instant.
        let mut pairs = Vec::new();
        for ((id, v), seq) in volume_ids.iter().zip(&vols).zip(&seqs) {
            self.daemon().add_qcow2(&node(v, *seq), &self.layer_path(id, *seq), commands::Backing::None, true).await?;
            pairs.push((node(v, v.top().seq), node(v, *seq)));
        }
        let actions: Vec<commands::Snapshot> =
            pairs.iter().map(|(n, o)| commands::Snapshot { node: n, overlay: o }).collect();
        let created_ms = now_ms();
        let frozen_at = Instant::now();
        self.daemon().snapshot_all(&actions).await?;
        let pause_us = frozen_at.elapsed().as_micros() as u64;
        // 3. The snapshot: what each volume read through at that instant.
        let mut members = BTreeMap::new();
        for (id, v) in volume_ids.iter().zip(&vols) {
            let mut files: Vec<PathBuf> = v.origin.iter().flat_map(|o| o.files.iter().cloned()).collect();
            files.extend(v.layers.iter().map(|l| self.layer_path(id, l.seq)));
            members.insert(id.clone(), SnapMember { files, size_bytes: v.size_bytes });
        }
        let rec = SnapRec { created_ms, internal: String::new(), members };
        self.update(|st| {
            st.snapshots.insert(snapshot_id.to_string(), rec.clone());
            Ok(())
        })
        .await?;
        tracing::info!(snapshot = snapshot_id, volumes = volume_ids.len(), pause_us, "snapshot taken");
        Ok(Self::info(snapshot_id, &rec))
    }

    pub(crate) async fn do_delete_snapshot(&self, snapshot_id: &str) -> Result<(), DriverError> {
        let st = self.snapshot_state();
        let Some(s) = st.snapshots.get(snapshot_id).cloned() else { return Ok(()) };
        let made: Vec<&String> = st
            .volumes
            .iter()
            .filter(|(_, v)| v.origin.as_ref().is_some_and(|o| o.snapshot_id == snapshot_id))
            .map(|(id, _)| id)
            .collect();
        if !made.is_empty() {
            return Err(DriverError::FailedPrecondition(format!(
                "volume(s) {} were made from snapshot {snapshot_id} and read through it; delete them first \
                 (snapshots are not flattened into the volumes made from them)",
                made.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        self.update(|st| {
            st.snapshots.remove(snapshot_id);
            Ok(())
        })
        .await?;
        // Files no chain, clone or snapshot reads through any more.
        let st = self.snapshot_state();
        let live: BTreeSet<PathBuf> = st
            .volumes
            .iter()
            .flat_map(|(id, v)| {
                let own = v.layers.iter().map(move |l| self.layer_path(id, l.seq));
                v.origin.iter().flat_map(|o| o.files.iter().cloned()).chain(own).collect::<Vec<_>>()
            })
            .collect();
        for f in s.members.values().flat_map(|m| m.files.iter()) {
            if !live.contains(f) && !st.pins(f) {
                let _ = std::fs::remove_file(f);
            }
        }
        // A volume that syncs folds its freed layers at its next sync; one that does not
        // is folded now, so that taking and deleting snapshots does not grow its chain.
        for id in s.members.keys() {
            if let Err(e) = self.compact(id).await {
                tracing::warn!(volume = %id, error = %e, "could not fold the layers a deleted snapshot freed; they stay");
            }
        }
        tracing::info!(snapshot = snapshot_id, "snapshot deleted");
        Ok(())
    }

    /// Folds the unpinned frozen layers of a volume that is not replicated into the lowest
    /// layer it may write into.
    async fn compact(&self, id: &str) -> Result<(), DriverError> {
        let Ok(v) = self.vol(id) else { return Ok(()) };
        if v.role.is_some() || v.layers.len() < 3 {
            return Ok(());
        }
        let lock = self.chain_lock(id, &v);
        let _g = lock.lock().await;
        let v = self.vol(id)?;
        let base = self.pinned_top(id, &v).map_or(0, |p| p + 1);
        let top = v.layers.len() - 2;
        if top <= base {
            return Ok(());
        }
        let dropped = self.fold(&v, base, top).await?;
        self.update(|st| {
            let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
            sv.layers.retain(|l| !dropped.contains(&l.seq));
            Ok(())
        })
        .await?;
        for seq in dropped {
            let _ = std::fs::remove_file(self.layer_path(id, seq));
        }
        Ok(())
    }

    pub(crate) async fn do_create_from_snapshot(
        &self,
        volume_id: &str,
        size_bytes: u64,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<VolumeState, DriverError> {
        let st = self.snapshot_state();
        let Some(member) = st.snapshots.get(snapshot_id).and_then(|s| s.members.get(source_volume_id)).cloned() else {
            return Err(DriverError::NotFound(format!(
                "snapshot {snapshot_id} of volume {source_volume_id} does not exist on this backend (snapshots are \
                 not replicated: they live where they were taken)"
            )));
        };
        if size_bytes < member.size_bytes {
            return Err(DriverError::InvalidArgument(format!(
                "size {size_bytes} is smaller than the snapshot's {} bytes; a volume made from it is at least as large",
                member.size_bytes
            )));
        }
        if let Some(v) = st.volumes.get(volume_id) {
            let same =
                v.origin.as_ref().is_some_and(|o| o.snapshot_id == snapshot_id && o.volume_id == source_volume_id);
            return if same && v.size_bytes == size_bytes {
                Ok(Self::view(volume_id, v))
            } else {
                Err(DriverError::AlreadyExists(format!("volume {volume_id} already exists; pick another id")))
            };
        }
        let top = member.files.last().cloned().ok_or_else(|| {
            DriverError::Internal(format!("snapshot {snapshot_id} of {source_volume_id} lists no files"))
        })?;
        std::fs::create_dir_all(self.vol_dir(volume_id)).map_err(|e| io("volume dir", e))?;
        image::create(&self.layer_path(volume_id, 0), size_bytes, Some(&top)).await?;
        let origin = Origin {
            snapshot_id: snapshot_id.to_string(),
            volume_id: source_volume_id.to_string(),
            files: member.files,
        };
        let v = self
            .update(|st| {
                let mut v = Vol::new(st.next_index, size_bytes, vec![Layer::fresh()], None);
                v.origin = Some(origin);
                st.next_index += 1;
                st.volumes.insert(volume_id.to_string(), v.clone());
                Ok(v)
            })
            .await?;
        self.open_chain(volume_id, &v).await?;
        tracing::info!(
            volume = volume_id,
            snapshot = snapshot_id,
            source = source_volume_id,
            "volume made from a snapshot"
        );
        Ok(Self::view(volume_id, &v))
    }
}
