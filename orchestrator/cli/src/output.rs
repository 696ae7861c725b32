//! Tables for people, JSON for scripts.

use drover_proto::v1 as pb;
use serde::Serialize;

use crate::size::format_size;

/// How the CLI prints results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A table with aligned columns.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders the table; an empty one says so.
    pub fn render(&self) -> String {
        if self.rows.is_empty() {
            return "(none)\n".into();
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            padded.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(self.headers.iter().map(|h| h.to_string()).collect());
        for row in &self.rows {
            out.push_str(&line(row.clone()));
        }
        out
    }
}

/// Prints `value` as JSON, or as the table `table` builds.
pub fn emit<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> Table) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value).expect("API messages serialise")),
        Format::Table => print!("{}", table(value).render()),
    }
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

pub fn volumes(vols: &[pb::Volume]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "PROJECT", "SIZE", "BACKEND", "ACTIVE", "STATUS", "REPLICATION", "GROUP"]);
    for v in vols {
        t.row(vec![
            v.id.clone(),
            v.name.clone(),
            v.project.clone(),
            format_size(v.size_bytes),
            v.backend.clone(),
            v.active_backend.clone(),
            if v.status_reason.is_empty() { v.status.clone() } else { format!("{} ({})", v.status, v.status_reason) },
            v.replication_status.clone(),
            short(&v.group_id),
        ]);
    }
    t
}

pub fn groups(groups: &[pb::Group]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "PROJECT",
        "TYPE",
        "VOLUMES",
        "PRIMARY",
        "ACTIVE",
        "TARGET",
        "REPLICATION",
        "EPOCH",
    ]);
    for g in groups {
        t.row(vec![
            g.id.clone(),
            g.name.clone(),
            g.project.clone(),
            g.group_type.clone(),
            g.volume_ids.len().to_string(),
            g.primary_backend.clone(),
            g.active_backend.clone(),
            g.replication_target.clone(),
            g.replication_status.clone(),
            g.epoch.to_string(),
        ]);
    }
    t
}

/// One group in detail: its fields, then its history.
pub fn group_detail(g: &pb::Group) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("id", g.id.clone()),
        ("name", g.name.clone()),
        ("project", g.project.clone()),
        ("type", g.group_type.clone()),
        ("volumes", g.volume_ids.join(", ")),
        ("primary backend", g.primary_backend.clone()),
        ("active backend", g.active_backend.clone()),
        ("replication target", g.replication_target.clone()),
        ("replication status", g.replication_status.clone()),
        ("status reason", g.status_reason.clone()),
        ("sync interval", format!("{} s", g.sync_interval_seconds)),
        ("divergence point", g.divergence_point.clone()),
        ("rpo", if g.rpo_ms < 0 { "unknown".into() } else { format!("{} ms", g.rpo_ms) }),
        ("epoch", g.epoch.to_string()),
    ] {
        t.row(vec![k.into(), v]);
    }
    for e in &g.history {
        t.row(vec![format!("history @{}", e.at_ms), format!("{}: {} (epoch {})", e.action, e.detail, e.epoch)]);
    }
    t
}

pub fn replication_result(r: &pb::ReplicationResult) -> Table {
    let mut t = Table::new(&["VOLUME", "OUTCOME", "REASON"]);
    for i in &r.items {
        t.row(vec![i.volume_id.clone(), i.outcome.clone(), i.reason.clone()]);
    }
    if let Some(g) = &r.group {
        t.row(vec![
            format!("group {}", g.name),
            g.replication_status.clone(),
            format!("active on {}", g.active_backend),
        ]);
    }
    t
}

pub fn backends(list: &[pb::Backend]) -> Table {
    let mut t = Table::new(&["NAME", "SITE", "DRIVER", "STATUS", "FROZEN", "AGENTS", "CAPABILITIES"]);
    for b in list {
        let agents: Vec<String> = b.agents.iter().map(|a| format!("{}={}", a.agent_id, a.liveness)).collect();
        t.row(vec![
            b.name.clone(),
            b.site.clone(),
            b.driver.clone(),
            b.status.clone(),
            b.frozen.to_string(),
            agents.join(","),
            b.capabilities.join(","),
        ]);
    }
    t
}

pub fn replication_info(i: &pb::GroupReplicationInfo) -> Table {
    let mut t = Table::new(&[
        "VOLUME",
        "ROLE",
        "STATUS",
        "LAST SYNC (ms)",
        "DURATION (ms)",
        "BYTES",
        "RECOVERY POINT",
        "ERROR",
    ]);
    for v in &i.volumes {
        t.row(vec![
            v.volume_id.clone(),
            v.role.clone(),
            v.status.clone(),
            v.last_sync_time_ms.to_string(),
            v.last_sync_duration_ms.to_string(),
            v.last_sync_bytes.to_string(),
            v.recovery_point_id.clone(),
            v.error.clone(),
        ]);
    }
    t.row(vec!["RPO".into(), String::new(), if i.rpo_ms < 0 { "unknown".into() } else { format!("{} ms", i.rpo_ms) }]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_reports_empty() {
        let mut t = Table::new(&["A", "LONGER"]);
        assert_eq!(t.render(), "(none)\n");
        t.row(vec!["wide-cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide-cell  x\n");
    }
}
