//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`, which
//! `cargo xtask test` installs) against a real orchestrator and two qemu agents. The test
//! signs in, finds the group with its status and RPO on the groups page, runs a failover
//! runbook that waits at a prompt, watches the execution's progress on its page, approves,
//! and sees the page (by its own polling) turn into the run's DR report. A reader of
//! another project sees none of it. Screenshots go to a temp dir, or to
//! `$DROVER_SCREENSHOTS` (the README's are made so:
//! `DROVER_SCREENSHOTS=docs/screenshots cargo test -p drover-tests --test dashboard`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drover_cli::client::Clients;
use drover_proto::v1 as pb;
use drover_tests::cluster::admin_token;
use drover_tests::{Cluster, StoreChoice, consistent_group};

const MIB: u64 = 1 << 20;

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(p) =
            std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
        {
            return p;
        }
    }
    panic!("no chromium on PATH; install Debian's `chromium` package (`cargo xtask test` does)")
}

/// A headless browser with its own profile (cookies persist across calls with the same
/// `profile`).
struct Browser {
    bin: PathBuf,
    profile: PathBuf,
}

impl Browser {
    fn new(dir: &Path, name: &str) -> Self {
        Browser { bin: chromium(), profile: dir.join(format!("chromium-{name}")) }
    }

    fn command(&self, size: &str) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .arg(format!("--window-size={size}"));
        c
    }

    /// The DOM after the page loaded and its scripts ran for 3 s of virtual time.
    fn dom(&self, url: &str) -> String {
        self.dom_within(url, 3000)
    }

    /// The DOM after `budget_ms` of virtual time (a running execution's page long-polls
    /// its server, and virtual time stands still while it waits: keep those short).
    fn dom_within(&self, url: &str, budget_ms: u64) -> String {
        let out = self
            .command("1280,900")
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .args(["--dump-dom", url])
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium failed on {url}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A browser left on a page (its scripts run) whose DOM is dumped when `budget`
    /// of virtual time has passed. Virtual time stands still while a fetch is pending,
    /// so a page that long-polls its server follows real events meanwhile.
    fn watch(&self, url: &str, budget: Duration) -> std::process::Child {
        self.command("1280,900")
            .arg(format!("--virtual-time-budget={}", budget.as_millis()))
            .args(["--dump-dom", url])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// A PNG of the page at `size` ("W,H"), in `dir`, after `budget_ms` of virtual time.
    fn screenshot(&self, url: &str, dir: &Path, name: &str, size: &str, budget_ms: u64) -> PathBuf {
        let file = dir.join(name);
        let out = self
            .command(size)
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .arg("--hide-scrollbars")
            .arg(format!("--screenshot={}", file.display()))
            .arg(url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium screenshot of {url}: {}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&file).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} is a real picture", file.display());
        file
    }
}

