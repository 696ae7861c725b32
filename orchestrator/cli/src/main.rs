//! `drover`: the Drover command line. It talks to the orchestrator's drover.v1 API, and
//! starts the orchestrator (`drover orchestrator`), an agent (`drover agent`) or the local
//! two-site drill (`drover drill`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use drover_agent::config::AgentConfig;
use drover_agent::driver::Driver;
use drover_cli::client::Clients;
use drover_cli::output::{self, Format, Table, emit};
use drover_cli::size::parse_size;
use drover_orchestrator::config::{OrchestratorConfig, StoreKind};
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "drover", version, about = "Drover: replication and disaster recovery for block storage")]
struct Cli {
    /// Orchestrator endpoint.
    #[arg(long, global = true, env = "DROVER_ENDPOINT", default_value = "http://127.0.0.1:7700")]
    endpoint: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    /// Project (tenant) that owns the volumes and groups.
    #[arg(long, global = true, env = "DROVER_PROJECT", default_value = "admin")]
    project: String,
    /// Deadline of each API call, e.g. 30s or 5m.
    #[arg(long, global = true, env = "DROVER_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the client's and the server's versions.
    Version,
    /// Sites (failure domains).
    #[command(subcommand)]
    Site(SiteCmd),
    /// Backends, their agents and capabilities.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Group types.
    #[command(subcommand, name = "group-type")]
    GroupType(GroupTypeCmd),
    /// Groups and their replication.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Run the orchestrator server.
    Orchestrator(OrchestratorArgs),
    /// Run an agent server.
    Agent(AgentArgs),
    /// Run the local two-site DR drill (embedded store, mock agents).
    Drill {
        /// Keep state and logs here instead of a temporary directory.
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Volumes in the drill's group.
        #[arg(long, default_value_t = 3)]
        volumes: usize,
        /// `qemu` (real data, verified with qemu-io) or `mock` (control plane only).
        #[arg(long, default_value = "qemu", value_parser = ["qemu", "mock"])]
        driver: String,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    List,
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    List {
        #[arg(long, default_value = "")]
        site: String,
    },
    /// A backend with its agents' liveness and its capabilities.
    Show { name: String },
    /// Block management changes on a backend (Cinder's freeze-host).
    Freeze { name: String },
    /// Allow management changes again (Cinder's thaw-host).
    Thaw { name: String },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        name: String,
        /// Size, e.g. 10GiB or 512MiB.
        #[arg(long, allow_hyphen_values = true)]
        size: String,
        #[arg(long)]
        backend: String,
    },
    List {
        /// Volumes of every project.
        #[arg(long)]
        all_projects: bool,
    },
    Show {
        volume: String,
    },
    Delete {
        volume: String,
    },
    Extend {
        volume: String,
        /// The new size, e.g. 20GiB.
        #[arg(long, allow_hyphen_values = true)]
        size: String,
    },
    /// Where to attach a volume now: e.g. an NBD URI for qemu-io or qemu.
    Attach {
        volume: String,
    },
    /// Volumes on a backend that Drover does not manage (Cinder's manageable-list).
    #[command(name = "manageable-list")]
    ManageableList {
        #[arg(long)]
        backend: String,
    },
    /// Take over an unmanaged volume (Cinder's manage).
    Manage {
        reference: String,
        #[arg(long)]
        backend: String,
        #[arg(long)]
        name: String,
    },
    /// Forget a volume without deleting its data (Cinder's unmanage).
    Unmanage {
        volume: String,
    },
}

