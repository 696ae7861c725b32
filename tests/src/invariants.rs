//! The invariants the chaos tests check after the dust settles, from the agents' own
//! records: no op_id entered a driver twice, and every volume has exactly one primary,
//! on its group's active backend.

use std::collections::HashMap;
use std::path::Path;

use drover_cli::client::Clients;
use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;

/// One mock op log line.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Logged {
    pub op: String,
    /// The volume, group or clone it acted on.
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub op_id: String,
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub at_ms: i64,
}

/// Every line of a mock op log (each line is whole JSON).
pub fn op_log(path: &Path) -> Vec<Logged> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every op log line is whole JSON"))
        .collect()
}

/// The op_ids that entered a backend's driver more than once, as `backend:op_id xN`,
/// and how many driver ops were logged in all. `logs` are (backend, op log path).
pub fn repeated_op_ids(logs: &[(&str, &Path)]) -> (Vec<String>, usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for (backend, path) in logs {
        for e in op_log(path).into_iter().filter(|e| !e.op_id.is_empty()) {
            total += 1;
            *seen.entry(format!("{backend}:{}", e.op_id)).or_default() += 1;
        }
    }
    (seen.into_iter().filter(|(_, n)| *n > 1).map(|(k, n)| format!("{k} x{n}")).collect(), total)
}

/// Volumes whose primary is not exactly their group's active backend, asked of every
/// agent (`agents`: backend name, agent endpoint), for groups of project `tests`.
/// `dir` is where the cluster was started (its certificates).
pub async fn role_violations(
    c: &mut Clients,
    dir: &std::path::Path,
    agents: &[(&str, String)],
    groups: &[String],
) -> Vec<String> {
    project_role_violations(c, dir, agents, "tests", groups).await
}

/// [`role_violations`] for the groups (ids or names) of `project`.
pub async fn project_role_violations(
    c: &mut Clients,
    dir: &std::path::Path,
    agents: &[(&str, String)],
    project: &str,
    groups: &[String],
) -> Vec<String> {
    let mut clients = Vec::new();
    for (backend, endpoint) in agents {
        clients.push((*backend, crate::cluster::agent_client(endpoint, dir).await));
    }
    let mut out = Vec::new();
    for id in groups {
        let g = c
            .groups
            .get_group(pb::GetGroupRequest { group: id.clone(), project: project.into() })
            .await
            .expect("group")
            .into_inner();
        for v in &g.volume_ids {
            let mut primaries = Vec::new();
            for (backend, agent) in clients.iter_mut() {
                let info = agent.get_volume(apb::GetVolumeRequest { volume_id: v.clone() }).await;
                if info.is_ok_and(|i| i.into_inner().replication_role == "primary") {
                    primaries.push(*backend);
                }
            }
            if primaries != [g.active_backend.as_str()] {
                out.push(format!(
                    "volume {v} of {}: primary on {primaries:?}, group active on {}",
                    g.name, g.active_backend
                ));
            }
        }
    }
    out
}
