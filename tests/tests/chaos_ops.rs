//! Chaos over the operations besides moves: volumes created, extended, deleted,
//! unmanaged, managed again and made from snapshots, groups made and replicated (and
//! single volumes through the per-volume API), volumes added to groups, replication
//! disabled, groups failed over and back and synced now, volume and group snapshots
//! taken and deleted, volumes taken out of groups, backends frozen and thawed, on mock
//! agents and real etcd. Each round asks for a few of them at
//! once, some callers leave early (a short deadline drops the call), and at a random
//! moment one fault strikes: the orchestrator SIGKILLed and restarted, etcd SIGKILLed and
//! restarted seconds later, or an agent SIGKILLed and restarted. After the rounds, with
//! every execution ended, the agents' op logs, roles and records must show: no execution
//! left running, nothing stuck in a transient state, no op_id that entered a driver
//! twice, one primary per replicated volume, every available volume present at its
//! backend with its size, no answer that was an internal error, and every resource left
//! in error saying why; a group whose enable failed is enabled again as its message
//! asks, and that must work (it did not, on the mock, before the fifteenth session).
//! Nor may a backend hold a volume, replica or snapshot that Drover forgot.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_cli::client::Clients;
use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use drover_tests::invariants::{repeated_op_ids, role_violations};
use drover_tests::{Cluster, Etcd, StoreChoice, failover_request, wait_backends_up, wait_executions_ended};

const ROUNDS: usize = 40;
const MIB: i64 = 1 << 20;
/// The mock agents' flags, at start and at every restart.
const AGENT_FLAGS: &[&str] = &["--set", "mock.latency=200ms", "--set", "mock.oplog={dir}/oplog-{backend}.jsonl"];

fn transient(status: &str) -> bool {
    matches!(status, "creating" | "extending" | "deleting" | "enabling" | "disabling" | "failing-over" | "failing-back")
}

async fn volumes(c: &mut Clients) -> Vec<pb::Volume> {
    let (mut all, mut marker) = (Vec::new(), String::new());
    loop {
        let page = c
            .volumes
            .list_volumes(pb::ListVolumesRequest { project: "tests".into(), limit: 0, marker })
            .await
            .expect("list volumes")
            .into_inner();
        all.extend(page.volumes);
        if page.next_marker.is_empty() {
            return all;
        }
        marker = page.next_marker;
    }
}

async fn groups(c: &mut Clients) -> Vec<pb::Group> {
    let (mut all, mut marker) = (Vec::new(), String::new());
    loop {
        let page = c
            .groups
            .list_groups(pb::ListGroupsRequest { project: "tests".into(), limit: 0, marker })
            .await
            .expect("list groups")
            .into_inner();
        all.extend(page.groups);
        if page.next_marker.is_empty() {
            return all;
        }
        marker = page.next_marker;
    }
}

/// Every group: the listed ones and those of single replicated volumes (made by the
/// per-volume API, which the group listing leaves out), read by id; `vols` is the volume
/// listing the caller already holds.
async fn all_groups(c: &mut Clients, vols: &[pb::Volume]) -> Vec<pb::Group> {
    let mut all = groups(c).await;
    let listed: std::collections::BTreeSet<&str> = all.iter().map(|g| g.id.as_str()).collect();
    let hidden: std::collections::BTreeSet<String> =
        vols.iter().map(|v| v.group_id.clone()).filter(|g| !g.is_empty() && !listed.contains(g.as_str())).collect();
    for id in hidden {
        match c.groups.get_group(pb::GetGroupRequest { group: id.clone(), project: "tests".into() }).await {
            Ok(g) => all.push(g.into_inner()),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => panic!("group {id}: {s:?}"),
        }
    }
    all
}

