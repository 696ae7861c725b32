//! The drill's applications part: a reference compute service per site (run in the
//! drill's process), an instance writing a verifiable log to a replicated group's
//! volumes at site A, the shipped site runbooks moving it to site B and back, and the
//! log checked after each move with `drover compute check`'s reader.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_proto::compute::v1 as cpb;
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use super::{PROJECT, Steps, fail, uri};
use crate::client::Clients;
use crate::compute::workload;

/// One site's compute service.
pub(crate) struct Side {
    pub site: String,
    pub endpoint: String,
    pub dir: PathBuf,
}

const INSTANCE: &str = "db-writer";

/// Starts the compute services of site-a and site-b, sharing one instances file.
pub(crate) async fn start_compute(dir: &Path, shutdown: &CancellationToken) -> Result<Vec<Side>, String> {
    let instances = dir.join("instances.yaml");
    std::fs::write(&instances, "instances: []\n").map_err(|e| format!("writing {}: {e}", instances.display()))?;
    let mut sides = Vec::new();
    for site in ["site-a", "site-b"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let endpoint = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
        let state = dir.join(format!("compute-{site}"));
        let (file, st, stop) = (instances.clone(), state.clone(), shutdown.clone());
        let name = site.to_string();
        tokio::spawn(async move {
            if let Err(e) = crate::compute::serve_on(listener, &name, file, st, Duration::from_millis(20), stop).await {
                eprintln!("compute service of {name}: {e:#}");
            }
        });
        sides.push(Side { site: site.into(), endpoint, dir: state });
    }
    Ok(sides)
}

