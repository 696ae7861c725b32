//! Block-graph plumbing: opening a volume's chain of qcow2 layers in the daemon,
//! exporting it over NBD, closing it, restoring everything after a daemon restart, block
//! jobs, and keeping replica chains short.

use super::*;

impl QemuDriver {
    /// Opens a volume's chain in the daemon and, when it serves writes, exports it.
    pub(crate) async fn open_chain(&self, id: &str, v: &Vol) -> Result<(), DriverError> {
        let d = self.daemon();
        let mut below: Option<String> = None;
        // A volume made from a snapshot reads through its own nodes of the snapshot's files.
        for (i, f) in v.origin.iter().flat_map(|o| o.files.iter()).enumerate() {
            d.add_pinned_qcow2(&origin_node(v, i), f, below.as_deref()).await?;
            below = Some(origin_node(v, i));
        }
        for l in &v.layers {
            let backing = below.as_deref().map_or(commands::Backing::None, commands::Backing::Node);
            d.add_qcow2(&node(v, l.seq), &self.layer_path(id, l.seq), backing, true).await?;
            below = Some(node(v, l.seq));
        }
        if v.writable() {
            self.export(id, v).await?;
        }
        Ok(())
    }

    /// Exports a volume that serves writes: writable, unless its group is held (fenced on
    /// return), then read-only.
    pub(crate) async fn export(&self, id: &str, v: &Vol) -> Result<(), DriverError> {
        let writable = !self.is_held(&v.group_id);
        self.daemon().add_export(&export_id(v), &node(v, v.top().seq), id, writable).await
    }

    pub(crate) fn is_held(&self, group_id: &str) -> bool {
        !group_id.is_empty() && self.held.lock().expect("held poisoned").contains_key(group_id)
    }

