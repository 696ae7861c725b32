//! Orchestrator configuration: defaults < a TOML file < `DROVER_*` environment variables
//! (nested keys joined with `__`) < flags, merged by `drover-config`. Per-backend settings
//! live in `[defaults]` and may be overridden in `[backends.<name>]`. See
//! `config/orchestrator.example.toml`.

use std::collections::BTreeMap;
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

impl StoreKind {
    /// The lowercase name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Etcd => "etcd",
        }
    }
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
    /// etcd: revisions of history kept when the orchestrator compacts etcd; 0 never
    /// compacts (an etcd shared with others, compacted by its operator).
    pub history_revisions: i64,
    /// etcd: how often the orchestrator compacts etcd's history.
    #[serde(with = "humantime_serde")]
    pub compaction_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Embedded,
            path: PathBuf::from("/var/lib/drover/orchestrator.redb"),
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/drover/v1/".into(),
            timeout: Duration::from_secs(5),
            history_revisions: 50_000,
            compaction_interval: Duration::from_secs(300),
        }
    }
}

/// Settings that may differ per backend: `[defaults]` holds them for every backend, and
/// `[backends.<name>]` overrides any of them for one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendSettings {
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
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            agent_call_timeout: Duration::from_secs(30),
            failed_site_timeout: Duration::from_secs(3),
            probe_timeout: Duration::from_secs(2),
            sync_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// One backend's overrides of [`BackendSettings`]; unset fields inherit `[defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendOverrides {
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub agent_call_timeout: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub failed_site_timeout: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub sync_timeout: Option<Duration>,
}

/// Everything the orchestrator needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct OrchestratorConfig {
    /// Address to serve drover.v1 on; port 0 picks a free one.
    pub listen: String,
    pub store: StoreConfig,
    /// TTL of an agent's registration lease.
    #[serde(with = "humantime_serde")]
    pub agent_lease_ttl: Duration,
    /// How many volumes of one group are driven at once.
    pub volume_parallelism: usize,
    /// How long a failover, failback, enable or disable runs its agent calls again while
    /// they fail for a cause that may pass (an agent restarting, a connection lost) before
    /// it stops with its volumes in error. 0s: stop at the first such failure.
    #[serde(with = "humantime_serde")]
    pub move_patience: Duration,
    /// TTL of the lease behind this orchestrator's claims on executions: how soon after
    /// it dies another orchestrator resumes its work.
    #[serde(with = "humantime_serde")]
    pub owner_lease_ttl: Duration,
    /// Per-backend settings every backend inherits.
    pub defaults: BackendSettings,
    /// Per-backend overrides of `defaults`, by backend name.
    pub backends: BTreeMap<String, BackendOverrides>,
    /// API tokens and the audit trail.
    pub auth: AuthConfig,
    /// How long a user message is kept after it last happened.
    #[serde(with = "humantime_serde")]
    pub message_retention: Duration,
    /// How long an execution is kept after it ended (its record, report and items).
    #[serde(with = "humantime_serde")]
    pub execution_retention: Duration,
    /// How long a group's history events are kept (its newest 50 are always kept).
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
    /// TLS: the CA, and this orchestrator's certificate and key (`drover certs init`).
    pub tls: drover_proto::tls::TlsFiles,
    /// Serve and call in plain text, for development only (logged as a warning).
    pub insecure: bool,
    /// Serve Prometheus metrics (`/metrics`) on this address; empty: off.
    pub metrics_listen: String,
    /// Serve the web dashboard on this address (plain HTTP; loopback only when TLS is
    /// configured); empty: off.
    pub dashboard_listen: String,
    /// How each site's compute side is reached, by site name (`[compute.site-a]`):
    /// docs/compute.md.
    pub compute: BTreeMap<String, crate::compute::ComputeSite>,
}

