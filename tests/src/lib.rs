//! Test harness: a real etcd server per test, clusters of real `drover` processes on
//! loopback ports, and a runner for the `drover` CLI. Everything started here is killed
//! when its handle drops, and lives in a temporary directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
pub mod cluster;
pub mod invariants;
pub mod qemu_pair;
pub mod scrape;
pub mod writer;

use cluster::{AgentSpec, Proc, Server, locate_drover, start_agent, start_orchestrator, token_file};
use drover_proto::v1 as pb;
use drover_store::{EtcdStore, KvStore, Prefixed};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local addr").port()
}

/// A unique key prefix, so tests sharing a store never see each other's keys.
pub fn fresh_prefix() -> String {
    format!("/drover-test/{}/", uuid::Uuid::now_v7())
}

/// A real etcd server (Debian's etcd-server) on loopback ports with a temporary data dir.
pub struct Etcd {
    pub endpoint: String,
    proc: Proc,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "n1",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("n1={peer_url}"),
        ]
        .iter()
        .map(|s| s.to_string())
        // DROVER_ETCD_EXTRA_ARGS adds flags to every etcd the harness starts (for example
        // `--enable-pprof`, to profile etcd during a bench); split on whitespace.
        .chain(std::env::var("DROVER_ETCD_EXTRA_ARGS").unwrap_or_default().split_whitespace().map(String::from))
        .collect();
        let proc = Self::spawn(&args, dir.path());
        let etcd = Self { endpoint, proc, args, dir };
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(args: &[String], dir: &Path) -> Proc {
        let etcd = which_etcd();
        Proc::spawn("etcd", &etcd, args, dir.join("etcd.log")).unwrap_or_else(|e| {
            panic!("cannot start {} ({e}); run `cargo xtask test`, which installs etcd-server", etcd.display())
        })
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(store) = EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_secs(2)).await
                && store.put(b"/health", b"ok").await.is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "etcd did not come up within 30 s; log:\n{}", self.proc.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs etcd (its data dir stays).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts etcd again on the same data dir and ports, and waits until it answers.
    pub async fn restart(&mut self) {
        self.proc = Self::spawn(&self.args, self.dir.path());
        self.wait_ready().await;
    }

    /// A client store confined to a fresh prefix.
    /// The etcd server's process id (for its CPU time in benchmarks).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// How many gRPC requests etcd has answered so far, per method (`Range`, `Txn`, …),
    /// and the bytes it has written to its WAL, received and sent, from its `/metrics`.
    pub fn handled_requests(&self) -> std::collections::BTreeMap<String, f64> {
        use std::io::{Read, Write};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut out = std::collections::BTreeMap::new();
        let mut text = String::new();
        if let Ok(mut conn) = std::net::TcpStream::connect(addr) {
            let _ = write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let _ = conn.read_to_string(&mut text);
        }
        for line in text.lines() {
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let name = if line.starts_with("grpc_server_handled_total{") {
                line.split("grpc_method=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?")
            } else if line.starts_with("etcd_disk_wal_write_bytes_total ") {
                "WAL bytes"
            } else if line.starts_with("etcd_network_client_grpc_received_bytes_total ") {
                "bytes received"
            } else if line.starts_with("etcd_network_client_grpc_sent_bytes_total ") {
                "bytes sent"
            } else {
                continue;
            };
            *out.entry(name.to_string()).or_insert(0.0) += value;
        }
        out
    }

    pub async fn store(&self) -> Arc<dyn KvStore> {
        let raw = EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
            .await
            .expect("connect etcd");
        Arc::new(Prefixed::new(Arc::new(raw), fresh_prefix()))
    }
}

fn which_etcd() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("etcd")).find(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

/// Which store a cluster's orchestrator uses.
pub enum StoreChoice<'a> {
    /// The embedded store in the cluster's directory.
    Embedded,
    /// A running etcd, under a fresh prefix.
    Etcd(&'a Etcd),
}

/// An orchestrator and two mock agents (backend-a at site-a, backend-b at site-b), each a
/// separate `drover` process.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub orchestrator: Server,
    pub agents: Vec<Server>,
    store_args: Vec<String>,
}

impl Cluster {
    /// The orchestrator's key prefix in etcd, when it runs on etcd.
    pub fn store_prefix(&self) -> Option<&str> {
        let at = self.store_args.iter().position(|a| a == "--store-prefix")?;
        self.store_args.get(at + 1).map(String::as_str)
    }

    /// Starts the cluster with mock agents and waits until both backends are up.
    pub async fn start(store: StoreChoice<'_>, agent_extra: &[&str]) -> Self {
        Self::start_with(store, "mock", agent_extra).await
    }

