//! `drover adopt`: after a disaster, find the volumes a backend holds that Drover does not
//! manage, and take over what is adoptable (docs/adoption.md).

use anyhow::{Context as _, Result};
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Table, emit, timestamp};

/// `drover adopt …`
#[derive(Subcommand)]
pub enum AdoptCmd {
    /// Compare what a backend holds with what Drover knows; keep and print the plan.
    Plan {
        #[arg(long)]
        backend: String,
        /// A mapping file (YAML): reference patterns to names, projects and groups.
        #[arg(long)]
        map: Option<std::path::PathBuf>,
    },
    /// Show a plan, with the outcomes of its applies.
    Show { plan: String },
    /// Take over exactly what the plan found adoptable (refused if the backend changed).
    Apply {
        plan: String,
        /// Print the execution id and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

fn plan_table(p: &pb::AdoptionPlan) -> Table {
    let mut t = Table::new(&["REFERENCE", "CATEGORY", "VOLUME", "PROJECT", "GROUP", "SNAPSHOTS", "OUTCOME", "REASON"]);
    for i in &p.items {
        let why = if i.outcome_reason.is_empty() { i.reason.clone() } else { i.outcome_reason.clone() };
        t.row(vec![
            if i.reference.is_empty() { "-".into() } else { i.reference.clone() },
            i.category.clone(),
            i.name.clone(),
            i.project.clone(),
            i.group.clone(),
            if i.snapshots.is_empty() { "-".into() } else { i.snapshots.join(",") },
            if i.outcome.is_empty() { "-".into() } else { i.outcome.clone() },
            why,
        ]);
    }
    t
}

fn summary(p: &pb::AdoptionPlan) {
    let count = |c: &str| p.items.iter().filter(|i| i.category == c).count();
    eprintln!(
        "plan {} of backend {} ({}): {} adoptable, {} managed, {} duplicate, {} unsafe, {} unmatched, {} invalid, {} missing",
        p.id,
        p.backend,
        timestamp(p.created_at_ms),
        count("adoptable"),
        count("managed"),
        count("duplicate"),
        count("unsafe"),
        count("unmatched"),
        count("invalid"),
        count("missing"),
    );
}

/// Runs one adopt command.
pub async fn run(ctx: &mut Ctx, cmd: AdoptCmd) -> Result<()> {
    match cmd {
        AdoptCmd::Plan { backend, map } => {
            let (map, map_file) = match map {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read the mapping file {}", path.display()))?;
                    (text, path.display().to_string())
                }
                None => (String::new(), String::new()),
            };
            let req = pb::PlanAdoptionRequest { backend, project: ctx.project.clone(), map, map_file };
            let p = ctx.api.volumes.plan_adoption(req).await?.into_inner();
            summary(&p);
            if p.items.iter().any(|i| i.category == "adoptable") {
                eprintln!("apply it with `drover adopt apply {}`", p.id);
            }
            emit(ctx.fmt, &p, plan_table);
        }
        AdoptCmd::Show { plan } => {
            let p = ctx.api.volumes.get_adoption_plan(pb::GetAdoptionPlanRequest { plan_id: plan }).await?.into_inner();
            summary(&p);
            emit(ctx.fmt, &p, plan_table);
        }
        AdoptCmd::Apply { plan, no_wait } => {
            let e = ctx.api.volumes.apply_adoption(pb::GetAdoptionPlanRequest { plan_id: plan }).await?.into_inner();
            if no_wait {
                println!("{}", e.id);
                return Ok(());
            }
            let p: pb::AdoptionPlan = super::execution::follow(ctx, &e.id).await?;
            let adopted = p.items.iter().filter(|i| i.outcome == "adopted").count();
            let failed = p.items.iter().filter(|i| i.outcome == "failed").count();
            eprintln!("execution {}: {adopted} adopted, {failed} failed", e.id);
            emit(ctx.fmt, &p, plan_table);
        }
    }
    Ok(())
}
