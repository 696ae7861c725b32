//! Active/active: three orchestrators on one etcd run a 100-group site-failover runbook
//! while its owner is SIGKILLed (20 times), SIGSTOPped past its lease, or etcd itself is
//! SIGKILLed (5 times). The agents' op logs and roles prove the invariants: nothing ran
//! twice, one primary per volume, every execution ended, the final state is the one a
//! run without faults reaches. A group enable whose owner lost its claim without noticing
//! leaves no trace of its refused calls.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_store::{EtcdStore, KvStore};
use drover_tests::cluster::{AgentSpec, Server, connect, locate_drover, start_agent, start_orchestrator};
use drover_tests::invariants::{op_log, repeated_op_ids, role_violations};
use drover_tests::{Etcd, fresh_prefix, plain_group_in, replicated_group, wait_backends_up};

const TTL: Duration = Duration::from_secs(3);

struct Trio {
    dir: tempfile::TempDir,
    bin: PathBuf,
    store: Vec<String>,
    orchestrators: Vec<Server>,
    agents: Vec<Server>,
    all: String,
}

impl Trio {
    async fn start(etcd: &Etcd, latency: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = locate_drover().unwrap();
        let prefix = fresh_prefix();
        let store: Vec<String> = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint,
            "--store-prefix",
            &prefix,
            "--set",
            &format!("owner_lease_ttl={}s", TTL.as_secs()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let orchestrators: Vec<Server> = (0..3)
            .map(|i| start_orchestrator(&bin, dir.path(), &format!("o{i}"), &store).expect("orchestrator starts"))
            .collect();
        let all = orchestrators.iter().map(|s| s.endpoint.clone()).collect::<Vec<_>>().join(",");
        let mut agents = Vec::new();
        for (site, backend) in [("site-a", "backend-a"), ("site-b", "backend-b")] {
            let name = format!("agent-{backend}");
            let oplog = dir.path().join(format!("oplog-{backend}.jsonl"));
            let extra = vec![
                "--set".into(),
                format!("mock.latency={latency}"),
                "--set".into(),
                format!("mock.oplog={}", oplog.display()),
            ];
            let spec = AgentSpec { name: &name, driver: "mock", site, backend, orchestrator: &all, extra };
            agents.push(start_agent(&bin, dir.path(), spec).expect("agent starts"));
        }
        let trio = Self { dir, bin, store, orchestrators, agents, all };
        wait_backends_up(&mut trio.client().await, 2).await;
        trio
    }

    async fn client(&self) -> Clients {
        connect(&self.all, self.dir.path(), Duration::from_secs(60)).await.expect("a member answers")
    }

    /// The member whose owner id is `owner` (ids carry the listen address).
    fn index_of(&self, owner: &str) -> Option<usize> {
        self.orchestrators.iter().position(|o| owner.contains(&format!("-{}-", o.addr())))
    }

    /// The store prefix the members share.
    fn prefix(&self) -> &str {
        let at = self.store.iter().position(|a| a == "--store-prefix").expect("a prefix");
        &self.store[at + 1]
    }

    /// Starts member `i` again on its address, as a restarted service would be.
    fn restart(&mut self, i: usize) {
        let addr = self.orchestrators[i].addr().to_string();
        let mut args = self.store.clone();
        args.extend(["--set".to_string(), format!("listen={addr}")]);
        for attempt in 0.. {
            match start_orchestrator(&self.bin, self.dir.path(), &format!("o{i}-{}", uuid::Uuid::now_v7()), &args) {
                Ok(s) => {
                    self.orchestrators[i] = s;
                    return;
                }
                Err(e) if attempt < 20 => {
                    eprintln!("restart of o{i} on {addr}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("orchestrator {i} does not restart on {addr}: {e}"),
            }
        }
    }

    fn oplog(&self, backend: &str) -> PathBuf {
        self.dir.path().join(format!("oplog-{backend}.jsonl"))
    }

    /// Every invariant, once every execution ended: returns the violations.
    async fn violations(&self, groups: &[String]) -> Vec<String> {
        let mut c = self.client().await;
        drover_tests::wait_executions_ended(&mut c, Duration::from_secs(180)).await;
        let mut out = Vec::new();
        let list = c.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
        for e in list.executions.iter().filter(|e| e.status != "succeeded") {
            out.push(format!("execution {} ({}) {}: {}", e.id, e.summary, e.status, e.error));
        }
        let (a, b) = (self.oplog("backend-a"), self.oplog("backend-b"));
        let (repeated, _) = repeated_op_ids(&[("backend-a", &a), ("backend-b", &b)]);
        out.extend(repeated.into_iter().map(|r| format!("op_id ran twice: {r}")));
        let agents = [("backend-a", self.agents[0].endpoint.clone()), ("backend-b", self.agents[1].endpoint.clone())];
        out.extend(role_violations(&mut c, self.dir.path(), &agents, groups).await);
        for id in groups {
            let g = c
                .groups
                .get_group(pb::GetGroupRequest { group: id.clone(), project: "tests".into() })
                .await
                .unwrap()
                .into_inner();
            if (g.replication_status.as_str(), g.active_backend.as_str()) != ("failed-over", "backend-b") {
                out.push(format!(
                    "group {} ended {} on {}, not as without faults",
                    g.name, g.replication_status, g.active_backend
                ));
            }
        }
        out
    }
}

async fn groups(c: &Clients, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let mut c = c.clone();
            set.spawn(async move { replicated_group(&mut c, &format!("aa-{i:03}"), 1).await });
        }
        while let Some(id) = set.join_next().await {
            ids.push(id.unwrap());
        }
    }
    ids
}

async fn run_site_failover(c: &mut Clients) -> pb::Execution {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks/site-failover-planned.yaml");
    let req = pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: [("site".to_string(), "site-a".to_string()), ("max_parallel".to_string(), "5".to_string())].into(),
    };
    c.runbooks.run_runbook(req).await.expect("run").into_inner()
}

