//! The qemu driver passes the driver conformance suite behind real agent servers, each
//! side with its own qemu-storage-daemon and pool.

use drover_agent_qemu::{QemuConfig, QemuDriver};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_driver_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut sides = Vec::new();
    for side in ["a", "b"] {
        let pool = dir.path().join(format!("pool-{side}"));
        std::fs::create_dir_all(&pool).unwrap();
        let config = QemuConfig { pool_dir: pool, ..Default::default() };
        let driver = QemuDriver::start(config, &dir.path().join(format!("state-{side}")), &format!("conf-{side}"))
            .await
            .unwrap();
        sides.push(driver);
    }
    let secondary = sides.pop().unwrap();
    let primary = sides.pop().unwrap();
    drover_agent::conformance::run_against(primary, secondary, dir.path()).await;
}
