//! `drover orchestrator` and `drover agent`: turn flags into configuration layers and
//! hand over to each server's own launcher. The list of backends this build can drive is
//! [`BACKENDS`]: adding a backend is adding its crate and one line there.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use drover_agent::launch::Backend;
use drover_config::Sources;
use tokio_util::sync::CancellationToken;

/// Every backend this build of `drover agent` can drive.
pub const BACKENDS: &[&dyn Backend] = &[&drover_agent_qemu::QemuBackend, &drover_agent_mock::MockBackend];

/// The line a server prints once it serves; the address follows it. Test harnesses and
/// scripts wait for it.
pub const READY_MARKER: &str = "listening on ";

/// `drover orchestrator`: every setting comes from defaults < `--config` file <
/// `DROVER_*` environment (nested keys with `__`) < these flags.
#[derive(Args)]
pub struct OrchestratorArgs {
    /// TOML config file (see config/orchestrator.example.toml).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve on (key `listen`).
    #[arg(long)]
    pub listen: Option<String>,
    /// `embedded` or `etcd` (key `store.kind`).
    #[arg(long, value_parser = ["embedded", "etcd"])]
    pub store: Option<String>,
    /// The embedded store's file (key `store.path`).
    #[arg(long)]
    pub store_path: Option<PathBuf>,
    /// Comma-separated etcd endpoints (key `store.endpoints`).
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix in the store (key `store.prefix`).
    #[arg(long)]
    pub store_prefix: Option<String>,
    /// TTL of agent registrations, e.g. 10s (key `agent_lease_ttl`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub agent_lease_ttl: Option<Duration>,
    /// Serve and call in plain text instead of TLS, for development only (key `insecure`).
    #[arg(long)]
    pub insecure: bool,
    /// Set any config key, e.g. `--set defaults.agent_call_timeout=1m`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the merged configuration with each value's origin, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// A client command about the orchestrators instead of running one.
    #[command(subcommand)]
    pub cmd: Option<OrchestratorCmd>,
}

/// `drover orchestrator list`.
#[derive(clap::Subcommand)]
pub enum OrchestratorCmd {
    /// The orchestrators sharing the store: endpoint, health, what each owns.
    List {
        #[command(flatten)]
        client: crate::commands::ClientArgs,
    },
}

/// Runs `drover orchestrator list`.
pub async fn list_orchestrators(client: &crate::commands::ClientArgs) -> Result<()> {
    let mut ctx = crate::commands::Ctx::connect(client).await?;
    let r = ctx.api.cluster.list_orchestrators(drover_proto::v1::ListOrchestratorsRequest {}).await?.into_inner();
    crate::output::emit(ctx.fmt, &r, |r| {
        let mut t = crate::output::Table::new(&["ENDPOINT", "STATUS", "OWNS", "VERSION", "STARTED", "ID"]);
        for o in &r.orchestrators {
            t.row(vec![
                if o.answering { format!("{} (answered)", o.endpoint) } else { o.endpoint.clone() },
                o.status.clone(),
                o.executions_owned.to_string(),
                o.version.clone(),
                crate::output::timestamp(o.started_at_ms),
                o.id.clone(),
            ]);
        }
        t
    });
    Ok(())
}

impl OrchestratorArgs {
    /// The configuration layers these flags describe.
    pub fn sources(&self) -> Result<Sources> {
        let base = Sources {
            file: self.config.clone(),
            env_prefix: drover_orchestrator::config::ENV_PREFIX.into(),
            overrides: Vec::new(),
        };
        Ok(base
            .flag("listen", self.listen.as_ref())
            .flag("store.kind", self.store.as_ref())
            .flag("store.path", self.store_path.as_ref().map(|p| p.display()))
            .flag_list("store.endpoints", &self.etcd_endpoints)
            .flag("store.prefix", self.store_prefix.as_ref())
            .flag("agent_lease_ttl", self.agent_lease_ttl.map(humantime::format_duration))
            .switch("insecure", self.insecure)
            .with_sets(&self.sets)?)
    }
}

