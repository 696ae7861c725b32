//! One trace across processes: a planned failover on real qemu agents, every process
//! logging JSON (`--log-format json`). The execution's trace id (from the API) is found
//! on the orchestrator's execution, step and agent-call spans, on the source agent's
//! spans for the final sync and the demote, and on the target agent's spans for the
//! promote and for the replica stream the source opened to it: the agents continued the
//! trace from the `traceparent` each call carried.

use std::path::Path;

use drover_proto::v1 as pb;
use drover_tests::cluster::qemu_io;
use drover_tests::{Cluster, StoreChoice, consistent_group};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Every JSON log line of a process whose spans carry `trace` (other lines and plain
/// text, such as the ready line, are skipped).
fn traced(log: &Path, trace: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(log).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["trace_id"].as_str() == Some(trace)))
                || v["span"]["trace_id"].as_str() == Some(trace)
        })
        .collect()
}

/// Whether some line has a span named `name` whose field `key` contains `value`.
fn has_span(lines: &[Value], name: &str, key: &str, value: &str) -> bool {
    lines.iter().any(|l| {
        l["spans"].as_array().into_iter().flatten().chain(std::iter::once(&l["span"])).any(|s| {
            s["name"] == name
                && (s[key].as_str().is_some_and(|v| v.contains(value))
                    || s[key].as_u64().is_some_and(|v| v.to_string() == value))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_planned_failover_is_one_trace_across_the_orchestrator_and_both_agents() {
    let json = ["--log-format", "json"];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "qemu", &json, &json).await;
    let mut c = cluster.clients().await;
    let vols = consistent_group(&mut c, "tr", 2, 16 * MIB).await;
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "tr".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 3600,
            no_wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    let group_id = r.group.unwrap().id;
    let uri = c
        .volumes
        .attach_volume(pb::AttachVolumeRequest { volume: vols[0].clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner()
        .uri;
    qemu_io(&uri, &["write -P 0x31 0 1M".to_string()]).unwrap();

    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "tr".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .expect("planned failover")
        .into_inner();
    assert_eq!(r.final_sync_bytes, Some(MIB as i64), "the final sync shipped the written megabyte");
    let e = c.executions.get_execution(pb::GetExecutionRequest { id: r.execution_id.clone() }).await.unwrap();
    let trace = e.into_inner().trace_id;
    assert_eq!(trace.len(), 32, "a W3C trace id: {trace:?}");
    // Span lines are written as spans close; the agents' last ones may trail the answer.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let orch = traced(&cluster.orchestrator.proc.log, &trace);
    let (a, b) = (traced(&cluster.agents[0].proc.log, &trace), traced(&cluster.agents[1].proc.log, &trace));
    let names = |lines: &[Value]| -> std::collections::BTreeSet<String> {
        lines
            .iter()
            .flat_map(|l| l["spans"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    };
    println!(
        "trace {trace}: orchestrator {} lines {:?}; backend-a {} lines {:?}; backend-b {} lines {:?}",
        orch.len(),
        names(&orch),
        a.len(),
        names(&a),
        b.len(),
        names(&b)
    );
    // The orchestrator: the execution (with its group), its steps, and its agent calls
    // to both backends, each with an op_id and the epoch.
    assert!(has_span(&orch, "execution", "execution", &r.execution_id), "{orch:#?}");
    assert!(has_span(&orch, "execution", "group", &group_id), "{orch:#?}");
    assert!(has_span(&orch, "step", "step", "final-sync") && has_span(&orch, "step", "step", "promote"), "{orch:#?}");
    assert!(has_span(&orch, "agent_call", "backend", "backend-a"), "{orch:#?}");
    assert!(has_span(&orch, "agent_call", "backend", "backend-b"), "{orch:#?}");
    assert!(has_span(&orch, "agent_call", "op_id", "final-sync"), "{orch:#?}");
    // The source agent: the orchestrator's SyncGroup call, as a mutation with its op_id.
    assert!(has_span(&a, "rpc", "rpc", "/SyncGroup"), "{a:#?}");
    assert!(has_span(&a, "mutation", "op_id", "final-sync"), "{a:#?}");
    // The target agent: the promotes, and the replica stream the source agent opened.
    assert!(has_span(&b, "rpc", "rpc", "/PromoteVolume") || has_span(&b, "rpc", "rpc", "/Promote"), "{b:#?}");
    assert!(has_span(&b, "rpc", "rpc", "/ApplyRecoveryPoint"), "the peer continued the trace: {b:#?}");
    // Nothing else ran under this trace: no other execution's spans.
    for l in &orch {
        for s in l["spans"].as_array().into_iter().flatten().filter(|s| s["name"] == "execution") {
            assert_eq!(s["execution"].as_str(), Some(r.execution_id.as_str()), "{l}");
        }
    }
}
