//! `qemu-img` as a library: creating overlays, mapping allocated extents, offline commit
//! and rebase of replica chains.

use std::path::Path;

use serde::Deserialize;
use tokio::process::Command;

use drover_agent::driver::DriverError;

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// How many layers down the data comes from (0: the image itself).
    pub depth: u32,
    #[serde(default)]
    pub present: bool,
    #[serde(default)]
    pub zero: bool,
    #[serde(default)]
    pub data: bool,
}

async fn run(args: &[&str]) -> Result<Vec<u8>, DriverError> {
    if args.first() != Some(&"map") {
        tracing::debug!(args = %args.join(" "), "qemu-img");
    }
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| DriverError::Internal(format!("cannot run qemu-img: {e}; install qemu-utils")))?;
    if !out.status.success() {
        return Err(DriverError::Internal(format!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("pool paths are UTF-8")
}

/// Creates a qcow2 image, on top of `backing` when given.
pub async fn create(path: &Path, size: u64, backing: Option<&Path>) -> Result<(), DriverError> {
    let size = size.to_string();
    match backing {
        Some(b) => run(&["create", "-q", "-f", "qcow2", "-b", s(b), "-F", "qcow2", s(path), &size]).await?,
        None => run(&["create", "-q", "-f", "qcow2", s(path), &size]).await?,
    };
    Ok(())
}

/// The allocation map of an image and its backing chain (shared lock, so it works on
/// images a daemon has open).
pub async fn map(path: &Path) -> Result<Vec<Extent>, DriverError> {
    let out = run(&["map", "--output=json", "-U", "-f", "qcow2", s(path)]).await?;
    serde_json::from_slice(&out).map_err(|e| DriverError::Internal(format!("unreadable qemu-img map output: {e}")))
}

/// `qemu-img info` as JSON. Without `shared`, it fails on an image another process has
/// open for writing, which is how "in use" is detected.
pub async fn info(path: &Path, shared: bool) -> Result<serde_json::Value, DriverError> {
    let mut args = vec!["info", "--output=json"];
    if shared {
        args.push("-U");
    }
    args.push(s(path));
    let out = run(&args).await?;
    serde_json::from_slice(&out).map_err(|e| DriverError::Internal(format!("unreadable qemu-img info output: {e}")))
}

/// Commits an image that nothing has open into its backing file.
pub async fn commit(path: &Path) -> Result<(), DriverError> {
    run(&["commit", "-q", "-f", "qcow2", s(path)]).await.map(|_| ())
}

/// Points an image at another backing file without copying (the caller guarantees the
/// two backings read the same).
pub async fn rebase_unsafe(path: &Path, backing: &Path) -> Result<(), DriverError> {
    run(&["rebase", "-q", "-u", "-f", "qcow2", "-b", s(backing), "-F", "qcow2", s(path)]).await.map(|_| ())
}

/// Writes the content of `image`'s internal snapshot `name` to a new standalone qcow2
/// file, and flushes it.
pub async fn convert_snapshot(image: &Path, name: &str, dest: &Path) -> Result<(), DriverError> {
    let sel = format!("snapshot.name={name}");
    run(&["convert", "-q", "-U", "-f", "qcow2", "-l", &sel, "-O", "qcow2", "-t", "writeback", s(image), s(dest)])
        .await
        .map(|_| ())
}
