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
        let items = step["items"].as_array().cloned().unwrap_or_default();
        if name != self.step {
            self.finish();
            self.step = name.clone();
            let mut tiers: BTreeMap<u32, u64> = BTreeMap::new();
            for i in &items {
                *tiers.entry(i["tier"].as_u64().unwrap_or(0) as u32).or_default() += 1;
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
            let of_tier: Vec<&serde_json::Value> =
                items.iter().filter(|i| i["tier"].as_u64().unwrap_or(0) as u32 == *tier).collect();
            let count = |s: &[&str]| of_tier.iter().filter(|i| s.contains(&i["status"].as_str().unwrap_or(""))).count();
            bar.set_position(count(&["succeeded", "failed", "skipped"]) as u64);
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
}
