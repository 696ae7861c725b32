//! `drover group`: groups, their volumes, and their replication: enable, sync, failover,
//! failback, disable, targets and info.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;

use super::{Ctx, deleted, execution};
use crate::output::{self, Format, Table, emit};

/// `drover group …`
#[derive(Subcommand)]
pub enum GroupCmd {
    /// Create a group of volumes of one backend, or of new volumes made from a group
    /// snapshot.
    Create {
        name: String,
        #[arg(long = "type")]
        group_type: String,
        /// Where the volumes are (from a snapshot: where it is, the default).
        #[arg(long, required_unless_present = "from_group_snapshot", default_value = "")]
        backend: String,
        /// A volume (id or name) to include; repeat for more.
        #[arg(long = "volume", conflicts_with = "from_group_snapshot")]
        volumes: Vec<String>,
        /// Make the group's volumes from this (group) snapshot, one per volume in it,
        /// named GROUP-VOLUME.
        #[arg(long, default_value = "")]
        from_group_snapshot: String,
    },
    /// List the project's groups.
    List {
        /// Groups of every project.
        #[arg(long)]
        all_projects: bool,
    },
    /// Show one group, its RPO and its newest history.
    Show { group: String },
    /// A group's whole history, newest first (read page by page).
    History {
        group: String,
        /// At most this many events (0: all that are kept).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Delete a group (its volumes stay).
    Delete { group: String },
    /// Set a group's labels and runbook tier.
    Update {
        group: String,
        /// A label to set, KEY=VALUE; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// A label to remove; repeat for more.
        #[arg(long = "remove-label")]
        remove_labels: Vec<String>,
        /// The runbook priority tier: 1 runs first, 9 last (groups start at 5).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=9))]
        tier: Option<u32>,
    },
    /// Add volumes to a group.
    #[command(name = "add-volumes")]
    AddVolumes { group: String, volumes: Vec<String> },
    /// Remove volumes from a group.
    #[command(name = "remove-volumes")]
    RemoveVolumes { group: String, volumes: Vec<String> },
    /// Start replicating a group to a backend at another site.
    #[command(name = "enable-replication")]
    EnableReplication {
        group: String,
        #[arg(long, default_value = "")]
        target: String,
        /// Time between recovery points, e.g. 30s (the default) or 5m; at least 1s.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Print the execution id and return; follow it with `drover execution watch`.
        #[arg(long)]
        no_wait: bool,
    },
    /// Take and ship a recovery point now.
    Sync {
        group: String,
        /// Print the execution id and return.
        #[arg(long)]
        no_wait: bool,
        /// Quiesce the instances using the group's volumes for the point
        /// (application-consistent; docs/compute.md), unquiesce them after.
        #[arg(long)]
        quiesce: bool,
        /// How long the quiesce may take before the point is taken crash-consistent.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        quiesce_timeout: std::time::Duration,
    },
    /// Stop replicating a group.
    #[command(name = "disable-replication")]
    DisableReplication {
        group: String,
        /// Print the execution id and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Fail over to the replication target, or back with `--target default`.
    Failover {
        group: String,
        #[arg(long)]
        target: String,
        /// Disaster failover: do not wait for the current side to demote.
        #[arg(long)]
        force: bool,
        /// After a disaster failover, fail back even though this backend's changes since
        /// the divergence point are discarded (recorded in the group's history).
        #[arg(long, default_value = "")]
        discard_changes_on: String,
        /// Print the execution id and return; the failover goes on without this command.
        #[arg(long)]
        no_wait: bool,
    },
    /// Backends this group can replicate to, with their liveness.
    #[command(name = "list-targets")]
    ListTargets { group: String },
    /// Each volume's replication state and the group's RPO.
    #[command(name = "replication-info")]
    ReplicationInfo { group: String },
    /// Group snapshots: every volume of a group at one instant.
    #[command(subcommand)]
    Snapshot(super::snapshot::GroupSnapshotCmd),
}

/// Runs one group command.
pub async fn run(ctx: &mut Ctx, cmd: GroupCmd) -> Result<()> {
    let (fmt, project) = (ctx.fmt, ctx.project.clone());
    let (mut groups, mut replication) = (ctx.api.groups.clone(), ctx.api.replication.clone());
    match cmd {
        GroupCmd::Snapshot(cmd) => return super::snapshot::run_group(ctx, cmd).await,
        GroupCmd::Create { name, group_type, backend, volumes, from_group_snapshot } => {
            let req = pb::CreateGroupRequest { name, project, group_type, backend, volumes, from_group_snapshot };
            let g = groups.create_group(req).await?;
            emit(fmt, g.get_ref(), output::group_detail);
        }
        GroupCmd::List { all_projects } => {
            let project = if all_projects { String::new() } else { project };
            // Every page, in order, each printed as it arrives.
            let mut out = output::PageStream::new(fmt, "groups", output::groups);
            let mut marker = String::new();
            loop {
                let req = pb::ListGroupsRequest { project: project.clone(), limit: 0, marker };
                let page = groups.list_groups(req).await?.into_inner();
                out.page(&page.groups);
                marker = page.next_marker;
                if marker.is_empty() {
                    break;
                }
            }
            out.finish();
        }
        GroupCmd::History { group, limit } => {
            let mut all = pb::ListGroupEventsResponse::default();
            loop {
                let req = pb::ListGroupEventsRequest {
                    group: group.clone(),
                    project: project.clone(),
                    limit: 0,
                    marker: all.next_marker,
                };
                let page = groups.list_group_events(req).await?.into_inner();
                all.events.extend(page.events);
                all.next_marker = page.next_marker;
                if all.next_marker.is_empty() || (limit > 0 && all.events.len() >= limit) {
                    break;
                }
            }
            if limit > 0 {
                all.events.truncate(limit);
            }
            emit(fmt, &all, |r| output::group_events(&r.events));
        }
        GroupCmd::Show { group } => {
            let mut g = groups.get_group(pb::GetGroupRequest { group, project: project.clone() }).await?.into_inner();
            // What a planned failover now would ship, from the active side's estimate.
            if matches!(g.replication_status.as_str(), "enabled" | "failed-over") {
                let req = pb::GetReplicationInfoRequest { group: g.id.clone(), project, predict: true };
                if let Ok(info) = replication.get_replication_info(req).await {
                    let info = info.into_inner();
                    g.predicted_final_sync_bytes = info.predicted_final_sync_bytes;
                    g.predicted_final_sync_ms = info.predicted_final_sync_ms;
                }
            }
            emit(fmt, &g, output::group_detail);
        }
        GroupCmd::Delete { group } => {
            groups.delete_group(pb::DeleteGroupRequest { group: group.clone(), project }).await?;
            deleted(fmt, "group", &group);
        }
        GroupCmd::Update { group, labels, remove_labels, tier } => {
            if labels.is_empty() && remove_labels.is_empty() && tier.is_none() {
                bail!("nothing to update: give --label KEY=VALUE, --remove-label KEY or --tier N");
            }
            let req = pb::UpdateGroupRequest {
                group,
                project,
                set_labels: labels.into_iter().collect(),
                remove_labels,
                tier: tier.unwrap_or(0),
                ..Default::default()
            };
            let g = groups.update_group(req).await?;
            emit(fmt, g.get_ref(), output::group_detail);
        }
        GroupCmd::AddVolumes { group, volumes } => {
            let req = pb::UpdateGroupRequest { group, project, add_volumes: volumes, ..Default::default() };
            let g = groups.update_group(req).await?;
            emit(fmt, g.get_ref(), output::group_detail);
        }
        GroupCmd::RemoveVolumes { group, volumes } => {
            let req = pb::UpdateGroupRequest { group, project, remove_volumes: volumes, ..Default::default() };
            let g = groups.update_group(req).await?;
            emit(fmt, g.get_ref(), output::group_detail);
        }
        GroupCmd::EnableReplication { group, target, interval, no_wait } => {
            let sync_interval_seconds = super::interval_seconds(interval)?;
            let req = pb::EnableReplicationRequest {
                group,
                project,
                target_backend: target,
                sync_interval_seconds,
                no_wait: true,
            };
            let r = replication.enable_replication(req).await?.into_inner();
            finish_group_op(ctx, r, no_wait).await?;
        }
        GroupCmd::Sync { group, no_wait, quiesce, quiesce_timeout } => {
            let req = pb::SyncGroupRequest {
                group,
                project,
                no_wait: true,
                quiesce,
                quiesce_timeout_ms: quiesce_timeout.as_millis() as i64,
            };
            let r = replication.sync_group(req).await?.into_inner();
            if no_wait {
                submitted(fmt, &r.execution_id);
                return Ok(());
            }
            let id = r.execution_id.clone();
            let mut r: pb::SyncGroupResponse = execution::follow(ctx, &id).await?;
            r.execution_id = id;
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["RECOVERY POINT", "FULL", "BYTES", "DURATION (ms)", "CONSISTENCY"]);
                t.row(vec![
                    r.recovery_point_id.clone(),
                    r.full.to_string(),
                    r.bytes.to_string(),
                    r.duration_ms.to_string(),
                    if r.application_consistent { "application" } else { "crash" }.into(),
                ]);
                if !r.consistency_note.is_empty() {
                    eprintln!("{}", r.consistency_note);
                }
                t
            });
        }
        GroupCmd::DisableReplication { group, no_wait } => {
            let req = pb::DisableReplicationRequest { group, project, no_wait: true };
            let r = replication.disable_replication(req).await?.into_inner();
            finish_group_op(ctx, r, no_wait).await?;
        }
        GroupCmd::Failover { group, target, force, discard_changes_on, no_wait } => {
            let req = pb::FailoverGroupRequest {
                group,
                project,
                target_backend: target,
                force,
                discard_changes_on,
                no_wait: true,
            };
            let r = replication.failover_group(req).await?.into_inner();
            finish_group_op(ctx, r, no_wait).await?;
        }
        GroupCmd::ListTargets { group } => {
            let req = pb::ListReplicationTargetsRequest { group, project };
            let r = replication.list_replication_targets(req).await?.into_inner();
            emit(fmt, &r, |r| {
                let mut t = Table::new(&["BACKEND", "SITE", "STATUS"]);
                for x in &r.targets {
                    t.row(vec![x.backend.clone(), x.site.clone(), x.status.clone()]);
                }
                t
            });
        }
        GroupCmd::ReplicationInfo { group } => {
            let req = pb::GetReplicationInfoRequest { group, project, predict: true };
            let r = replication.get_replication_info(req).await?.into_inner();
            emit(fmt, &r, output::replication_info);
        }
    }
    Ok(())
}