/// API tokens and the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The bootstrap admin token. On the first start of a deployment (no bootstrap token
    /// in the store yet) the orchestrator creates one and writes it here, readable only
    /// by its user. A token already in this file is registered as the bootstrap admin
    /// token instead, so several orchestrators can be given one file.
    pub token_file: PathBuf,
    /// How long a verified token is trusted without reading the store again (the delay
    /// before a revocation takes effect).
    #[serde(with = "humantime_serde")]
    pub token_cache_ttl: Duration,
    /// How long audit records are kept.
    #[serde(with = "humantime_serde")]
    pub audit_retention: Duration,
    /// Mutating calls a project's non-admin tokens may make per second on one
    /// orchestrator (a token bucket; admins are not limited).
    pub tenant_mutations_per_second: u32,
    /// How many such calls may come at once before the rate applies.
    pub tenant_mutation_burst: u32,
    /// Executions of one project that may run at once before a tenant's next change is
    /// refused (admins are not limited).
    pub tenant_max_running_executions: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_file: PathBuf::from("/var/lib/drover/admin.token"),
            token_cache_ttl: Duration::from_secs(2),
            audit_retention: Duration::from_secs(90 * 24 * 3600),
            tenant_mutations_per_second: 10,
            tenant_mutation_burst: 20,
            tenant_max_running_executions: 16,
        }
    }
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7700".into(),
            store: StoreConfig::default(),
            agent_lease_ttl: Duration::from_secs(10),
            volume_parallelism: 8,
            move_patience: Duration::from_secs(60),
            owner_lease_ttl: Duration::from_secs(10),
            defaults: BackendSettings::default(),
            backends: BTreeMap::new(),
            auth: AuthConfig::default(),
            message_retention: Duration::from_secs(30 * 24 * 3600),
            history_retention: Duration::from_secs(365 * 24 * 3600),
            execution_retention: Duration::from_secs(90 * 24 * 3600),
            tls: Default::default(),
            insecure: false,
            metrics_listen: String::new(),
            dashboard_listen: String::new(),
            compute: BTreeMap::new(),
        }
    }
}

/// The environment prefix of orchestrator settings: `DROVER_LISTEN`, `DROVER_STORE__KIND`.
pub const ENV_PREFIX: &str = "DROVER_";

pub use drover_config::ConfigError;

impl OrchestratorConfig {
    /// Reads the layers (defaults < file < environment < flags) and validates the result.
    pub fn load(sources: &drover_config::Sources) -> Result<(Self, drover_config::Layered), ConfigError> {
        let layered = drover_config::Layered::load::<Self>(sources, &[])?;
        let config: Self = layered.extract()?;
        config.validate()?;
        Ok((config, layered))
    }

    /// Reads a TOML file alone (defaults below it); unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let sources = drover_config::Sources { file: Some(path.to_path_buf()), ..Default::default() };
        Ok(Self::load(&sources)?.0)
    }

    /// The TLS files to use, or none in plain-text (`insecure`) mode.
    pub fn tls_files(&self) -> Option<&drover_proto::tls::TlsFiles> {
        (!self.insecure).then_some(&self.tls)
    }

    /// The scheme of this orchestrator's endpoints.
    pub fn scheme(&self) -> &'static str {
        if self.insecure { "http" } else { "https" }
    }

    /// The settings of one backend: its overrides over `[defaults]`.
    pub fn backend(&self, name: &str) -> BackendSettings {
        let mut s = self.defaults.clone();
        if let Some(o) = self.backends.get(name) {
            s.agent_call_timeout = o.agent_call_timeout.unwrap_or(s.agent_call_timeout);
            s.failed_site_timeout = o.failed_site_timeout.unwrap_or(s.failed_site_timeout);
            s.probe_timeout = o.probe_timeout.unwrap_or(s.probe_timeout);
            s.sync_timeout = o.sync_timeout.unwrap_or(s.sync_timeout);
        }
        s
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
        if self.store.history_revisions < 0 {
            return Err(ConfigError::Invalid(format!(
                "`store.history_revisions` = {} must be 0 (never compact) or more",
                self.store.history_revisions
            )));
        }
        if self.store.compaction_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid("`store.compaction_interval` must be at least 1s".into()));
        }
        if self.agent_lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::Invalid("`agent_lease_ttl` must be at least 2s".into()));
        }
        if self.owner_lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::Invalid("`owner_lease_ttl` must be at least 2s".into()));
        }
        self.tls.required(self.insecure, "orchestrator").map_err(ConfigError::Invalid)?;
        if self.auth.tenant_mutations_per_second == 0 || self.auth.tenant_mutation_burst == 0 {
            return Err(ConfigError::Invalid(
                "`auth.tenant_mutations_per_second` and `auth.tenant_mutation_burst` must be at least 1".into(),
            ));
        }
        for (site, c) in &self.compute {
            c.validate(site).map_err(ConfigError::Invalid)?;
        }
        if self.volume_parallelism == 0 {
            return Err(ConfigError::Invalid("`volume_parallelism` must be at least 1".into()));
        }
        for name in std::iter::once("defaults").chain(self.backends.keys().map(String::as_str)) {
            let s = if name == "defaults" { self.defaults.clone() } else { self.backend(name) };
            for (key, d) in [
                ("agent_call_timeout", s.agent_call_timeout),
                ("failed_site_timeout", s.failed_site_timeout),
                ("probe_timeout", s.probe_timeout),
                ("sync_timeout", s.sync_timeout),
            ] {
                if d.is_zero() {
                    let table = if name == "defaults" { "defaults".to_string() } else { format!("backends.{name}") };
                    return Err(ConfigError::Invalid(format!("`{table}.{key}` must be longer than 0s")));
                }
            }
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
        let cfg = OrchestratorConfig { volume_parallelism: 0, insecure: true, ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("volume_parallelism"));
        // TLS is required unless plain text is asked for, and the error says how to get it.
        let err = OrchestratorConfig::default().validate().unwrap_err().to_string();
        assert!(err.contains("tls.ca") && err.contains("drover certs init") && err.contains("--insecure"), "{err}");
        std::fs::write(&path, "insecure = true\n[store]\nkind = \"etcd\"\ntimeout = \"2s\"\n").unwrap();
        let cfg = OrchestratorConfig::from_file(&path).unwrap();
        assert_eq!((cfg.store.kind, cfg.store.timeout), (StoreKind::Etcd, Duration::from_secs(2)));
    }
}

