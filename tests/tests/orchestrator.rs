//! End-to-end tests of the orchestrator with real processes: the orchestrator and two mock
//! agents as separate `drover` processes, on the embedded store and on a real etcd.

use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::{Cluster, Etcd, StoreChoice, failover_request, replicated_group, state_snapshot, wait_backend_up};
use tonic::Code;

/// 32 concurrent failovers of one group: exactly one wins, the rest are refused as being
/// in the wrong state or having lost the race, and the stored state is consistent.
async fn concurrent_failovers_have_one_winner(store: StoreChoice<'_>) {
    let cluster = Cluster::start(store, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "race", 3).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let mut c = c.clone();
            let group = group.clone();
            tokio::spawn(async move {
                c.replication
                    .failover_group(pb::FailoverGroupRequest {
                        no_wait: false,
                        group,
                        project: "tests".into(),
                        target_backend: "backend-b".into(),
                        force: false,
                        discard_changes_on: String::new(),
                    })
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                wins += 1;
                assert!(r.get_ref().items.iter().all(|i| i.outcome == "success"), "{:?}", r.get_ref().items);
            }
            Err(s) => assert!(
                matches!(s.code(), Code::FailedPrecondition | Code::Aborted),
                "losers get FailedPrecondition or Aborted, got {:?}: {}",
                s.code(),
                s.message()
            ),
        }
    }
    assert_eq!(wins, 1, "exactly one failover must win");
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"));
    assert_eq!(g.history.iter().filter(|e| e.action == "failover").count(), 1, "one failover in the history");
    // By name, the same group and the same history (its page is read after the name).
    let by_name = c
        .groups
        .get_group(pb::GetGroupRequest { group: g.name.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((by_name.id.as_str(), &by_name.history), (g.id.as_str(), &g.history));
    assert!(!g.history.is_empty());
    for id in &g.volume_ids {
        let v = c
            .volumes
            .get_volume(pb::GetVolumeRequest { volume: id.clone(), project: String::new() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((v.active_backend.as_str(), v.replication_status.as_str()), ("backend-b", "failed-over"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_32_failovers_embedded() {
    concurrent_failovers_have_one_winner(StoreChoice::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_32_failovers_etcd() {
    let etcd = Etcd::start().await;
    concurrent_failovers_have_one_winner(StoreChoice::Etcd(&etcd)).await;
}

/// SIGKILL the orchestrator and restart it: every acknowledged change is still there.
async fn restart_loses_nothing(store: StoreChoice<'_>) {
    let mut cluster = Cluster::start(store, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "keep", 2).await;
    c.replication
        .failover_group(pb::FailoverGroupRequest {
            no_wait: false,
            group: group.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            force: false,
            discard_changes_on: String::new(),
        })
        .await
        .unwrap();
    c.sites.freeze_backend(pb::FreezeBackendRequest { name: "backend-a".into() }).await.unwrap();
    let before = state_snapshot(&mut c).await;
    cluster.restart_orchestrator().await;
    let mut c = cluster.clients().await;
    let after = state_snapshot(&mut c).await;
    assert_eq!(before, after, "state after SIGKILL and restart differs");
    let b = c.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
    assert!(b.frozen, "the freeze survives a restart");
    // The restarted orchestrator carries on: fail back works.
    c.sites.thaw_backend(pb::ThawBackendRequest { name: "backend-a".into() }).await.unwrap();
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            no_wait: false,
            group,
            project: "tests".into(),
            target_backend: "default".into(),
            force: false,
            discard_changes_on: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.group.unwrap().replication_status, "enabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restart_embedded() {
    restart_loses_nothing(StoreChoice::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restart_etcd() {
    let etcd = Etcd::start().await;
    restart_loses_nothing(StoreChoice::Etcd(&etcd)).await;
}

/// An orchestrator killed in the middle of a failover leaves the intent in the store; the
/// next one claims it with a higher epoch and finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_interrupted_by_sigkill_is_resumed() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.latency=400ms"]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "resume", 2).await;
    let epoch_before = c
        .groups
        .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner()
        .epoch;
    let mut bg = c.clone();
    let g2 = group.clone();
    let call = tokio::spawn(async move {
        bg.replication
            .failover_group(pb::FailoverGroupRequest {
                no_wait: false,
                group: g2,
                project: "tests".into(),
                target_backend: "backend-b".into(),
                force: false,
                discard_changes_on: String::new(),
            })
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let g = c
            .groups
            .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        if g.replication_status == "failing-over" {
            break;
        }
        assert!(Instant::now() < deadline, "never saw failing-over: {}", g.replication_status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.restart_orchestrator().await;
    assert!(call.await.unwrap().is_err(), "the killed orchestrator cannot have answered");
    let mut c = cluster.clients().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let g = loop {
        let g = c
            .groups
            .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        if g.replication_status != "failing-over" {
            break g;
        }
        assert!(Instant::now() < deadline, "the resumed failover did not finish within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (g.replication_status.as_str(), g.active_backend.as_str()),
        ("failed-over", "backend-b"),
        "{}",
        g.status_reason
    );
    assert!(g.epoch > epoch_before + 1, "the resume claimed a new epoch ({} after {epoch_before})", g.epoch);
}

async fn expect_err<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, words: &[&str]) {
    let s = r.expect_err("the request must fail");
    assert_eq!(s.code(), code, "{}", s.message());
    for w in words {
        assert!(s.message().contains(w), "message {:?} does not mention {w:?}", s.message());
    }
}

/// Bad requests get a clear error naming the problem, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "app", 2).await;
    let before = state_snapshot(&mut c).await;
    let vol = |name: &str, size: i64| pb::CreateVolumeRequest {
        name: name.into(),
        project: "tests".into(),
        size_bytes: size,
        backend: "backend-a".into(),
        ..Default::default()
    };

    expect_err(
        c.groups.get_group(pb::GetGroupRequest { group: "no-such-group".into(), project: "tests".into() }).await,
        Code::NotFound,
        &["no-such-group"],
    )
    .await;
    expect_err(
        c.replication
            .failover_group(pb::FailoverGroupRequest {
                no_wait: false,
                group: "no-such-group".into(),
                project: "tests".into(),
                target_backend: "backend-b".into(),
                force: false,
                discard_changes_on: String::new(),
            })
            .await,
        Code::NotFound,
        &["no-such-group"],
    )
    .await;
    expect_err(c.volumes.create_volume(vol("", 1 << 30)).await, Code::InvalidArgument, &["name", "empty"]).await;
    expect_err(c.volumes.create_volume(vol(&"x".repeat(65), 1 << 30)).await, Code::InvalidArgument, &["name", "64"])
        .await;
    expect_err(c.volumes.create_volume(vol("zero", 0)).await, Code::InvalidArgument, &["size_bytes", "positive"]).await;
    expect_err(
        c.volumes.create_volume(vol("negative", -(1 << 30))).await,
        Code::InvalidArgument,
        &["size_bytes", "positive"],
    )
    .await;
    expect_err(
        c.volumes.create_volume(vol("absurd", i64::MAX - 511)).await,
        Code::InvalidArgument,
        &["size_bytes", "64 TiB"],
    )
    .await;
    expect_err(
        c.replication
            .failover_group(pb::FailoverGroupRequest {
                no_wait: false,
                group: group.clone(),
                project: "tests".into(),
                target_backend: "backend-a".into(),
                force: false,
                discard_changes_on: String::new(),
            })
            .await,
        Code::InvalidArgument,
        &["already active on backend backend-a"],
    )
    .await;
    expect_err(
        c.replication
            .failover_group(pb::FailoverGroupRequest {
                no_wait: false,
                group: group.clone(),
                project: "tests".into(),
                target_backend: "default".into(),
                force: false,
                discard_changes_on: String::new(),
            })
            .await,
        Code::InvalidArgument,
        &["already active"],
    )
    .await;
    expect_err(
        c.replication
            .enable_replication(pb::EnableReplicationRequest {
                no_wait: false,
                group: group.clone(),
                project: "tests".into(),
                target_backend: "backend-b".into(),
                sync_interval_seconds: 0,
            })
            .await,
        Code::FailedPrecondition,
        // The current state as the message states it; the fixed text ("can be enabled
        // only when …") must not be what satisfies this.
        &["has replication status enabled;"],
    )
    .await;
    expect_err(
        c.groups.delete_group(pb::DeleteGroupRequest { group: group.clone(), project: "tests".into() }).await,
        Code::FailedPrecondition,
        &["has replication status enabled;"],
    )
    .await;

    // A volume named by its id is named by its name in the answer.
    let member = c
        .volumes
        .get_volume(pb::GetVolumeRequest { volume: "app-v0".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    expect_err(
        c.groups
            .create_group(pb::CreateGroupRequest {
                name: "second-home".into(),
                project: "tests".into(),
                group_type: "consistent-replication".into(),
                backend: "backend-a".into(),
                volumes: vec![member.id.clone()],
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        &["volume app-v0 is already in group", "remove it from that group first"],
    )
    .await;

    // An API version the server does not speak.
    let tls = drover_proto::tls::user_client(&drover_tests::cluster::ca_file(cluster.dir.path())).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(cluster.orchestrator.endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    fn future_version(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert(drover_proto::API_VERSION_HEADER, "9.0".parse().unwrap());
        Ok(r)
    }
    let mut future =
        Clients::with_stamp(channel, future_version, Some(&drover_tests::cluster::admin_token(cluster.dir.path())))
            .unwrap();
    expect_err(
        future.volumes.create_volume(vol("from-the-future", 1 << 30)).await,
        Code::InvalidArgument,
        &["9.0", "1.0"],
    )
    .await;
    let v = future.version.get_version(pb::GetVersionRequest {}).await.unwrap().into_inner();
    assert_eq!((v.min_api_version.as_str(), v.max_api_version.as_str()), ("1.0", "1.0"));

    assert_eq!(before, state_snapshot(&mut c).await, "refused requests must change nothing");
}

/// The CLI: JSON output, non-zero exit with the server's message, frozen backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_drives_the_api() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let ok = |args: &[&str]| {
        let out = cluster.cli(args);
        assert!(out.status.success(), "drover {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&["volume", "create", "db", "--size", "2GiB", "--backend", "backend-a"]);
    let json: serde_json::Value = serde_json::from_str(&ok(&["volume", "show", "db", "-o", "json"])).unwrap();
    assert_eq!(json["size_bytes"], 2i64 << 30);
    assert_eq!(json["status"], "available");
    ok(&["group", "create", "g1", "--type", "consistent-replication", "--backend", "backend-a", "--volume", "db"]);
    let targets = ok(&["group", "list-targets", "g1"]);
    assert!(targets.contains("backend-b") && targets.contains("up"), "{targets}");
    ok(&["group", "enable-replication", "g1"]);
    let table = ok(&["group", "list"]);
    assert!(table.lines().next().unwrap().contains("REPLICATION") && table.contains("enabled"), "{table}");
    ok(&["group", "failover", "g1", "--target", "backend-b"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["group", "replication-info", "g1", "-o", "json"])).unwrap();
    assert_eq!(info["volumes"][0]["role"], "primary", "{info}");
    assert!(info["rpo_ms"].as_i64().unwrap() >= 0, "{info}");

    let out = cluster.cli(&["group", "failover", "g1", "--target", "backend-b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already active on backend backend-b"), "{err}");

    ok(&["backend", "freeze", "backend-a"]);
    let out = cluster.cli(&["volume", "create", "late", "--size", "1GiB", "--backend", "backend-a"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("thaw"), "{}", String::from_utf8_lossy(&out.stderr));
    ok(&["backend", "thaw", "backend-a"]);
    ok(&["volume", "create", "late", "--size", "1GiB", "--backend", "backend-a"]);
    let out = cluster.cli(&["volume", "create", "neg", "--size", "-1GiB", "--backend", "backend-a"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A malformed config file stops the orchestrator with the file and line named.
#[test]
fn malformed_config_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestrator.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n[store\nkind = \"embedded\"\n").unwrap();
    let bin = drover_tests::cluster::locate_drover().unwrap();
    let out = std::process::Command::new(bin).args(["orchestrator", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("orchestrator.toml") && err.contains("line 2"), "{err}");
}

/// Op log entries of one driver op, as (op_id, target).
fn oplog(path: &std::path::Path, op: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("whole JSON lines"))
        .filter(|e| e["op"] == op)
        .map(|e| (e["op_id"].as_str().unwrap().to_string(), e["target"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_call_that_times_out_after_the_work_is_asked_about_not_run_again() {
    // Agent calls time out after 300 ms; the mock takes 900 ms per call.
    let cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.latency=900ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"],
        &["--set", "defaults.agent_call_timeout=300ms"],
    )
    .await;
    let mut c = cluster.clients().await;
    let v = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "slow".into(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .expect("the create completes although every agent call times out")
        .into_inner();
    assert_eq!(v.status, "available");
    let log = oplog(&cluster.path().join("oplog-backend-a.jsonl"), "create_volume");
    assert_eq!(log.len(), 1, "the driver ran once: {log:?}");
    assert_eq!(log[0].1, v.id);
    let orch_log = std::fs::read_to_string(&cluster.orchestrator.proc.log).unwrap();
    assert!(orch_log.contains("outcome unknown; asking the agent"), "the orchestrator asked GetOperation");
}

/// The reproduction from the procedure engine's issue: a client with a 1 s deadline that
/// is then SIGKILLed, against agents that take 3 s per call. The failover completes with
/// no restart, and its execution shows its steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_whose_client_left_completes_without_a_restart() {
    let cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.latency=3s"]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "left", 1).await;
    let mut client = std::process::Command::new(&cluster.bin)
        .args(["group", "failover", "left", "--target", "backend-b", "--timeout", "1s"])
        .args(["--endpoint", &cluster.orchestrator.endpoint, "--project", "tests"])
        .env("DROVER_TOKEN_FILE", drover_tests::cluster::token_file(cluster.dir.path()))
        .env("DROVER_CA_FILE", drover_tests::cluster::ca_file(cluster.dir.path()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = client.kill();
    let _ = client.wait();

    let deadline = Instant::now() + Duration::from_secs(60);
    let g = loop {
        let g = c
            .groups
            .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        if g.replication_status != "failing-over" && g.replication_status != "enabled" {
            break g;
        }
        assert!(Instant::now() < deadline, "the failover did not finish: {}", g.replication_status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"));

    let out = cluster.cli(&["execution", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exec = list["executions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["summary"].as_str().unwrap_or_default().contains("failover of group left"))
        .expect("the failover's execution is listed")
        .clone();
    let id = exec["id"].as_str().unwrap();
    let out = cluster.cli(&["execution", "show", id]);
    let shown = String::from_utf8_lossy(&out.stdout);
    // The promote step also writes the record (one step, one store write less).
    for step in ["step final-sync", "step promote"] {
        assert!(out.status.success() && shown.contains("succeeded") && shown.contains(step), "{step}: {shown}");
    }
    assert_eq!(exec["claims"], 1, "no orchestrator restart was needed");
}

/// A final sync interrupted after the target committed its point and before the source
/// recorded it (the source agent dies right there): the retried failover reconciles with
/// the target's point and succeeds, with no --force and no divergence recorded. (With
/// `move_patience` 0s the first move stops at once; with the default it would wait for
/// the source to come back, as `qemu.rs` and the soak check.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_final_sync_is_reconciled_on_retry_without_force() {
    let mut cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.die_after_final_commit=true"],
        &["--set", "move_patience=0s"],
    )
    .await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "cut", 2).await;
    let failover = || failover_request(&group, "backend-b", false);
    let first = c.replication.failover_group(failover()).await.unwrap().into_inner();
    let g = first.group.unwrap();
    assert_eq!(g.replication_status, "error", "the source died mid-failover: {}", g.status_reason);
    assert!(cluster.agents[0].proc.log_text().contains("dying after the peer committed the final sync"));

    cluster.restart_agent(0, "mock");
    wait_backend_up(&mut c, "backend-a").await;
    let retry = c.replication.failover_group(failover()).await.expect("the retry is accepted").into_inner();
    let g = retry.group.unwrap();
    assert_eq!(
        (g.replication_status.as_str(), g.active_backend.as_str()),
        ("failed-over", "backend-b"),
        "{}",
        g.status_reason
    );
    assert!(g.divergence_point.is_empty(), "a planned failover records no divergence: {}", g.divergence_point);
    assert!(retry.items.iter().all(|i| i.outcome == "success"), "{:?}", retry.items);
    assert!(
        cluster.agents[0].proc.log_text().contains("the peer holds the point an interrupted sync was shipping"),
        "the source reconciled with the target's point"
    );
}

/// A planned failover whose final sync demoted the source but whose promote failed leaves
/// both sides secondary at the same point. The retry sees that, skips the final sync,
/// and promotes the target: no --force, no divergence recorded. (With `move_patience`
/// 0s the move stops at the promote's first failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_retry_with_both_sides_secondary_promotes_without_force() {
    let mut cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.fail.promote=1.0"],
        &["--set", "move_patience=0s"],
    )
    .await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "both", 2).await;
    let failover = || failover_request(&group, "backend-b", false);
    let first = c.replication.failover_group(failover()).await.unwrap().into_inner();
    let g = first.group.unwrap();
    assert_eq!(g.replication_status, "error", "every promote failed: {}", g.status_reason);
    assert!(g.status_reason.contains("could not promote"), "{}", g.status_reason);

    // backend-b's agent comes back without the injected failure.
    cluster.agents[1].proc.kill();
    cluster.restart_agent(1, "mock");
    wait_backend_up(&mut c, "backend-b").await;
    let retry = c.replication.failover_group(failover()).await.unwrap().into_inner();
    let g = retry.group.unwrap();
    assert_eq!(
        (g.replication_status.as_str(), g.active_backend.as_str()),
        ("failed-over", "backend-b"),
        "{}",
        g.status_reason
    );
    assert!(g.divergence_point.is_empty(), "{}", g.divergence_point);
    let last = g.history.last().unwrap();
    assert!(last.detail.contains("no final sync needed"), "{}", last.detail);
}

/// Polls execution `id`, which must keep running meanwhile, until its transient error
/// contains every one of `needles` (at most 30 s); returns that error.
async fn wait_retrying(c: &mut Clients, id: &str, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner();
        assert_eq!(e.status, "running", "the execution waits instead of ending: {}", e.error);
        if needles.iter().all(|n| e.error.contains(n)) {
            println!("waiting: {}", e.error);
            return e.error;
        }
        assert!(Instant::now() < deadline, "no error with {needles:?} within 30 s: {}", e.error);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls execution `id` until it ends (at most 60 s) and returns it.
async fn wait_ended(c: &mut Clients, id: &str) -> pb::Execution {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner();
        if e.status != "running" {
            return e;
        }
        assert!(Instant::now() < deadline, "execution {id} did not end within 60 s: {}", e.error);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn group_now(c: &mut Clients, group: &str) -> pb::Group {
    c.groups.get_group(pb::GetGroupRequest { group: group.into(), project: "tests".into() }).await.unwrap().into_inner()
}

/// No op_id entered either mock driver twice (their op logs under the cluster's dir).
fn assert_no_repeated_ops(cluster: &Cluster) {
    let (a, b) = (cluster.path().join("oplog-backend-a.jsonl"), cluster.path().join("oplog-backend-b.jsonl"));
    let (repeated, total) = drover_tests::invariants::repeated_op_ids(&[("backend-a", &a), ("backend-b", &b)]);
    assert!(repeated.is_empty(), "op_ids entered a driver twice (of {total}): {repeated:?}");
}

const OPLOG: &str = "mock.oplog={dir}/oplog-{backend}.jsonl";

/// A cluster on `store` whose backend-b cannot promote (injected, until its agent
/// restarts without it), a replicated group `name` of 2 volumes, and its failover to
/// backend-b asked without waiting and seen waiting on its promote's second round.
/// Returns the cluster, a client, the group and the execution's id.
async fn a_failover_waiting_on_its_promote(store: StoreChoice<'_>, name: &str) -> (Cluster, Clients, String, String) {
    let cluster = Cluster::start(store, &["--set", "mock.fail.promote=1.0", "--set", OPLOG]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, name, 2).await;
    let asked = c
        .replication
        .failover_group(pb::FailoverGroupRequest { no_wait: true, ..failover_request(&group, "backend-b", false) })
        .await
        .unwrap()
        .into_inner();
    // A second round at least: it goes under new op_ids.
    wait_retrying(&mut c, &asked.execution_id, &["not promoted yet", "promote/1"]).await;
    (cluster, c, group, asked.execution_id)
}

/// Brings backend-b's agent back without the injected promote failure; the waiting move
/// `id` then completes with `group` failed over to backend-b. Returns the group.
async fn agent_b_back_and_the_move_completes(
    cluster: &mut Cluster,
    c: &mut Clients,
    group: &str,
    id: &str,
) -> pb::Group {
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG]);
    let ended = wait_ended(c, id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let g = group_now(c, group).await;
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"), "{g:?}");
    g
}

/// A planned failover whose promote keeps failing for a cause that may pass waits (within
/// `move_patience`), showing why, and completes by itself once the target's agent is
/// back: no retry by the operator, no --force, and no op_id twice in a driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_whose_promote_fails_for_a_while_completes_by_itself() {
    let (mut cluster, mut c, group, id) = a_failover_waiting_on_its_promote(StoreChoice::Embedded, "waits").await;
    let g = agent_b_back_and_the_move_completes(&mut cluster, &mut c, &group, &id).await;
    assert!(g.divergence_point.is_empty(), "a planned move records no divergence: {}", g.divergence_point);
    let b = cluster.path().join("oplog-backend-b.jsonl");
    let promotes = drover_tests::invariants::op_log(&b).iter().filter(|e| e.op == "promote").count();
    assert!(promotes >= 2 * 5, "every volume's promote was tried in two rounds at least: {promotes}");
    assert_no_repeated_ops(&cluster);
}

/// A failover asked with a client deadline shorter than the move answers before the
/// deadline with DEADLINE_EXCEEDED naming the execution (not the server's bare "Timeout
/// expired"), and the move goes on without the call: it completes once the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_answers_inside_its_deadline_and_the_move_goes_on() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.fail.promote=1.0", "--set", OPLOG]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "deadline", 2).await;
    let mut req = tonic::Request::new(failover_request(&group, "backend-b", false));
    req.set_timeout(Duration::from_secs(4));
    let err = c.replication.failover_group(req).await.expect_err("the move cannot end within 4 s");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("goes on without the call"), "{}", err.message());
    let id = err
        .message()
        .split("execution ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("the answer names the execution")
        .to_string();
    let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(e.status, "running", "the move went on after the answer: {}", e.error);
    agent_b_back_and_the_move_completes(&mut cluster, &mut c, &group, &id).await;
    assert_no_repeated_ops(&cluster);
}

/// The orchestrator SIGKILLed while a failover waits for its promote: the restarted one
/// resumes the execution, walks the rounds already spent again (their failures replay from
/// the agent's ledger) and keeps waiting; once the agent is back the move completes, and no
/// op_id entered a driver twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_while_a_failover_waits_resumes_the_wait() {
    let (mut cluster, _, group, id) = a_failover_waiting_on_its_promote(StoreChoice::Embedded, "resumes").await;
    cluster.restart_orchestrator().await;
    let mut c = cluster.clients().await;
    // Resumed by the new process (a second claim), and waiting again past the spent rounds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(e.status, "running", "the resumed move waits instead of ending: {}", e.error);
        if e.claims >= 2 && e.error.contains("not promoted yet") {
            println!("resumed and waiting: {}", e.error);
            break;
        }
        assert!(Instant::now() < deadline, "not resumed and waiting within 30 s: claims {}, {}", e.claims, e.error);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG]);
    let ended = wait_ended(&mut c, &id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    assert!(ended.claims >= 2, "the restarted orchestrator finished it: claims {}", ended.claims);
    let g = group_now(&mut c, &group).await;
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"), "{g:?}");
    assert_no_repeated_ops(&cluster);
}

/// etcd SIGKILLed for longer than the owner lease while a failover waits for its promote,
/// then started again on its data dir: the same orchestrator process (not restarted)
/// claims the execution again and keeps waiting; once the target's agent is back the move
/// completes, and no op_id entered a driver twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_while_a_failover_waits_resumes_the_wait() {
    let mut etcd = Etcd::start().await;
    let (mut cluster, mut c, group, id) = a_failover_waiting_on_its_promote(StoreChoice::Etcd(&etcd), "outage").await;
    let orchestrator_pid = cluster.orchestrator.proc.pid();
    let before = c.executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await.unwrap().into_inner();
    // Longer than the tests' 3 s owner lease.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    etcd.restart().await;
    // Still waiting, and past where it was: a later round of the promote. Reads may fail
    // while the orchestrator's client reconnects.
    let deadline = Instant::now() + Duration::from_secs(60);
    let round = |error: &str| {
        error
            .split("promote/")
            .nth(1)
            .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next()?.parse::<u32>().ok())
    };
    loop {
        if let Ok(e) =
            c.executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await.map(|r| r.into_inner())
        {
            assert_eq!(e.status, "running", "the move waits through the outage instead of ending: {}", e.error);
            if e.error.contains("not promoted yet") && round(&e.error) > round(&before.error) {
                println!("waiting after the outage (claims {} before, {} now): {}", before.claims, e.claims, e.error);
                break;
            }
        }
        assert!(Instant::now() < deadline, "not waiting on a later promote round within 60 s of etcd's return");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG]);
    let ended = wait_ended(&mut c, &id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    assert_eq!(cluster.orchestrator.proc.pid(), orchestrator_pid, "the orchestrator was not restarted");
    let g = group_now(&mut c, &group).await;
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"), "{g:?}");
    assert_no_repeated_ops(&cluster);
    let agents = [("backend-a", cluster.agents[0].endpoint.clone()), ("backend-b", cluster.agents[1].endpoint.clone())];
    let violations = drover_tests::invariants::role_violations(&mut c, cluster.path(), &agents, &[group]).await;
    assert!(violations.is_empty(), "{violations:?}");
}

/// A failback whose reprotect cannot demote the old primary for a while (its demote fails
/// for a cause that may pass) waits, showing why, and completes by itself once that
/// agent works again; nothing changed meanwhile at the side that serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_whose_reprotect_fails_for_a_while_completes_by_itself() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", OPLOG]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "reprotect", 2).await;
    let moved = c.replication.failover_group(failover_request(&group, "backend-b", false)).await.unwrap().into_inner();
    assert_eq!(moved.group.unwrap().active_backend, "backend-b");
    // backend-a's agent comes back unable to demote for now.
    cluster.agents[0].proc.kill();
    cluster.restart_agent_with(0, "mock", &["--set", OPLOG, "--set", "mock.fail.demote=1.0"]);
    wait_backend_up(&mut c, "backend-a").await;
    let asked = c
        .replication
        .failover_group(pb::FailoverGroupRequest { no_wait: true, ..failover_request(&group, "default", false) })
        .await
        .unwrap()
        .into_inner();
    wait_retrying(&mut c, &asked.execution_id, &["could not demote", "reprotect-demote/1"]).await;
    assert_eq!(group_now(&mut c, &group).await.active_backend, "backend-b", "the serving side is left alone meanwhile");
    cluster.agents[0].proc.kill();
    cluster.restart_agent_with(0, "mock", &["--set", OPLOG]);
    let ended = wait_ended(&mut c, &asked.execution_id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let g = group_now(&mut c, &group).await;
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("enabled", "backend-a"), "{g:?}");
    assert_no_repeated_ops(&cluster);
}

/// Enabling replication while the target's agent cannot enable its replicas for a while
/// waits (within `move_patience`), showing why, and completes by itself once that agent
/// works again: no operator retry, no op_id twice in a driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_while_the_target_fails_for_a_while_completes_by_itself() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", OPLOG]).await;
    let mut c = cluster.clients().await;
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG, "--set", "mock.fail.enable_replication=1.0"]);
    wait_backend_up(&mut c, "backend-b").await;
    let group = drover_tests::plain_group_in(&mut c, "tests", "enables", 2).await;
    let asked = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            no_wait: true,
            group: group.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    wait_retrying(&mut c, &asked.execution_id, &["trying again", "enable-secondary/1"]).await;
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG]);
    let ended = wait_ended(&mut c, &asked.execution_id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let g = group_now(&mut c, &group).await;
    assert_eq!((g.replication_status.as_str(), g.replication_target.as_str()), ("enabled", "backend-b"), "{g:?}");
    assert_no_repeated_ops(&cluster);
}

/// Disabling replication while the target's agent cannot disable its replicas for a while
/// waits, showing why, and completes by itself once that agent works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_while_the_target_fails_for_a_while_completes_by_itself() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", OPLOG]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "disables", 2).await;
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG, "--set", "mock.fail.disable_replication=1.0"]);
    wait_backend_up(&mut c, "backend-b").await;
    let asked = c
        .replication
        .disable_replication(pb::DisableReplicationRequest {
            group: group.clone(),
            project: "tests".into(),
            no_wait: true,
        })
        .await
        .unwrap()
        .into_inner();
    wait_retrying(&mut c, &asked.execution_id, &["trying again", "disable-secondary/1"]).await;
    cluster.agents[1].proc.kill();
    cluster.restart_agent_with(1, "mock", &["--set", OPLOG]);
    let ended = wait_ended(&mut c, &asked.execution_id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let g = group_now(&mut c, &group).await;
    assert_eq!(g.replication_status, "disabled", "{g:?}");
    assert_no_repeated_ops(&cluster);
}

/// A planned failover to a target that stays dead past `move_patience` says the target is
/// the side to bring back, and does not advise a forced failover of the healthy source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_dead_target_names_the_target_as_unreachable() {
    let mut cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &[], &["--set", "move_patience=2s"]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "deadtarget", 1).await;
    cluster.agents[1].proc.kill();
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group,
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = r.group.unwrap();
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("error", "backend-a"));
    assert!(g.status_reason.contains("the target backend-b does not answer"), "{}", g.status_reason);
    assert!(!g.status_reason.contains("--force"), "no forced failover of a healthy source: {}", g.status_reason);
}

/// After a disaster failover, the old primary comes back still believing it is primary.
/// Its sync towards the new primary carries its old epoch, which the new primary refuses:
/// the two sides never sync at each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_old_primary_cannot_sync_into_the_new_primary() {
    use drover_proto::agent::v1 as apb;
    let mut cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "returning", 1).await;
    let before = c
        .groups
        .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    cluster.agents[0].proc.kill();
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: group.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let after = r.group.unwrap();
    assert_eq!(after.replication_status, "failed-over", "{}", after.status_reason);
    cluster.restart_agent(0, "mock");
    let volume = after.volume_ids[0].clone();
    let mut old = drover_tests::cluster::agent_client(&cluster.agents[0].endpoint, cluster.dir.path()).await;
    let mut new = drover_tests::cluster::agent_client(&cluster.agents[1].endpoint, cluster.dir.path()).await;
    let point_before = new
        .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume.clone(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner()
        .recovery_point_id;
    let refused = old
        .sync_group(apb::SyncGroupRequest {
            ctx: Some(apb::OpContext {
                op_id: "returning-sync".into(),
                epoch: before.epoch,
                fence_scope: format!("group/{group}"),
            }),
            group_id: group.clone(),
            r#final: false,
            peer_endpoint: cluster.agents[1].endpoint.clone(),
        })
        .await
        .unwrap_err();
    assert!(refused.message().contains("stale epoch"), "{}", refused.message());
    let info = new
        .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume, estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.role, apb::ReplicationRole::Primary as i32, "the new primary stays primary");
    assert_eq!(info.recovery_point_id, point_before, "nothing from the old primary landed");
}

/// Snapshot operations under faults, on mock agents that take 800 ms per call: the
/// orchestrator is SIGKILLed while a group snapshot is being taken (its client gets an
/// error), and the agent while the snapshot is being deleted. Each resumes to its end on
/// its own; the snapshot was taken once, and no op_id entered a driver twice (the delete
/// the kill cut short is tried again as its next attempt, `op#2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_operations_survive_orchestrator_and_agent_kills_and_run_once() {
    let mut cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.latency=800ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"],
        &[],
    )
    .await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "snaps", 2).await;
    let mut bg = c.clone();
    let g2 = group.clone();
    let call = tokio::spawn(async move {
        bg.snapshots
            .create_group_snapshot(pb::CreateGroupSnapshotRequest {
                group: g2,
                project: "tests".into(),
                name: "s1".into(),
            })
            .await
    });
    let snapshot = |c: &mut drover_cli::client::Clients| {
        let mut c = c.clone();
        async move {
            c.snapshots
                .get_snapshot(pb::GetSnapshotRequest { snapshot: "s1".into(), project: "tests".into() })
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !snapshot(&mut c).await.is_ok_and(|s| s.status == "creating") {
        assert!(Instant::now() < deadline, "never saw the snapshot creating");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.restart_orchestrator().await;
    assert!(call.await.unwrap().is_err(), "the killed orchestrator cannot have answered");
    let mut c = cluster.clients().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = snapshot(&mut c).await.expect("the snapshot record stays");
        if s.status != "creating" {
            break s;
        }
        assert!(Instant::now() < deadline, "the resumed snapshot did not finish within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s.status, "available", "{}", s.status_reason);
    assert_eq!(s.members.len(), 2);
    let taken = oplog(&cluster.path().join("oplog-backend-a.jsonl"), "create_group_snapshot");
    assert_eq!(taken.len(), 1, "the driver took the snapshot once: {taken:?}");

    // The agent dies while the delete is in flight; the execution retries until the
    // restarted agent answers (its ledger knows whether the driver ran).
    let mut bg = c.clone();
    let call = tokio::spawn(async move {
        bg.snapshots.delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "s1".into(), project: "tests".into() }).await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !snapshot(&mut c).await.is_ok_and(|s| s.status == "deleting") {
        assert!(Instant::now() < deadline, "never saw the snapshot deleting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.agents[0].proc.kill();
    cluster.restart_agent_with(
        0,
        "mock",
        &["--set", "mock.latency=800ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"],
    );
    let answer = tokio::time::timeout(Duration::from_secs(60), call).await.expect("the delete ends").unwrap();
    answer.expect("the delete completes after the agent's restart");
    assert_eq!(snapshot(&mut c).await.unwrap_err().code(), Code::NotFound, "the snapshot is gone");
    // The attempt the kill cut short is recorded as interrupted; the pool tries again
    // under the next attempt's op_id (`base#2`): each op_id entered the driver once.
    let deleted = oplog(&cluster.path().join("oplog-backend-a.jsonl"), "delete_snapshot");
    assert!(!deleted.is_empty() && deleted.len() <= 3, "{deleted:?}");
    let base = deleted[0].0.clone();
    for (i, (op_id, _)) in deleted.iter().enumerate().skip(1) {
        assert_eq!(op_id, &format!("{base}#{}", i + 1), "a later attempt of the same delete: {deleted:?}");
    }
    let (repeated, _) = drover_tests::invariants::repeated_op_ids(&[
        ("backend-a", &cluster.path().join("oplog-backend-a.jsonl")),
        ("backend-b", &cluster.path().join("oplog-backend-b.jsonl")),
    ]);
    assert!(repeated.is_empty(), "{repeated:?}");
}

/// Deleting a volume a snapshot holds, or a snapshot a volume was made from, is refused
/// from the dependency indexes (not a read of every record), on etcd. A store from before
/// the indexes (simulated: index keys and the built mark removed while the orchestrator
/// is down) gets them built at the next start, and the refusals hold. Once everything is
/// deleted in order, no index key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_dependencies_are_indexed_and_built_for_older_stores() {
    use drover_store::{KvStore, Prefixed, Txn, TxnOp};
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let raw: std::sync::Arc<dyn KvStore> = std::sync::Arc::new(
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap(),
    );
    let store = Prefixed::new(raw, cluster.store_prefix().expect("on etcd").to_string());
    let index_keys = || async { store.range(b"index/").await.unwrap().0.len() };
    let mut c = cluster.clients().await;
    let create = |name: &str, snapshot: &str| pb::CreateVolumeRequest {
        name: name.into(),
        project: "tests".into(),
        size_bytes: 1 << 20,
        backend: if snapshot.is_empty() { "backend-a".into() } else { String::new() },
        from_snapshot: snapshot.into(),
        ..Default::default()
    };
    c.volumes.create_volume(create("base", "")).await.expect("base volume");
    let snap = pb::CreateSnapshotRequest { volume: "base".into(), project: "tests".into(), name: "base-s".into() };
    c.snapshots.create_snapshot(snap).await.expect("snapshot of base");
    c.volumes.create_volume(create("child", "base-s")).await.expect("a volume from the snapshot");
    assert_eq!(index_keys().await, 2, "one key per dependency");

    let refusals = |c: &Clients| {
        let mut c = c.clone();
        async move {
            let snap = c
                .snapshots
                .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "base-s".into(), project: "tests".into() })
                .await
                .expect_err("a volume was made from it");
            assert_eq!(snap.code(), Code::FailedPrecondition);
            assert!(snap.message().contains("child") && snap.message().contains("delete them first"), "{snap:?}");
            let vol = c
                .volumes
                .delete_volume(pb::DeleteVolumeRequest { volume: "base".into(), project: "tests".into() })
                .await
                .expect_err("a snapshot holds it");
            assert_eq!(vol.code(), Code::FailedPrecondition);
            assert!(vol.message().contains("base-s"), "{vol:?}");
        }
    };
    refusals(&c).await;

    // An older store: the records without their index keys.
    cluster.orchestrator.proc.kill();
    let (kvs, _) = store.range(b"index/").await.unwrap();
    let txn = kvs.iter().fold(Txn::new(), |t, kv| t.and_then(TxnOp::delete(kv.key.clone())));
    store.txn(txn.and_then(TxnOp::delete(b"migrations/dependency-index".to_vec()))).await.unwrap();
    assert_eq!(index_keys().await, 0);
    cluster.restart_orchestrator().await;
    let mut c = cluster.clients().await;
    assert_eq!(index_keys().await, 2, "built again at start");
    assert!(store.get(b"migrations/dependency-index").await.unwrap().is_some());
    refusals(&c).await;

    c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: "child".into(), project: "tests".into() }).await.unwrap();
    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "base-s".into(), project: "tests".into() })
        .await
        .expect("no volume depends on it now");
    c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: "base".into(), project: "tests".into() }).await.unwrap();
    assert_eq!(index_keys().await, 0, "no index key left behind");
}

/// On etcd the orchestrator compacts etcd's history (here every second, keeping 10
/// revisions, far harsher than the default 50,000 every 5 minutes): a watch from an old
/// revision then ends as compacted, and the orchestrator's own watches (agent
/// registrations, execution owners, cancel requests) and everything that uses them keep
/// working: replication is enabled, a group fails over and back, and an agent restarted
/// meanwhile is found again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_history_is_compacted_and_the_orchestrator_works_on() {
    use drover_store::KvStore;
    let etcd = Etcd::start().await;
    let compact = ["--set", "store.compaction_interval=1s", "--set", "store.history_revisions=10"];
    let mut cluster = Cluster::start_custom(StoreChoice::Etcd(&etcd), "mock", &[], &compact).await;
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "compacted", 2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let oldest = loop {
        let mut from_start = raw.watch(b"", 1).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), tokio_stream::StreamExt::next(&mut from_start)).await {
            Ok(Some(Err(drover_store::StoreError::Compacted { oldest, .. }))) => break oldest,
            other => assert!(Instant::now() < deadline, "etcd was not compacted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(oldest > 1, "compacted up to revision {oldest}");

    // A new registration (a new port) reaches the orchestrator through its watch.
    cluster.agents[1].proc.kill();
    cluster.restart_agent(1, "mock");
    wait_backend_up(&mut c, "backend-b").await;
    for (target, status) in [("backend-b", "failed-over"), ("default", "enabled")] {
        let r = c
            .replication
            .failover_group(failover_request(&group, target, false))
            .await
            .unwrap_or_else(|e| panic!("move to {target}: {e}"))
            .into_inner();
        assert_eq!(r.group.unwrap().replication_status, status, "{:?}", r.items);
    }
    // And on: the compaction follows the revisions the moves wrote.
    let now = raw.put(b"probe", b"x").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut from_start = raw.watch(b"", 1).await.unwrap();
        match tokio_stream::StreamExt::next(&mut from_start).await {
            Some(Err(drover_store::StoreError::Compacted { oldest: later, .. })) if later >= now - 10 => break,
            Some(Err(drover_store::StoreError::Compacted { .. })) => {}
            other => panic!("etcd history from revision 1: {other:?}"),
        }
        assert!(Instant::now() < deadline, "etcd was not compacted past revision {} within 30 s", now - 10);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A heartbeat's answer says where the agents of the peer backends it asks about are now
/// (what the agent's periodic syncs dial); a backend with no live agent and a name no
/// backend can have are left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_answers_where_the_peer_backends_agents_are() {
    use pb::agent_registry_client::AgentRegistryClient;
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let dir = cluster.path();
    let files = drover_proto::tls::TlsFiles {
        ca: drover_tests::cluster::ca_file(dir),
        cert: dir.join("certs/agent-agent.pem"),
        key: dir.join("certs/agent-agent.key"),
    };
    let channel = tonic::transport::Endpoint::from_shared(cluster.orchestrator.endpoint.clone())
        .unwrap()
        .tls_config(files.client(drover_proto::tls::ORCHESTRATOR_NAME).unwrap())
        .unwrap()
        .connect()
        .await
        .expect("the orchestrator answers");
    let stamp: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> = drover_proto::stamp_api_version;
    let mut registry = AgentRegistryClient::with_interceptor(channel, stamp);
    let lease = registry
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "agent-backend-c".into(),
            site: "site-b".into(),
            backend: "backend-c".into(),
            endpoint: "https://127.0.0.1:9".into(),
            driver: "mock".into(),
            ..Default::default()
        })
        .await
        .expect("a third agent registers")
        .into_inner()
        .lease_id;
    let asked = ["backend-a", "backend-b", "backend-gone", "not/a name", ""].map(String::from).to_vec();
    let answer = registry
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "agent-backend-c".into(),
            backend: "backend-c".into(),
            lease_id: lease,
            sync_failures: Vec::new(),
            peer_backends: asked,
        })
        .await
        .expect("the heartbeat is answered")
        .into_inner();
    assert!(answer.ttl_seconds > 0);
    let mut got: Vec<(String, String)> = answer.peer_endpoints.into_iter().collect();
    got.sort();
    let want: Vec<(String, String)> = vec![
        ("backend-a".into(), cluster.agents[0].endpoint.clone()),
        ("backend-b".into(), cluster.agents[1].endpoint.clone()),
    ];
    assert_eq!(got, want);
}

