//! Orchestrator configuration: a TOML file, then `DROVER_*` environment variables, then
//! command-line flags (the CLI applies the last two). See `config/orchestrator.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which store holds the orchestrator's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Durable single-node store in one file (the default).
    Embedded,
    /// An etcd cluster (production and HA).
    Etcd,
}

/// Store settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The embedded store's file.
    pub path: PathBuf,
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix.
    pub prefix: String,
    /// Deadline of each store call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Embedded,
            path: PathBuf::from("/var/lib/drover/orchestrator.redb"),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/drover/v1/".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Everything the orchestrator needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// Address to serve drover.v1 on; port 0 picks a free one.
    pub listen: String,
    pub store: StoreConfig,
    /// TTL of an agent's registration lease.
    #[serde(with = "humantime_serde")]
    pub agent_lease_ttl: Duration,
    /// Deadline of ordinary agent calls.
    #[serde(with = "humantime_serde")]
    pub agent_call_timeout: Duration,
    /// Deadline of calls to the side being failed away from: short, so a dead site never
    /// holds up a failover.
    #[serde(with = "humantime_serde")]
    pub failed_site_timeout: Duration,
    /// Deadline of liveness probes.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Deadline of a recovery point sync (initial full copies of large volumes take long).
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
    /// How many volumes of one group are driven at once.
    pub volume_parallelism: usize,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".into(),
            store: StoreConfig::default(),
            agent_lease_ttl: Duration::from_secs(10),
            agent_call_timeout: Duration::from_secs(30),
            failed_site_timeout: Duration::from_secs(3),
            probe_timeout: Duration::from_secs(2),
            sync_timeout: Duration::from_secs(30 * 60),
            volume_parallelism: 8,
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
    #[error("invalid orchestrator config: {0}")]
    Invalid(String),
}

impl OrchestratorConfig {
    /// Reads a TOML config file; unknown keys are errors, so typos do not pass silently.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "`listen` = {:?} is not an address like 127.0.0.1:7700",
                self.listen
            )));
        }
        if self.store.kind == StoreKind::Etcd && self.store.endpoints.is_empty() {
            return Err(ConfigError::Invalid("`store.endpoints` must list at least one etcd endpoint".into()));
        }
        if !self.store.prefix.starts_with('/') || !self.store.prefix.ends_with('/') {
            return Err(ConfigError::Invalid(format!(
                "`store.prefix` = {:?} must start and end with /",
                self.store.prefix
            )));
        }
        if self.agent_lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::Invalid("`agent_lease_ttl` must be at least 2s".into()));
        }
        if self.volume_parallelism == 0 {
            return Err(ConfigError::Invalid("`volume_parallelism` must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_file_names_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n[store\nkind = \"etcd\"\n").unwrap();
        let err = OrchestratorConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:1\"\n").unwrap();
        let err = OrchestratorConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        let cfg = OrchestratorConfig { volume_parallelism: 0, ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("volume_parallelism"));
        std::fs::write(&path, "[store]\nkind = \"etcd\"\ntimeout = \"2s\"\n").unwrap();
        let cfg = OrchestratorConfig::from_file(&path).unwrap();
        assert_eq!((cfg.store.kind, cfg.store.timeout), (StoreKind::Etcd, Duration::from_secs(2)));
    }
}