/// `drover agent`: every setting comes from defaults < `--config` file <
/// `DROVER_AGENT_*` environment (nested keys with `__`, e.g.
/// `DROVER_AGENT_QEMU__POOL_DIR`) < these flags. Backend settings have no flags of their
/// own: use `--set qemu.pool_dir=/srv/pool`.
#[derive(Args)]
pub struct AgentArgs {
    /// TOML config file (see config/agent.example.toml).
    #[arg(long, env = "DROVER_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This agent's id within its backend (key `agent_id`).
    #[arg(long)]
    pub agent_id: Option<String>,
    /// The site of the backend (key `site`).
    #[arg(long)]
    pub site: Option<String>,
    /// The backend this agent drives (key `backend`).
    #[arg(long)]
    pub backend: Option<String>,
    /// Address to serve on (key `listen`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Endpoint the orchestrator should dial (key `advertise`).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Orchestrator to register with; empty to only serve (key `orchestrator`).
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// Where the ledger and driver state live (key `state_dir`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The backend driver: qemu (qemu-storage-daemon) or mock (control-plane tests only)
    /// (key `driver`).
    #[arg(long)]
    pub driver: Option<String>,
    /// Set any config key, e.g. `--set qemu.pool_dir=/srv/pool`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Serve and call in plain text instead of TLS, for development only (key `insecure`).
    #[arg(long)]
    pub insecure: bool,
    /// Print the merged configuration with each value's origin, and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl AgentArgs {
    /// The configuration layers these flags describe.
    pub fn sources(&self) -> Result<Sources> {
        let base = Sources {
            file: self.config.clone(),
            env_prefix: drover_agent::config::ENV_PREFIX.into(),
            overrides: Vec::new(),
        };
        Ok(base
            .flag("agent_id", self.agent_id.as_ref())
            .flag("site", self.site.as_ref())
            .flag("backend", self.backend.as_ref())
            .flag("listen", self.listen.as_ref())
            .flag("advertise", self.advertise.as_ref())
            .flag("orchestrator", self.orchestrator.as_ref())
            .flag("state_dir", self.state_dir.as_ref().map(|p| p.display()))
            .flag("driver", self.driver.as_ref())
            .switch("insecure", self.insecure)
            .with_sets(&self.sets)?)
    }
}

/// Resolves on Ctrl-C or SIGTERM, then cancels `token`.
pub async fn shutdown_on_signal(token: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        tracing::warn!("cannot install a SIGTERM handler; stop with Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    token.cancel();
}

/// Runs the orchestrator until a signal.
pub async fn run_orchestrator(a: OrchestratorArgs) -> Result<()> {
    let sources = a.sources()?;
    if a.print_config {
        let (_, layered) = drover_orchestrator::config::OrchestratorConfig::load(&sources)?;
        println!("{}", serde_json::to_string_pretty(&layered.explain()?)?);
        return Ok(());
    }
    let token = CancellationToken::new();
    let started = drover_orchestrator::launch::start(&sources, token.clone()).await?;
    println!("{} {READY_MARKER}{}", started.describe(), started.local_addr);
    tokio::spawn(shutdown_on_signal(token.clone()));
    bounded_stop(started.handle, token, "orchestrator").await
}

/// Runs an agent until a signal.
pub async fn run_agent(a: AgentArgs) -> Result<()> {
    let sources = a.sources()?;
    if a.print_config {
        let (layered, _) = drover_agent::launch::load(BACKENDS, &sources)?;
        println!("{}", serde_json::to_string_pretty(&layered.explain()?)?);
        return Ok(());
    }
    let token = CancellationToken::new();
    let started = drover_agent::launch::start(BACKENDS, &sources, token.clone()).await?;
    println!("{} {READY_MARKER}{}", started.describe(), started.local_addr);
    tokio::spawn(shutdown_on_signal(token.clone()));
    bounded_stop(started.handle, token, "agent").await
}

/// How long a server waits for in-flight calls after SIGTERM before it exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits for the server to end; once a stop was asked for, waits at most [`STOP_GRACE`]
/// for in-flight calls (a long transfer, a hung backend) and then exits regardless. What
/// was cut off is recorded as started in the agent's ledger and reported as interrupted.
async fn bounded_stop(
    handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    token: CancellationToken,
    what: &str,
) -> Result<()> {
    tokio::pin!(handle);
    tokio::select! {
        r = &mut handle => {
            r?.with_context(|| format!("{what} server failed"))?;
            return Ok(());
        }
        _ = token.cancelled() => {}
    }
    match tokio::time::timeout(STOP_GRACE, &mut handle).await {
        Ok(r) => r?.with_context(|| format!("{what} server failed"))?,
        Err(_) => tracing::warn!(grace = ?STOP_GRACE, "in-flight calls did not finish; stopping anyway"),
    }
    Ok(())
}
