//! Where a mock agent keeps its state across restarts: a snapshot file of the whole state
//! and a journal beside it of the volumes changed since.
//!
//! A change is in one of the two before the call that made it returns, so a restarted
//! (even SIGKILLed) mock still has it. A call that changed only volumes it named (through
//! [`Locked::volume_mut`], [`Locked::put_volume`], [`Locked::remove_volume`]) appends
//! those volumes to the journal; any other change (through `DerefMut`) writes a new
//! snapshot and empties the journal. Rewriting the whole state for every change cost a
//! mock of a few thousand volumes more CPU than the orchestrator it served.
//!
//! Each journal line carries a sequence number and the snapshot the last one it covers,
//! so lines a snapshot already holds (a crash between writing it and emptying the
//! journal) are skipped when the state is read back. A torn last line is ignored: its
//! call had not returned.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::{MockDriver, MockVolume, State};

/// Journal lines after which the next write is a snapshot (and the journal starts over).
const COMPACT_AFTER: usize = 4096;

/// One journal line: a volume's value after a change, or its removal.
#[derive(Serialize, Deserialize)]
struct Line {
    seq: u64,
    id: String,
    volume: Option<MockVolume>,
}

/// The journal's file: beside the snapshot.
fn journal_path(snapshot: &Path) -> PathBuf {
    snapshot.with_extension("journal")
}

/// Reads the state back: the snapshot, then the journal lines it does not hold yet.
pub(super) fn load(snapshot: &Path) -> Result<Option<State>, String> {
    // Either may be missing: no snapshot was written yet, or the journal was never begun.
    let (mut state, found): (State, bool) = match std::fs::read(snapshot) {
        Ok(bytes) => (
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("mock state {} is corrupt: {e}; delete it to start empty", snapshot.display()))?,
            true,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), false),
        Err(e) => return Err(format!("cannot read mock state {}: {e}", snapshot.display())),
    };
    let journal = match std::fs::read_to_string(journal_path(snapshot)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !found => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read mock journal beside {}: {e}", snapshot.display())),
    };
    for text in journal.lines() {
        // Only the last line can be torn (a write cut by a kill); its call never returned.
        let Ok(line) = serde_json::from_str::<Line>(text) else { continue };
        if line.seq <= state.seq {
            continue;
        }
        state.seq = line.seq;
        match line.volume {
            Some(v) => state.volumes.insert(line.id, v),
            None => state.volumes.remove(&line.id),
        };
    }
    Ok(Some(state))
}

/// How far the files have caught up with the changes.
#[derive(Default)]
pub(super) struct Saves {
    /// Changes made so far; counted under the state lock.
    made: AtomicU64,
    /// The writers' turn (one at a time) and what they wrote.
    written: Mutex<Written>,
}

#[derive(Default)]
struct Written {
    /// The changes the last snapshot holds: a change up to it needs no write of its own.
    snapshot_upto: u64,
    /// Lines in the journal since that snapshot.
    lines: usize,
}

/// The state under its lock; what changed is written when it is released.
pub(super) struct Locked<'a> {
    pub(super) state: Option<std::sync::MutexGuard<'a, State>>,
    pub(super) driver: &'a MockDriver,
    /// Changed through `DerefMut`: only a new snapshot holds it.
    pub(super) whole: bool,
    /// The volumes changed through the named accessors.
    pub(super) touched: BTreeSet<String>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.state.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.whole = true;
        self.state.as_mut().expect("held until dropped")
    }
}

