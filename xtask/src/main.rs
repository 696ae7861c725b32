//! `cargo xtask demo | test | ci`: the README's two commands and CI's.
//!
//! It uses only the standard library, so it builds on a fresh machine before anything
//! else is installed. It then makes sure of what the workspace needs:
//! - a protoc for etcd-client's build script: `.tools/bin/protox` (the path
//!   `.cargo/config.toml` points PROTOC at), either a link to the system protoc or the
//!   pure-Rust protox installed with cargo;
//! - for tests, an etcd server: Debian's `etcd-server`, installed with apt-get if missing;
//! - for the drill and tests, qemu-storage-daemon, qemu-img and qemu-io (`qemu-utils`);
//! - for the alert rule tests, promtool (`prometheus`);
//! - for the dashboard test, a headless browser (`chromium`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const PROTOX_VERSION: &str = "0.10.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed with {status}")) }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Makes `.tools/bin/protox` exist: a link to a system protoc, or protox from crates.io.
fn ensure_protoc() -> Result<(), String> {
    let tools = root().join(".tools");
    let shim = tools.join("bin").join("protox");
    if shim.exists() {
        return Ok(());
    }
    if let Some(protoc) = which("protoc") {
        std::fs::create_dir_all(shim.parent().expect("bin dir")).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(&protoc, &shim).map_err(|e| format!("cannot link {}: {e}", shim.display()))?;
        eprintln!("xtask: using the system protoc {}", protoc.display());
        return Ok(());
    }
    eprintln!(
        "xtask: no protoc on this machine; installing protox {PROTOX_VERSION} (pure Rust) into .tools (about a minute, once)"
    );
    run(cargo().args(["install", "--locked", "--root"]).arg(&tools).args([
        &format!("protox@{PROTOX_VERSION}"),
        "--features",
        "bin",
    ]))
}

/// Makes an `etcd` binary available, installing Debian's etcd-server when missing.
fn ensure_etcd() -> Result<(), String> {
    if which("etcd").is_some() {
        return Ok(());
    }
    apt_install("etcd-server")?;
    if which("etcd").is_none() {
        return Err("etcd-server installed but no etcd on PATH; check /usr/bin/etcd".into());
    }
    Ok(())
}

fn apt_install(package: &str) -> Result<(), String> {
    eprintln!("xtask: installing Debian's {package}");
    let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut c = if as_root { Command::new("apt-get") } else { Command::new("sudo") };
        if !as_root {
            c.arg("apt-get");
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(&mut apt(&["install", "-y", "-qq", package]))
}

/// Makes qemu-storage-daemon, qemu-img and qemu-io available (Debian's qemu-utils).
fn ensure_qemu() -> Result<(), String> {
    if ["qemu-storage-daemon", "qemu-img", "qemu-io"].iter().all(|p| which(p).is_some()) {
        return Ok(());
    }
    apt_install("qemu-utils")
}

/// Makes promtool available (Debian's prometheus), for the alert rule tests.
fn ensure_promtool() -> Result<(), String> {
    if which("promtool").is_some() {
        return Ok(());
    }
    apt_install("prometheus")
}

/// Makes Chromium available (Debian's chromium), for the dashboard's browser test.
fn ensure_chromium() -> Result<(), String> {
    if which("chromium").is_some() || which("chromium-browser").is_some() {
        return Ok(());
    }
    apt_install("chromium")
}

fn demo(extra: &[String]) -> Result<(), String> {
    ensure_protoc()?;
    ensure_qemu()?;
    run(cargo().args(["run", "--quiet", "-p", "drover-cli", "--bin", "drover", "--", "drill"]).args(extra))
}

fn test(extra: &[String]) -> Result<(), String> {
    ensure_protoc()?;
    ensure_etcd()?;
    ensure_qemu()?;
    ensure_promtool()?;
    ensure_chromium()?;
    release_has_no_test_code()?;
    // Integration tests start the drover binary as separate processes.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace"]).args(extra))
}

/// The `drover` binary must not carry the conformance suites or test drivers: they sit
/// behind each crate's `testing` feature, which only the test crate turns on.
fn release_has_no_test_code() -> Result<(), String> {
    let out = cargo()
        .args(["tree", "-e", "features", "-p", "drover-cli", "--prefix", "none"])
        .output()
        .map_err(|e| format!("cannot run cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo tree failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = tree.lines().find(|l| l.contains("feature \"testing\"")) {
        return Err(format!("the drover binary enables a `testing` feature ({line}); test code must stay out of it"));
    }
    eprintln!("xtask: the drover binary carries no `testing` feature");
    Ok(())
}

/// The qemu soak (`--minutes N`, default 2): real agents, daemons and writers under a
/// random schedule of planned and disaster failovers; exits non-zero on any violation.
fn soak(extra: &[String]) -> Result<(), String> {
    ensure_protoc()?;
    ensure_qemu()?;
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["run", "--quiet", "-p", "drover-tests", "--bin", "soak", "--"]).args(extra))
}

fn ci() -> Result<(), String> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    test(&[])?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().map(|(c, r)| (c.as_str(), r)).unwrap_or(("", &[]));
    let result = match cmd {
        "demo" => demo(rest),
        "test" => test(rest),
        "ci" => ci(),
        "soak" => soak(rest),
        "protoc" => ensure_protoc(),
        _ => Err("usage: cargo xtask demo | test [cargo test args] | soak [--minutes N] | ci | protoc".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
