//! Twenty thousand groups on a real etcd, across three projects: far past the size at
//! which one unpaged range hit etcd-client's 4 MiB reply limit (about 5,000 groups).
//! `drover group list` of one project returns exactly its groups, page by page, and an
//! orchestrator killed while one group among them fails over resumes the move at start.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_proto::v1 as pb;
use drover_tests::{Cluster, Etcd, StoreChoice};

const GROUPS: usize = 20_000;
const PROJECTS: [&str; 3] = ["p1", "p2", "p3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_groups_list_by_project_and_a_move_among_them_survives_a_restart() {
    let etcd = Etcd::start().await;
    // Each agent call takes 400 ms, so the move below is still running when the
    // orchestrator is killed.
    let mut cluster = Cluster::start(StoreChoice::Etcd(&etcd), &["--set", "mock.latency=400ms"]).await;
    let c = cluster.clients().await;

    // The bulk: empty groups (a group's record is what lists read), 32 calls in flight.
    let started = Instant::now();
    drover_tests::bulk_groups(&c, GROUPS, 32, |i| (format!("g{i:05}"), PROJECTS[i % 3].to_string())).await;
    println!("{GROUPS} groups made in {:.1} s", started.elapsed().as_secs_f64());

    // One replicating group in p2, to move.
    let mut c2 = c.clone();
    drover_tests::replicated_group_in(&mut c2, "p2", "mover", 1).await;

    // The CLI pages by itself: exactly p2's groups, each once.
    let t = Instant::now();
    let out = cluster.cli_in("p2", &["group", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<String> =
        listed["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap().to_string()).collect();
    let unique: BTreeSet<&String> = names.iter().collect();
    let expected: BTreeSet<String> = (0..GROUPS)
        .filter(|i| i % 3 == 1)
        .map(|i| format!("g{i:05}"))
        .chain(std::iter::once("mover".to_string()))
        .collect();
    println!("group list --project p2: {} groups in {:.1} s", names.len(), t.elapsed().as_secs_f64());
    assert_eq!(names.len(), unique.len(), "no group listed twice");
    assert_eq!(unique.into_iter().cloned().collect::<BTreeSet<_>>(), expected, "exactly p2's groups");
    assert!(listed["groups"].as_array().unwrap().iter().all(|g| g["project"] == "p2"), "no other project's group");
    // One page by hand: bounded, with a marker to go on.
    let page = c2
        .groups
        .list_groups(pb::ListGroupsRequest { project: "p1".into(), limit: 100, marker: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.groups.len(), 100);
    assert!(!page.next_marker.is_empty());

    // A site runbook over all of them (20,001 groups) is refused before it runs: its
    // record lists a lock per group and would pass etcd's request limit.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../runbooks/site-failover-planned.yaml");
    let t = Instant::now();
    let refused = c2
        .runbooks
        .run_runbook(pb::RunbookRequest {
            file_name: path.display().to_string(),
            text: std::fs::read_to_string(&path).unwrap(),
            params: [("site".to_string(), "site-a".to_string())].into(),
        })
        .await
        .expect_err("too many groups for one run");
    println!("a run over {} groups refused in {:.1} s", GROUPS + 1, t.elapsed().as_secs_f64());
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("20001 groups") && refused.message().contains("at most 20000"), "{refused:?}");

    // A planned failover of `mover`, cut by killing the orchestrator mid-way; the new one
    // resumes it at start and the group ends failed over.
    let r = c2
        .replication
        .failover_group(pb::FailoverGroupRequest {
            group: "mover".into(),
            project: "p2".into(),
            target_backend: "backend-b".into(),
            no_wait: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.execution_id.is_empty());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let g = c2
        .groups
        .get_group(pb::GetGroupRequest { group: "mover".into(), project: "p2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.replication_status, "failing-over", "killed mid-move");
    cluster.restart_orchestrator().await;
    let mut c3 = cluster.clients().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let g = loop {
        let g = c3
            .groups
            .get_group(pb::GetGroupRequest { group: "mover".into(), project: "p2".into() })
            .await
            .unwrap()
            .into_inner();
        if g.replication_status != "failing-over" {
            break g;
        }
        assert!(Instant::now() < deadline, "the move was not resumed: {g:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"), "{g:?}");
    let e = c3.executions.get_execution(pb::GetExecutionRequest { id: r.execution_id }).await.unwrap().into_inner();
    assert_eq!((e.status.as_str(), e.claims), ("succeeded", 2), "resumed by the new orchestrator: {e:?}");
}

/// A group's record stays the same size however many events it has seen: its history
/// is kept a key each, read newest first page by page, pruned after its retention (the
/// newest 50 always kept), and deleted with the group. Checked in etcd itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_history_lives_apart_from_its_record_paged_and_pruned() {
    let etcd = Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let mut c = cluster.clients().await;
    let g = c
        .groups
        .create_group(pb::CreateGroupRequest {
            name: "busy".into(),
            project: "tests".into(),
            group_type: "replication".into(),
            backend: "backend-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let raw: Arc<dyn drover_store::KvStore> = Arc::new(
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap(),
    );
    let store: Arc<dyn drover_store::KvStore> =
        Arc::new(drover_store::Prefixed::new(raw, cluster.store_prefix().expect("on etcd").to_string()));
    let record = |store: Arc<dyn drover_store::KvStore>, id: String| async move {
        store.get(format!("groups/{id}").as_bytes()).await.unwrap().expect("the group's record").value
    };
    const UPDATES: usize = 120;
    let mut sizes = Vec::new();
    for i in 0..UPDATES {
        let tier = if i % 2 == 0 { 3 } else { 4 };
        c.groups
            .update_group(pb::UpdateGroupRequest {
                group: g.id.clone(),
                project: "tests".into(),
                tier,
                ..Default::default()
            })
            .await
            .unwrap();
        if i == 1 || i == UPDATES - 1 {
            sizes.push(record(store.clone(), g.id.clone()).await.len());
        }
    }
    let stored: serde_json::Value = serde_json::from_slice(&record(store.clone(), g.id.clone()).await).unwrap();
    assert!(stored.get("history").is_none(), "no history in the record: {stored}");
    assert_eq!(sizes[0], sizes[1], "the record's size after 2 and after {UPDATES} updates");

    // Shown with the group: the newest 50, oldest first, ending with the last update.
    let shown = c
        .groups
        .get_group(pb::GetGroupRequest { group: g.id.clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.history.len(), 50);
    assert!(shown.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "oldest first");
    assert_eq!(shown.history.last().unwrap().detail, "tier 4, labels []");

    // Paged, newest first, each event once: the create and every update.
    let page = |c: &mut drover_cli::client::Clients, marker: String| {
        let req = pb::ListGroupEventsRequest { group: "busy".into(), project: "tests".into(), limit: 7, marker };
        let mut groups = c.groups.clone();
        async move { groups.list_group_events(req).await.unwrap().into_inner() }
    };
    let mut all = Vec::new();
    let mut marker = String::new();
    loop {
        let p = page(&mut c, marker).await;
        assert!(p.events.len() <= 7);
        all.extend(p.events);
        marker = p.next_marker;
        if marker.is_empty() {
            break;
        }
    }
    assert_eq!(all.len(), UPDATES + 1, "the create and {UPDATES} updates");
    assert!(all.windows(2).all(|w| w[0].at_ms >= w[1].at_ms), "newest first");
    assert_eq!(all.last().unwrap().action, "create");
    let bad = c
        .groups
        .list_group_events(pb::ListGroupEventsRequest {
            group: "busy".into(),
            project: "tests".into(),
            limit: 5000,
            marker: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    let out = cluster.cli(&["group", "history", "busy", "--limit", "10", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["events"].as_array().unwrap().len(), 10, "{listed}");

    // Retention: with none left, every event but the newest 50 goes.
    let repo = drover_orchestrator::repo::Repo::new(store.clone());
    let pruned = drover_orchestrator::service::groups::prune_history(&repo, Duration::ZERO).await.unwrap();
    assert_eq!(pruned, UPDATES + 1 - 50);
    let (left, _) = store.range(format!("group-events/{}/", g.id).as_bytes()).await.unwrap();
    assert_eq!(left.len(), 50);

    // Deleted with the group.
    c.groups.delete_group(pb::DeleteGroupRequest { group: g.id.clone(), project: "tests".into() }).await.unwrap();
    let (left, _) = store.range(format!("group-events/{}/", g.id).as_bytes()).await.unwrap();
    assert!(left.is_empty(), "{} events left after the delete", left.len());
}

/// Executions are listed from an index, newest first, a page at a time, each once; an
/// orchestrator that finds no index (executions written before it existed) builds it
/// at start, so they are listed again. Checked on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_are_listed_page_by_page_from_their_index() {
    let etcd = Etcd::start().await;
    let mut cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let mut c = cluster.clients().await;
    for i in 0..12 {
        let v = c
            .volumes
            .create_volume(pb::CreateVolumeRequest {
                name: format!("v{i:02}"),
                project: "tests".into(),
                size_bytes: 1 << 20,
                backend: "backend-a".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.volumes.delete_volume(pb::DeleteVolumeRequest { volume: v.id, project: "tests".into() }).await.unwrap();
    }
    let list_all = |mut c: drover_cli::client::Clients| async move {
        let (mut ids, mut marker) = (Vec::new(), String::new());
        loop {
            let page = c
                .executions
                .list_executions(pb::ListExecutionsRequest { status: String::new(), limit: 5, marker })
                .await
                .unwrap()
                .into_inner();
            assert!(page.executions.len() <= 5);
            ids.extend(page.executions.into_iter().map(|e| e.id));
            marker = page.next_marker;
            if marker.is_empty() {
                return ids;
            }
        }
    };
    let ids = list_all(c.clone()).await;
    assert!(ids.len() >= 12, "at least the 12 creates: {}", ids.len());
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first, each once: {ids:?}");

    // As if written before the index: drop it, restart, and find every one again.
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let prefix = cluster.store_prefix().expect("on etcd").to_string();
    let store = drover_store::Prefixed::new(Arc::new(raw), prefix);
    use drover_store::KvStore;
    store
        .txn(
            drover_store::Txn::new()
                .and_then(drover_store::TxnOp::DeletePrefix { prefix: b"executions-newest/".to_vec() })
                .and_then(drover_store::TxnOp::delete(b"executions-newest-built".to_vec())),
        )
        .await
        .unwrap();
    cluster.restart_orchestrator().await;
    let c = cluster.clients().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = list_all(c.clone()).await;
        if again == ids {
            break;
        }
        assert!(Instant::now() < deadline, "the index was not rebuilt: {} of {} listed", again.len(), ids.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Index entries whose record is gone (a submit abandoned between the two) fill a
    // whole page here: the listing steps over them instead of stalling.
    for n in 0..6 {
        let ghost = format!("{}-ghost-{n}", ids[0]);
        store.put(drover_procedure::keys::newest("all", &ghost).as_bytes(), ghost.as_bytes()).await.unwrap();
    }
    assert_eq!(list_all(c.clone()).await, ids, "the same executions, the ghosts skipped");
    for n in 0..6 {
        let ghost = format!("{}-ghost-{n}", ids[0]);
        store.delete(drover_procedure::keys::newest("all", &ghost).as_bytes()).await.unwrap();
    }

    // Past their retention (none here), ended executions go with their index entries.
    let store: Arc<dyn KvStore> = Arc::new(store);
    let engine = drover_procedure::Manager::new(
        store.clone(),
        drover_procedure::ManagerConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    );
    let pruned = engine.prune_ended(Duration::ZERO).await.unwrap();
    assert_eq!(pruned, ids.len(), "every ended execution");
    assert!(list_all(c.clone()).await.is_empty(), "none listed after pruning");
    for prefix in ["executions/", "executions-newest/all/", "execution-items/"] {
        let (left, _) = store.range(prefix.as_bytes()).await.unwrap();
        assert!(left.is_empty(), "{} keys left under {prefix}", left.len());
    }
}

/// The largest group the API takes (100 volumes) goes through every operation that
/// writes all its members in one transaction, on a real etcd with its default limit of
/// 128 operations per transaction; one volume more is refused up front with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_group_works_on_etcd_and_a_larger_one_is_refused() {
    const LARGEST: usize = 100;
    let etcd = Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let mut c = cluster.clients().await;
    let mut made = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let mut c = c.clone();
        made.spawn(async move {
            let mut ids = Vec::new();
            for i in (lane..=LARGEST).step_by(8) {
                let v = c
                    .volumes
                    .create_volume(pb::CreateVolumeRequest {
                        name: format!("big-v{i:03}"),
                        project: "tests".into(),
                        size_bytes: 1 << 20,
                        backend: "backend-a".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("volume {i}: {e}"))
                    .into_inner();
                ids.push((i, v.id));
            }
            ids
        });
    }
    let mut vols: Vec<(usize, String)> = made.join_all().await.into_iter().flatten().collect();
    vols.sort();
    let vols: Vec<String> = vols.into_iter().map(|(_, id)| id).collect();
    assert_eq!(vols.len(), LARGEST + 1);
    let group = |volumes: &[String]| pb::CreateGroupRequest {
        name: "big".into(),
        project: "tests".into(),
        group_type: "replication".into(),
        backend: "backend-a".into(),
        volumes: volumes.to_vec(),
        ..Default::default()
    };

    let e = c.groups.create_group(group(&vols)).await.expect_err("one volume too many");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(&format!("at most {LARGEST} volumes")) && e.message().contains("split"), "{e:?}");
    let g = c.groups.create_group(group(&vols[..LARGEST])).await.expect("the largest group").into_inner();
    assert_eq!(g.volume_ids.len(), LARGEST);
    let e = c
        .groups
        .update_group(pb::UpdateGroupRequest {
            group: "big".into(),
            project: "tests".into(),
            add_volumes: vec![vols[LARGEST].clone()],
            ..Default::default()
        })
        .await
        .expect_err("the group is full");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains(&format!("would hold {}", LARGEST + 1)), "{e:?}");

    let outcomes = |r: &pb::ReplicationResult| r.items.iter().filter(|i| i.outcome == "success").count();
    let r = c
        .replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "big".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            ..Default::default()
        })
        .await
        .expect("enable")
        .into_inner();
    assert_eq!((r.group.as_ref().unwrap().replication_status.as_str(), outcomes(&r)), ("enabled", LARGEST), "{r:?}");

    let snap = c
        .snapshots
        .create_group_snapshot(pb::CreateGroupSnapshotRequest {
            group: "big".into(),
            project: "tests".into(),
            name: "big-s".into(),
        })
        .await
        .expect("a group snapshot of the largest group")
        .into_inner();
    assert_eq!((snap.status.as_str(), snap.members.len()), ("available", LARGEST), "{snap:?}");

    // A planned failover, then the failback (target "default": back to the primary).
    for (target, status, at) in [("backend-b", "failed-over", "backend-b"), ("default", "enabled", "backend-a")] {
        let r = c
            .replication
            .failover_group(drover_tests::failover_request("big", target, false))
            .await
            .unwrap_or_else(|e| panic!("move to {target}: {e}"))
            .into_inner();
        let g = r.group.as_ref().unwrap();
        assert_eq!(
            (g.replication_status.as_str(), g.active_backend.as_str(), outcomes(&r)),
            (status, at, LARGEST),
            "{r:?}"
        );
    }

    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot: "big-s".into(), project: "tests".into() })
        .await
        .expect("delete the group snapshot");
    let r = c
        .replication
        .disable_replication(pb::DisableReplicationRequest {
            group: "big".into(),
            project: "tests".into(),
            no_wait: false,
        })
        .await
        .expect("disable")
        .into_inner();
    assert_eq!(r.group.as_ref().unwrap().replication_status, "disabled", "{r:?}");
    c.groups
        .delete_group(pb::DeleteGroupRequest { group: "big".into(), project: "tests".into() })
        .await
        .expect("delete the largest group");
    for id in [&vols[0], &vols[LARGEST - 1]] {
        let v = c
            .volumes
            .get_volume(pb::GetVolumeRequest { volume: id.clone(), project: "tests".into() })
            .await
            .unwrap()
            .into_inner();
        assert!(v.group_id.is_empty(), "released with the group: {v:?}");
    }
}