impl Locked<'_> {
    /// Writes the whole state when the lock is released, whatever changed.
    pub(super) fn save_whole(&mut self) {
        self.whole = true;
    }

    fn inner(&mut self) -> &mut State {
        self.state.as_mut().expect("held until dropped")
    }

    /// A volume to change (journaled on release).
    pub(super) fn volume_mut(&mut self, id: &str) -> Option<&mut MockVolume> {
        if !self.inner().volumes.contains_key(id) {
            return None;
        }
        self.touched.insert(id.to_string());
        self.inner().volumes.get_mut(id)
    }

    /// Adds or replaces a volume (journaled on release).
    pub(super) fn put_volume(&mut self, id: &str, v: MockVolume) {
        self.touched.insert(id.to_string());
        self.inner().volumes.insert(id.to_string(), v);
    }

    /// Removes a volume (journaled on release).
    pub(super) fn remove_volume(&mut self, id: &str) -> Option<MockVolume> {
        self.touched.insert(id.to_string());
        self.inner().volumes.remove(id)
    }

    /// The ids of the volumes of `group_id` whose role is `role`.
    pub(super) fn group_volumes(&self, group_id: &str, role: Option<drover_agent::driver::Role>) -> Vec<String> {
        self.volumes
            .iter()
            .filter(|(_, v)| v.group_id == group_id && v.role == role)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.state.take() else { return };
        let Some(path) = self.driver.state_file.as_deref() else { return };
        if !self.whole && self.touched.is_empty() {
            return;
        }
        let saves = &self.driver.saves;
        let mine = saves.made.fetch_add(1, Ordering::SeqCst) + 1;
        // Released before writing, so other calls go on meanwhile.
        drop(guard);
        let mut written = saves.written.lock().expect("mock saves poisoned");
        if written.snapshot_upto >= mine {
            return;
        }
        let result = if self.whole || written.lines >= COMPACT_AFTER {
            self.snapshot(path, &mut written)
        } else {
            // The volumes' values now (this call's change or a later one), appended in
            // turn: the last line of a volume is always its newest value.
            guard = self.driver.state.lock().expect("mock state poisoned");
            let mut text = String::new();
            for id in &self.touched {
                guard.seq += 1;
                let line = Line { seq: guard.seq, id: id.clone(), volume: guard.volumes.get(id).cloned() };
                text.push_str(&serde_json::to_string(&line).expect("journal lines serialise"));
                text.push('\n');
            }
            drop(guard);
            written.lines += self.touched.len();
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(journal_path(path))
                .and_then(|mut f| f.write_all(text.as_bytes()))
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "mock state write failed");
        }
    }
}

impl Locked<'_> {
    /// Writes the whole state (holding every change made so far) and empties the journal.
    fn snapshot(&self, path: &Path, written: &mut Written) -> std::io::Result<()> {
        let (bytes, upto) = {
            let state = self.driver.state.lock().expect("mock state poisoned");
            (serde_json::to_vec(&*state), self.driver.saves.made.load(Ordering::SeqCst))
        };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes.map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)?;
        // Lines the snapshot holds are skipped on reading anyway (by their sequence), so
        // a crash before this truncation loses nothing.
        std::fs::File::create(journal_path(path))?;
        written.snapshot_upto = upto;
        written.lines = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(state: &State) -> Vec<(String, u64)> {
        let mut v: Vec<_> = state.volumes.iter().map(|(id, v)| (id.clone(), v.size_bytes)).collect();
        v.sort();
        v
    }

    fn volume(size: u64) -> MockVolume {
        MockVolume { size_bytes: size, ..MockVolume::default() }
    }

    #[test]
    fn reading_back_applies_only_the_lines_the_snapshot_does_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("mock-state.json");
        let mut state = State { seq: 5, ..State::default() };
        state.volumes.insert("a".into(), volume(1));
        state.volumes.insert("b".into(), volume(2));
        std::fs::write(&snapshot, serde_json::to_vec(&state).unwrap()).unwrap();
        let line = |seq, id: &str, v: Option<MockVolume>| {
            serde_json::to_string(&Line { seq, id: id.into(), volume: v }).unwrap() + "\n"
        };
        let journal = [
            // Held by the snapshot already (a crash before the journal was emptied).
            line(4, "a", Some(volume(100))),
            line(6, "b", None),
            line(7, "c", Some(volume(3))),
            line(8, "c", Some(volume(4))),
            // Torn by a kill mid-write: its call never returned.
            line(9, "d", Some(volume(5)))[..20].to_string(),
        ]
        .concat();
        std::fs::write(journal_path(&snapshot), journal).unwrap();
        let back = load(&snapshot).unwrap().unwrap();
        assert_eq!(sizes(&back), vec![("a".to_string(), 1), ("c".to_string(), 4)]);
        assert_eq!(back.seq, 8);
        assert!(load(&dir.path().join("none.json")).unwrap().is_none(), "neither file: nothing to read back");
        // A journal without a snapshot (none was written yet) is read from an empty state.
        std::fs::remove_file(&snapshot).unwrap();
        let back = load(&snapshot).unwrap().unwrap();
        assert_eq!(sizes(&back), vec![("a".to_string(), 100), ("c".to_string(), 4)], "every whole line applies");
    }
}
