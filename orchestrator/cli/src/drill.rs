//! The local two-site DR drill: an orchestrator on the embedded store, one agent per
//! site, a replicated group, a planned failover and a failback with reprotect.
//!
//! With the qemu driver (the default) it moves real data: it writes known patterns with
//! `qemu-io` (an NBD client independent of Drover), and after each move reads every
//! pattern back at the other site with `qemu-io read -P`. Each step prints the equivalent
//! `drover` command and how long it took; the end prints RPO and bytes shipped. With
//! qemu it also runs an application through a site failover and back ([`apps`]).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use drover_config::Sources;
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::client::Clients;
use crate::output;
use crate::servers::BACKENDS;

mod apps;
use apps::start_compute;

/// `drover drill` settings.
#[derive(clap::Args)]
pub struct DrillArgs {
    /// Keep state (store, ledgers, pools) here instead of a temporary directory.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Volumes in the drill's group.
    #[arg(long, default_value_t = 3)]
    pub volumes: usize,
    /// `qemu` (real data, verified with qemu-io) or `mock` (control plane only).
    #[arg(long, default_value = "qemu", value_parser = ["qemu", "mock"])]
    pub driver: String,
}

/// Runs `qemu-io` (an NBD client independent of Drover) with commands against `uri`.
/// Fails when qemu-io fails or a `read -P` finds other data than the pattern.
pub fn qemu_io(uri: &str, commands: &[String]) -> Result<String, String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(uri).output().map_err(|e| format!("cannot run qemu-io: {e}; install qemu-utils"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() || text.contains("Pattern verification failed") || text.contains("failed") {
        return Err(format!("qemu-io {commands:?} on {uri}: {}", text.trim()));
    }
    Ok(text)
}

pub(crate) struct Steps {
    n: usize,
    started: Instant,
    phases: Vec<(String, u128)>,
}

impl Steps {
    pub(crate) fn begin(&mut self, what: &str, cli: &str) -> (Instant, String) {
        self.n += 1;
        println!("[{}] {what}", self.n);
        if !cli.is_empty() {
            println!("    $ {cli}");
        }
        (Instant::now(), what.to_string())
    }

    pub(crate) fn done(&mut self, (t, what): (Instant, String), note: &str) {
        let ms = t.elapsed().as_millis();
        println!("    ok in {ms} ms{}", if note.is_empty() { String::new() } else { format!(": {note}") });
        self.phases.push((what, ms));
    }
}

async fn wait_backends_up(c: &mut Clients, names: &[&str], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let list =
            c.sites.list_backends(pb::ListBackendsRequest::default()).await.map_err(|s| s.message().to_string())?;
        if names.iter().all(|n| list.get_ref().backends.iter().any(|b| b.name == *n && b.status == "up")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("backends {names:?} not all up after {timeout:?}: {:?}", list.get_ref().backends));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const PROJECT: &str = "demo";

/// One written region: volume index, pattern byte, offset and length in MiB.
type Write = (usize, u8, u64, u64);

pub(crate) async fn uri(c: &mut Clients, volume: &str) -> Result<String, String> {
    let r = c
        .volumes
        .attach_volume(pb::AttachVolumeRequest { volume: volume.into(), project: PROJECT.into() })
        .await
        .map_err(|s| format!("attach {volume}: {}", s.message()))?;
    Ok(r.into_inner().uri)
}

async fn write(c: &mut Clients, names: &[String], writes: &[Write]) -> Result<u64, String> {
    let mut bytes = 0;
    for (v, p, off, len) in writes {
        let u = uri(c, &names[*v]).await?;
        qemu_io(&u, &[format!("write -P {p:#x} {off}M {len}M")])?;
        bytes += len << 20;
    }
    Ok(bytes)
}

async fn verify(c: &mut Clients, names: &[String], writes: &[Write]) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        let u = uri(c, name).await?;
        // The newest write to a region wins; regions in this drill do not overlap.
        let cmds: Vec<String> = writes
            .iter()
            .filter(|(v, ..)| *v == i)
            .map(|(_, p, off, len)| format!("read -P {p:#x} {off}M {len}M"))
            .chain(std::iter::once("read -P 0 60M 4M".to_string()))
            .collect();
        qemu_io(&u, &cmds)?;
    }
    Ok(())
}