/// Prints an execution id for `--no-wait`.
fn submitted(fmt: Format, id: &str) {
    emit(fmt, &serde_json::json!({ "execution_id": id }), |_| {
        let mut t = Table::new(&["EXECUTION"]);
        t.row(vec![id.to_string()]);
        t.footer(format!("follow it with `drover execution watch {id}`"));
        t
    });
}

/// After submitting a group operation: with `no_wait`, prints its execution id; else
/// follows the execution and prints its per-volume outcomes.
pub(super) async fn finish_group_op(
    ctx: &mut Ctx,
    submitted_result: pb::ReplicationResult,
    no_wait: bool,
) -> Result<()> {
    let id = submitted_result.execution_id.clone();
    if no_wait {
        submitted(ctx.fmt, &id);
        return Ok(());
    }
    let mut r: pb::ReplicationResult = execution::follow(ctx, &id).await?;
    r.execution_id = id;
    report(ctx.fmt, &r)
}

/// Prints a group operation's per-volume outcomes; fails the command when any failed.
fn report(fmt: Format, r: &pb::ReplicationResult) -> Result<()> {
    emit(fmt, r, output::replication_result);
    let failed = r.items.iter().filter(|i| i.outcome != "success").count();
    if failed > 0 {
        let reason = r.group.as_ref().map(|g| g.status_reason.clone()).unwrap_or_default();
        bail!("{failed} of {} volume(s) did not succeed: {reason}", r.items.len());
    }
    Ok(())
}

/// `KEY=VALUE` of `--label`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
