//! `qemu-img` as a library: creating overlays, mapping allocated extents, offline commit
//! and rebase of replica chains.

use std::path::{Path, PathBuf};

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

/// The allocation map of the last of `chain` (bottom first) read through exactly the
/// layers listed, whatever the files' own headers name as their backing. A live
/// block-commit rewrites the header of the layer above the committed range to name the
/// base, before the base's new metadata is flushed: a crash in that window leaves a
/// header that skips layers the agent's state (and the daemon's graph) still holds, and
/// a map that followed it would miss their clusters.
pub async fn map_chain(chain: &[PathBuf]) -> Result<Vec<Extent>, DriverError> {
    let mut spec = serde_json::Value::Null;
    for file in chain {
        spec = serde_json::json!({
            "driver": "qcow2",
            "file": {"driver": "file", "filename": s(file)},
            "backing": spec,
        });
    }
    let arg = format!("json:{spec}");
    let out = run(&["map", "--output=json", "-U", &arg]).await?;
    serde_json::from_slice(&out).map_err(|e| DriverError::Internal(format!("unreadable qemu-img map output: {e}")))
}

/// The backing file a qcow2 image's header names (`None` without one), read from the
/// header itself: no process, so cheap enough to check every layer of a chain.
pub fn backing_of(path: &Path) -> Result<Option<String>, DriverError> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |e: std::io::Error| DriverError::Internal(format!("cannot read the header of {}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(bad)?;
    let mut h = [0u8; 20];
    f.read_exact(&mut h).map_err(bad)?;
    if h[..4] != *b"QFI\xfb" {
        return Err(DriverError::Internal(format!("{} is not a qcow2 image", path.display())));
    }
    let offset = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(DriverError::Internal(format!("{} names a backing file {len} bytes long", path.display())));
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset)).map_err(bad)?;
    f.read_exact(&mut name).map_err(bad)?;
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
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
