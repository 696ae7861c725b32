//! The conformance suite every [`Driver`] must pass, through the agent's gRPC service:
//! idempotency by op_id, stale epochs, ABORTED for concurrent mutations of one volume,
//! the error codes, and the promote/demote/resync rules of csi-addons replication.
//!
//! A test crate builds a [`Pair`] (two agents of the same driver, as primary and
//! secondary sides) and calls [`run_all`].

use std::sync::Arc;

use async_trait::async_trait;
use drover_proto::agent::v1 as pb;
use drover_proto::agent::v1::agent_client::AgentClient;
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::Channel;

use crate::driver::{
    AdoptSnapshot, ApplyHeader, Connection, Driver, DriverError, EnableSpec, GroupSnapshotInfo, Incoming, Manageable,
    ReplicationState, SyncReport, VolumeState,
};

/// Two agents of one driver kind: the suite's primary and secondary sides.
pub struct Pair {
    pub primary: AgentClient<Channel>,
    pub primary_endpoint: String,
    pub secondary: AgentClient<Channel>,
    pub secondary_endpoint: String,
    /// Opens and closes the primary's gate (see [`Gated`]).
    pub gate: Arc<Gate>,
}

/// Holds `extend_volume` calls at a gate the test controls, to make "an operation is in
/// flight" a fact rather than a race.
pub struct Gate {
    entered: Semaphore,
    open: Semaphore,
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { entered: Semaphore::new(0), open: Semaphore::new(0) })
    }

    /// Lets one held call through.
    pub fn release_one(&self) {
        self.open.add_permits(1);
    }

    /// Waits until a call is held at the gate.
    pub async fn wait_entered(&self) {
        self.entered.acquire().await.expect("gate open").forget();
    }
}

/// A driver whose `extend_volume` waits at a [`Gate`]; everything else passes through.
pub struct Gated {
    pub inner: Arc<dyn Driver>,
    pub gate: Arc<Gate>,
}

#[async_trait]
impl Driver for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn version(&self) -> &str {
        self.inner.version()
    }
    fn attach_fences(&self, fences: crate::driver::Fences) {
        self.inner.attach_fences(fences);
    }
    fn held_groups(&self) -> Vec<crate::driver::HeldGroup> {
        self.inner.held_groups()
    }
    async fn release_group(&self, group_id: &str) -> Result<(), DriverError> {
        self.inner.release_group(group_id).await
    }
    async fn clone_recovery_point(&self, v: &str, c: &str) -> Result<crate::driver::CloneInfo, DriverError> {
        self.inner.clone_recovery_point(v, c).await
    }
    async fn delete_clone(&self, c: &str) -> Result<(), DriverError> {
        self.inner.delete_clone(c).await
    }
    fn capabilities(&self) -> Vec<String> {
        self.inner.capabilities()
    }
    async fn probe(&self) -> Result<(), DriverError> {
        self.inner.probe().await
    }
    async fn create_volume(&self, id: &str, size: u64) -> Result<VolumeState, DriverError> {
        self.inner.create_volume(id, size).await
    }
    async fn delete_volume(&self, id: &str) -> Result<(), DriverError> {
        self.inner.delete_volume(id).await
    }
    async fn extend_volume(&self, id: &str, size: u64) -> Result<VolumeState, DriverError> {
        self.gate.entered.add_permits(1);
        self.gate.open.acquire().await.expect("gate").forget();
        self.inner.extend_volume(id, size).await
    }
    async fn get_volume(&self, id: &str) -> Result<VolumeState, DriverError> {
        self.inner.get_volume(id).await
    }
    async fn create_group_snapshot(&self, s: &str, v: &[String]) -> Result<GroupSnapshotInfo, DriverError> {
        self.inner.create_group_snapshot(s, v).await
    }
    async fn delete_snapshot(&self, s: &str) -> Result<(), DriverError> {
        self.inner.delete_snapshot(s).await
    }
    fn backend_restarts(&self) -> u64 {
        self.inner.backend_restarts()
    }

    async fn pending_bytes(&self, id: &str) -> Result<Option<u64>, DriverError> {
        self.inner.pending_bytes(id).await
    }
    async fn create_volume_from_snapshot(
        &self,
        id: &str,
        size: u64,
        snap: &str,
        of: &str,
    ) -> Result<VolumeState, DriverError> {
        self.inner.create_volume_from_snapshot(id, size, snap, of).await
    }
    async fn attach_volume(&self, id: &str) -> Result<Connection, DriverError> {
        self.inner.attach_volume(id).await
    }
    async fn detach_volume(&self, id: &str) -> Result<(), DriverError> {
        self.inner.detach_volume(id).await
    }
    async fn list_manageable(&self) -> Result<Vec<Manageable>, DriverError> {
        self.inner.list_manageable().await
    }
    async fn manage_volume(&self, r: &str, id: &str, snaps: &[AdoptSnapshot]) -> Result<VolumeState, DriverError> {
        self.inner.manage_volume(r, id, snaps).await
    }
    async fn unmanage_volume(&self, id: &str) -> Result<(), DriverError> {
        self.inner.unmanage_volume(id).await
    }
    async fn enable_replication(&self, spec: &EnableSpec) -> Result<(), DriverError> {
        self.inner.enable_replication(spec).await
    }
    async fn disable_replication(&self, id: &str) -> Result<(), DriverError> {
        self.inner.disable_replication(id).await
    }
    async fn promote(&self, id: &str, force: bool) -> Result<Option<String>, DriverError> {
        self.inner.promote(id, force).await
    }
    async fn demote(&self, id: &str) -> Result<(), DriverError> {
        self.inner.demote(id).await
    }
    async fn resync(&self, id: &str) -> Result<bool, DriverError> {
        self.inner.resync(id).await
    }
    async fn replication_info(&self, id: &str) -> Result<ReplicationState, DriverError> {
        self.inner.replication_info(id).await
    }
    async fn sync_group(&self, g: &str, f: bool, p: Option<&str>) -> Result<SyncReport, DriverError> {
        self.inner.sync_group(g, f, p).await
    }
    async fn apply_recovery_point(
        &self,
        h: ApplyHeader,
        i: tokio::sync::mpsc::Receiver<Incoming>,
    ) -> Result<u64, DriverError> {
        self.inner.apply_recovery_point(h, i).await
    }
    fn sync_schedule(&self) -> Vec<crate::driver::ScheduledSync> {
        self.inner.sync_schedule()
    }
}

