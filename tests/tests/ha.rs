//! Two orchestrators on one etcd: an execution has one owner while that owner's lease
//! lives; when the owner is SIGKILLed, the other resumes it within the lease TTL plus a
//! few seconds, and agents refuse the dead owner's epoch.

use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use drover_tests::cluster::{
    AgentSpec, agent_client, ca_file, connect, locate_drover, start_agent, start_orchestrator, token_file,
};
use drover_tests::{Etcd, fresh_prefix, replicated_group, wait_backends_up};
use tonic::Code;

const TTL: Duration = Duration::from_secs(3);

async fn execution(c: &mut Clients, id: &str) -> pb::Execution {
    c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_resumes_a_dead_owners_failover_and_the_dead_epoch_is_refused() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = locate_drover().unwrap();
    let store: Vec<String> = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--store-prefix",
        &fresh_prefix(),
        "--set",
        &format!("owner_lease_ttl={}s", TTL.as_secs()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut a = start_orchestrator(&bin, dir.path(), "orchestrator-a", &store).unwrap();
    let b = start_orchestrator(&bin, dir.path(), "orchestrator-b", &store).unwrap();
    let both = format!("{},{}", a.endpoint, b.endpoint);
    let mut agents = Vec::new();
    for (site, backend) in [("site-a", "backend-a"), ("site-b", "backend-b")] {
        let name = format!("agent-{backend}");
        let extra = vec!["--set".into(), "mock.latency=700ms".into()];
        let spec = AgentSpec { name: &name, driver: "mock", site, backend, orchestrator: &both, extra };
        agents.push(start_agent(&bin, dir.path(), spec).unwrap());
    }
    let mut ca = connect(&a.endpoint, dir.path(), Duration::from_secs(60)).await.unwrap();
    let mut cb = connect(&b.endpoint, dir.path(), Duration::from_secs(60)).await.unwrap();
    wait_backends_up(&mut cb, 2).await;
    let group = replicated_group(&mut ca, "ha", 2).await;

    // A failover on A, not waited for.
    let r = ca
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: group.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            no_wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = r.execution_id;
    // While A lives, B leaves it alone.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let seen = execution(&mut cb, &id).await;
    assert_eq!(seen.status, "running", "{seen:?}");
    assert!(seen.owner.contains(a.addr()), "A owns it: {}", seen.owner);
    assert_eq!(seen.claims, 1);
    let dead_epoch = seen.epoch;

    a.proc.kill();
    let killed = Instant::now();
    let deadline = killed + TTL + Duration::from_secs(5) + Duration::from_secs(6);
    let done = loop {
        let e = execution(&mut cb, &id).await;
        if e.status != "running" {
            break e;
        }
        assert!(Instant::now() < deadline, "B did not finish the failover: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = killed.elapsed();
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.claims, 2, "resumed once, by B");
    assert!(done.owner.contains(b.addr()), "{}", done.owner);
    assert!(done.epoch > dead_epoch);
    // B claimed it within TTL + 5 s of the kill (the rest is the mock's latency).
    let resumed_step = done.steps.iter().find(|s| s.epoch == done.epoch).expect("a step under B's epoch");
    let claim_to_kill = Duration::from_millis((resumed_step.started_ms - done.created_ms).max(0) as u64);
    eprintln!("failover finished {took:?} after the kill; B's first step began {claim_to_kill:?} after submit");
    assert!(took < TTL + Duration::from_secs(5) + Duration::from_secs(6), "{took:?}");

    let g = cb
        .groups
        .get_group(pb::GetGroupRequest { group: group.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"));
    assert_eq!(g.epoch as i64, done.epoch, "the group records B's epoch");

    // The dead owner's epoch is refused by the agents.
    let mut agent = agent_client(&agents[1].endpoint, dir.path()).await;
    let stale = agent
        .promote_volume(apb::PromoteVolumeRequest {
            ctx: Some(apb::OpContext {
                op_id: "dead-owner".into(),
                epoch: dead_epoch as u64,
                fence_scope: format!("group/{group}"),
            }),
            volume_id: g.volume_ids[0].clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{}", stale.message());
    assert!(stale.message().contains("stale epoch"), "{}", stale.message());
}

/// The embedded store is single-node: a second orchestrator on the same file refuses to
/// start, naming the file, and the first keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_on_one_embedded_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = locate_drover().unwrap();
    let file = dir.path().join("store.redb");
    let store = vec!["--store-path".to_string(), file.display().to_string()];
    let first = start_orchestrator(&bin, dir.path(), "first", &store).expect("the first starts");
    let out = std::process::Command::new(&bin)
        .args(["orchestrator", "--listen", "127.0.0.1:0", "--insecure"])
        .args(&store)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the second orchestrator must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&file.display().to_string()) && err.contains("another orchestrator"), "{err}");
    let mut c = connect(&first.endpoint, dir.path(), Duration::from_secs(10)).await.unwrap();
    c.version.get_version(pb::GetVersionRequest {}).await.expect("the first still serves");
}

/// A client given three orchestrators of one cluster keeps working while any one of them
/// is down: it connects to the first member that answers, and every member serves every
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_three_endpoints_survives_any_one_down() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = locate_drover().unwrap();
    let store: Vec<String> = ["--store", "etcd", "--etcd-endpoints", &etcd.endpoint, "--store-prefix", &fresh_prefix()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut servers: Vec<_> = ["o1", "o2", "o3"]
        .iter()
        .map(|n| start_orchestrator(&bin, dir.path(), n, &store).expect("orchestrator starts"))
        .collect();
    let all = servers.iter().map(|s| s.endpoint.clone()).collect::<Vec<_>>().join(",");
    // Membership: every orchestrator announces itself; `drover orchestrator list` shows
    // each with its health.
    let members = |endpoint: &str| -> serde_json::Value {
        let out = std::process::Command::new(&bin)
            .args(["orchestrator", "list", "--endpoint", endpoint, "-o", "json"])
            .env("DROVER_TOKEN_FILE", token_file(dir.path()))
            .env("DROVER_CA_FILE", ca_file(dir.path()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = members(&all);
        let up = m["orchestrators"].as_array().map_or(0, |o| o.iter().filter(|o| o["status"] == "up").count());
        if up == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "three members up: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (down, server) in servers.iter_mut().enumerate() {
        server.proc.kill();
        let m = members(&all);
        let dead = m["orchestrators"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["endpoint"] == server.endpoint.as_str())
            .map(|o| o["status"].clone());
        assert!(dead.is_none() || dead == Some("down".into()), "a killed member is not up: {m}");
        // A client (or CLI run) connecting now is served by a member that answers.
        let mut c = connect(&all, dir.path(), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("connect with orchestrator {down} down: {e}"));
        for i in 0..20 {
            c.groups
                .list_groups(pb::ListGroupsRequest { project: String::new(), ..Default::default() })
                .await
                .unwrap_or_else(|s| panic!("call {i} with orchestrator {down} down: {}", s.message()));
        }
        // And through the CLI, which takes the same list.
        let out = std::process::Command::new(&bin)
            .args(["group", "list", "--endpoint", &all, "-o", "json"])
            .env("DROVER_TOKEN_FILE", token_file(dir.path()))
            .env("DROVER_CA_FILE", ca_file(dir.path()))
            .output()
            .unwrap();
        assert!(out.status.success(), "CLI with orchestrator {down} down: {}", String::from_utf8_lossy(&out.stderr));
        // Back on the same address, as a restarted service would be.
        let addr = server.addr().to_string();
        let mut again = store.clone();
        again.extend(["--set".to_string(), format!("listen={addr}")]);
        *server = start_orchestrator(&bin, dir.path(), &format!("o{down}-again"), &again).expect("restart");
    }
}
