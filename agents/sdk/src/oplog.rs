//! The op log (`op_log` in the agent's settings; off when empty): one JSON line for each
//! mutation the guard admitted to run, written before its driver call starts.
//!
//! It is the agent's own account of what its driver was asked to do, whatever the
//! backend: an op_id that appears on two lines entered the driver twice, which the
//! ledger exists to prevent (an op_id is run once, then replayed or refused as
//! interrupted). The fault tests and the qemu soak read it after SIGKILLs of the agent
//! to show that from outside. Replays, refusals and calls answered without the driver
//! (a stale epoch, a volume already gone) write nothing.
//!
//! Each line is appended with one `write` to a file opened for appending, so lines from
//! concurrent mutations never interleave, and a line is in the file before the driver
//! acts: a SIGKILLed agent leaves it behind (the kernel holds it), though a power loss may
//! not (it is not fsynced; the ledger is what must survive that). A line is about 200
//! bytes; the file is never truncated by the agent, so rotate it from outside (a
//! copy-and-truncate rotation suits it, since it is always appended at its end).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One line of the op log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpLogEntry {
    /// The operation, as the agent's metrics name it (`promote`, `enable_replication`, …).
    pub op: String,
    /// The volume or group id it acts on.
    pub target: String,
    pub op_id: String,
    pub epoch: u64,
    /// Its fence scope (`group/<id>`, `volume/<id>`, `snapshot/<id>`).
    pub scope: String,
    /// When it was admitted (Unix milliseconds).
    pub at_ms: i64,
}

/// An open op log.
pub struct OpLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl OpLog {
    /// Opens (or creates) the log at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    /// Appends `entry`. A failed write is logged and the mutation goes on: this is an
    /// account of the driver's work, not a condition of it.
    pub fn append(&self, entry: &OpLogEntry) {
        let mut line = serde_json::to_vec(entry).expect("op log entries serialise");
        line.push(b'\n');
        let written = self.file.lock().expect("op log poisoned").write_all(&line);
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, op_id = %entry.op_id, "op log append failed");
        }
    }
}

/// Every entry of the op log at `path` (none when it does not exist). A torn last line (a
/// write cut by a full disk) is skipped; any other line that does not parse is an error.
pub fn read(path: &Path) -> std::io::Result<Vec<OpLogEntry>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut entries = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(e) => entries.push(e),
            Err(_) if n + 1 == lines.len() && !complete => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} line {}: {e}", path.display(), n + 1),
                ));
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op_id: &str) -> OpLogEntry {
        OpLogEntry {
            op: "promote".into(),
            target: "v1".into(),
            op_id: op_id.into(),
            epoch: 3,
            scope: "group/g1".into(),
            at_ms: 1,
        }
    }

    #[test]
    fn lines_are_appended_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("ops.jsonl");
        assert!(read(&path).unwrap().is_empty(), "no file: no entries");
        OpLog::open(&path).unwrap().append(&entry("a"));
        let log = OpLog::open(&path).unwrap();
        log.append(&entry("b"));
        log.append(&entry("a"));
        let read_back = read(&path).unwrap();
        assert_eq!(read_back, vec![entry("a"), entry("b"), entry("a")]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_a_torn_middle_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.jsonl");
        let whole = serde_json::to_string(&entry("a")).unwrap();
        std::fs::write(&path, format!("{whole}\n{}", &whole[..20])).unwrap();
        assert_eq!(read(&path).unwrap(), vec![entry("a")]);
        std::fs::write(&path, format!("{}\n{whole}\n", &whole[..20])).unwrap();
        let err = read(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
