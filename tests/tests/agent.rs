//! The agent's guarantees, against a real agent process with the mock driver: epoch
//! fencing, idempotency by op_id (proven by the mock's operation log), and ABORTED for a
//! second concurrent mutation.

use std::path::Path;
use std::time::Duration;

use drover_proto::agent::v1 as apb;
use drover_proto::agent::v1::agent_client::AgentClient;
use drover_tests::cluster::{AgentSpec, Server, locate_drover, start_agent};
use tonic::Code;
use tonic::transport::Channel;

fn agent(dir: &Path, extra: &[&str]) -> Server {
    let bin = locate_drover().unwrap();
    let oplog = dir.join("oplog.jsonl").display().to_string();
    let mut args: Vec<String> = vec!["--set".into(), format!("mock.oplog={oplog}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    start_agent(
        &bin,
        dir,
        AgentSpec {
            name: "agent",
            driver: "mock",
            site: "site-a",
            backend: "backend-a",
            orchestrator: "",
            extra: args,
        },
    )
    .unwrap()
}

/// The directory a test agent was started in (its log, and the certificates, are there).
fn s_dir(s: &Server) -> &Path {
    s.proc.log.parent().expect("the log is in the test's directory")
}

async fn client(s: &Server) -> AgentClient<Channel> {
    drover_tests::cluster::agent_client(&s.endpoint, s_dir(s)).await
}

fn ctx(op: &str, epoch: u64, scope: &str) -> Option<apb::OpContext> {
    Some(apb::OpContext { op_id: op.into(), epoch, fence_scope: scope.into() })
}

fn create(op: &str, epoch: u64, vol: &str) -> apb::CreateVolumeRequest {
    apb::CreateVolumeRequest {
        ctx: ctx(op, epoch, &format!("volume/{vol}")),
        volume_id: vol.into(),
        size_bytes: 1 << 20,
        ..Default::default()
    }
}

fn oplog_count(dir: &Path, op: &str, target: &str) -> usize {
    let text = std::fs::read_to_string(dir.join("oplog.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["op"] == op && e["target"] == target)
        .count()
}

#[tokio::test]
async fn stale_epoch_is_refused_even_after_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    c.create_volume(create("op-1", 10, "v1")).await.expect("epoch 10 admitted");
    let stale = c
        .extend_volume(apb::ExtendVolumeRequest {
            ctx: ctx("op-2", 9, "volume/v1"),
            volume_id: "v1".into(),
            new_size_bytes: 2 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("stale epoch 9") && stale.message().contains("seen epoch 10"),
        "{}",
        stale.message()
    );
    assert_eq!(oplog_count(dir.path(), "extend_volume", "v1"), 0, "a fenced call must not reach the driver");
    // Another scope has its own epoch.
    c.create_volume(create("op-3", 1, "v2")).await.expect("scope volume/v2 starts fresh");

    // The highest epoch is durable: a restarted agent still refuses the stale owner.
    server.proc.kill();
    drop(server);
    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    let stale = c
        .extend_volume(apb::ExtendVolumeRequest {
            ctx: ctx("op-4", 5, "volume/v1"),
            volume_id: "v1".into(),
            new_size_bytes: 2 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{}", stale.message());
}

#[tokio::test]
async fn repeated_op_id_runs_once_and_replays_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    let first = c.create_volume(create("op-create", 3, "v1")).await.unwrap().into_inner();
    let again = c.create_volume(create("op-create", 3, "v1")).await.unwrap().into_inner();
    assert_eq!(first, again);
    assert_eq!(oplog_count(dir.path(), "create_volume", "v1"), 1, "the driver must see the create once");

    // A refused operation's outcome is replayed too, without calling the driver again.
    let shrink =
        apb::ExtendVolumeRequest { ctx: ctx("op-shrink", 3, "volume/v1"), volume_id: "v1".into(), new_size_bytes: 512 };
    let e1 = c.extend_volume(shrink.clone()).await.unwrap_err();
    let e2 = c.extend_volume(shrink.clone()).await.unwrap_err();
    assert_eq!((e1.code(), e1.message()), (e2.code(), e2.message()));
    assert_eq!(oplog_count(dir.path(), "extend_volume", "v1"), 1);

    // The ledger is durable: after a restart (the mock forgets its volumes), the same
    // op_id still answers with the recorded outcome and the driver is not called.
    server.proc.kill();
    drop(server);
    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    let replayed = c.create_volume(create("op-create", 3, "v1")).await.unwrap().into_inner();
    assert_eq!(replayed, first);
    assert_eq!(oplog_count(dir.path(), "create_volume", "v1"), 1);
    let op = c.get_operation(apb::GetOperationRequest { op_id: "op-create".into() }).await.unwrap().into_inner();
    assert_eq!(op.state, "succeeded");
    let unknown = c.get_operation(apb::GetOperationRequest { op_id: "never".into() }).await.unwrap().into_inner();
    assert_eq!(unknown.state, "unknown");
    // The agent's op log agrees: each op_id ran once, replays wrote nothing.
    assert_eq!(agent_ops(dir.path()), ["create_volume:op-create", "extend_volume:op-shrink"]);
}

#[tokio::test]
async fn second_mutation_on_a_busy_volume_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &["--set", "mock.latency=800ms"]);
    let mut c = client(&server).await;
    c.create_volume(create("op-0", 1, "v1")).await.unwrap();
    let mut c2 = c.clone();
    let slow = tokio::spawn(async move {
        c2.extend_volume(apb::ExtendVolumeRequest {
            ctx: ctx("op-a", 1, "volume/v1"),
            volume_id: "v1".into(),
            new_size_bytes: 2 << 20,
        })
        .await
    });
    // Send the second call only once the agent says the first is running, so the order
    // does not depend on timing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let op = c.get_operation(apb::GetOperationRequest { op_id: "op-a".into() }).await.unwrap().into_inner();
        if op.state == "running" {
            break;
        }
        assert!(op.state == "unknown", "op-a ended before the second call was sent: {op:?}");
        assert!(std::time::Instant::now() < deadline, "op-a never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = c
        .extend_volume(apb::ExtendVolumeRequest {
            ctx: ctx("op-b", 1, "volume/v1"),
            volume_id: "v1".into(),
            new_size_bytes: 3 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{}", busy.message());
    assert!(busy.message().contains("op-a"), "{}", busy.message());
    assert_eq!(slow.await.unwrap().unwrap().into_inner().size_bytes, 2 << 20);
    // Once the first finished, the volume takes mutations again.
    c.extend_volume(apb::ExtendVolumeRequest {
        ctx: ctx("op-c", 1, "volume/v1"),
        volume_id: "v1".into(),
        new_size_bytes: 3 << 20,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn mutations_without_a_context_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    let e = c
        .create_volume(apb::CreateVolumeRequest {
            ctx: None,
            volume_id: "v".into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.create_volume(create("op", 0, "v")).await.unwrap_err();
    assert!(e.message().contains("epoch"), "{}", e.message());
    let e = c
        .create_volume(apb::CreateVolumeRequest {
            ctx: ctx("op", 1, "elsewhere"),
            volume_id: "v".into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("fence_scope"), "{}", e.message());
    assert_eq!(oplog_count(dir.path(), "create_volume", "v"), 0);
}

/// The agent's own op log (`op_log`, kept by every agent the tests start), as
/// `op:op_id` per line: what its guard let the driver run, whatever the driver.
fn agent_ops(dir: &Path) -> Vec<String> {
    drover_agent::oplog::read(&drover_tests::cluster::agent_op_log(dir, "agent"))
        .expect("the op log reads")
        .into_iter()
        .map(|e| format!("{}:{}", e.op, e.op_id))
        .collect()
}

fn oplog_ids(dir: &Path, op: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("oplog.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every op log line is whole JSON"))
        .filter(|e| e["op"] == op)
        .map(|e| e["op_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn op_state(c: &mut AgentClient<Channel>, op: &str) -> apb::OperationRecord {
    c.get_operation(apb::GetOperationRequest { op_id: op.into() }).await.unwrap().into_inner()
}

async fn wait_op_state(c: &mut AgentClient<Channel>, op: &str, state: &str) -> apb::OperationRecord {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rec = op_state(c, op).await;
        if rec.state == state {
            return rec;
        }
        assert!(std::time::Instant::now() < deadline, "{op} never reached {state}: {rec:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_mutation_whose_caller_left_finishes_and_is_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &["--set", "mock.latency=600ms"]);
    let mut c = client(&server).await;
    // The caller gives up long before the driver is done.
    let mut req = tonic::Request::new(create("op-left", 1, "v1"));
    req.set_timeout(Duration::from_millis(50));
    let gone = c.create_volume(req).await.unwrap_err();
    assert!(matches!(gone.code(), Code::DeadlineExceeded | Code::Cancelled), "{gone:?}");
    // The agent finishes anyway, and says so.
    assert_eq!(op_state(&mut c, "op-left").await.state, "running");
    wait_op_state(&mut c, "op-left", "succeeded").await;
    // A retry with the same op_id gets the recorded answer; the driver ran once.
    let v = c.create_volume(create("op-left", 1, "v1")).await.unwrap().into_inner();
    assert_eq!(v.size_bytes, 1 << 20);
    assert_eq!(oplog_ids(dir.path(), "create_volume"), vec!["op-left".to_string()]);
}

#[tokio::test]
async fn a_repeated_op_id_while_it_runs_joins_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &["--set", "mock.latency=400ms"]);
    let c = client(&server).await;
    let calls = (0..3).map(|_| {
        let mut c = c.clone();
        tokio::spawn(async move { c.create_volume(create("op-twice", 1, "v1")).await })
    });
    for call in futures_join(calls).await {
        assert_eq!(call.unwrap().into_inner().size_bytes, 1 << 20, "every caller of one op_id gets its outcome");
    }
    assert_eq!(oplog_ids(dir.path(), "create_volume"), vec!["op-twice".to_string()]);
}

async fn futures_join<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_op_interrupted_by_an_agent_kill_is_never_run_again_under_its_op_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = agent(dir.path(), &["--set", "mock.latency=2s"]);
    let mut c = client(&server).await;
    c.create_volume(create("op-0", 1, "v0")).await.unwrap();
    let mut c2 = c.clone();
    let pending = tokio::spawn(async move { c2.create_volume(create("op-cut", 1, "v1")).await });
    wait_op_state(&mut c, "op-cut", "running").await;
    // "running" is reported from the moment the target is claimed; kill once the driver
    // was really entered (its op log line is written on entry).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !oplog_ids(dir.path(), "create_volume").contains(&"op-cut".to_string()) {
        assert!(std::time::Instant::now() < deadline, "the driver never entered op-cut");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.proc.kill();
    assert!(pending.await.unwrap().is_err());
    drop(server);

    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    // The mock keeps its state across the restart.
    assert_eq!(
        c.get_volume(apb::GetVolumeRequest { volume_id: "v0".into() }).await.unwrap().into_inner().size_bytes,
        1 << 20
    );
    let refused = c.create_volume(create("op-cut", 1, "v1")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        refused.message().contains("interrupted") && refused.message().contains("new op_id"),
        "{}",
        refused.message()
    );
    let rec = op_state(&mut c, "op-cut").await;
    assert_eq!((rec.state.as_str(), rec.code), ("failed", Code::Unavailable as i32));
    assert_eq!(oplog_ids(dir.path(), "create_volume"), vec!["op-0".to_string(), "op-cut".to_string()]);
    // The caller's retry under a new op_id runs.
    c.create_volume(create("op-cut#2", 1, "v1")).await.unwrap();
    // The agent's op log, written before the driver runs, survived the SIGKILL; the
    // refusal of the interrupted op_id wrote nothing.
    assert_eq!(agent_ops(dir.path()), ["create_volume:op-0", "create_volume:op-cut", "create_volume:op-cut#2"]);
}

#[tokio::test]
async fn a_fence_refuses_older_owners_without_running_anything() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    c.create_volume(create("op-1", 3, "v1")).await.unwrap();
    let raised = c.fence(apb::FenceRequest { ctx: ctx("", 10, "volume/v1") }).await.unwrap().into_inner();
    assert_eq!(raised.highest_epoch, 10);
    let old = c
        .extend_volume(apb::ExtendVolumeRequest {
            ctx: ctx("op-2", 9, "volume/v1"),
            volume_id: "v1".into(),
            new_size_bytes: 2 << 20,
        })
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::FailedPrecondition, "{}", old.message());
    let lower = c.fence(apb::FenceRequest { ctx: ctx("", 4, "volume/v1") }).await.unwrap_err();
    assert_eq!(lower.code(), Code::FailedPrecondition);
    assert_eq!(oplog_count(dir.path(), "extend_volume", "v1"), 0, "a fence runs nothing and lets nothing older run");
    assert_eq!(agent_ops(dir.path()), ["create_volume:op-1"]);
}

/// A mutation naming a volume the backend does not have is refused before admission (or,
/// for a disable, answered as done): a huge epoch in a real group's scope does not move
/// the fence (the attack of issue 13: one such call used to lock the orchestrator out of
/// the group for good).
#[tokio::test]
async fn a_call_on_a_missing_volume_does_not_move_the_fence() {
    let dir = tempfile::tempdir().unwrap();
    let server = agent(dir.path(), &[]);
    let mut c = client(&server).await;
    let mut made = create("op-1", 3, "v1");
    made.ctx = ctx("op-1", 3, "group/g1");
    c.create_volume(made).await.unwrap();
    for (op, call) in [("demote", 0), ("promote", 1), ("resync", 2)] {
        let big = ctx(&format!("evil-{op}"), 1_000_000_000_000_000, "group/g1");
        let refused = match call {
            0 => c.demote_volume(apb::DemoteVolumeRequest { ctx: big, volume_id: "ghost".into() }).await.map(|_| ()),
            1 => c
                .promote_volume(apb::PromoteVolumeRequest { ctx: big, volume_id: "ghost".into(), force: true })
                .await
                .map(|_| ()),
            _ => c.resync_volume(apb::ResyncVolumeRequest { ctx: big, volume_id: "ghost".into() }).await.map(|_| ()),
        }
        .unwrap_err();
        assert_eq!(refused.code(), Code::NotFound, "{op}: {}", refused.message());
    }
    // Disabling replication of a missing volume, or unmanaging it, has nothing to do: it
    // is answered as done (a retry whose first attempt removed the volume before a restart
    // must complete), and it admits nothing either.
    let big = ctx("evil-disable", 1_000_000_000_000_000, "group/g1");
    c.disable_replication(apb::DisableReplicationRequest { ctx: big, volume_id: "ghost".into() })
        .await
        .expect("nothing to disable is done");
    assert_eq!(oplog_count(dir.path(), "disable_replication", "ghost"), 0, "the driver was not called");
    let big = ctx("evil-unmanage", 1_000_000_000_000_000, "group/g1");
    c.unmanage_volume(apb::UnmanageVolumeRequest { ctx: big, volume_id: "ghost".into() })
        .await
        .expect("nothing to unmanage is done");
    assert_eq!(oplog_count(dir.path(), "unmanage_volume", "ghost"), 0, "the driver was not called");
    // The group's owner, still at epoch 4, is admitted.
    c.extend_volume(apb::ExtendVolumeRequest {
        ctx: ctx("op-2", 4, "group/g1"),
        volume_id: "v1".into(),
        new_size_bytes: 2 << 20,
    })
    .await
    .expect("the fence did not move");
    assert_eq!(oplog_count(dir.path(), "extend_volume", "v1"), 1);
    assert_eq!(agent_ops(dir.path()), ["create_volume:op-1", "extend_volume:op-2"], "the refusals ran nothing");
}

#[tokio::test]
async fn sigterm_stops_an_agent_within_seconds_even_mid_operation() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = agent(dir.path(), &["--set", "mock.latency=60s"]);
    let mut c = client(&server).await;
    let mut c2 = c.clone();
    let pending = tokio::spawn(async move { c2.create_volume(create("op-long", 1, "v1")).await });
    wait_op_state(&mut c, "op-long", "running").await;
    let pid = server.proc.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stopped = std::time::Instant::now();
    assert!(server.proc.exits_within(Duration::from_secs(8)), "the agent ignored SIGTERM for 8 s");
    eprintln!("agent stopped {:?} after SIGTERM", stopped.elapsed());
    assert!(pending.await.unwrap().is_err(), "the cut-off call failed");
}
