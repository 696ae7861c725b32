//! The mock driver passes the driver conformance suite behind real agent servers.

use std::sync::Arc;

use drover_agent_mock::{MockConfig, MockDriver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_driver_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Arc::new(MockDriver::new(MockConfig::default()));
    let secondary = Arc::new(MockDriver::new(MockConfig::default()));
    drover_agent::conformance::run_against(primary, secondary, dir.path()).await;
}

/// Volumes created at once by many tasks (each journaled as it is made) are all in the
/// state files when the calls return: a mock reopened from them has every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_in_the_state_file_when_its_call_returns() {
    use drover_agent::driver::Driver;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mock-state.json");
    let driver = Arc::new(MockDriver::with_state_file(MockConfig::default(), file.clone()).unwrap());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let driver = driver.clone();
            tokio::spawn(async move { driver.create_volume(&format!("v{i:03}"), 1 << 20).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Reopened while the first is still alive: only what was written counts.
    let reopened = MockDriver::with_state_file(MockConfig::default(), file).unwrap();
    for i in 0..200 {
        // Asking for another size is refused only for a volume the file brought back.
        let v = reopened.create_volume(&format!("v{i:03}"), 2 << 20).await;
        assert!(v.is_err(), "volume v{i:03} is missing from the state file: {v:?}");
    }
}

/// The images a mock is configured to hold unmanaged are on its "disk" from its first
/// start: reopened without the setting, before any call changed anything, it still
/// lists them, and a second start with the setting does not bring back one it gave
/// away since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_unmanaged_images_survive_a_restart_without_the_setting() {
    use drover_agent::driver::Driver;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mock-state.json");
    let config = || MockConfig { unmanaged: [("legacy".to_string(), 1 << 20)].into(), ..MockConfig::default() };
    drop(MockDriver::with_state_file(config(), file.clone()).unwrap());
    let reopened = MockDriver::with_state_file(MockConfig::default(), file.clone()).unwrap();
    let listed: Vec<String> = reopened.list_manageable().await.unwrap().into_iter().map(|m| m.reference).collect();
    assert_eq!(listed, ["legacy"]);
    reopened.manage_volume("legacy", "v1", &[]).await.unwrap();
    drop(reopened);
    let again = MockDriver::with_state_file(config(), file).unwrap();
    assert!(again.list_manageable().await.unwrap().is_empty(), "the managed image is not offered again");
}