async fn execution(c: &mut Clients, id: &str) -> pb::Execution {
    c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner()
}

/// Waits until the run has at least `claims` claims (a member resumed it), or ended.
async fn claimed(c: &mut Clients, id: &str, claims: u32) -> pb::Execution {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = execution(c, id).await;
        if e.claims >= claims || e.status != "running" {
            return e;
        }
        assert!(Instant::now() < deadline, "run {id} was not resumed within 60 s (claims {})", e.claims);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The owner of a 100-group site failover run is SIGKILLed 20 times (each time after
/// it claimed the run; restarted at once): every takeover lands within the TTL plus 5 s,
/// and the invariants hold. The agents take 400 ms a call, so that the run (about 24 s
/// of agent time at 5 groups in parallel) outlasts the 20 kills: each owner moves it on
/// for only 0.2-1.2 s before its kill, and at 200 ms a call one run ended after 19.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_of_a_site_failover_is_sigkilled_twenty_times() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let etcd = Etcd::start().await;
    let mut trio = Trio::start(&etcd, "400ms").await;
    let c = trio.client().await;
    let ids = groups(&c, 100).await;
    let mut c = trio.client().await;
    let run = run_site_failover(&mut c).await;
    let (mut kills, mut worst) = (0, Duration::ZERO);
    let mut claims = 1;
    while kills < 20 {
        let mut c = trio.client().await;
        let now = claimed(&mut c, &run.id, claims).await;
        if now.status != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(200..1200))).await;
        let now = execution(&mut c, &run.id).await;
        let Some(owner) = trio.index_of(&now.owner).filter(|_| now.status == "running") else { break };
        trio.orchestrators[owner].proc.kill();
        let killed = Instant::now();
        kills += 1;
        trio.restart(owner);
        let mut c = trio.client().await;
        let after = claimed(&mut c, &run.id, now.claims + 1).await;
        if after.claims > now.claims {
            worst = worst.max(killed.elapsed());
        }
        claims = after.claims;
    }
    let violations = trio.violations(&ids).await;
    let mut c = trio.client().await;
    let ended = execution(&mut c, &run.id).await;
    println!(
        "active/active: {kills} owner SIGKILLs across 3 orchestrators during a 100-group site failover; run {} \
         after {} claims; worst takeover {:.1} s (TTL {} s); {} violations",
        ended.status,
        ended.claims,
        worst.as_secs_f64(),
        TTL.as_secs(),
        violations.len()
    );
    assert_eq!(kills, 20, "seed {seed}: the run ended before 20 kills landed");
    assert!(worst <= TTL + Duration::from_secs(5), "seed {seed}: a takeover took {worst:?}");
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}