/// The dashboard address the orchestrator logged at start.
fn dashboard_addr(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find("serving the dashboard on http://") {
            let rest = &text[at + "serving the dashboard on http://".len()..];
            return rest.split('/').next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{} logged no dashboard address", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The text of the element whose opening tag contains `marker`, tags stripped.
fn row<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom.find(marker).unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let end = dom[at..].find("</tr>").map_or(dom.len(), |e| at + e);
    &dom[at..end]
}

const RUNBOOK: &str = r#"name: web-move
description: the web group to site B, after a yes
steps:
  - prompt:
      name: confirm
      message: Move the web group to site B?
  - failover:
      name: move
      groups: { names: ["web"], project: "tests" }
  - verify:
      name: check
      groups: { names: ["web"], project: "tests" }
      status: failed-over
      after_step: move
"#;

async fn wait_step(c: &mut Clients, id: &str, what: impl Fn(&pb::Execution) -> bool) -> pb::Execution {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = c.executions.get_execution(pb::GetExecutionRequest { id: id.into() }).await.unwrap().into_inner();
        if what(&e) {
            return e;
        }
        assert!(Instant::now() < deadline, "execution {id} stayed at {} ({})", e.step, e.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_groups_progress_and_the_report_in_a_browser() {
    let cluster =
        Cluster::start_custom(StoreChoice::Embedded, "qemu", &[], &["--set", "dashboard_listen=127.0.0.1:0"]).await;
    let addr = dashboard_addr(&cluster.orchestrator.proc.log);
    let url = |p: &str| format!("http://{addr}{p}");
    let shots = std::env::var_os("DROVER_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(|| cluster.path().into());
    std::fs::create_dir_all(&shots).unwrap();
    let mut c = cluster.clients().await;
    consistent_group(&mut c, "web", 2, 16 * MIB).await;
    consistent_group(&mut c, "db", 1, 16 * MIB).await;
    for (g, interval) in [("web", 60), ("db", 3600)] {
        let r = c
            .replication
            .enable_replication(pb::EnableReplicationRequest {
                group: g.into(),
                project: "tests".into(),
                target_backend: "backend-b".into(),
                sync_interval_seconds: interval,
                no_wait: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.group.unwrap().replication_status, "enabled");
    }

    // Not signed in: the sign-in page.
    let admin = Browser::new(cluster.path(), "admin");
    let dom = admin.dom(&url("/groups"));
    assert!(dom.contains("<h1>Sign in</h1>"), "{dom}");
    // A wrong token is refused with what to do.
    let dom = admin.dom(&url("/login#token=dr_nope.wrong"));
    assert!(dom.contains("That token is not valid"), "{dom}");
    // The token in the fragment signs in and lands on the overview.
    let token = admin_token(cluster.path());
    let dom = admin.dom(&url(&format!("/login#token={token}")));
    assert!(dom.contains("<h1>Overview</h1>") && dom.contains("id=\"backends\""), "{dom}");
    let b = row(&dom, "<td>backend-a</td>");
    assert!(b.contains("badge ok\">up") && b.contains("1 of 1"), "backend-a is up with its agent: {b}");

    // The groups page: both groups, enabled, with an RPO inside the interval (green).
    let dom = admin.dom(&url("/groups"));
    let web = row(&dom, "data-group=\"web\"");
    assert!(web.contains("badge ok\">enabled"), "{web}");
    assert!(web.contains("class=\"rpo ok\""), "a fresh point is within the 60 s interval: {web}");
    let rpo: i64 = web.split("data-rpo-ms=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert!((0..60_000).contains(&rpo), "{web}");
    assert!(web.contains("<td>60 s</td>") && web.contains("backend-a"), "{web}");
    assert!(row(&dom, "data-group=\"db\"").contains("badge ok\">enabled"), "{dom}");
    admin.screenshot(&url("/groups"), &shots, "groups.png", "1280,720", 3000);
    admin.screenshot(&url("/groups"), &shots, "groups-phone.png", "390,844", 3000);
    admin.screenshot(&url("/"), &shots, "overview.png", "1280,900", 3000);

    // A failover runbook that waits at a prompt: the page shows where it is.
    let e = c
        .runbooks
        .run_runbook(pb::RunbookRequest {
            file_name: "web-move.yaml".into(),
            text: RUNBOOK.into(),
            params: Default::default(),
        })
        .await
        .expect("run the runbook")
        .into_inner();
    wait_step(&mut c, &e.id, |e| e.step.starts_with("prompt")).await;
    let page = url(&format!("/executions/{}", e.id));
    let dom = admin.dom_within(&page, 100);
    assert!(dom.contains("data-status=\"running\"") && dom.contains("Waiting for a decision"), "{dom}");
    assert!(dom.contains("0 of 3 done"), "nothing done yet, 3 units (prompt, move, check): {dom}");
    assert!(row(&dom, "data-step=\"confirm\"").contains("badge busy\">waiting"), "{dom}");
    assert!(!dom.contains("id=\"report\""), "no report while it runs: {dom}");
    admin.screenshot(&page, &shots, "execution-running.png", "1280,720", 100);

    // The page left open follows the run by itself: approve while it watches.
    let watching = admin.watch(&page, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.executions
        .decide_prompt(pb::DecidePromptRequest {
            id: e.id.clone(),
            prompt: String::new(),
            approve: true,
            by: "dashboard test".into(),
            ..Default::default()
        })
        .await
        .expect("approve");
    let ended = wait_step(&mut c, &e.id, |e| e.status != "running").await;
    assert_eq!(ended.status, "succeeded", "{}", ended.error);
    let out = tokio::task::spawn_blocking(move || watching.wait_with_output().unwrap()).await.unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-ended=\"1\"") && dom.contains("id=\"report\""),
        "the open page reached the report: {dom}"
    );

    // The report on the page: the group's outcome, its RPO and the final sync beside
    // their predictions, and the decision.
    let dom = admin.dom(&page);
    let r = row(&dom, "<tr data-group=\"web\"><td>");
    assert!(r.contains("badge ok\">succeeded"), "{r}");
    assert!(r.contains(" bytes in "), "the final sync shipped, and was predicted: {r}");
    assert!(dom.contains("Decision: <b>approved</b> by dashboard test"), "{dom}");
    admin.screenshot(&page, &shots, "execution-report.png", "1280,1000", 3000);
    let dom = admin.dom(&url("/groups"));
    assert!(row(&dom, "data-group=\"web\"").contains("failed-over"), "{dom}");

    // A reader of another project sees no group and not the admin's execution.
    let other = c
        .tokens
        .create_token(pb::CreateTokenRequest { name: "viewer".into(), project: "other".into(), role: "reader".into() })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let reader = Browser::new(cluster.path(), "reader");
    let dom = reader.dom(&url(&format!("/login#token={other}")));
    assert!(dom.contains("<h1>Overview</h1>"), "{dom}");
    let dom = reader.dom(&url("/groups"));
    assert!(dom.contains("No groups to show") && !dom.contains("data-group=\"web\""), "{dom}");
    let dom = reader.dom(&page);
    assert!(dom.contains("404") && !dom.contains("id=\"report\""), "{dom}");
}
