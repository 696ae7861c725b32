//! `drover backend`: backends, their agents' liveness and capabilities, freeze and thaw.

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::{Ctx, execution};
use crate::output::{Format, Table, backends, emit};

/// The built-in runbooks `drover backend failover` runs (also in `runbooks/`).
const FAILOVER: &str = include_str!("../../../../runbooks/backend-failover.yaml");
const FAILBACK: &str = include_str!("../../../../runbooks/backend-failback.yaml");

/// `drover backend …`
#[derive(Subcommand)]
pub enum BackendCmd {
    /// List backends, optionally of one site.
    List {
        #[arg(long, default_value = "")]
        site: String,
    },
    /// A backend with its agents' liveness and its capabilities.
    Show { name: String },
    /// Block management changes on a backend (Cinder's freeze-host).
    Freeze { name: String },
    /// Allow management changes again (Cinder's thaw-host).
    Thaw { name: String },
    /// Fail over every replicated group of a backend (Cinder's failover-host), or back
    /// with `--target default`; runs the built-in backend runbook and reports per group.
    Failover {
        name: String,
        /// The backend the groups replicate to, or `default` to fail back.
        #[arg(long)]
        target: String,
        /// The backend is lost: never wait on it.
        #[arg(long)]
        force: bool,
        /// Groups moved at once.
        #[arg(long, default_value_t = 10)]
        max_parallel: u32,
        /// Print the execution id and return.
        #[arg(long)]
        no_wait: bool,
    },
}

/// One row per group of a runbook report: what happened to it.
fn outcomes(report: &serde_json::Value) -> Table {
    let mut t = Table::new(&["TIER", "GROUP", "OUTCOME", "RPO", "RTO", "REASON"]);
    for g in report["groups"].as_array().into_iter().flatten() {
        let ms = |v: &serde_json::Value| match v.as_i64() {
            Some(n) if n >= 0 => format!("{:.1} s", n as f64 / 1000.0),
            _ => String::new(),
        };
        t.row(vec![
            g["tier"].to_string(),
            format!("{}/{}", g["project"].as_str().unwrap_or(""), g["group"].as_str().unwrap_or("")),
            g["outcome"].as_str().unwrap_or("").into(),
            ms(&g["rpo_ms"]),
            ms(&g["rto_ms"]),
            g["reason"].as_str().unwrap_or("").into(),
        ]);
    }
    let groups = report["groups"].as_array().cloned().unwrap_or_default();
    let count = |o: &str| groups.iter().filter(|g| g["outcome"] == o).count();
    t.footer(format!(
        "{}: {} groups succeeded, {} failed, {} skipped; full report: drover execution report {}",
        report["status"].as_str().unwrap_or(""),
        count("succeeded"),
        count("failed"),
        count("skipped"),
        report["execution_id"].as_str().unwrap_or("")
    ));
    t
}

/// Runs one backend command.
pub async fn run(ctx: &mut Ctx, cmd: BackendCmd) -> Result<()> {
    let sites = &mut ctx.api.sites;
    let one = match cmd {
        BackendCmd::List { site } => {
            let r = sites.list_backends(pb::ListBackendsRequest { site }).await?.into_inner();
            emit(ctx.fmt, &r, |r| backends(&r.backends));
            return Ok(());
        }
        BackendCmd::Show { name } => sites.get_backend(pb::GetBackendRequest { name }).await?,
        BackendCmd::Freeze { name } => sites.freeze_backend(pb::FreezeBackendRequest { name }).await?,
        BackendCmd::Thaw { name } => sites.thaw_backend(pb::ThawBackendRequest { name }).await?,
        BackendCmd::Failover { name, target, force, max_parallel, no_wait } => {
            let back = target == "default";
            if back && force {
                anyhow::bail!("--force fails over away from a lost backend; a failback (--target default) needs none");
            }
            let mut params = std::collections::HashMap::from([
                ("backend".to_string(), name.clone()),
                ("max_parallel".to_string(), max_parallel.to_string()),
            ]);
            if !back {
                params.insert("target".into(), target.clone());
                params.insert("force".into(), force.to_string());
            }
            let (file, text) = if back {
                ("runbooks/backend-failback.yaml (built in)", FAILBACK)
            } else {
                ("runbooks/backend-failover.yaml (built in)", FAILOVER)
            };
            let req = pb::RunbookRequest { file_name: file.into(), text: text.into(), params };
            let e = ctx.api.runbooks.run_runbook(req).await?.into_inner();
            if no_wait {
                emit(ctx.fmt, &e, execution::detail);
                return Ok(());
            }
            let done = execution::watch(ctx, &e.id, ctx.fmt == Format::Table).await?;
            let report = ctx
                .api
                .executions
                .get_execution_report(pb::GetExecutionReportRequest { id: done.id.clone(), format: "json".into() })
                .await?
                .into_inner();
            let report: serde_json::Value = serde_json::from_str(&report.text)?;
            emit(ctx.fmt, &report, outcomes);
            if done.status != "succeeded" {
                anyhow::bail!("backend failover {} {}: {}", done.id, done.status, done.error);
            }
            return Ok(());
        }
    };
    emit(ctx.fmt, one.get_ref(), |b| backends(std::slice::from_ref(b)));
    Ok(())
}