#[derive(Subcommand)]
enum GroupTypeCmd {
    List,
    Show {
        name: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A group spec KEY=VALUE; repeat for more.
        #[arg(long = "spec")]
        specs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    Create {
        name: String,
        #[arg(long = "type")]
        group_type: String,
        #[arg(long)]
        backend: String,
        /// A volume (id or name) to include; repeat for more.
        #[arg(long = "volume")]
        volumes: Vec<String>,
    },
    List {
        #[arg(long)]
        all_projects: bool,
    },
    Show {
        group: String,
    },
    Delete {
        group: String,
    },
    #[command(name = "add-volumes")]
    AddVolumes {
        group: String,
        volumes: Vec<String>,
    },
    #[command(name = "remove-volumes")]
    RemoveVolumes {
        group: String,
        volumes: Vec<String>,
    },
    #[command(name = "enable-replication")]
    EnableReplication {
        group: String,
        #[arg(long, default_value = "")]
        target: String,
        /// Time between recovery points, e.g. 30s (the default) or 5m; at least 1s.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
    },
    /// Take and ship a recovery point now.
    Sync {
        group: String,
    },
    #[command(name = "disable-replication")]
    DisableReplication {
        group: String,
    },
    /// Fail over to the replication target, or back with `--target default`.
    Failover {
        group: String,
        #[arg(long)]
        target: String,
        /// Disaster failover: do not wait for the current side to demote.
        #[arg(long)]
        force: bool,
        /// After a disaster failover, fail back even though this backend's changes since
        /// the divergence point are discarded (recorded in the group's history).
        #[arg(long, default_value = "")]
        discard_changes_on: String,
    },
    #[command(name = "list-targets")]
    ListTargets {
        group: String,
    },
    #[command(name = "replication-info")]
    ReplicationInfo {
        group: String,
    },
}

#[derive(Args)]
struct OrchestratorArgs {
    /// TOML config file; env and flags override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "DROVER_LISTEN")]
    listen: Option<String>,
    /// embedded or etcd.
    #[arg(long, env = "DROVER_STORE", value_parser = ["embedded", "etcd"])]
    store: Option<String>,
    /// The embedded store's file.
    #[arg(long, env = "DROVER_STORE_PATH")]
    store_path: Option<PathBuf>,
    /// Comma-separated etcd endpoints.
    #[arg(long, env = "DROVER_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    #[arg(long, env = "DROVER_STORE_PREFIX")]
    store_prefix: Option<String>,
    #[arg(long, env = "DROVER_AGENT_LEASE_TTL", value_parser = humantime::parse_duration)]
    agent_lease_ttl: Option<Duration>,
}

#[derive(Args)]
struct AgentArgs {
    /// TOML config file; env and flags override it.
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "DROVER_AGENT_ID")]
    agent_id: Option<String>,
    #[arg(long, env = "DROVER_AGENT_SITE")]
    site: Option<String>,
    #[arg(long, env = "DROVER_AGENT_BACKEND")]
    backend: Option<String>,
    #[arg(long, env = "DROVER_AGENT_LISTEN")]
    listen: Option<String>,
    #[arg(long, env = "DROVER_AGENT_ADVERTISE")]
    advertise: Option<String>,
    #[arg(long, env = "DROVER_AGENT_ORCHESTRATOR")]
    orchestrator: Option<String>,
    #[arg(long, env = "DROVER_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// `qemu` (qemu-storage-daemon) or `mock` (control-plane tests only).
    #[arg(long, env = "DROVER_AGENT_DRIVER")]
    driver: Option<String>,
    /// Mock driver: append every driver call to this file.
    #[arg(long, env = "DROVER_AGENT_MOCK_OPLOG")]
    mock_oplog: Option<PathBuf>,
    /// Mock driver: latency added to each call.
    #[arg(long, env = "DROVER_AGENT_MOCK_LATENCY", value_parser = humantime::parse_duration)]
    mock_latency: Option<Duration>,
    /// Qemu driver: the pool directory holding the volumes.
    #[arg(long, env = "DROVER_AGENT_POOL_DIR")]
    pool_dir: Option<PathBuf>,
    /// Qemu driver: serve NBD exports on this TCP HOST:PORT instead of a unix socket.
    #[arg(long, env = "DROVER_AGENT_NBD_TCP")]
    nbd_tcp: Option<String>,
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn shutdown_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

