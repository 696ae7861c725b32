//! Chaos: group failovers and failbacks on mock agents while the orchestrator is SIGKILLed
//! at random moments (20 times on each store), an agent is SIGKILLed mid-move (20 times),
//! or etcd is SIGKILLed mid-transition; and a test failover runbook while the orchestrator
//! and the clone side's agent are SIGKILLed (6 times each). After the dust settles the agents' op logs and
//! roles must prove the invariants: every execution ended, no op_id entered a driver
//! twice, every volume has exactly one primary (on its group's active backend), no group
//! is in error or stuck, and no forced failover was needed. Each run prints its figures (see docs/reliability.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::invariants::{op_log, repeated_op_ids, role_violations};
use drover_tests::{Cluster, Etcd, StoreChoice, replicated_group, wait_backend_up, wait_executions_ended};

const GROUPS: usize = 10;

/// The orchestrator compacts etcd's history every second down to its newest 50
/// revisions (the default keeps 50,000 every 5 minutes), so watches that resume after a
/// kill often find their revision compacted. The embedded store ignores both settings.
async fn start(store: StoreChoice<'_>) -> Cluster {
    Cluster::start_custom(
        store,
        "mock",
        &["--set", "mock.latency=100ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"],
        &[
            "--set",
            "owner_lease_ttl=2s",
            "--set",
            "store.compaction_interval=1s",
            "--set",
            "store.history_revisions=50",
        ],
    )
    .await
}

async fn setup(cluster: &Cluster) -> Vec<String> {
    let mut c = cluster.clients().await;
    let mut groups = Vec::new();
    for i in 0..GROUPS {
        groups.push(replicated_group(&mut c, &format!("chaos-{i}"), 1).await);
    }
    groups
}

