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

/// A table with aligned columns, and footer lines printed after it.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    footer: Vec<String>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new(), footer: Vec::new() }
    }

    /// Adds a row; missing cells print empty.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Adds a line printed below the table (a summary such as the RPO).
    pub fn footer(&mut self, line: String) {
        self.footer.push(line);
    }

    /// Renders the table; an empty one says so.
    pub fn render(&self) -> String {
        if self.rows.is_empty() {
            let mut out = String::from("(none)\n");
            for f in &self.footer {
                out.push_str(f);
                out.push('\n');
            }
            return out;
        }
        let widths = self.widths();
        let mut out = line(&widths, &self.headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
        for row in &self.rows {
            out.push_str(&line(&widths, row));
        }
        for f in &self.footer {
            out.push_str(f);
            out.push('\n');
        }
        out
    }

    /// Each column's width: its widest cell or its header.
    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        widths
    }
}

/// One row padded to `widths`. Padding by hand: `format!("{c:<w$}")` panics for widths
/// over 65,535.
fn line(widths: &[usize], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, w) in widths.iter().enumerate() {
        let cell = cells.get(i).map(String::as_str).unwrap_or("");
        if i > 0 {
            out.push_str("  ");
        }
        out.push_str(cell);
        out.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.chars().count())));
    }
    out.trim_end().to_string() + "\n"
}

/// Prints a listing page by page as the pages arrive, so a long listing starts at once
/// and never sits whole in memory. A table's columns take their widths from the first
/// page (a wider cell later only pushes its own row); JSON is the same document a
/// whole-listing `emit` would print: `{"<field>": [...], "next_marker": ""}`.
pub struct PageStream<T> {
    format: Format,
    field: &'static str,
    table: fn(&[T]) -> Table,
    widths: Option<Vec<usize>>,
    rows: usize,
}

impl<T: Serialize> PageStream<T> {
    /// A listing of `field` (its name in the response message), whose table `table` makes.
    pub fn new(format: Format, field: &'static str, table: fn(&[T]) -> Table) -> Self {
        Self { format, field, table, widths: None, rows: 0 }
    }

    /// Prints one page's rows.
    pub fn page(&mut self, items: &[T]) {
        use std::io::Write;
        let out = self.render_page(items);
        // A closed pipe (`| head`) ends the listing quietly, as `print!` would not.
        if std::io::stdout().lock().write_all(out.as_bytes()).is_err() {
            std::process::exit(0);
        }
    }

    /// Ends the listing (an empty one says so).
    pub fn finish(self) {
        print!("{}", self.render_end());
    }

    fn render_page(&mut self, items: &[T]) -> String {
        let mut out = String::new();
        match self.format {
            Format::Json => {
                for item in items {
                    if self.rows == 0 {
                        out.push_str(&format!("{{\n  \"{}\": [\n", self.field));
                    } else {
                        out.push_str(",\n");
                    }
                    let json = serde_json::to_string_pretty(item).expect("API messages serialise");
                    for (i, l) in json.lines().enumerate() {
                        if i > 0 {
                            out.push('\n');
                        }
                        out.push_str("    ");
                        out.push_str(l);
                    }
                    self.rows += 1;
                }
            }
            Format::Table => {
                if items.is_empty() {
                    return out;
                }
                let t = (self.table)(items);
                let widths = self.widths.get_or_insert_with(|| {
                    let w = t.widths();
                    out.push_str(&line(&w, &t.headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()));
                    w
                });
                for row in &t.rows {
                    out.push_str(&line(widths, row));
                }
                self.rows += items.len();
            }
        }
        out
    }

    fn render_end(&self) -> String {
        match self.format {
            Format::Json if self.rows == 0 => format!("{{\n  \"{}\": [],\n  \"next_marker\": \"\"\n}}\n", self.field),
            Format::Json => "\n  ],\n  \"next_marker\": \"\"\n}\n".to_string(),
            Format::Table if self.rows == 0 => "(none)\n".to_string(),
            Format::Table => String::new(),
        }
    }
}

/// Prints `value` as JSON, or as the table `table` builds.
pub fn emit<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> Table) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value).expect("API messages serialise")),
        Format::Table => print!("{}", table(value).render()),
    }
}