fn ctx(op: &str, epoch: u64, scope: &str) -> Option<pb::OpContext> {
    Some(pb::OpContext { op_id: op.into(), epoch, fence_scope: scope.into() })
}

fn vctx(op: &str, epoch: u64, vol: &str) -> Option<pb::OpContext> {
    ctx(op, epoch, &format!("volume/{vol}"))
}

fn create(op: &str, vol: &str, size: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { ctx: vctx(op, 1, vol), volume_id: vol.into(), size_bytes: size, ..Default::default() }
}

fn expect_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    what: &str,
) -> tonic::Status {
    let s = r.expect_err(what);
    assert_eq!(s.code(), code, "{what}: {}", s.message());
    s
}

/// Runs every case against one pair.
/// Serves `primary` (behind a [`Gated`] wrapper) and `secondary` through real agent
/// servers on loopback ports, each with its ledger in a subdirectory of `dir`, and runs
/// the whole suite against them. Every backend crate calls this from its tests.
pub async fn run_against(primary: Arc<dyn Driver>, secondary: Arc<dyn Driver>, dir: &std::path::Path) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let gate = Gate::new();
    let gated: Arc<dyn Driver> = Arc::new(Gated { inner: primary, gate: gate.clone() });
    let mut endpoints = Vec::new();
    for (side, driver) in [("primary", gated), ("secondary", secondary)] {
        let ledger_dir = dir.join(format!("ledger-{side}"));
        std::fs::create_dir_all(&ledger_dir).expect("ledger dir");
        let ledger = crate::ledger::Ledger::open(&ledger_dir.join("ledger.log")).expect("ledger opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        // Plain text: the suite checks the driver contract, not the transport.
        let running =
            crate::server::serve(driver, ledger, None, listener, None, shutdown.clone()).await.expect("agent serves");
        endpoints.push(format!("http://{}", running.local_addr));
    }
    let mut pair = Pair {
        primary: AgentClient::connect(endpoints[0].clone()).await.expect("primary answers"),
        primary_endpoint: endpoints[0].clone(),
        secondary: AgentClient::connect(endpoints[1].clone()).await.expect("secondary answers"),
        secondary_endpoint: endpoints[1].clone(),
        gate,
    };
    run_all(&mut pair).await;
}