/// The owner is SIGSTOPped past its lease; another member takes over; the owner is
/// SIGCONTed: no agent operation runs under its old epochs afterwards (every call it
/// makes is refused), and the run ends as without the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_that_wakes_is_fenced() {
    let etcd = Etcd::start().await;
    let trio = Trio::start(&etcd, "200ms").await;
    let c = trio.client().await;
    let ids = groups(&c, 30).await;
    let mut c = trio.client().await;
    let run = run_site_failover(&mut c).await;
    // Once the move is under way (group moves running under the run's owner), freeze it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (before, old) = loop {
        let e = execution(&mut c, &run.id).await;
        let list = c
            .executions
            .list_executions(pb::ListExecutionsRequest { status: "running".into(), ..Default::default() })
            .await
            .unwrap();
        // The epochs it acts under: the run's, and those of the group moves it owns.
        let old: Vec<u64> =
            list.into_inner().executions.iter().filter(|x| x.owner == e.owner).map(|x| x.epoch as u64).collect();
        if e.step.starts_with("failover:") && old.len() >= 2 {
            break (e, old);
        }
        assert!(Instant::now() < deadline && e.status == "running", "the move never started: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let owner = trio.index_of(&before.owner).expect("the owner is a member");
    let pid = trio.orchestrators[owner].proc.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let others = trio
        .orchestrators
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, o)| o.endpoint.clone())
        .collect::<Vec<_>>()
        .join(",");
    let mut c = connect(&others, trio.dir.path(), Duration::from_secs(60)).await.unwrap();
    let taken = claimed(&mut c, &run.id, before.claims + 1).await;
    let takeover_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    assert_ne!(taken.owner, before.owner, "another member took the run over");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let violations = trio.violations(&ids).await;
    let mut stale = Vec::new();
    for backend in ["backend-a", "backend-b"] {
        for e in op_log(&trio.oplog(backend)) {
            if e.at_ms > takeover_ms && old.contains(&e.epoch) && !e.op_id.is_empty() {
                stale.push(format!("{backend}: {} {} at epoch {}", e.op, e.op_id, e.epoch));
            }
        }
    }
    let ended = execution(&mut c, &run.id).await;
    println!(
        "active/active: owner paused past its {} s lease and woken; {} old epochs; {} driver ops under them after the \
         takeover; run {} with {} violations",
        TTL.as_secs(),
        old.len(),
        stale.len(),
        ended.status,
        violations.len()
    );
    assert!(stale.is_empty(), "the woken owner's calls ran: {stale:#?}");
    assert_ne!(ended.owner, before.owner, "the woken owner wrote the run's record");
    assert!(violations.is_empty(), "{violations:#?}");
}

