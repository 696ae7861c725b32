//! Layered configuration, shared by the orchestrator and every agent.
//!
//! A value comes from the first of these that sets it, last listed wins:
//! 1. the program's defaults (`Default` of its config type);
//! 2. a TOML file (`--config FILE`);
//! 3. environment variables: `<PREFIX><KEY>`, nested keys joined with `__`, for example
//!    `DROVER_STORE__KIND=etcd` for `[store] kind` (values parse as TOML-like scalars:
//!    `10s` stays a string, `8` is a number, `[a, b]` is a list);
//! 4. flags: the program's named flags and `--set KEY=VALUE` (KEY dotted, `store.kind`).
//!
//! [figment](https://docs.rs/figment) does the merging and keeps, for every value, which
//! layer it came from, so errors and `--print-config` name the file or variable.
//! Environment variables are read only for the program's own top-level keys: the client
//! and the servers share the `DROVER_` prefix, and a client variable such as
//! `DROVER_ENDPOINT` must not make a server refuse to start.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod fields;

pub use fields::field_names;

/// A configuration that cannot be used. Every message names where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("unknown config key `{key}` (from {origin}); known keys: {known}")]
    UnknownKey { key: String, origin: String, known: String },
    #[error("flag `--set {0}` is not KEY=VALUE (for example --set store.kind=etcd)")]
    BadOverride(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn parse_error(e: figment::Error, file: Option<&Path>) -> ConfigError {
    // figment names the key and the layer; a TOML syntax error names only the line, so
    // add the file.
    let text = e.to_string();
    match file {
        Some(f) if !text.contains(&f.display().to_string()) => {
            ConfigError::Parse(format!("config file {}: {text}", f.display()))
        }
        _ => ConfigError::Parse(text),
    }
}

/// A provider under a name of ours, so [`Layered::origin`] can tell defaults from flags.
struct Named<P>(&'static str, P);

impl<P: figment::Provider> figment::Provider for Named<P> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.0)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.1.data()
    }
}

/// What a program reads its configuration from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any. A file that does not exist is an error.
    pub file: Option<PathBuf>,
    /// Environment prefix, e.g. `DROVER_` or `DROVER_AGENT_`; empty reads no environment.
    pub env_prefix: String,
    /// Flag overrides as (dotted key, value), applied in order.
    pub overrides: Vec<(String, Flag)>,
}

/// A value given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Flag {
    /// From `--set KEY=VALUE`: parsed like an environment value (`8` is a number,
    /// `true` a boolean, `[a, b]` a list, anything else a string).
    Parsed(String),
    /// From a named string flag (`--listen`): always a string.
    Text(String),
    /// From a named list flag (`--etcd-endpoints a,b`).
    List(Vec<String>),
}

impl Sources {
    /// Adds `--set KEY=VALUE` overrides.
    pub fn with_sets(mut self, sets: &[String]) -> Result<Self, ConfigError> {
        for s in sets {
            let (k, v) = s.split_once('=').ok_or_else(|| ConfigError::BadOverride(s.clone()))?;
            if k.trim().is_empty() {
                return Err(ConfigError::BadOverride(s.clone()));
            }
            self.overrides.push((k.trim().to_string(), Flag::Parsed(v.to_string())));
        }
        Ok(self)
    }

    /// Adds a named string flag's value under `key`, if the flag was given.
    pub fn flag(mut self, key: &str, value: Option<impl std::fmt::Display>) -> Self {
        if let Some(v) = value {
            self.overrides.push((key.to_string(), Flag::Text(v.to_string())));
        }
        self
    }

    /// Sets the boolean `key` to true when a switch flag (`--insecure`) was given.
    pub fn switch(mut self, key: &str, on: bool) -> Self {
        if on {
            self.overrides.push((key.to_string(), Flag::Parsed("true".into())));
        }
        self
    }

    /// Adds a named list flag's values under `key`, if any were given.
    pub fn flag_list(mut self, key: &str, values: &[String]) -> Self {
        if !values.is_empty() {
            self.overrides.push((key.to_string(), Flag::List(values.to_vec())));
        }
        self
    }
}

