//! Compute sides reached by webhook: every call is signed (HMAC-SHA256 of the body), each
//! notified execution is announced once when it starts and once when it ends, a 5xx is
//! retried (once here) and a 4xx is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use drover_proto::v1 as pb;
use drover_tests::{Cluster, StoreChoice, replicated_group};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "correct horse battery staple";

#[derive(Debug, Clone)]
struct Seen {
    delivery: String,
    call: String,
    signed: bool,
    body: serde_json::Value,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    seen: Mutex<Vec<Seen>>,
    /// Deliveries already answered with a 500 (each gets one).
    failed_once: Mutex<Vec<String>>,
}

fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(sig) = headers.get("x-drover-signature").and_then(|v| v.to_str().ok()) else { return false };
    let Some(hex) = sig.strip_prefix("sha256=") else { return false };
    let Ok(given) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

async fn hook(
    axum::extract::State(rx): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let signed = verify(&headers, &body);
    let delivery = header("x-drover-delivery");
    let req = &json["request"];
    // The first execution start of a group transition gets a 500, once; a notify step
    // whose message asks for it gets a 400.
    let status = if !signed {
        StatusCode::UNAUTHORIZED
    } else if req["summary"].as_str().is_some_and(|s| s.contains("answer 400")) {
        StatusCode::BAD_REQUEST
    } else if req["event"] == "execution.started" && req["kind"] == "group-transition" && {
        let mut failed = rx.failed_once.lock().unwrap();
        let first = failed.is_empty();
        if first {
            failed.push(delivery.clone());
        }
        first
    } {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    rx.seen.lock().unwrap().push(Seen {
        delivery,
        call: header("x-drover-call"),
        signed,
        body: json,
        answered: status.as_u16(),
    });
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_calls_are_signed_announced_once_and_retried_only_on_server_errors() {
    let rx = Arc::new(Receiver::default());
    let app = axum::Router::new().route("/hook", axum::routing::post(hook)).with_state(rx.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("hook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let url = format!("compute.site-b.url=http://{addr}/hook");
    let secret_file = format!("compute.site-b.secret_file={}", secret.display());
    let orch = [
        "--set",
        "compute.site-b.kind=webhook",
        "--set",
        &url,
        "--set",
        &secret_file,
        "--set",
        "compute.site-b.retries=3",
    ];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &[], &orch).await;
    let mut c = cluster.clients().await;

    // A group enable and a failover: two group transitions, each announced.
    replicated_group(&mut c, "app", 2).await;
    let r = c
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "app".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = r.group.expect("the group after the failover");
    assert_eq!(g.active_backend, "backend-b", "{g:?}");

    // A runbook: its own start and end, a notify step, and a notify step answered 400.
    let runbook = "name: tell\nsteps:\n  - notify:\n      name: hello\n      message: site B is serving\n  - notify:\n      \
                   name: refused\n      message: please answer 400\n      continue_on_error: true\n";
    let e = c
        .runbooks
        .run_runbook(pb::RunbookRequest {
            file_name: "tell.yaml".into(),
            text: runbook.into(),
            params: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    let run = loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.status != "running" {
            break now;
        }
        assert!(Instant::now() < deadline, "the runbook never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let state: serde_json::Value = serde_json::from_str(&run.state_json).unwrap();
    assert_eq!(run.status, "succeeded", "{}: {state}", run.error);
    assert_eq!(state["steps"][0]["items"][0]["status"], "succeeded");
    assert_eq!(state["steps"][1]["status"], "failed");
    assert!(state["steps"][1]["items"][0]["reason"].as_str().unwrap().contains("400"), "{state}");

    // Every execution that ended has been announced (notifications are sent in the
    // background): wait for the last one, the runbook's end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rx.seen.lock().unwrap().iter().any(|s| {
        s.body["request"]["event"] == "execution.finished" && s.body["request"]["execution_id"] == e.id.as_str()
    }) {
        assert!(Instant::now() < deadline, "the runbook's end was never announced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = rx.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.signed), "an unsigned or badly signed call: {seen:?}");
    assert!(seen.iter().all(|s| s.call == "notify"), "{seen:?}");

    // Per execution and event: one delivery, answered 200 in the end.
    let mut deliveries: HashMap<(String, String), Vec<&Seen>> = HashMap::new();
    for s in seen.iter().filter(|s| s.body["request"]["event"].as_str().is_some_and(|e| e.starts_with("execution."))) {
        let r = &s.body["request"];
        let key = (r["execution_id"].as_str().unwrap().to_string(), r["event"].as_str().unwrap().to_string());
        deliveries.entry(key).or_default().push(s);
    }
    let executions: std::collections::BTreeSet<&str> = deliveries.keys().map(|(e, _)| e.as_str()).collect();
    assert_eq!(executions.len(), 3, "the enable, the failover and the runbook: {:?}", deliveries.keys());
    for ((exec, event), list) in &deliveries {
        let ids: std::collections::BTreeSet<&str> = list.iter().map(|s| s.delivery.as_str()).collect();
        assert_eq!(ids.len(), 1, "{exec} {event} delivered more than once: {list:?}");
        assert_eq!(list.last().unwrap().answered, 200, "{exec} {event}: {list:?}");
    }
    for exec in &executions {
        for event in ["execution.started", "execution.finished"] {
            assert!(deliveries.contains_key(&(exec.to_string(), event.to_string())), "{exec}: no {event}");
        }
    }
    // The 500 was retried once, with the same delivery id; the 400 was not retried.
    let failed = rx.failed_once.lock().unwrap().clone();
    assert_eq!(failed.len(), 1);
    let attempts: Vec<u16> = seen.iter().filter(|s| s.delivery == failed[0]).map(|s| s.answered).collect();
    assert_eq!(attempts, [500, 200]);
    let refused: Vec<&Seen> = seen.iter().filter(|s| s.answered == 400).collect();
    assert_eq!(refused.len(), 1, "a 400 is not retried: {refused:?}");
    // The failover is also announced as a group event, once.
    let moved: Vec<&Seen> = seen.iter().filter(|s| s.body["request"]["event"] == "group.failed_over").collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].body["request"]["execution_id"], r.execution_id.as_str());
    let finished = &deliveries[&(e.id.clone(), "execution.finished".to_string())][0].body["request"];
    assert_eq!((finished["status"].as_str(), finished["kind"].as_str()), (Some("succeeded"), Some("runbook")));
    assert!(finished["report"].as_str().unwrap().contains(&e.id));
}

/// A reference compute service of one site, as a process; its address and state dir.
struct ComputeSide {
    proc: std::process::Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Drop for ComputeSide {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
        // Its instances too (a killed service leaves them): their command lines name
        // this state directory.
        let _ = std::process::Command::new("pkill").args(["-9", "-f", &self.dir.display().to_string()]).status();
    }
}

fn start_compute(bin: &std::path::Path, site: &str, instances: &std::path::Path, dir: &std::path::Path) -> ComputeSide {
    use std::io::BufRead;
    let state = dir.join(format!("compute-{site}"));
    let mut proc = std::process::Command::new(bin)
        .args(["compute", "--site", site, "--listen", "127.0.0.1:0", "--interval", "5ms"])
        .arg("--instances")
        .arg(instances)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("compute-{site}.log"))).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(proc.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(addr.starts_with("http://"), "compute service said {line:?}");
    ComputeSide { proc, addr, dir: state }
}

fn check_log(bin: &std::path::Path, id: &str, uris: &[String], acked: &std::path::Path) -> String {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(["compute", "check", "--instance", id, "--acked-file"]).arg(acked);
    for u in uris {
        cmd.args(["--uri", u]);
    }
    let out = cmd.output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "compute check {id}: {said}");
    said
}

/// Two sites with reference compute services, two groups at site A (tiers 1 and 2)
/// replicated to backend-b, and three instances writing at site A (at least 50 records
/// each).
struct Stage {
    work: tempfile::TempDir,
    bin: std::path::PathBuf,
    a: ComputeSide,
    b: ComputeSide,
    cluster: Cluster,
    c: drover_cli::client::Clients,
    layout: Vec<(&'static str, Vec<String>)>,
    ids: Vec<String>,
}

fn acked(side: &ComputeSide, id: &str) -> Option<u64> {
    std::fs::read_to_string(side.dir.join(format!("{id}.ack"))).ok()?.trim().parse().ok()
}

/// Waits (up to 30 s) until every instance at `side` has acknowledged the record
/// `at_least` gives for it.
async fn wait_acked(side: &ComputeSide, ids: &[String], what: &str, at_least: impl Fn(&str) -> u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids.iter().any(|i| acked(side, i).is_none_or(|n| n < at_least(i))) {
        assert!(Instant::now() < deadline, "the instances did not write {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stage() -> Stage {
    use drover_proto::compute::v1 as cpb;
    let work = tempfile::tempdir().unwrap();
    let instances = work.path().join("instances.yaml");
    std::fs::write(&instances, "instances: []\n").unwrap();
    let bin = drover_tests::cluster::locate_drover().unwrap();
    let a = start_compute(&bin, "site-a", &instances, work.path());
    let b = start_compute(&bin, "site-b", &instances, work.path());
    let (ea, eb) = (format!("compute.site-a.endpoint={}", a.addr), format!("compute.site-b.endpoint={}", b.addr));
    let orch = ["--set", "compute.site-a.kind=grpc", "--set", &ea, "--set", "compute.site-b.kind=grpc", "--set", &eb];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "qemu", &[], &orch).await;
    let mut c = cluster.clients().await;

    // Two groups at site A, tiers 1 and 2, replicated to backend-b.
    let mut vols: HashMap<String, Vec<String>> = HashMap::new();
    for (group, tier) in [("g1", 1u32), ("g2", 2)] {
        let mut ids = Vec::new();
        for i in 0..2 {
            let v = c
                .volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: format!("{group}-v{i}"),
                    project: "tests".into(),
                    size_bytes: 16 << 20,
                    backend: "backend-a".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            ids.push(v.id);
        }
        let req = pb::CreateGroupRequest {
            name: group.into(),
            project: "tests".into(),
            group_type: "consistent-replication".into(),
            backend: "backend-a".into(),
            volumes: ids.clone(),
            ..Default::default()
        };
        c.groups.create_group(req).await.unwrap();
        let tier_req =
            pb::UpdateGroupRequest { group: group.into(), project: "tests".into(), tier, ..Default::default() };
        c.groups.update_group(tier_req).await.unwrap();
        let enable = pb::EnableReplicationRequest {
            group: group.into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 2,
            no_wait: false,
        };
        c.replication.enable_replication(enable).await.unwrap();
        vols.insert(group.into(), ids);
    }
    let layout = [("i1", vec![vols["g1"][0].clone()]), ("i2", vec![vols["g1"][1].clone()]), ("i3", vols["g2"].clone())];
    let mut yaml = String::from("instances:\n");
    for (id, v) in &layout {
        yaml.push_str(&format!("  - id: {id}\n    project: tests\n    volume_ids: [{}]\n", v.join(", ")));
    }
    std::fs::write(&instances, yaml).unwrap();

    // The instances start at site A on the primaries.
    let mut at_a = cpb::compute_hook_client::ComputeHookClient::connect(a.addr.clone()).await.unwrap();
    let mut attachments = Vec::new();
    for v in layout.iter().flat_map(|(_, v)| v.iter()) {
        let r = c
            .volumes
            .attach_volume(pb::AttachVolumeRequest { volume: v.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        attachments.push(cpb::Attachment {
            volume_id: v.clone(),
            driver_volume_type: r.driver_volume_type,
            uri: r.uri,
        });
    }
    let ids: Vec<String> = layout.iter().map(|(i, _)| i.to_string()).collect();
    let refresh = cpb::RefreshRequest { op_id: "at-a".into(), instance_ids: ids.clone(), attachments };
    let r = at_a.refresh_attachments(refresh).await.unwrap().into_inner();
    assert!(r.outcomes.iter().all(|o| o.kind == cpb::OutcomeKind::Success as i32), "{r:?}");
    let start = cpb::InstancesRequest { op_id: "start-a".into(), instance_ids: ids.clone(), deadline_ms: 0 };
    let r = at_a.start(start).await.unwrap().into_inner();
    assert!(r.outcomes.iter().all(|o| o.kind == cpb::OutcomeKind::Success as i32), "{r:?}");
    wait_acked(&a, &ids, "at site A", |_| 50).await;

    Stage { work, bin, a, b, cluster, c, layout: layout.to_vec(), ids }
}

async fn run_book(
    c: &mut drover_cli::client::Clients,
    file: &str,
    params: &[(&str, &str)],
) -> (pb::Execution, serde_json::Value) {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks").join(file);
    let req = pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let e = c.runbooks.run_runbook(req).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if now.status != "running" {
            break now;
        }
        assert!(Instant::now() < deadline, "{file} is still at {}", now.step);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let state: serde_json::Value = serde_json::from_str(&run.state_json).unwrap();
    (run, state)
}

fn step_of(state: &serde_json::Value, name: &str) -> serde_json::Value {
    state["steps"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone()
}

/// Each instance's volumes' URIs where they are active now.
async fn uris_now(c: &mut drover_cli::client::Clients, vols: &[String], backend: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for vol in vols {
        let r = c
            .volumes
            .attach_volume(pb::AttachVolumeRequest { volume: vol.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.backend, backend);
        uris.push(r.uri);
    }
    uris
}

/// A planned site failover with the reference compute at both sites, on the qemu
/// backend: three instances writing verifiable logs to two groups' volumes at site A are
/// stopped before the final sync, the groups move, the instances get the replicas'
/// connection info and start at site B tier by tier, and `drover compute check` at B
/// finds every record they acknowledged at A (and at B), an exact prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_site_failover_stops_moves_and_starts_the_instances_and_their_logs_hold() {
    use drover_proto::compute::v1 as cpb;
    let Stage { work, bin, a, b, cluster: _cluster, mut c, layout, ids } = stage().await;
    // The planned site failover, with the compute steps.
    let (run, state) =
        run_book(&mut c, "site-failover-planned.yaml", &[("site", "site-a"), ("target_site", "site-b")]).await;
    if run.status != "succeeded" {
        let log = std::fs::read_to_string(work.path().join("compute-site-a.log")).unwrap_or_default();
        panic!("{}: {state}\ncompute at site A:\n{log}", run.error);
    }
    let step = |name: &str| step_of(&state, name);
    for name in ["stop-instances", "point-instances", "start-instances"] {
        let s = step(name);
        let items = s["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{name}: {s}");
        assert!(items.iter().all(|i| i["status"] == "succeeded"), "{name}: {s}");
    }
    // The DR report lists every instance with its outcome, per compute step.
    let md = c
        .executions
        .get_execution_report(pb::GetExecutionReportRequest { id: run.id.clone(), format: "md".into() })
        .await
        .unwrap()
        .into_inner()
        .text;
    for line in ["i1 (site-a)", "i3 (site-a)", "i1 (site-b)", "i3 (site-b)"] {
        assert!(md.lines().any(|l| l.contains(line) && l.contains("succeeded")), "{line} not in the report:\n{md}");
    }
    // Tier 1's instances started before tier 2's.
    let started: Vec<(u64, String)> = step("start-instances")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["tier"].as_u64().unwrap_or(0), i["target"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(started, [(1, "i1".to_string()), (1, "i2".into()), (2, "i3".into())]);
    let stopped_at_a: HashMap<String, u64> = ids.iter().map(|i| (i.clone(), acked(&a, i).unwrap())).collect();

    // At site B they write on (their logs continue).
    wait_acked(&b, &ids, "on at site B", |i| stopped_at_a[i] + 20).await;
    // The failback is the reverse: stopped at B, the groups come home, started at A.
    let (back, state) = run_book(&mut c, "site-failback.yaml", &[("site", "site-a"), ("from_site", "site-b")]).await;
    assert_eq!(back.status, "succeeded", "{}: {state}", back.error);
    for name in ["stop-instances", "point-instances", "start-instances"] {
        let s = step_of(&state, name);
        let items = s["items"].as_array().unwrap();
        assert!(items.len() == 3 && items.iter().all(|i| i["status"] == "succeeded"), "{name}: {s}");
    }
    let stopped_at_b: HashMap<String, u64> = ids.iter().map(|i| (i.clone(), acked(&b, i).unwrap())).collect();
    wait_acked(&a, &ids, "on back at site A", |i| stopped_at_b[i] + 20).await;
    let mut at_a = cpb::compute_hook_client::ComputeHookClient::connect(a.addr.clone()).await.unwrap();
    let stop = cpb::InstancesRequest { op_id: "stop-a".into(), instance_ids: ids.clone(), deadline_ms: 10_000 };
    let r = at_a.stop(stop).await.unwrap().into_inner();
    assert!(r.outcomes.iter().all(|o| o.kind == cpb::OutcomeKind::Success as i32), "{r:?}");
    for (id, v) in &layout {
        let uris = uris_now(&mut c, v, "backend-a").await;
        // Every record acknowledged at A (before and after) and at B is there.
        check_log(&bin, id, &uris, &b.dir.join(format!("{id}.ack")));
        let said = check_log(&bin, id, &uris, &a.dir.join(format!("{id}.ack")));
        assert!(said.contains("exact prefix"), "{said}");
    }
}

/// A disaster: site A's agent, compute service and instances are killed while the
/// instances write. The disaster runbook asks the lost site to stop them, is refused at
/// once and skips it (never waiting past `stop_deadline`), fails the groups over with
/// force, and starts the instances at site B on the replicas; their logs there are an
/// exact prefix, continued at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaster_failover_skips_the_lost_site_and_starts_the_instances_at_the_target() {
    use drover_proto::compute::v1 as cpb;
    let Stage { work: _work, bin, mut a, b, mut cluster, mut c, layout, ids } = stage().await;
    // Let a sync or two ship some of the log (interval 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Site A is lost: its compute service, its instances, its agent.
    a.proc.kill().unwrap();
    a.proc.wait().unwrap();
    let pattern = a.dir.display().to_string();
    let _ = std::process::Command::new("pkill").args(["-9", "-f", &pattern]).status();
    cluster.agents[0].proc.kill();
    let (run, state) = run_book(
        &mut c,
        "site-failover-disaster.yaml",
        &[("site", "site-a"), ("target_site", "site-b"), ("stop_deadline", "2s")],
    )
    .await;
    assert_eq!(run.status, "succeeded", "{}: {state}", run.error);
    let stop = step_of(&state, "stop-instances");
    assert_eq!(stop["status"], "skipped", "{stop}");
    let waited = stop["ended_ms"].as_i64().unwrap() - stop["started_ms"].as_i64().unwrap();
    assert!(waited <= 2_000 + 1_000, "the lost site held the run for {waited} ms (stop_deadline 2s)");
    for name in ["point-instances", "start-instances"] {
        let s = step_of(&state, name);
        let items = s["items"].as_array().unwrap();
        assert!(items.len() == 3 && items.iter().all(|i| i["status"] == "succeeded"), "{name}: {s}");
    }
    wait_acked(&b, &ids, "at site B", |_| 20).await;
    let mut at_b = cpb::compute_hook_client::ComputeHookClient::connect(b.addr.clone()).await.unwrap();
    let stop = cpb::InstancesRequest { op_id: "stop-b".into(), instance_ids: ids.clone(), deadline_ms: 10_000 };
    let r = at_b.stop(stop).await.unwrap().into_inner();
    assert!(r.outcomes.iter().all(|o| o.kind == cpb::OutcomeKind::Success as i32), "{r:?}");
    for (id, v) in &layout {
        let uris = uris_now(&mut c, v, "backend-b").await;
        let said = check_log(&bin, id, &uris, &b.dir.join(format!("{id}.ack")));
        assert!(said.contains("exact prefix"), "{said}");
    }
}

/// `drover group sync --quiesce` through a command compute side (mock backend): the
/// instances are quiesced for the point and unquiesced after, and the point is the
/// group's application-consistent one; when the quiesce never answers, it is cut at its
/// bound, unquiesce is still sent, and the point is crash-consistent only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesced_sync_is_application_consistent_and_one_whose_quiesce_hangs_is_not() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().display().to_string();
    let script = work.path().join("compute.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat > /dev/null\necho \"$DROVER_COMPUTE_CALL\" >> {dir}/calls.log\ncase \"$DROVER_COMPUTE_CALL\" in\n  \
             list_instances) cat {dir}/instances.json ;;\n  quiesce) if [ -e {dir}/hang ]; then exec sleep 30; fi\n    \
             echo '{{\"outcomes\":[{{\"instance_id\":\"db-1\",\"kind\":1}}]}}' ;;\n  unquiesce) \
             echo '{{\"outcomes\":[{{\"instance_id\":\"db-1\",\"kind\":1}}]}}' ;;\nesac\n"
        ),
    )
    .unwrap();
    let command = format!("compute.site-a.command=[\"/bin/sh\", \"{}\"]", script.display());
    let orch = ["--set", "compute.site-a.kind=exec", "--set", &command, "--set", "compute.site-a.notify_kinds=[]"];
    let mut cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &[], &orch).await;
    let mut c = cluster.clients().await;
    replicated_group(&mut c, "db", 2).await;
    let get = pb::GetGroupRequest { group: "db".into(), project: "tests".into() };
    let g = c.groups.get_group(get.clone()).await.unwrap().into_inner();
    let instances = serde_json::json!({ "instances": [{ "id": "db-1", "project": "tests", "volume_ids": [g.volume_ids[0]] }, { "id": "other", "volume_ids": ["not-ours"] }] });
    std::fs::write(work.path().join("instances.json"), instances.to_string()).unwrap();
    let calls = || -> Vec<String> {
        std::fs::read_to_string(work.path().join("calls.log")).unwrap_or_default().lines().map(String::from).collect()
    };
    let sync = |timeout_ms: i64| pb::SyncGroupRequest {
        group: "db".into(),
        project: "tests".into(),
        quiesce: true,
        quiesce_timeout_ms: timeout_ms,
        ..Default::default()
    };

    let r = c.replication.sync_group(sync(5_000)).await.unwrap().into_inner();
    assert!(r.application_consistent, "{r:?}");
    assert!(r.consistency_note.contains("1 instance(s) quiesced"), "{}", r.consistency_note);
    assert_eq!(calls(), ["list_instances", "quiesce", "unquiesce"]);
    let g = c.groups.get_group(get.clone()).await.unwrap().into_inner();
    assert_eq!(g.app_consistent_point, r.recovery_point_id);

    std::fs::write(work.path().join("hang"), "").unwrap();
    let started = Instant::now();
    let r2 = c.replication.sync_group(sync(1_000)).await.unwrap().into_inner();
    assert!(!r2.application_consistent, "{r2:?}");
    assert!(
        r2.consistency_note.contains("did not answer within") && r2.consistency_note.contains("crash-consistent"),
        "{}",
        r2.consistency_note
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the hanging quiesce held the sync for {:?}",
        started.elapsed()
    );
    assert_eq!(calls()[3..], ["list_instances", "quiesce", "unquiesce"]);
    assert_ne!(r2.recovery_point_id, r.recovery_point_id, "a point was still taken");
    let g = c.groups.get_group(get).await.unwrap().into_inner();
    assert_eq!(g.app_consistent_point, r.recovery_point_id, "the crash-consistent point is not recorded as consistent");

    // The orchestrator dies while the quiesce hangs: the resumed sync quiesces again
    // (same op_id), takes the point, and still unquiesces.
    let e = c.replication.sync_group(pb::SyncGroupRequest { no_wait: true, ..sync(8_000) }).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(20);
    while calls().len() < 8 {
        assert!(Instant::now() < deadline, "the third sync never asked to quiesce: {:?}", calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart_orchestrator().await;
    let mut c = cluster.clients().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.execution_id.clone() }).await.unwrap();
        let now = now.into_inner();
        if now.status != "running" {
            break now;
        }
        assert!(Instant::now() < deadline, "the resumed sync is still at {}", now.step);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    assert!(ended.claims >= 2, "resumed by the new orchestrator: {ended:?}");
    let answer: serde_json::Value = serde_json::from_str(&ended.output_json).unwrap();
    assert_eq!(answer["value"]["application_consistent"], false, "{answer}");
    assert_eq!(calls()[6..], ["list_instances", "quiesce", "list_instances", "quiesce", "unquiesce"]);
}