#[cfg(test)]
mod layering_tests {
    use super::*;

    #[test]
    fn backend_tables_inherit_defaults_and_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.toml");
        std::fs::write(
            &path,
            "insecure = true\n[defaults]\nagent_call_timeout = \"40s\"\nprobe_timeout = \"1s\"\n\
             [backends.slow]\nagent_call_timeout = \"2m\"\n",
        )
        .unwrap();
        let cfg = OrchestratorConfig::from_file(&path).unwrap();
        let slow = cfg.backend("slow");
        assert_eq!(slow.agent_call_timeout, Duration::from_secs(120));
        assert_eq!(slow.probe_timeout, Duration::from_secs(1), "unset keys inherit [defaults]");
        assert_eq!(cfg.backend("other").agent_call_timeout, Duration::from_secs(40));
        assert_eq!(cfg.backend("other").sync_timeout, BackendSettings::default().sync_timeout);

        std::fs::write(&path, "[backends.slow]\nagent_call_timout = \"2m\"\n").unwrap();
        let err = OrchestratorConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("agent_call_timout"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.toml");
        std::fs::write(&path, "insecure = true\n[store]\nkind = \"embedded\"\n").unwrap();
        let sources = drover_config::Sources { file: Some(path), ..Default::default() }
            .with_sets(&["store.kind=etcd".into(), "defaults.probe_timeout=5s".into()])
            .unwrap();
        let (cfg, layered) = OrchestratorConfig::load(&sources).unwrap();
        assert_eq!(cfg.store.kind, StoreKind::Etcd);
        assert_eq!(cfg.defaults.probe_timeout, Duration::from_secs(5));
        assert_eq!(layered.origin("store.kind"), "flag");
        assert_eq!(layered.origin("listen"), "default");
        let bad = drover_config::Sources::default().with_sets(&["store.kind".into()]).unwrap_err();
        assert!(bad.to_string().contains("KEY=VALUE"), "{bad}");
    }

    #[test]
    fn etcd_compaction_settings_are_checked() {
        let mut cfg = OrchestratorConfig { insecure: true, ..Default::default() };
        assert_eq!((cfg.store.history_revisions, cfg.store.compaction_interval), (50_000, Duration::from_secs(300)));
        cfg.store.history_revisions = -1;
        assert!(cfg.validate().unwrap_err().to_string().contains("history_revisions"));
        cfg.store.history_revisions = 0;
        cfg.store.compaction_interval = Duration::from_millis(10);
        assert!(cfg.validate().unwrap_err().to_string().contains("compaction_interval"));
        cfg.store.compaction_interval = Duration::from_secs(1);
        cfg.validate().unwrap();
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Any file text, and any `--set` value for a few typed keys: the loader answers
        /// (a config or an error naming the problem) without panicking.
        #[test]
        fn any_config_text_loads_or_is_refused_without_panic(
            text in "(?s).{0,300}",
            key in proptest::sample::select(vec!["listen", "agent_lease_ttl", "volume_parallelism", "store.kind", "auth.token_cache_ttl", "insecure", "defaults.probe_timeout"]),
            value in ".{0,40}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.toml");
            std::fs::write(&path, &text).unwrap();
            let _ = OrchestratorConfig::from_file(&path);
            let sources = drover_config::Sources::default().with_sets(&[format!("{key}={value}")]);
            if let Ok(sources) = sources
                && let Err(e) = OrchestratorConfig::load(&sources)
            {
                proptest::prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