/// The merged layers of one program's configuration.
pub struct Layered {
    figment: Figment,
    file: Option<PathBuf>,
    env_prefix: String,
}

impl Layered {
    /// Merges defaults < file < environment < overrides. `T` is the program's config
    /// type: its default is the lowest layer and its field names are the top-level keys
    /// the environment may set; `sections` are further top-level tables owned by someone
    /// else (a backend's section of the agent config).
    pub fn load<T: Serialize + Default + DeserializeOwned>(
        sources: &Sources,
        sections: &[&str],
    ) -> Result<Self, ConfigError> {
        let mut keys: Vec<String> = field_names::<T>().iter().map(|s| s.to_string()).collect();
        keys.extend(sections.iter().map(|s| s.to_string()));
        let mut figment = Figment::from(Named("default", Serialized::defaults(T::default())));
        if let Some(path) = &sources.file {
            // figment treats a missing file as empty; a named file must exist.
            std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        if !sources.env_prefix.is_empty() {
            // figment's value parser slices strings by char index at a backslash, and
            // panics on non-ASCII text before one: such a variable is refused instead.
            for (name, value) in std::env::vars_os() {
                let (name, value) = (name.to_string_lossy().into_owned(), value.to_string_lossy().into_owned());
                if name.starts_with(&sources.env_prefix) && !trusted_text(&value) {
                    return Err(ConfigError::Invalid(format!(
                        "environment variable {name} holds non-ASCII text with a backslash, which cannot be read; \
                         set it in the config file instead"
                    )));
                }
            }
            let env_keys = keys.clone();
            figment = figment.merge(
                Env::prefixed(&sources.env_prefix)
                    .filter(move |k| {
                        let top = k.as_str().split("__").next().unwrap_or_default().to_ascii_lowercase();
                        env_keys.contains(&top)
                    })
                    .split("__"),
            );
        }
        for (key, flag) in &sources.overrides {
            let value: figment::value::Value = match flag {
                Flag::Parsed(raw) => parse_value(raw),
                Flag::Text(text) => text.as_str().into(),
                Flag::List(items) => {
                    items.iter().map(|i| figment::value::Value::from(i.as_str())).collect::<Vec<_>>().into()
                }
            };
            figment = figment.merge(Named("flag", Serialized::default(key, value)));
        }
        let layered = Self { figment, file: sources.file.clone(), env_prefix: sources.env_prefix.clone() };
        layered.refuse_unknown_keys(&keys)?;
        Ok(layered)
    }

    fn refuse_unknown_keys(&self, known: &[String]) -> Result<(), ConfigError> {
        let dict = self.figment.data().map_err(|e| parse_error(e, self.file.as_deref()))?;
        for profile in dict.values() {
            for key in profile.keys() {
                if !known.iter().any(|k| k == key) {
                    return Err(ConfigError::UnknownKey {
                        key: key.clone(),
                        origin: self.origin(key),
                        known: known.join(", "),
                    });
                }
            }
        }
        Ok(())
    }

    /// The program's own settings (sections owned by others are ignored here).
    pub fn extract<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.figment.extract().map_err(|e| parse_error(e, self.file.as_deref()))
    }

    /// One top-level table, e.g. a backend's `[qemu]` section; absent means all defaults.
    pub fn section<T: DeserializeOwned + Default>(&self, name: &str) -> Result<T, ConfigError> {
        if self.figment.find_value(name).is_err() {
            return Ok(T::default());
        }
        self.figment.extract_inner(name).map_err(|e| parse_error(e, self.file.as_deref()))
    }

    /// Where the value at dotted `key` came from: "default", "flag", the file, or the
    /// environment variable.
    pub fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            None => "default".into(),
            Some(m) => match &m.source {
                Some(figment::Source::File(p)) => format!("file {}", p.display()),
                _ if m.name.contains("environment") => {
                    format!("environment variable {}{}", self.env_prefix, key.replace('.', "__").to_uppercase())
                }
                _ => m.name.to_string(),
            },
        }
    }

    /// The merged configuration as JSON, each leaf beside its origin: what
    /// `--print-config` shows.
    pub fn explain(&self) -> Result<serde_json::Value, ConfigError> {
        let value: serde_json::Value = self.extract()?;
        let mut origins = serde_json::Map::new();
        let mut stack: Vec<(String, &serde_json::Value)> = vec![(String::new(), &value)];
        while let Some((prefix, v)) = stack.pop() {
            match v {
                serde_json::Value::Object(map) if !map.is_empty() => {
                    for (k, child) in map {
                        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        stack.push((path, child));
                    }
                }
                _ => {
                    origins.insert(prefix.clone(), self.origin(&prefix).into());
                }
            }
        }
        Ok(serde_json::json!({ "config": value, "origins": origins }))
    }
}

