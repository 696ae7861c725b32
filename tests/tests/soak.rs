//! The qemu soak for two minutes, as part of the test command (`cargo xtask soak
//! --minutes N` runs it for longer): real agents and daemons, writers whose records must
//! survive planned moves and form an exact prefix after disasters, agents that answer,
//! bounded chains, no orphan daemon. It found the lost-writes bug (a commit's base not
//! flushed before the layers above it were dropped).

use std::process::Command;

use drover_tests::cluster::locate_bin;

#[test]
fn a_two_minute_soak_finds_no_violation() {
    let soak = locate_bin("soak").expect("the soak binary (cargo build --workspace --bins)");
    let out = Command::new(soak).args(["--minutes", "2"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "the soak found violations:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("0 violations"), "{stdout}");
    let steps: u64 =
        stdout.split(" steps").next().and_then(|s| s.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(steps >= 10, "the soak did too little to prove anything: {stdout}");
}
