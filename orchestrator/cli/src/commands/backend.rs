//! `drover backend`: backends, their agents' liveness and capabilities, freeze and thaw.

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::Ctx;
use crate::output::{backends, emit};

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
    };
    emit(ctx.fmt, one.get_ref(), |b| backends(std::slice::from_ref(b)));
    Ok(())
}