/// A time in milliseconds since the epoch as RFC 3339 (UTC); "never" for 0 or less.
pub fn timestamp(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
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
pub fn snapshots(list: &[pb::Snapshot]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "PROJECT", "GROUP", "BACKEND", "VOLUMES", "STATUS", "CREATED"]);
    for s in list {
        t.row(vec![
            s.id.clone(),
            s.name.clone(),
            s.project.clone(),
            short(&s.group_id),
            s.backend.clone(),
            s.members.iter().map(|m| m.volume_name.as_str()).collect::<Vec<_>>().join(", "),
            if s.status_reason.is_empty() { s.status.clone() } else { format!("{} ({})", s.status, s.status_reason) },
            timestamp(s.created_at_ms),
        ]);
    }
    t
}

pub fn snapshot_detail(s: &pb::Snapshot) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, v) in [
        ("id", s.id.clone()),
        ("name", s.name.clone()),
        ("project", s.project.clone()),
        ("group", s.group_id.clone()),
        ("backend", s.backend.clone()),
        ("status", s.status.clone()),
        ("status reason", s.status_reason.clone()),
        ("created", timestamp(s.created_at_ms)),
        ("note", s.note.clone()),
        ("execution", s.execution_id.clone()),
    ] {
        t.row(vec![k.into(), v]);
    }
    for m in &s.members {
        t.row(vec![format!("volume {}", m.volume_name), format!("{} ({})", m.volume_id, format_size(m.size_bytes))]);
    }
    t
}

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
        (
            "final sync now",
            match (g.predicted_final_sync_bytes, g.predicted_final_sync_ms) {
                (b, _) if b < 0 => "unknown".into(),
                (b, ms) if ms < 0 => format!("{b} bytes (time unknown: no sync measured yet)"),
                (b, ms) => format!("{b} bytes in about {ms} ms"),
            },
        ),
        ("epoch", g.epoch.to_string()),
        ("tier", g.tier.to_string()),
        ("labels", {
            let mut l: Vec<String> = g.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            l.sort();
            l.join(", ")
        }),
    ] {
        t.row(vec![k.into(), v]);
    }
    for e in &g.history {
        t.row(vec![
            format!("history {}", timestamp(e.at_ms)),
            format!("{}: {} (epoch {})", e.action, e.detail, e.epoch),
        ]);
    }
    t
}

