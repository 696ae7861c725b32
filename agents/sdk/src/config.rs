//! The settings every agent has, whatever its backend. Each backend reads its own table
//! (`[qemu]`, `[mock]`, …) through [`drover_config::Layered::section`]. Layers: defaults <
//! file < `DROVER_AGENT_*` environment (nested keys joined with `__`) < flags. See
//! `config/agent.example.toml`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use drover_config::ConfigError;

/// The environment prefix of agent settings: `DROVER_AGENT_SITE`, `DROVER_AGENT_QEMU__POOL_DIR`.
pub const ENV_PREFIX: &str = "DROVER_AGENT_";

/// Everything an agent needs to start, apart from its backend's own table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentConfig {
    /// Unique id of this agent process within its backend; `<backend>-agent` when empty.
    pub agent_id: String,
    /// The failure domain this agent's backend is in.
    pub site: String,
    /// The backend this agent drives.
    pub backend: String,
    /// Address to serve drover.agent.v1 on; port 0 picks a free one.
    pub listen: String,
    /// Endpoint the orchestrator should dial; defaults to `https://<bound address>`
    /// (`http://` when insecure).
    pub advertise: Option<String>,
    /// Orchestrator endpoints to register with, comma-separated (orchestrators sharing
    /// one etcd); the agent only serves when unset or empty.
    pub orchestrator: Option<String>,
    /// Where the agent keeps its fencing and idempotency ledger (and its driver's state).
    pub state_dir: PathBuf,
    /// The backend driver, by name (`qemu`, `mock`, …): its table holds its settings.
    pub driver: String,
    /// Fenced on return: at start, hold writes on every group this side was primary for
    /// until an orchestrator confirms it still is (or demote it when the group was failed
    /// over away meanwhile). Only applies when `orchestrator` is set.
    pub fence_on_return: bool,
    /// TLS: the cluster's CA, and this agent's certificate and key (`drover certs init`).
    pub tls: drover_proto::tls::TlsFiles,
    /// Serve and call in plain text, for development only (logged as a warning).
    pub insecure: bool,
    /// Serve Prometheus metrics (`/metrics`) on this address; empty: off.
    pub metrics_listen: String,
    /// Append a line for each mutation admitted to run, before its driver call, to this
    /// file (see [`crate::oplog`]); unset or empty: off.
    pub op_log: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            agent_id: String::new(),
            site: String::new(),
            backend: String::new(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            orchestrator: None,
            state_dir: PathBuf::from("/var/lib/drover/agent"),
            driver: String::new(),
            fence_on_return: true,
            tls: Default::default(),
            insecure: false,
            metrics_listen: String::new(),
            op_log: None,
        }
    }
}

impl AgentConfig {
    /// The TLS files to use, or none in plain-text (`insecure`) mode.
    pub fn tls_files(&self) -> Option<&drover_proto::tls::TlsFiles> {
        (!self.insecure).then_some(&self.tls)
    }

    /// Checks that the required fields are set and that the driver is one this build has.
    pub fn validate(&mut self, drivers: &[&str]) -> Result<(), ConfigError> {
        for (field, value) in [("site", &self.site), ("backend", &self.backend), ("driver", &self.driver)] {
            if value.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "`{field}` is required (config file, {ENV_PREFIX}{}, or --{field})",
                    field.to_uppercase()
                )));
            }
        }
        if !drivers.contains(&self.driver.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "unknown driver `{}`; this build has: {}",
                self.driver,
                drivers.join(", ")
            )));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "`listen` = {:?} is not an address like 127.0.0.1:7800",
                self.listen
            )));
        }
        self.tls.required(self.insecure, "agent").map_err(ConfigError::Invalid)?;
        if self.agent_id.is_empty() {
            self.agent_id = format!("{}-agent", self.backend);
        }
        if self.orchestrator.as_deref() == Some("") {
            self.orchestrator = None;
        }
        if self.op_log.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            self.op_log = None;
        }
        Ok(())
    }
}
