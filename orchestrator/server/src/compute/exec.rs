//! The command transport: the site's command runs once per call with the call as JSON
//! on stdin (`{"call": …, "request": …}`) and `DROVER_COMPUTE_CALL` set to its name; exit
//! code 0 is success and stdout is the answer (JSON, or nothing). It is killed at the
//! timeout.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::{Call, ComputeSite};

/// Runs the command for `call` and returns its stdout.
pub async fn run(cfg: &ComputeSite, call: &Call) -> Result<Vec<u8>, String> {
    let input = serde_json::to_vec(call).expect("calls serialise");
    let mut child = tokio::process::Command::new(&cfg.command[0])
        .args(&cfg.command[1..])
        .env("DROVER_COMPUTE_CALL", call.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run compute command {:?}: {e}", cfg.command[0]))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let out = tokio::time::timeout(cfg.timeout, async move {
        // A command that does not read its input still runs: a write error is not fatal.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .map_err(|_| {
        format!("compute command {:?} did not finish within {:?}; it was killed", cfg.command[0], cfg.timeout)
    })?
    .map_err(|e| format!("compute command {:?}: {e}", cfg.command[0]))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("compute command {:?} failed ({}): {}", cfg.command[0], out.status, err.trim()));
    }
    Ok(out.stdout)
}
