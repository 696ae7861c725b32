//! `drover project`: what an admin allows one project's members.

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Table, emit};

/// `drover project …`
#[derive(Subcommand)]
pub enum ProjectCmd {
    /// Show a project's policy (the command's --project by default).
    Show { project: Option<String> },
    /// Let the project's members run disaster failovers (and discard a side's changes on
    /// failback), or stop them again with --off (admin).
    AllowDisasterFailover {
        project: String,
        #[arg(long)]
        off: bool,
    },
}

fn table(p: &pb::ProjectPolicy) -> Table {
    let mut t = Table::new(&["PROJECT", "MEMBERS MAY RUN DISASTER FAILOVERS"]);
    t.row(vec![p.project.clone(), if p.allow_member_disaster_failover { "yes" } else { "no" }.into()]);
    t
}

/// Runs one project command.
pub async fn run(ctx: &mut Ctx, cmd: ProjectCmd) -> Result<()> {
    let api = &mut ctx.api.projects;
    let p = match cmd {
        ProjectCmd::Show { project } => {
            let project = project.unwrap_or_else(|| ctx.project.clone());
            api.get_project_policy(pb::GetProjectPolicyRequest { project }).await?.into_inner()
        }
        ProjectCmd::AllowDisasterFailover { project, off } => {
            let policy = pb::ProjectPolicy { project, allow_member_disaster_failover: !off };
            api.set_project_policy(policy).await?.into_inner()
        }
    };
    emit(ctx.fmt, &p, table);
    Ok(())
}