pub(crate) fn fail(step: &str, s: tonic::Status, dir: &std::path::Path) -> String {
    format!("{step} failed: {} ({:?}); state is in {}", s.message(), s.code(), dir.display())
}

/// Runs the drill; returns a message on failure.
pub async fn run(opts: DrillArgs) -> Result<(), String> {
    // Ctrl-C or SIGTERM ends the drill through its normal exit path, so the servers stop
    // and every qemu-storage-daemon is killed with its agent (none is left behind).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot install a SIGTERM handler: {e}"))?;
    tokio::select! {
        r = drill(opts) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted: the drill's servers and daemons were stopped".into()),
        _ = term.recv() => Err("terminated: the drill's servers and daemons were stopped".into()),
    }
}

async fn drill(opts: DrillArgs) -> Result<(), String> {
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
    let data = opts.driver == "qemu";
    let mut steps = Steps { n: 0, started: Instant::now(), phases: Vec::new() };
    println!("Drover two-site drill: embedded store, {} agents; work dir {}", opts.driver, dir.display());

    let t = steps.begin(
        "start the orchestrator on the embedded store",
        "drover orchestrator --store-path DIR/orchestrator.redb",
    );
    // The servers run in this process, through the same launchers as `drover
    // orchestrator` and `drover agent`, and stop when the drill ends (the guard cancels
    // them on every path out, errors included). The environment is not read: a drill must
    // not pick up a production orchestrator's DROVER_* settings.
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let store = dir.join("orchestrator.redb").display().to_string();
    let token_file = dir.join("admin.token");
    // Every connection is TLS, with a CA and certificates made for this drill.
    let certs = dir.join("certs");
    let agent_ids = ["backend-a-agent".to_string(), "backend-b-agent".to_string()];
    crate::commands::certs::init(&certs, &agent_ids, &[])
        .map_err(|e| format!("making the drill's certificates: {e:#}"))?;
    let pem = |name: &str| certs.join(name).display().to_string();
    // With real data, each site has the reference compute service (docs/compute.md): the
    // applications part of the drill runs an instance through a site failover.
    let compute = match data {
        true => Some(start_compute(&dir, &shutdown).await?),
        false => None,
    };
    let mut sources = Sources::default()
        .flag("listen", Some("127.0.0.1:0"))
        .flag("store.path", Some(store))
        .flag("auth.token_file", Some(token_file.display()))
        .flag("tls.ca", Some(pem("ca.pem")))
        .flag("tls.cert", Some(pem("orchestrator.pem")))
        .flag("tls.key", Some(pem("orchestrator.key")));
    if let Some(sides) = &compute {
        for side in sides {
            sources = sources
                .flag(&format!("compute.{}.kind", side.site), Some("grpc"))
                .flag(&format!("compute.{}.endpoint", side.site), Some(&side.endpoint));
        }
    }
    let orch = drover_orchestrator::launch::start(&sources, shutdown.clone())
        .await
        .map_err(|e| format!("starting the orchestrator: {e}"))?;
    let orch_endpoint = format!("https://{}", orch.local_addr);
    steps.done(t, &orch_endpoint);

    let mut agents = Vec::new();
    for (site, backend) in [("site-a", "backend-a"), ("site-b", "backend-b")] {
        let t = steps.begin(
            &format!("start the {} agent of {backend} at {site}", opts.driver),
            &format!(
                "drover agent --site {site} --backend {backend} --driver {} --orchestrator {}",
                opts.driver, orch_endpoint
            ),
        );
        let mut sources = Sources::default()
            .flag("site", Some(site))
            .flag("backend", Some(backend))
            .flag("driver", Some(&opts.driver))
            .flag("orchestrator", Some(&orch_endpoint))
            .flag("state_dir", Some(dir.join(format!("agent-{backend}")).display()))
            .flag("tls.ca", Some(pem("ca.pem")))
            .flag("tls.cert", Some(pem(&format!("agent-{backend}-agent.pem"))))
            .flag("tls.key", Some(pem(&format!("agent-{backend}-agent.key"))));
        if opts.driver == "qemu" {
            sources = sources.flag("qemu.pool_dir", Some(dir.join(format!("pool-{backend}")).display()));
        }
        let agent = drover_agent::launch::start(BACKENDS, &sources, shutdown.clone())
            .await
            .map_err(|e| format!("starting the agent of {backend}: {e}"))?;
        steps.done(t, &format!("https://{}", agent.local_addr));
        agents.push(agent);
    }

    // The drill acts as the deployment's admin, with the token the orchestrator made.
    let token = std::fs::read_to_string(&token_file)
        .map_err(|e| format!("reading the bootstrap token {}: {e}", token_file.display()))?;
    let ca = certs.join("ca.pem");
    let mut c = Clients::connect(&orch_endpoint, Duration::from_secs(600), Some(&token), Some(&ca)).await?;
    let t = steps.begin("wait until both backends are registered and answer probes", "drover backend list");
    wait_backends_up(&mut c, &["backend-a", "backend-b"], Duration::from_secs(30)).await?;
    steps.done(t, "");

    let t = steps.begin(
        &format!("create {} volumes of 64 MiB on backend-a", opts.volumes),
        "drover volume create app-N --size 64MiB --backend backend-a",
    );
    let names: Vec<String> = (0..opts.volumes).map(|i| format!("app-{i}")).collect();
    for name in &names {
        c.volumes
            .create_volume(pb::CreateVolumeRequest {
                name: name.clone(),
                project: PROJECT.into(),
                size_bytes: 64 << 20,
                backend: "backend-a".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| fail("create volume", s, &dir))?;
    }
    steps.done(t, &names.join(", "));

    let t = steps.begin(
        "create group app of type consistent-replication",
        "drover group create app --type consistent-replication --backend backend-a --volume app-0 ...",
    );
    c.groups
        .create_group(pb::CreateGroupRequest {
            name: "app".into(),
            project: PROJECT.into(),
            group_type: "consistent-replication".into(),
            backend: "backend-a".into(),
            volumes: names.clone(),
            ..Default::default()
        })
        .await
        .map_err(|s| fail("create group", s, &dir))?;
    steps.done(t, "");

    let mut written: Vec<Write> = Vec::new();
    if data {
        let t = steps.begin(
            "write known patterns at site A with qemu-io",
            "qemu-io -f raw -c 'write -P 0x10 0 4M' nbd+unix:///VOLUME?socket=...",
        );
        let w: Vec<Write> =
            (0..names.len()).flat_map(|i| [(i, 0x10 + i as u8, 0, 4), (i, 0x20 + i as u8, 32, 1)]).collect();
        let bytes = write(&mut c, &names, &w).await?;
        written.extend(w);
        steps.done(t, &format!("{} MiB", bytes >> 20));
    }

    let t = steps.begin(
        "enable replication to backend-b (initial full copy)",
        "drover group enable-replication app --target backend-b",
    );
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "app".into(),
            project: PROJECT.into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 30,
            no_wait: false,
        })
        .await
        .map_err(|s| fail("enable replication", s, &dir))?
        .into_inner();
    let initial = r.group.as_ref().and_then(|g| g.history.last()).map(|e| e.detail.clone()).unwrap_or_default();
    steps.done(t, &initial);

    let mut shipped = Vec::new();
    if data {
        let t = steps.begin("write more at site A, then sync now", "drover group sync app");
        let w: Vec<Write> = (0..names.len()).map(|i| (i, 0x30 + i as u8, 8, 1)).collect();
        write(&mut c, &names, &w).await?;
        written.extend(w);
        let s = c
            .replication
            .sync_group(pb::SyncGroupRequest {
                group: "app".into(),
                project: PROJECT.into(),
                no_wait: false,
                ..Default::default()
            })
            .await
            .map_err(|s| fail("sync", s, &dir))?
            .into_inner();
        shipped.push(("incremental sync".to_string(), s.bytes));
        steps.done(t, &format!("recovery point {} shipped {} bytes", s.recovery_point_id, s.bytes));
    }
    let info = c
        .replication
        .get_replication_info(pb::GetReplicationInfoRequest {
            group: "app".into(),
            project: PROJECT.into(),
            predict: false,
        })
        .await
        .map_err(|s| fail("replication info", s, &dir))?
        .into_inner();

    let t = steps.begin(
        "fail over to backend-b (planned: final sync, demote, promote)",
        "drover group failover app --target backend-b",
    );
    let r = planned_move(&mut c, "backend-b").await.map_err(|s| fail("failover", s, &dir))?;
    steps.done(t, &outcome(&r));

    if data {
        let t = steps
            .begin("verify every pattern at site B with qemu-io read -P", "qemu-io -f raw -c 'read -P 0x10 0 4M' ...");
        verify(&mut c, &names, &written).await?;
        steps.done(t, &format!("{} regions match", written.len() + names.len()));

        let t = steps.begin("write at site B", "qemu-io -f raw -c 'write -P 0x40 16M 2M' ...");
        let w: Vec<Write> = (0..names.len()).map(|i| (i, 0x40 + i as u8, 16, 2)).collect();
        let bytes = write(&mut c, &names, &w).await?;
        written.extend(w);
        steps.done(t, &format!("{} MiB", bytes >> 20));
    }

    let t = steps.begin(
        "fail back to backend-a with reprotect (only the delta moves)",
        "drover group failover app --target default",
    );
    let r = planned_move(&mut c, "default").await.map_err(|s| fail("failback", s, &dir))?;
    steps.done(t, &outcome(&r));

    if data {
        let t = steps.begin(
            "verify every pattern at site A with qemu-io read -P",
            "qemu-io -f raw -c 'read -P 0x40 16M 2M' ...",
        );
        verify(&mut c, &names, &written).await?;
        steps.done(t, &format!("{} regions match", written.len() + names.len()));
    }

    if let Some(sides) = &compute {
        apps::run(&mut c, &mut steps, sides, &dir).await?;
    }

    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: "app".into(), project: PROJECT.into() })
        .await
        .map_err(|s| fail("show group", s, &dir))?
        .into_inner();
    let vols = c
        .volumes
        .list_volumes(pb::ListVolumesRequest { project: PROJECT.into(), ..Default::default() })
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
    println!(
        "\nRPO before the failover: {}",
        if info.rpo_ms < 0 { "unknown".to_string() } else { format!("{} ms", info.rpo_ms) }
    );
    for e in g.history.iter().filter(|e| e.detail.contains("shipped")) {
        println!("Bytes shipped, {}: {}", e.action, e.detail.split("; ").find(|d| d.contains("shipped")).unwrap_or(""));
    }
    for (what, b) in &shipped {
        println!("Bytes shipped, {what}: {b}");
    }
    println!("\nTime per phase:");
    for (what, ms) in &steps.phases {
        println!("  {ms:>7} ms  {what}");
    }
    // Every group (the applications' one too, with qemu) is home and replicating.
    let groups = c
        .groups
        .list_groups(pb::ListGroupsRequest { project: PROJECT.into(), ..Default::default() })
        .await
        .map_err(|s| fail("list groups", s, &dir))?
        .into_inner()
        .groups;
    let healthy = groups.iter().all(|g| g.replication_status == "enabled" && g.active_backend == "backend-a")
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
    shutdown.cancel();
    for agent in agents {
        let _ = agent.handle.await;
    }
    let _ = orch.handle.await;
    Ok(())
}

/// A planned failover of the drill's group to `target` (`default`: back to the primary).
async fn planned_move(c: &mut Clients, target: &str) -> Result<pb::ReplicationResult, tonic::Status> {
    let req = pb::FailoverGroupRequest {
        group: "app".into(),
        project: PROJECT.into(),
        target_backend: target.into(),
        force: false,
        discard_changes_on: String::new(),
        no_wait: false,
    };
    c.replication.failover_group(req).await.map(tonic::Response::into_inner)
}

fn outcome(r: &pb::ReplicationResult) -> String {
    let ok = r.items.iter().filter(|i| i.outcome == "success").count();
    let detail = r.group.as_ref().and_then(|g| g.history.last()).map(|e| e.detail.clone()).unwrap_or_default();
    match &r.group {
        Some(g) => format!(
            "group {} on {}, {ok}/{} volumes succeeded; {detail}",
            g.replication_status,
            g.active_backend,
            r.items.len()
        ),
        None => String::new(),
    }
}