    /// Starts the cluster with `driver` agents (`qemu` or `mock`).
    pub async fn start_with(store: StoreChoice<'_>, driver: &str, agent_extra: &[&str]) -> Self {
        Self::start_custom(store, driver, agent_extra, &[]).await
    }

    /// Starts the cluster with extra orchestrator flags too (kept across restarts).
    pub async fn start_custom(
        store: StoreChoice<'_>,
        driver: &str,
        agent_extra: &[&str],
        orchestrator_extra: &[&str],
    ) -> Self {
        Self::start_sites(
            store,
            driver,
            &[("site-a", "backend-a"), ("site-b", "backend-b")],
            agent_extra,
            orchestrator_extra,
        )
        .await
    }

    /// Starts the cluster with one agent per (site, backend) given, in that order (the
    /// per-index helpers such as [`Cluster::restart_agent`] assume the default two).
    pub async fn start_sites(
        store: StoreChoice<'_>,
        driver: &str,
        backends: &[(&str, &str)],
        agent_extra: &[&str],
        orchestrator_extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = locate_drover().expect("drover binary");
        let store_args: Vec<String> = match store {
            StoreChoice::Embedded => {
                vec!["--store-path".into(), dir.path().join("orchestrator.redb").display().to_string()]
            }
            StoreChoice::Etcd(etcd) => vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoint.clone(),
                "--store-prefix".into(),
                fresh_prefix(),
            ],
        };
        // Executions of a killed orchestrator resume after this TTL: short, to keep tests quick.
        let store_args: Vec<String> = store_args
            .into_iter()
            .chain(["--set".to_string(), "owner_lease_ttl=3s".to_string()])
            .chain(orchestrator_extra.iter().map(|s| s.to_string()))
            .collect();
        let orchestrator =
            start_orchestrator(&bin, dir.path(), "orchestrator", &store_args).expect("orchestrator starts");
        let mut agents = Vec::new();
        for &(site, backend) in backends {
            let name = format!("agent-{backend}");
            let extra = agent_extra
                .iter()
                .map(|s| s.replace("{dir}", &dir.path().display().to_string()).replace("{backend}", backend))
                .collect();
            agents.push(
                start_agent(
                    &bin,
                    dir.path(),
                    AgentSpec { name: &name, driver, site, backend, orchestrator: &orchestrator.endpoint, extra },
                )
                .expect("agent starts"),
            );
        }
        let cluster = Self { dir, bin, orchestrator, agents, store_args };
        cluster.wait_backends_up().await;
        cluster
    }

    /// API clients for the orchestrator.
    pub async fn clients(&self) -> Clients {
        cluster::connect(&self.orchestrator.endpoint, self.dir.path(), Duration::from_secs(60))
            .await
            .expect("connect orchestrator")
    }

    async fn wait_backends_up(&self) {
        wait_backends_up(&mut self.clients().await, self.agents.len()).await;
    }

    /// SIGKILLs the orchestrator and starts a new one on the same store and the same
    /// address, as a restarted service would be, so the agents find it again.
    pub async fn restart_orchestrator(&mut self) {
        self.orchestrator.proc.kill();
        let addr = self.orchestrator.addr().to_string();
        let mut args = self.store_args.clone();
        args.extend(["--set".to_string(), format!("listen={addr}")]);
        let mut attempt = 0;
        self.orchestrator = loop {
            let name = format!("orchestrator-{}", uuid::Uuid::now_v7());
            match start_orchestrator(&self.bin, self.dir.path(), &name, &args) {
                Ok(s) => break s,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("restart on {addr} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("orchestrator does not restart on {addr}: {e}"),
            }
        };
    }

    /// Runs the `drover` CLI against this cluster.
    pub fn cli(&self, args: &[&str]) -> Output {
        drover(&self.bin, &self.orchestrator.endpoint, &token_file(self.dir.path()), args)
    }

    /// [`Cluster::cli`] acting in `project`.
    pub fn cli_in(&self, project: &str, args: &[&str]) -> Output {
        drover_in(&self.bin, &self.orchestrator.endpoint, &token_file(self.dir.path()), project, args)
    }

    /// Starts agent `i` (0: backend-a, 1: backend-b) again after it was killed.
    pub fn restart_agent(&mut self, i: usize, driver: &str) {
        self.restart_agent_with(i, driver, &[]);
    }

    /// [`Cluster::restart_agent`] with extra agent flags (`{dir}` and `{backend}` filled
    /// in, as at start); the flags given at start are not repeated. The agent comes back
    /// on the address it had, as a restarted agent service with its configured `listen`
    /// does: its peers' periodic syncs dial the address they were given.
    pub fn restart_agent_with(&mut self, i: usize, driver: &str, extra: &[&str]) {
        let listen = self.agents[i].addr().to_string();
        self.restart_agent_on(i, driver, extra, &listen);
    }

    /// [`Cluster::restart_agent`] on a new port, as an agent that comes back on another
    /// host would: the primaries that ship to it must learn its new address.
    pub fn restart_agent_elsewhere(&mut self, i: usize, driver: &str) {
        self.restart_agent_on(i, driver, &[], "127.0.0.1:0");
    }

    fn restart_agent_on(&mut self, i: usize, driver: &str, extra: &[&str], listen: &str) {
        let (site, backend) = [("site-a", "backend-a"), ("site-b", "backend-b")][i];
        let name = format!("agent-{backend}");
        let mut extra: Vec<String> = extra
            .iter()
            .map(|s| s.replace("{dir}", &self.dir.path().display().to_string()).replace("{backend}", backend))
            .collect();
        extra.extend(["--set".to_string(), format!("listen={listen}")]);
        let mut attempt = 0;
        self.agents[i] = loop {
            let spec = AgentSpec {
                name: &name,
                driver,
                site,
                backend,
                orchestrator: &self.orchestrator.endpoint,
                extra: extra.clone(),
            };
            match start_agent(&self.bin, self.dir.path(), spec) {
                Ok(s) => break s,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    eprintln!("agent restart on {listen} failed ({e}); retrying");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("agent {name} does not restart on {listen}: {e}"),
            }
        };
    }

    /// The op logs of the agents (backend, path): a line per mutation each one's driver
    /// ran, kept across their restarts (see `drover_agent::oplog`).
    pub fn op_logs(&self) -> Vec<(String, PathBuf)> {
        self.agents
            .iter()
            .map(|a| {
                let name = a.proc.log.file_stem().expect("agent log name").to_string_lossy().into_owned();
                let backend = name.strip_prefix("agent-").unwrap_or(&name).to_string();
                (backend, cluster::agent_op_log(self.dir.path(), &name))
            })
            .collect()
    }

    /// The op_ids some agent's driver ran more than once (`backend:op_id xN`), and how
    /// many mutations the agents ran in all, from their op logs.
    pub fn repeated_op_ids(&self) -> (Vec<String>, usize) {
        let logs = self.op_logs();
        let logs: Vec<(&str, &Path)> = logs.iter().map(|(b, p)| (b.as_str(), p.as_path())).collect();
        invariants::repeated_op_ids(&logs)
    }

    /// Asserts, from the agents' op logs, that they ran mutations and that none of their
    /// drivers ran an op_id twice, across every kill and restart of the test.
    pub fn assert_no_op_ran_twice(&self) {
        let (twice, total) = self.repeated_op_ids();
        assert!(total > 0, "the agents' op logs are empty: nothing to check");
        assert!(twice.is_empty(), "op_ids a driver ran twice: {twice:?}");
        println!("op logs: {total} agent mutations, no op_id twice");
    }

    /// The state directory of agent `i`.
    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(["agent-backend-a", "agent-backend-b"][i])
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Makes `n` empty replication groups on backend-a through the API, `inflight` calls at
/// a time; group `i` gets the (name, project) `which(i)` gives. Panics naming the group
/// that failed.
pub async fn bulk_groups(
    c: &Clients,
    n: usize,
    inflight: usize,
    which: impl Fn(usize) -> (String, String) + Send + Sync + 'static,
) {
    let which = std::sync::Arc::new(which);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..inflight {
        let (mut c, next, which) = (c.clone(), next.clone(), which.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let (name, project) = which(i);
                c.groups
                    .create_group(pb::CreateGroupRequest {
                        name,
                        project,
                        group_type: "replication".into(),
                        backend: "backend-a".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("group {i}: {e}"));
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// Waits, for up to `within`, until no execution is running (a failed list counts as
/// running); the caller's checks then report whatever still runs.
pub async fn wait_executions_ended(c: &mut Clients, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let running = c
            .executions
            .list_executions(pb::ListExecutionsRequest { status: "running".into(), ..Default::default() })
            .await
            .map(|r| r.into_inner().executions.len())
            .unwrap_or(usize::MAX);
        if running == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `n` backends show as up (their agents registered and answering).
pub async fn wait_backends_up(c: &mut Clients, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = c.sites.list_backends(pb::ListBackendsRequest::default()).await.expect("list backends").into_inner();
        if list.backends.iter().filter(|b| b.status == "up").count() == n {
            return;
        }
        assert!(Instant::now() < deadline, "backends not up after 30 s: {:?}", list.backends);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until backend `name` shows as up (its agent registered and answering).
pub async fn wait_backend_up(c: &mut Clients, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = c.sites.get_backend(pb::GetBackendRequest { name: name.into() }).await.expect("get backend");
        if b.get_ref().status == "up" {
            return;
        }
        assert!(Instant::now() < deadline, "backend {name} did not come up within 30 s: {:?}", b.get_ref());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A planned failover (or, with `force`, a disaster failover) of a tests-project group.
pub fn failover_request(group: &str, target: &str, force: bool) -> pb::FailoverGroupRequest {
    pb::FailoverGroupRequest {
        group: group.into(),
        project: "tests".into(),
        target_backend: target.into(),
        force,
        ..Default::default()
    }
}

/// Runs the `drover` CLI with an endpoint and returns its output.
pub fn drover(bin: &Path, endpoint: &str, token_file: &Path, args: &[&str]) -> Output {
    drover_in(bin, endpoint, token_file, "tests", args)
}

/// [`drover`] acting in `project`.
pub fn drover_in(bin: &Path, endpoint: &str, token_file: &Path, project: &str, args: &[&str]) -> Output {
    // Client flags follow the resource word (`drover volume list --endpoint …`).
    std::process::Command::new(bin)
        .args(args)
        .args(["--endpoint", endpoint, "--project", project])
        .env("DROVER_TOKEN_FILE", token_file)
        .env("DROVER_CA_FILE", token_file.with_file_name("certs").join("ca.pem"))
        .output()
        .expect("run drover")
}

/// Creates `n` 1 GiB volumes on backend-a and a replication group over them, with
/// replication enabled to backend-b, in project `tests`. Returns the group's id.
pub async fn replicated_group(c: &mut Clients, name: &str, n: usize) -> String {
    replicated_group_in(c, "tests", name, n).await
}

/// [`replicated_group`] in another project.
pub async fn replicated_group_in(c: &mut Clients, project: &str, name: &str, n: usize) -> String {
    let id = plain_group_in(c, project, name, n).await;
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            no_wait: false,
            group: id.clone(),
            project: project.into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 0,
        })
        .await
        .expect("enable replication")
        .into_inner();
    let g2 = r.group.expect("group");
    assert_eq!(g2.replication_status, "enabled", "{}: {} {:?}", g2.name, g2.status_reason, r.items);
    id
}

/// `n` new volumes of `size` bytes on backend-a in project `tests`, named `<name>-<i>`,
/// and a consistent-replication group `name` of them (not replicating yet); returns the
/// volume names.
pub async fn consistent_group(c: &mut Clients, name: &str, n: usize, size: u64) -> Vec<String> {
    let mut vols = Vec::new();
    for i in 0..n {
        vols.push(volume_on_a(c, "tests", &format!("{name}-{i}"), size).await.name);
    }
    c.groups
        .create_group(pb::CreateGroupRequest {
            name: name.into(),
            project: "tests".into(),
            group_type: "consistent-replication".into(),
            backend: "backend-a".into(),
            volumes: vols.clone(),
            ..Default::default()
        })
        .await
        .expect("create group");
    vols
}

/// A group of `n` new volumes on backend-a in `project`, replication not enabled;
/// returns its id.
pub async fn plain_group_in(c: &mut Clients, project: &str, name: &str, n: usize) -> String {
    let mut vols = Vec::new();
    for i in 0..n {
        vols.push(volume_on_a(c, project, &format!("{name}-v{i}"), 1 << 30).await.id);
    }
    let g = c
        .groups
        .create_group(pb::CreateGroupRequest {
            name: name.into(),
            project: project.into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            volumes: vols,
            ..Default::default()
        })
        .await
        .expect("create group")
        .into_inner();
    g.id
}

/// A new volume of `size` bytes on backend-a in `project`, outside any group.
pub async fn volume_on_a(c: &mut Clients, project: &str, name: &str, size: u64) -> pb::Volume {
    let req = pb::CreateVolumeRequest {
        name: name.into(),
        project: project.into(),
        size_bytes: size as i64,
        backend: "backend-a".into(),
        ..Default::default()
    };
    c.volumes.create_volume(req).await.expect("create volume").into_inner()
}

/// Every volume and group record, as JSON, for before/after comparisons.
pub async fn state_snapshot(c: &mut Clients) -> serde_json::Value {
    let vols = c.volumes.list_volumes(pb::ListVolumesRequest::default()).await.expect("list volumes").into_inner();
    let groups = c.groups.list_groups(pb::ListGroupsRequest::default()).await.expect("list groups").into_inner();
    serde_json::json!({ "volumes": vols, "groups": groups })
}