/// A cluster whose backend-a fails every `op` with Unavailable (agent calls time out
/// after 500 ms), with a 1 GiB volume `name` on it.
async fn failing_backend(op: &str, name: &str) -> (Cluster, Clients) {
    let (cluster, mut c) = failing_backend_holding(op, &[]).await;
    drover_tests::volume_on_a(&mut c, "tests", name, 1 << 30).await;
    (cluster, c)
}

/// A cluster whose backend-a fails every `op` (Unavailable, past the calls' 500 ms
/// deadline), with `agent_extra` flags for its agents.
async fn failing_backend_holding(op: &str, agent_extra: &[&str]) -> (Cluster, Clients) {
    let fail = format!("mock.fail.{op}=1.0");
    let mut extra = vec!["--set", &fail];
    extra.extend_from_slice(agent_extra);
    let cluster =
        Cluster::start_custom(StoreChoice::Embedded, "mock", &extra, &["--set", "defaults.agent_call_timeout=500ms"])
            .await;
    let c = cluster.clients().await;
    (cluster, c)
}

/// Backend-a recovers: its agent restarts without the fault.
async fn recover(cluster: &mut Cluster, c: &mut Clients) {
    cluster.agents[0].proc.kill();
    cluster.restart_agent(0, "mock");
    wait_backend_up(c, "backend-a").await;
}

