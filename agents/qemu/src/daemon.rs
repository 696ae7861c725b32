//! Runs and supervises one qemu-storage-daemon per agent. If the daemon dies, it is
//! started again and the driver re-creates its block nodes and exports.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::nbd::NbdAddr;
use super::qmp::{Qmp, QmpError};
use drover_agent::driver::DriverError;

/// What the daemon needs to know about its environment.
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    pub qmp_socket: PathBuf,
    /// Where exports are served: a unix socket, or a TCP address.
    pub nbd: NbdAddr,
    pub pidfile: PathBuf,
    pub log: PathBuf,
}

/// Called after every (re)start to rebuild nodes and exports.
pub type Restore = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The supervised daemon.
pub struct Daemon {
    paths: DaemonPaths,
    qmp: Mutex<Option<Arc<Qmp>>>,
    /// How long one QMP command may take before the daemon counts as hung.
    qmp_timeout: Duration,
    /// Restarts after the daemon exited (died, or killed as hung).
    restarts: std::sync::atomic::AtomicU64,
}

fn qmp_err(e: QmpError) -> DriverError {
    match e {
        QmpError::Command { .. } => DriverError::Internal(e.to_string()),
        other => DriverError::Unavailable(format!("qemu-storage-daemon: {other}; the agent is restarting it")),
    }
}

/// Kills a daemon left behind by an earlier agent run.
fn kill_stale(pidfile: &Path) {
    if let Ok(pid) = std::fs::read_to_string(pidfile) {
        let pid = pid.trim();
        if !pid.is_empty() {
            let _ = std::process::Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = std::fs::remove_file(pidfile);
    }
}

impl Daemon {
    /// Starts the daemon and its supervisor.
    pub async fn start(paths: DaemonPaths, restore: Restore, qmp_timeout: Duration) -> Result<Arc<Self>, DriverError> {
        kill_stale(&paths.pidfile);
        let daemon = Arc::new(Self { paths, qmp: Mutex::new(None), qmp_timeout, restarts: Default::default() });
        let child = daemon.launch().await?;
        let weak = Arc::downgrade(&daemon);
        tokio::spawn(async move {
            let mut child = child;
            loop {
                let status = child.wait().await;
                let Some(d) = weak.upgrade() else { return };
                tracing::warn!(?status, "qemu-storage-daemon exited; restarting it");
                *d.qmp.lock().await = None;
                loop {
                    match d.launch().await {
                        Ok(c) => {
                            child = c;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "restarting qemu-storage-daemon failed; retrying in 1 s");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                restore().await;
                d.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("qemu-storage-daemon restarted and its exports restored");
            }
        });
        Ok(daemon)
    }

    /// How many times the daemon was restarted since the agent started.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn launch(&self) -> Result<Child, DriverError> {
        let p = &self.paths;
        let _ = std::fs::remove_file(&p.qmp_socket);
        let nbd_server = match &p.nbd {
            NbdAddr::Unix(path) => {
                let _ = std::fs::remove_file(path);
                format!("addr.type=unix,addr.path={}", path.display())
            }
            NbdAddr::Tcp(addr) => {
                let (host, port) = addr.rsplit_once(':').ok_or_else(|| {
                    DriverError::InvalidArgument(format!("NBD TCP address {addr:?} is not HOST:PORT"))
                })?;
                format!("addr.type=inet,addr.host={host},addr.port={port}")
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .map_err(|e| DriverError::Internal(format!("cannot open {}: {e}", p.log.display())))?;
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=qmp0", p.qmp_socket.display()))
            .args(["--monitor", "chardev=qmp0"])
            .arg("--nbd-server")
            .arg(nbd_server)
            .arg("--pidfile")
            .arg(&p.pidfile)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| DriverError::Internal(e.to_string()))?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            DriverError::Unavailable(format!("cannot start qemu-storage-daemon: {e}; install qemu-utils"))
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let qmp = loop {
            match Qmp::connect(&p.qmp_socket).await {
                Ok(q) => break q,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(DriverError::Unavailable(format!("qemu-storage-daemon did not answer on QMP: {e}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        *self.qmp.lock().await = Some(Arc::new(qmp));
        Ok(child)
    }

    /// Runs a QMP command. Commands run concurrently, each matched to its reply.
    pub async fn qmp(&self, command: &str, args: Value) -> Result<Value, DriverError> {
        let qmp = self
            .qmp
            .lock()
            .await
            .clone()
            .filter(|q| q.is_open())
            .ok_or_else(|| DriverError::Unavailable("qemu-storage-daemon is restarting; retry shortly".into()))?;
        // Every QMP command used here returns promptly (block jobs are polled, not
        // awaited): a daemon that does not answer in time is hung. It is killed, and the
        // supervisor starts it again and restores every node and export.
        tracing::debug!(command, args = %args, "qmp");
        match tokio::time::timeout(self.qmp_timeout, qmp.execute(command, args)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e @ QmpError::Command { .. })) => Err(qmp_err(e)),
            Ok(Err(e)) => Err(qmp_err(e)),
            Err(_) => {
                tracing::error!(command, timeout = ?self.qmp_timeout, "qemu-storage-daemon is hung; killing it to restart it");
                self.qmp.lock().await.take();
                self.kill();
                Err(DriverError::Unavailable(format!(
                    "qemu-storage-daemon did not answer {command} within {:?}; it is being restarted, retry shortly",
                    self.qmp_timeout
                )))
            }
        }
    }

    /// Kills the daemon (SIGKILL works on a stopped process too); the supervisor
    /// restarts it.
    fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }

    /// Like [`Daemon::qmp`], but "not found" style refusals count as success (for
    /// idempotent teardown).
    pub async fn qmp_lenient(&self, command: &str, args: Value) -> Result<(), DriverError> {
        match self.qmp(command, args).await {
            Ok(_) => Ok(()),
            Err(DriverError::Internal(m))
                if m.contains("not found") || m.contains("Failed to find") || m.contains("No such") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Where exports are served.
    pub fn nbd(&self) -> &NbdAddr {
        &self.paths.nbd
    }

    /// The daemon's pid, from its pidfile.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.paths.pidfile).ok()?.trim().parse().ok()
    }
}
