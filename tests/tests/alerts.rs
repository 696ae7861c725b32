//! The shipped Prometheus alert rules (`docs/alerts/`) are valid and do what they say:
//! `promtool check rules`, and `promtool test rules` against series that cross each
//! threshold (and stay just under it). Needs Debian's `prometheus` package (promtool),
//! which `cargo xtask test` installs.

use std::path::PathBuf;
use std::process::Command;

fn alerts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/alerts")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool").args(args).current_dir(alerts()).output().unwrap_or_else(|e| {
        panic!("cannot run promtool ({e}); install Debian's `prometheus` package (`cargo xtask test` does)")
    });
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_pass_their_unit_tests() {
    let checked = promtool(&["check", "rules", "drover.rules.yml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "drover.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every metric the rules read is one the servers export (names as exposed).
#[test]
fn the_rules_read_only_exported_metrics() {
    let rules = std::fs::read_to_string(alerts().join("drover.rules.yml")).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources = ["orchestrator/server/src/metrics.rs", "agents/sdk/src/metrics.rs"]
        .map(|p| std::fs::read_to_string(root.join(p)).unwrap())
        .join("\n");
    for (metric, registered) in [
        ("drover_group_rpo_seconds", "\"group_rpo_seconds\""),
        ("drover_group_interval_seconds", "\"group_interval_seconds\""),
        ("drover_agent_syncs_total", "\"syncs\""),
        ("drover_backend_up", "\"backend_up\""),
        ("drover_executions_at_prompt", "\"executions_at_prompt\""),
        ("drover_backend_frozen", "\"backend_frozen\""),
    ] {
        assert!(rules.contains(metric), "the rules no longer read {metric}");
        assert!(sources.contains(registered), "{metric} is not registered as {registered}");
    }
}

/// The Grafana dashboard (`docs/grafana/drover.json`) is JSON Grafana loads, and every
/// metric its panels query is one the servers register.
#[test]
fn the_grafana_dashboard_queries_exported_metrics() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("docs/grafana/drover.json")).unwrap()).unwrap();
    let (orch, agent) = (
        std::fs::read_to_string(root.join("orchestrator/server/src/metrics.rs")).unwrap(),
        std::fs::read_to_string(root.join("agents/sdk/src/metrics.rs")).unwrap(),
    );
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 5, "{}", panels.len());
    let mut checked = 0;
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for word in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("drover_"))
            {
                let base =
                    ["_total", "_bucket", "_count", "_sum"].iter().fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                let (source, name) = match base.strip_prefix("drover_agent_") {
                    Some(n) => (&agent, n),
                    None => (&orch, base.strip_prefix("drover_").unwrap()),
                };
                assert!(
                    source.contains(&format!("\"{name}\"")),
                    "panel {:?} queries {word}, which nothing registers",
                    p["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 9, "{checked}");
}