async fn snapshots(c: &mut Clients) -> Vec<pb::Snapshot> {
    let (mut all, mut marker) = (Vec::new(), String::new());
    loop {
        let page = c
            .snapshots
            .list_snapshots(pb::ListSnapshotsRequest { project: "tests".into(), marker, ..Default::default() })
            .await
            .expect("list snapshots")
            .into_inner();
        all.extend(page.snapshots);
        if page.next_marker.is_empty() {
            return all;
        }
        marker = page.next_marker;
    }
}

/// One operation of a round, picked from what the store held at the round's start (it
/// may have changed since: a refusal is a fine answer).
#[derive(Debug, Clone)]
enum Op {
    CreateVolume(String),
    Extend(String, i64),
    DeleteVolume(String),
    /// A group of one volume, then replication enabled.
    Replicate(String, String),
    Disable(String),
    DeleteGroup(String),
    /// A planned move: failover when at home, failback when away.
    Move(String, &'static str),
    Snapshot(String, String),
    DeleteSnapshot(String),
    Unmanage(String),
    /// An unmanaged reference on backend-a, managed again under a new name.
    Manage(String, String),
    /// A new volume from a snapshot (its id).
    FromSnapshot(String, String),
    /// A recovery point now (sync now) of a replicating group.
    SyncNow(String),
    /// A consistent snapshot of a group (replicating or not).
    GroupSnapshot(String, String),
    /// Replication of one volume, through its own group (the per-volume API).
    ReplicateVolume(String),
    /// A free volume added to a group whose replication is disabled.
    AddToGroup(String, String),
    /// A volume (its id) taken out of a group whose replication is disabled.
    RemoveFromGroup(String, String),
    /// A backend frozen (no management changes on it) or thawed, as a site runbook does.
    Freeze(&'static str),
    Thaw(&'static str),
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::CreateVolume(_) => "create-volume",
            Op::Extend(..) => "extend",
            Op::DeleteVolume(_) => "delete-volume",
            Op::Replicate(..) => "replicate",
            Op::Disable(_) => "disable",
            Op::DeleteGroup(_) => "delete-group",
            Op::Move(..) => "move",
            Op::Snapshot(..) => "snapshot",
            Op::DeleteSnapshot(_) => "delete-snapshot",
            Op::Unmanage(_) => "unmanage",
            Op::Manage(..) => "manage",
            Op::FromSnapshot(..) => "from-snapshot",
            Op::SyncNow(_) => "sync-now",
            Op::GroupSnapshot(..) => "group-snapshot",
            Op::ReplicateVolume(_) => "replicate-volume",
            Op::AddToGroup(..) => "add-to-group",
            Op::RemoveFromGroup(..) => "remove-from-group",
            Op::Freeze(_) => "freeze",
            Op::Thaw(_) => "thaw",
        }
    }
}

async fn run(mut c: Clients, op: Op) -> Result<(), tonic::Status> {
    let project = || "tests".to_string();
    let op_kind = op.kind();
    match op {
        Op::CreateVolume(name) => c
            .volumes
            .create_volume(pb::CreateVolumeRequest {
                name,
                project: project(),
                size_bytes: MIB,
                backend: "backend-a".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Op::Extend(volume, new_size_bytes) => c
            .volumes
            .extend_volume(pb::ExtendVolumeRequest { volume, project: project(), new_size_bytes })
            .await
            .map(|_| ()),
        Op::DeleteVolume(volume) => {
            c.volumes.delete_volume(pb::DeleteVolumeRequest { volume, project: project() }).await.map(|_| ())
        }
        Op::Replicate(group, volume) => {
            c.groups
                .create_group(pb::CreateGroupRequest {
                    name: group.clone(),
                    project: project(),
                    group_type: "consistent-replication".into(),
                    backend: "backend-a".into(),
                    volumes: vec![volume],
                    ..Default::default()
                })
                .await?;
            c.replication
                .enable_replication(pb::EnableReplicationRequest {
                    group,
                    project: project(),
                    target_backend: "backend-b".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
        }
        Op::Disable(group) => c
            .replication
            .disable_replication(pb::DisableReplicationRequest { group, project: project(), no_wait: false })
            .await
            .map(|_| ()),
        Op::DeleteGroup(group) => {
            c.groups.delete_group(pb::DeleteGroupRequest { group, project: project() }).await.map(|_| ())
        }
        Op::Move(group, target) => {
            c.replication.failover_group(failover_request(&group, target, false)).await.map(|_| ())
        }
        Op::Snapshot(volume, name) => c
            .snapshots
            .create_snapshot(pb::CreateSnapshotRequest { volume, project: project(), name })
            .await
            .map(|_| ()),
        Op::DeleteSnapshot(snapshot) => {
            c.snapshots.delete_snapshot(pb::DeleteSnapshotRequest { snapshot, project: project() }).await.map(|_| ())
        }
        Op::Unmanage(volume) => {
            c.volumes.unmanage_volume(pb::UnmanageVolumeRequest { volume, project: project() }).await.map(|_| ())
        }
        Op::Manage(reference, name) => c
            .volumes
            .manage_volume(pb::ManageVolumeRequest {
                backend: "backend-a".into(),
                reference,
                name,
                project: project(),
                without_snapshots: false,
            })
            .await
            .map(|_| ()),
        Op::FromSnapshot(snapshot, name) => c
            .volumes
            .create_volume(pb::CreateVolumeRequest {
                name,
                project: project(),
                from_snapshot: snapshot,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Op::SyncNow(group) => c
            .replication
            .sync_group(pb::SyncGroupRequest { group, project: project(), ..Default::default() })
            .await
            .map(|_| ()),
        Op::GroupSnapshot(group, name) => c
            .snapshots
            .create_group_snapshot(pb::CreateGroupSnapshotRequest { group, project: project(), name })
            .await
            .map(|_| ()),
        Op::ReplicateVolume(volume) => c
            .replication
            .enable_volume_replication(pb::VolumeReplicationRequest {
                volume,
                project: project(),
                target_backend: "backend-b".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Op::AddToGroup(group, volume) | Op::RemoveFromGroup(group, volume) => {
            let mut req = pb::UpdateGroupRequest { group, project: project(), ..Default::default() };
            match op_kind {
                "add-to-group" => req.add_volumes.push(volume),
                _ => req.remove_volumes.push(volume),
            }
            c.groups.update_group(req).await.map(|_| ())
        }
        Op::Freeze(backend) => {
            c.sites.freeze_backend(pb::FreezeBackendRequest { name: backend.into() }).await.map(|_| ())
        }
        Op::Thaw(backend) => c.sites.thaw_backend(pb::ThawBackendRequest { name: backend.into() }).await.map(|_| ()),
    }
}

/// What the store and backend-a held at a round's start.
struct Seen {
    vols: Vec<pb::Volume>,
    grps: Vec<pb::Group>,
    snaps: Vec<pb::Snapshot>,
    /// References backend-a could manage.
    unmanaged: Vec<String>,
    /// Backends frozen at the round's start.
    frozen: Vec<&'static str>,
}

async fn seen(c: &mut Clients) -> Seen {
    let unmanaged = c
        .volumes
        .list_manageable_volumes(pb::ListManageableVolumesRequest { backend: "backend-a".into(), ..Default::default() })
        .await
        .map(|r| r.into_inner().volumes.into_iter().filter(|m| m.safe_to_manage).map(|m| m.reference).collect())
        .unwrap_or_default();
    let listed = c.sites.list_backends(pb::ListBackendsRequest::default()).await.expect("list backends").into_inner();
    let frozen = ["backend-a", "backend-b"]
        .into_iter()
        .filter(|b| listed.backends.iter().any(|l| l.name == *b && l.frozen))
        .collect();
    let vols = volumes(c).await;
    let grps = all_groups(c, &vols).await;
    Seen { vols, grps, snaps: snapshots(c).await, unmanaged, frozen }
}

/// Picks an operation that makes sense for the state read at the round's start.
fn pick(rng: &mut fastrand::Rng, n: usize, seen: &Seen) -> Op {
    let (vols, grps, snaps) = (&seen.vols, &seen.grps, &seen.snaps);
    let free: Vec<&pb::Volume> = vols.iter().filter(|v| v.group_id.is_empty() && v.status == "available").collect();
    let available: Vec<&pb::Volume> = vols.iter().filter(|v| v.status == "available").collect();
    let at_rest: Vec<&pb::Group> =
        grps.iter().filter(|g| matches!(g.replication_status.as_str(), "enabled" | "failed-over")).collect();
    let disabled: Vec<&pb::Group> = grps.iter().filter(|g| g.replication_status == "disabled").collect();
    // Membership changes go to groups made as groups (a volume's own group refuses them).
    let joinable: Vec<&pb::Group> = disabled.iter().copied().filter(|g| !g.name.starts_with("volume-")).collect();
    let available_snaps: Vec<&pb::Snapshot> = snaps.iter().filter(|s| s.status == "available").collect();
    // A frozen backend is thawed soon, as a site runbook's last step does: while it is
    // frozen it refuses most of the other operations.
    if let Some(backend) = rng.choice(&seen.frozen)
        && rng.bool()
    {
        return Op::Thaw(backend);
    }
    for _ in 0..20 {
        let op = match rng.u32(0..19) {
            0 | 1 => Some(Op::CreateVolume(format!("v{n}"))),
            2 => rng.choice(&available).map(|v| Op::Extend(v.name.clone(), v.size_bytes + MIB)),
            3 => rng.choice(&free).map(|v| Op::DeleteVolume(v.name.clone())),
            4 => rng.choice(&free).map(|v| Op::Replicate(format!("g{n}"), v.name.clone())),
            5 => rng.choice(&at_rest).map(|g| Op::Disable(g.name.clone())),
            6 => rng.choice(&disabled).map(|g| Op::DeleteGroup(g.name.clone())),
            7 => rng.choice(&at_rest).map(|g| {
                let target = if g.active_backend == g.primary_backend { "backend-b" } else { "default" };
                Op::Move(g.name.clone(), target)
            }),
            8 => rng.choice(&free).map(|v| Op::Snapshot(v.name.clone(), format!("s{n}"))),
            9 => rng.choice(snaps).map(|s| Op::DeleteSnapshot(s.id.clone())),
            10 => rng.choice(&free).map(|v| Op::Unmanage(v.name.clone())),
            11 => rng.choice(&seen.unmanaged).map(|r| Op::Manage(r.clone(), format!("m{n}"))),
            13 => rng.choice(&at_rest).map(|g| Op::SyncNow(g.name.clone())),
            14 => rng.choice(grps).map(|g| Op::GroupSnapshot(g.name.clone(), format!("gs{n}"))),
            15 => rng.choice(&free).map(|v| Op::ReplicateVolume(v.name.clone())),
            16 => rng
                .choice(&joinable)
                .and_then(|g| rng.choice(&free).map(|v| Op::AddToGroup(g.name.clone(), v.name.clone()))),
            17 => rng
                .choice(&joinable)
                .and_then(|g| rng.choice(&g.volume_ids).map(|v| Op::RemoveFromGroup(g.name.clone(), v.clone()))),
            18 => Some(Op::Freeze(if rng.bool() { "backend-a" } else { "backend-b" })),
            _ => rng.choice(&available_snaps).map(|s| Op::FromSnapshot(s.id.clone(), format!("c{n}"))),
        };
        if let Some(op) = op {
            return op;
        }
    }
    Op::CreateVolume(format!("v{n}"))
}

#[derive(Debug, Default)]
struct Figures {
    faults: BTreeMap<&'static str, usize>,
    /// (operation kind, answer code) -> count.
    answers: BTreeMap<(&'static str, String), usize>,
    /// The first message of each refused (operation kind, code).
    said: BTreeMap<(&'static str, String), String>,
    callers_left: usize,
    executions: BTreeMap<String, usize>,
    resumed: usize,
    driver_ops: usize,
    repaired: Vec<String>,
    violations: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_under_orchestrator_etcd_and_agent_kills() {
    let seed =
        std::env::var("DROVER_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut etcd = Etcd::start().await;
    let mut cluster =
        Cluster::start_custom(StoreChoice::Etcd(&etcd), "mock", AGENT_FLAGS, &["--set", "owner_lease_ttl=2s"]).await;
    let mut f = Figures::default();
    let mut n = 0;
    for round in 0..ROUNDS {
        let mut c = cluster.clients().await;
        let seen = seen(&mut c).await;
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..rng.usize(2..5) {
            n += 1;
            let op = pick(&mut rng, n, &seen);
            // A third of the callers leave early: their call is dropped after 20-300 ms.
            let patience =
                if rng.u32(0..3) == 0 { Duration::from_millis(rng.u64(20..300)) } else { Duration::from_secs(60) };
            let client = c.clone();
            calls.spawn(async move {
                let kind = op.kind();
                (kind, tokio::time::timeout(patience, run(client, op)).await)
            });
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..400))).await;
        let fault = match rng.u32(0..4) {
            0 => {
                cluster.restart_orchestrator().await;
                "orchestrator"
            }
            1 => {
                etcd.kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(500..3000))).await;
                etcd.restart().await;
                "etcd"
            }
            2 => {
                let side = rng.usize(0..2);
                cluster.agents[side].proc.kill();
                cluster.restart_agent_with(side, "mock", AGENT_FLAGS);
                "agent"
            }
            _ => "none",
        };
        *f.faults.entry(fault).or_default() += 1;
        while let Some(done) = calls.join_next().await {
            let (kind, answer) = done.unwrap();
            let code = match answer {
                Err(_) => {
                    f.callers_left += 1;
                    "caller-left".to_string()
                }
                Ok(Ok(())) => "ok".to_string(),
                Ok(Err(s)) => {
                    if s.code() == tonic::Code::Internal {
                        f.violations.push(format!("round {round}: {kind} answered an internal error: {}", s.message()));
                    }
                    let code = format!("{:?}", s.code());
                    f.said.entry((kind, code.clone())).or_insert_with(|| s.message().to_string());
                    code
                }
            };
            *f.answers.entry((kind, code)).or_default() += 1;
        }
        if fault == "agent" {
            wait_backends_up(&mut cluster.clients().await, 2).await;
        }
    }

    // Settle: every execution ends (resumed ones after the owner lease, moves waiting
    // for a restarted agent), and both backends are thawed, as after a site runbook.
    let mut c = cluster.clients().await;
    wait_executions_ended(&mut c, Duration::from_secs(180)).await;
    for backend in ["backend-a", "backend-b"] {
        let thawed = c.sites.thaw_backend(pb::ThawBackendRequest { name: backend.into() }).await;
        match thawed {
            Ok(b) if !b.get_ref().frozen => {}
            other => f.violations.push(format!("{backend}: the thaw at the end did not work: {other:?}")),
        }
    }
    let (mut marker, mut listed) = (String::new(), Vec::new());
    loop {
        let page = c
            .executions
            .list_executions(pb::ListExecutionsRequest { marker, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        listed.extend(page.executions);
        if page.next_marker.is_empty() {
            break;
        }
        marker = page.next_marker;
    }
    for e in &listed {
        *f.executions.entry(e.status.clone()).or_default() += 1;
        f.resumed += (e.claims > 1) as usize;
        if e.status == "running" {
            f.violations.push(format!("execution {} ({}) still running: {}", e.id, e.summary, e.error));
        }
    }

    // Nothing stuck in a transient state; every error says what to do next, and doing it
    // works.
    let vols = volumes(&mut c).await;
    let (grps, snaps) = (all_groups(&mut c, &vols).await, snapshots(&mut c).await);
    for v in &vols {
        if transient(&v.status) {
            f.violations.push(format!("volume {} stuck {}", v.name, v.status));
        }
    }
    for g in &grps {
        if transient(&g.replication_status) {
            f.violations.push(format!("group {} stuck {}", g.name, g.replication_status));
        }
    }
    for s in &snaps {
        if transient(&s.status) {
            f.violations.push(format!("snapshot {} stuck {}", s.name, s.status));
        }
    }
    repair(&mut c, &vols, &grps, &snaps, &mut f).await;

    // The agents: no op_id twice (the mock's own log of driver calls and the agents' op
    // logs), one primary per replicated volume, and every available volume there.
    let (a, b) = (cluster.path().join("oplog-backend-a.jsonl"), cluster.path().join("oplog-backend-b.jsonl"));
    let (twice, total) = repeated_op_ids(&[("backend-a", &a), ("backend-b", &b)]);
    f.driver_ops = total;
    f.violations.extend(twice.into_iter().map(|t| format!("mock op log: op_id twice: {t}")));
    let (twice, admitted) = cluster.repeated_op_ids();
    f.violations.extend(twice.into_iter().map(|t| format!("agent op log: op_id twice: {t}")));
    assert!(admitted > 0 && total > 0, "the op logs are empty");
    let vols = volumes(&mut c).await;
    let grps = all_groups(&mut c, &vols).await;
    let replicated: Vec<String> = grps
        .iter()
        .filter(|g| matches!(g.replication_status.as_str(), "enabled" | "failed-over"))
        .map(|g| g.id.clone())
        .collect();
    let agents = [("backend-a", cluster.agents[0].endpoint.clone()), ("backend-b", cluster.agents[1].endpoint.clone())];
    f.violations.extend(role_violations(&mut c, cluster.dir.path(), &agents, &replicated).await);
    for v in vols.iter().filter(|v| v.status == "available") {
        let side = if v.active_backend == "backend-b" { 1 } else { 0 };
        let mut agent = drover_tests::cluster::agent_client(&agents[side].1, cluster.path()).await;
        match agent.get_volume(apb::GetVolumeRequest { volume_id: v.id.clone() }).await {
            Ok(at) if at.get_ref().size_bytes == v.size_bytes => {}
            Ok(at) => f.violations.push(format!(
                "volume {}: {} bytes in Drover, {} at {}",
                v.name,
                v.size_bytes,
                at.get_ref().size_bytes,
                agents[side].0
            )),
            Err(e) => f.violations.push(format!("volume {} is available but not at {}: {e:?}", v.name, agents[side].0)),
        }
    }

    f.violations.extend(forgotten(&mut c, cluster.path()).await);

    eprintln!("chaos-ops [seed {seed}]: {f:#?}");
    println!(
        "chaos ops (seed {seed}): {ROUNDS} rounds, faults {:?}, {} callers left, executions {:?} ({} resumed), {} \
         driver ops, {} repaired, {} violations",
        f.faults,
        f.callers_left,
        f.executions,
        f.resumed,
        f.driver_ops,
        f.repaired.len(),
        f.violations.len()
    );
    assert!(f.violations.is_empty(), "seed {seed}: {:#?}", f.violations);
    assert!(f.answers.keys().filter(|(_, code)| code == "ok").count() >= 4, "too little succeeded: {:?}", f.answers);
}

/// What the backends hold that Drover forgot: a volume Drover has no record of (a create
/// or a delete cut short and never finished), a replica of a volume whose group is not
/// replicated, a snapshot Drover does not know, or a test clone left behind. Read from
/// the mock agents' state files once every execution has ended.
async fn forgotten(c: &mut Clients, dir: &std::path::Path) -> Vec<String> {
    let vols = volumes(c).await;
    let (grps, snaps) = (all_groups(c, &vols).await, snapshots(c).await);
    let by_id: BTreeMap<&str, &pb::Volume> = vols.iter().map(|v| (v.id.as_str(), v)).collect();
    let snap_ids: std::collections::BTreeSet<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
    // A replica is expected while its group replicates; a group in error may hold one
    // or not (its message says what to do).
    let may_have_replica: std::collections::BTreeSet<&str> = grps
        .iter()
        .filter(|g| matches!(g.replication_status.as_str(), "enabled" | "failed-over" | "error"))
        .map(|g| g.id.as_str())
        .collect();
    let mut found = Vec::new();
    for backend in ["backend-a", "backend-b"] {
        let file = dir.join(format!("agent-{backend}")).join("mock-state.json");
        let held = match drover_agent_mock::MockDriver::holdings(&file) {
            Ok(Some(h)) => h,
            Ok(None) => continue,
            Err(e) => {
                found.push(format!("{backend}: cannot read its state: {e}"));
                continue;
            }
        };
        for (id, (size, role)) in &held.volumes {
            match by_id.get(id.as_str()) {
                None => found.push(format!(
                    "{backend} holds volume {id} ({size} bytes, role {role:?}) that Drover has no record of"
                )),
                Some(v) if v.active_backend != backend && !may_have_replica.contains(v.group_id.as_str()) => found
                    .push(format!(
                        "{backend} holds a copy of volume {} (role {role:?}), active at {}, whose group {:?} does not \
                         replicate",
                        v.name, v.active_backend, v.group_id
                    )),
                Some(_) => {}
            }
        }
        for (s, of) in held.snapshots.iter().filter(|(s, _)| !snap_ids.contains(s.as_str())) {
            let state: Vec<String> = of
                .iter()
                .map(|v| match by_id.get(v.as_str()) {
                    Some(v) => format!("{} {}", v.name, v.status),
                    None if held.unmanaged.contains(v) => format!("{v} unmanaged"),
                    None => format!("{v} gone"),
                })
                .collect();
            found.push(format!("{backend} holds snapshot {s} (of {state:?}) that Drover has no record of"));
        }
        for clone in &held.clones {
            found.push(format!("{backend} holds test clone {clone}, left behind"));
        }
    }
    found
}

/// Each resource left in error must say why. A group whose enable failed asks for the
/// enable again, which the test does, and which must work; any other group error is a
/// violation (none is expected from these faults).
async fn repair(c: &mut Clients, vols: &[pb::Volume], grps: &[pb::Group], snaps: &[pb::Snapshot], f: &mut Figures) {
    for v in vols.iter().filter(|v| v.status == "error") {
        f.repaired.push(format!("volume {}: {}", v.name, v.status_reason));
        if v.status_reason.is_empty() {
            f.violations.push(format!("volume {} is in error without a reason", v.name));
        }
    }
    for g in grps.iter().filter(|g| g.replication_status == "error") {
        f.repaired.push(format!("group {}: {}", g.name, g.status_reason));
        if g.status_reason.contains("retry `enable-replication`") {
            let again = c
                .replication
                .enable_replication(pb::EnableReplicationRequest {
                    group: g.name.clone(),
                    project: "tests".into(),
                    target_backend: "backend-b".into(),
                    ..Default::default()
                })
                .await;
            match again {
                Ok(r) if r.get_ref().group.as_ref().is_some_and(|g| g.replication_status == "enabled") => {}
                other => f.violations.push(format!("group {}: the enable it asks for did not work: {other:?}", g.name)),
            }
        } else {
            f.violations
                .push(format!("group {} is in error without a step the test knows: {}", g.name, g.status_reason));
        }
    }
    for s in snaps.iter().filter(|s| s.status == "error") {
        f.repaired.push(format!("snapshot {}: {}", s.name, s.status_reason));
        if s.status_reason.is_empty() {
            f.violations.push(format!("snapshot {} is in error without a reason", s.name));
        }
    }
    let _ = c;
}
