//! `drover group-type`: group types (consistency, replication, consistent-replication,
//! and custom ones).

use std::collections::HashMap;

use anyhow::{Result, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Table, emit};

/// `drover group-type …`
#[derive(Subcommand)]
pub enum GroupTypeCmd {
    /// List group types.
    List,
    /// Show one group type.
    Show { name: String },
    /// Create a custom group type from group specs.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// A group spec KEY=VALUE; repeat for more.
        #[arg(long = "spec")]
        specs: Vec<String>,
    },
}

fn table(types: &[pb::GroupType]) -> Table {
    let mut t = Table::new(&["NAME", "BUILTIN", "SPECS", "DESCRIPTION"]);
    for g in types {
        let mut specs: Vec<String> = g.specs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        specs.sort();
        t.row(vec![g.name.clone(), g.builtin.to_string(), specs.join(", "), g.description.clone()]);
    }
    t
}

/// Runs one group-type command.
pub async fn run(ctx: &mut Ctx, cmd: GroupTypeCmd) -> Result<()> {
    let api = &mut ctx.api.groups;
    match cmd {
        GroupTypeCmd::List => {
            let r = api.list_group_types(pb::ListGroupTypesRequest {}).await?.into_inner();
            emit(ctx.fmt, &r, |r| table(&r.group_types));
        }
        GroupTypeCmd::Show { name } => {
            let t = api.get_group_type(pb::GetGroupTypeRequest { name }).await?;
            emit(ctx.fmt, t.get_ref(), |t| table(std::slice::from_ref(t)));
        }
        GroupTypeCmd::Create { name, description, specs } => {
            let mut map = HashMap::new();
            for s in specs {
                let Some((k, v)) = s.split_once('=') else { bail!("--spec {s:?} is not KEY=VALUE") };
                map.insert(k.to_string(), v.to_string());
            }
            let t = api.create_group_type(pb::CreateGroupTypeRequest { name, description, specs: map }).await?;
            emit(ctx.fmt, t.get_ref(), |t| table(std::slice::from_ref(t)));
        }
    }
    Ok(())
}
