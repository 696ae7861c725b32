//! The drill leaves no process behind: every qemu-storage-daemon (and compute instance)
//! it started is gone when it ends, whether it finished or was interrupted; a whole drill
//! also moves an application to site B and back with its log intact.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_tests::cluster::{daemons_under, locate_drover};

#[test]
fn the_drill_leaves_no_daemon_behind_when_it_ends_or_is_interrupted() {
    let bin = locate_drover().unwrap();
    // A whole drill.
    let done = tempfile::tempdir().unwrap();
    let out = Command::new(&bin).args(["drill", "--workdir"]).arg(done.path()).output().unwrap();
    assert!(out.status.success(), "the drill failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(daemons_under(done.path()), Vec::<String>::new(), "daemons outlived the drill");
    // Its application went to site B and back, its log checked at each.
    let said = String::from_utf8_lossy(&out.stdout);
    for site in ["B", "A"] {
        let at = said.find(&format!("check the instance's log at site {site}")).unwrap_or_else(|| panic!("{said}"));
        assert!(said[at..].contains("an exact prefix holding every acknowledged one"), "{said}");
    }
    let instances = Command::new("pgrep").args(["-f", &done.path().display().to_string()]).output().unwrap();
    assert!(
        instances.stdout.is_empty(),
        "instances outlived the drill: {}",
        String::from_utf8_lossy(&instances.stdout)
    );

    // An interrupted one: SIGINT once its daemons run.
    let cut = tempfile::tempdir().unwrap();
    let mut child = Command::new(&bin)
        .args(["drill", "--workdir"])
        .arg(cut.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemons_under(cut.path()).len() < 2 {
        assert!(Instant::now() < deadline, "the drill's daemons never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted drill reports failure");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(daemons_under(cut.path()), Vec::<String>::new(), "daemons outlived the interrupted drill");
}
