//! The drover.v1 services. Each holds the shared [`Core`].

pub mod adoption;
pub mod cluster;
pub mod executions;
pub mod groups;
pub mod messages;
pub mod projects;
pub mod replication;
pub mod returning;
pub mod runbooks;
pub mod shared;
pub mod sites;
pub mod snapshots;
pub mod version;
pub mod volumes;

use std::sync::Arc;

use crate::agents::AgentPool;
use crate::config::OrchestratorConfig;
use crate::repo::Repo;

/// What every service shares: the store, the agent pool, the procedure manager and the
/// configuration.
pub struct Core {
    pub repo: Repo,
    pub agents: AgentPool,
    pub procedures: Arc<drover_procedure::Manager>,
    pub config: OrchestratorConfig,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The sites' compute sides.
    pub hooks: crate::compute::Hooks,
}

impl Core {
    pub fn new(repo: Repo, config: OrchestratorConfig, procedures: Arc<drover_procedure::Manager>) -> Arc<Self> {
        let metrics = crate::metrics::Metrics::new();
        let repo = repo.with_metrics(metrics.clone());
        let hooks = crate::compute::Hooks::new(config.compute.clone(), config.tls_files().cloned());
        Arc::new(Self {
            agents: AgentPool::new(repo.clone(), config.clone()),
            repo,
            procedures,
            config,
            metrics,
            hooks,
        })
    }
}
