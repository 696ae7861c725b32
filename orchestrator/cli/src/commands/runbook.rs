//! `drover runbook`: validate, plan and run runbooks (YAML files, see runbooks/README.md).

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::{Ctx, execution};
use crate::output::{Format, Table, emit};

/// `drover runbook …`
#[derive(Subcommand)]
pub enum RunbookCmd {
    /// Check a runbook file (no server state is read; missing parameters get placeholders).
    Validate {
        file: PathBuf,
        /// A parameter, NAME=VALUE; repeat for more.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// A dry run: each step's groups (or backends) in order, with what each would do.
    Plan {
        file: PathBuf,
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Run a runbook: shows the plan, asks to go on (unless --yes), then follows it.
    Run {
        file: PathBuf,
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Do not ask before running.
        #[arg(long)]
        yes: bool,
        /// Print the execution id and return.
        #[arg(long)]
        no_wait: bool,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

fn request(file: &PathBuf, params: Vec<(String, String)>) -> Result<pb::RunbookRequest> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read runbook {}", file.display()))?;
    let params: HashMap<String, String> = params.into_iter().collect();
    Ok(pb::RunbookRequest { file_name: file.display().to_string(), text, params })
}

/// The plan as a table: one row per item, steps in order.
pub fn plan_table(p: &pb::RunbookPlan) -> Table {
    let mut t = Table::new(&["STEP", "KIND", "TIER", "TARGET", "PREDICTED", "RPO NOW", "FINAL SYNC NOW"]);
    for s in &p.steps {
        if s.items.is_empty() {
            let mut row = vec![s.name.clone(), s.kind.clone()];
            row.resize(7, String::new());
            t.row(row);
        }
        for i in &s.items {
            t.row(vec![
                s.name.clone(),
                s.kind.clone(),
                if i.tier == 0 { String::new() } else { i.tier.to_string() },
                if i.project.is_empty() { i.name.clone() } else { format!("{}/{}", i.project, i.name) },
                i.predicted.clone(),
                if i.rpo_ms < 0 { String::new() } else { format!("{} ms", i.rpo_ms) },
                match (i.predicted_final_sync_bytes, i.predicted_final_sync_ms) {
                    (b, _) if b < 0 => String::new(),
                    (b, ms) if ms < 0 => format!("{} (time unknown)", crate::size::format_size(b)),
                    (b, ms) => format!("{} in ~{ms} ms", crate::size::format_size(b)),
                },
            ]);
        }
    }
    let params: Vec<String> = p.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    t.footer(format!("runbook {} ({})", p.name, params.join(" ")));
    t
}

/// Runs one runbook command.
pub async fn run(ctx: &mut Ctx, cmd: RunbookCmd) -> Result<()> {
    match cmd {
        RunbookCmd::Validate { file, params } => {
            let p = ctx.api.runbooks.validate_runbook(request(&file, params)?).await?.into_inner();
            emit(ctx.fmt, &p, |p| {
                let mut t = plan_table(p);
                t.footer(format!("{} is valid", file.display()));
                t
            });
        }
        RunbookCmd::Plan { file, params } => {
            let p = ctx.api.runbooks.plan_runbook(request(&file, params)?).await?.into_inner();
            emit(ctx.fmt, &p, plan_table);
        }
        RunbookCmd::Run { file, params, yes, no_wait } => {
            let req = request(&file, params)?;
            if !yes {
                let p = ctx.api.runbooks.plan_runbook(req.clone()).await?.into_inner();
                if !std::io::stdin().is_terminal() {
                    bail!("`drover runbook run` asks before it acts; without a terminal, give --yes");
                }
                eprint!("{}", plan_table(&p).render());
                eprint!("run this plan? [y/N] ");
                std::io::stderr().flush()?;
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("not run");
                }
            }
            let e = ctx.api.runbooks.run_runbook(req).await?.into_inner();
            if no_wait {
                emit(ctx.fmt, &e, execution::detail);
                return Ok(());
            }
            let done = execution::watch(ctx, &e.id, ctx.fmt == Format::Table).await?;
            emit(ctx.fmt, &done, execution::detail);
            if done.status != "succeeded" {
                bail!(
                    "runbook execution {} {}: {}; see `drover execution report {}`",
                    done.id,
                    done.status,
                    done.error,
                    done.id
                );
            }
        }
    }
    Ok(())
}
