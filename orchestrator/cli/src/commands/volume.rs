//! `drover volume`: volumes, attachment, and adoption of unmanaged volumes.

use anyhow::{Result, anyhow};
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::{Ctx, deleted};
use crate::output::{self, Table, emit};
use crate::size::{format_size, parse_size};

/// `drover volume …`
#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume on a backend.
    Create {
        name: String,
        /// Size, e.g. 10GiB or 512MiB.
        #[arg(long, allow_hyphen_values = true)]
        size: String,
        #[arg(long)]
        backend: String,
    },
    /// List the project's volumes.
    List {
        /// Volumes of every project.
        #[arg(long)]
        all_projects: bool,
    },
    /// Show one volume.
    Show { volume: String },
    /// Delete a volume and its data.
    Delete { volume: String },
    /// Grow a volume.
    Extend {
        volume: String,
        /// The new size, e.g. 20GiB.
        #[arg(long, allow_hyphen_values = true)]
        size: String,
    },
    /// Where to attach a volume now: e.g. an NBD URI for qemu-io or qemu.
    Attach { volume: String },
    /// Volumes on a backend that Drover does not manage (Cinder's manageable-list).
    #[command(name = "manageable-list")]
    ManageableList {
        #[arg(long)]
        backend: String,
    },
    /// Take over an unmanaged volume (Cinder's manage).
    Manage {
        reference: String,
        #[arg(long)]
        backend: String,
        #[arg(long)]
        name: String,
    },
    /// Forget a volume without deleting its data (Cinder's unmanage).
    Unmanage { volume: String },
}

fn one(v: &pb::Volume) -> Table {
    output::volumes(std::slice::from_ref(v))
}

/// Runs one volume command.
pub async fn run(ctx: &mut Ctx, cmd: VolumeCmd) -> Result<()> {
    let (fmt, project) = (ctx.fmt, ctx.project.clone());
    let api = &mut ctx.api.volumes;
    match cmd {
        VolumeCmd::Create { name, size, backend } => {
            let size_bytes = parse_size(&size).map_err(|e| anyhow!("--size: {e}"))?;
            let v = api.create_volume(pb::CreateVolumeRequest { name, project, size_bytes, backend }).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::List { all_projects } => {
            let project = if all_projects { String::new() } else { project };
            let r = api.list_volumes(pb::ListVolumesRequest { project }).await?.into_inner();
            emit(fmt, &r, |r| output::volumes(&r.volumes));
        }
        VolumeCmd::Show { volume } => {
            let v = api.get_volume(pb::GetVolumeRequest { volume, project }).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::Delete { volume } => {
            api.delete_volume(pb::DeleteVolumeRequest { volume: volume.clone(), project }).await?;
            deleted(fmt, "volume", &volume);
        }
        VolumeCmd::Extend { volume, size } => {
            let new_size_bytes = parse_size(&size).map_err(|e| anyhow!("--size: {e}"))?;
            let v = api.extend_volume(pb::ExtendVolumeRequest { volume, project, new_size_bytes }).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::Attach { volume } => {
            let r = api.attach_volume(pb::AttachVolumeRequest { volume, project }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["BACKEND", "TYPE", "URI"]);
                t.row(vec![r.backend.clone(), r.driver_volume_type.clone(), r.uri.clone()]);
                t
            });
        }
        VolumeCmd::ManageableList { backend } => {
            let r = api.list_manageable_volumes(pb::ListManageableVolumesRequest { backend }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["REFERENCE", "SIZE", "SAFE TO MANAGE", "REASON NOT SAFE"]);
                for m in &r.volumes {
                    t.row(vec![
                        m.reference.clone(),
                        format_size(m.size_bytes),
                        m.safe_to_manage.to_string(),
                        m.reason_not_safe.clone(),
                    ]);
                }
                t
            });
        }
        VolumeCmd::Manage { reference, backend, name } => {
            let v = api.manage_volume(pb::ManageVolumeRequest { backend, reference, name, project }).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::Unmanage { volume } => {
            let r = api.unmanage_volume(pb::UnmanageVolumeRequest { volume, project }).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["UNMANAGED AS"]);
                t.row(vec![r.reference.clone()]);
                t
            });
        }
    }
    Ok(())
}
