//! The malformed-request sweep: each of more than fifty bad requests gets a clear code
//! whose message names the field, and the store is the same before and after, byte for
//! byte (audit records apart: the trail records every refusal, as it should).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_store::{EtcdStore, KvStore};
use drover_tests::{Cluster, Etcd, StoreChoice, replicated_group};
use tonic::Code;

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

/// Every key under the orchestrator's prefix but the audit trail, with its value.
async fn dump(store: &Arc<dyn KvStore>, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let (kvs, _) = store.range(prefix.as_bytes()).await.unwrap();
    kvs.into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(), kv.value))
        .filter(|(k, _)| !k.starts_with("audit-desc/"))
        // Leases and heartbeats move on their own: agent registrations and members.
        .filter(|(k, _)| !k.starts_with("agents/") && !k.starts_with("orchestrators/"))
        .collect()
}

fn ok<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_fifty_malformed_requests_are_refused_and_change_nothing() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let c = cluster.clients().await;
    let mut setup = c.clone();
    let group = replicated_group(&mut setup, "app", 1).await;
    let vol = setup
        .groups
        .get_group(pb::GetGroupRequest { group: group.clone(), project: String::new() })
        .await
        .unwrap()
        .into_inner()
        .volume_ids[0]
        .clone();
    // A group that does not replicate, for the enable and update cases.
    let plain_vol = setup
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "plain-v0".into(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    setup
        .groups
        .create_group(pb::CreateGroupRequest {
            name: "plain".into(),
            project: "tests".into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            volumes: vec![plain_vol],
            ..Default::default()
        })
        .await
        .unwrap();
    let raw: Arc<dyn KvStore> =
        Arc::new(EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap());
    let prefix = cluster.store_prefix().expect("on etcd").to_string();
    // Settle: the enable's last writes, then the dump.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = dump(&raw, &prefix).await;

    let vol_req = |name: &str, size: i64, backend: &str, project: &str| pb::CreateVolumeRequest {
        name: name.into(),
        project: project.into(),
        size_bytes: size,
        backend: backend.into(),
        ..Default::default()
    };
    let group_req = |name: &str, ty: &str, vols: Vec<String>| pb::CreateGroupRequest {
        name: name.into(),
        project: "tests".into(),
        group_type: ty.into(),
        backend: "backend-a".into(),
        volumes: vols,
        ..Default::default()
    };
    let spec = |pairs: Vec<(String, String)>| pb::CreateGroupTypeRequest {
        name: "t".into(),
        description: String::new(),
        specs: pairs.into_iter().collect(),
    };
    let enable = |target: &str, interval: i64| pb::EnableReplicationRequest {
        group: "plain".into(),
        project: "tests".into(),
        target_backend: target.into(),
        sync_interval_seconds: interval,
        ..Default::default()
    };
    let runbook = |text: &str, params: Vec<(&str, &str)>| pb::RunbookRequest {
        file_name: "rb.yaml".into(),
        text: text.into(),
        params: params.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    };
    let long = "a".repeat(65);
    let cases: Vec<(&str, Code, &str, Call)> = {
        let c = c.clone();
        let v = |c: &Clients| c.volumes.clone();
        let g = |c: &Clients| c.groups.clone();
        let r = |c: &Clients| c.replication.clone();
        let e = |c: &Clients| c.executions.clone();
        let t = |c: &Clients| c.tokens.clone();
        let s = |c: &Clients| c.sites.clone();
        let rb = |c: &Clients| c.runbooks.clone();
        let m = |c: &Clients| c.messages.clone();
        let a = |c: &Clients| c.audit.clone();
        let sn = |c: &Clients| c.snapshots.clone();
        let snap_req = |volume: &str, name: &str| pb::CreateSnapshotRequest {
            volume: volume.into(),
            project: "tests".into(),
            name: name.into(),
        };
        let uuid_name = uuid::Uuid::now_v7().to_string();
        macro_rules! case {
            ($what:expr, $code:expr, $word:expr, $client:expr, $call:ident, $req:expr) => {{
                let mut cl = $client;
                let req = $req;
                ($what, $code, $word, Box::pin(async move { ok(cl.$call(req).await) }) as Call)
            }};
        }
        use Code::{InvalidArgument as Inv, NotFound as Nf};
        vec![
            case!("empty volume name", Inv, "name", v(&c), create_volume, vol_req("", 1 << 30, "backend-a", "tests")),
            case!(
                "control character",
                Inv,
                "name",
                v(&c),
                create_volume,
                vol_req("a\u{1}b", 1 << 30, "backend-a", "tests")
            ),
            case!(
                "65-character name",
                Inv,
                "limit is 64",
                v(&c),
                create_volume,
                vol_req(&long, 1 << 30, "backend-a", "tests")
            ),
            case!(
                "path in a name",
                Inv,
                "name",
                v(&c),
                create_volume,
                vol_req("../etc", 1 << 30, "backend-a", "tests")
            ),
            case!("name like an id", Inv, "UUID", v(&c), create_volume, vol_req(&vol, 1 << 30, "backend-a", "tests")),
            case!("space in a name", Inv, "name", v(&c), create_volume, vol_req("a b", 1 << 30, "backend-a", "tests")),
            case!("zero size", Inv, "size_bytes", v(&c), create_volume, vol_req("z", 0, "backend-a", "tests")),
            case!("negative size", Inv, "size_bytes", v(&c), create_volume, vol_req("z", -512, "backend-a", "tests")),
            case!(
                "overflowing size",
                Inv,
                "64 TiB",
                v(&c),
                create_volume,
                vol_req("z", i64::MAX, "backend-a", "tests")
            ),
            case!("unaligned size", Inv, "512", v(&c), create_volume, vol_req("z", 1000, "backend-a", "tests")),
            case!("missing backend", Inv, "backend", v(&c), create_volume, vol_req("z", 1 << 30, "", "tests")),
            case!("unknown backend", Nf, "backend", v(&c), create_volume, vol_req("z", 1 << 30, "nope", "tests")),
            case!("bad project", Inv, "project", v(&c), create_volume, vol_req("z", 1 << 30, "backend-a", "a/b")),
            case!(
                "taken name",
                Code::AlreadyExists,
                "app-v0",
                v(&c),
                create_volume,
                vol_req("app-v0", 1 << 30, "backend-a", "tests")
            ),
            case!(
                "missing volume ref",
                Inv,
                "volume",
                v(&c),
                get_volume,
                pb::GetVolumeRequest { volume: String::new(), project: "tests".into() }
            ),
            case!(
                "unknown volume",
                Nf,
                "volume",
                v(&c),
                get_volume,
                pb::GetVolumeRequest { volume: "ghost".into(), project: "tests".into() }
            ),
            case!(
                "delete, no ref",
                Inv,
                "volume",
                v(&c),
                delete_volume,
                pb::DeleteVolumeRequest { volume: String::new(), project: "tests".into() }
            ),
            case!(
                "shrink",
                Inv,
                "size",
                v(&c),
                extend_volume,
                pb::ExtendVolumeRequest { volume: vol.clone(), project: "tests".into(), new_size_bytes: 1 << 20 }
            ),
            case!(
                "extend unaligned",
                Inv,
                "512",
                v(&c),
                extend_volume,
                pb::ExtendVolumeRequest { volume: vol.clone(), project: "tests".into(), new_size_bytes: (2 << 30) + 1 }
            ),
            case!(
                "attach unknown",
                Nf,
                "volume",
                v(&c),
                attach_volume,
                pb::AttachVolumeRequest { volume: "ghost".into(), project: "tests".into() }
            ),
            case!(
                "manage traversal",
                Inv,
                "reference",
                v(&c),
                manage_volume,
                pb::ManageVolumeRequest {
                    name: "m".into(),
                    project: "tests".into(),
                    backend: "backend-a".into(),
                    reference: "../../etc/passwd".into(),
                    ..Default::default()
                }
            ),
            case!(
                "manage dotfile",
                Inv,
                "reference",
                v(&c),
                manage_volume,
                pb::ManageVolumeRequest {
                    name: "m".into(),
                    project: "tests".into(),
                    backend: "backend-a".into(),
                    reference: ".hidden".into(),
                    ..Default::default()
                }
            ),
            case!(
                "manage no ref",
                Inv,
                "reference",
                v(&c),
                manage_volume,
                pb::ManageVolumeRequest {
                    name: "m".into(),
                    project: "tests".into(),
                    backend: "backend-a".into(),
                    reference: String::new(),
                    ..Default::default()
                }
            ),
            case!(
                "list limit",
                Inv,
                "limit",
                v(&c),
                list_volumes,
                pb::ListVolumesRequest { limit: 5000, ..Default::default() }
            ),
            case!(
                "list marker",
                Inv,
                "marker",
                v(&c),
                list_volumes,
                pb::ListVolumesRequest { marker: "\u{0}".into(), ..Default::default() }
            ),
            case!(
                "list bad project",
                Inv,
                "project",
                v(&c),
                list_volumes,
                pb::ListVolumesRequest { project: "../x".into(), ..Default::default() }
            ),
            case!("empty group name", Inv, "name", g(&c), create_group, group_req("", "replication", vec![])),
            case!("group name like id", Inv, "UUID", g(&c), create_group, group_req(&group, "replication", vec![])),
            case!("unknown group type", Nf, "group type", g(&c), create_group, group_req("g2", "nope", vec![])),
            case!(
                "ghost member",
                Nf,
                "ghost",
                g(&c),
                create_group,
                group_req("g2", "replication", vec!["ghost".into()])
            ),
            case!(
                "group list limit",
                Inv,
                "limit",
                g(&c),
                list_groups,
                pb::ListGroupsRequest { limit: 1001, ..Default::default() }
            ),
            case!(
                "tier out of range",
                Inv,
                "tier",
                g(&c),
                update_group,
                pb::UpdateGroupRequest { group: "app".into(), project: "tests".into(), tier: 99, ..Default::default() }
            ),
            case!(
                "bad label",
                Inv,
                "label",
                g(&c),
                update_group,
                pb::UpdateGroupRequest {
                    group: "app".into(),
                    project: "tests".into(),
                    set_labels: [("bad key!".to_string(), "v".to_string())].into(),
                    ..Default::default()
                }
            ),
            case!(
                "empty update",
                Inv,
                "nothing to update",
                g(&c),
                update_group,
                pb::UpdateGroupRequest { group: "plain".into(), project: "tests".into(), ..Default::default() }
            ),
            case!(
                "unknown spec key",
                Inv,
                "colour",
                g(&c),
                create_group_type,
                spec(vec![("colour".into(), "blue".into())])
            ),
            case!(
                "boolean spec maybe",
                Inv,
                "maybe",
                g(&c),
                create_group_type,
                spec(vec![("group_replication_enabled".into(), "maybe".into())])
            ),
            case!(
                "huge spec map",
                Inv,
                "at most 64",
                g(&c),
                create_group_type,
                spec((0..20_000).map(|i| (format!("x:{i}"), "v".to_string())).collect())
            ),
            case!(
                "bad type name",
                Inv,
                "name",
                g(&c),
                create_group_type,
                pb::CreateGroupTypeRequest { name: "a b".into(), ..Default::default() }
            ),
            case!(
                "negative interval",
                Inv,
                "sync_interval_seconds",
                r(&c),
                enable_replication,
                enable("backend-b", -5)
            ),
            case!("interval over a day", Inv, "over a day", r(&c), enable_replication, enable("backend-b", 100_000)),
            case!("unknown target", Nf, "backend", r(&c), enable_replication, enable("nope", 0)),
            case!("target at the same site", Inv, "site", r(&c), enable_replication, enable("backend-a", 0)),
            case!(
                "failover, no group",
                Inv,
                "group",
                r(&c),
                failover_group,
                pb::FailoverGroupRequest {
                    project: "tests".into(),
                    target_backend: "backend-b".into(),
                    ..Default::default()
                }
            ),
            case!(
                "failover unknown target",
                Inv,
                "replication target",
                r(&c),
                failover_group,
                pb::FailoverGroupRequest {
                    group: "app".into(),
                    project: "tests".into(),
                    target_backend: "nope".into(),
                    ..Default::default()
                }
            ),
            case!(
                "sync unknown group",
                Nf,
                "group",
                r(&c),
                sync_group,
                pb::SyncGroupRequest { group: "ghost".into(), project: "tests".into(), ..Default::default() }
            ),
            case!(
                "unknown status",
                Inv,
                "status",
                e(&c),
                list_executions,
                pb::ListExecutionsRequest { status: "bogus".into(), ..Default::default() }
            ),
            case!(
                "execution list limit",
                Inv,
                "limit",
                e(&c),
                list_executions,
                pb::ListExecutionsRequest { limit: 1001, ..Default::default() }
            ),
            case!("execution, no id", Inv, "id", e(&c), get_execution, pb::GetExecutionRequest { id: String::new() }),
            case!(
                "cancel, no id",
                Inv,
                "id",
                e(&c),
                cancel_execution,
                pb::CancelExecutionRequest { id: String::new() }
            ),
            case!("decide, no id", Inv, "id", e(&c), decide_prompt, pb::DecidePromptRequest::default()),
            case!(
                "report format",
                Inv,
                "format",
                e(&c),
                get_execution_report,
                pb::GetExecutionReportRequest { id: "x".into(), format: "pdf".into() }
            ),
            case!(
                "token role",
                Inv,
                "role",
                t(&c),
                create_token,
                pb::CreateTokenRequest { name: "n".into(), project: "tests".into(), role: "root".into() }
            ),
            case!(
                "token project",
                Inv,
                "project",
                t(&c),
                create_token,
                pb::CreateTokenRequest { name: "n".into(), project: "a b".into(), role: "member".into() }
            ),
            case!("revoke bad id", Inv, "id", t(&c), revoke_token, pb::RevokeTokenRequest { id: "zz".into() }),
            case!(
                "audit limit",
                Inv,
                "limit",
                a(&c),
                list_audit,
                pb::ListAuditRequest { limit: 5000, ..Default::default() }
            ),
            case!(
                "site name",
                Inv,
                "name",
                s(&c),
                create_site,
                pb::CreateSiteRequest { name: "a/b".into(), description: String::new() }
            ),
            case!(
                "freeze unknown",
                Nf,
                "backend",
                s(&c),
                freeze_backend,
                pb::FreezeBackendRequest { name: "nope".into() }
            ),
            case!("runbook YAML", Inv, "rb.yaml", rb(&c), validate_runbook, runbook("name: x\nsteps: [", vec![])),
            case!(
                "runbook unknown key",
                Inv,
                "rb.yaml",
                rb(&c),
                validate_runbook,
                runbook("name: x\nbogus: 1\nsteps: []\n", vec![])
            ),
            case!(
                "runbook unknown param",
                Inv,
                "nope",
                rb(&c),
                validate_runbook,
                runbook("name: x\nsteps: []\n", vec![("nope", "1")])
            ),
            case!(
                "message id path",
                Inv,
                "id",
                m(&c),
                get_message,
                pb::GetMessageRequest { id: "a/b".into(), project: String::new() }
            ),
            case!(
                "messages project",
                Inv,
                "project",
                m(&c),
                list_messages,
                pb::ListMessagesRequest { project: "a b".into(), ..Default::default() }
            ),
            case!("snapshot without a name", Inv, "name", sn(&c), create_snapshot, snap_req(&vol, "")),
            case!("snapshot with a UUID name", Inv, "name", sn(&c), create_snapshot, snap_req(&vol, &uuid_name)),
            case!("snapshot of a missing volume", Nf, "volume", sn(&c), create_snapshot, snap_req("nope", "s")),
            case!(
                "snapshot of a missing group",
                Nf,
                "group",
                sn(&c),
                create_group_snapshot,
                pb::CreateGroupSnapshotRequest { group: "nope".into(), project: "tests".into(), name: "s".into() }
            ),
            case!(
                "missing snapshot",
                Nf,
                "snapshot",
                sn(&c),
                get_snapshot,
                pb::GetSnapshotRequest { snapshot: "nope".into(), project: "tests".into() }
            ),
            case!(
                "delete a missing snapshot",
                Nf,
                "snapshot",
                sn(&c),
                delete_snapshot,
                pb::DeleteSnapshotRequest { snapshot: "nope".into(), project: "tests".into() }
            ),
            case!(
                "snapshots of a bad project",
                Inv,
                "project",
                sn(&c),
                list_snapshots,
                pb::ListSnapshotsRequest { project: "a b".into(), ..Default::default() }
            ),
            case!(
                "snapshots page too large",
                Inv,
                "limit",
                sn(&c),
                list_snapshots,
                pb::ListSnapshotsRequest { project: "tests".into(), limit: 5000, ..Default::default() }
            ),
            case!(
                "volume from a missing snapshot",
                Nf,
                "snapshot",
                v(&c),
                create_volume,
                pb::CreateVolumeRequest { from_snapshot: "nope".into(), ..vol_req("fs", 0, "", "tests") }
            ),
            case!(
                "from_volume without a snapshot",
                Inv,
                "from_volume",
                v(&c),
                create_volume,
                pb::CreateVolumeRequest { from_volume: "x".into(), ..vol_req("fs", 1 << 30, "backend-a", "tests") }
            ),
            case!(
                "group from a missing snapshot",
                Nf,
                "snapshot",
                g(&c),
                create_group,
                pb::CreateGroupRequest { from_group_snapshot: "nope".into(), ..group_req("fg", "replication", vec![]) }
            ),
            case!(
                "group from a snapshot and volumes",
                Inv,
                "volumes",
                g(&c),
                create_group,
                pb::CreateGroupRequest {
                    from_group_snapshot: "nope".into(),
                    ..group_req("fg", "replication", vec![vol.clone()])
                }
            ),
        ]
    };
    let mut failures = Vec::new();
    let n = cases.len();
    for (what, code, word, call) in cases {
        match call.await {
            Ok(()) => failures.push(format!("{what}: accepted")),
            Err(s) if s.code() != code => {
                failures.push(format!("{what}: {:?} ({}) instead of {code:?}", s.code(), s.message()))
            }
            Err(s) if !s.message().contains(word) => {
                failures.push(format!("{what}: {:?} does not name {word:?}", s.message()))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{} of {n} cases wrong:\n{}", failures.len(), failures.join("\n"));
    assert!(n > 50, "{n} cases");
    assert_eq!(dump(&raw, &prefix).await, before, "the store changed");
}
