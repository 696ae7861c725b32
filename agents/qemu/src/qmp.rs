//! A QMP client that cannot desync: every command carries an `id`, one reader task
//! matches each reply to its command by that id, and events are set apart. A caller that
//! goes away (its future dropped after the command was written) leaves its reply to be
//! read and thrown away, so the next caller never receives another command's answer.
//!
//! Evaluated first: the `qapi` crate (0.15) generates typed commands from an older QEMU
//! schema and brings a large generated module into the build; Drover uses a dozen
//! commands (typed in `commands.rs`), so a small client keeps up with QEMU 10 directly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("qmp protocol: {0}")]
    Protocol(String),
    /// QEMU refused the command; the class and description are QEMU's.
    #[error("{command}: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>>;

/// A connected, capability-negotiated QMP session. Commands may run concurrently.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Replies awaited, by command id; `None` once the connection is gone.
    pending: Pending,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connects and leaves capability negotiation mode.
    pub async fn connect(socket: &Path) -> Result<Self, QmpError> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = lines
            .next_line()
            .await?
            .ok_or_else(|| QmpError::Protocol("qemu-storage-daemon closed the QMP socket".into()))?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("bad QMP greeting {greeting:?}: {e}")))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let table = pending.clone();
        let reader = tokio::spawn(async move {
            loop {
                let line = match lines.next_line().await {
                    Ok(Some(l)) => l,
                    Ok(None) | Err(_) => break,
                };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(line = %line, "unreadable QMP message");
                    continue;
                };
                if msg.get("event").is_some() {
                    tracing::debug!(event = %msg["event"], "QMP event");
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    tracing::warn!(message = %msg, "QMP reply without an id; dropped");
                    continue;
                };
                let waiter = table.lock().expect("qmp table poisoned").as_mut().and_then(|t| t.remove(&id));
                match waiter {
                    // The caller may have gone: its reply is read and dropped here.
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => tracing::debug!(id, "QMP reply for a caller that left"),
                }
            }
            // The connection is gone: every waiter learns it (its sender is dropped).
            table.lock().expect("qmp table poisoned").take();
        });
        let qmp = Self { writer: tokio::sync::Mutex::new(w), pending, next_id: AtomicU64::new(1), reader };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Whether the connection is still up.
    pub fn is_open(&self) -> bool {
        self.pending.lock().expect("qmp table poisoned").is_some()
    }

    /// Runs one command and returns its `return` value. Safe to cancel at any point.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("qmp table poisoned").as_mut() {
            Some(t) => t.insert(id, tx),
            None => return Err(QmpError::Protocol("the QMP connection is closed".into())),
        };
        let mut msg =
            serde_json::to_vec(&json!({ "execute": command, "arguments": arguments, "id": id })).expect("json");
        msg.push(b'\n');
        {
            // One write of the whole line under the lock: commands never interleave.
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(&msg).await {
                if let Some(t) = self.pending.lock().expect("qmp table poisoned").as_mut() {
                    t.remove(&id);
                }
                return Err(e.into());
            }
        }
        let reply = rx.await.map_err(|_| QmpError::Protocol("qemu-storage-daemon closed the QMP socket".into()))?;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                class: err["class"].as_str().unwrap_or("").to_string(),
                desc: err["desc"].as_str().unwrap_or("").to_string(),
            });
        }
        Err(QmpError::Protocol(format!("unexpected QMP reply {reply}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A real qemu-storage-daemon with a QMP socket, killed on drop.
    async fn daemon(dir: &Path) -> (tokio::process::Child, std::path::PathBuf) {
        let socket = dir.join("qmp.sock");
        let child = tokio::process::Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=m", socket.display()))
            .args(["--monitor", "chardev=m"])
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-storage-daemon (qemu-utils) is installed");
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (child, socket)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_caller_gets_its_own_reply_when_others_are_cancelled_mid_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (_child, socket) = daemon(dir.path()).await;
        let qmp = Arc::new(Qmp::connect(&socket).await.unwrap());
        // Callers that leave at every moment: before, during and after their write.
        for i in 0..60u64 {
            let fut = qmp.execute(if i % 2 == 0 { "query-version" } else { "query-block-exports" }, json!({}));
            let _ = tokio::time::timeout(Duration::from_micros(i * 7), fut).await;
        }
        // Then concurrent calls of commands with different answers: each gets its own.
        let mut calls = Vec::new();
        for i in 0..60 {
            let q = qmp.clone();
            calls.push(tokio::spawn(async move {
                match i % 3 {
                    0 => {
                        let v = q.execute("query-version", json!({})).await.unwrap();
                        assert!(v.get("qemu").is_some(), "query-version got {v}");
                    }
                    1 => {
                        let v = q.execute("query-block-exports", json!({})).await.unwrap();
                        assert!(v.is_array(), "query-block-exports got {v}");
                    }
                    _ => {
                        let e = q.execute("blockdev-del", json!({"node-name": format!("nope{i}")})).await.unwrap_err();
                        assert!(e.to_string().contains(&format!("nope{i}")), "blockdev-del got {e}");
                    }
                }
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    }
}
