//! Starting the orchestrator: read the layered config, open the store, serve. The
//! `drover orchestrator` command and the drill both start it through [`start`].

use std::net::SocketAddr;

use drover_config::Sources;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, OrchestratorConfig};

/// Why the orchestrator did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the {kind} store: {message}")]
    Store { kind: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("starting the API: {0}")]
    Serve(String),
}

/// A started orchestrator.
pub struct StartedOrchestrator {
    /// The address it serves on.
    pub local_addr: SocketAddr,
    /// Its settings after all layers.
    pub config: OrchestratorConfig,
    /// Resolves when the server stops (after `shutdown` fires).
    pub handle: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl StartedOrchestrator {
    /// One line that says what this orchestrator is, for logs and the ready line.
    pub fn describe(&self) -> String {
        format!("drover orchestrator (store: {})", self.config.store.kind.as_str())
    }
}

/// Reads the config from `sources`, opens the store and serves until `shutdown`.
pub async fn start(sources: &Sources, shutdown: CancellationToken) -> Result<StartedOrchestrator, LaunchError> {
    let (config, _) = OrchestratorConfig::load(sources)?;
    let store = crate::open_store(&config, &shutdown)
        .await
        .map_err(|e| LaunchError::Store { kind: config.store.kind.as_str().into(), message: e.to_string() })?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| LaunchError::Listen { addr: config.listen.clone(), source })?;
    let running =
        crate::serve(config.clone(), store, listener, shutdown).await.map_err(|e| LaunchError::Serve(e.to_string()))?;
    Ok(StartedOrchestrator { local_addr: running.local_addr, config, handle: running.handle })
}
