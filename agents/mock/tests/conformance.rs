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
