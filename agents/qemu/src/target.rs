//! The target side of a sync: write an incoming recovery point into `.partial` overlays,
//! fsync and rename them, and switch the whole group to the new point with one state
//! write, so a crash mid-transfer leaves the previous point intact. The group lock is
//! taken only after the data arrived: receiving never blocks a promote.

use super::*;

impl QemuDriver {
    pub(crate) async fn do_apply(
        &self,
        header: &ApplyHeader,
        incoming: &mut tokio::sync::mpsc::Receiver<Incoming>,
        mut aborted: tokio::sync::watch::Receiver<bool>,
    ) -> Result<u64, DriverError> {
        // Where each volume's new point goes: on top of the layer holding the base point.
        struct Target {
            id: String,
            v: Vol,
            keep: usize,
            seq: u32,
            partial: PathBuf,
            client: Option<NbdClient>,
            /// Data bytes received for this volume (reported per volume, as the source does).
            bytes: u64,
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
            // A snapshot's layer (no point of its own, pinned) holds data some later point
            // carries; it is not a local change.
            let local_changes = v.layers.iter().any(|l| l.rp.is_none() && !self.pinned(&self.layer_path(id, l.seq)));
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
            // Applies of a group run one at a time (the transfer lock): anything an earlier
            // apply left (its task killed with the agent's runtime, say) is stale.
            self.drop_export(&format!("w{}", v.index)).await?;
            self.daemon().remove_node(&format!("a{}", v.index)).await?;
            let _ = std::fs::remove_file(&partial);
            // The new layer's node reads what lies below it through the layers' headers.
            self.align_headers(id, &v).await?;
            let backing = (keep > 0).then(|| self.layer_path(id, v.layers[keep - 1].seq));
            std::fs::create_dir_all(self.vol_dir(id)).map_err(|e| io("replica dir", e))?;
            image::create(&partial, *size, backing.as_deref()).await?;
            targets.push(Target { id: id.clone(), v, keep, seq, partial, client: None, bytes: 0 });
        }
        let cleanup = |targets: &Vec<Target>| {
            let names: Vec<(String, String, PathBuf)> = targets
                .iter()
                .map(|t| (format!("w{}", t.v.index), format!("a{}", t.v.index), t.partial.clone()))
                .collect();
            async move {
                for (export, node, file) in names {
                    let _ = self.daemon().remove_export(&export).await;
                    for _ in 0..50 {
                        if self.daemon().remove_node(&node).await.is_ok() {
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
                    .add_qcow2(&format!("a{}", t.v.index), &t.partial, commands::Backing::FromImage, false)
                    .await?;
                let name = format!("apply-{}", t.id);
                self.daemon().add_export(&format!("w{}", t.v.index), &format!("a{}", t.v.index), &name, true).await?;
                t.client = Some(NbdClient::connect(self.daemon().nbd(), &name).await.map_err(nbd_err)?);
            }
            let mut bytes = 0u64;
            loop {
                let msg = tokio::select! {
                    m = incoming.recv() => m,
                    Ok(_) = aborted.wait_for(|a| *a) => {
                        return Err(DriverError::FailedPrecondition(format!(
                            "group {} changed while recovery point {} arrived (a promote took over); the point is \
                             discarded",
                            header.group_id, header.recovery_point_id
                        )));
                    }
                };
                let (vid, op) = match msg {
                    Some(Incoming::Data { volume_id, offset, data }) => (volume_id, (offset, Some(data), 0)),
                    Some(Incoming::Zero { volume_id, offset, len }) => (volume_id, (offset, None, len)),
                    Some(Incoming::Commit) => break,
                    Some(Incoming::Broken(why)) => return Err(DriverError::Unavailable(why)),
                    None => {
                        return Err(DriverError::Unavailable("the recovery point stream ended before commit".into()));
                    }
                };
                let t = targets.iter_mut().find(|t| t.id == vid).ok_or_else(|| {
                    DriverError::InvalidArgument(format!("chunk for volume {vid}, which is not in this point"))
                })?;
                let client = t.client.as_mut().expect("connected");
                match op {
                    (offset, Some(data), _) => {
                        bytes += data.len() as u64;
                        t.bytes += data.len() as u64;
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
        // From here on, local work only: take the group lock and check that nothing
        // changed the replicas while the point arrived (a forced promote does not wait for
        // a streaming source; its point then has nowhere to go).
        let lock = self.group_lock(&header.group_id);
        let _g = lock.lock().await;
        for t in &targets {
            let now = self.vol(&t.id);
            let unchanged = now.as_ref().is_ok_and(|now| {
                now.role == Some(Role::Secondary)
                    && now.layers.iter().map(|l| l.seq).eq(t.v.layers.iter().map(|l| l.seq))
            });
            if !unchanged {
                cleanup(&targets).await;
                return Err(DriverError::FailedPrecondition(format!(
                    "replica {} changed while recovery point {} arrived (promoted, resynced or disabled); the point \
                     is discarded",
                    t.id, header.recovery_point_id
                )));
            }
        }
        // Close the partial images, make them durable, then give them their final names.
        for t in &targets {
            let _ = self.daemon().remove_export(&format!("w{}", t.v.index)).await;
        }
        for t in &targets {
            let mut deleted = false;
            for _ in 0..100 {
                if self.daemon().remove_node(&format!("a{}", t.v.index)).await.is_ok() {
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
                v.set_facts(roles::after_applied(v.facts(), header.final_sync));
                v.discard_allowed = false;
                v.last = SyncStats {
                    rp_created_ms: header.created_at_ms,
                    duration_ms: 0,
                    bytes: t.bytes,
                    error: String::new(),
                };
            }
            Ok(())
        })
        .await?;
        for (id, seq) in dropped {
            // A layer a test clone reads through stays until the clone goes.
            if !self.pinned(&self.layer_path(&id, seq)) {
                let _ = std::fs::remove_file(self.layer_path(&id, seq));
            }
        }
        for t in &targets {
            if let Err(e) = self.shorten_replica(&t.id).await {
                tracing::warn!(volume = %t.id, error = %e, "could not shorten the replica chain; will retry next time");
            }
        }
        Ok(bytes)
    }
}
