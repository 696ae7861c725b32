//! A minimal QMP client: JSON commands over a unix socket, one at a time.
//!
//! Evaluated first: the `qapi` crate (0.15) generates typed commands from an older QEMU
//! schema and brings a large generated module into the build; Drover uses a dozen
//! commands, so a small untyped client is less code to build and keeps up with QEMU 10's
//! arguments directly.

use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

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

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects and leaves capability negotiation mode.
    pub async fn connect(socket: &Path) -> Result<Self, QmpError> {
        let (r, w) = UnixStream::connect(socket).await?.into_split();
        let mut qmp = Self { reader: BufReader::new(r), writer: w };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("unexpected greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Protocol("qemu-storage-daemon closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs one command and returns its `return` value. Events are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = serde_json::to_vec(&json!({ "execute": command, "arguments": arguments })).expect("json");
        msg.push(b'\n');
        self.writer.write_all(&msg).await?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
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
            return Err(QmpError::Protocol(format!("unexpected QMP reply {reply}")));
        }
    }
}