    /// Ends the hold on a group (fenced on return), with its lock held: its volumes that
    /// serve writes are exported again, writable. Returns whether the group was held.
    pub(crate) async fn release_locked(&self, group_id: &str) -> Result<bool, DriverError> {
        if group_id.is_empty() {
            return Ok(false);
        }
        let Some(at_start) = self.held.lock().expect("held poisoned").remove(group_id) else {
            return Ok(false);
        };
        // Re-export writable: nobody could have attached for writing while it was held.
        // The group's volumes now, and those it held at start (one may have left it).
        for (id, v) in self.snapshot_state().volumes {
            if (v.group_id == group_id || at_start.contains(&id)) && v.writable() {
                let done = async {
                    self.unexport(&v).await?;
                    self.export(&id, &v).await
                };
                if let Err(e) = done.await {
                    self.held.lock().expect("held poisoned").insert(group_id.to_string(), at_start);
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    pub(crate) async fn unexport(&self, v: &Vol) -> Result<(), DriverError> {
        self.drop_export(&export_id(v)).await
    }

    /// Removes an export and waits until it is gone (it goes asynchronously, and its node
    /// stays busy until then).
    pub(crate) async fn drop_export(&self, id: &str) -> Result<(), DriverError> {
        self.daemon().remove_export(id).await?;
        for _ in 0..100 {
            if !self.daemon().export_ids().await?.iter().any(|e| e == id) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(DriverError::Unavailable(format!("export {id} did not go away")))
    }

    /// Removes a volume's exports and nodes from the daemon (files stay).
    pub(crate) async fn close_chain(&self, v: &Vol) -> Result<(), DriverError> {
        self.unexport(v).await?;
        for l in v.layers.iter().rev() {
            self.daemon().remove_node(&node(v, l.seq)).await?;
        }
        for i in (0..v.origin.as_ref().map_or(0, |o| o.files.len())).rev() {
            self.daemon().remove_node(&origin_node(v, i)).await?;
        }
        Ok(())
    }

    /// The files a volume's layer `upto` reads through, bottom first: a snapshot's files
    /// for a volume made from one, then its layers up to `upto`. The daemon opens the
    /// chain this way (each node's backing named), and so does [`image::map_chain`].
    pub(crate) fn chain_files(&self, id: &str, v: &Vol, upto: usize) -> Vec<PathBuf> {
        let origin = v.origin.iter().flat_map(|o| o.files.iter().cloned());
        origin.chain(v.layers[..=upto].iter().map(|l| self.layer_path(id, l.seq))).collect()
    }

    /// The allocation map of layer `upto` of a volume, read through the chain the state
    /// holds (what a sync ships and what it would ship are computed from this).
    pub(crate) async fn chain_map(&self, id: &str, v: &Vol, upto: usize) -> Result<Vec<image::Extent>, DriverError> {
        image::map_chain(&self.chain_files(id, v, upto)).await
    }

    /// Makes every layer's header name the layer below it in the state (the bottom one:
    /// the snapshot's top file, or nothing it does not already name). Only a layer that
    /// differs is rewritten (`qemu-img rebase -u`), so the files must not be open in the
    /// daemon. They differ after a fold cut short between its block job's end, which
    /// points the header of the layer above the folded range at the base, and the state
    /// write that drops the folded layers: if the base's metadata was not flushed yet (a
    /// daemon killed there), that header skips layers whose clusters only they hold, and
    /// anything following it offline (a flatten, a merge, a clone) would read around them.
    pub(crate) async fn align_headers(&self, id: &str, v: &Vol) -> Result<(), DriverError> {
        if v.layers.is_empty() {
            return Ok(());
        }
        let files = self.chain_files(id, v, v.layers.len() - 1);
        let first = v.origin.as_ref().map_or(0, |o| o.files.len());
        for i in first.max(1)..files.len() {
            let (file, below) = (&files[i], &files[i - 1]);
            let named = image::backing_of(file)?;
            if named.as_deref() != below.to_str() {
                tracing::warn!(
                    volume = id,
                    layer = %file.display(),
                    names = ?named,
                    below = %below.display(),
                    "a layer's header names another backing than the chain has (a fold cut short); pointing it at the layer below"
                );
                image::rebase_unsafe(file, below).await?;
            }
        }
        Ok(())
    }

    /// Folds layers `base+1..=top` of a volume whose chain is open into layer `base`
    /// (a live block-commit under the active layer), makes that durable, and takes the
    /// folded layers' nodes out. Returns their seqs: the caller drops them from the state
    /// and then their files. `top` must be below the active layer, and nothing may read
    /// through `base` but this chain (see [`QemuDriver::pinned_top`]).
    pub(crate) async fn fold(&self, v: &Vol, base: usize, top: usize) -> Result<Vec<u32>, DriverError> {
        if top <= base {
            return Ok(Vec::new());
        }
        let job = format!("c{}", v.index);
        self.daemon()
            .start_commit(&job, &node(v, v.top().seq), &node(v, v.layers[top].seq), &node(v, v.layers[base].seq))
            .await?;
        self.wait_job(&job).await?;
        // The base holds the committed data only once it is flushed; until then the
        // layers above it are the only durable copy, so they stay.
        self.flush_node(v, v.layers[base].seq).await?;
        // Top down: a node still serves as the backing of the one above it.
        for l in v.layers[base + 1..=top].iter().rev() {
            self.daemon().remove_node(&node(v, l.seq)).await?;
        }
        Ok(v.layers[base + 1..=top].iter().map(|l| l.seq).collect())
    }

    /// Re-creates nodes and exports after a (re)start of the daemon. Each group's chains
    /// are rebuilt under the group's lock from the state read under it: an operation that
    /// ran against the fresh daemon before this (and failed, or left a node behind) can
    /// neither interleave with the rebuild nor leave a node of the old shape in it, since
    /// every node of the volume is removed before its chain is opened again.
    pub(crate) async fn restore(&self) {
        for (id, c) in self.snapshot_state().clones {
            if let Err(e) = self.open_clone(&id, &c).await {
                tracing::error!(clone = %id, error = %e, "cannot restore a test clone in qemu-storage-daemon");
            }
        }
        let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, v) in self.snapshot_state().volumes {
            by_group.entry(v.group_id.clone()).or_default().push(id);
        }
        for (group, ids) in by_group {
            let _g = if group.is_empty() { None } else { Some(self.group_lock(&group).lock_owned().await) };
            for id in ids {
                let Ok(v) = self.vol(&id) else { continue };
                if v.role == Some(Role::Secondary) || v.layers.is_empty() {
                    continue;
                }
                let rebuilt = async {
                    // Exports a racing sync may have added (its read or flush export).
                    for export in [format!("r{}", v.index), format!("f{}", v.index)] {
                        self.drop_export(&export).await?;
                    }
                    self.close_chain(&v).await?;
                    // The daemon reads the chain as the state says whatever the headers
                    // name, but offline work on it later follows them.
                    if let Err(e) = self.align_headers(&id, &v).await {
                        tracing::warn!(volume = %id, error = %e, "could not align the chain's headers; offline work on it aligns again first");
                    }
                    self.open_chain(&id, &v).await
                };
                if let Err(e) = rebuilt.await {
                    tracing::error!(volume = %id, error = %e, "cannot restore volume in qemu-storage-daemon");
                }
            }
        }
    }

    /// Runs a block job to its end and reports its error, if any.
    pub(crate) async fn wait_job(&self, job: &str) -> Result<(), DriverError> {
        loop {
            // A job that is gone did not necessarily finish: the daemon may have restarted
            // mid-job, leaving the base with only part of the data. Never take that for
            // success: the caller keeps every layer, and the work is redone next time.
            let Some(j) = self.daemon().job(job).await? else {
                return Err(DriverError::Unavailable(format!(
                    "block job {job} disappeared before it concluded (did qemu-storage-daemon restart?); \
                     its layers are kept and it runs again at the next sync"
                )));
            };
            if j.status == "concluded" {
                self.daemon().dismiss_job(job).await?;
                if let Some(err) = j.error {
                    return Err(DriverError::Internal(format!("block job {job} failed: {err}")));
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes what a block job wrote into `node` durable. qcow2 keeps its metadata (the
    /// L2 tables that say which clusters hold data) in the daemon's memory until the node
    /// is flushed; a daemon killed before that loses every cluster the job copied, even
    /// though the data itself reached the file. A commit's layers must therefore not be
    /// dropped before their base is flushed. The flush goes through a read-only NBD
    /// export of the node: an NBD flush flushes the node's caches and its file.
    pub(crate) async fn flush_node(&self, v: &Vol, seq: u32) -> Result<(), DriverError> {
        let (id, name) = (format!("f{}", v.index), format!("flush-{}", node(v, seq)));
        self.daemon().add_export(&id, &node(v, seq), &name, false).await?;
        let flushed = async {
            let mut client = NbdClient::connect(self.daemon().nbd(), &name).await.map_err(nbd_err)?;
            client.flush().await.map_err(nbd_err)?;
            client.disconnect().await;
            Ok::<(), DriverError>(())
        }
        .await;
        self.daemon().remove_export(&id).await?;
        flushed
    }

    /// Keeps a replica chain at two layers: merges the oldest point above the base into
    /// the base. Every step leaves the newest point readable.
    pub(crate) async fn shorten_replica(&self, id: &str) -> Result<(), DriverError> {
        loop {
            let v = self.vol(id)?;
            // A test clone reads through these layers: they stay as they are until it goes.
            // Layers a snapshot reads through stay too: merging starts above them.
            let start = self.pinned_top(id, &v).map_or(0, |p| p + 1);
            if v.layers.len() <= start + 2 || v.role != Some(Role::Secondary) || self.has_clones(id) {
                return Ok(());
            }
            let (base, mid, above) = (v.layers[start].seq, v.layers[start + 1].seq, v.layers[start + 2].seq);
            // The commit goes into the layer `mid`'s header names.
            self.align_headers(id, &v).await?;
            image::commit(&self.layer_path(id, mid)).await?;
            image::rebase_unsafe(&self.layer_path(id, above), &self.layer_path(id, base)).await?;
            let mid_layer = v.layers[start + 1].clone();
            self.update(|st| {
                let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                sv.layers[start].rp = mid_layer.rp.clone();
                sv.layers[start].rp_created_ms = mid_layer.rp_created_ms;
                sv.layers.retain(|l| l.seq != mid);
                Ok(())
            })
            .await?;
            let _ = std::fs::remove_file(self.layer_path(id, mid));
        }
    }

    /// Bounded chains at start: a primary's chain left long by an older version (one
    /// frozen layer per interval while the peer was away) has its waiting points merged,
    /// oldest pairs first, until at most `MAX_WAITING` wait, before the daemon opens any
    /// of it (opening thousands of layers made starts take minutes). Offline, with
    /// `qemu-img commit` of the upper layer into the lower and an unsafe rebase of the
    /// layer above onto the lower (identical data): every step leaves the chain reading
    /// the same, and the merged layer carries the newer point, which a delta from the
    /// acknowledged layer covers whole.
    pub(crate) async fn merge_waiting(&self) {
        for id in self.snapshot_state().volumes.keys() {
            let mut merged = 0usize;
            // Each merge commits into the layer the upper one's header names.
            if let Ok(v) = self.vol(id)
                && let Err(e) = self.align_headers(id, &v).await
            {
                tracing::warn!(volume = %id, error = %e, "could not align the chain's headers; not merging it");
                continue;
            }
            while let Ok(v) = self.vol(id) {
                let waiting: Vec<usize> = (0..v.layers.len().saturating_sub(1))
                    .filter(|&i| v.layers[i].rp.is_some() && !v.layers[i].acked)
                    .collect();
                if v.role != Some(Role::Primary) || waiting.len() <= MAX_WAITING {
                    break;
                }
                // Never into a layer a snapshot reads through.
                if self.pinned_top(id, &v).is_some_and(|p| p >= waiting[0]) {
                    break;
                }
                let (lower, upper) = (waiting[0], waiting[0] + 1);
                let above = upper + 1; // the next waiting layer, or the active one
                let (lo, up, ab) = (v.layers[lower].seq, v.layers[upper].seq, v.layers[above].seq);
                let step = async {
                    image::commit(&self.layer_path(id, up)).await?;
                    image::rebase_unsafe(&self.layer_path(id, ab), &self.layer_path(id, lo)).await?;
                    let newer = v.layers[upper].clone();
                    self.update(|st| {
                        let sv = st.volumes.get_mut(id).ok_or_else(|| not_found(id))?;
                        let l = sv.layers.iter_mut().find(|l| l.seq == lo).expect("lower layer");
                        l.rp = newer.rp.clone();
                        l.rp_created_ms = newer.rp_created_ms;
                        sv.layers.retain(|l| l.seq != up);
                        Ok(())
                    })
                    .await
                };
                if let Err(e) = step.await {
                    tracing::warn!(volume = %id, error = %e, "could not merge a long chain; it stays as it is");
                    break;
                }
                let _ = std::fs::remove_file(self.layer_path(id, up));
                merged += 1;
            }
            if merged > 0 {
                tracing::info!(volume = %id, merged, "merged waiting points of a long chain before serving");
            }
        }
    }
}
