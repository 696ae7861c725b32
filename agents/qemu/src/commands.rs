//! Typed helpers for the QMP commands the driver uses. Each builds its arguments in one
//! place, so a call site says what it does (`add_export`) rather than spelling JSON, and
//! each documents how it treats "already there" and "already gone".

use std::path::Path;

use serde_json::{Value, json};

use super::daemon::Daemon;
use drover_agent::driver::DriverError;

/// A block job as `query-jobs` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// QEMU's status: created, running, ready, concluded, …
    pub status: String,
    /// Set when the job failed.
    pub error: Option<String>,
}

/// What a new qcow2 node sits on.
#[derive(Debug, Clone, Copy)]
pub enum Backing<'a> {
    /// The backing file named in the image header, opened by QEMU.
    FromImage,
    /// Nothing: the node stands alone (an overlay about to be snapshotted onto a node).
    None,
    /// An existing node.
    Node(&'a str),
}

/// One `blockdev-snapshot` of a group transaction: `overlay` becomes the active layer on
/// top of `node`, which freezes.
pub struct Snapshot<'a> {
    pub node: &'a str,
    pub overlay: &'a str,
}

impl Daemon {
    /// Opens a qcow2 file as node `node` on `backing`. Adding a node that exists
    /// succeeds when `exists_ok`.
    pub async fn add_qcow2(
        &self,
        node: &str,
        file: &Path,
        backing: Backing<'_>,
        exists_ok: bool,
    ) -> Result<(), DriverError> {
        let mut args = json!({
            "driver": "qcow2",
            "node-name": node,
            "file": {"driver": "file", "filename": file},
        });
        match backing {
            Backing::FromImage => {}
            Backing::None => args["backing"] = Value::Null,
            Backing::Node(b) => args["backing"] = json!(b),
        }
        match self.qmp("blockdev-add", args).await {
            Err(DriverError::Internal(m)) if exists_ok && (m.contains("Duplicate") || m.contains("already")) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Opens a pinned qcow2 file (a snapshot's layer, which nothing writes while it is
    /// pinned) read-only as node `node` on `below`, without file locks: the volume the
    /// snapshot was taken of may hold the same file open in another node of the daemon.
    /// Adding a node that exists succeeds.
    pub async fn add_pinned_qcow2(&self, node: &str, file: &Path, below: Option<&str>) -> Result<(), DriverError> {
        let args = json!({
            "driver": "qcow2",
            "node-name": node,
            "read-only": true,
            "file": {"driver": "file", "filename": file, "locking": "off"},
            "backing": below,
        });
        match self.qmp("blockdev-add", args).await {
            Err(DriverError::Internal(m)) if m.contains("Duplicate") || m.contains("already") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Removes a node; one that is already gone counts as removed.
    pub async fn remove_node(&self, node: &str) -> Result<(), DriverError> {
        self.qmp_lenient("blockdev-del", json!({"node-name": node})).await
    }

    /// Exports `node` over NBD under `name`; an export with this id that exists counts as
    /// added.
    pub async fn add_export(&self, id: &str, node: &str, name: &str, writable: bool) -> Result<(), DriverError> {
        let args = json!({"type": "nbd", "id": id, "node-name": node, "name": name, "writable": writable});
        match self.qmp("block-export-add", args).await {
            Err(DriverError::Internal(m)) if m.contains("already") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Removes an export at once (clients are cut off); one that is gone counts as removed.
    /// The export disappears asynchronously: see [`Daemon::export_ids`].
    pub async fn remove_export(&self, id: &str) -> Result<(), DriverError> {
        self.qmp_lenient("block-export-del", json!({"id": id, "mode": "hard"})).await
    }

    /// The ids of the exports that exist now.
    pub async fn export_ids(&self) -> Result<Vec<String>, DriverError> {
        let list = self.qmp("query-block-exports", json!({})).await?;
        Ok(list.as_array().into_iter().flatten().filter_map(|e| e["id"].as_str().map(str::to_string)).collect())
    }

    /// Freezes every listed node at one instant (one `transaction`).
    pub async fn snapshot_all(&self, snapshots: &[Snapshot<'_>]) -> Result<(), DriverError> {
        let actions: Vec<Value> = snapshots
            .iter()
            .map(|s| json!({"type": "blockdev-snapshot", "data": {"node": s.node, "overlay": s.overlay}}))
            .collect();
        self.qmp("transaction", json!({"actions": actions})).await.map(|_| ())
    }

    /// Starts block job `job` committing `top` (and everything between) into `base`,
    /// under the active layer `device`. The job stays until dismissed.
    pub async fn start_commit(&self, job: &str, device: &str, top: &str, base: &str) -> Result<(), DriverError> {
        let args = json!({"job-id": job, "device": device, "top-node": top, "base-node": base, "auto-dismiss": false});
        self.qmp("block-commit", args).await.map(|_| ())
    }

    /// The job with this id, if the daemon has it.
    pub async fn job(&self, id: &str) -> Result<Option<Job>, DriverError> {
        let jobs = self.qmp("query-jobs", json!({})).await?;
        Ok(jobs.as_array().into_iter().flatten().find(|j| j["id"] == id).map(|j| Job {
            status: j["status"].as_str().unwrap_or_default().to_string(),
            error: j.get("error").and_then(|e| e.as_str()).map(str::to_string),
        }))
    }

    /// Dismisses a concluded job; one that is gone counts as dismissed.
    pub async fn dismiss_job(&self, id: &str) -> Result<(), DriverError> {
        self.qmp_lenient("job-dismiss", json!({"id": id})).await
    }

    /// Grows node `node` to `size` bytes.
    pub async fn resize(&self, node: &str, size: u64) -> Result<(), DriverError> {
        self.qmp("block_resize", json!({"node-name": node, "size": size})).await.map(|_| ())
    }

    /// Whether the daemon answers QMP.
    pub async fn ping(&self) -> Result<(), DriverError> {
        self.qmp("query-version", json!({})).await.map(|_| ())
    }
}