/// Runs every case against a pair.
pub async fn run_all(pair: &mut Pair) {
    idempotent_by_op_id(pair).await;
    stale_epoch_is_refused(pair).await;
    concurrent_mutation_is_aborted(pair).await;
    error_codes(pair).await;
    promote_demote_resync_rules(pair).await;
    replication_enabled_again_starts_over(pair).await;
    clones_of_recovery_points(pair).await;
    snapshots(pair).await;
}

/// A repeated op_id returns the first outcome, even with other arguments: the operation is
/// not run again.
pub async fn idempotent_by_op_id(pair: &mut Pair) {
    let c = &mut pair.primary;
    let first = c.create_volume(create("idem-1", "idem", 1 << 20)).await.expect("create").into_inner();
    let again = c.create_volume(create("idem-1", "idem", 2 << 20)).await.expect("repeat").into_inner();
    assert_eq!(first, again, "a repeated op_id must answer with the first outcome");
    let v = c.get_volume(pb::GetVolumeRequest { volume_id: "idem".into() }).await.unwrap().into_inner();
    assert_eq!(v.size_bytes, 1 << 20, "the repeated op_id must not have run");
}

/// An epoch lower than one already seen for the scope is refused.
pub async fn stale_epoch_is_refused(pair: &mut Pair) {
    let c = &mut pair.primary;
    c.create_volume(pb::CreateVolumeRequest {
        ctx: vctx("fence-1", 10, "fence"),
        volume_id: "fence".into(),
        size_bytes: 1 << 20,
        ..Default::default()
    })
    .await
    .expect("epoch 10");
    let s = expect_code(
        c.delete_volume(pb::DeleteVolumeRequest { ctx: vctx("fence-2", 9, "fence"), volume_id: "fence".into() }).await,
        Code::FailedPrecondition,
        "epoch 9 after 10",
    );
    assert!(s.message().contains("stale epoch"), "{}", s.message());
    c.get_volume(pb::GetVolumeRequest { volume_id: "fence".into() }).await.expect("the fenced delete did nothing");
}

/// A second mutation of a volume with one in flight gets ABORTED.
pub async fn concurrent_mutation_is_aborted(pair: &mut Pair) {
    let mut c = pair.primary.clone();
    c.create_volume(create("busy-0", "busy", 1 << 20)).await.expect("create");
    let mut bg = c.clone();
    let held = tokio::spawn(async move {
        bg.extend_volume(pb::ExtendVolumeRequest {
            ctx: vctx("busy-1", 1, "busy"),
            volume_id: "busy".into(),
            new_size_bytes: 2 << 20,
        })
        .await
    });
    pair.gate.wait_entered().await;
    let s = expect_code(
        c.extend_volume(pb::ExtendVolumeRequest {
            ctx: vctx("busy-2", 1, "busy"),
            volume_id: "busy".into(),
            new_size_bytes: 3 << 20,
        })
        .await,
        Code::Aborted,
        "a second mutation while one is in flight",
    );
    assert!(s.message().contains("busy-1"), "{}", s.message());
    pair.gate.release_one();
    assert_eq!(held.await.unwrap().expect("the first extend").into_inner().size_bytes, 2 << 20);
}