/// A group enable's owner loses its claim while its first agent calls are in flight, the
/// way a lease lost under load is lost: etcd drops the claim, the owner has not noticed
/// yet (here its claim key is deleted; its lease, and so its keepalives, go on). Another
/// member takes the enable over at once and raises the fence; the old owner's next calls
/// are refused (stale epoch). Its final write must be refused too: before the group's final
/// write compared the owner's claim, it landed first and the group ended in error with
/// "the caller no longer owns this operation" (seen in CI under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enable_whose_owner_lost_its_claim_unnoticed_ends_as_without_it() {
    let etcd = Etcd::start().await;
    let trio = Trio::start(&etcd, "1s").await;
    let mut c = trio.client().await;
    let id = plain_group_in(&mut c, "tests", "aa-enable", 3).await;
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: id.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 0,
            no_wait: true,
        })
        .await
        .expect("enable is accepted")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let e = execution(&mut c, &r.execution_id).await;
        if !e.owner.is_empty() {
            break e;
        }
        assert!(Instant::now() < deadline, "nobody claimed the enable: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Its first calls (1 s each on the mock) are in flight; etcd drops the claim.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let raw = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let claim = format!("{}execution-owners/{}", trio.prefix(), run.id);
    assert!(raw.get(claim.as_bytes()).await.unwrap().is_some(), "the claim key {claim} exists");
    raw.delete(claim.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let e = execution(&mut c, &run.id).await;
        if e.status != "running" {
            break e;
        }
        assert!(Instant::now() < deadline, "the enable never ended: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Time for the old owner to try its write, had it not been refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: id.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    let events: Vec<String> =
        g.history.iter().map(|e| format!("{} at epoch {}: {}", e.action, e.epoch, e.detail)).collect();
    println!(
        "active/active: enable owner lost its claim mid-call; execution {} after {} claims (epoch {} -> {}); \
         group {} at epoch {}",
        ended.status, ended.claims, run.epoch, ended.epoch, g.replication_status, g.epoch
    );
    assert!(ended.claims >= 2 && ended.epoch > run.epoch, "another member took the enable over: {ended:?}");
    assert_eq!(ended.status, "succeeded", "{ended:?}");
    assert!(ended.output_json.contains("\"ok\""), "{}", ended.output_json);
    assert!(!ended.output_json.contains("\"error\""), "an item ended in error: {}", ended.output_json);
    assert_eq!(g.replication_status, "enabled", "{}: {events:#?}", g.status_reason);
    assert_eq!(g.epoch as i64, ended.epoch, "the group was last written by an owner other than the last");
    assert!(!events.iter().any(|e| e.contains("failed")), "{events:#?}");
    let (a, b) = (trio.oplog("backend-a"), trio.oplog("backend-b"));
    let (repeated, _) = repeated_op_ids(&[("backend-a", &a), ("backend-b", &b)]);
    assert!(repeated.is_empty(), "{repeated:#?}");
}

/// etcd is SIGKILLed 5 times during the run and restarted on its data dir: the
/// orchestrators recover without a restart and the invariants hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sigkills_during_a_site_failover() {
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut etcd = Etcd::start().await;
    let mut trio = Trio::start(&etcd, "200ms").await;
    let c = trio.client().await;
    let ids = groups(&c, 40).await;
    let mut c = trio.client().await;
    let run = run_site_failover(&mut c).await;
    let pids: Vec<u32> = trio.orchestrators.iter().map(|o| o.proc.pid()).collect();
    let mut kills = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        etcd.kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
        etcd.restart().await;
    }
    let violations = trio.violations(&ids).await;
    let mut c = trio.client().await;
    let ended = execution(&mut c, &run.id).await;
    let same: Vec<bool> =
        trio.orchestrators.iter_mut().zip(&pids).map(|(o, p)| o.proc.pid() == *p && o.proc.is_running()).collect();
    println!(
        "active/active: {kills} etcd SIGKILLs during a 40-group site failover on 3 orchestrators; run {} after {} \
         claims; {} violations",
        ended.status,
        ended.claims,
        violations.len()
    );
    assert!(same.iter().all(|s| *s), "seed {seed}: every orchestrator kept running: {same:?}");
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}
