//! `drover site`: sites (failure domains).

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{Table, emit};

/// `drover site …`
#[derive(Subcommand)]
pub enum SiteCmd {
    /// List sites.
    List,
    /// Create a site.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
}

fn table(sites: &[pb::Site]) -> Table {
    let mut t = Table::new(&["NAME", "DESCRIPTION"]);
    for s in sites {
        t.row(vec![s.name.clone(), s.description.clone()]);
    }
    t
}

/// Runs one site command.
pub async fn run(ctx: &mut Ctx, cmd: SiteCmd) -> Result<()> {
    match cmd {
        SiteCmd::List => {
            let r = ctx.api.sites.list_sites(pb::ListSitesRequest {}).await?.into_inner();
            emit(ctx.fmt, &r, |r| table(&r.sites));
        }
        SiteCmd::Create { name, description } => {
            let s = ctx.api.sites.create_site(pb::CreateSiteRequest { name, description }).await?.into_inner();
            emit(ctx.fmt, &s, |s| table(std::slice::from_ref(s)));
        }
    }
    Ok(())
}
