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
    plan_table_within(p, usize::MAX)
}

/// Items of one step the plan shown before `runbook run` asks lists; the rest of the
/// step is a line of counts (a site's plan may hold thousands of groups).
const ASKED_ITEMS: usize = 20;

/// [`plan_table`] with at most `most` items per step listed, then a row that counts the
/// others by what the plan predicts for them.
fn plan_table_within(p: &pb::RunbookPlan, most: usize) -> Table {
    let mut t = Table::new(&["STEP", "KIND", "TIER", "TARGET", "PREDICTED", "RPO NOW", "FINAL SYNC NOW"]);
    for s in &p.steps {
        if s.items.is_empty() {
            let mut row = vec![s.name.clone(), s.kind.clone()];
            row.resize(7, String::new());
            t.row(row);
        }
        if s.items.len() > most {
            let mut by: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
            for i in &s.items[most..] {
                *by.entry(i.predicted.split(':').next().unwrap_or("")).or_default() += 1;
            }
            let counts: Vec<String> = by.iter().map(|(what, n)| format!("{n} {what}")).collect();
            let mut row = vec![
                s.name.clone(),
                s.kind.clone(),
                String::new(),
                format!("... and {} more", s.items.len() - most),
                counts.join(", "),
            ];
            row.resize(7, String::new());
            for i in &s.items[..most] {
                t.row(plan_row(s, i));
            }
            t.row(row);
            continue;
        }
        for i in &s.items {
            t.row(plan_row(s, i));
        }
    }
    let params: Vec<String> = p.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    t.footer(format!("runbook {} ({})", p.name, params.join(" ")));
    t
}

fn plan_row(s: &pb::PlannedStep, i: &pb::PlannedItem) -> Vec<String> {
    vec![
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
    ]
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
                let mut shown = plan_table_within(&p, ASKED_ITEMS);
                if p.steps.iter().any(|s| s.items.len() > ASKED_ITEMS) {
                    shown.footer(format!(
                        "every item: drover runbook plan {}{}",
                        file.display(),
                        p.params.iter().map(|(k, v)| format!(" --param {k}={v}")).collect::<String>()
                    ));
                }
                eprint!("{}", shown.render());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_shown_before_a_run_lists_a_few_items_per_step_and_counts_the_rest() {
        let item = |n: usize| pb::PlannedItem {
            name: format!("g{n:04}"),
            predicted: if n.is_multiple_of(10) { "skip: not replicating".into() } else { "act".into() },
            rpo_ms: -1,
            predicted_final_sync_bytes: -1,
            predicted_final_sync_ms: -1,
            ..Default::default()
        };
        let plan = pb::RunbookPlan {
            name: "site".into(),
            steps: vec![
                pb::PlannedStep { name: "move".into(), kind: "failover".into(), items: (0..1000).map(item).collect() },
                pb::PlannedStep { name: "check".into(), kind: "verify".into(), items: (0..3).map(item).collect() },
            ],
            ..Default::default()
        };
        let shown = plan_table_within(&plan, ASKED_ITEMS).render();
        assert!(shown.contains("g0019") && !shown.contains("g0020"), "{shown}");
        assert!(shown.contains("... and 980 more") && shown.contains("882 act, 98 skip"), "{shown}");
        assert_eq!(shown.lines().filter(|l| l.starts_with("check")).count(), 3, "small steps are listed whole");
        let whole = plan_table(&plan).render();
        assert!(whole.contains("g0999") && !whole.contains("more"), "the plan command lists every item");
    }
}
