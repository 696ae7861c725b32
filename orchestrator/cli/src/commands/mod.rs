//! Client commands, one module per resource. Each turns its arguments into drover.v1
//! requests and prints the answers as a table or JSON.

pub mod adopt;
pub mod backend;
pub mod certs;
pub mod execution;
pub mod group;
pub mod group_type;
pub mod message;
pub mod project;
pub mod runbook;
pub mod site;
pub mod snapshot;
pub mod token;
pub mod volume;

use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::Args;
use drover_proto::v1 as pb;

use crate::client::Clients;
use crate::output::{Format, Table, emit};

/// Flags every client command takes (before or after its subcommand).
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Orchestrator endpoint; several of one cluster, comma-separated, are used in turn
    /// (any one of them may be down).
    #[arg(long, global = true, env = "DROVER_ENDPOINT", default_value = "https://127.0.0.1:7700")]
    pub endpoint: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Format,
    /// Project (tenant) that owns the volumes and groups.
    #[arg(long, global = true, env = "DROVER_PROJECT", default_value = "admin")]
    pub project: String,
    /// File holding the API token (`drover token create` prints one; the orchestrator
    /// writes the bootstrap admin token to its `auth.token_file`). Without it the token
    /// comes from DROVER_TOKEN, else from ~/.config/drover/token if that exists.
    #[arg(long, global = true, env = "DROVER_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// The cluster's CA certificate, to check an `https://` orchestrator by (`drover
    /// certs init` writes it as ca.pem).
    #[arg(long, global = true, env = "DROVER_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Deadline of each API call, e.g. 30s or 5m.
    #[arg(long, global = true, env = "DROVER_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl ClientArgs {
    /// The API token: `--token-file`, else `DROVER_TOKEN`, else `~/.config/drover/token`.
    pub fn token(&self) -> Result<Option<String>> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map(|t| t.trim().to_string()).map_err(|e| {
                anyhow!("cannot read the token file {}: {e}; check --token-file / DROVER_TOKEN_FILE", p.display())
            })
        };
        if let Some(p) = &self.token_file {
            return read(p).map(Some);
        }
        if let Ok(t) = std::env::var("DROVER_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_string()));
        }
        match std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".config/drover/token")) {
            Some(p) if p.exists() => read(&p).map(Some),
            _ => Ok(None),
        }
    }
}

/// What a client command needs: the API clients, the output format and the project.
pub struct Ctx {
    pub api: Clients,
    pub fmt: Format,
    pub project: String,
}

impl Ctx {
    /// Connects to the orchestrator named by `args`.
    pub async fn connect(args: &ClientArgs) -> Result<Self> {
        let token = args.token()?;
        let api = Clients::connect(&args.endpoint, args.timeout, token.as_deref(), args.ca_file.as_deref())
            .await
            .map_err(|e| anyhow!(e))?;
        Ok(Self { api, fmt: args.output, project: args.project.clone() })
    }
}

/// The `--interval` of an enable as whole seconds (0: not given, the server's default of
/// 30 s). A value the API cannot carry is refused instead of rounded.
pub fn interval_seconds(interval: Option<Duration>) -> Result<i64> {
    let Some(d) = interval else { return Ok(0) };
    if d.is_zero() {
        anyhow::bail!("--interval 0 is not an interval; omit --interval for the default (30s)");
    }
    if d.subsec_nanos() != 0 {
        anyhow::bail!(
            "--interval {} is not whole seconds; recovery points are taken at most once a second (use 1s or more)",
            humantime::format_duration(d)
        );
    }
    Ok(d.as_secs() as i64)
}

/// `drover version`.
pub async fn version(ctx: &mut Ctx) -> Result<()> {
    let v = ctx.api.version.get_version(pb::GetVersionRequest {}).await?.into_inner();
    emit(ctx.fmt, &v, |v| {
        let mut t = Table::new(&["CLIENT", "SERVER", "API (SERVER)", "API (CLIENT)"]);
        t.row(vec![
            env!("CARGO_PKG_VERSION").into(),
            v.server_version.clone(),
            format!("{} to {}", v.min_api_version, v.max_api_version),
            drover_proto::API_VERSION.into(),
        ]);
        t
    });
    Ok(())
}

/// Prints a one-column table naming what was deleted, or its JSON.
pub fn deleted(fmt: Format, what: &str, id: &str) {
    emit(fmt, &serde_json::json!({ "deleted": id }), |_| {
        let mut t = Table::new(&["DELETED"]);
        t.row(vec![format!("{what} {id}")]);
        t
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::interval_seconds;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any duration text the flag parser takes, and any duration: no panic, and an
        /// accepted interval is the same whole number of seconds.
        #[test]
        fn any_interval_is_judged_without_panic(text in ".{0,24}", secs in 0u64..200_000, nanos in 0u32..1_000_000_000) {
            if let Ok(d) = humantime::parse_duration(&text) {
                let _ = interval_seconds(Some(d));
            }
            let d = Duration::new(secs, nanos);
            if let Ok(s) = interval_seconds(Some(d)) {
                proptest::prop_assert!(s as u64 == secs && nanos == 0 && secs > 0);
            }
        }
    }

    #[test]
    fn intervals_are_whole_seconds_or_refused() {
        assert_eq!(interval_seconds(None).unwrap(), 0, "not given: the server's default");
        assert_eq!(interval_seconds(Some(Duration::from_secs(90))).unwrap(), 90);
        for bad in [Duration::ZERO, Duration::from_millis(1), Duration::from_millis(500), Duration::from_millis(1500)] {
            let e = interval_seconds(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("--interval"), "{e}");
        }
    }
}
