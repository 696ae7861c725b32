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
    /// Create a volume on a backend, empty or from a snapshot.
    Create {
        name: String,
        /// Size, e.g. 10GiB or 512MiB (from a snapshot: at least its size, which is the
        /// default).
        #[arg(long, allow_hyphen_values = true, required_unless_present = "from_snapshot")]
        size: Option<String>,
        /// Where to create it (from a snapshot: where the snapshot is, the default).
        #[arg(long, required_unless_present = "from_snapshot", default_value = "")]
        backend: String,
        /// Make it from this snapshot (id or name).
        #[arg(long, default_value = "")]
        from_snapshot: String,
        /// Which volume of a group snapshot (id or name).
        #[arg(long, default_value = "", requires = "from_snapshot")]
        from_volume: String,
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
        #[command(flatten)]
        list: ManageableArgs,
    },
    /// Take over an unmanaged volume (Cinder's manage), with the snapshots it carries.
    Manage {
        reference: String,
        #[arg(long)]
        backend: String,
        #[arg(long)]
        name: String,
        /// Leave the snapshots it carries on the backend unmanaged.
        #[arg(long)]
        without_snapshots: bool,
    },
    /// Forget a volume without deleting its data (Cinder's unmanage).
    Unmanage { volume: String },
    /// Replicate a volume on its own, outside any group (Cinder v2.1 style).
    #[command(name = "enable-replication")]
    EnableReplication {
        volume: String,
        #[arg(long, default_value = "")]
        target: String,
        /// Time between recovery points, e.g. 30s (the default) or 5m.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop replicating a volume replicated on its own.
    #[command(name = "disable-replication")]
    DisableReplication {
        volume: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Fail a volume replicated on its own over, or back with `--target default`.
    Failover {
        volume: String,
        #[arg(long)]
        target: String,
        /// Disaster failover: do not wait for the current side.
        #[arg(long)]
        force: bool,
        /// After a disaster, fail back even though this backend's changes since the
        /// divergence point are discarded.
        #[arg(long, default_value = "")]
        discard_changes_on: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Replication state of a volume replicated on its own: role, last sync, RPO.
    #[command(name = "replication-info")]
    ReplicationInfo { volume: String },
}

fn one(v: &pb::Volume) -> Table {
    output::volumes(std::slice::from_ref(v))
}

/// Runs one volume command.
pub async fn run(ctx: &mut Ctx, cmd: VolumeCmd) -> Result<()> {
    let (fmt, project) = (ctx.fmt, ctx.project.clone());
    let api = &mut ctx.api.volumes;
    match cmd {
        VolumeCmd::Create { name, size, backend, from_snapshot, from_volume } => {
            let size_bytes = match size {
                Some(s) => parse_size(&s).map_err(|e| anyhow!("--size: {e}"))?,
                None => 0,
            };
            let req = pb::CreateVolumeRequest { name, project, size_bytes, backend, from_snapshot, from_volume };
            let v = api.create_volume(req).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::List { all_projects } => {
            let project = if all_projects { String::new() } else { project };
            // Every page, in order, each printed as it arrives.
            let mut out = output::PageStream::new(fmt, "volumes", output::volumes);
            let mut marker = String::new();
            loop {
                let req = pb::ListVolumesRequest { project: project.clone(), limit: 0, marker };
                let page = api.list_volumes(req).await?.into_inner();
                out.page(&page.volumes);
                marker = page.next_marker;
                if marker.is_empty() {
                    break;
                }
            }
            out.finish();
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
        VolumeCmd::ManageableList { list } => {
            let (one_page, mut req) = list.request();
            let mut all = pb::ListManageableVolumesResponse::default();
            loop {
                let page = api.list_manageable_volumes(req.clone()).await?.into_inner();
                all.volumes.extend(page.volumes);
                all.next_marker = page.next_marker;
                if one_page || all.next_marker.is_empty() {
                    break;
                }
                req.marker = all.next_marker.clone();
            }
            emit(fmt, &all, |r| {
                let mut t = Table::new(&["REFERENCE", "SIZE", "SAFE TO MANAGE", "SNAPSHOTS", "REASON NOT SAFE"]);
                for m in &r.volumes {
                    let snaps: Vec<&str> = m.snapshots.iter().map(|s| s.reference.as_str()).collect();
                    t.row(vec![
                        m.reference.clone(),
                        format_size(m.size_bytes),
                        m.safe_to_manage.to_string(),
                        if snaps.is_empty() { "-".into() } else { snaps.join(",") },
                        m.reason_not_safe.clone(),
                    ]);
                }
                if !r.next_marker.is_empty() {
                    eprintln!("more rows: continue with --marker {}", r.next_marker);
                }
                t
            });
        }
        VolumeCmd::Manage { reference, backend, name, without_snapshots } => {
            let req = pb::ManageVolumeRequest { backend, reference, name, project, without_snapshots };
            let v = api.manage_volume(req).await?;
            emit(fmt, v.get_ref(), one);
        }
        VolumeCmd::EnableReplication { volume, target, interval, no_wait } => {
            let sync_interval_seconds = super::interval_seconds(interval)?;
            let req = pb::VolumeReplicationRequest {
                volume,
                project,
                target_backend: target,
                sync_interval_seconds,
                no_wait: true,
            };
            let r = ctx.api.replication.enable_volume_replication(req).await?.into_inner();
            super::group::finish_group_op(ctx, r, no_wait).await?;
        }
        VolumeCmd::DisableReplication { volume, no_wait } => {
            let req = pb::VolumeReplicationRequest { volume, project, no_wait: true, ..Default::default() };
            let r = ctx.api.replication.disable_volume_replication(req).await?.into_inner();
            super::group::finish_group_op(ctx, r, no_wait).await?;
        }
        VolumeCmd::Failover { volume, target, force, discard_changes_on, no_wait } => {
            let req = pb::FailoverVolumeRequest {
                volume,
                project,
                target_backend: target,
                force,
                discard_changes_on,
                no_wait: true,
            };
            let r = ctx.api.replication.failover_volume(req).await?.into_inner();
            super::group::finish_group_op(ctx, r, no_wait).await?;
        }
        VolumeCmd::ReplicationInfo { volume } => {
            let req = pb::VolumeReplicationRequest { volume, project, ..Default::default() };
            let r = ctx.api.replication.get_volume_replication_info(req).await?.into_inner();
            emit(fmt, &r, output::replication_info);
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

/// The flags of `drover volume manageable-list` and `drover snapshot manageable-list`.
#[derive(clap::Args)]
pub struct ManageableArgs {
    #[arg(long)]
    backend: String,
    /// One page of at most this many rows (without it, every row).
    #[arg(long)]
    limit: Option<i32>,
    /// Start after this row (a page's "next marker").
    #[arg(long, default_value = "")]
    marker: String,
    /// Order by name (the default) or size.
    #[arg(long, default_value = "name", value_parser = ["name", "size"])]
    sort: String,
}

impl ManageableArgs {
    /// Whether one page was asked for, and the first request.
    pub fn request(self) -> (bool, pb::ListManageableVolumesRequest) {
        let one_page = self.limit.is_some() || !self.marker.is_empty();
        let req = pb::ListManageableVolumesRequest {
            backend: self.backend,
            limit: self.limit.unwrap_or(0),
            marker: self.marker,
            sort: self.sort,
        };
        (one_page, req)
    }
}