async fn run_orchestrator(a: OrchestratorArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(path) => OrchestratorConfig::from_file(path)?,
        None => OrchestratorConfig::default(),
    };
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.store {
        cfg.store.kind = if v == "etcd" { StoreKind::Etcd } else { StoreKind::Embedded };
    }
    if let Some(v) = a.store_path {
        cfg.store.path = v;
    }
    if !a.etcd_endpoints.is_empty() {
        cfg.store.endpoints = a.etcd_endpoints;
    }
    if let Some(v) = a.store_prefix {
        cfg.store.prefix = v;
    }
    if let Some(v) = a.agent_lease_ttl {
        cfg.agent_lease_ttl = v;
    }
    cfg.validate()?;
    let store = drover_orchestrator::open_store(&cfg).await.context("opening the store")?;
    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let token = CancellationToken::new();
    let kind = format!("{:?}", cfg.store.kind).to_lowercase();
    let running = drover_orchestrator::serve(cfg, store, listener, token.clone()).await.map_err(|e| anyhow!("{e}"))?;
    println!("drover orchestrator (store: {kind}) {}{}", drover_cli::cluster::READY_MARKER, running.local_addr);
    tokio::spawn(shutdown_signal(token));
    running.handle.await?.context("orchestrator server failed")?;
    Ok(())
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    let set = |slot: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut cfg.agent_id, a.agent_id);
    set(&mut cfg.site, a.site);
    set(&mut cfg.backend, a.backend);
    set(&mut cfg.listen, a.listen);
    set(&mut cfg.driver, a.driver);
    if a.advertise.is_some() {
        cfg.advertise = a.advertise;
    }
    if let Some(o) = a.orchestrator {
        cfg.orchestrator = (!o.is_empty()).then_some(o);
    }
    if let Some(v) = a.state_dir {
        cfg.state_dir = v;
    }
    if a.mock_oplog.is_some() {
        cfg.mock.oplog = a.mock_oplog;
    }
    if a.mock_latency.is_some() {
        cfg.mock.latency = a.mock_latency;
    }
    if let Some(p) = a.pool_dir {
        cfg.qemu.pool_dir = p;
    }
    if a.nbd_tcp.is_some() {
        cfg.qemu.nbd_tcp = a.nbd_tcp;
    }
    if cfg.agent_id.is_empty() {
        cfg.agent_id = format!("{}-agent", cfg.backend);
    }
    cfg.validate()?;
    let ledger = drover_agent::ledger::Ledger::open(&cfg.state_dir.join("ledger.redb"))?;
    let driver: Arc<dyn Driver> = match cfg.driver.as_str() {
        "qemu" => {
            std::fs::create_dir_all(&cfg.qemu.pool_dir)
                .with_context(|| format!("cannot create pool {}", cfg.qemu.pool_dir.display()))?;
            drover_agent::qemu::QemuDriver::start(cfg.qemu.clone(), &cfg.state_dir, &cfg.backend)
                .await
                .map_err(|e| anyhow!("starting the qemu driver: {e}"))?
        }
        _ => Arc::new(drover_agent::mock::MockDriver::new(cfg.mock.clone())),
    };
    let listener =
        tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let token = CancellationToken::new();
    let running = drover_agent::server::serve(driver.clone(), ledger, listener, token.clone()).await?;
    let endpoint = cfg.advertise.clone().unwrap_or_else(|| format!("http://{}", running.local_addr));
    println!(
        "drover agent {} (backend {}, site {}, driver {}) {}{}",
        cfg.agent_id,
        cfg.backend,
        cfg.site,
        driver.name(),
        drover_cli::cluster::READY_MARKER,
        running.local_addr
    );
    if let Some(orch) = cfg.orchestrator.clone() {
        let me = drover_agent::registration::Announcement {
            agent_id: cfg.agent_id.clone(),
            site: cfg.site.clone(),
            backend: cfg.backend.clone(),
            endpoint,
            driver: driver.name().to_string(),
            driver_version: driver.version().to_string(),
            capabilities: driver.capabilities(),
        };
        tokio::spawn(drover_agent::registration::run(orch, me, token.clone()));
    }
    tokio::spawn(shutdown_signal(token));
    running.handle.await?.context("agent server failed")?;
    Ok(())
}

fn volume_table(v: &pb::Volume) -> Table {
    output::volumes(std::slice::from_ref(v))
}

