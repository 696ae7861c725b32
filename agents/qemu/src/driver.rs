//! The `Driver` implementation: each method checks the volume's role and state, then uses
//! the chain, source and target plumbing.

use super::*;

#[async_trait]
impl Driver for QemuDriver {
    fn name(&self) -> &str {
        "qemu"
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
            capability::REPLICATION,
            capability::MANAGE_EXISTING,
            capability::ATTACH,
            capability::CLONE_RECOVERY_POINT,
            capability::SNAPSHOT,
            capability::CONSISTENT_GROUP_SNAPSHOT,
        ]
        .map(String::from)
        .to_vec()
    }

    async fn probe(&self) -> Result<(), DriverError> {
        self.daemon().ping().await
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
        self.add_volume(volume_id, size_bytes, Vec::new()).await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        self.refuse_with_snapshots(volume_id, "deleted")?;
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
        let resized = self.daemon().resize(&node(&v, v.top().seq), new_size_bytes).await;
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
        snapshot_id: &str,
        volume_ids: &[String],
    ) -> Result<GroupSnapshotInfo, DriverError> {
        self.do_snapshot(snapshot_id, volume_ids).await
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), DriverError> {
        self.do_delete_snapshot(snapshot_id).await
    }

    async fn create_volume_from_snapshot(
        &self,
        volume_id: &str,
        size_bytes: u64,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<VolumeState, DriverError> {
        self.do_create_from_snapshot(volume_id, size_bytes, snapshot_id, source_volume_id).await
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
        let mut images = Vec::new();
        let entries = std::fs::read_dir(&self.pool).map_err(|e| io("pool listing", e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("qcow2") || !path.is_file() {
                continue;
            }
            let reference = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            images.push((reference, path.clone(), image::info(&path, true).await));
        }
        // Images another image of the pool reads through are layers of that one.
        let backings: BTreeMap<PathBuf, String> =
            images.iter().filter_map(|(r, p, i)| Some((backing_of(p, i.as_ref().ok()?)?, r.clone()))).collect();
        let mut out = Vec::new();
        for (reference, path, shared) in images {
            let mut m = Manageable {
                reference,
                size_bytes: 0,
                safe_to_manage: false,
                reason_not_safe: String::new(),
                snapshots: Vec::new(),
                backing_file: String::new(),
            };
            m.reason_not_safe = match &shared {
                Err(e) => format!("unreadable: {e}"),
                Ok(i) => {
                    m.size_bytes = i["virtual-size"].as_u64().unwrap_or(0);
                    m.backing_file = i["backing-filename"].as_str().unwrap_or_default().to_string();
                    m.snapshots = internal_snapshots(i, m.size_bytes);
                    // A backing file in the pool is a layer of this image: listed with it.
                    let pool = std::fs::canonicalize(&self.pool).ok();
                    if let Some(b) = backing_of(&path, i).filter(|b| b.parent() == pool.as_deref()) {
                        let created_at_ms = std::fs::metadata(&b)
                            .and_then(|md| md.modified())
                            .ok()
                            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_millis() as i64);
                        m.snapshots.push(ManageableSnapshot {
                            reference: b.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                            size_bytes: m.size_bytes,
                            created_at_ms,
                            kind: "backing-file".into(),
                        });
                    }
                    self.unsafe_because(&path, i, &m, &backings)
                }
            };
            if m.reason_not_safe.is_empty() && image::info(&path, false).await.is_err() {
                m.reason_not_safe = "it is in use by another process (a writer has it open); stop that first".into();
            }
            m.safe_to_manage = m.reason_not_safe.is_empty();
            out.push(m);
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    async fn manage_volume(
        &self,
        reference: &str,
        volume_id: &str,
        snapshots: &[AdoptSnapshot],
    ) -> Result<VolumeState, DriverError> {
        if let Ok(v) = self.vol(volume_id) {
            return Ok(Self::view(volume_id, &v));
        }
        check_reference(reference)?;
        check_id("volume", volume_id)?;
        for s in snapshots {
            check_id("snapshot", &s.snapshot_id)?;
            if self.snapshot_state().snapshots.contains_key(&s.snapshot_id) {
                return Err(DriverError::AlreadyExists(format!(
                    "snapshot {} exists on this backend; adopt {:?} under another id",
                    s.snapshot_id, s.reference
                )));
            }
        }
        let src = self.pool.join(format!("{reference}.qcow2"));
        let dest = self.layer_path(volume_id, 0);
        // A retry after a crash that came after the image moved in finds it there.
        let moved = !src.exists() && dest.exists();
        let (size, carried) = if moved {
            let i = image::info(&dest, true).await?;
            let size = i["virtual-size"].as_u64().unwrap_or(0);
            (size, internal_snapshots(&i, size))
        } else {
            let found = self.list_manageable().await?.into_iter().find(|m| m.reference == reference);
            let Some(m) = found else {
                return Err(DriverError::NotFound(format!(
                    "no unmanaged volume {reference} in pool {}; list them with `drover volume manageable-list`",
                    self.pool.display()
                )));
            };
            if !m.safe_to_manage {
                return Err(DriverError::FailedPrecondition(format!(
                    "{reference} is not safe to manage: {}",
                    m.reason_not_safe
                )));
            }
            (m.size_bytes, m.snapshots)
        };
        let mut adopted = Vec::new();
        for s in snapshots {
            let Some(c) = carried.iter().find(|c| c.reference == s.reference && c.kind == "internal") else {
                return Err(DriverError::NotFound(format!(
                    "image {reference} carries no snapshot {:?}; see `drover snapshot manageable-list`",
                    s.reference
                )));
            };
            adopted.push((s.clone(), c.clone()));
        }
        std::fs::create_dir_all(self.vol_dir(volume_id)).map_err(|e| io("volume dir", e))?;
        // Each adopted snapshot becomes a standalone file, pinned like any snapshot's
        // layers; the image keeps its internal snapshots, so handing it back loses none.
        let image = if moved { &dest } else { &src };
        let mut snaps = Vec::new();
        for (s, c) in &adopted {
            let file = self.vol_dir(volume_id).join(format!("snap-{}.qcow2", s.snapshot_id));
            if !file.exists() {
                let part = file.with_extension("part");
                image::convert_snapshot(image, &s.reference, &part).await?;
                std::fs::rename(&part, &file).map_err(|e| io("placing an adopted snapshot", e))?;
            }
            let member = SnapMember { files: vec![file], size_bytes: c.size_bytes };
            let created_ms = c.created_at_ms;
            let members = [(volume_id.to_string(), member)].into();
            snaps.push((s.snapshot_id.clone(), SnapRec { created_ms, internal: s.reference.clone(), members }));
        }
        if !moved {
            std::fs::rename(&src, &dest).map_err(|e| io("moving the image into the pool", e))?;
        }
        fsync_dir(&self.pool)?;
        fsync_dir(&self.vol_dir(volume_id))?;
        self.add_volume(volume_id, size, snaps).await
    }

    async fn unmanage_volume(&self, volume_id: &str) -> Result<(), DriverError> {
        // Snapshots adopted with the image are still inside it: they go back with it.
        // Snapshots taken here are not, and are refused as before.
        let adopted = self.adopted_snapshots(volume_id).await;
        if !adopted.is_empty() {
            self.update(|st| {
                for id in &adopted {
                    st.snapshots.remove(id);
                }
                Ok(())
            })
            .await?;
            for id in &adopted {
                let _ = std::fs::remove_file(self.vol_dir(volume_id).join(format!("snap-{id}.qcow2")));
            }
        }
        self.refuse_with_snapshots(volume_id, "unmanaged")?;
        if let Some(o) = self.vol(volume_id).ok().and_then(|v| v.origin) {
            return Err(DriverError::FailedPrecondition(format!(
                "volume {volume_id} was made from snapshot {} and reads through it, so it is no standalone image to \
                 hand back; copy its data to a new volume to unmanage that one",
                o.snapshot_id
            )));
        }
        let dest = self.pool.join(format!("{volume_id}.qcow2"));
        let bottom = self.vol(volume_id).ok().and_then(|v| v.layers.first().map(|l| self.layer_path(volume_id, l.seq)));
        // An unmanage cut short after it moved the flattened image out has only the state
        // left to do; anything else at the destination is someone's file.
        let moved_out = bottom.as_ref().is_some_and(|b| !b.exists()) && dest.exists();
        if dest.exists() && !moved_out {
            return Err(DriverError::FailedPrecondition(format!(
                "{} exists already, and unmanaging {volume_id} would put its image there; move that file away, then \
                 unmanage again",
                dest.display()
            )));
        }
        let Some(v) = self.close_unreplicated(volume_id).await? else { return Ok(()) };
        if moved_out {
            tracing::info!(volume = volume_id, image = %dest.display(), "the image was moved out before a restart; forgetting the volume");
        } else {
            // Flatten into the bottom layer so the file stands alone. Each commit goes
            // into the layer its header names.
            self.align_headers(volume_id, &v).await?;
            for l in v.layers.iter().skip(1).rev() {
                image::commit(&self.layer_path(volume_id, l.seq)).await?;
            }
            std::fs::rename(self.layer_path(volume_id, v.layers[0].seq), &dest)
                .map_err(|e| io("moving the image out", e))?;
            fsync_dir(&self.pool)?;
        }
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
                // A new replica starts from an empty directory. One that is not empty holds
                // an earlier replica's layers (a disable cut short by a restart between
                // forgetting the volume and removing its files): no volume refers to them.
                // Tidying only: each new layer is made afresh as a `.partial` and renamed
                // over any old file of its name, so old files never enter the new chain.
                let dir = self.vol_dir(&spec.volume_id);
                if dir.exists() {
                    tracing::warn!(volume = %spec.volume_id, "removing an earlier replica's files before making a new one");
                    std::fs::remove_dir_all(&dir).map_err(|e| io("an earlier replica's files", e))?;
                }
                std::fs::create_dir_all(&dir).map_err(|e| io("replica dir", e))?;
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
        // A replica may be taking in a point from a source that stalled: the promote does
        // not wait for it. It stops the apply (which discards the partial point) and waits
        // only for that local clean-up.
        let v = self.vol(volume_id)?;
        let _t = if v.role == Some(Role::Secondary) && !v.group_id.is_empty() {
            if let Some(abort) = self.applying.lock().expect("applying poisoned").get(&v.group_id) {
                let _ = abort.send(true);
            }
            Some(self.transfer_lock(&v.group_id).lock_owned().await)
        } else {
            None
        };
        // A real failover ends any test on this replica: its clones go first (the
        // promoted chain will fold into the layers they read through).
        let clones: Vec<String> = self
            .snapshot_state()
            .clones
            .iter()
            .filter(|(_, c)| c.volume_id == volume_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in clones {
            tracing::warn!(clone = %id, volume = volume_id, "removing a test clone: its replica is being promoted");
            self.do_delete_clone(&id).await?;
        }
        let _g = self.lock_for(volume_id).await;
        let v = self.vol(volume_id)?;
        // A promote comes from the orchestrator at the group's current epoch (the ledger
        // refused any older one): it confirms this side as the group's primary, which is
        // all a group held since this agent's start waits for (fenced on return). Without
        // this, a hold left from a restart in the middle of a move away from here (the
        // move demoted this side before the next confirmation round forgot the hold)
        // would export the promoted volumes read-only.
        let verdict = roles::promote(volume_id, v.facts(), force)?;
        let released = self.release_locked(&v.group_id).await?;
        let facts = match verdict {
            Verdict::AlreadyDone => return Ok(None),
            Verdict::Proceed(facts) => facts,
        };
        if released {
            tracing::info!(group = %v.group_id, volume = volume_id, "promoted: writes held since this agent's start are released");
        }
        let Some(top) = v.layers.last().cloned() else {
            return Err(DriverError::FailedPrecondition(format!(
                "replica of {volume_id} has no complete recovery point yet; wait for the initial sync"
            )));
        };
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
                sv.set_facts(facts);
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
        let facts = match roles::demote(volume_id, v.facts())? {
            Verdict::AlreadyDone => return Ok(()),
            Verdict::Proceed(facts) => facts,
        };
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
            sv.set_facts(facts);
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
        roles::resync(volume_id, v.facts())?;
        self.update(|st| {
            let sv = st.volumes.get_mut(volume_id).ok_or_else(|| not_found(volume_id))?;
            sv.discard_allowed = true;
            Ok(())
        })
        .await?;
        Ok(true)
    }

    fn backend_restarts(&self) -> u64 {
        self.daemon.get().map_or(0, |d| d.restarts())
    }

    async fn pending_bytes(&self, volume_id: &str) -> Result<Option<u64>, DriverError> {
        self.estimate_pending(volume_id).await
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
            error: {
                // Bounded chains: say when points wait for the peer and no more are kept.
                let waiting = v.layers.iter().filter(|l| l.rp.is_some() && !l.acked).count();
                if v.role == Some(Role::Primary) && !v.last.error.is_empty() && waiting >= MAX_WAITING {
                    format!(
                        "{}; {waiting} recovery points wait for the peer, the most kept: new syncs re-send the \
                         newest until the peer takes it",
                        v.last.error
                    )
                } else {
                    v.last.error.clone()
                }
            },
        })
    }

    async fn sync_group(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError> {
        // One transfer of a group at a time; the group lock is taken inside, for local work.
        let transfer = self.transfer_lock(group_id);
        let _t = transfer.lock().await;
        self.do_sync(group_id, final_sync, peer_endpoint).await
    }

    async fn apply_recovery_point(
        &self,
        header: ApplyHeader,
        mut incoming: tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError> {
        // One incoming point per group at a time. The group lock is taken only to switch to
        // the received point, so a promote never waits on a source that is streaming.
        let transfer = self.transfer_lock(&header.group_id);
        let _t = transfer.lock().await;
        let (abort, aborted) = tokio::sync::watch::channel(false);
        self.applying.lock().expect("applying poisoned").insert(header.group_id.clone(), abort);
        let applied = self.do_apply(&header, &mut incoming, aborted).await;
        self.applying.lock().expect("applying poisoned").remove(&header.group_id);
        applied
    }

    async fn clone_recovery_point(
        &self,
        volume_id: &str,
        clone_id: &str,
    ) -> Result<drover_agent::driver::CloneInfo, DriverError> {
        self.do_clone(volume_id, clone_id).await
    }

    async fn delete_clone(&self, clone_id: &str) -> Result<(), DriverError> {
        self.do_delete_clone(clone_id).await
    }

    fn held_groups(&self) -> Vec<drover_agent::driver::HeldGroup> {
        let st = self.snapshot_state();
        let mut held = self.held.lock().expect("held poisoned");
        // A group whose volumes held at start are all demoted or gone holds nothing (none
        // of them has an export left). One disabled meanwhile still serves, read-only,
        // and waits for the orchestrator's answer like the rest: forgetting its hold
        // here would leave it read-only for good.
        let exported = |id: &String| st.volumes.get(id).is_some_and(Vol::writable);
        held.retain(|_, at_start| at_start.iter().any(exported));
        held.iter()
            .map(|(group_id, at_start)| {
                let mut volume_ids: Vec<String> = at_start.iter().filter(|id| exported(id)).cloned().collect();
                for (id, v) in &st.volumes {
                    if &v.group_id == group_id && v.role == Some(Role::Primary) && !volume_ids.contains(id) {
                        volume_ids.push(id.clone());
                    }
                }
                drover_agent::driver::HeldGroup { group_id: group_id.clone(), volume_ids }
            })
            .collect()
    }

    async fn release_group(&self, group_id: &str) -> Result<(), DriverError> {
        let lock = self.group_lock(group_id);
        let _g = lock.lock().await;
        self.release_locked(group_id).await.map(|_| ())
    }

    fn sync_schedule(&self) -> Vec<ScheduledSync> {
        let held = self.held.lock().expect("held poisoned").clone();
        let st = self.state.lock().expect("state poisoned");
        let mut out: BTreeMap<String, ScheduledSync> = BTreeMap::new();
        for v in st.volumes.values() {
            let Some(peer) = &v.peer else { continue };
            if v.role == Some(Role::Primary) && !v.demoted && !v.group_id.is_empty() && !held.contains_key(&v.group_id)
            {
                out.insert(
                    v.group_id.clone(),
                    ScheduledSync {
                        group_id: v.group_id.clone(),
                        interval: Duration::from_millis(v.interval_ms.max(1000)),
                        peer_backend: peer.backend.clone(),
                    },
                );
            }
        }
        out.into_values().collect()
    }
}
