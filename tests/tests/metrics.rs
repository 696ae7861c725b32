//! Prometheus metrics, scraped over HTTP from a real orchestrator and two real qemu
//! agents while a group replicates: the group's RPO gauge rises between syncs and drops
//! after `sync`, and the source agent's bytes-shipped counter grows by exactly the bytes
//! the sync reported.

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::cluster::qemu_io;
use drover_tests::scrape::{metrics_addr, scrape, value};
use drover_tests::{Cluster, StoreChoice, consistent_group};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpo_and_shipped_bytes_are_scraped_from_the_orchestrator_and_the_agents() {
    let on = ["--set", "metrics_listen=127.0.0.1:0"];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "qemu", &on, &on).await;
    let (orch, agent_a, agent_b) = (
        metrics_addr(&cluster.orchestrator.proc.log),
        metrics_addr(&cluster.agents[0].proc.log),
        metrics_addr(&cluster.agents[1].proc.log),
    );
    let mut c = cluster.clients().await;
    let vols = consistent_group(&mut c, "mg", 2, 16 * MIB).await;
    let g = c
        .groups
        .get_group(pb::GetGroupRequest { group: "mg".into(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner();
    let u = c
        .volumes
        .attach_volume(pb::AttachVolumeRequest { volume: vols[0].clone(), project: "tests".into() })
        .await
        .unwrap()
        .into_inner()
        .uri;
    qemu_io(&u, &["write -P 0x07 0 1M".to_string()]).unwrap();
    c.replication
        .enable_replication(pb::EnableReplicationRequest {
            group: "mg".into(),
            project: "tests".into(),
            target_backend: "backend-b".into(),
            sync_interval_seconds: 3600,
            no_wait: false,
        })
        .await
        .expect("enable");

    let rpo = r#"drover_group_rpo_seconds{group="mg",project="tests"}"#;
    let shipped = format!(r#"drover_agent_shipped_bytes_total{{group="{}"}}"#, g.id);
    let first = scrape(&orch);
    let r1 = value(&first, rpo).unwrap_or_else(|| panic!("no RPO series:\n{first}"));
    assert!(
        value(&first, r#"drover_group_replication_status{group="mg",project="tests",status="enabled"}"#) == Some(1.0),
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r2 = value(&scrape(&orch), rpo).unwrap();
    assert!(r2 >= r1 + 2.0, "the RPO rises between syncs: {r1} then {r2}");
    let b1 = value(&scrape(&agent_a), &shipped).expect("the initial copy was counted");

    qemu_io(&u, &["write -P 0x08 4M 512k".to_string()]).unwrap();
    let s = c
        .replication
        .sync_group(pb::SyncGroupRequest { group: "mg".into(), project: "tests".into(), ..Default::default() })
        .await
        .expect("sync")
        .into_inner();
    let after = scrape(&orch);
    let r3 = value(&after, rpo).unwrap();
    let a = scrape(&agent_a);
    let b2 = value(&a, &shipped).unwrap();
    println!(
        "metrics: RPO {r1:.2} s, {r2:.2} s after 2.5 s, {r3:.2} s after the sync; shipped {b1} then {b2} bytes \
         (the sync reported {})",
        s.bytes
    );
    assert!(r3 < r2 && r3 < 2.0, "the RPO drops after the sync: {r2} then {r3}");
    assert_eq!(b2 - b1, s.bytes as f64, "the counter grew by the bytes the sync reported");
    assert!(s.bytes >= 512 * 1024, "{s:?}");

    // The other series exist, with bounded labels.
    assert!(
        after.contains(
            r#"drover_api_request_seconds_count{method="/drover.v1.ReplicationService/SyncGroup",code="Ok"} "#
        ),
        "{after}"
    );
    assert!(value(&after, "drover_store_txn_seconds_count").unwrap() > 0.0, "{after}");
    assert!(value(&after, r#"drover_executions{status="running"}"#).is_some(), "{after}");
    assert_eq!(value(&after, "drover_executions_at_prompt"), Some(0.0), "{after}");
    let ended = r#"drover_execution_seconds_count{kind="group-transition",status="succeeded"}"#;
    assert!(value(&after, ended).unwrap() >= 1.0, "the enable's execution was timed: {after}");
    for backend in ["backend-a", "backend-b"] {
        assert_eq!(value(&after, &format!(r#"drover_backend_up{{backend="{backend}"}}"#)), Some(1.0), "{after}");
        assert_eq!(value(&after, &format!(r#"drover_backend_frozen{{backend="{backend}"}}"#)), Some(0.0), "{after}");
    }
    assert!(value(&a, r#"drover_agent_op_seconds_count{op="sync_group",outcome="ok"}"#).unwrap() >= 1.0, "{a}");
    assert!(value(&a, "drover_agent_ops_in_flight").is_some(), "{a}");
    let b = scrape(&agent_b);
    assert!(value(&b, "drover_agent_received_bytes_total").unwrap() >= s.bytes as f64, "{b}");
    assert!(!after.contains("op_id") && !a.contains(&vols[0]), "no per-operation or per-volume labels");

    // Syncs reuse the source's connection to the peer (and the orchestrator's to each
    // agent): the target accepts no new connection for five more syncs.
    let accepted = "drover_agent_accepted_connections_total";
    let before = value(&scrape(&agent_b), accepted).expect("accepted connections counted");
    for i in 0..5 {
        qemu_io(&u, &[format!("write -P 0x{:02x} {}M 64k", 0x40 + i, 6 + i)]).unwrap();
        c.replication
            .sync_group(pb::SyncGroupRequest { group: "mg".into(), project: "tests".into(), ..Default::default() })
            .await
            .expect("sync");
    }
    let after_syncs = value(&scrape(&agent_b), accepted).unwrap();
    println!("backend-b accepted {before} connections before 5 syncs, {after_syncs} after");
    assert_eq!(after_syncs, before, "no connection per sync");

    // The target's agent dies: a sync the operator asks for fails, and the source counts
    // the failure against the group.
    let failures = format!(r#"drover_agent_sync_failures_total{{group="{}"}}"#, g.id);
    assert_eq!(value(&a, &failures), None, "no failure yet: {a}");
    let mut cluster = cluster;
    cluster.agents[1].proc.kill();
    let r = c
        .replication
        .sync_group(pb::SyncGroupRequest { group: "mg".into(), project: "tests".into(), ..Default::default() })
        .await;
    assert!(r.is_err(), "a sync to a dead target fails: {r:?}");
    // The orchestrator tries a transient failure again under new op_ids: each attempt is
    // a sync that failed, counted once, as the op latency histogram counts them.
    let a = scrape(&agent_a);
    let failed = value(&a, &failures).expect("failures counted");
    let ops: f64 = a
        .lines()
        .filter(|l| l.starts_with(r#"drover_agent_op_seconds_count{op="sync_group",outcome="#) && !l.contains("\"ok\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    println!("a sync to a dead target: {failed} failed attempts counted, {ops} failed sync ops");
    assert!(failed >= 1.0 && failed == ops, "{a}");
}

/// An agent that stops answering while its registration stays live (SIGSTOP, a long
/// lease) makes each call to it wait out the probe deadline (2 s). A scrape of 80
/// replicated groups on it used to ask group after group, over two and a half minutes.
/// Now the groups are asked 32 at a time (three rounds of 2 s, then the backends' probe)
/// and a scrape waits for its refresh at most 5 s: the scrape is answered, and the
/// following ones show the agent's groups without an RPO and the backend down, then
/// recovered once the agent answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_are_answered_while_an_agent_does_not_answer() {
    const GROUPS: usize = 80;
    let orch = ["--set", "metrics_listen=127.0.0.1:0", "--set", "agent_lease_ttl=300s"];
    let cluster = Cluster::start_custom(StoreChoice::Embedded, "mock", &[], &orch).await;
    let addr = metrics_addr(&cluster.orchestrator.proc.log);
    let mut c = cluster.clients().await;
    for i in 0..GROUPS {
        drover_tests::replicated_group(&mut c, &format!("m{i:02}"), 1).await;
    }
    let rpo = |i: usize| format!(r#"drover_group_rpo_seconds{{group="m{i:02}",project="tests"}}"#);
    let up = r#"drover_backend_up{backend="backend-a"}"#;
    let body = scrape(&addr);
    for i in 0..GROUPS {
        let r = value(&body, &rpo(i)).unwrap_or_else(|| panic!("no RPO of m{i:02}:\n{body}"));
        assert!(r >= 0.0, "m{i:02} has a recovery point: {r}");
    }
    assert_eq!(value(&body, up), Some(1.0));
    assert!(value(&body, "drover_metrics_refresh_seconds").is_some_and(|s| s > 0.0), "{body}");
    let refreshed = value(&body, "drover_metrics_refreshed_timestamp_seconds").expect("refresh time");

    let pid = cluster.agents[0].proc.pid().to_string();
    let signal = |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    let asked = std::time::Instant::now();
    let body = scrape(&addr);
    let took = asked.elapsed();
    println!("scrape with backend-a's agent stopped: {took:?}");
    assert!(took < Duration::from_secs(20), "the scrape waited out the agent group by group: {took:?}");
    assert!(body.contains("drover_group_rpo_seconds"), "served the values as they stand:\n{body}");

    // The refresh went on; a later scrape shows what it found.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = scrape(&addr);
        let lost = (0..GROUPS).filter(|&i| value(&body, &rpo(i)) == Some(-1.0)).count();
        let later = value(&body, "drover_metrics_refreshed_timestamp_seconds").unwrap();
        if lost == GROUPS && value(&body, up) == Some(0.0) && later > refreshed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{lost} of {GROUPS} groups without an RPO:\n{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    signal("-CONT");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = scrape(&addr);
        let back = (0..GROUPS).filter(|&i| value(&body, &rpo(i)).is_some_and(|r| r >= 0.0)).count();
        if back == GROUPS && value(&body, up) == Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{back} of {GROUPS} groups back:\n{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