async fn group(c: &mut Clients, id: &str) -> Option<pb::Group> {
    c.groups
        .get_group(pb::GetGroupRequest { group: id.into(), project: "tests".into() })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Submits a planned move for every group at rest: failover when at home, failback when
/// away. Returns how many were accepted.
async fn move_all(c: &mut Clients, groups: &[String]) -> usize {
    move_or_retry(c, groups, &mut HashMap::new()).await
}

#[derive(Debug, Default)]
struct Figures {
    kills: usize,
    submitted: usize,
    executions: HashMap<String, usize>,
    /// Executions an orchestrator resumed after another owner (or itself) lost them.
    resumed: usize,
    driver_ops: usize,
    duplicate_op_ids: Vec<String>,
    role_violations: Vec<String>,
    bad_groups: Vec<String>,
}

impl Figures {
    fn violations(&self) -> usize {
        self.duplicate_op_ids.len()
            + self.role_violations.len()
            + self.bad_groups.len()
            + self.executions.get("failed").copied().unwrap_or(0)
            + self.executions.get("running").copied().unwrap_or(0)
    }
}

async fn check(cluster: &Cluster, groups: &[String], figures: &mut Figures) {
    let mut c = cluster.clients().await;
    wait_executions_ended(&mut c, Duration::from_secs(90)).await;
    let list = c.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
    for e in &list.executions {
        *figures.executions.entry(e.status.clone()).or_default() += 1;
        if e.claims > 1 {
            figures.resumed += 1;
        }
    }
    let (a, b) = (cluster.path().join("oplog-backend-a.jsonl"), cluster.path().join("oplog-backend-b.jsonl"));
    let (repeated, total) = repeated_op_ids(&[("backend-a", &a), ("backend-b", &b)]);
    figures.driver_ops += total;
    figures.duplicate_op_ids = repeated;
    for id in groups {
        let g = group(&mut c, id).await.expect("group exists");
        if g.replication_status != "enabled" && g.replication_status != "failed-over" {
            figures.bad_groups.push(format!("{}: {} ({})", g.name, g.replication_status, g.status_reason));
        }
    }
    let agents = [("backend-a", cluster.agents[0].endpoint.clone()), ("backend-b", cluster.agents[1].endpoint.clone())];
    figures.role_violations = role_violations(&mut c, cluster.dir.path(), &agents, groups).await;
}

async fn orchestrator_kills(store: StoreChoice<'_>, label: &str, kills: usize) {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = start(store).await;
    let groups = setup(&cluster).await;
    let mut figures = Figures::default();
    for _ in 0..kills {
        let mut c = cluster.clients().await;
        figures.submitted += move_all(&mut c, &groups).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(20..1200))).await;
        cluster.restart_orchestrator().await;
        figures.kills += 1;
    }
    let mut c = cluster.clients().await;
    figures.submitted += move_all(&mut c, &groups).await;
    check(&cluster, &groups, &mut figures).await;
    eprintln!("chaos [{label}, seed {seed}]: {figures:?}");
    println!(
        "chaos {label}: {} orchestrator kills, {} moves submitted, executions {:?} ({} resumed), {} driver ops, {} violations",
        figures.kills,
        figures.submitted,
        figures.executions,
        figures.resumed,
        figures.driver_ops,
        figures.violations()
    );
    assert_eq!(figures.violations(), 0, "seed {seed}: {figures:#?}");
    assert!(figures.executions.get("succeeded").copied().unwrap_or(0) >= GROUPS, "work was done: {figures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_sigkills_on_the_embedded_store() {
    orchestrator_kills(StoreChoice::Embedded, "embedded", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_sigkills_on_etcd() {
    let etcd = Etcd::start().await;
    orchestrator_kills(StoreChoice::Etcd(&etcd), "etcd", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sigkills_mid_transition_need_no_orchestrator_restart() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut etcd = Etcd::start().await;
    let cluster = start(StoreChoice::Etcd(&etcd)).await;
    let groups = setup(&cluster).await;
    let orchestrator_pid = cluster.orchestrator.proc.pid();
    let mut figures = Figures::default();
    for _ in 0..5 {
        let mut c = cluster.clients().await;
        figures.submitted += move_all(&mut c, &groups).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
        etcd.kill();
        figures.kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(2000..6000))).await;
        etcd.restart().await;
    }
    check(&cluster, &groups, &mut figures).await;
    assert_eq!(cluster.orchestrator.proc.pid(), orchestrator_pid, "the orchestrator was not restarted");
    // The history was compacted while the kills went on (see `start`).
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let mut from_start = drover_store::KvStore::watch(&raw, b"", 1).await.unwrap();
    match tokio_stream::StreamExt::next(&mut from_start).await {
        Some(Err(drover_store::StoreError::Compacted { oldest, .. })) => eprintln!("etcd compacted up to {oldest}"),
        other => panic!("etcd's history was never compacted: {other:?}"),
    }
    eprintln!("chaos [etcd kills, seed {seed}]: {figures:?}");
    println!(
        "chaos etcd-kills: {} etcd kills, {} moves submitted, executions {:?} ({} resumed), {} driver ops, {} violations",
        figures.kills,
        figures.submitted,
        figures.executions,
        figures.resumed,
        figures.driver_ops,
        figures.violations()
    );
    assert_eq!(figures.violations(), 0, "seed {seed}: {figures:#?}");
}

/// A planned site failover of 100 groups from `runbooks/site-failover-planned.yaml`,
/// with the orchestrator SIGKILLed 20 times at random moments while it runs (restarted
/// each time): the run ends succeeded with every group failed over, as a run without
/// kills does, every execution ended, no op_id ran twice, one primary per volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_sigkills_during_a_site_failover_runbook() {
    const N: usize = 100;
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.latency=200ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"],
        &["--set", "owner_lease_ttl=2s"],
    )
    .await;
    let c = cluster.clients().await;
    let mut groups = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(10) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let mut c = c.clone();
            set.spawn(async move { replicated_group(&mut c, &format!("rb-{i:03}"), 1).await });
        }
        while let Some(id) = set.join_next().await {
            groups.push(id.unwrap());
        }
    }
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks/site-failover-planned.yaml");
    let req = pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: [("site".to_string(), "site-a".to_string()), ("max_parallel".to_string(), "5".to_string())].into(),
    };
    let mut c = cluster.clients().await;
    let run = c.runbooks.run_runbook(req).await.expect("run").into_inner();
    let mut figures = Figures::default();
    // Every kill lands while the run is going and owned by the orchestrator killed: after
    // each restart, wait until the new one has claimed the run, then a random while.
    let mut claims = 1;
    while figures.kills < 20 {
        let mut c = cluster.clients().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let now = loop {
            let e =
                c.executions.get_execution(pb::GetExecutionRequest { id: run.id.clone() }).await.unwrap().into_inner();
            if e.claims >= claims || e.status != "running" {
                break e;
            }
            assert!(Instant::now() < deadline, "seed {seed}: the run was not resumed within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if now.status != "running" {
            break;
        }
        // Short enough that 20 kills land before the run can end (with pauses of up to
        // 1.2 s, a run once ended before its 20th kill).
        tokio::time::sleep(Duration::from_millis(rng.u64(150..800))).await;
        let still = c.executions.get_execution(pb::GetExecutionRequest { id: run.id.clone() }).await.unwrap();
        if still.get_ref().status != "running" {
            break;
        }
        cluster.restart_orchestrator().await;
        figures.kills += 1;
        claims = now.claims + 1;
    }
    let mut c = cluster.clients().await;
    wait_executions_ended(&mut c, Duration::from_secs(300)).await;
    let ended = c.executions.get_execution(pb::GetExecutionRequest { id: run.id.clone() }).await.unwrap().into_inner();
    check(&cluster, &groups, &mut figures).await;
    let moved = {
        let mut n = 0;
        for id in &groups {
            if group(&mut c, id).await.is_some_and(|g| g.replication_status == "failed-over") {
                n += 1;
            }
        }
        n
    };
    println!(
        "chaos runbook: {} orchestrator kills during a {N}-group site failover; run {} after {} claims; {moved} groups \
         failed over; executions {:?} ({} resumed), {} driver ops, {} violations",
        figures.kills,
        ended.status,
        ended.claims,
        figures.executions,
        figures.resumed,
        figures.driver_ops,
        figures.violations()
    );
    assert_eq!(ended.status, "succeeded", "seed {seed}: {}", ended.error);
    assert_eq!(figures.kills, 20, "seed {seed}: the run ended before 20 kills landed in it");
    assert!(ended.claims > 20, "seed {seed}: the run was resumed after every kill ({} claims)", ended.claims);
    assert_eq!(moved, N, "seed {seed}: every group failed over, as without kills");
    assert_eq!(figures.violations(), 0, "seed {seed}: {figures:#?}");
}

