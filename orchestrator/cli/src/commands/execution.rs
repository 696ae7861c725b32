//! `drover execution`: operations that run as persisted executions: list, show, watch,
//! cancel; and [`follow`], which the other commands use to wait for their execution.

use std::io::IsTerminal;

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;
use futures::StreamExt;

use super::Ctx;
use crate::output::{Format, Table, emit, timestamp};

/// `drover execution …`
#[derive(Subcommand)]
pub enum ExecutionCmd {
    /// List executions, newest first.
    List {
        /// Only executions in this status: running, succeeded, failed or cancelled.
        #[arg(long, default_value = "")]
        status: String,
    },
    /// Show one execution with its steps.
    Show { id: String },
    /// A runbook execution's items (a group or backend each), step by step, page by page.
    Items {
        id: String,
        /// Only this step (its position in the runbook, from 0).
        #[arg(long)]
        step: Option<u32>,
    },
    /// Follow an execution until it ends, printing each step.
    Watch { id: String },
    /// Stop an execution at its next step boundary (running group moves finish).
    Cancel { id: String },
    /// Start no new step until resumed (running group moves finish).
    Pause { id: String },
    /// Let a paused execution go on.
    Resume { id: String },
    /// Approve the prompt a runbook execution waits at.
    Approve {
        id: String,
        /// The prompt's step name, to decide one the execution has not reached yet.
        #[arg(long, default_value = "")]
        prompt: String,
        /// A note kept in the report.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Reject the prompt a runbook execution waits at: it stops there.
    Reject {
        id: String,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The DR report of a runbook execution: timeline, outcomes, RPO and RTO per group.
    Report {
        id: String,
        /// md (Markdown) or json.
        #[arg(long, default_value = "md")]
        format: String,
    },
}

/// Who is deciding, for the report: the OS user.
fn operator() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

fn list_table(list: &[pb::Execution]) -> Table {
    let mut t = Table::new(&["ID", "KIND", "STATUS", "STEP", "CREATED", "SUMMARY"]);
    for e in list {
        t.row(vec![
            e.id.clone(),
            e.kind.clone(),
            e.status.clone(),
            e.step.clone(),
            timestamp(e.created_ms),
            e.summary.clone(),
        ]);
    }
    t
}

/// The most locks `execution show` lists; a run over a site holds one per group.
const SHOWN_LOCKS: usize = 10;

/// The first locks of `e` and how many more it holds.
fn locks_shown(e: &pb::Execution) -> String {
    let total = (e.lock_count as usize).max(e.locks.len());
    let mut shown = e.locks.iter().take(SHOWN_LOCKS).cloned().collect::<Vec<_>>().join(", ");
    if total > SHOWN_LOCKS.min(e.locks.len()) {
        shown.push_str(&format!(" … and {} more ({total} in all)", total - SHOWN_LOCKS.min(e.locks.len())));
    }
    shown
}

/// One execution in detail: its fields, then one row per step.
pub fn detail(e: &pb::Execution) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("id", e.id.clone()),
        ("kind", e.kind.clone()),
        ("summary", e.summary.clone()),
        ("status", e.status.clone()),
        ("step", e.step.clone()),
        ("error", e.error.clone()),
        ("owner", format!("{} (epoch {}, claimed {} time(s))", e.owner, e.epoch, e.claims)),
        ("locks", locks_shown(e)),
        ("created", timestamp(e.created_ms)),
        ("updated", timestamp(e.updated_ms)),
        ("cancel requested", e.cancel_requested.to_string()),
        ("paused", e.paused.to_string()),
        ("parent", e.parent.clone()),
        ("trace", e.trace_id.clone()),
    ] {
        t.row(vec![k.into(), v]);
    }
    for s in &e.steps {
        t.row(vec![
            format!("step {}", s.name),
            format!("{} ms, epoch {}: {}", s.ended_ms - s.started_ms, s.epoch, s.note),
        ]);
    }
    t
}