async fn run_client(cli: Cli) -> Result<()> {
    let mut c = Clients::connect(&cli.endpoint, cli.timeout).await.map_err(|e| anyhow!(e))?;
    let project = cli.project.clone();
    let fmt = cli.output;
    match cli.command {
        Command::Version => {
            let v = c.version.get_version(pb::GetVersionRequest {}).await?.into_inner();
            emit(fmt, &v, |v| {
                let mut t = Table::new(&["CLIENT", "SERVER", "API (SERVER)", "API (CLIENT)"]);
                t.row(vec![
                    env!("CARGO_PKG_VERSION").into(),
                    v.server_version.clone(),
                    format!("{} to {}", v.min_api_version, v.max_api_version),
                    drover_proto::API_VERSION.into(),
                ]);
                t
            });
        }
        Command::Site(SiteCmd::List) => {
            let r = c.sites.list_sites(pb::ListSitesRequest {}).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["NAME", "DESCRIPTION"]);
                for s in &r.sites {
                    t.row(vec![s.name.clone(), s.description.clone()]);
                }
                t
            });
        }
        Command::Site(SiteCmd::Create { name, description }) => {
            let s = c.sites.create_site(pb::CreateSiteRequest { name, description }).await?.into_inner();
            emit(fmt, &s, |s| {
                let mut t = Table::new(&["NAME", "DESCRIPTION"]);
                t.row(vec![s.name.clone(), s.description.clone()]);
                t
            });
        }
        Command::Backend(BackendCmd::List { site }) => {
            let r = c.sites.list_backends(pb::ListBackendsRequest { site }).await?.into_inner();
            emit(fmt, &r, |r| output::backends(&r.backends));
        }
        Command::Backend(BackendCmd::Show { name }) => {
            let b = c.sites.get_backend(pb::GetBackendRequest { name }).await?.into_inner();
            emit(fmt, &b, |b| output::backends(std::slice::from_ref(b)));
        }
        Command::Backend(BackendCmd::Freeze { name }) => {
            let b = c.sites.freeze_backend(pb::FreezeBackendRequest { name }).await?.into_inner();
            emit(fmt, &b, |b| output::backends(std::slice::from_ref(b)));
        }
        Command::Backend(BackendCmd::Thaw { name }) => {
            let b = c.sites.thaw_backend(pb::ThawBackendRequest { name }).await?.into_inner();
            emit(fmt, &b, |b| output::backends(std::slice::from_ref(b)));
        }
        Command::Volume(VolumeCmd::Create { name, size, backend }) => {
            let size_bytes = parse_size(&size).map_err(|e| anyhow!("--size: {e}"))?;
            let v = c
                .volumes
                .create_volume(pb::CreateVolumeRequest { name, project, size_bytes, backend })
                .await?
                .into_inner();
            emit(fmt, &v, volume_table);
        }
        Command::Volume(VolumeCmd::List { all_projects }) => {
            let project = if all_projects { String::new() } else { project };
            let r = c.volumes.list_volumes(pb::ListVolumesRequest { project }).await?.into_inner();
            emit(fmt, &r, |r| output::volumes(&r.volumes));
        }
        Command::Volume(VolumeCmd::Show { volume }) => {
            let v = c.volumes.get_volume(pb::GetVolumeRequest { volume, project }).await?.into_inner();
            emit(fmt, &v, volume_table);
        }
        Command::Volume(VolumeCmd::Delete { volume }) => {
            c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: volume.clone(), project }).await?;
            emit(fmt, &serde_json::json!({ "deleted": volume }), |_| {
                let mut t = Table::new(&["DELETED"]);
                t.row(vec![volume.clone()]);
                t
            });
        }
        Command::Volume(VolumeCmd::Extend { volume, size }) => {
            let new_size_bytes = parse_size(&size).map_err(|e| anyhow!("--size: {e}"))?;
            let v = c
                .volumes
                .extend_volume(pb::ExtendVolumeRequest { volume, project, new_size_bytes })
                .await?
                .into_inner();
            emit(fmt, &v, volume_table);
        }
        Command::Volume(VolumeCmd::Attach { volume }) => {
            let r = c.volumes.attach_volume(pb::AttachVolumeRequest { volume, project }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["BACKEND", "TYPE", "URI"]);
                t.row(vec![r.backend.clone(), r.driver_volume_type.clone(), r.uri.clone()]);
                t
            });
        }
        Command::Volume(VolumeCmd::ManageableList { backend }) => {
            let r = c.volumes.list_manageable_volumes(pb::ListManageableVolumesRequest { backend }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["REFERENCE", "SIZE", "SAFE TO MANAGE", "REASON NOT SAFE"]);
                for m in &r.volumes {
                    t.row(vec![
                        m.reference.clone(),
                        drover_cli::size::format_size(m.size_bytes),
                        m.safe_to_manage.to_string(),
                        m.reason_not_safe.clone(),
                    ]);
                }
                t
            });
        }
        Command::Volume(VolumeCmd::Manage { reference, backend, name }) => {
            let v = c
                .volumes
                .manage_volume(pb::ManageVolumeRequest { backend, reference, name, project })
                .await?
                .into_inner();
            emit(fmt, &v, volume_table);
        }
        Command::Volume(VolumeCmd::Unmanage { volume }) => {
            let r = c.volumes.unmanage_volume(pb::UnmanageVolumeRequest { volume, project }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["UNMANAGED AS"]);
                t.row(vec![r.reference.clone()]);
                t
            });
        }
        Command::GroupType(cmd) => group_type_cmd(&mut c, fmt, cmd).await?,
        Command::Group(cmd) => group_cmd(&mut c, fmt, &project, cmd).await?,
        Command::Orchestrator(_) | Command::Agent(_) | Command::Drill { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

fn type_table(types: &[pb::GroupType]) -> Table {
    let mut t = Table::new(&["NAME", "BUILTIN", "SPECS", "DESCRIPTION"]);
    for g in types {
        let mut specs: Vec<String> = g.specs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        specs.sort();
        t.row(vec![g.name.clone(), g.builtin.to_string(), specs.join(", "), g.description.clone()]);
    }
    t
}

async fn group_type_cmd(c: &mut Clients, fmt: Format, cmd: GroupTypeCmd) -> Result<()> {
    match cmd {
        GroupTypeCmd::List => {
            let r = c.groups.list_group_types(pb::ListGroupTypesRequest {}).await?.into_inner();
            emit(fmt, &r, |r| type_table(&r.group_types));
        }
        GroupTypeCmd::Show { name } => {
            let t = c.groups.get_group_type(pb::GetGroupTypeRequest { name }).await?.into_inner();
            emit(fmt, &t, |t| type_table(std::slice::from_ref(t)));
        }
        GroupTypeCmd::Create { name, description, specs } => {
            let mut map = HashMap::new();
            for s in specs {
                let Some((k, v)) = s.split_once('=') else { bail!("--spec {s:?} is not KEY=VALUE") };
                map.insert(k.to_string(), v.to_string());
            }
            let t = c
                .groups
                .create_group_type(pb::CreateGroupTypeRequest { name, description, specs: map })
                .await?
                .into_inner();
            emit(fmt, &t, |t| type_table(std::slice::from_ref(t)));
        }
    }
    Ok(())
}

async fn group_cmd(c: &mut Clients, fmt: Format, project: &str, cmd: GroupCmd) -> Result<()> {
    let project = project.to_string();
    match cmd {
        GroupCmd::Create { name, group_type, backend, volumes } => {
            let g = c
                .groups
                .create_group(pb::CreateGroupRequest { name, project, group_type, backend, volumes })
                .await?
                .into_inner();
            emit(fmt, &g, output::group_detail);
        }
        GroupCmd::List { all_projects } => {
            let project = if all_projects { String::new() } else { project };
            let r = c.groups.list_groups(pb::ListGroupsRequest { project }).await?.into_inner();
            emit(fmt, &r, |r| output::groups(&r.groups));
        }
        GroupCmd::Show { group } => {
            let g = c.groups.get_group(pb::GetGroupRequest { group, project }).await?.into_inner();
            emit(fmt, &g, output::group_detail);
        }
        GroupCmd::Delete { group } => {
            c.groups.delete_group(pb::DeleteGroupRequest { group: group.clone(), project }).await?;
            emit(fmt, &serde_json::json!({ "deleted": group }), |_| {
                let mut t = Table::new(&["DELETED"]);
                t.row(vec![group.clone()]);
                t
            });
        }
        GroupCmd::AddVolumes { group, volumes } => {
            let g = c
                .groups
                .update_group(pb::UpdateGroupRequest { group, project, add_volumes: volumes, remove_volumes: vec![] })
                .await?
                .into_inner();
            emit(fmt, &g, output::group_detail);
        }
        GroupCmd::RemoveVolumes { group, volumes } => {
            let g = c
                .groups
                .update_group(pb::UpdateGroupRequest { group, project, add_volumes: vec![], remove_volumes: volumes })
                .await?
                .into_inner();
            emit(fmt, &g, output::group_detail);
        }
        GroupCmd::EnableReplication { group, target, interval } => {
            let sync_interval_seconds = interval.map_or(0, |d| d.as_secs().max(if d.is_zero() { 0 } else { 1 }) as i64);
            let r = c
                .replication
                .enable_replication(pb::EnableReplicationRequest {
                    group,
                    project,
                    target_backend: target,
                    sync_interval_seconds,
                })
                .await?
                .into_inner();
            report(fmt, &r)?;
        }
        GroupCmd::Sync { group } => {
            let r = c.replication.sync_group(pb::SyncGroupRequest { group, project }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["RECOVERY POINT", "FULL", "BYTES", "DURATION (ms)"]);
                t.row(vec![
                    r.recovery_point_id.clone(),
                    r.full.to_string(),
                    r.bytes.to_string(),
                    r.duration_ms.to_string(),
                ]);
                t
            });
        }
        GroupCmd::DisableReplication { group } => {
            let r =
                c.replication.disable_replication(pb::DisableReplicationRequest { group, project }).await?.into_inner();
            report(fmt, &r)?;
        }
        GroupCmd::Failover { group, target, force, discard_changes_on } => {
            let r = c
                .replication
                .failover_group(pb::FailoverGroupRequest {
                    group,
                    project,
                    target_backend: target,
                    force,
                    discard_changes_on,
                })
                .await?
                .into_inner();
            report(fmt, &r)?;
        }
        GroupCmd::ListTargets { group } => {
            let r = c
                .replication
                .list_replication_targets(pb::ListReplicationTargetsRequest { group, project })
                .await?
                .into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["BACKEND", "SITE", "STATUS"]);
                for x in &r.targets {
                    t.row(vec![x.backend.clone(), x.site.clone(), x.status.clone()]);
                }
                t
            });
        }
        GroupCmd::ReplicationInfo { group } => {
            let r = c
                .replication
                .get_replication_info(pb::GetReplicationInfoRequest { group, project })
                .await?
                .into_inner();
            emit(fmt, &r, output::replication_info);
        }
    }
    Ok(())
}

/// Prints a group operation's per-volume outcomes; fails the command when any failed.
fn report(fmt: Format, r: &pb::ReplicationResult) -> Result<()> {
    emit(fmt, r, output::replication_result);
    let failed = r.items.iter().filter(|i| i.outcome != "success").count();
    if failed > 0 {
        let reason = r.group.as_ref().map(|g| g.status_reason.clone()).unwrap_or_default();
        bail!("{failed} of {} volume(s) did not succeed: {reason}", r.items.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Orchestrator(a) => {
            init_logging("info");
            run_orchestrator(a).await
        }
        Command::Agent(a) => {
            init_logging("info");
            run_agent(a).await
        }
        Command::Drill { workdir, volumes, driver } => {
            init_logging("warn");
            drover_cli::drill::run(drover_cli::drill::DrillOptions { workdir, volumes, driver })
                .await
                .map_err(|e| anyhow!(e))
        }
        _ => {
            init_logging("warn");
            run_client(cli).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {} ({:?})", s.message(), s.code()),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
