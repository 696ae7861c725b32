//! Every key of both example config files can be set from the environment: for each key
//! (commented-out examples included) the test sets its `DROVER_…` variable to the file's
//! value, runs `drover … --print-config` with no file, and checks that the value arrived
//! and that its origin is that variable.

use std::path::{Path, PathBuf};
use std::process::Command;

use drover_tests::cluster::locate_drover;

/// (dotted key, TOML value text) of every `key = value` line, commented or not.
fn example_keys(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let body = line.strip_prefix("# ").unwrap_or(line);
        let Some((key, value)) = body.split_once(" = ") else { continue };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let path = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
        out.push((path, value.trim().to_string()));
    }
    out
}

fn env_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", key.split('.').collect::<Vec<_>>().join("__").to_uppercase())
}

fn print_config(server: &str, file: Option<&Path>, env: &[(String, String)]) -> serde_json::Value {
    let mut cmd = Command::new(locate_drover().unwrap());
    cmd.arg(server).arg("--print-config");
    if let Some(f) = file {
        cmd.arg("--config").arg(f);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("DROVER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "drover {server} --print-config failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn lookup<'a>(v: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    key.split('.').fold(v, |v, part| &v[part])
}

fn check(server: &str, example: &str, prefix: &str, at_least: usize) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("config").join(example);
    let text = std::fs::read_to_string(&path).unwrap();
    let keys = example_keys(&text);
    assert!(keys.len() >= at_least, "found only {} keys in {example}: {keys:?}", keys.len());

    // The expected values: the example with every commented key switched on.
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join(example);
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(body)
                if body
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
            {
                body.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&full, uncommented).unwrap();
    let expected = print_config(server, Some(&full), &[]);

    let env: Vec<(String, String)> = keys.iter().map(|(k, v)| (env_name(prefix, k), v.clone())).collect();
    let actual = print_config(server, None, &env);
    for ((key, _), (var, _)) in keys.iter().zip(&env) {
        let lower = key.to_lowercase();
        assert_eq!(
            lookup(&actual["config"], &lower),
            lookup(&expected["config"], &lower),
            "{server}: {var} did not set `{key}`"
        );
        let origin = actual["origins"].as_object().unwrap().iter().find(|(k, _)| k.starts_with(&lower));
        let origin = origin.map(|(_, o)| o.as_str().unwrap_or_default().to_string()).unwrap_or_default();
        // A table-valued variable (MOCK__FAIL='{promote=0.1}') is named by its leaf keys.
        assert!(
            origin.starts_with(&format!("environment variable {}", var.to_uppercase())),
            "{server}: `{key}` came from {origin:?}, not {var}"
        );
    }
}

#[test]
fn every_orchestrator_key_can_be_set_from_the_environment() {
    check("orchestrator", "orchestrator.example.toml", "DROVER_", 13);
}

#[test]
fn every_agent_key_can_be_set_from_the_environment() {
    check("agent", "agent.example.toml", "DROVER_AGENT_", 13);
}
