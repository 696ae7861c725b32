//! Local clusters of real processes: an orchestrator and agents, each a `drover` child
//! process on 127.0.0.1 with a free port, logging to a file. Children are killed when
//! dropped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The line a server prints once it serves; the address follows it.
pub use drover_cli::servers::READY_MARKER;

/// A child process, killed and reaped on drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `program args`, with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> std::io::Result<Self> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child =
            Command::new(program).args(args).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).spawn()?;
        Ok(Self { name: name.to_string(), log, child })
    }

    /// Whether the process exits within `timeout`.
    pub fn exits_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log holds a line with `needle` written after `from_byte`; returns
    /// what follows the needle on that line.
    pub fn wait_for(&mut self, needle: &str, from_byte: usize, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if let Some(pos) = text.get(from_byte..).and_then(|t| t.find(needle)) {
                let rest = &text[from_byte + pos + needle.len()..];
                return Ok(rest.lines().next().unwrap_or("").trim().to_string());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) before printing {needle:?}; its log:\n{}",
                    self.name,
                    tail(&text)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not print {needle:?} within {timeout:?}; its log:\n{}",
                    self.name,
                    tail(&text)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends SIGKILL to the process and everything it started, and reaps it.
    pub fn kill(&mut self) {
        // Freeze it first: an agent restarts a dead daemon, and one started between the
        // listing of its children and its own death would be orphaned.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-STOP", &pid]).stderr(Stdio::null()).status();
        let mut victims = descendants(self.child.id());
        victims.push(self.child.id());
        for pid in victims {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every process below `pid`, found through /proc.
/// Live qemu-storage-daemon processes whose command line mentions `dir` (a killed one
/// that nobody reaped has an empty command line and is not listed).
pub fn daemons_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-storage-daemon") && cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// The process ids below `pid`, children first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name may hold spaces; the fields after its closing paren do not.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|f| f.parse::<u32>().ok()) {
            parent_of.push((p, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Finds the `drover` binary: `$DROVER_BIN`, else beside the running executable (or one
/// directory up, where cargo puts binaries relative to test executables).
pub fn locate_drover() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("DROVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    locate_bin("drover")
}

/// Finds a workspace binary beside the running executable (or one directory up, from a
/// test in `deps/`); `cargo build --workspace --bins` puts them there.
pub fn locate_bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(format!("cannot find the {name} binary; build it with `cargo build --workspace --bins`"))
}

/// A running server process and the endpoint it serves.
pub struct Server {
    pub proc: Proc,
    pub endpoint: String,
}

impl Server {
    /// The address it serves on (its endpoint without the scheme).
    pub fn addr(&self) -> &str {
        self.endpoint.split_once("://").map_or(self.endpoint.as_str(), |(_, a)| a)
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn start(bin: &Path, name: &str, log: PathBuf, args: Vec<String>) -> Result<Server, String> {
    // A restarted process appends to its old log: look only at what this run writes.
    let from = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    let scheme = if args.iter().any(|a| a == "--insecure") { "http" } else { "https" };
    let mut proc = Proc::spawn(name, bin, &args, log).map_err(|e| format!("cannot start {name}: {e}"))?;
    let addr = proc.wait_for(READY_MARKER, from, START_TIMEOUT)?;
    Ok(Server { proc, endpoint: format!("{scheme}://{addr}") })
}

/// The TLS files of the servers started in `dir`: `drover certs init DIR/certs` makes them
/// the first time (one CA, the orchestrator's certificate, one agent certificate every
/// agent of the test shares, and a spare agent certificate for tests that pose as
/// another agent).
pub fn certs(bin: &Path, dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        let out = Command::new(bin)
            .args(["certs", "init"])
            .arg(&certs)
            .args(["--agent", "agent", "--agent", "spare"])
            .output()
            .expect("run drover certs init");
        assert!(out.status.success(), "drover certs init: {}", String::from_utf8_lossy(&out.stderr));
    }
    certs
}

/// The `--set tls.…` flags of a server whose certificate is `<name>.pem` in `certs`.
fn tls_args(certs: &Path, name: &str) -> Vec<String> {
    let f = |key: &str, file: String| ["--set".to_string(), format!("tls.{key}={}", certs.join(file).display())];
    [f("ca", "ca.pem".into()), f("cert", format!("{name}.pem")), f("key", format!("{name}.key"))].concat()
}

/// The cluster's CA certificate (for clients of `https://` servers).
pub fn ca_file(dir: &Path) -> PathBuf {
    dir.join("certs").join("ca.pem")
}

/// API clients for the orchestrators at `endpoint` (comma-separated) started in `dir`,
/// as the bootstrap admin.
pub async fn connect(endpoint: &str, dir: &Path, timeout: Duration) -> Result<drover_cli::client::Clients, String> {
    drover_cli::client::Clients::connect(endpoint, timeout, Some(&admin_token(dir)), Some(&ca_file(dir))).await
}

/// The TLS client config of the orchestrator's certificate made in `dir`, for tests that
/// call agents directly as the orchestrator would.
pub fn orchestrator_tls(dir: &Path) -> tonic::transport::ClientTlsConfig {
    let files = drover_proto::tls::TlsFiles {
        ca: ca_file(dir),
        cert: dir.join("certs/orchestrator.pem"),
        key: dir.join("certs/orchestrator.key"),
    };
    files.client(drover_proto::tls::AGENT_NAME).expect("orchestrator TLS files")
}

/// A channel to the agent at `endpoint`, started in `dir`, as the orchestrator.
pub async fn agent_channel(endpoint: &str, dir: &Path) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("agent endpoint")
        .tls_config(orchestrator_tls(dir))
        .expect("TLS config")
        .connect()
        .await
        .expect("the agent answers")
}

/// A channel to the agent at `endpoint` as a peer agent (with the agent certificate made
/// in `dir`): what a replica stream comes from.
pub async fn agent_role_channel(endpoint: &str, dir: &Path) -> tonic::transport::Channel {
    let files = drover_proto::tls::TlsFiles {
        ca: ca_file(dir),
        cert: dir.join("certs/agent-agent.pem"),
        key: dir.join("certs/agent-agent.key"),
    };
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("agent endpoint")
        .tls_config(files.client(drover_proto::tls::AGENT_NAME).expect("agent TLS files"))
        .expect("TLS config")
        .connect()
        .await
        .expect("the agent answers")
}

/// An agent client as the orchestrator (see [`agent_channel`]).
pub async fn agent_client(
    endpoint: &str,
    dir: &Path,
) -> drover_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel> {
    drover_proto::agent::v1::agent_client::AgentClient::new(agent_channel(endpoint, dir).await)
}

/// Starts an orchestrator. `store_args` picks the store, e.g. `--store-path FILE` or
/// `--store etcd --etcd-endpoints URL --store-prefix /t1/`.
pub fn start_orchestrator(bin: &Path, dir: &Path, name: &str, store_args: &[String]) -> Result<Server, String> {
    let mut args = vec!["orchestrator".to_string(), "--listen".into(), "127.0.0.1:0".into()];
    args.extend(store_args.iter().cloned());
    args.extend(tls_args(&certs(bin, dir), "orchestrator"));
    // Every orchestrator of a test shares one bootstrap admin token file.
    args.extend(["--set".into(), format!("auth.token_file={}", token_file(dir).display())]);
    start(bin, name, dir.join(format!("{name}.log")), args)
}

/// The bootstrap admin token file of the orchestrators started in `dir`.
pub fn token_file(dir: &Path) -> std::path::PathBuf {
    dir.join("admin.token")
}

/// The bootstrap admin token of the orchestrators started in `dir`.
pub fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(token_file(dir)).expect("the orchestrator wrote its admin token").trim().to_string()
}

/// Settings for one agent process.
pub struct AgentSpec<'a> {
    pub name: &'a str,
    /// `qemu` or `mock`. A qemu agent's pool is `<dir>/pool-<name>`.
    pub driver: &'a str,
    pub site: &'a str,
    pub backend: &'a str,
    pub orchestrator: &'a str,
    pub extra: Vec<String>,
}

/// The op log of the agent named `name` started by [`start_agent`] in `dir`.
pub fn agent_op_log(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.ops.jsonl"))
}

/// Starts an agent that registers with the orchestrator.
pub fn start_agent(bin: &Path, dir: &Path, spec: AgentSpec<'_>) -> Result<Server, String> {
    let mut args: Vec<String> = [
        "agent",
        "--agent-id",
        spec.name,
        "--site",
        spec.site,
        "--backend",
        spec.backend,
        "--driver",
        spec.driver,
        "--listen",
        "127.0.0.1:0",
        "--orchestrator",
        spec.orchestrator,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--state-dir".into());
    args.push(dir.join(spec.name).display().to_string());
    // Every test agent keeps its op log (one line per mutation its driver ran), which
    // the fault tests read to show that no op_id ran twice.
    args.push("--set".into());
    args.push(format!("op_log={}", agent_op_log(dir, spec.name).display()));
    if spec.driver == "qemu" {
        args.push("--set".into());
        args.push(format!("qemu.pool_dir={}", dir.join(format!("pool-{}", spec.name)).display()));
    }
    args.extend(tls_args(&certs(bin, dir), "agent-agent"));
    args.extend(spec.extra);
    start(bin, spec.name, dir.join(format!("{}.log", spec.name)), args)
}

/// Runs `qemu-io` (an NBD client independent of Drover) against a URI: the drill's helper.
pub use drover_cli::drill::qemu_io;
