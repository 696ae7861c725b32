//! `drover snapshot` and `drover group snapshot`: snapshots of a volume, or of every volume
//! of a group at one instant.

use anyhow::Result;
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::{Ctx, deleted};
use crate::output::{self, emit};

/// `drover snapshot …`
#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of a volume, where it is active.
    Create {
        /// The volume (id or name).
        volume: String,
        #[arg(long)]
        name: String,
    },
    /// List the project's snapshots (volume and group snapshots).
    List {
        /// Only those holding this volume (id or name).
        #[arg(long, default_value = "")]
        volume: String,
        /// Snapshots of every project.
        #[arg(long)]
        all_projects: bool,
    },
    /// Show one snapshot, with its volumes.
    Show { snapshot: String },
    /// Delete a snapshot (refused while volumes made from it exist).
    Delete { snapshot: String },
    /// Snapshots that unmanaged volumes on a backend carry (qcow2: internal snapshots,
    /// and backing-file layers); `drover volume manage` takes the internal ones over with
    /// their volume. A row's marker is "<volume reference>/<snapshot reference>".
    #[command(name = "manageable-list")]
    ManageableList {
        #[command(flatten)]
        list: super::volume::ManageableArgs,
    },
}

/// `drover group snapshot …`
#[derive(Subcommand)]
pub enum GroupSnapshotCmd {
    /// Take a snapshot of every volume of a group at one instant (crash-consistent).
    Create {
        /// The group (id or name).
        group: String,
        #[arg(long)]
        name: String,
    },
    /// List group snapshots (of one group with --group).
    List {
        #[arg(long, default_value = "")]
        group: String,
        /// Group snapshots of every project.
        #[arg(long)]
        all_projects: bool,
    },
    /// Show one group snapshot, with its volumes.
    Show { snapshot: String },
    /// Delete a group snapshot (refused while volumes made from it exist).
    Delete { snapshot: String },
}

async fn list_all(ctx: &mut Ctx, mut req: pb::ListSnapshotsRequest) -> Result<pb::ListSnapshotsResponse> {
    let mut all = pb::ListSnapshotsResponse::default();
    loop {
        req.marker = all.next_marker.clone();
        let page = ctx.api.snapshots.list_snapshots(req.clone()).await?.into_inner();
        all.snapshots.extend(page.snapshots);
        all.next_marker = page.next_marker;
        if all.next_marker.is_empty() {
            return Ok(all);
        }
    }
}

async fn show(ctx: &mut Ctx, snapshot: String) -> Result<()> {
    let project = ctx.project.clone();
    let s = ctx.api.snapshots.get_snapshot(pb::GetSnapshotRequest { snapshot, project }).await?;
    emit(ctx.fmt, s.get_ref(), output::snapshot_detail);
    Ok(())
}

async fn delete(ctx: &mut Ctx, snapshot: String) -> Result<()> {
    let project = ctx.project.clone();
    ctx.api.snapshots.delete_snapshot(pb::DeleteSnapshotRequest { snapshot: snapshot.clone(), project }).await?;
    deleted(ctx.fmt, "snapshot", &snapshot);
    Ok(())
}

/// Runs one snapshot command.
pub async fn run(ctx: &mut Ctx, cmd: SnapshotCmd) -> Result<()> {
    let project = ctx.project.clone();
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let s = ctx.api.snapshots.create_snapshot(pb::CreateSnapshotRequest { volume, project, name }).await?;
            emit(ctx.fmt, s.get_ref(), output::snapshot_detail);
        }
        SnapshotCmd::List { volume, all_projects } => {
            let project = if all_projects { String::new() } else { project };
            let all = list_all(ctx, pb::ListSnapshotsRequest { project, volume, ..Default::default() }).await?;
            emit(ctx.fmt, &all, |r| output::snapshots(&r.snapshots));
        }
        SnapshotCmd::Show { snapshot } => show(ctx, snapshot).await?,
        SnapshotCmd::Delete { snapshot } => delete(ctx, snapshot).await?,
        SnapshotCmd::ManageableList { list } => {
            let (one_page, mut req) = list.request();
            let mut all = pb::ListManageableSnapshotsResponse::default();
            loop {
                let page = ctx.api.volumes.list_manageable_snapshots(req.clone()).await?.into_inner();
                all.snapshots.extend(page.snapshots);
                all.next_marker = page.next_marker;
                if one_page || all.next_marker.is_empty() {
                    break;
                }
                req.marker = all.next_marker.clone();
            }
            emit(ctx.fmt, &all, |r| {
                let mut t = output::Table::new(&[
                    "VOLUME REFERENCE",
                    "SNAPSHOT",
                    "KIND",
                    "SIZE",
                    "CREATED",
                    "SAFE TO MANAGE",
                    "REASON NOT SAFE",
                ]);
                for s in &r.snapshots {
                    t.row(vec![
                        s.volume_reference.clone(),
                        s.reference.clone(),
                        s.kind.clone(),
                        crate::size::format_size(s.size_bytes),
                        output::timestamp(s.created_at_ms),
                        s.safe_to_manage.to_string(),
                        s.reason_not_safe.clone(),
                    ]);
                }
                if !r.next_marker.is_empty() {
                    eprintln!("more rows: continue with --marker {}", r.next_marker);
                }
                t
            });
        }
    }
    Ok(())
}

/// Runs one group snapshot command.
pub async fn run_group(ctx: &mut Ctx, cmd: GroupSnapshotCmd) -> Result<()> {
    let project = ctx.project.clone();
    match cmd {
        GroupSnapshotCmd::Create { group, name } => {
            let req = pb::CreateGroupSnapshotRequest { group, project, name };
            let s = ctx.api.snapshots.create_group_snapshot(req).await?;
            emit(ctx.fmt, s.get_ref(), output::snapshot_detail);
        }
        GroupSnapshotCmd::List { group, all_projects } => {
            let project = if all_projects { String::new() } else { project };
            let req = pb::ListSnapshotsRequest { project, group, groups_only: true, ..Default::default() };
            let all = list_all(ctx, req).await?;
            emit(ctx.fmt, &all, |r| output::snapshots(&r.snapshots));
        }
        GroupSnapshotCmd::Show { snapshot } => show(ctx, snapshot).await?,
        GroupSnapshotCmd::Delete { snapshot } => delete(ctx, snapshot).await?,
    }
    Ok(())
}