/// The error codes callers rely on.
pub async fn error_codes(pair: &mut Pair) {
    let c = &mut pair.primary;
    expect_code(
        c.get_volume(pb::GetVolumeRequest { volume_id: "nope".into() }).await,
        Code::NotFound,
        "unknown volume",
    );
    expect_code(c.create_volume(create("err-1", "zero", 0)).await, Code::InvalidArgument, "size 0");
    expect_code(c.create_volume(create("err-2", "neg", -4096)).await, Code::InvalidArgument, "negative size");
    c.create_volume(create("err-3", "errs", 2 << 20)).await.expect("create");
    pair.gate.release_one();
    expect_code(
        c.extend_volume(pb::ExtendVolumeRequest {
            ctx: vctx("err-4", 1, "errs"),
            volume_id: "errs".into(),
            new_size_bytes: 1 << 20,
        })
        .await,
        Code::InvalidArgument,
        "shrinking",
    );
    expect_code(
        c.promote_volume(pb::PromoteVolumeRequest {
            ctx: vctx("err-5", 1, "errs"),
            volume_id: "errs".into(),
            force: false,
        })
        .await,
        Code::FailedPrecondition,
        "promoting a volume that is not replicated",
    );
    expect_code(
        c.create_volume(pb::CreateVolumeRequest {
            ctx: None,
            volume_id: "noctx".into(),
            size_bytes: 1 << 20,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "a mutation without a context",
    );
}

/// Promote of a healthy secondary without force is refused; resync of a volume that is
/// not demoted is refused; after a final sync the secondary promotes without force.
pub async fn promote_demote_resync_rules(pair: &mut Pair) {
    let (p, s) = (&mut pair.primary, &mut pair.secondary);
    let gctx = |op: &str| ctx(op, 1, "group/rules");
    p.create_volume(create("rules-0", "rules", 4 << 20)).await.expect("create");
    let enable =
        |role: pb::ReplicationRole, peer_backend: &str, peer_endpoint: &str, op: &str| pb::EnableReplicationRequest {
            ctx: gctx(op),
            volume_id: "rules".into(),
            group_id: "rules".into(),
            role: role as i32,
            peer: Some(pb::ReplicationPeer { backend: peer_backend.into(), endpoint: peer_endpoint.into() }),
            size_bytes: 4 << 20,
            parameters: [("sync_interval_ms".to_string(), "3600000".to_string())].into(),
        };
    s.enable_replication(enable(pb::ReplicationRole::Secondary, "conf-a", &pair.primary_endpoint, "rules-1"))
        .await
        .expect("secondary");
    p.enable_replication(enable(pb::ReplicationRole::Primary, "conf-b", &pair.secondary_endpoint, "rules-2"))
        .await
        .expect("primary");
    let sync = |op: &str, fin: bool| pb::SyncGroupRequest {
        ctx: gctx(op),
        group_id: "rules".into(),
        r#final: fin,
        peer_endpoint: String::new(),
    };
    p.sync_group(sync("rules-3", false)).await.expect("initial sync");
    let info = s
        .get_replication_info(pb::GetReplicationInfoRequest { volume_id: "rules".into(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.recovery_point_id.is_empty(), "the secondary holds a recovery point: {info:?}");

    let promote = |op: &str, force: bool| pb::PromoteVolumeRequest { ctx: gctx(op), volume_id: "rules".into(), force };
    let e = expect_code(
        s.promote_volume(promote("rules-4", false)).await,
        Code::FailedPrecondition,
        "promote a healthy secondary without force",
    );
    assert!(e.message().contains("force"), "{}", e.message());
    expect_code(
        p.resync_volume(pb::ResyncVolumeRequest { ctx: gctx("rules-5"), volume_id: "rules".into() }).await,
        Code::FailedPrecondition,
        "resync of a volume that is not demoted",
    );

    p.sync_group(sync("rules-6", true)).await.expect("final sync");
    s.promote_volume(promote("rules-7", false)).await.expect("promote after the primary demoted itself");
    let info = p
        .get_replication_info(pb::GetReplicationInfoRequest { volume_id: "rules".into(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.role, pb::ReplicationRole::Secondary as i32, "the old primary is a secondary now");
    p.resync_volume(pb::ResyncVolumeRequest { ctx: gctx("rules-8"), volume_id: "rules".into() })
        .await
        .expect("resync of a demoted volume");
}

/// Replication disabled and enabled again (in a new group, as the orchestrator does for a
/// volume that left its group) starts over: the new replica holds nothing, so the first
/// sync after it must not build on a point the old replica held (found by the mixed
/// chaos test: the mock shipped a delta from its old point and every retry was refused).
pub async fn replication_enabled_again_starts_over(pair: &mut Pair) {
    let (p, s) = (&mut pair.primary, &mut pair.secondary);
    p.create_volume(create("again-0", "again", 4 << 20)).await.expect("create");
    for (round, group) in ["again-1", "again-2"].into_iter().enumerate() {
        let gctx = |op: &str| ctx(&format!("{group}-{op}"), 1, &format!("group/{group}"));
        let enable = |role: pb::ReplicationRole, peer_backend: &str, peer_endpoint: &str, op: &str| {
            pb::EnableReplicationRequest {
                ctx: gctx(op),
                volume_id: "again".into(),
                group_id: group.into(),
                role: role as i32,
                peer: Some(pb::ReplicationPeer { backend: peer_backend.into(), endpoint: peer_endpoint.into() }),
                size_bytes: 4 << 20,
                parameters: [("sync_interval_ms".to_string(), "3600000".to_string())].into(),
            }
        };
        s.enable_replication(enable(pb::ReplicationRole::Secondary, "conf-a", &pair.primary_endpoint, "sec"))
            .await
            .expect("secondary");
        p.enable_replication(enable(pb::ReplicationRole::Primary, "conf-b", &pair.secondary_endpoint, "pri"))
            .await
            .expect("primary");
        let sync = pb::SyncGroupRequest {
            ctx: gctx("sync"),
            group_id: group.into(),
            r#final: false,
            peer_endpoint: String::new(),
        };
        p.sync_group(sync).await.unwrap_or_else(|e| panic!("the first sync of enable {}: {e:?}", round + 1));
        let info = s
            .get_replication_info(pb::GetReplicationInfoRequest { volume_id: "again".into(), estimate_pending: false })
            .await
            .unwrap()
            .into_inner();
        assert!(!info.recovery_point_id.is_empty(), "enable {}: the replica holds a point: {info:?}", round + 1);
        for (side, c) in [("pri", &mut *p), ("sec", &mut *s)] {
            c.disable_replication(pb::DisableReplicationRequest {
                ctx: gctx(&format!("off-{side}")),
                volume_id: "again".into(),
            })
            .await
            .expect("disable");
        }
    }
}

/// A clone of a secondary's newest point: idempotent per clone id, left alone by later
/// points, removable twice; a volume that is not a secondary cannot be cloned. Only for
/// drivers with the `clone-recovery-point` capability.
pub async fn clones_of_recovery_points(pair: &mut Pair) {
    let caps = pair.secondary.get_capabilities(pb::GetCapabilitiesRequest {}).await.unwrap().into_inner();
    if !caps.capabilities.iter().any(|c| c == crate::driver::capability::CLONE_RECOVERY_POINT) {
        return;
    }
    let (p, s) = (&mut pair.primary, &mut pair.secondary);
    let gctx = |op: &str| ctx(op, 1, "group/clones");
    p.create_volume(create("clones-0", "clones", 4 << 20)).await.expect("create");
    let enable = |role: pb::ReplicationRole, peer: &str, op: &str| pb::EnableReplicationRequest {
        ctx: gctx(op),
        volume_id: "clones".into(),
        group_id: "clones".into(),
        role: role as i32,
        peer: Some(pb::ReplicationPeer { backend: "conf-peer".into(), endpoint: peer.into() }),
        size_bytes: 4 << 20,
        parameters: [("sync_interval_ms".to_string(), "3600000".to_string())].into(),
    };
    s.enable_replication(enable(pb::ReplicationRole::Secondary, &pair.primary_endpoint, "clones-1")).await.unwrap();
    p.enable_replication(enable(pb::ReplicationRole::Primary, &pair.secondary_endpoint, "clones-2")).await.unwrap();
    let sync = |op: &str| pb::SyncGroupRequest {
        ctx: gctx(op),
        group_id: "clones".into(),
        r#final: false,
        peer_endpoint: String::new(),
    };
    p.sync_group(sync("clones-3")).await.expect("initial sync");
    let point = s
        .get_replication_info(pb::GetReplicationInfoRequest { volume_id: "clones".into(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    let clone = |op: &str, id: &str| pb::CloneRecoveryPointRequest {
        ctx: vctx(op, 1, id),
        volume_id: "clones".into(),
        clone_id: id.into(),
    };
    let first = s.clone_recovery_point(clone("clones-4", "test-1")).await.expect("clone").into_inner();
    assert_eq!(first.recovery_point_id, point.recovery_point_id, "the clone holds the newest point");
    assert!(first.connection.as_ref().is_some_and(|c| !c.uri.is_empty()), "a clone is attachable: {first:?}");
    let again = s.clone_recovery_point(clone("clones-5", "test-1")).await.expect("clone again").into_inner();
    assert_eq!(first, again, "the same clone id gives the same clone");
    p.sync_group(sync("clones-6")).await.expect("replication goes on while a clone exists");
    let later = s
        .get_replication_info(pb::GetReplicationInfoRequest { volume_id: "clones".into(), estimate_pending: false })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(later.recovery_point_id, point.recovery_point_id, "the replica took a new point");
    let del = |op: &str| pb::DeleteCloneRequest { ctx: vctx(op, 1, "test-1"), clone_id: "test-1".into() };
    s.delete_clone(del("clones-7")).await.expect("delete");
    s.delete_clone(del("clones-8")).await.expect("delete again");
    expect_code(
        p.clone_recovery_point(pb::CloneRecoveryPointRequest {
            ctx: vctx("clones-9", 1, "test-2"),
            volume_id: "clones".into(),
            clone_id: "test-2".into(),
        })
        .await,
        Code::FailedPrecondition,
        "cloning a volume that is not a secondary",
    );
}

/// Group snapshots and volumes made from them: idempotent per op_id and per snapshot id,
/// fenced by epoch, bad input refused with its code; a snapshot that a volume was made
/// from, and a volume that has snapshots, cannot be deleted; a snapshot survives syncs of
/// its replicated volume; a replica cannot be snapshotted. Only for drivers with the
/// `snapshot` capability.
pub async fn snapshots(pair: &mut Pair) {
    let caps = pair.primary.get_capabilities(pb::GetCapabilitiesRequest {}).await.unwrap().into_inner();
    if !caps.capabilities.iter().any(|c| c == crate::driver::capability::SNAPSHOT) {
        return;
    }
    let (p, s) = (&mut pair.primary, &mut pair.secondary);
    for (i, v) in ["snap-a", "snap-b"].iter().enumerate() {
        p.create_volume(create(&format!("snap-0{i}"), v, 4 << 20)).await.expect("create");
    }
    let gctx = |op: &str, epoch: u64| ctx(op, epoch, "group/snaps");
    let snap = |op: &str, epoch: u64, id: &str, vols: &[&str]| pb::CreateGroupSnapshotRequest {
        ctx: gctx(op, epoch),
        group_id: "snaps".into(),
        snapshot_id: id.into(),
        volume_ids: vols.iter().map(|v| v.to_string()).collect(),
    };
    let first = p.create_group_snapshot(snap("snap-1", 2, "gs1", &["snap-a", "snap-b"])).await.expect("snapshot");
    let first = first.into_inner();
    let mut members = first.volume_ids.clone();
    members.sort();
    assert_eq!(members, ["snap-a", "snap-b"], "{first:?}");
    let again = p.create_group_snapshot(snap("snap-1", 2, "gs1", &["snap-a"])).await.expect("repeat").into_inner();
    assert_eq!(first, again, "a repeated op_id answers with the first outcome");
    let same = p.create_group_snapshot(snap("snap-2", 2, "gs1", &["snap-b", "snap-a"])).await.expect("same id");
    assert_eq!(same.into_inner().volume_ids.len(), 2, "the same snapshot id and volumes give the same snapshot");
    expect_code(
        p.create_group_snapshot(snap("snap-3", 2, "gs1", &["snap-a"])).await,
        Code::AlreadyExists,
        "a snapshot id taken by other volumes",
    );
    expect_code(
        p.create_group_snapshot(snap("snap-4", 1, "gs2", &["snap-a"])).await,
        Code::FailedPrecondition,
        "a stale epoch",
    );
    expect_code(
        p.create_group_snapshot(snap("snap-5", 2, "gs3", &["snap-a", "snap-a"])).await,
        Code::InvalidArgument,
        "a volume named twice",
    );
    expect_code(
        p.create_group_snapshot(snap("snap-6", 2, "gs4", &["snap-missing"])).await,
        Code::NotFound,
        "a missing volume",
    );
    let from = |op: &str, vol: &str, size: i64, snap: &str, of: &str| pb::CreateVolumeRequest {
        ctx: vctx(op, 1, vol),
        volume_id: vol.into(),
        size_bytes: size,
        snapshot_id: snap.into(),
        snapshot_volume_id: of.into(),
    };
    let made = p.create_volume(from("snap-7", "snap-c", 8 << 20, "gs1", "snap-a")).await.expect("from snapshot");
    assert_eq!(made.into_inner().size_bytes, 8 << 20, "a volume made from a snapshot may be larger");
    let made = p.create_volume(from("snap-8", "snap-c", 8 << 20, "gs1", "snap-a")).await.expect("the same again");
    assert_eq!(made.into_inner().size_bytes, 8 << 20);
    expect_code(
        p.create_volume(from("snap-9", "snap-d", 1 << 20, "gs1", "snap-a")).await,
        Code::InvalidArgument,
        "a volume smaller than its snapshot",
    );
    expect_code(
        p.create_volume(from("snap-10", "snap-d", 4 << 20, "gs-none", "snap-a")).await,
        Code::NotFound,
        "a snapshot that does not exist",
    );
    expect_code(
        p.create_volume(pb::CreateVolumeRequest {
            snapshot_id: "gs1".into(),
            ..from("snap-11", "snap-d", 4 << 20, "", "")
        })
        .await,
        Code::InvalidArgument,
        "a snapshot without the volume it is of",
    );
    let del_snap = |op: &str, id: &str| pb::DeleteSnapshotRequest { ctx: gctx(op, 2), snapshot_id: id.into() };
    expect_code(p.delete_snapshot(del_snap("snap-12", "gs1")).await, Code::FailedPrecondition, "a snapshot in use");
    let del_vol = |op: &str, vol: &str| pb::DeleteVolumeRequest { ctx: vctx(op, 1, vol), volume_id: vol.into() };
    expect_code(
        p.delete_volume(del_vol("snap-13", "snap-a")).await,
        Code::FailedPrecondition,
        "a volume with snapshots",
    );
    if caps.capabilities.iter().any(|c| c == crate::driver::capability::MANAGE_EXISTING) {
        // Snapshots taken through Drover are not part of the image handed back: the
        // orchestrator forgets a volume's snapshot records when it is unmanaged, so the
        // backend must refuse while any is there (or they would be left unknown).
        expect_code(
            p.unmanage_volume(pb::UnmanageVolumeRequest {
                ctx: vctx("snap-13b", 1, "snap-a"),
                volume_id: "snap-a".into(),
            })
            .await,
            Code::FailedPrecondition,
            "unmanaging a volume with snapshots",
        );
    }
    p.delete_volume(del_vol("snap-14", "snap-c")).await.expect("delete the volume made from it");
    p.delete_snapshot(del_snap("snap-15", "gs1")).await.expect("delete the snapshot");
    p.delete_snapshot(del_snap("snap-16", "gs1")).await.expect("a deleted snapshot counts as deleted");
    p.delete_volume(del_vol("snap-17", "snap-a")).await.expect("no snapshot holds it any more");

    // With replication: a snapshot survives syncs; the replica cannot be snapshotted.
    let enable = |role: pb::ReplicationRole, peer: &str, op: &str| pb::EnableReplicationRequest {
        ctx: gctx(op, 2),
        volume_id: "snap-b".into(),
        group_id: "snaps".into(),
        role: role as i32,
        peer: Some(pb::ReplicationPeer { backend: "conf-peer".into(), endpoint: peer.into() }),
        size_bytes: 4 << 20,
        parameters: [("sync_interval_ms".to_string(), "3600000".to_string())].into(),
    };
    s.enable_replication(enable(pb::ReplicationRole::Secondary, &pair.primary_endpoint, "snap-20")).await.unwrap();
    p.enable_replication(enable(pb::ReplicationRole::Primary, &pair.secondary_endpoint, "snap-21")).await.unwrap();
    let sync = |op: &str| pb::SyncGroupRequest {
        ctx: gctx(op, 2),
        group_id: "snaps".into(),
        r#final: false,
        peer_endpoint: String::new(),
    };
    p.sync_group(sync("snap-22")).await.expect("initial sync");
    p.create_group_snapshot(snap("snap-23", 2, "gs5", &["snap-b"])).await.expect("snapshot of a replicated volume");
    p.sync_group(sync("snap-24")).await.expect("a sync after the snapshot");
    p.sync_group(sync("snap-25")).await.expect("and another");
    p.create_volume(from("snap-26", "snap-e", 4 << 20, "gs5", "snap-b")).await.expect("the snapshot is still there");
    expect_code(
        s.create_group_snapshot(pb::CreateGroupSnapshotRequest {
            ctx: gctx("snap-27", 2),
            group_id: "snaps".into(),
            snapshot_id: "gs6".into(),
            volume_ids: vec!["snap-b".into()],
        })
        .await,
        Code::FailedPrecondition,
        "a snapshot of a replica",
    );
}
