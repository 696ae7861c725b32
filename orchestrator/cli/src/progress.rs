//! Live progress of a runbook execution on a terminal: one bar per tier of the step that
//! runs, with counts of succeeded, failed and running items.

use std::collections::BTreeMap;

use drover_proto::v1 as pb;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// The bars of the step running now.
pub struct RunProgress {
    multi: MultiProgress,
    step: String,
    bars: BTreeMap<u32, ProgressBar>,
}

impl Default for RunProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl RunProgress {
    pub fn new() -> Self {
        Self { multi: MultiProgress::new(), step: String::new(), bars: BTreeMap::new() }
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    /// Redraws from the execution's state.
    pub fn update(&mut self, e: &pb::Execution) {
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&e.state_json) else { return };
        let at = state["at"].as_u64().unwrap_or(0) as usize;
        let Some(step) = state["steps"].get(at) else {
            self.finish();
            return;
        };
        let name = format!("{} ({})", step["name"].as_str().unwrap_or(""), step["kind"].as_str().unwrap_or(""));
        // (tier, status, how many): the orchestrator's counts of every item when it sends
        // them (a step of more items than an update carries), else the items shown.
        let tally: Vec<(u32, String, u64)> = match step["item_counts"].as_array() {
            Some(counts) => counts
                .iter()
                .map(|c| {
                    let tier = c["tier"].as_u64().unwrap_or(0) as u32;
                    (tier, c["status"].as_str().unwrap_or("").to_string(), c["n"].as_u64().unwrap_or(0))
                })
                .collect(),
            None => step["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| (i["tier"].as_u64().unwrap_or(0) as u32, i["status"].as_str().unwrap_or("").to_string(), 1))
                .collect(),
        };
        if name != self.step {
            self.finish();
            self.step = name.clone();
            let mut tiers: BTreeMap<u32, u64> = BTreeMap::new();
            for (tier, _, n) in &tally {
                *tiers.entry(*tier).or_default() += n;
            }
            if tiers.is_empty() {
                tiers.insert(0, 0);
            }
            let style = ProgressStyle::with_template("{prefix:>24} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            for (tier, n) in tiers {
                let bar = self.multi.add(ProgressBar::new(n));
                bar.set_style(style.clone());
                bar.set_prefix(if tier == 0 { name.clone() } else { format!("{name} tier {tier}") });
                self.bars.insert(tier, bar);
            }
        }
        for (tier, bar) in &self.bars {
            let count = |s: &[&str]| -> u64 {
                tally.iter().filter(|(t, status, _)| t == tier && s.contains(&status.as_str())).map(|(_, _, n)| n).sum()
            };
            bar.set_position(count(&["succeeded", "failed", "skipped"]));
            bar.set_message(format!(
                "{} succeeded, {} failed, {} skipped, {} running",
                count(&["succeeded"]),
                count(&["failed"]),
                count(&["skipped"]),
                count(&["running", "starting"])
            ));
        }
    }

    /// Leaves the bars of the step that ended on screen.
    pub fn finish(&mut self) {
        for bar in self.bars.values() {
            bar.finish();
        }
        self.bars.clear();
        self.step.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(at: usize, items: serde_json::Value) -> pb::Execution {
        let state = serde_json::json!({"at": at, "steps": [{"name": "move", "kind": "failover", "items": items}]});
        pb::Execution { kind: "runbook".into(), state_json: state.to_string(), ..Default::default() }
    }

    #[test]
    fn one_bar_per_tier_counts_what_ended() {
        let mut p = RunProgress::new();
        p.update(&exec(
            0,
            serde_json::json!([
                {"tier": 1, "status": "succeeded"}, {"tier": 1, "status": "running"},
                {"tier": 2, "status": "pending"}, {"tier": 2, "status": "failed"}, {"tier": 2, "status": "skipped"}
            ]),
        ));
        let bars: Vec<(u32, u64, u64)> =
            p.bars.iter().map(|(t, b)| (*t, b.position(), b.length().unwrap_or(0))).collect();
        assert_eq!(bars, [(1, 1, 2), (2, 2, 3)]);
        assert!(p.bars[&1].message().contains("1 succeeded, 0 failed, 0 skipped, 1 running"));
        // Past the last step the bars are done.
        p.update(&exec(1, serde_json::json!([])));
        assert!(p.bars.is_empty());
    }

    #[test]
    fn the_orchestrators_counts_win_over_the_items_shown() {
        let mut p = RunProgress::new();
        let state = serde_json::json!({"at": 0, "steps": [{"name": "move", "kind": "failover",
            "items": [{"tier": 1, "status": "succeeded"}], "items_more": true,
            "item_counts": [{"tier": 1, "status": "succeeded", "n": 700}, {"tier": 1, "status": "pending", "n": 300},
                            {"tier": 2, "status": "pending", "n": 20}]}]});
        p.update(&pb::Execution { kind: "runbook".into(), state_json: state.to_string(), ..Default::default() });
        let bars: Vec<(u32, u64, u64)> =
            p.bars.iter().map(|(t, b)| (*t, b.position(), b.length().unwrap_or(0))).collect();
        assert_eq!(bars, [(1, 700, 1000), (2, 0, 20)]);
    }
}