/// Whether figment's value parser can read `text` without panicking: it indexes a string
/// by char position at a backslash, which breaks on multi-byte characters before it.
fn trusted_text(text: &str) -> bool {
    text.is_ascii() || !text.contains('\\')
}

/// A `--set` value: a number, boolean, array or quoted string as figment reads them, else
/// the text itself.
fn parse_value(raw: &str) -> figment::value::Value {
    if !trusted_text(raw) {
        return raw.into();
    }
    raw.parse().unwrap_or_else(|_| raw.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        depth: u32,
        names: Vec<String>,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Conf {
        listen: String,
        inner: Inner,
    }

    /// figment's parser panicked on this (found by the orchestrator's config property
    /// test): a multi-byte character before a backslash in a quoted `--set` value.
    #[test]
    fn a_set_value_with_non_ascii_text_before_a_backslash_is_read_as_text() {
        let raw = "\"\u{f3bf4}3\\x\"";
        let sources = Sources::default().with_sets(&[format!("listen={raw}")]).unwrap();
        let layered = Layered::load::<Conf>(&sources, &[]).unwrap();
        let conf: Conf = layered.extract().unwrap();
        assert_eq!(conf.listen, raw);
        assert!(trusted_text("plain \\ ascii") && trusted_text("caf\u{e9}") && !trusted_text("\u{e9}\\"));
    }

    #[test]
    fn field_names_come_from_the_type() {
        assert_eq!(field_names::<Conf>(), &["listen", "inner"]);
        assert!(field_names::<u32>().is_empty());
    }

    #[test]
    fn flags_beat_the_file_and_report_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"file\"\n[inner]\ndepth = 2\n").unwrap();
        let sources =
            Sources { file: Some(path.clone()), env_prefix: "DROVER_CONFIG_TEST_NOPE_".into(), ..Default::default() }
                .with_sets(&["inner.depth=7".into()])
                .unwrap()
                .flag_list("inner.names", &["a:1".into(), "b".into()]);
        let l = Layered::load::<Conf>(&sources, &[]).unwrap();
        let c: Conf = l.extract().unwrap();
        assert_eq!(c, Conf { listen: "file".into(), inner: Inner { depth: 7, names: vec!["a:1".into(), "b".into()] } });
        assert_eq!(l.origin("inner.depth"), "flag");
        assert_eq!(l.origin("listen"), format!("file {}", path.display()));
        assert_eq!(l.explain().unwrap()["origins"]["inner.depth"], "flag");
    }

    #[test]
    fn unknown_keys_missing_files_and_bad_sets_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let sources = Sources { file: Some(path), ..Default::default() };
        let err = Layered::load::<Conf>(&sources, &[]).err().unwrap().to_string();
        assert!(err.contains("unknown config key `lisen`") && err.contains("c.toml"), "{err}");
        let missing = Sources { file: Some(dir.path().join("nope.toml")), ..Default::default() };
        assert!(Layered::load::<Conf>(&missing, &[]).err().unwrap().to_string().contains("nope.toml"));
        assert!(Sources::default().with_sets(&["=1".into()]).is_err());
        let nested = Sources::default().with_sets(&["inner.dpth=1".into()]).unwrap();
        let err = Layered::load::<Conf>(&nested, &[]).unwrap().extract::<Conf>().unwrap_err().to_string();
        assert!(err.contains("dpth"), "{err}");
    }

    #[test]
    fn sections_default_when_absent() {
        let l = Layered::load::<Conf>(&Sources::default(), &["extra"]).unwrap();
        let inner: Inner = l.section("extra").unwrap();
        assert_eq!(inner, Inner::default());
    }
}
