//! Runbooks end to end: the shipped runbooks run through the `drover` CLI and the API
//! against an orchestrator and two mock agents (real processes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::scrape::{metrics_addr, scrape, value};
use drover_tests::{Cluster, StoreChoice, failover_request, replicated_group, volume_on_a, wait_backend_up};

fn runbook(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../runbooks").join(name)
}

fn request(name: &str, params: &[(&str, &str)]) -> pb::RunbookRequest {
    let path = runbook(name);
    pb::RunbookRequest {
        file_name: path.display().to_string(),
        text: std::fs::read_to_string(&path).unwrap(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// Creates `n` replicated groups `{prefix}-{i}`, ten at a time; returns their ids.
async fn groups(c: &Clients, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let mut c = c.clone();
            let name = format!("{prefix}-{i:03}");
            set.spawn(async move { replicated_group(&mut c, &name, 1).await });
        }
        while let Some(id) = set.join_next().await {
            ids.push(id.unwrap());
        }
    }
    ids
}

/// Creates `n` single-volume groups `{prefix}-{i}` on `from`, replicating to `to`.
async fn groups_on(c: &Clients, prefix: &str, n: usize, from: &str, to: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut c = c.clone();
        let name = format!("{prefix}-{i:03}");
        let v = c
            .volumes
            .create_volume(pb::CreateVolumeRequest {
                name: format!("{name}-v0"),
                project: "tests".into(),
                size_bytes: 1 << 30,
                backend: from.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let g = c
            .groups
            .create_group(pb::CreateGroupRequest {
                name: name.clone(),
                project: "tests".into(),
                group_type: "replication".into(),
                backend: from.into(),
                volumes: vec![v.id],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let r = c
            .replication
            .enable_replication(pb::EnableReplicationRequest {
                group: g.id.clone(),
                project: "tests".into(),
                target_backend: to.into(),
                sync_interval_seconds: 0,
                no_wait: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.group.unwrap().replication_status, "enabled");
        ids.push(g.id);
    }
    ids
}

async fn set_tier(c: &mut Clients, group: &str, tier: u32) {
    c.groups
        .update_group(pb::UpdateGroupRequest {
            group: group.into(),
            project: "tests".into(),
            tier,
            ..Default::default()
        })
        .await
        .expect("set tier");
}

async fn all_groups(c: &mut Clients) -> Vec<pb::Group> {
    c.groups
        .list_groups(pb::ListGroupsRequest { project: "tests".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .groups
}

async fn wait_ended(c: &mut Clients, id: &str) -> pb::Execution {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner();
        if e.status != "running" {
            return e;
        }
        assert!(Instant::now() < deadline, "execution {id} still running at step {}: {}", e.step, e.error);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn report(c: &mut Clients, id: &str, format: &str) -> String {
    c.executions
        .get_execution_report(pb::GetExecutionReportRequest { id: id.into(), format: format.into() })
        .await
        .unwrap()
        .into_inner()
        .text
}

/// A planned failover of site A, 100 groups in three tiers, through `drover runbook
/// run`: every group ends failed-over, tiers ran in order, the report lists every group
/// with its outcome, RPO and RTO, and the site's backends are thawed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_site_failover_moves_every_group_tier_by_tier() {
    // Two backends per site: half the groups replicate backend-a → backend-b, half
    // backend-a2 → backend-b2.
    let sites = [("site-a", "backend-a"), ("site-a", "backend-a2"), ("site-b", "backend-b"), ("site-b", "backend-b2")];
    let metrics = ["--set", "metrics_listen=127.0.0.1:0"];
    let cluster = Cluster::start_sites(StoreChoice::Embedded, "mock", &sites, &[], &metrics).await;
    let mut c = cluster.clients().await;
    let mut ids = groups(&c, "site", 50).await;
    ids.extend(groups_on(&c, "site2", 50, "backend-a2", "backend-b2").await);
    let mut names: Vec<String> = all_groups(&mut c).await.into_iter().map(|g| g.name).collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        set_tier(
            &mut c,
            name,
            if i < 30 {
                1
            } else if i < 70 {
                2
            } else {
                3
            },
        )
        .await;
    }
    let path = runbook("site-failover-planned.yaml");
    let out = cluster.cli(&[
        "runbook",
        "run",
        path.to_str().unwrap(),
        "--param",
        "site=site-a",
        "--param",
        "max_parallel=8",
        "--yes",
        "-o",
        "json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let e: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(e["status"], "succeeded", "{e}");
    let id = e["id"].as_str().unwrap().to_string();
    // Each move's first step starts from the records its intent wrote, at the revision
    // of the submit: none of the moves' writes was refused for a change after that (a
    // wrong revision would be, and the step retried after reading them).
    let scraped = scrape(&metrics_addr(&cluster.orchestrator.proc.log));
    assert_eq!(value(&scraped, "drover_store_txn_conflicts_total"), Some(0.0), "{scraped}");

    let groups = all_groups(&mut c).await;
    assert_eq!(groups.len(), ids.len());
    for g in &groups {
        let to = if g.name.starts_with("site2") { "backend-b2" } else { "backend-b" };
        assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", to), "{}", g.name);
    }
    let r: serde_json::Value = serde_json::from_str(&report(&mut c, &id, "json").await).unwrap();
    let listed = r["groups"].as_array().unwrap();
    assert_eq!(listed.len(), 100, "the report lists every group");
    for g in listed {
        assert_eq!(g["outcome"], "succeeded", "{g}");
        assert_eq!(g["rpo_ms"], 0, "a planned move loses nothing: {g}");
        assert!(g["rto_ms"].as_i64().unwrap() > 0, "{g}");
        assert_eq!(g["predicted"]["rpo_ms"], 0, "and was predicted to lose nothing: {g}");
        // The mock cannot estimate what a sync would ship; its final sync did run.
        assert_eq!(g["predicted"]["sync_bytes"], -1, "{g}");
        assert!(g["sync_bytes"].as_i64().unwrap() >= 0 && g["sync_ms"].as_i64().unwrap() >= 0, "{g}");
    }
    assert_eq!(r["totals"]["failed"], 0, "{}", r["totals"]);
    // Tier by tier: every group of a tier ended before the next tier's first started.
    let moves = r["steps"].as_array().unwrap().iter().find(|s| s["name"] == "move").unwrap();
    let mut by_tier: BTreeMap<u64, (i64, i64)> = BTreeMap::new();
    for i in moves["items"].as_array().unwrap() {
        let e = by_tier.entry(i["tier"].as_u64().unwrap()).or_insert((i64::MAX, 0));
        e.0 = e.0.min(i["started_ms"].as_i64().unwrap());
        e.1 = e.1.max(i["ended_ms"].as_i64().unwrap());
    }
    let tiers: Vec<(u64, (i64, i64))> = by_tier.into_iter().collect();
    assert_eq!(tiers.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 3]);
    for w in tiers.windows(2) {
        assert!(
            w[0].1.1 <= w[1].1.0,
            "tier {} ended at {} after tier {} started at {}",
            w[0].0,
            w[0].1.1,
            w[1].0,
            w[1].1.0
        );
    }
    let a = c.sites.get_backend(pb::GetBackendRequest { name: "backend-a".into() }).await.unwrap().into_inner();
    assert!(!a.frozen, "the runbook thawed the site's backend");
    let md = report(&mut c, &id, "md").await;
    assert!(md.contains("# DR report: runbook site-failover-planned") && md.contains("| 3 | site2-049 |"), "{md}");
}

/// Site A is lost: the disaster runbook fails every group over without it, recording
/// each group's achieved RPO. Site A comes back; the failback runbook stops at its
/// prompt listing the divergence; `reject` leaves everything as it was, and a second
/// run that is approved brings every group home, with the decision in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disaster_then_a_failback_that_asks_first() {
    let mut cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.oplog={dir}/oplog-{backend}.jsonl"]).await;
    let mut c = cluster.clients().await;
    groups(&c, "dis", 5).await;
    cluster.agents[0].proc.kill();
    let e = c
        .runbooks
        .run_runbook(request("site-failover-disaster.yaml", &[("site", "site-a")]))
        .await
        .expect("run the disaster runbook")
        .into_inner();
    let e = wait_ended(&mut c, &e.id).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    for g in all_groups(&mut c).await {
        assert_eq!(g.replication_status, "failed-over", "{}: {}", g.name, g.status_reason);
        assert!(!g.divergence_point.is_empty());
    }
    let r: serde_json::Value = serde_json::from_str(&report(&mut c, &e.id, "json").await).unwrap();
    for g in r["groups"].as_array().unwrap() {
        assert_eq!(g["outcome"], "succeeded", "{g}");
        assert!(g["rpo_ms"].as_i64().unwrap() >= 0, "the achieved RPO is known: {g}");
        // Predicted at submit from site B alone (site A was dead), so no later than the
        // move itself: it can only have grown since.
        let predicted = g["predicted"]["rpo_ms"].as_i64().unwrap();
        assert!(predicted >= 0 && predicted <= g["rpo_ms"].as_i64().unwrap(), "{g}");
    }

    let oplog = cluster.path().join("oplog-backend-a.jsonl");
    let logged_before = std::fs::read_to_string(&oplog).unwrap_or_default().lines().count();
    assert!(logged_before > 0, "site A logged its calls before it died");
    cluster.restart_agent_with(0, "mock", &["--set", "mock.oplog={dir}/oplog-{backend}.jsonl"]);
    wait_backend_up(&mut c, "backend-a").await;
    // Nothing of the disaster run reaches the lost site when it returns: no mutation
    // lands there until an operator fails back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since: Vec<String> = std::fs::read_to_string(&oplog)
        .unwrap_or_default()
        .lines()
        .skip(logged_before)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["op_id"].as_str().is_some_and(|o| !o.is_empty()))
        .map(|e| format!("{} {}", e["op"], e["op_id"]))
        .collect();
    assert!(since.is_empty(), "mutations reached the returning lost site: {since:?}");
    let before = drover_tests::state_snapshot(&mut c).await;
    let at_prompt = |c: Clients, id: String| async move {
        let mut c = c;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.clone() }).await.unwrap().into_inner();
            if e.step == "prompt:confirm-discard" && e.steps.iter().any(|s| s.name == "prompt:confirm-discard") {
                return e;
            }
            assert!(Instant::now() < deadline && e.status == "running", "never reached the prompt: {e:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let first =
        c.runbooks.run_runbook(request("site-failback.yaml", &[("site", "site-a")])).await.unwrap().into_inner();
    let waiting = at_prompt(c.clone(), first.id.clone()).await;
    let state: serde_json::Value = serde_json::from_str(&waiting.state_json).unwrap();
    let shown = state["steps"][0]["shown"].as_array().unwrap();
    assert_eq!(shown.len(), 5, "one line per diverged group: {shown:?}");
    assert!(shown[0].as_str().unwrap().contains("discards backend-a's writes"), "{shown:?}");
    c.executions
        .decide_prompt(pb::DecidePromptRequest {
            id: first.id.clone(),
            approve: false,
            by: "tester".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rejected = wait_ended(&mut c, &first.id).await;
    assert_eq!(rejected.status, "failed");
    assert!(rejected.error.contains("rejected at prompt confirm-discard by tester"), "{}", rejected.error);
    let after_reject = drover_tests::state_snapshot(&mut c).await;
    assert_eq!(before, after_reject, "a rejected failback changed nothing");

    let second =
        c.runbooks.run_runbook(request("site-failback.yaml", &[("site", "site-a")])).await.unwrap().into_inner();
    at_prompt(c.clone(), second.id.clone()).await;
    // A second decision is refused: the first stands.
    c.executions
        .decide_prompt(pb::DecidePromptRequest {
            id: second.id.clone(),
            approve: true,
            by: "tester".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let again = c
        .executions
        .decide_prompt(pb::DecidePromptRequest {
            id: second.id.clone(),
            prompt: "confirm-discard".into(),
            approve: false,
            by: "someone".into(),
            ..Default::default()
        })
        .await
        .expect_err("decided already");
    assert!(again.message().contains("already approved by tester"), "{}", again.message());
    let done = wait_ended(&mut c, &second.id).await;
    assert_eq!(done.status, "succeeded", "{}", done.error);
    for g in all_groups(&mut c).await {
        assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("enabled", "backend-a"), "{}", g.name);
    }
    let md = report(&mut c, &second.id, "md").await;
    assert!(md.contains("Decision: **approved** by tester"), "{md}");
    // The returned site's log does record calls: the failback's reached it.
    let after = std::fs::read_to_string(&oplog).unwrap_or_default().lines().skip(logged_before).count();
    assert!(after > 0, "the failback's calls to site A were logged");
}

/// Cancelling a run: the group moving finishes, no new group starts, the report says
/// cancelled. Pausing holds new groups back until resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_pause_stop_new_groups_only() {
    let cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.latency=150ms"]).await;
    let mut c = cluster.clients().await;
    groups(&c, "can", 6).await;
    let params = [("site", "site-a"), ("max_parallel", "1")];
    let e = c.runbooks.run_runbook(request("site-failover-planned.yaml", &params)).await.unwrap().into_inner();
    // Wait until the move step has a group running, then pause: no new one starts.
    let running = |e: &pb::Execution| -> usize {
        let s: serde_json::Value = serde_json::from_str(&e.state_json).unwrap_or_default();
        let moves = s["steps"].as_array().and_then(|st| st.iter().find(|st| st["name"] == "move").cloned());
        moves
            .and_then(|m| m["items"].as_array().map(|i| i.iter().filter(|i| i["status"] != "pending").count()))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if running(&now) > 0 {
            break;
        }
        assert!(Instant::now() < deadline && now.status == "running", "the move never started: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.executions.pause_execution(pb::CancelExecutionRequest { id: e.id.clone() }).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paused = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
    assert!(paused.paused, "{paused:?}");
    let started_while_paused = running(&paused);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
    assert_eq!(running(&still), started_while_paused, "no group started while paused");
    c.executions.resume_execution(pb::CancelExecutionRequest { id: e.id.clone() }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = c.executions.get_execution(pb::GetExecutionRequest { id: e.id.clone() }).await.unwrap().into_inner();
        if running(&now) > started_while_paused {
            break;
        }
        assert!(Instant::now() < deadline, "nothing started after resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.executions.cancel_execution(pb::CancelExecutionRequest { id: e.id.clone() }).await.unwrap();
    let ended = wait_ended(&mut c, &e.id).await;
    assert_eq!(ended.status, "cancelled");
    // The group that was moving finishes on its own; none is left half-way.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gs = all_groups(&mut c).await;
        if gs.iter().all(|g| matches!(g.replication_status.as_str(), "enabled" | "failed-over")) {
            let moved = gs.iter().filter(|g| g.replication_status == "failed-over").count();
            assert!((1..6).contains(&moved), "{moved} of 6 moved");
            break;
        }
        assert!(Instant::now() < deadline, "groups left moving: {gs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r: serde_json::Value = serde_json::from_str(&report(&mut c, &e.id, "json").await).unwrap();
    assert_eq!(r["status"], "cancelled");
    assert!(r["totals"]["not_started"].as_u64().unwrap() >= 1, "{}", r["totals"]);
}

/// Refusals before anything runs: a selector that matches nothing (file position and
/// step named), a group another execution holds (its id named), a missing parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_that_cannot_start_are_refused_with_the_reason() {
    let cluster = Cluster::start(StoreChoice::Embedded, &["--set", "mock.latency=400ms"]).await;
    let mut c = cluster.clients().await;
    groups(&c, "ref", 2).await;
    let none = c
        .runbooks
        .plan_runbook(request("site-failover-planned.yaml", &[("site", "site-x")]))
        .await
        .expect_err("nothing at site-x");
    assert_eq!(none.code(), tonic::Code::FailedPrecondition);
    assert!(none.message().contains("site-failover-planned.yaml:27:7: step `freeze` (freeze)"), "{}", none.message());

    let missing = c.runbooks.plan_runbook(request("site-failover-planned.yaml", &[])).await.expect_err("no site");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(missing.message().contains(":10:3: parameter `site` (string) is required"), "{}", missing.message());

    let held = c
        .replication
        .failover_group(pb::FailoverGroupRequest { no_wait: true, ..failover_request("ref-000", "backend-b", false) })
        .await
        .unwrap()
        .into_inner();
    let refused = c
        .runbooks
        .run_runbook(request("site-failover-planned.yaml", &[("site", "site-a")]))
        .await
        .expect_err("a group is held");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains(&held.execution_id), "names the holder: {}", refused.message());
    let plan = c.runbooks.plan_runbook(request("site-failover-planned.yaml", &[("site", "site-a")])).await.unwrap();
    assert_eq!(plan.get_ref().steps.len(), 8);
}

/// Cinder's failover-host: `drover backend failover backend-a --target backend-b` moves
/// every replicated group of the backend, and every volume replicated on its own, and
/// reports each; `--target default` brings them back. A volume on its own also fails
/// over, back and stops replicating by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_backend_fails_over_and_back() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    groups(&c, "be", 10).await;
    // Five volumes replicated on their own, outside any group.
    for i in 0..5 {
        let name = format!("solo-{i}");
        volume_on_a(&mut c, "tests", &name, 1 << 30).await;
        let out = cluster.cli(&["volume", "enable-replication", &name, "--target", "backend-b"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(all_groups(&mut c).await.len(), 10, "a volume's own group is not listed as a group");
    let solo = |c: &mut Clients, i: usize| {
        let mut c = c.clone();
        async move {
            c.volumes
                .get_volume(pb::GetVolumeRequest { volume: format!("solo-{i}"), project: "tests".into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(solo(&mut c, 0).await.replication_status, "enabled");
    let out = cluster.cli(&["backend", "failover", "backend-a", "--target", "backend-b", "-o", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["groups"].as_array().unwrap().len(), 15, "10 groups and 5 volumes: {report}");
    assert_eq!(report["totals"]["failed"], 0);
    for g in all_groups(&mut c).await {
        assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("failed-over", "backend-b"));
    }
    for i in 0..5 {
        let v = solo(&mut c, i).await;
        assert_eq!(
            (v.replication_status.as_str(), v.active_backend.as_str()),
            ("failed-over", "backend-b"),
            "solo-{i}"
        );
    }
    let info = cluster.cli(&["volume", "replication-info", "solo-0", "-o", "json"]);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let out = cluster.cli(&["backend", "failover", "backend-a", "--target", "default"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("succeeded: 15 groups succeeded, 0 failed, 0 skipped"), "{stdout}");
    for g in all_groups(&mut c).await {
        assert_eq!((g.replication_status.as_str(), g.active_backend.as_str()), ("enabled", "backend-a"));
    }
    // One volume on its own: failover, failback, disable; and a volume in a group is
    // pointed at its group.
    let out = cluster.cli(&["volume", "failover", "solo-1", "--target", "backend-b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(solo(&mut c, 1).await.active_backend, "backend-b");
    let out = cluster.cli(&["volume", "failover", "solo-1", "--target", "default"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.cli(&["volume", "disable-replication", "solo-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(solo(&mut c, 1).await.replication_status, "disabled");
    let out = cluster.cli(&["volume", "failover", "be-000-v0", "--target", "backend-b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in group be-000, which is what replicates it"), "{err}");
    // A volume's own group keeps it alone, even with its replication disabled: nothing
    // joins it, and its volume does not leave it (found by chaos_ops).
    let own = format!("volume-{}", solo(&mut c, 1).await.id);
    volume_on_a(&mut c, "tests", "loose", 1 << 30).await;
    let change = |add: &str, remove: &str| pb::UpdateGroupRequest {
        group: own.clone(),
        project: "tests".into(),
        add_volumes: [add].into_iter().filter(|v| !v.is_empty()).map(String::from).collect(),
        remove_volumes: [remove].into_iter().filter(|v| !v.is_empty()).map(String::from).collect(),
        ..Default::default()
    };
    for (add, remove) in [("loose", ""), ("", "solo-1")] {
        let refused = c.groups.update_group(change(add, remove)).await.expect_err("a volume's own group");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("own replication group"), "{refused:?}");
    }
    assert_eq!(solo(&mut c, 1).await.group_id, c.groups.get_group(get_group(&own)).await.unwrap().into_inner().id);
    let out = cluster.cli(&["volume", "enable-replication", "solo-1", "--target", "backend-b"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn get_group(group: &str) -> pb::GetGroupRequest {
    pb::GetGroupRequest { group: group.into(), project: "tests".into() }
}

/// The tenant-path runbook: one group by name and project, planned; a group of another
/// name is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_fails_over_by_name() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    groups(&c, "one", 2).await;
    let e = c
        .runbooks
        .run_runbook(request("group-failover.yaml", &[("group", "one-001"), ("project", "tests")]))
        .await
        .expect("run")
        .into_inner();
    let e = wait_ended(&mut c, &e.id).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    let gs = all_groups(&mut c).await;
    let status = |name: &str| gs.iter().find(|g| g.name == name).unwrap().replication_status.clone();
    assert_eq!((status("one-000").as_str(), status("one-001").as_str()), ("enabled", "failed-over"));
}

/// A member runs the tenant-path runbook on its own group and follows its execution; a
/// runbook with a step only admins run (freeze, a disaster failover) is refused before
/// anything runs; and a site runbook a member runs acts on its own groups only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_runs_runbooks_on_its_own_groups_only() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut admin = cluster.clients().await;
    groups(&admin, "own", 2).await;
    drover_tests::replicated_group_in(&mut admin, "other", "theirs", 1).await;
    let t = admin
        .tokens
        .create_token(pb::CreateTokenRequest { name: "m".into(), project: "tests".into(), role: "member".into() })
        .await
        .unwrap()
        .into_inner();
    let ca = drover_tests::cluster::ca_file(cluster.dir.path());
    let mut m = Clients::connect(&cluster.orchestrator.endpoint, Duration::from_secs(60), Some(&t.secret), Some(&ca))
        .await
        .unwrap();

    let e = m
        .runbooks
        .run_runbook(request("group-failover.yaml", &[("group", "own-000"), ("project", "tests")]))
        .await
        .expect("a member runs the tenant-path runbook")
        .into_inner();
    let e = wait_ended(&mut m, &e.id).await;
    assert_eq!((e.status.as_str(), e.project.as_str()), ("succeeded", "tests"), "{}", e.error);

    for (file, params, word) in [
        ("group-failover.yaml", vec![("group", "own-001"), ("project", "tests"), ("force", "true")], "forced"),
        ("site-failover-planned.yaml", vec![("site", "site-a")], "freeze"),
    ] {
        let s = m.runbooks.run_runbook(request(file, &params)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{file}: {}", s.message());
        assert!(s.message().contains(word), "{file}: {}", s.message());
    }
    // The member's plan naming another project's group holds no item.
    let plan = m
        .runbooks
        .plan_runbook(request("group-failover.yaml", &[("group", "theirs"), ("project", "other")]))
        .await
        .unwrap()
        .into_inner();
    assert!(plan.steps.iter().all(|s| s.items.is_empty()), "another project's group is not planned: {plan:?}");
    let gs = all_groups(&mut admin).await;
    let status = |name: &str| gs.iter().find(|g| g.name == name).unwrap().replication_status.clone();
    assert_eq!((status("own-000").as_str(), status("own-001").as_str()), ("failed-over", "enabled"));
    let theirs = admin.groups.get_group(pb::GetGroupRequest { group: "theirs".into(), project: "other".into() }).await;
    assert_eq!(theirs.unwrap().into_inner().replication_status, "enabled");
}

/// A run's record does not grow with the groups it moves: its items are kept a key
/// each (`execution-items/<id>/…`) and the API puts them back. Checked in etcd itself
/// after a planned site failover of 60 groups: the stored record holds no item and
/// stays under 12 KiB (the items alone are over 30 KiB), every item has its
/// key, and the API and the report show every group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_items_are_kept_apart_from_its_record() {
    const N: usize = 60;
    let etcd = drover_tests::Etcd::start().await;
    let cluster = Cluster::start(StoreChoice::Etcd(&etcd), &[]).await;
    let mut c = cluster.clients().await;
    groups(&c, "apart", N).await;
    let e = c
        .runbooks
        .run_runbook(request("site-failover-planned.yaml", &[("site", "site-a"), ("max_parallel", "8")]))
        .await
        .unwrap()
        .into_inner();
    let raw =
        drover_store::EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), Duration::from_secs(5)).await.unwrap();
    let prefix = cluster.store_prefix().expect("on etcd").to_string();
    // While it runs, the stored record counts the items of the step it is at (what a
    // watch update shows without reading every item): every item counted, once.
    let mut counted = std::collections::BTreeSet::new();
    loop {
        let kv = drover_store::KvStore::get(&raw, format!("{prefix}executions/{}", e.id).as_bytes()).await.unwrap();
        let rec: serde_json::Value = serde_json::from_slice(&kv.expect("the run's record").value).unwrap();
        if rec["status"] != "running" {
            break;
        }
        let at = rec["state"]["at"].as_u64().unwrap() as usize;
        let step = &rec["state"]["steps"][at];
        if let Some(counts) = step["item_counts"].as_array().filter(|c| !c.is_empty()) {
            let n: u64 = counts.iter().map(|c| c["n"].as_u64().unwrap()).sum();
            let name = step["name"].as_str().unwrap().to_string();
            if matches!(name.as_str(), "final-sync" | "move" | "check") {
                assert_eq!(n as usize, N, "step {name} counts {n} items: {counts:?}");
            }
            counted.insert(name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counted.contains("move"), "no stored record of the move step counted its items: {counted:?}");
    let ended = wait_ended(&mut c, &e.id).await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);

    let record = drover_store::KvStore::get(&raw, format!("{prefix}executions/{}", e.id).as_bytes())
        .await
        .unwrap()
        .expect("the run's record");
    let stored: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(stored["state"]["items_apart"], true, "{stored}");
    for step in stored["state"]["steps"].as_array().unwrap() {
        assert!(step["items"].as_array().is_none_or(|i| i.is_empty()), "items in the record: {step}");
    }
    assert!(record.value.len() < 12 << 10, "the record is {} bytes", record.value.len());
    let (items, _) =
        drover_store::KvStore::range(&raw, format!("{prefix}execution-items/{}/", e.id).as_bytes()).await.unwrap();

    let shown: serde_json::Value = serde_json::from_str(&ended.state_json).unwrap();
    let mut total = 0;
    for step in shown["steps"].as_array().unwrap() {
        let n = step["items"].as_array().map_or(0, |i| i.len());
        if matches!(step["name"].as_str(), Some("final-sync" | "move" | "check")) {
            assert_eq!(n, N, "the API shows step {} with every group", step["name"]);
            assert!(step["items"].as_array().unwrap().iter().all(|i| i["status"] == "succeeded"), "{step}");
        }
        total += n;
    }
    // Its lock list (a lock per group, more than a record lists) is kept apart too,
    // and GetExecution lists it whole.
    let lists = format!("{prefix}execution-items/{}/locks/", e.id).into_bytes();
    let (items, lists): (Vec<_>, Vec<_>) = items.into_iter().partition(|kv| !kv.key.starts_with(&lists));
    assert_eq!(items.len(), total, "one key per item");
    let listed: Vec<String> = serde_json::from_slice(&lists[0].value).unwrap();
    assert_eq!((lists.len(), listed.len()), (1, N), "the lock list kept apart");
    assert_eq!((stored["locks"].as_array().map_or(0, Vec::len), stored["locks_apart"].as_u64()), (0, Some(N as u64)));
    assert_eq!((ended.locks.len(), ended.lock_count), (N, N as u32), "GetExecution lists every lock");
    let item_bytes: usize = items.iter().map(|kv| kv.value.len()).sum();
    println!(
        "runbook record: {} bytes for {N} groups; {} item keys holding {item_bytes} bytes",
        record.value.len(),
        items.len()
    );
    let r: serde_json::Value = serde_json::from_str(&report(&mut c, &e.id, "json").await).unwrap();
    assert_eq!(r["groups"].as_array().unwrap().len(), N, "the report lists every group");
    let answer: serde_json::Value = serde_json::from_str(&ended.output_json).unwrap();
    assert_eq!(answer["value"]["totals"]["failed"], 0, "{answer}");

    // The items a page at a time, and through the CLI, which pages by itself.
    let step = shown["steps"].as_array().unwrap().iter().position(|s| s["name"] == "move").unwrap() as u32;
    let (mut names, mut marker) = (Vec::new(), String::new());
    loop {
        let req = pb::ListExecutionItemsRequest { id: e.id.clone(), step, limit: 25, marker };
        let page = c.executions.list_execution_items(req).await.unwrap().into_inner();
        assert!(page.items_json.len() <= 25);
        for j in &page.items_json {
            names.push(serde_json::from_str::<serde_json::Value>(j).unwrap()["name"].as_str().unwrap().to_string());
        }
        marker = page.next_marker;
        if marker.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = shown["steps"][step as usize]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, expected, "every item of the step once, in order");
    let out = cluster.cli(&["execution", "items", &e.id, "--step", &step.to_string(), "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), N, "{listed}");
    let out = cluster.cli(&["execution", "items", &e.id, "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let every: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(every["items"].as_array().unwrap().len(), total, "every step's items, without --step");
    let wrong = c
        .executions
        .list_execution_items(pb::ListExecutionItemsRequest { id: e.id.clone(), step: 99, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument, "{wrong:?}");
}

/// A check step reads its groups several at a time and gives each group its own verdict:
/// all pass a check they meet (with an RPO bound, the RPO is recorded); against a status
/// only one of them has, the other two fail, each named in the report with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_step_gives_each_group_its_own_verdict() {
    let cluster = Cluster::start(StoreChoice::Embedded, &[]).await;
    let mut c = cluster.clients().await;
    groups(&c, "chk", 3).await;
    let check = |status: &str, bound: &str| pb::RunbookRequest {
        file_name: "checks.yaml".into(),
        text: format!(
            "name: checks\nsteps:\n  - verify:\n      name: check\n      groups: {{ names: [chk-000, chk-001, chk-002], \
             project: tests }}\n      status: {status}\n{bound}"
        ),
        params: Default::default(),
    };
    let run = |c: &mut Clients, r: pb::RunbookRequest| {
        let mut c = c.clone();
        async move {
            let e = c.runbooks.run_runbook(r).await.expect("run").into_inner();
            wait_ended(&mut c, &e.id).await
        }
    };
    let e = run(&mut c, check("enabled", "      max_rpo: 1h\n")).await;
    assert_eq!(e.status, "succeeded", "{}", e.error);
    let r: serde_json::Value = serde_json::from_str(&report(&mut c, &e.id, "json").await).unwrap();
    let items = r["steps"][0]["items"].as_array().expect("the check's items");
    assert_eq!(items.len(), 3, "{r}");
    for i in items {
        assert_eq!(i["status"], "succeeded", "{i}");
        assert!(i["rpo_ms"].as_i64().is_some_and(|ms| ms >= 0), "the check recorded the group's RPO: {i}");
    }

    c.replication.failover_group(failover_request("chk-001", "backend-b", false)).await.expect("failover");
    let e = run(&mut c, check("failed-over", "")).await;
    assert_eq!(e.status, "failed");
    assert!(e.error.contains("2 of 3 groups failed the check"), "{}", e.error);
    let text = report(&mut c, &e.id, "json").await;
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let items = report["steps"][0]["items"].as_array().expect("the check's items").clone();
    let verdict = |name: &str| {
        let i = items.iter().find(|i| i["name"] == name).unwrap_or_else(|| panic!("{name} in {text}"));
        (i["status"].as_str().unwrap().to_string(), i["reason"].as_str().unwrap_or("").to_string())
    };
    for name in ["chk-000", "chk-002"] {
        assert_eq!(verdict(name), ("failed".into(), "replication is enabled, expected failed-over".into()), "{name}");
    }
    assert_eq!(verdict("chk-001").0, "succeeded");
}