/// A group's history events, as given (newest first).
pub fn group_events(events: &[pb::GroupEvent]) -> Table {
    let mut t = Table::new(&["TIME", "ACTION", "EPOCH", "DETAIL"]);
    for e in events {
        t.row(vec![timestamp(e.at_ms), e.action.clone(), e.epoch.to_string(), e.detail.clone()]);
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
    let mut t =
        Table::new(&["VOLUME", "ROLE", "STATUS", "LAST SYNC", "DURATION (ms)", "BYTES", "RECOVERY POINT", "ERROR"]);
    for v in &i.volumes {
        t.row(vec![
            v.volume_id.clone(),
            v.role.clone(),
            v.status.clone(),
            timestamp(v.last_sync_time_ms),
            v.last_sync_duration_ms.to_string(),
            v.last_sync_bytes.to_string(),
            v.recovery_point_id.clone(),
            v.error.clone(),
        ]);
    }
    t.footer(if i.rpo_ms < 0 {
        "RPO: unknown (a volume has no complete recovery point yet, or its agent did not answer)".into()
    } else {
        format!("RPO: {} ms (a disaster failover now would lose the writes of the last {} ms)", i.rpo_ms, i.rpo_ms)
    });
    if i.predicted_final_sync_bytes >= 0 {
        let time = if i.predicted_final_sync_ms >= 0 {
            format!("about {} ms at {} bytes/s measured", i.predicted_final_sync_ms, i.measured_rate_bytes_per_s)
        } else {
            "time unknown (no sync measured yet)".into()
        };
        t.footer(format!(
            "planned failover now: its final sync would ship {} bytes, {time}",
            i.predicted_final_sync_bytes
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str, name: &str) -> pb::Group {
        pb::Group { id: id.into(), name: name.into(), project: "p".into(), ..Default::default() }
    }

    #[test]
    fn a_streamed_listing_prints_the_same_json_as_a_whole_one() {
        let pages = [vec![], vec![group("1", "a"), group("2", "b")], vec![], vec![group("3", "c")]];
        let mut s = PageStream::new(Format::Json, "groups", groups);
        let mut out = String::new();
        for p in &pages {
            out.push_str(&s.render_page(p));
        }
        out.push_str(&s.render_end());
        let whole = pb::ListGroupsResponse { groups: pages.concat(), next_marker: String::new() };
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed, serde_json::to_value(&whole).unwrap());
        // Nothing listed: still the document, with an empty list.
        let s = PageStream::new(Format::Json, "groups", groups);
        let parsed: serde_json::Value = serde_json::from_str(&s.render_end()).expect("valid JSON");
        assert_eq!(parsed, serde_json::to_value(pb::ListGroupsResponse::default()).unwrap());
    }

    #[test]
    fn a_streamed_table_prints_its_header_once_with_the_first_pages_widths() {
        let mut s = PageStream::new(Format::Table, "groups", groups);
        let first = s.render_page(&[group("1", "a-long-name")]);
        let second = s.render_page(&[group("2", "b")]);
        let third = s.render_page(&[group("3", "a-name-longer-than-the-first")]);
        assert!(first.starts_with("ID  NAME         PROJECT"), "{first}");
        assert_eq!(first.lines().count(), 2);
        assert!(second.starts_with("2   b            p"), "later rows pad to the first page's widths: {second:?}");
        assert!(
            third.starts_with("3   a-name-longer-than-the-first  p"),
            "a wider cell pushes only its row: {third:?}"
        );
        assert_eq!(s.render_end(), "");
        assert_eq!(PageStream::new(Format::Table, "groups", groups).render_end(), "(none)\n");
    }

    #[test]
    fn table_aligns_columns_and_reports_empty() {
        let mut t = Table::new(&["A", "LONGER"]);
        assert_eq!(t.render(), "(none)\n");
        t.row(vec!["wide-cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide-cell  x\n");
    }

    #[test]
    fn cells_wider_than_a_format_width_do_not_panic() {
        let mut t = Table::new(&["NAME", "SPECS"]);
        let wide = "k=".to_string() + &"v".repeat(70_000);
        t.row(vec!["a".into(), wide.clone()]);
        t.row(vec!["bb".into(), "x".into()]);
        let out = t.render();
        assert!(out.contains(&wide));
        assert!(out.lines().nth(2).unwrap().starts_with("bb    x"), "narrow rows stay aligned");
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(timestamp(1_764_355_200_123), "2025-11-28T18:40:00.123Z");
        assert_eq!(timestamp(0), "never");
    }

    #[test]
    fn replication_info_puts_the_rpo_on_its_own_line() {
        let info = pb::GroupReplicationInfo {
            group: None,
            volumes: vec![pb::VolumeReplicationInfo {
                volume_id: "v1".into(),
                status: "error".into(),
                error: "backend b: no answer".into(),
                ..Default::default()
            }],
            rpo_ms: 1500,
            predicted_final_sync_bytes: -1,
            predicted_final_sync_ms: -1,
            measured_rate_bytes_per_s: 0,
        };
        let out = replication_info(&info).render();
        let rpo = out.lines().find(|l| l.contains("RPO")).unwrap();
        assert_eq!(rpo, "RPO: 1500 ms (a disaster failover now would lose the writes of the last 1500 ms)");
        assert!(out.lines().any(|l| l.starts_with("v1") && l.ends_with("backend b: no answer")), "{out}");
        assert!(!out.contains("planned failover"), "no prediction was asked: {out}");
        let predicted = pb::GroupReplicationInfo {
            predicted_final_sync_bytes: 3 << 20,
            predicted_final_sync_ms: 40,
            measured_rate_bytes_per_s: 80 << 20,
            ..info
        };
        let out = replication_info(&predicted).render();
        let line = out.lines().find(|l| l.starts_with("planned failover now")).expect(&out);
        assert_eq!(
            line,
            "planned failover now: its final sync would ship 3145728 bytes, about 40 ms at 83886080 bytes/s measured"
        );
    }
}
