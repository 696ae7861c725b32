//! Tokens, roles, projects and the audit trail, against a real orchestrator and agents.

use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::cluster::admin_token;
use drover_tests::{Cluster, StoreChoice, failover_request, replicated_group};
use tonic::Code;

/// An empty protobuf message: every request decodes from it, every reply into it.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// A channel to the orchestrator at `endpoint`, checked against the CA made in `dir`,
/// presenting no certificate (as a user does).
async fn channel(endpoint: &str, dir: &std::path::Path) -> tonic::transport::Channel {
    let tls = drover_proto::tls::user_client(&drover_tests::cluster::ca_file(dir)).unwrap();
    connect_with(endpoint, tls).await
}

/// A channel to the orchestrator presenting the agent certificate made in `dir`.
async fn agent_channel(endpoint: &str, dir: &std::path::Path) -> tonic::transport::Channel {
    let files = drover_proto::tls::TlsFiles {
        ca: drover_tests::cluster::ca_file(dir),
        cert: dir.join("certs/agent-agent.pem"),
        key: dir.join("certs/agent-agent.key"),
    };
    connect_with(endpoint, files.client(drover_proto::tls::ORCHESTRATOR_NAME).unwrap()).await
}

async fn connect_with(endpoint: &str, tls: tonic::transport::ClientTlsConfig) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls `/drover.v1.SERVICE/METHOD` with an empty request and `token`; the status code.
async fn call(cluster: &Cluster, service: &str, method: &str, token: Option<&str>) -> Code {
    call_on(channel(&cluster.orchestrator.endpoint, cluster.dir.path()).await, service, method, token).await
}

async fn call_on(channel: tonic::transport::Channel, service: &str, method: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(Empty {});
    req.metadata_mut().insert(drover_proto::API_VERSION_HEADER, drover_proto::API_VERSION.parse().unwrap());
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let path = format!("/drover.v1.{service}/{method}").parse().unwrap();
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    match grpc.unary(req, path, codec).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn token(c: &mut Clients, name: &str, project: &str, role: &str) -> (String, String) {
    let t = c
        .tokens
        .create_token(pb::CreateTokenRequest { name: name.into(), project: project.into(), role: role.into() })
        .await
        .unwrap()
        .into_inner();
    (t.token.unwrap().id, t.secret)
}

async fn as_token(cluster: &Cluster, secret: &str) -> Clients {
    let ca = drover_tests::cluster::ca_file(cluster.dir.path());
    Clients::connect(&cluster.orchestrator.endpoint, Duration::from_secs(60), Some(secret), Some(&ca)).await.unwrap()
}

/// Every RPC of drover.v1 for no token, a garbage token, a revoked token, a reader, a
/// member and an admin: the role gate answers as its rule says, for every method. (The
/// per-project cells are in `tenants_see_and_touch_only_their_project`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_each_kind_of_caller_as_its_rule_says() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut admin = cluster.clients().await;
    let (_, reader) = token(&mut admin, "r", "tests", "reader").await;
    let (_, member) = token(&mut admin, "m", "tests", "member").await;
    let (revoked_id, revoked) = token(&mut admin, "gone", "tests", "member").await;
    admin.tokens.revoke_token(pb::RevokeTokenRequest { id: revoked_id }).await.unwrap();
    let admin_secret = admin_token(cluster.dir.path());
    let garbage = "drv_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let rules = drover_orchestrator::auth::RULES;
    let denied = [Code::Unauthenticated, Code::PermissionDenied];
    let mut checked = 0;
    // Revocation is seen within the token cache TTL (2 s by default).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for path in drover_orchestrator::auth::api_methods() {
        let (service, method) = path.trim_start_matches("/drover.v1.").split_once('/').unwrap();
        let (service, method) = (service.to_string(), method.to_string());
        let rule = rules.iter().find(|(p, _)| *p == path).map(|(_, r)| r.need);
        let rule = rule.unwrap_or_else(|| panic!("{path} has no authorization rule"));
        use drover_orchestrator::auth::{Need, Role};
        // Calls that act, made by an admin with an empty request: refused as invalid input
        // or not found, never as unauthorised. Skip the few an empty request would really
        // perform for the admin (they are covered by their own tests).
        let skip_admin = matches!(method.as_str(), "CreateToken" | "RevokeToken");
        match rule {
            Need::Public => {
                for t in [None, Some(garbage), Some(revoked.as_str()), Some(reader.as_str())] {
                    let code = call(&cluster, &service, &method, t).await;
                    assert!(!denied.contains(&code), "{path} is open to everyone, got {code:?}");
                }
            }
            Need::Agent => {
                // Only a client certificate of the agent role; no token stands in for it.
                for t in [None, Some(admin_secret.as_str())] {
                    assert_eq!(call(&cluster, &service, &method, t).await, Code::PermissionDenied, "{path}, {t:?}");
                }
                let as_agent = agent_channel(&cluster.orchestrator.endpoint, cluster.dir.path()).await;
                let code = call_on(as_agent, &service, &method, None).await;
                assert!(!denied.contains(&code), "{path} as an agent, got {code:?}");
            }
            Need::Role(need) => {
                assert_eq!(call(&cluster, &service, &method, None).await, Code::Unauthenticated, "{path}, no token");
                assert_eq!(
                    call(&cluster, &service, &method, Some(garbage)).await,
                    Code::Unauthenticated,
                    "{path}, garbage"
                );
                assert_eq!(
                    call(&cluster, &service, &method, Some(&revoked)).await,
                    Code::Unauthenticated,
                    "{path}, revoked token"
                );
                for (role, secret) in [(Role::Reader, &reader), (Role::Member, &member)] {
                    let code = call(&cluster, &service, &method, Some(secret)).await;
                    if role >= need {
                        assert!(!denied.contains(&code), "{path} as {role:?} is allowed, got {code:?}");
                    } else {
                        assert_eq!(code, Code::PermissionDenied, "{path} as {role:?}");
                    }
                }
                if !skip_admin {
                    let code = call(&cluster, &service, &method, Some(&admin_secret)).await;
                    assert!(!denied.contains(&code), "{path} as admin, got {code:?}");
                }
            }
        }
        checked += 1;
    }
    assert!(checked > 50, "checked {checked} RPCs");
}

