//! Taking over images Drover did not make: what is safe to manage, and the snapshots an
//! image carries.
//!
//! An unmanaged volume is a qcow2 file directly in the pool directory, named
//! `<reference>.qcow2`. Its internal snapshots are adoptable with it: each becomes a
//! standalone file in the volume's directory, pinned like the layers of a snapshot taken
//! here (see `snapshot.rs` for why Drover's own snapshots are not internal ones).

use super::*;

/// A reference names a file directly in the pool: no path, no leading dot.
pub(crate) fn check_reference(reference: &str) -> Result<(), DriverError> {
    if reference.is_empty()
        || reference.len() > 255
        || reference.contains(['/', '\\'])
        || reference.starts_with('.')
        || reference.chars().any(char::is_control)
    {
        return Err(DriverError::InvalidArgument(format!(
            "reference {reference:?} is not a file name in the pool (no path, no leading dot); see \
             `drover volume manageable-list`"
        )));
    }
    Ok(())
}

/// The file `image` reads through, resolved as qemu resolves it (relative to the image).
pub(crate) fn backing_of(image: &Path, info: &serde_json::Value) -> Option<PathBuf> {
    let b = info["full-backing-filename"].as_str().or_else(|| info["backing-filename"].as_str())?;
    let p = Path::new(b);
    let p = if p.is_absolute() { p.to_path_buf() } else { image.parent()?.join(p) };
    Some(std::fs::canonicalize(&p).unwrap_or(p))
}

/// The internal snapshots `qemu-img info` reports, as manageable snapshots.
pub(crate) fn internal_snapshots(info: &serde_json::Value, size_bytes: u64) -> Vec<ManageableSnapshot> {
    let Some(list) = info["snapshots"].as_array() else { return Vec::new() };
    list.iter()
        .map(|s| ManageableSnapshot {
            reference: s["name"].as_str().unwrap_or_default().to_string(),
            size_bytes,
            created_at_ms: s["date-sec"].as_i64().unwrap_or(0) * 1000
                + s["date-nsec"].as_i64().unwrap_or(0) / 1_000_000,
            kind: "internal".into(),
        })
        .collect()
}

impl QemuDriver {
    /// The snapshots of `volume_id` adopted with its image whose internal snapshots its
    /// bottom layer still carries; empty when any snapshot of it was taken here, is
    /// read through by another volume, or is no longer inside the image.
    pub(crate) async fn adopted_snapshots(&self, volume_id: &str) -> Vec<String> {
        let st = self.snapshot_state();
        let Some(v) = st.volumes.get(volume_id) else { return Vec::new() };
        let mine: Vec<(&String, &SnapRec)> =
            st.snapshots.iter().filter(|(_, s)| s.members.contains_key(volume_id)).collect();
        let made_from =
            |id: &String| st.volumes.values().any(|v| v.origin.as_ref().is_some_and(|o| o.snapshot_id == *id));
        if mine.is_empty() || mine.iter().any(|(id, s)| s.internal.is_empty() || s.members.len() != 1 || made_from(id))
        {
            return Vec::new();
        }
        let Some(bottom) = v.layers.first() else { return Vec::new() };
        let Ok(info) = image::info(&self.layer_path(volume_id, bottom.seq), true).await else { return Vec::new() };
        let inside = internal_snapshots(&info, 0);
        if !mine.iter().all(|(_, s)| inside.iter().any(|i| i.reference == s.internal)) {
            return Vec::new();
        }
        mine.into_iter().map(|(id, _)| id.clone()).collect()
    }

    /// Why the image at `path` cannot be taken over as it is; empty when it can.
    /// `backings` maps the files other pool images read through to those images.
    pub(crate) fn unsafe_because(
        &self,
        path: &Path,
        info: &serde_json::Value,
        m: &Manageable,
        backings: &BTreeMap<PathBuf, String>,
    ) -> String {
        if info["format"] != "qcow2" {
            return format!("format is {}, not qcow2; convert it with qemu-img first", info["format"]);
        }
        if let Err(e) = check_reference(&m.reference) {
            return e.to_string();
        }
        let own = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(top) = backings.get(&own) {
            return format!("it is the backing file of {top}; take over or flatten {top} first");
        }
        if let Some(b) = backing_of(path, info) {
            let pool = std::fs::canonicalize(&self.pool).unwrap_or_else(|_| self.pool.clone());
            return match b.starts_with(&pool) {
                true => format!(
                    "it has a backing file ({}); flatten it first (qemu-img rebase -b '' {})",
                    m.backing_file,
                    path.display()
                ),
                false => format!(
                    "its backing file {} is outside the pool; copy it in and flatten the image first",
                    m.backing_file
                ),
            };
        }
        let mut names: Vec<&str> = m.snapshots.iter().map(|s| s.reference.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return format!("two of its internal snapshots are named {:?}; rename one first", w[0]);
        }
        if let Some(s) = m.snapshots.iter().find(|s| s.reference.is_empty() || s.reference.contains(',')) {
            return format!("internal snapshot {:?} has no usable name; rename it first", s.reference);
        }
        String::new()
    }
}