fn get(volume: &str) -> pb::GetVolumeRequest {
    pb::GetVolumeRequest { volume: volume.into(), project: "tests".into() }
}

/// An unmanage that fails (its backend answering Unavailable past the call's deadline)
/// leaves the volume in error and says to retry the unmanage; the retry is allowed from
/// error, and once the backend answers it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unmanage_can_be_retried_as_its_message_says() {
    let (mut cluster, mut c) = failing_backend("unmanage_volume", "leaving").await;
    let unmanage = || pb::UnmanageVolumeRequest { volume: "leaving".into(), project: "tests".into() };
    let failed = c.volumes.unmanage_volume(unmanage()).await.expect_err("the backend fails every unmanage");
    let v = c.volumes.get_volume(get("leaving")).await.unwrap().into_inner();
    assert_eq!(v.status, "error", "{failed:?}");
    assert!(v.status_reason.contains("retry the unmanage"), "{}", v.status_reason);
    recover(&mut cluster, &mut c).await;
    let r = c.volumes.unmanage_volume(unmanage()).await.expect("the retry the message asks for").into_inner();
    assert_eq!(r.reference, v.id);
    assert_eq!(c.volumes.get_volume(get("leaving")).await.unwrap_err().code(), Code::NotFound);
}

/// A manage that fails leaves the volume in error and says to unmanage it, not to
/// delete it (the backend may have taken the image before its answer was lost); the
/// unmanage is allowed from error, the image is still there to manage, and the manage
/// the message asks for goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_manage_can_be_unmanaged_and_managed_again_as_its_message_says() {
    let (mut cluster, mut c) =
        failing_backend_holding("manage_volume", &["--set", "mock.unmanaged.legacy=1073741824"]).await;
    let manage = || pb::ManageVolumeRequest {
        backend: "backend-a".into(),
        reference: "legacy".into(),
        name: "adopted".into(),
        project: "tests".into(),
        without_snapshots: false,
    };
    let failed = c.volumes.manage_volume(manage()).await.expect_err("the backend fails every manage");
    let v = c.volumes.get_volume(get("adopted")).await.unwrap().into_inner();
    assert_eq!(v.status, "error", "{failed:?}");
    assert!(v.status_reason.contains("drover volume unmanage adopted"), "{}", v.status_reason);
    assert!(!v.status_reason.contains("delete"), "a delete could destroy the image: {}", v.status_reason);
    recover(&mut cluster, &mut c).await;
    let unmanage = pb::UnmanageVolumeRequest { volume: "adopted".into(), project: "tests".into() };
    c.volumes.unmanage_volume(unmanage).await.expect("unmanage from error, as the message says");
    assert_eq!(c.volumes.get_volume(get("adopted")).await.unwrap_err().code(), Code::NotFound);
    let listed = c
        .volumes
        .list_manageable_volumes(pb::ListManageableVolumesRequest { backend: "backend-a".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.volumes.iter().any(|m| m.reference == "legacy"), "the image is still there: {listed:?}");
    let v = c.volumes.manage_volume(manage()).await.expect("the manage again").into_inner();
    assert_eq!((v.status.as_str(), v.size_bytes), ("available", 1 << 30));
}

/// The same for an extend: one that fails leaves the volume in error with its size
/// unknown and asks for the extend again, which is allowed from error and, once the
/// backend answers, grows the volume and makes it available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_extend_can_be_retried_as_its_message_says() {
    let (mut cluster, mut c) = failing_backend("extend_volume", "growing").await;
    let extend =
        || pb::ExtendVolumeRequest { volume: "growing".into(), project: "tests".into(), new_size_bytes: 2 << 30 };
    let failed = c.volumes.extend_volume(extend()).await.expect_err("the backend fails every extend");
    let v = c.volumes.get_volume(get("growing")).await.unwrap().into_inner();
    assert_eq!(v.status, "error", "{failed:?}");
    assert!(v.status_reason.contains("until the extend is retried"), "{}", v.status_reason);
    recover(&mut cluster, &mut c).await;
    let v = c.volumes.extend_volume(extend()).await.expect("the retry the message asks for").into_inner();
    assert_eq!((v.status.as_str(), v.size_bytes), ("available", 2 << 30));
}
