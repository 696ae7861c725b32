//! The driver conformance suite, against the mock driver and against the qemu driver, each
//! behind a real agent gRPC server on a loopback port.

use std::sync::Arc;

use drover_agent::conformance::{Gate, Gated, Pair, run_all};
use drover_agent::driver::Driver;
use drover_agent::ledger::Ledger;
use drover_agent_mock::{MockConfig, MockDriver};
use drover_agent_qemu::{QemuConfig, QemuDriver};
use drover_proto::agent::v1::agent_client::AgentClient;
use tokio_util::sync::CancellationToken;

struct Served {
    endpoint: String,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn serve(driver: Arc<dyn Driver>, dir: &std::path::Path) -> Served {
    let ledger = Ledger::open(&dir.join("ledger.redb")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token = CancellationToken::new();
    let running = drover_agent::server::serve(driver, ledger, listener, token.clone()).await.unwrap();
    Served { endpoint: format!("http://{}", running.local_addr), _shutdown: token.drop_guard() }
}

async fn pair(primary: Arc<dyn Driver>, secondary: Arc<dyn Driver>, dir: &std::path::Path) -> (Pair, Vec<Served>) {
    let gate = Gate::new();
    let gated: Arc<dyn Driver> = Arc::new(Gated { inner: primary, gate: gate.clone() });
    std::fs::create_dir_all(dir.join("p")).unwrap();
    std::fs::create_dir_all(dir.join("s")).unwrap();
    let p = serve(gated, &dir.join("p")).await;
    let s = serve(secondary, &dir.join("s")).await;
    let pair = Pair {
        primary: AgentClient::connect(p.endpoint.clone()).await.unwrap(),
        primary_endpoint: p.endpoint.clone(),
        secondary: AgentClient::connect(s.endpoint.clone()).await.unwrap(),
        secondary_endpoint: s.endpoint.clone(),
        gate,
    };
    (pair, vec![p, s])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_driver_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pair, _servers) = pair(
        Arc::new(MockDriver::new(MockConfig::default())),
        Arc::new(MockDriver::new(MockConfig::default())),
        dir.path(),
    )
    .await;
    run_all(&mut pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_driver_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = |side: &str| {
        let pool = dir.path().join(format!("pool-{side}"));
        std::fs::create_dir_all(&pool).unwrap();
        (QemuConfig { pool_dir: pool, nbd_tcp: None }, dir.path().join(format!("state-{side}")))
    };
    let (pc, ps) = qemu("a");
    let (sc, ss) = qemu("b");
    let primary = QemuDriver::start(pc, &ps, "conf-a").await.unwrap();
    let secondary = QemuDriver::start(sc, &ss, "conf-b").await.unwrap();
    let (mut pair, _servers) = pair(primary, secondary, dir.path()).await;
    run_all(&mut pair).await;
}
