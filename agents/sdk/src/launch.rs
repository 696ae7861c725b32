//! Starting an agent: read the layered config, open the ledger and the backend's driver,
//! serve, and register with the orchestrator. The `drover agent` command and the drill
//! both start agents through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use drover_config::{Layered, Sources};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError};
use crate::driver::Driver;
use crate::ledger::Ledger;

/// A backend this build can drive: its name (also the name of its config table) and how
/// to open its driver. Each backend crate exports one; adding a backend is adding its
/// crate and one line to the list the binary passes to [`start`].
#[async_trait]
pub trait Backend: Send + Sync {
    /// The driver name, e.g. `qemu`; the agent's `driver` setting selects it.
    fn name(&self) -> &'static str;
    /// Opens the driver from its table of `config` and the common settings.
    async fn open(&self, config: &Layered, common: &AgentConfig) -> Result<Arc<dyn Driver>, LaunchError>;
}

/// Why an agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the ledger in {path}: {message}; check that the state directory is writable")]
    Ledger { path: String, message: String },
    #[error("cannot open the op log {path}: {message}; check that its directory is writable, or unset `op_log`")]
    OpLog { path: String, message: String },
    #[error("starting the {driver} driver: {message}")]
    Driver { driver: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("{0}")]
    Tls(String),
}

/// A started agent.
pub struct StartedAgent {
    /// The address it serves on.
    pub local_addr: SocketAddr,
    /// Its settings after defaults and validation.
    pub config: AgentConfig,
    /// The driver, for callers that inspect it (tests, the drill).
    pub driver: Arc<dyn Driver>,
    /// Resolves when the server stops (after `shutdown` fires).
    pub handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl StartedAgent {
    /// One line that says what this agent is, for logs and the ready line.
    pub fn describe(&self) -> String {
        format!(
            "drover agent {} (backend {}, site {}, driver {})",
            self.config.agent_id,
            self.config.backend,
            self.config.site,
            self.driver.name()
        )
    }
}

/// The merged configuration of an agent with `backends`, without starting anything:
/// what `drover agent --print-config` shows.
pub fn load(backends: &[&dyn Backend], sources: &Sources) -> Result<(Layered, AgentConfig), ConfigError> {
    let names: Vec<&str> = backends.iter().map(|b| b.name()).collect();
    let layered = Layered::load::<AgentConfig>(sources, &names)?;
    let mut config: AgentConfig = layered.extract()?;
    config.validate(&names)?;
    Ok((layered, config))
}

/// Starts an agent: config, ledger, driver, server, registration. Runs until `shutdown`.
pub async fn start(
    backends: &[&dyn Backend],
    sources: &Sources,
    shutdown: CancellationToken,
) -> Result<StartedAgent, LaunchError> {
    let (layered, config) = load(backends, sources)?;
    let backend = backends.iter().find(|b| b.name() == config.driver).expect("validate checked the driver name");
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| LaunchError::Ledger { path: config.state_dir.display().to_string(), message: e.to_string() })?;
    let ledger_path = config.state_dir.join("ledger.log");
    let ledger = Ledger::open(&ledger_path)
        .map_err(|e| LaunchError::Ledger { path: ledger_path.display().to_string(), message: e.to_string() })?;
    let op_log = match &config.op_log {
        Some(path) => Some(Arc::new(
            crate::oplog::OpLog::open(path)
                .map_err(|e| LaunchError::OpLog { path: path.display().to_string(), message: e.to_string() })?,
        )),
        None => None,
    };
    let driver = backend.open(&layered, &config).await?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| LaunchError::Listen { addr: config.listen.clone(), source })?;
    let fencing =
        config.fence_on_return.then(|| crate::returning::Fencing { driver: driver.clone(), ledger: ledger.clone() });
    let tls = config.tls_files();
    if let Some(files) = tls {
        crate::replica::use_tls(files.client(drover_proto::tls::AGENT_NAME).map_err(LaunchError::Tls)?);
    }
    let running = crate::server::serve(driver.clone(), ledger, op_log, listener, tls, shutdown.clone())
        .await
        .map_err(|source| LaunchError::Listen { addr: config.listen.clone(), source })?;
    if !config.metrics_listen.is_empty() {
        let refresh: drover_proto::metrics::Refresh = {
            let (metrics, driver) = (running.metrics.clone(), driver.clone());
            Arc::new(move || {
                metrics.refresh(driver.as_ref());
                Box::pin(async {})
            })
        };
        drover_proto::metrics::listen(
            &config.metrics_listen,
            running.metrics.registry.clone(),
            Some(refresh),
            shutdown.clone().cancelled_owned(),
        )
        .await
        .map_err(|source| LaunchError::Listen { addr: config.metrics_listen.clone(), source })?;
    }
    if let Some(orchestrator) = config.orchestrator.clone() {
        let me = crate::registration::Announcement {
            agent_id: config.agent_id.clone(),
            site: config.site.clone(),
            backend: config.backend.clone(),
            endpoint: config.advertise.clone().unwrap_or_else(|| {
                format!("{}://{}", if tls.is_some() { "https" } else { "http" }, running.local_addr)
            }),
            driver: driver.name().to_string(),
            driver_version: driver.version().to_string(),
            capabilities: driver.capabilities(),
        };
        let to_orchestrator =
            tls.map(|f| f.client(drover_proto::tls::ORCHESTRATOR_NAME)).transpose().map_err(LaunchError::Tls)?;
        let link =
            crate::registration::SchedulerLink { failures: running.failures.clone(), peers: running.peers.clone() };
        tokio::spawn(crate::registration::run(orchestrator, me, fencing, to_orchestrator, link, shutdown));
    }
    Ok(StartedAgent { local_addr: running.local_addr, config, driver, handle: running.handle })
}