/// A page of runbook items (JSON, each with its `step` added).
fn items_table(items: &[serde_json::Value]) -> Table {
    let mut t = Table::new(&["STEP", "NAME", "STATUS", "EXECUTION", "REASON"]);
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    for i in items {
        t.row(vec![
            i["step"].to_string(),
            text(&i["name"]),
            text(&i["status"]),
            text(&i["execution_id"]),
            text(&i["reason"]),
        ]);
    }
    t
}

/// Runs one execution command.
pub async fn run(ctx: &mut Ctx, cmd: ExecutionCmd) -> Result<()> {
    let api = &mut ctx.api.executions;
    match cmd {
        ExecutionCmd::List { status } => {
            // Every page, newest first, each printed as it arrives.
            let mut out = crate::output::PageStream::new(ctx.fmt, "executions", list_table);
            let mut marker = String::new();
            loop {
                let req = pb::ListExecutionsRequest { status: status.clone(), limit: 0, marker };
                let page = api.list_executions(req).await?.into_inner();
                out.page(&page.executions);
                marker = page.next_marker;
                if marker.is_empty() {
                    break;
                }
            }
            out.finish();
        }
        ExecutionCmd::Items { id, step } => {
            // Without --step, from step 0 on: its answer says how many steps there are.
            let mut out = crate::output::PageStream::new(ctx.fmt, "items", items_table);
            let (mut step, mut last) = (step.unwrap_or(0), step);
            while last.is_none_or(|l| step <= l) {
                let mut marker = String::new();
                loop {
                    let req = pb::ListExecutionItemsRequest { id: id.clone(), step, limit: 0, marker };
                    let page = api.list_execution_items(req).await?.into_inner();
                    let rows: Vec<serde_json::Value> = page
                        .items_json
                        .iter()
                        .map(|j| {
                            let mut v: serde_json::Value = serde_json::from_str(j).unwrap_or_default();
                            v["step"] = step.into();
                            v
                        })
                        .collect();
                    out.page(&rows);
                    last = last.or(Some(page.steps.saturating_sub(1)));
                    marker = page.next_marker;
                    if marker.is_empty() {
                        break;
                    }
                }
                step += 1;
            }
            out.finish();
        }
        ExecutionCmd::Show { id } => {
            let e = api.get_execution(pb::GetExecutionRequest { id }).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Watch { id } => {
            let e = watch(ctx, &id, true).await?;
            emit(ctx.fmt, &e, detail);
        }
        ExecutionCmd::Cancel { id } => {
            let e = api.cancel_execution(pb::CancelExecutionRequest { id }).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Pause { id } => {
            let e = api.pause_execution(pb::CancelExecutionRequest { id }).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Resume { id } => {
            let e = api.resume_execution(pb::CancelExecutionRequest { id }).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Approve { id, prompt, comment } => {
            let by = operator();
            let req = pb::DecidePromptRequest { id, prompt, approve: true, by, comment };
            let e = api.decide_prompt(req).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Reject { id, prompt, comment } => {
            let by = operator();
            let req = pb::DecidePromptRequest { id, prompt, approve: false, by, comment };
            let e = api.decide_prompt(req).await?;
            emit(ctx.fmt, e.get_ref(), detail);
        }
        ExecutionCmd::Report { id, format } => {
            let r = api.get_execution_report(pb::GetExecutionReportRequest { id, format }).await?.into_inner();
            if ctx.fmt == Format::Json && r.format == "md" {
                emit(ctx.fmt, &r, |_| Table::new(&[]));
            } else {
                println!("{}", r.text);
            }
        }
    }
    Ok(())
}

/// Follows an execution to its end. With `progress`, prints each finished step (and
/// each retry) to stderr as it happens; that is what a person at a terminal sees.
pub async fn watch(ctx: &mut Ctx, id: &str, progress: bool) -> Result<pb::Execution> {
    let mut stream = ctx.api.executions.watch_execution(pb::GetExecutionRequest { id: id.into() }).await?.into_inner();
    // A runbook on a terminal gets bars (one per tier of the running step); anything
    // else, or without a terminal, one line per event.
    let mut bars: Option<crate::progress::RunProgress> = None;
    let mut shown = 0;
    let mut last_error = String::new();
    let mut announced = String::new();
    let mut latest = None;
    while let Some(next) = stream.next().await {
        let e = next?;
        if progress && bars.is_none() && e.kind == "runbook" && std::io::stderr().is_terminal() {
            bars = Some(crate::progress::RunProgress::new());
        }
        if let Some(b) = bars.as_mut() {
            b.update(&e);
            if let Some(prompt) = e.step.strip_prefix("prompt:").filter(|_| e.status == "running")
                && announced != e.step
            {
                b.println(&format!(
                    "  [{}] waiting at prompt {prompt}: `drover execution approve {}` or `reject {}` decides",
                    e.id, e.id, e.id
                ));
                announced = e.step.clone();
            }
        } else if progress {
            for s in e.steps.iter().skip(shown) {
                eprintln!("  [{}] {} ({} ms): {}", e.id, s.name, s.ended_ms - s.started_ms, s.note);
            }
            if !e.error.is_empty() && e.error != last_error && e.status == "running" {
                eprintln!("  [{}] {}", e.id, e.error);
            }
            if let Some(prompt) = e.step.strip_prefix("prompt:").filter(|_| e.status == "running")
                && announced != e.step
            {
                eprintln!(
                    "  [{}] waiting at prompt {prompt}: `drover execution show {}` shows what it asks; \
                     `drover execution approve {}` or `reject {}` decides",
                    e.id, e.id, e.id, e.id
                );
                announced = e.step.clone();
            }
        }
        shown = e.steps.len();
        last_error = e.error.clone();
        let ended = e.status != "running";
        latest = Some(e);
        if ended {
            break;
        }
    }
    if let Some(b) = bars.as_mut() {
        b.finish();
    }
    latest.ok_or_else(|| anyhow!("execution {id} sent nothing; see `drover execution show {id}`"))
}

/// Waits for execution `id` (submitted by another command) and returns its answer: the
/// value of `T` its RPC would have returned. Progress goes to stderr on a terminal when
/// the output is a table.
pub async fn follow<T: serde::de::DeserializeOwned>(ctx: &mut Ctx, id: &str) -> Result<T> {
    let progress = ctx.fmt == Format::Table && std::io::stderr().is_terminal();
    if progress {
        eprintln!("execution {id} submitted; following it (Ctrl-C leaves it running)");
    }
    let e = watch(ctx, id, progress).await?;
    match e.status.as_str() {
        "succeeded" => {}
        "cancelled" => bail!("execution {id} was cancelled; see `drover execution show {id}`"),
        _ => bail!("execution {id} {}: {}; see `drover execution show {id}`", e.status, e.error),
    }
    let answer: serde_json::Value = serde_json::from_str(&e.output_json)
        .map_err(|err| anyhow!("execution {id} has an unreadable answer ({err}); see `drover execution show {id}`"))?;
    match answer["result"].as_str() {
        Some("ok") => Ok(serde_json::from_value(answer["value"].clone())?),
        _ => bail!(
            "{} ({}); execution {id}",
            answer["message"].as_str().unwrap_or("the operation failed"),
            answer["code"].as_str().unwrap_or("unknown")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_lists_the_first_locks_and_counts_the_rest() {
        let mut e =
            pb::Execution { locks: vec!["group/a".into(), "group/b".into()], lock_count: 2, ..Default::default() };
        assert_eq!(locks_shown(&e), "group/a, group/b");
        // A watch update of a run over 250 groups lists 100 of them.
        e.locks = (0..100).map(|i| format!("runbook/group/g{i:03}")).collect();
        e.lock_count = 250;
        let shown = locks_shown(&e);
        assert!(shown.starts_with("runbook/group/g000, runbook/group/g001,"), "{shown}");
        assert!(shown.ends_with("runbook/group/g009 … and 240 more (250 in all)"), "{shown}");
    }
}
