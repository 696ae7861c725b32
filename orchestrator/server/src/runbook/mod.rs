//! Runbooks: declarative plans (YAML in `runbooks/`) run as executions of the procedure
//! engine. `schema` is the file format and its loader.

pub mod kinds;
pub mod plan;
pub mod schema;

/// The 1-based line and column of step `name`'s `name:` in the runbook text (1:1 when
/// it cannot be found).
pub fn position_of_step(text: &str, name: &str) -> (usize, usize) {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t == format!("name: {name}") || t == format!("name: \"{name}\"") {
            return (i + 1, line.len() - t.len() + 1);
        }
    }
    (1, 1)
}
pub mod report;
pub mod run;
pub mod steps;