/// A member of project A works on its own groups and sees nothing of project B's: every
/// lookup of B's group, volume and executions by id is NotFound, lists hold only A's, and
/// naming B is refused. A reader may read but not act; a member may not force a failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_touch_only_their_project() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut admin = cluster.clients().await;
    let group_a = replicated_group(&mut admin, "mine", 1).await;
    let group_b = drover_tests::replicated_group_in(&mut admin, "other", "theirs", 1).await;
    let vol_b = admin
        .groups
        .get_group(pb::GetGroupRequest { group: group_b.clone(), project: String::new() })
        .await
        .unwrap()
        .into_inner()
        .volume_ids[0]
        .clone();
    let (_, member) = token(&mut admin, "member-tests", "tests", "member").await;
    let (_, reader) = token(&mut admin, "reader-tests", "tests", "reader").await;
    let mut m = as_token(&cluster, &member).await;
    let mut r = as_token(&cluster, &reader).await;

    // B's group and volume do not exist for A, by id, with or without a project named.
    for project in ["", "tests"] {
        let s = m.groups.get_group(pb::GetGroupRequest { group: group_b.clone(), project: project.into() }).await;
        assert_eq!(s.unwrap_err().code(), Code::NotFound, "group of B by id (project {project:?})");
        let s = m.volumes.get_volume(pb::GetVolumeRequest { volume: vol_b.clone(), project: project.into() }).await;
        assert_eq!(s.unwrap_err().code(), Code::NotFound, "volume of B by id");
        let s = m
            .replication
            .failover_group(pb::FailoverGroupRequest {
                group: group_b.clone(),
                project: project.into(),
                target_backend: "backend-b".into(),
                ..Default::default()
            })
            .await;
        assert_eq!(s.unwrap_err().code(), Code::NotFound, "failover of B's group");
    }
    // Naming B is refused; lists with no project hold only A's records.
    let s = m.groups.list_groups(pb::ListGroupsRequest { project: "other".into(), ..Default::default() }).await;
    assert_eq!(s.unwrap_err().code(), Code::PermissionDenied);
    let groups = m
        .groups
        .list_groups(pb::ListGroupsRequest { project: String::new(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(groups.groups.iter().map(|g| g.id.clone()).collect::<Vec<_>>(), vec![group_a.clone()]);
    let vols = m
        .volumes
        .list_volumes(pb::ListVolumesRequest { project: String::new(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(vols.volumes.iter().all(|v| v.project == "tests") && !vols.volumes.is_empty());
    // The admin's view of the backends names agents; a tenant's does not.
    let b = m.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
    assert!(b.agents.is_empty() && b.status == "up", "{b:?}");
    let b = admin.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
    assert!(!b.agents.is_empty());

    // A reader reads its group but may not fail it over.
    r.groups.get_group(pb::GetGroupRequest { group: group_a.clone(), project: String::new() }).await.unwrap();
    let s = r.replication.failover_group(failover_request(&group_a, "backend-b", false)).await;
    assert_eq!(s.unwrap_err().code(), Code::PermissionDenied);
    // A member may not force (disaster) a failover.
    let s = m.replication.failover_group(failover_request(&group_a, "backend-b", true)).await;
    let s = s.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("admin"), "{}", s.message());

    // Once an admin allows it for the project, the member may (checked below, after the
    // planned moves); another project's policy does not count.
    let p = admin
        .projects
        .set_project_policy(pb::ProjectPolicy { project: "other".into(), allow_member_disaster_failover: true })
        .await
        .unwrap()
        .into_inner();
    assert!(p.allow_member_disaster_failover);
    let s = m.replication.failover_group(failover_request(&group_a, "backend-b", true)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let s = m
        .projects
        .set_project_policy(pb::ProjectPolicy { project: "tests".into(), allow_member_disaster_failover: true })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "a member cannot allow itself");

    // The member fails its own group over and back (planned).
    let out = m.replication.failover_group(failover_request(&group_a, "backend-b", false)).await.unwrap().into_inner();
    let g = out.group.expect("the group");
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"), "{g:?}");
    let back = m.replication.failover_group(failover_request(&group_a, "default", false)).await.unwrap().into_inner();
    let g = back.group.expect("the group");
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("enabled", "backend-a"), "{g:?}");

    // With the project allowed, the member's disaster failover runs.
    admin
        .projects
        .set_project_policy(pb::ProjectPolicy { project: "tests".into(), allow_member_disaster_failover: true })
        .await
        .unwrap();
    let shown = m.projects.get_project_policy(pb::GetProjectPolicyRequest::default()).await.unwrap().into_inner();
    assert_eq!((shown.project.as_str(), shown.allow_member_disaster_failover), ("tests", true));
    let forced =
        m.replication.failover_group(failover_request(&group_a, "backend-b", true)).await.unwrap().into_inner();
    assert_eq!(forced.group.unwrap().active_backend, "backend-b");

    // Executions: the member sees its own and none of B's, which the admin made.
    let own = m.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
    assert!(!own.executions.is_empty() && own.executions.iter().all(|e| e.project == "tests"), "{own:?}");
    let all = admin.executions.list_executions(pb::ListExecutionsRequest::default()).await.unwrap().into_inner();
    let theirs: Vec<_> = all.executions.iter().filter(|e| e.project == "other").collect();
    assert!(!theirs.is_empty(), "B's enable ran as an execution of B");
    for e in theirs {
        let s = m.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await;
        assert_eq!(s.unwrap_err().code(), Code::NotFound, "B's execution {}", e.id);
        let s = m.executions.cancel_execution(pb::CancelExecutionRequest { id: e.id.clone() }).await;
        assert_eq!(s.unwrap_err().code(), Code::NotFound);
    }
    // B's group did not move.
    let g = admin.groups.get_group(pb::GetGroupRequest { group: group_b, project: String::new() }).await.unwrap();
    assert_eq!(g.into_inner().active_backend, "backend-a");
}

/// Every mutating call leaves an audit record naming who, what and the outcome; refused
/// ones too. A revoked token stops working; the bootstrap token file is private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_audited_and_tokens_can_be_revoked() {
    use std::os::unix::fs::PermissionsExt;
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mode = std::fs::metadata(drover_tests::cluster::token_file(cluster.dir.path())).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the bootstrap token is readable by its owner only");
    let mut admin = cluster.clients().await;
    let (member_id, member) = token(&mut admin, "m", "tests", "member").await;
    let mut m = as_token(&cluster, &member).await;
    let created = m
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "audited".into(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let refused = m.sites.freeze_backend(pb::FreezeBackendRequest { name: "backend-a".into() }).await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let invalid = m
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "bad name".into(),
            project: "tests".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(invalid.unwrap_err().code(), Code::InvalidArgument);

    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r = admin
            .audit
            .list_audit(pb::ListAuditRequest { token_id: member_id.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner()
            .records;
        if r.len() >= 3 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |method: &str, code: &str| {
        records.iter().find(|a| a.method.ends_with(method) && a.code == code).unwrap_or_else(|| {
            panic!("no audit record of {method} with {code}: {records:#?}");
        })
    };
    let ok = find("/CreateVolume", "Ok");
    assert_eq!((ok.project.as_str(), ok.role.as_str()), ("tests", "member"));
    assert!(ok.peer.starts_with("127.0.0.1:"), "{ok:?}");
    assert!(find("/FreezeBackend", "PermissionDenied").message.contains("admin"));
    assert!(find("/CreateVolume", "InvalidArgument").message.contains("name"));
    // Reads leave none.
    assert!(records.iter().all(|a| !a.method.contains("/Get") && !a.method.contains("/List")), "{records:#?}");
    // Calls with no valid token are recorded too, under no token id.
    let anon = call(&cluster, "VolumeService", "DeleteVolume", None).await;
    assert_eq!(anon, Code::Unauthenticated);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin
            .audit
            .list_audit(pb::ListAuditRequest {
                refused_only: true,
                method: "DeleteVolume".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .records;
        if r.iter().any(|a| a.code == "Unauthenticated" && a.token_id.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no record of the anonymous call: {r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paging: one record per page, pages do not overlap.
    let p1 =
        admin.audit.list_audit(pb::ListAuditRequest { limit: 1, ..Default::default() }).await.unwrap().into_inner();
    let p2 = admin
        .audit
        .list_audit(pb::ListAuditRequest { limit: 1, marker: p1.next_marker.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p1.records.len(), p2.records.len()), (1, 1));
    assert_ne!(p1.records[0].id, p2.records[0].id);
    assert!(p1.records[0].id > p2.records[0].id, "newest first");
    // The CLI: refused calls, two to a page, newest first, with a marker to go on from;
    // an accepted call newer than all of them is not among them.
    m.volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "accepted-last".into(),
            project: "tests".into(),
            size_bytes: 1 << 20,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .expect("an accepted call");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let newest =
            admin.audit.list_audit(pb::ListAuditRequest { limit: 1, ..Default::default() }).await.unwrap().into_inner();
        if newest.records.first().is_some_and(|a| a.method.ends_with("/CreateVolume") && a.code == "Ok") {
            break;
        }
        assert!(Instant::now() < deadline, "no record of the accepted call: {newest:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cluster.cli(&["audit", "list", "--refused", "--limit", "2", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = page["records"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{page}");
    assert!(rows.iter().all(|r| r["code"] != "Ok"), "{page}");
    assert!(rows[0]["id"].as_str() > rows[1]["id"].as_str(), "{page}");
    assert!(!page["next_marker"].as_str().unwrap().is_empty(), "three refused calls so far: {page}");

    // Listing never shows a secret; revoking stops the token (within the cache TTL).
    let list = admin.tokens.list_tokens(pb::ListTokensRequest::default()).await.unwrap().into_inner();
    assert!(format!("{list:?}").find(&member[20..]).is_none(), "a secret in the list");
    admin.tokens.revoke_token(pb::RevokeTokenRequest { id: member_id }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = m.volumes.get_volume(pb::GetVolumeRequest { volume: created.id, project: String::new() }).await;
    let s = s.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("revoked"), "{}", s.message());
}

/// A request body of the wrong shape for its method: field 1 of CreateVolumeRequest is a
/// string; these send a number, and bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongWireType {
    #[prost(uint64, tag = "1")]
    name: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn raw<M: prost::Message + Default + Send + Sync + 'static>(
    cluster: &Cluster,
    token: &str,
    msg: M,
) -> tonic::Status {
    let channel = channel(&cluster.orchestrator.endpoint, cluster.dir.path()).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(drover_proto::API_VERSION_HEADER, drover_proto::API_VERSION.parse().unwrap());
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let path = "/drover.v1.VolumeService/CreateVolume".parse().unwrap();
    let codec = tonic_prost::ProstCodec::<M, Empty>::default();
    grpc.unary(req, path, codec).await.expect_err("a malformed request is refused")
}

/// Findings of the malformed-request sweep: each is InvalidArgument naming the problem,
/// and the store does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_invalid_arguments_and_change_nothing() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "app", 1).await;
    let before = drover_tests::state_snapshot(&mut c).await;
    let token = admin_token(cluster.dir.path());

    for s in [
        raw(&cluster, &token, WrongWireType { name: 7 }).await,
        raw(&cluster, &token, NotUtf8 { name: vec![0xff, 0xfe] }).await,
    ] {
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(s.message().contains("not a valid message"), "{}", s.message());
    }
    // A name shaped like an id (another volume's, here the group's) would shadow it.
    let s = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: group.clone(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("UUID"), "{}", s.message());
    let s = c
        .groups
        .create_group(pb::CreateGroupRequest {
            name: uuid::Uuid::now_v7().to_string(),
            project: "tests".into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            volumes: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // An invalid project name on a list is an error, not an empty list.
    for project in ["bad project", "../etc", "x\u{7}"] {
        let s = c
            .groups
            .list_groups(pb::ListGroupsRequest { project: project.into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "groups, {project:?}");
        assert!(s.message().contains("project"), "{}", s.message());
        let s = c
            .volumes
            .list_volumes(pb::ListVolumesRequest { project: project.into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "volumes, {project:?}");
    }
    // Group-type specs: an unknown key, `maybe` for a boolean, a 20,000-entry map.
    let types_before = c.groups.list_group_types(pb::ListGroupTypesRequest {}).await.unwrap().into_inner();
    let spec = |pairs: Vec<(String, String)>| pb::CreateGroupTypeRequest {
        name: "custom".into(),
        description: String::new(),
        specs: pairs.into_iter().collect(),
    };
    for (req, word) in [
        (spec(vec![("colour".into(), "blue".into())]), "colour"),
        (spec(vec![("group_replication_enabled".into(), "maybe".into())]), "maybe"),
        (spec((0..20_000).map(|i| (format!("x:{i}"), "v".into())).collect()), "at most 64"),
        (spec(vec![("x:a\u{7}".into(), "v".into())]), "printable"),
    ] {
        let s = c.groups.create_group_type(req).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
        assert!(s.message().contains(word), "{:?} does not name {word:?}", s.message());
    }
    // A scoped key for other tools and a boolean spec written out are accepted.
    let ok = spec(vec![
        ("capabilities:tier".into(), "gold".into()),
        ("group_replication_enabled".into(), "<is> False".into()),
    ]);
    let made = c.groups.create_group_type(ok).await.unwrap().into_inner();
    let types_after = c.groups.list_group_types(pb::ListGroupTypesRequest {}).await.unwrap().into_inner();
    assert_eq!(
        types_after.group_types.len(),
        types_before.group_types.len() + 1,
        "only the valid type was made: {made:?}"
    );
    assert_eq!(drover_tests::state_snapshot(&mut c).await, before, "nothing changed");
}

/// A channel presenting `name`.pem of the certificate directory `certs`, expecting a
/// server of role `peer`.
async fn channel_as(
    endpoint: &str,
    certs: &std::path::Path,
    name: &str,
    peer: &str,
) -> Result<tonic::transport::Channel, String> {
    let files = drover_proto::tls::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{name}.pem")),
        key: certs.join(format!("{name}.key")),
    };
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .tls_config(files.client(peer).unwrap())
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// The attacks of issue 13 on agents and registration, with TLS on: a promote straight to
/// the secondary agent, a recovery point applied to it, and a registration under the
/// real agent's id, from every kind of caller that is not entitled. Each is refused and
/// nothing changes on either agent or in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_on_agents_and_registration_are_refused() {
    use drover_proto::agent::v1 as apb;
    use drover_proto::tls::{AGENT_NAME, ORCHESTRATOR_NAME};
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    let group = replicated_group(&mut c, "app", 1).await;
    let g = c.groups.get_group(pb::GetGroupRequest { group: group.clone(), project: String::new() }).await.unwrap();
    let (volume, epoch) = {
        let g = g.into_inner();
        (g.volume_ids[0].clone(), g.epoch)
    };
    let before = drover_tests::state_snapshot(&mut c).await;
    let dir = cluster.dir.path();
    let certs = dir.join("certs");
    let secondary = cluster.agents[1].endpoint.clone();
    let promote = || apb::PromoteVolumeRequest {
        ctx: Some(apb::OpContext {
            op_id: "evil-promote".into(),
            epoch: epoch + 1,
            fence_scope: format!("group/{group}"),
        }),
        volume_id: volume.clone(),
        force: true,
    };

    // 1. PromoteVolume straight to the secondary: in plain text, with no certificate,
    // with a certificate of another CA: no TLS session; with an agent certificate: refused.
    let plain = secondary.replace("https://", "http://");
    let plain = tonic::transport::Endpoint::from_shared(plain).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = apb::agent_client::AgentClient::new(ch).promote_volume(promote()).await;
        assert!(r.is_err(), "a plain-text promote was answered: {r:?}");
    }
    let anonymous = drover_proto::tls::user_client(&certs.join("ca.pem")).unwrap().domain_name(AGENT_NAME);
    let anonymous = tonic::transport::Endpoint::from_shared(secondary.clone()).unwrap().tls_config(anonymous).unwrap();
    if let Ok(ch) = anonymous.connect().await {
        let r = apb::agent_client::AgentClient::new(ch).promote_volume(promote()).await;
        assert!(r.is_err(), "a promote without a client certificate was answered: {r:?}");
    }
    let other_ca = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&cluster.bin)
        .args(["certs", "init"])
        .arg(other_ca.path().join("c"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let foreign = channel_as(&secondary, &other_ca.path().join("c"), "orchestrator", AGENT_NAME).await;
    if let Ok(ch) = foreign {
        let r = apb::agent_client::AgentClient::new(ch).promote_volume(promote()).await;
        assert!(r.is_err(), "a promote with another CA's orchestrator certificate was answered: {r:?}");
    }
    let as_agent = channel_as(&secondary, &certs, "agent-spare", AGENT_NAME).await.expect("an agent may connect");
    let s = apb::agent_client::AgentClient::new(as_agent.clone()).promote_volume(promote()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let s = apb::agent_client::AgentClient::new(as_agent)
        .fence(apb::FenceRequest {
            ctx: Some(apb::OpContext { op_id: String::new(), epoch: 1 << 50, fence_scope: format!("group/{group}") }),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "a peer agent may not raise a fence: {}", s.message());

    // 2. A recovery point applied to the secondary by the orchestrator's certificate (not
    // a peer agent's): refused before the stream is read.
    let as_orchestrator = drover_tests::cluster::agent_channel(&secondary, dir).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    let s = apb::replica_client::ReplicaClient::new(as_orchestrator)
        .apply_recovery_point(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());

    // 3. A registration under the real agent's id with another agent certificate, and
    // one with no certificate at all.
    let register = || pb::RegisterAgentRequest {
        agent_id: "agent-backend-a".into(),
        site: "site-a".into(),
        backend: "backend-a".into(),
        endpoint: "https://127.0.0.1:9".into(),
        driver: "mock".into(),
        ..Default::default()
    };
    let with_version = |r: pb::RegisterAgentRequest| {
        let mut r = tonic::Request::new(r);
        r.metadata_mut().insert(drover_proto::API_VERSION_HEADER, drover_proto::API_VERSION.parse().unwrap());
        r
    };
    let spare = channel_as(&cluster.orchestrator.endpoint, &certs, "agent-spare", ORCHESTRATOR_NAME).await.unwrap();
    let s = pb::agent_registry_client::AgentRegistryClient::new(spare)
        .register_agent(with_version(register()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(s.message().contains("bound to another certificate"), "{}", s.message());
    let s = pb::agent_registry_client::AgentRegistryClient::new(channel(&cluster.orchestrator.endpoint, dir).await)
        .register_agent(with_version(register()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());

    // 4. The CLI without a token is refused, and says how to pass one.
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&cluster.bin)
        .args(["group", "list", "--endpoint", &cluster.orchestrator.endpoint, "--project", "tests"])
        .env("DROVER_CA_FILE", certs.join("ca.pem"))
        .env_remove("DROVER_TOKEN")
        .env_remove("DROVER_TOKEN_FILE")
        .env("HOME", home.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Unauthenticated") && err.contains("--token-file"), "{err}");

    // Nothing changed: the store, the roles on both agents, and backend-a is up.
    assert_eq!(drover_tests::state_snapshot(&mut c).await, before);
    for (i, want) in [(0, apb::ReplicationRole::Primary), (1, apb::ReplicationRole::Secondary)] {
        let mut a = drover_tests::cluster::agent_client(&cluster.agents[i].endpoint, dir).await;
        let info = a
            .get_replication_info(apb::GetReplicationInfoRequest { volume_id: volume.clone(), estimate_pending: false })
            .await
            .unwrap();
        assert_eq!(info.into_inner().role, want as i32, "agent {i}");
    }
    let b = c.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
    assert_eq!(b.status, "up");
    assert!(b.agents.iter().all(|a| a.endpoint != "https://127.0.0.1:9"), "{b:?}");
    // The group still fails over: no fence moved.
    let out = c.replication.failover_group(failover_request(&group, "backend-b", false)).await.unwrap().into_inner();
    assert_eq!(out.group.unwrap().active_backend, "backend-b");
}

/// A tenant's mutating calls are rate limited per project (admins are not), with a
/// ResourceExhausted that says when to retry; and a project with its maximum of running
/// executions gets ResourceExhausted for its next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_rate_limited_and_bounded_in_running_executions() {
    let cluster = Cluster::start_custom(
        StoreChoice::Embedded,
        "mock",
        &["--set", "mock.latency=2s"],
        &[
            "--set",
            "auth.tenant_mutation_burst=5",
            "--set",
            "auth.tenant_mutations_per_second=1",
            "--set",
            "auth.tenant_max_running_executions=1",
        ],
    )
    .await;
    let mut admin = cluster.clients().await;
    let (_, member) = token(&mut admin, "m", "tests", "member").await;
    let mut m = as_token(&cluster, &member).await;
    let bad = || pb::CreateVolumeRequest { name: "bad name".into(), project: "tests".into(), ..Default::default() };
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(m.volumes.create_volume(bad()).await.unwrap_err());
    }
    let limited: Vec<_> = codes.iter().filter(|s| s.code() == Code::ResourceExhausted).collect();
    assert!(
        codes[..5].iter().all(|s| s.code() == Code::InvalidArgument),
        "the burst of 5 passes the limit: {:?}",
        codes.iter().map(|s| s.code()).collect::<Vec<_>>()
    );
    assert!(!limited.is_empty(), "the calls past the burst are limited");
    assert!(limited[0].message().contains("retry in"), "{}", limited[0].message());
    // The admin is not limited.
    for _ in 0..8 {
        assert_eq!(admin.volumes.create_volume(bad()).await.unwrap_err().code(), Code::InvalidArgument);
    }
    // One execution running (a create taking 2 s at the agent): the next change waits.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let slow = pb::CreateVolumeRequest {
        name: "slow".into(),
        project: "tests".into(),
        size_bytes: 1 << 30,
        backend: "backend-a".into(),
        ..Default::default()
    };
    let mut m2 = m.clone();
    let first = tokio::spawn(async move { m2.volumes.create_volume(slow).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = m
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "second".into(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("executions running"), "{}", s.message());
    first.await.unwrap().expect("the first create finishes");
}

/// Lists page: a page holds at most `limit`, markers lead through every record once, a
/// tenant's pages hold only its project, and an oversized limit or a bad marker is
/// refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_limit_and_marker() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    for (project, n) in [("tests", 7), ("other", 3)] {
        for i in 0..n {
            c.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: format!("v{i}"),
                    project: project.into(),
                    size_bytes: 1 << 20,
                    backend: "backend-a".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    for (project, want) in [("tests", 7), ("", 10)] {
        let (mut seen, mut marker) = (Vec::new(), String::new());
        loop {
            let req = pb::ListVolumesRequest { project: project.into(), limit: 3, marker: marker.clone() };
            let page = c.volumes.list_volumes(req).await.unwrap().into_inner();
            assert!(page.volumes.len() <= 3);
            seen.extend(page.volumes.iter().map(|v| v.id.clone()));
            if page.next_marker.is_empty() {
                break;
            }
            marker = page.next_marker;
        }
        let unique: std::collections::BTreeSet<_> = seen.iter().collect();
        assert_eq!((seen.len(), unique.len()), (want, want), "project {project:?}");
    }
    let (_, member) = token(&mut c, "m", "other", "member").await;
    let mut m = as_token(&cluster, &member).await;
    let page = m
        .volumes
        .list_volumes(pb::ListVolumesRequest { project: String::new(), limit: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.volumes.len() == 2 && page.volumes.iter().all(|v| v.project == "other") && !page.next_marker.is_empty()
    );
    let execs = c
        .executions
        .list_executions(pb::ListExecutionsRequest { limit: 4, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(execs.executions.len(), 4);
    let next = c
        .executions
        .list_executions(pb::ListExecutionsRequest { limit: 4, marker: execs.next_marker, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(next.executions.iter().all(|e| e.id < execs.executions[3].id), "newest first, no repeats");
    let s = c.volumes.list_volumes(pb::ListVolumesRequest { limit: 5000, ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("limit"), "{}", s.message());
    let s = c
        .groups
        .list_groups(pb::ListGroupsRequest { marker: "a\u{0}b".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("marker"), "{}", s.message());
}

/// User messages: a periodic sync that fails (its target's agent is gone) becomes one
/// message in the group's project, counted as it repeats; a failed execution becomes
/// another; other projects see neither; a reader may read but not delete; a member
/// deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_no_reply_could_tell_become_user_messages() {
    // qemu agents: they take periodic recovery points themselves.
    let mut cluster =
        Cluster::start_custom(StoreChoice::Embedded, "qemu", &[], &["--set", "defaults.agent_call_timeout=5s"]).await;
    let mut admin = cluster.clients().await;
    // A group replicating every second.
    let v = admin
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "app-v0".into(),
            project: "tests".into(),
            size_bytes: 1 << 30,
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let group = admin
        .groups
        .create_group(pb::CreateGroupRequest {
            name: "app".into(),
            project: "tests".into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            volumes: vec![v.id],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let on = admin
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: group.clone(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on.group.unwrap().replication_status, "enabled");
    let (_, member) = token(&mut admin, "m", "tests", "member").await;
    let (_, reader) = token(&mut admin, "r", "tests", "reader").await;
    let (_, stranger) = token(&mut admin, "s", "other", "member").await;
    let (mut m, mut r, mut s) =
        (as_token(&cluster, &member).await, as_token(&cluster, &reader).await, as_token(&cluster, &stranger).await);

    // The target's agent goes away: the primary's periodic syncs fail.
    cluster.agents[1].proc.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    let msg = loop {
        let list = r.messages.list_messages(pb::ListMessagesRequest::default()).await.unwrap().into_inner();
        if let Some(x) = list.messages.iter().find(|x| x.event == "periodic-sync-failed" && x.count >= 2) {
            break x.clone();
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&cluster.agents[0].proc.log).unwrap_or_default();
            let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!("no repeated sync-failure message: {list:?}\nagent-backend-a log (newest first):\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        (msg.project.as_str(), msg.resource_name.as_str(), msg.resource_id.as_str()),
        ("tests", "app", group.as_str())
    );
    assert!(msg.next_step.contains("replication-info") && msg.expires_ms > msg.updated_ms, "{msg:?}");

    // A failed execution is a message too: the member's "sync now" cannot reach the target.
    let failed = m
        .replication
        .sync_group(pb::SyncGroupRequest { group: group.clone(), project: "tests".into(), ..Default::default() })
        .await;
    let answered = format!("{failed:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = m.messages.list_messages(pb::ListMessagesRequest::default()).await.unwrap().into_inner();
        if list.messages.iter().any(|x| x.event == "execution-failed" && x.detail.contains("sync")) {
            break;
        }
        assert!(Instant::now() < deadline, "no execution-failed message after {answered}: {list:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A page at a time, newest first; the CLI pages by itself.
    let first = m
        .messages
        .list_messages(pb::ListMessagesRequest { limit: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(first.messages.len() == 1 && !first.next_marker.is_empty(), "{first:?}");
    let out = cluster.cli_in("tests", &["message", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let times: Vec<i64> =
        listed["messages"].as_array().unwrap().iter().map(|x| x["updated_ms"].as_i64().unwrap()).collect();
    assert!(times.len() >= 2 && times.windows(2).all(|w| w[0] >= w[1]), "newest first: {listed}");

    // Another project sees none of them, not even by id.
    let theirs = s.messages.list_messages(pb::ListMessagesRequest::default()).await.unwrap().into_inner();
    assert!(theirs.messages.is_empty(), "{theirs:?}");
    let e = s.messages.get_message(pb::GetMessageRequest { id: msg.id.clone(), project: String::new() }).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    // A reader may not delete; the member does.
    let e = r.messages.delete_message(pb::GetMessageRequest { id: msg.id.clone(), project: String::new() }).await;
    assert_eq!(e.unwrap_err().code(), Code::PermissionDenied);
    m.messages.delete_message(pb::GetMessageRequest { id: msg.id.clone(), project: String::new() }).await.unwrap();
    let e = m.messages.get_message(pb::GetMessageRequest { id: msg.id.clone(), project: String::new() }).await;
    assert!(e.is_err() || e.unwrap().into_inner().count == 1, "deleted (or raised anew by the next failure)");
}

/// The service names a server's reflection lists, asked through `grpc.reflection.v1`
/// and through `v1alpha`.
async fn reflected(channel: tonic::transport::Channel) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = c1.server_reflection_info(tokio_stream::iter([req])).await.expect("v1 reflection").into_inner();
    let first = answers.message().await.unwrap().expect("a v1 answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) = first.message_response else {
        panic!("not a service list: {first:?}")
    };
    let mut one: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    let mut ca = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        ca.server_reflection_info(tokio_stream::iter([req])).await.expect("v1alpha reflection").into_inner();
    let first = answers.message().await.unwrap().expect("a v1alpha answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) = first.message_response
    else {
        panic!("not a service list: {first:?}")
    };
    let mut alpha: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    one.sort();
    alpha.sort();
    (one, alpha)
}

/// grpcurl, Postman and Evans find their way in: both reflection versions answer on the
/// orchestrator and on an agent, and each lists exactly what that server serves (health
/// included; the orchestrator does not list the agent APIs it does not serve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_exactly_the_served_services_in_both_versions() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let dir = cluster.dir.path();
    let orchestrator = tonic::transport::Endpoint::from_shared(cluster.orchestrator.endpoint.clone())
        .unwrap()
        .tls_config(drover_proto::tls::user_client(&drover_tests::cluster::ca_file(dir)).unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (one, alpha) = reflected(orchestrator).await;
    let mut want: Vec<String> = drover_orchestrator::SERVED
        .iter()
        .chain(drover_proto::reflection::COMMON.iter())
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(one, want, "the orchestrator through v1");
    assert_eq!(alpha, want, "the orchestrator through v1alpha");
    assert!(!one.iter().any(|s| s.starts_with("drover.agent.")), "{one:?}");

    let agent = drover_tests::cluster::agent_channel(&cluster.agents[0].endpoint, dir).await;
    let (one, alpha) = reflected(agent).await;
    let mut want: Vec<String> = ["drover.agent.v1.Agent", "drover.agent.v1.Replica"]
        .iter()
        .chain(drover_proto::reflection::COMMON.iter())
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(one, want, "an agent through v1");
    assert_eq!(alpha, want, "an agent through v1alpha");
}