fn acked(side: &Side) -> u64 {
    std::fs::read_to_string(side.dir.join(format!("{INSTANCE}.ack")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

async fn client(side: &Side) -> Result<cpb::compute_hook_client::ComputeHookClient<tonic::transport::Channel>, String> {
    cpb::compute_hook_client::ComputeHookClient::connect(side.endpoint.clone())
        .await
        .map_err(|e| format!("compute service of {}: {e}", side.site))
}

fn all_ok(what: &str, r: cpb::InstancesResponse) -> Result<(), String> {
    match r.outcomes.iter().find(|o| o.kind != cpb::OutcomeKind::Success as i32) {
        None => Ok(()),
        Some(o) => Err(format!("{what} {}: {}", o.instance_id, o.reason)),
    }
}

/// Waits until the instance at `side` has acknowledged record `n`.
async fn wait_acked(side: &Side, n: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked(side) < n {
        if Instant::now() > deadline {
            return Err(format!("the instance at {} acknowledged only {} records", side.site, acked(side)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Quiesces the instance at `side`, reads its log where its volumes are active, and
/// lets it go on; the log must hold every record acknowledged at either site.
async fn check(c: &mut Clients, side: &Side, volumes: &[String], sides: &[Side]) -> Result<String, String> {
    let mut hook = client(side).await?;
    let ids = vec![INSTANCE.to_string()];
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let op = format!("drill-check-{}-{nanos}", side.site);
    let q = cpb::InstancesRequest { op_id: format!("{op}:q"), instance_ids: ids.clone(), deadline_ms: 10_000 };
    all_ok("quiesce", hook.quiesce(q).await.map_err(|e| e.to_string())?.into_inner())?;
    // Quiesced: nothing more is acknowledged until it goes on.
    let most = sides.iter().map(acked).max().unwrap_or(0);
    let mut uris = Vec::new();
    for v in volumes {
        uris.push(uri(c, v).await?);
    }
    let n = workload::read_log(INSTANCE, &uris).await.map_err(|e| format!("the instance's log: {e:#}"));
    let u = cpb::InstancesRequest { op_id: format!("{op}:u"), instance_ids: ids, deadline_ms: 10_000 };
    all_ok("unquiesce", hook.unquiesce(u).await.map_err(|e| e.to_string())?.into_inner())?;
    let n = n?;
    if n <= most {
        return Err(format!("the log holds {n} records but record {most} was acknowledged: lost writes"));
    }
    Ok(format!("{n} records, an exact prefix holding every acknowledged one (up to {most})"))
}

/// Runs a shipped runbook to its end.
async fn runbook(c: &mut Clients, name: &str, text: &str, params: &[(&str, &str)]) -> Result<pb::Execution, String> {
    let req = pb::RunbookRequest {
        file_name: format!("runbooks/{name}"),
        text: text.to_string(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let e = c.runbooks.run_runbook(req).await.map_err(|s| format!("runbook {name}: {}", s.message()))?.into_inner();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let now = c
            .executions
            .get_execution(pb::GetExecutionRequest { id: e.id.clone() })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        match now.status.as_str() {
            "running" if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(250)).await,
            "succeeded" => return Ok(now),
            _ => {
                return Err(format!(
                    "runbook {name} {}: {}; see `drover execution report {}`",
                    now.status, now.error, e.id
                ));
            }
        }
    }
}

pub(crate) async fn run(c: &mut Clients, steps: &mut Steps, sides: &[Side], dir: &Path) -> Result<(), String> {
    let t = steps.begin(
        "create group db (2 volumes of 16 MiB on backend-a) and replicate it to backend-b",
        "drover group create db ...; drover group enable-replication db --target backend-b",
    );
    let mut volumes = Vec::new();
    for i in 0..2 {
        let req = pb::CreateVolumeRequest {
            name: format!("db-{i}"),
            project: PROJECT.into(),
            size_bytes: 16 << 20,
            backend: "backend-a".into(),
            ..Default::default()
        };
        volumes.push(c.volumes.create_volume(req).await.map_err(|s| fail("create volume", s, dir))?.into_inner().id);
    }
    let req = pb::CreateGroupRequest {
        name: "db".into(),
        project: PROJECT.into(),
        group_type: "consistent-replication".into(),
        backend: "backend-a".into(),
        volumes: volumes.clone(),
        ..Default::default()
    };
    c.groups.create_group(req).await.map_err(|s| fail("create group", s, dir))?;
    let req = pb::EnableReplicationRequest {
        group: "db".into(),
        project: PROJECT.into(),
        target_backend: "backend-b".into(),
        sync_interval_seconds: 30,
        no_wait: false,
    };
    c.replication.enable_replication(req).await.map_err(|s| fail("enable replication", s, dir))?;
    steps.done(t, "");

    let t = steps.begin(
        "start instance db-writer at site A (the reference compute: checksummed records over NBD)",
        "drover compute --site site-a --instances instances.yaml",
    );
    let yaml =
        format!("instances:\n  - id: {INSTANCE}\n    project: {PROJECT}\n    volume_ids: [{}]\n", volumes.join(", "));
    std::fs::write(dir.join("instances.yaml"), yaml).map_err(|e| e.to_string())?;
    let mut attachments = Vec::new();
    for v in &volumes {
        let u = uri(c, v).await?;
        attachments.push(cpb::Attachment { volume_id: v.clone(), driver_volume_type: "nbd".into(), uri: u });
    }
    let mut at_a = client(&sides[0]).await?;
    let ids = vec![INSTANCE.to_string()];
    let r = cpb::RefreshRequest { op_id: "drill-attach-a".into(), instance_ids: ids.clone(), attachments };
    all_ok("attach", at_a.refresh_attachments(r).await.map_err(|e| e.to_string())?.into_inner())?;
    let r = cpb::InstancesRequest { op_id: "drill-start-a".into(), instance_ids: ids.clone(), deadline_ms: 0 };
    all_ok("start", at_a.start(r).await.map_err(|e| e.to_string())?.into_inner())?;
    wait_acked(&sides[0], 100).await?;
    steps.done(t, &format!("{} records acknowledged", acked(&sides[0])));

    let t = steps.begin(
        "planned site failover of site A with its applications (stop, final sync, move, refresh, start at B)",
        "drover runbook run runbooks/site-failover-planned.yaml --param site=site-a --param target_site=site-b",
    );
    let e = runbook(
        c,
        "site-failover-planned.yaml",
        include_str!("../../../../runbooks/site-failover-planned.yaml"),
        &[("site", "site-a"), ("target_site", "site-b")],
    )
    .await?;
    let from_a = acked(&sides[0]);
    wait_acked(&sides[1], from_a + 50).await?;
    steps.done(t, &format!("execution {}; the instance writes on at site B", e.id));

    let t = steps.begin("check the instance's log at site B", "drover compute check --instance db-writer --uri ...");
    let note = check(c, &sides[1], &volumes, sides).await?;
    steps.done(t, &note);

    let t = steps.begin(
        "site failback: stop at B, bring the groups home, start at A",
        "drover runbook run runbooks/site-failback.yaml --param site=site-a --param from_site=site-b",
    );
    let e = runbook(
        c,
        "site-failback.yaml",
        include_str!("../../../../runbooks/site-failback.yaml"),
        &[("site", "site-a"), ("from_site", "site-b")],
    )
    .await?;
    let from_b = acked(&sides[1]);
    wait_acked(&sides[0], from_b + 50).await?;
    steps.done(t, &format!("execution {}; the instance writes on at site A", e.id));

    let t = steps.begin("check the instance's log at site A", "drover compute check --instance db-writer --uri ...");
    let note = check(c, &sides[0], &volumes, sides).await?;
    let r = cpb::InstancesRequest { op_id: "drill-stop-a".into(), instance_ids: ids, deadline_ms: 10_000 };
    all_ok("stop", at_a.stop(r).await.map_err(|e| e.to_string())?.into_inner())?;
    steps.done(t, &note);
    Ok(())
}
