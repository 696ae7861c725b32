//! The source side of a sync: freeze every volume of a group at one instant, ship the
//! clusters allocated since the point the peer holds, and fold the frozen layers once the
//! peer acknowledged them.

use super::*;

impl QemuDriver {
    /// Reads the changed extents of a frozen node and ships them.
    pub(crate) async fn ship_volume(
        &self,
        ship: &Shipment,
        id: &str,
        v: &Vol,
        delta: &Delta,
    ) -> Result<u64, DriverError> {
        let frozen_seq = v.layers[delta.frozen].seq;
        let (extents, changed_depth, full) = (&delta.extents, delta.changed_depth, delta.full);
        let export = format!("rp-{id}");
        let rid = format!("r{}", v.index);
        self.daemon().add_export(&rid, &node(v, frozen_seq), &export, false).await?;
        // Reading from the daemon and sending to the peer overlap: a reader fills a small
        // queue of chunks while the sender drains it.
        let result = async {
            let mut client = NbdClient::connect(self.daemon().nbd(), &export).await.map_err(nbd_err)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Option<Vec<u8>>, u64)>(4);
            let reader = async {
                for e in extents.iter().filter(|e| e.depth < changed_depth) {
                    if e.data {
                        // Up to READ_DEPTH chunks in flight on the NBD connection at once.
                        let mut off = e.start;
                        while off < e.start + e.length {
                            let mut batch = Vec::new();
                            while off < e.start + e.length && batch.len() < READ_DEPTH {
                                let n = (e.start + e.length - off).min(READ_BYTES) as u32;
                                batch.push((off, n));
                                off += u64::from(n);
                            }
                            let datas = client.read_many(&batch).await.map_err(nbd_err)?;
                            for ((o, _), data) in batch.iter().zip(datas) {
                                if tx.send((*o, Some(data), 0)).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                    } else if e.zero && e.present && !full {
                        // Zeroed in the delta: it must hide what the peer's base holds there.
                        if tx.send((e.start, None, e.length)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                drop(tx);
                Ok::<(), DriverError>(())
            };
            let sender = async {
                // Owned here, so that a failed send closes the queue and stops the reader.
                let mut rx = rx;
                let mut bytes = 0u64;
                let total: u64 = extents.iter().filter(|e| e.depth < changed_depth && e.data).map(|e| e.length).sum();
                let mut reported = 0u64;
                while let Some((off, data, len)) = rx.recv().await {
                    match data {
                        Some(d) => {
                            bytes += d.len() as u64;
                            ship.data(id, off, d).await?;
                            // Progress of long transfers, every 256 MiB.
                            if bytes - reported >= 256 << 20 {
                                reported = bytes;
                                tracing::info!(
                                    volume = id,
                                    shipped = bytes,
                                    of = total,
                                    "recovery point transfer progress"
                                );
                            }
                        }
                        None => ship.zero(id, off, len).await?,
                    }
                }
                Ok::<u64, DriverError>(bytes)
            };
            let (read, sent) = tokio::join!(reader, sender);
            read?;
            let bytes = sent?;
            client.disconnect().await;
            Ok::<u64, DriverError>(bytes)
        }
        .await;
        self.daemon().remove_export(&rid).await?;
        result
    }

    /// The group's primary volumes here and the peer endpoint to ship to.
    fn sync_members(&self, group_id: &str, peer_endpoint: Option<&str>) -> Result<(Vec<String>, String), DriverError> {
        let st = self.state.lock().expect("state poisoned");
        let ids: Vec<String> = st
            .volumes
            .iter()
            .filter(|(_, v)| v.group_id == group_id && v.role == Some(Role::Primary) && !v.demoted)
            .map(|(id, _)| id.clone())
            .collect();
        let endpoint = peer_endpoint
            .map(String::from)
            .or_else(|| ids.first().and_then(|id| st.volumes[id].peer.as_ref().map(|p| p.endpoint.clone())))
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(DriverError::FailedPrecondition(format!(
                "no primary volume of group {group_id} on this backend; sync runs on the active side"
            )));
        }
        Ok((ids, endpoint))
    }

    /// A sync. The group lock is held only for local work (freezing, then folding), never
    /// while the peer is asked or the point ships; the shipping itself has a deadline
    /// proportionate to the data ([`drover_agent::replica::transfer_deadline`]).
    pub(crate) async fn do_sync(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
    ) -> Result<SyncReport, DriverError> {
        let started = Instant::now();
        // The peer's point, asked before the lock: a sync interrupted after the peer
        // committed left a frozen layer here that is not marked acknowledged.
        let (ids, endpoint) = self.sync_members(group_id, peer_endpoint)?;
        let peer_holds = drover_agent::replica::peer_point(&endpoint, &ids[0]).await.ok().filter(|h| !h.is_empty());
        let lock = self.group_lock(group_id);
        let frozen = {
            let _g = lock.lock().await;
            self.freeze(group_id, final_sync, peer_endpoint, peer_holds).await?
        };
        let shipped = self.ship(group_id, final_sync, &frozen).await;
        let _g = lock.lock().await;
        let Frozen { ids, vols, rp_id, created, snapshot_pause_us, full, .. } = frozen;
        let per_volume = match shipped {
            Ok(b) => b,
            Err(e) => {
                let msg = e.to_string();
                let _ = self
                    .update(|st| {
                        for id in &ids {
                            if let Some(v) = st.volumes.get_mut(id) {
                                v.last.error = msg.clone();
                            }
                        }
                        Ok(())
                    })
                    .await;
                if final_sync {
                    // Writes resume until a planned failover can finish, on the volumes
                    // still primary: the group lock was let go while the point shipped,
                    // and a volume demoted meanwhile (by a newer owner of the group) must
                    // stay without an export.
                    for id in &ids {
                        let v = self.vol(id)?;
                        if v.writable() {
                            let _ = self.export(id, &v).await;
                        }
                    }
                }
                return Err(e);
            }
        };
        // The lock was let go while the point shipped: the volumes must be as they were,
        // apart from layers a snapshot may have put on top.
        for (id, v) in ids.iter().zip(&vols) {
            let now = self.vol(id)?;
            let kept =
                now.layers.len() >= v.layers.len() && now.layers.iter().zip(&v.layers).all(|(a, b)| a.seq == b.seq);
            if now.role != Some(Role::Primary) || !kept {
                return Err(DriverError::FailedPrecondition(format!(
                    "volume {id} changed while recovery point {rp_id} was shipping (demoted, disabled or promoted); \
                     the point is not recorded here, and the next sync starts from what the peer holds"
                )));
            }
        }

        // 4. The peer holds the point. Record that first, so that housekeeping trouble
        //    below never makes the next sync start from an older base than the peer has.
        let total: u64 = per_volume.iter().sum();
        let elapsed = started.elapsed().as_millis() as u64;
        self.update(|st| {
            for (id, bytes) in ids.iter().zip(&per_volume) {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                let at = point_index(sv, &rp_id)?;
                // Older points below it are covered by it (the peer holds their data too).
                for l in sv.layers[..=at].iter_mut().filter(|l| l.rp.is_some()) {
                    l.acked = true;
                }
                sv.last =
                    SyncStats { rp_created_ms: created, duration_ms: elapsed, bytes: *bytes, error: String::new() };
            }
            Ok(())
        })
        .await?;
        //    Then fold the point and everything below it into the bottom layer: the chain
        //    is two layers again, the bottom holding the point the peer has. A snapshot's
        //    layers are never folded into: the fold's base is the layer above the highest
        //    one a snapshot reads through (and without room for a fold, the point's own
        //    layer stays as it is).
        for id in &ids {
            let v = &self.vol(id)?;
            let at = point_index(v, &rp_id)?;
            let base = self.pinned_top(id, v).map_or(0, |p| p + 1).min(at);
            let dropped = self.fold(v, base, at).await?;
            self.update(|st| {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                sv.layers.retain(|l| !dropped.contains(&l.seq));
                let b = &mut sv.layers[base];
                b.rp = Some(rp_id.clone());
                b.acked = true;
                b.rp_created_ms = created;
                Ok(())
            })
            .await?;
            for seq in dropped {
                let _ = std::fs::remove_file(self.layer_path(id, seq));
            }
        }

        // 5. A final sync ends with this side demoted to a clean secondary at the point.
        if final_sync {
            for id in &ids {
                let v = self.vol(id)?;
                self.close_chain(&v).await?;
                let active = v.top().seq;
                self.update(|st| {
                    let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                    sv.layers.retain(|l| l.seq != active);
                    sv.set_facts(roles::after_final_sync());
                    Ok(())
                })
                .await?;
                let _ = std::fs::remove_file(self.layer_path(id, active));
            }
        }
        Ok(SyncReport {
            recovery_point_id: rp_id,
            bytes: total,
            duration_ms: started.elapsed().as_millis() as u64,
            created_at_ms: created,
            full,
            snapshot_pause_us,
        })
    }

    /// Steps 1 and 2 of a sync, under the group lock: the point to ship, frozen (or the
    /// newest waiting one again).
    async fn freeze(
        &self,
        group_id: &str,
        final_sync: bool,
        peer_endpoint: Option<&str>,
        peer_holds: Option<String>,
    ) -> Result<Frozen, DriverError> {
        let (ids, endpoint) = self.sync_members(group_id, peer_endpoint)?;
        // Stored for the syncs that come without one. Periodic syncs pass the endpoint the
        // orchestrator last named, mostly the stored one: written only when it changed.
        let stored = |st: &State| {
            ids.iter().all(|id| {
                st.volumes
                    .get(id)
                    .and_then(|v| v.peer.as_ref())
                    .is_none_or(|p| Some(p.endpoint.as_str()) == peer_endpoint)
            })
        };
        if let Some(ep) = peer_endpoint.filter(|_| !stored(&self.state.lock().expect("state poisoned"))) {
            self.update(|st| {
                for id in &ids {
                    if let Some(p) = st.volumes.get_mut(id).and_then(|v| v.peer.as_mut()) {
                        p.endpoint = ep.to_string();
                    }
                }
                Ok(())
            })
            .await?;
        }
        if final_sync {
            // Stop writes: the final point must hold everything the volumes ever acknowledged.
            for id in &ids {
                self.unexport(&self.vol(id)?).await?;
            }
        }
        // Reconcile with the peer: a sync interrupted after the peer committed left a frozen
        // layer here that is not marked acknowledged. If the peer holds its point, it is the
        // common base now: mark it (and everything below) acknowledged and go on from it.
        if let Some(held) = peer_holds {
            let interrupted =
                self.vol(&ids[0])?.layers.iter().any(|l| !l.acked && l.rp.as_deref() == Some(held.as_str()));
            if interrupted {
                tracing::info!(group = group_id, point = %held, "the peer holds the point an interrupted sync shipped; going on from it");
                self.update(|st| {
                    for id in &ids {
                        let v = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                        if let Some(i) = v.layers.iter().position(|l| l.rp.as_deref() == Some(held.as_str())) {
                            for l in &mut v.layers[..=i] {
                                l.acked = true;
                            }
                        }
                    }
                    Ok(())
                })
                .await?;
            }
        }
        let vols: Vec<Vol> = ids.iter().map(|id| self.vol(id)).collect::<Result<_, _>>()?;
        let bases: Vec<Option<String>> =
            vols.iter().map(|v| v.acked_index().and_then(|i| v.layers[i].rp.clone())).collect();
        let base_rp = match bases.first() {
            Some(Some(b)) if bases.iter().all(|x| x.as_deref() == Some(b.as_str())) => b.clone(),
            _ => String::new(),
        };
        let full = base_rp.is_empty();
        // Bounded chains: while the peer cannot take points, at most MAX_WAITING frozen
        // points wait for it. Past that a scheduled sync freezes nothing new and sends the
        // newest waiting point again, so a peer that is down for hours costs no layers.
        // A sync the orchestrator asked for (enable's initial copy, sync now, a final sync)
        // always freezes a new point: it promises everything acknowledged before it began.
        let waiting = |v: &Vol| v.layers.iter().filter(|l| l.rp.is_some() && !l.acked).count();
        let asked = drover_agent::driver::current_op().is_some();
        let reuse = !final_sync && !asked && vols.iter().all(|v| waiting(v) >= MAX_WAITING);
        let (rp_id, created, snapshot_pause_us) = if reuse {
            // The newest waiting point (a snapshot's layer may be above it).
            let newest = vols[0].layers.iter().rev().find(|l| l.rp.is_some() && !l.acked).expect("points wait");
            tracing::info!(
                group = group_id,
                waiting = waiting(&vols[0]),
                "points wait for the peer; sending the newest again instead of freezing another"
            );
            (newest.rp.clone().unwrap_or_default(), newest.rp_created_ms, 0)
        } else {
            let rp_id = uuid::Uuid::now_v7().to_string();
            let created = now_ms();

            // 1. Empty overlays, recorded before the snapshot (intent first).
            let mut new_seqs = Vec::new();
            for (id, v) in ids.iter().zip(&vols) {
                let seq = v.top().seq + 1;
                image::create(&self.layer_path(id, seq), v.size_bytes, Some(&self.layer_path(id, v.top().seq))).await?;
                new_seqs.push(seq);
            }
            self.update(|st| {
                for (id, seq) in ids.iter().zip(&new_seqs) {
                    let v = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                    let top = v.layers.last_mut().expect("layers");
                    top.rp = Some(rp_id.clone());
                    top.rp_created_ms = created;
                    v.layers.push(Layer { seq: *seq, rp: None, acked: false, rp_created_ms: 0 });
                }
                Ok(())
            })
            .await?;

            // 2. One transaction freezes every volume at the same instant.
            let mut pairs = Vec::new();
            for ((id, v), seq) in ids.iter().zip(&vols).zip(&new_seqs) {
                self.daemon()
                    .add_qcow2(&node(v, *seq), &self.layer_path(id, *seq), commands::Backing::None, false)
                    .await?;
                pairs.push((node(v, v.top().seq), node(v, *seq)));
            }
            let snapshots: Vec<commands::Snapshot> =
                pairs.iter().map(|(n, o)| commands::Snapshot { node: n, overlay: o }).collect();
            let frozen_at = Instant::now();
            self.daemon().snapshot_all(&snapshots).await?;
            let snapshot_pause_us = frozen_at.elapsed().as_micros() as u64;
            tracing::debug!(group = group_id, snapshot_pause_us, volumes = ids.len(), "group frozen");
            (rp_id, created, snapshot_pause_us)
        };
        let vols: Vec<Vol> = ids.iter().map(|id| self.vol(id)).collect::<Result<_, _>>()?;
        Ok(Frozen { ids, endpoint, vols, rp_id, created, snapshot_pause_us, full, base_rp })
    }

    /// Step 3, without the group lock: ships the delta (or everything, without a common
    /// point) within a deadline proportionate to its size. Returns the bytes per volume.
    async fn ship(&self, group_id: &str, final_sync: bool, f: &Frozen) -> Result<Vec<u64>, DriverError> {
        let mut deltas = Vec::new();
        for (id, v) in f.ids.iter().zip(&f.vols) {
            // The point's layer (a snapshot's layer may sit above a point sent again).
            let frozen = point_index(v, &f.rp_id)?;
            let changed_depth = match (f.full, v.acked_index()) {
                // Depth counts down from the frozen layer: everything above the acknowledged
                // layer changed since the peer's point.
                (false, Some(a)) => (frozen - a) as u32,
                _ => u32::MAX,
            };
            // Read through the chain the state holds, not the headers (see `map_chain`).
            let extents = self.chain_map(id, v, frozen).await?;
            deltas.push(Delta { frozen, extents, changed_depth, full: f.full });
        }
        let bytes: u64 = deltas.iter().map(Delta::data_bytes).sum();
        let deadline = drover_agent::replica::transfer_deadline(bytes);
        let header = ApplyHeader {
            group_id: group_id.to_string(),
            recovery_point_id: f.rp_id.clone(),
            base_recovery_point_id: f.base_rp.clone(),
            volumes: f.ids.iter().zip(&f.vols).map(|(id, v)| (id.clone(), v.size_bytes)).collect(),
            final_sync,
            source_backend: self.backend.clone(),
            created_at_ms: f.created,
            epoch: self.fences.get().map_or(0, |fences| fences.group_epoch(group_id)),
        };
        let shipped = async {
            let ship = Shipment::open(&f.endpoint, &header, deadline).await?;
            let mut per_volume = Vec::new();
            for ((id, v), delta) in f.ids.iter().zip(&f.vols).zip(&deltas) {
                match self.ship_volume(&ship, id, v, delta).await {
                    Ok(b) => per_volume.push(b),
                    Err(e) => return Err(ship.fail(e).await),
                }
            }
            ship.commit().await?;
            Ok::<Vec<u64>, DriverError>(per_volume)
        };
        match tokio::time::timeout(deadline, shipped).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::Unavailable(format!(
                "recovery point {} ({bytes} bytes) did not reach {} within {}s (30 s plus the data at {} MiB/s); \
                 the link or the peer is too slow or stalled: check the peer agent, then sync again",
                f.rp_id,
                f.endpoint,
                deadline.as_secs(),
                drover_agent::replica::MIN_TRANSFER_RATE >> 20
            ))),
        }
    }
}

/// A frozen point, between freezing it and folding it.
struct Frozen {
    ids: Vec<String>,
    endpoint: String,
    vols: Vec<Vol>,
    rp_id: String,
    created: i64,
    snapshot_pause_us: u64,
    full: bool,
    base_rp: String,
}

/// What of one volume a sync ships.
pub(crate) struct Delta {
    /// Index of the frozen layer in the volume's chain.
    frozen: usize,
    /// `qemu-img map` of the frozen layer.
    extents: Vec<image::Extent>,
    /// Extents shallower than this changed since the peer's point.
    changed_depth: u32,
    full: bool,
}

impl Delta {
    fn data_bytes(&self) -> u64 {
        self.extents.iter().filter(|e| e.depth < self.changed_depth && e.data).map(|e| e.length).sum()
    }
}

impl QemuDriver {
    /// The bytes a sync now would ship for a primary volume: the data allocated above the
    /// layer the peer holds (everything without one). The active layer is flushed first,
    /// so its on-disk map is current (qcow2 keeps new metadata in memory until a flush).
    pub(crate) async fn estimate_pending(&self, id: &str) -> Result<Option<u64>, DriverError> {
        // Under the group's lock: a sync's fold flushes through the same export id.
        let _g = self.lock_for(id).await;
        let v = self.vol(id)?;
        if v.role == Some(Role::Secondary) || v.layers.is_empty() {
            return Ok(None);
        }
        let top = v.layers.len() - 1;
        self.flush_node(&v, v.top().seq).await?;
        let changed_depth = match v.acked_index() {
            Some(a) => (top - a) as u32,
            None => u32::MAX,
        };
        let extents = self.chain_map(id, &v, top).await?;
        Ok(Some(extents.iter().filter(|e| e.depth < changed_depth && e.data).map(|e| e.length).sum()))
    }
}

/// Where the layer completing point `rp_id` is in `v`'s chain.
fn point_index(v: &Vol, rp_id: &str) -> Result<usize, DriverError> {
    v.layers.iter().position(|l| l.rp.as_deref() == Some(rp_id)).ok_or_else(|| {
        DriverError::Internal(format!("recovery point {rp_id} is not in the chain any more; the next sync starts over"))
    })
}
