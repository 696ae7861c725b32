//! Clones of a replica's recovery point, for non-disruptive test failover: a new qcow2
//! overlay in `<pool>/clones/` on top of the replica's newest complete layer, opened and
//! exported writable under the clone's id. The replica chain is not touched: new points
//! go on top as usual, and the layers a clone reads through stay on disk (not merged,
//! not deleted) until the clone is gone.

use super::*;
use state::CloneRec;

fn clone_node(c: &CloneRec) -> String {
    format!("k{}", c.index)
}

fn clone_export(c: &CloneRec) -> String {
    format!("x{}", c.index)
}

impl QemuDriver {
    fn clone_path(&self, clone_id: &str) -> PathBuf {
        self.pool.join("clones").join(format!("{clone_id}.qcow2"))
    }

    /// Whether some clone or snapshot reads through this file.
    pub(crate) fn pinned(&self, file: &Path) -> bool {
        self.state.lock().expect("state poisoned").pins(file)
    }

    /// The index of the highest layer of `v` that a clone or snapshot reads through:
    /// chain housekeeping merges only above it.
    pub(crate) fn pinned_top(&self, id: &str, v: &Vol) -> Option<usize> {
        let st = self.state.lock().expect("state poisoned");
        v.layers.iter().rposition(|l| st.pins(&self.layer_path(id, l.seq)))
    }

    /// Whether some clone reads through a layer of this volume.
    pub(crate) fn has_clones(&self, volume_id: &str) -> bool {
        self.state.lock().expect("state poisoned").clones.values().any(|c| c.volume_id == volume_id)
    }

    pub(crate) async fn open_clone(&self, clone_id: &str, c: &CloneRec) -> Result<(), DriverError> {
        let d = self.daemon();
        d.add_qcow2(&clone_node(c), &self.clone_path(clone_id), commands::Backing::FromImage, true).await?;
        d.add_export(&clone_export(c), &clone_node(c), clone_id, true).await
    }

    fn clone_info(&self, clone_id: &str, c: &CloneRec) -> drover_agent::driver::CloneInfo {
        drover_agent::driver::CloneInfo {
            clone_id: clone_id.to_string(),
            volume_id: c.volume_id.clone(),
            recovery_point_id: c.recovery_point_id.clone(),
            connection: Connection { driver_volume_type: "nbd".into(), uri: self.daemon().nbd().uri(clone_id) },
        }
    }

    pub(crate) async fn do_clone(
        &self,
        volume_id: &str,
        clone_id: &str,
    ) -> Result<drover_agent::driver::CloneInfo, DriverError> {
        if clone_id.is_empty() || !clone_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(DriverError::InvalidArgument(format!(
                "clone id {clone_id:?} may hold only letters, digits, '-', '_' and '.'"
            )));
        }
        let v = self.vol(volume_id)?;
        let lock = self.group_lock(&v.group_id);
        let _g = lock.lock().await;
        if let Some(c) = self.snapshot_state().clones.get(clone_id).cloned() {
            if c.volume_id != volume_id {
                return Err(DriverError::AlreadyExists(format!(
                    "clone {clone_id} exists already, of volume {}; pick another id",
                    c.volume_id
                )));
            }
            self.open_clone(clone_id, &c).await?;
            return Ok(self.clone_info(clone_id, &c));
        }
        let v = self.vol(volume_id)?;
        if v.role != Some(Role::Secondary) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} is not a replica on this backend; test clones are taken at the replication \
                 target, from its recovery points"
            )));
        }
        // The newest complete point: a demoted former primary may hold unshipped changes
        // above it, which no clone should see.
        let Some(top) = v.layers.iter().rposition(|l| l.rp.is_some()) else {
            return Err(DriverError::FailedPrecondition(format!(
                "replica of {volume_id} has no complete recovery point yet; wait for the initial sync"
            )));
        };
        let rp = v.layers[top].rp.clone().unwrap_or_default();
        // The clone's node reads the replica through the layers' headers.
        self.align_headers(volume_id, &v).await?;
        let backing: Vec<PathBuf> = v.layers[..=top].iter().map(|l| self.layer_path(volume_id, l.seq)).collect();
        let path = self.clone_path(clone_id);
        std::fs::create_dir_all(self.pool.join("clones")).map_err(|e| io("clones dir", e))?;
        image::create(&path, v.size_bytes, backing.last().map(PathBuf::as_path)).await?;
        let c = self
            .update(|st| {
                let c = CloneRec {
                    volume_id: volume_id.into(),
                    recovery_point_id: rp.clone(),
                    index: st.next_index,
                    backing,
                };
                st.next_index += 1;
                st.clones.insert(clone_id.to_string(), c.clone());
                Ok(c)
            })
            .await?;
        self.open_clone(clone_id, &c).await?;
        tracing::info!(clone = clone_id, volume = volume_id, point = %rp, "test clone of a recovery point");
        Ok(self.clone_info(clone_id, &c))
    }

    pub(crate) async fn do_delete_clone(&self, clone_id: &str) -> Result<(), DriverError> {
        let Some(c) = self.snapshot_state().clones.get(clone_id).cloned() else { return Ok(()) };
        let group = self.vol(&c.volume_id).map(|v| v.group_id).unwrap_or_default();
        let lock = self.group_lock(&group);
        let _g = lock.lock().await;
        self.drop_export(&clone_export(&c)).await?;
        self.daemon().remove_node(&clone_node(&c)).await?;
        self.update(|st| {
            st.clones.remove(clone_id);
            Ok(())
        })
        .await?;
        let _ = std::fs::remove_file(self.clone_path(clone_id));
        // Layers the replica dropped while the clone held them.
        let live: Vec<PathBuf> = self
            .snapshot_state()
            .volumes
            .get(&c.volume_id)
            .map(|v| v.layers.iter().map(|l| self.layer_path(&c.volume_id, l.seq)).collect())
            .unwrap_or_default();
        for f in c.backing.iter().filter(|f| !live.contains(f) && !self.pinned(f)) {
            let _ = std::fs::remove_file(f);
        }
        tracing::info!(clone = clone_id, "test clone removed");
        Ok(())
    }
}