/// Planned moves of ten groups on two mock agents (100 ms per driver call) while one of
/// the agents, picked at random, is SIGKILLed at a random moment and started again a
/// random while later, 20 times. A move whose agent died mid-call ends in error, or
/// succeeds once the agent is back; a move in error is submitted again (a new execution,
/// new op_ids), as an admin would retry it. Once no agent is killed any more and every
/// group is at rest, the op logs must show no op_id that entered a driver twice (the
/// ledger answers a repeated op_id whose first run a kill cut short with "interrupted",
/// not a second run), and every volume exactly one primary on its group's active backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkills_mid_move_run_nothing_twice() {
    const LATENCY_MS: i64 = 300;
    const AGENT_FLAGS: [&str; 4] = ["--set", "mock.latency=300ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"];
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &AGENT_FLAGS, &[]).await;
    let groups = setup(&cluster).await;
    let mut figures = Figures::default();
    let mut targets: HashMap<String, String> = HashMap::new();
    // (agent index, when it was killed, in ms since the epoch)
    let mut kills = Vec::new();
    for _ in 0..20 {
        let mut c = cluster.clients().await;
        figures.submitted += move_or_retry(&mut c, &groups, &mut targets).await;
        tokio::time::sleep(Duration::from_millis(rng.u64(20..900))).await;
        let i = rng.usize(0..2);
        cluster.agents[i].proc.kill();
        kills.push((i, now_ms()));
        figures.kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1500))).await;
        cluster.restart_agent_with(i, "mock", &AGENT_FLAGS);
        wait_backend_up(&mut c, ["backend-a", "backend-b"][i]).await;
    }
    // No more kills: retry what is in error until every group is at rest.
    let mut c = cluster.clients().await;
    let mut retries = 0;
    loop {
        wait_executions_ended(&mut c, Duration::from_secs(90)).await;
        let mut in_error = 0;
        for id in &groups {
            if group(&mut c, id).await.is_some_and(|g| g.replication_status == "error") {
                in_error += 1;
            }
        }
        if in_error == 0 || retries == 5 {
            break;
        }
        retries += 1;
        figures.submitted += move_or_retry(&mut c, &groups, &mut targets).await;
    }
    check(&cluster, &groups, &mut figures).await;
    // A kill cut an operation short when a mutation had entered that agent's driver less
    // than one driver call's latency before it.
    let logs = [cluster.path().join("oplog-backend-a.jsonl"), cluster.path().join("oplog-backend-b.jsonl")];
    let logs = logs.map(|p| op_log(&p));
    let mid_move = kills
        .iter()
        .filter(|(i, at)| logs[*i].iter().any(|e| !e.op_id.is_empty() && e.at_ms <= *at && *at - e.at_ms < LATENCY_MS))
        .count();
    // Moves that left their group in error (the execution ends, its answer says why),
    // and of those, the ones an agent refused to run again under the same op_id.
    let answers: Vec<serde_json::Value> = c
        .executions
        .list_executions(pb::ListExecutionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .executions
        .iter()
        .filter_map(|e| serde_json::from_str(&e.output_json).ok())
        .collect();
    let in_error: Vec<String> = answers
        .iter()
        .filter(|a| a["value"]["group"]["replication_status"] == "error")
        .map(|a| a["value"]["group"]["status_reason"].as_str().unwrap_or_default().to_string())
        .collect();
    let interrupted = in_error.iter().filter(|r| r.contains("interrupted by a restart of this agent")).count();
    for reason in &in_error {
        eprintln!("left in error: {reason}");
    }
    eprintln!("chaos [agent kills, seed {seed}]: {figures:?}");
    println!(
        "chaos agent-kills: {} agent kills ({mid_move} cut a driver call short), {} moves submitted, executions {:?} \
         ({} left their group in error, {interrupted} of them on an op its agent would not run twice), {} driver ops, {} repeated op_ids, {} role violations, \
         {} groups not at rest after {retries} rounds of retries",
        figures.kills,
        figures.submitted,
        figures.executions,
        in_error.len(),
        figures.driver_ops,
        figures.duplicate_op_ids.len(),
        figures.role_violations.len(),
        figures.bad_groups.len(),
    );
    // Executions may fail here (their agent died under them); what must hold is below.
    assert!(mid_move > 0, "seed {seed}: no kill cut a driver call short");
    assert!(figures.duplicate_op_ids.is_empty(), "seed {seed}: {figures:#?}");
    assert!(figures.role_violations.is_empty(), "seed {seed}: {figures:#?}");
    assert!(figures.bad_groups.is_empty(), "seed {seed}: {figures:#?}");
    assert_eq!(figures.executions.get("running"), None, "seed {seed}: {figures:#?}");
    assert!(figures.executions.get("succeeded").copied().unwrap_or(0) >= GROUPS, "work was done: {figures:?}");
}

