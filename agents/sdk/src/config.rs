//! Agent configuration: a TOML file, then `DROVER_AGENT_*` environment variables and
//! command-line flags on top (the CLI applies those). See `config/agent.example.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mock::MockConfig;
use crate::qemu::QemuConfig;

/// Everything an agent needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Unique id of this agent process within its backend.
    pub agent_id: String,
    /// The failure domain this agent's backend is in.
    pub site: String,
    /// The backend this agent drives.
    pub backend: String,
    /// Address to serve drover.agent.v1 on; port 0 picks a free one.
    pub listen: String,
    /// Endpoint the orchestrator should dial; defaults to `http://<bound address>`.
    pub advertise: Option<String>,
    /// Orchestrator endpoint to register with; the agent only serves when unset.
    pub orchestrator: Option<String>,
    /// Where the agent keeps its fencing and idempotency ledger.
    pub state_dir: PathBuf,
    /// `qemu` (qemu-storage-daemon, the reference backend) or `mock` (control-plane
    /// tests only).
    pub driver: String,
    pub mock: MockConfig,
    pub qemu: QemuConfig,
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
            mock: MockConfig::default(),
            qemu: QemuConfig::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is malformed: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid agent config: {0}")]
    Invalid(String),
}

impl AgentConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Checks that the required fields are set and meaningful.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [("site", &self.site), ("backend", &self.backend), ("driver", &self.driver)] {
            if value.trim().is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "`{field}` is required (config file, DROVER_AGENT_{}, or --{field})",
                    field.to_uppercase()
                )));
            }
        }
        match self.driver.as_str() {
            "mock" => {}
            "qemu" if self.qemu.pool_dir.as_os_str().is_empty() => {
                return Err(ConfigError::Invalid(
                    "the qemu driver needs `qemu.pool_dir` (or --pool-dir / DROVER_AGENT_POOL_DIR)".into(),
                ));
            }
            "qemu" => {}
            other => return Err(ConfigError::Invalid(format!("unknown driver `{other}`; this build has: qemu, mock"))),
        }
        for (op, p) in &self.mock.fail {
            if !(0.0..=1.0).contains(p) {
                return Err(ConfigError::Invalid(format!("mock.fail.{op} = {p} is not a probability in [0, 1]")));
            }
        }
        Ok(())
    }
}
