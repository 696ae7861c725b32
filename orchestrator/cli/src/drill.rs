//! The local two-site DR drill: an orchestrator on the embedded store, one agent per
//! site, a replicated group, a failover and a failback. Each step prints the equivalent
//! `drover` command and how long it took.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_proto::v1 as pb;

use crate::client::Clients;
use crate::cluster::{AgentSpec, Server, locate_drover, start_mock_agent, start_orchestrator};
use crate::output;

/// Drill settings.
pub struct DrillOptions {
    /// Where processes keep state and logs; a temporary directory when `None`.
    pub workdir: Option<PathBuf>,
    /// How many volumes the group gets.
    pub volumes: usize,
}

struct Steps {
    n: usize,
    total: usize,
    started: Instant,
}

impl Steps {
    fn begin(&mut self, what: &str, cli: &str) -> Instant {
        self.n += 1;
        println!("[{}/{}] {what}", self.n, self.total);
        if !cli.is_empty() {
            println!("      $ {cli}");
        }
        Instant::now()
    }

    fn done(&self, t: Instant, note: &str) {
        println!(
            "      ok in {} ms{}",
            t.elapsed().as_millis(),
            if note.is_empty() { String::new() } else { format!(": {note}") }
        );
    }
}

async fn wait_backends_up(c: &mut Clients, names: &[&str], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let list =
            c.sites.list_backends(pb::ListBackendsRequest::default()).await.map_err(|s| s.message().to_string())?;
        let up = names.iter().all(|n| list.get_ref().backends.iter().any(|b| b.name == *n && b.status == "up"));
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("backends {names:?} not all up after {timeout:?}: {:?}", list.get_ref().backends));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fail(step: &str, s: tonic::Status, logs: &Path) -> String {
    format!("{step} failed: {} ({:?}); process logs are in {}", s.message(), s.code(), logs.display())
}

/// Runs the drill; returns a message on failure.
pub async fn run(opts: DrillOptions) -> Result<(), String> {
    let temp;
    let dir = match &opts.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("drover-drill-").tempdir().map_err(|e| e.to_string())?;
            temp.path().to_path_buf()
        }
    };
    let bin = locate_drover()?;
    let project = "demo";
    let mut steps = Steps { n: 0, total: 9, started: Instant::now() };
    println!("Drover two-site drill (embedded store, mock agents); work dir {}", dir.display());

    let t = steps.begin(
        "start the orchestrator on the embedded store",
        "drover orchestrator --store-path DIR/orchestrator.redb",
    );
    let store = dir.join("orchestrator.redb").display().to_string();
    let orch: Server = start_orchestrator(&bin, &dir, "orchestrator", &["--store-path".into(), store])?;
    steps.done(t, &orch.endpoint);

    let mut agents = Vec::new();
    for (site, backend) in [("site-a", "backend-a"), ("site-b", "backend-b")] {
        let t = steps.begin(
            &format!("start the mock agent of {backend} at {site}"),
            &format!("drover agent --site {site} --backend {backend} --driver mock --orchestrator {}", orch.endpoint),
        );
        let name = format!("agent-{backend}");
        let agent = start_mock_agent(
            &bin,
            &dir,
            AgentSpec { name: &name, site, backend, orchestrator: &orch.endpoint, extra: vec![] },
        )?;
        steps.done(t, &agent.endpoint);
        agents.push(agent);
    }

    let mut c = Clients::connect(&orch.endpoint, Duration::from_secs(60)).await?;
    let t = steps.begin("wait until both backends are registered and answer probes", "drover backend list");
    wait_backends_up(&mut c, &["backend-a", "backend-b"], Duration::from_secs(30)).await?;
    steps.done(t, "");

    let t = steps.begin(
        &format!("create {} volumes on backend-a", opts.volumes),
        "drover volume create app-N --size 1GiB --backend backend-a",
    );
    let mut names = Vec::new();
    for i in 0..opts.volumes {
        let name = format!("app-{i}");
        c.volumes
            .create_volume(pb::CreateVolumeRequest {
                name: name.clone(),
                project: project.into(),
                size_bytes: 1 << 30,
                backend: "backend-a".into(),
            })
            .await
            .map_err(|s| fail("create volume", s, &dir))?;
        names.push(name);
    }
    steps.done(t, &names.join(", "));

    let t = steps.begin(
        "create group app of type replication",
        "drover group create app --type replication --backend backend-a --volume app-0 ...",
    );
    c.groups
        .create_group(pb::CreateGroupRequest {
            name: "app".into(),
            project: project.into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            volumes: names.clone(),
        })
        .await
        .map_err(|s| fail("create group", s, &dir))?;
    steps.done(t, "");

    let group = || pb::GetGroupRequest { group: "app".into(), project: project.into() };
    let t = steps.begin("enable replication to backend-b", "drover group enable-replication app --target backend-b");
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "app".into(),
            project: project.into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 0,
        })
        .await
        .map_err(|s| fail("enable replication", s, &dir))?
        .into_inner();
    steps.done(t, &group_state(&r));

    let t = steps.begin("fail over to backend-b (planned)", "drover group failover app --target backend-b");
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "app".into(),
            project: project.into(),
            target_backend: "backend-b".into(),
            force: false,
            discard_changes_on: String::new(),
        })
        .await
        .map_err(|s| fail("failover", s, &dir))?
        .into_inner();
    steps.done(t, &group_state(&r));

    let t = steps.begin("fail back to backend-a", "drover group failover app --target default");
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "app".into(),
            project: project.into(),
            target_backend: "default".into(),
            force: false,
            discard_changes_on: String::new(),
        })
        .await
        .map_err(|s| fail("failback", s, &dir))?
        .into_inner();
    steps.done(t, &group_state(&r));

    let g = c.groups.get_group(group()).await.map_err(|s| fail("show group", s, &dir))?.into_inner();
    let vols = c
        .volumes
        .list_volumes(pb::ListVolumesRequest { project: project.into() })
        .await
        .map_err(|s| fail("list volumes", s, &dir))?
        .into_inner()
        .volumes;
    println!("\nFinal state of the groups:");
    print!("{}", output::groups(std::slice::from_ref(&g)).render());
    println!("\nFinal state of the volumes:");
    print!("{}", output::volumes(&vols).render());
    println!("\nGroup history:");
    for e in &g.history {
        println!("  epoch {:>4}  {:<20} {}", e.epoch, e.action, e.detail);
    }
    let healthy = g.replication_status == "enabled"
        && g.active_backend == "backend-a"
        && vols.iter().all(|v| v.active_backend == "backend-a" && v.replication_status == "enabled");
    if !healthy {
        return Err(format!(
            "drill ended in an unexpected state: group {} on {}",
            g.replication_status, g.active_backend
        ));
    }
    println!(
        "\nDrill passed in {} ms: group app replicating from backend-a to backend-b again.",
        steps.started.elapsed().as_millis()
    );
    drop(agents);
    drop(orch);
    Ok(())
}

fn group_state(r: &pb::ReplicationResult) -> String {
    let ok = r.items.iter().filter(|i| i.outcome == "success").count();
    match &r.group {
        Some(g) => {
            format!("group {} on {}, {ok}/{} volumes succeeded", g.replication_status, g.active_backend, r.items.len())
        }
        None => String::new(),
    }
}