/// `runbooks/test-failover.yaml` over ten groups on mock agents (200 ms per driver call)
/// while, at random moments, the orchestrator or the replica side's agent (where the
/// clones are made) is SIGKILLed and restarted, through the clone step, the check, the
/// prompt (approved from a restarted orchestrator) and the cleanup. The run must end
/// succeeded with one clone per volume made and every clone it made removed (from the
/// mock's log of driver calls: each `clone_recovery_point` has a later `delete_clone`),
/// no op_id twice, one primary per volume and every group still replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failover_under_kills_leaves_no_clone_behind() {
    const N: usize = 10;
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let flags = ["--set", "mock.latency=200ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"];
    let mut cluster =
        Cluster::start_custom(StoreChoice::Embedded, "mock", &flags, &["--set", "owner_lease_ttl=2s"]).await;
    let mut c = cluster.clients().await;
    let mut groups = Vec::new();
    for i in 0..N {
        groups.push(replicated_group(&mut c, &format!("tf-{i}"), 1).await);
    }
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks/test-failover.yaml");
    let req = pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: [("site".to_string(), "site-a".to_string())].into(),
    };
    let run = c.runbooks.run_runbook(req).await.expect("run").into_inner();
    let mut figures = Figures::default();
    let (mut agent_kills, mut approved) = (0, false);
    // An orchestrator kill only once the run has been claimed again since the last one,
    // so that each lands on the run's owner.
    let mut claims = 1;
    let mut after_approval = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let ended = loop {
        assert!(Instant::now() < deadline, "seed {seed}: the run did not end within 240 s");
        tokio::time::sleep(Duration::from_millis(rng.u64(100..700))).await;
        let mut c = cluster.clients().await;
        let Ok(e) = c.executions.get_execution(pb::GetExecutionRequest { id: run.id.clone() }).await else {
            continue;
        };
        let e = e.into_inner();
        if e.status != "running" {
            break e;
        }
        // The prompt is approved once three kills of each kind have landed before it.
        if e.step == "prompt:tested" && figures.kills >= 3 && agent_kills >= 3 && !approved {
            let decided = c
                .executions
                .decide_prompt(pb::DecidePromptRequest {
                    id: run.id.clone(),
                    approve: true,
                    by: "tester".into(),
                    ..Default::default()
                })
                .await;
            approved = decided.is_ok();
            continue;
        }
        let orchestrator = figures.kills < 6 && e.claims >= claims;
        let agent = agent_kills < 6;
        if orchestrator && (!agent || rng.bool()) {
            cluster.restart_orchestrator().await;
            figures.kills += 1;
            claims = e.claims + 1;
            after_approval += usize::from(approved);
        } else if agent && rng.bool() {
            cluster.agents[1].proc.kill();
            cluster.restart_agent_with(1, "mock", &flags);
            agent_kills += 1;
            after_approval += usize::from(approved);
        }
    };
    check(&cluster, &groups, &mut figures).await;
    let log = op_log(&cluster.path().join("oplog-backend-b.jsonl"));
    let made: Vec<(usize, String)> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| e.op == "clone_recovery_point")
        .map(|(i, e)| (i, e.target.clone()))
        .collect();
    let left: Vec<&String> = made
        .iter()
        .filter(|(i, id)| !log[*i..].iter().any(|e| e.op == "delete_clone" && &e.target == id))
        .map(|(_, id)| id)
        .collect();
    println!(
        "chaos test failover (seed {seed}): {} orchestrator and {agent_kills} agent kills ({after_approval} after the \
         approval); run {} after {} claims; {} clones made, {} left; executions {:?} ({} resumed), {} driver ops, {} \
         violations",
        figures.kills,
        ended.status,
        ended.claims,
        made.len(),
        left.len(),
        figures.executions,
        figures.resumed,
        figures.driver_ops,
        figures.violations()
    );
    assert_eq!(ended.status, "succeeded", "seed {seed}: {}", ended.error);
    assert!(made.len() >= N, "seed {seed}: a clone per volume was made ({})", made.len());
    assert!(left.is_empty(), "seed {seed}: clones left behind: {left:?}");
    assert_eq!(figures.violations(), 0, "seed {seed}: {figures:#?}");
}

/// A planned move for every group at rest (failover when at home, failback when away),
/// and a group in error is sent again to the backend its last move aimed at, when
/// `targets` recorded one. Returns how many were accepted.
async fn move_or_retry(c: &mut Clients, groups: &[String], targets: &mut HashMap<String, String>) -> usize {
    let mut accepted = 0;
    for id in groups {
        let Some(g) = group(c, id).await else { continue };
        let target = match (g.replication_status.as_str(), targets.get(id)) {
            ("enabled", _) => "backend-b".to_string(),
            ("failed-over", _) => "default".to_string(),
            ("error", Some(t)) => t.clone(),
            _ => continue,
        };
        let req = pb::FailoverGroupRequest {
            group: id.clone(),
            project: "tests".into(),
            target_backend: target.clone(),
            no_wait: true,
            ..Default::default()
        };
        if c.replication.failover_group(req).await.is_ok() {
            accepted += 1;
            targets.insert(id.clone(), target);
        }
    }
    accepted
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_millis() as i64
}
