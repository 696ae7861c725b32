//! An agent's Prometheus metrics (served at `metrics_listen`, see
//! `drover_proto::metrics`).
//!
//! Label sets stay bounded: operations by their name (the fixed list of agent RPCs) and
//! outcome (`ok` or the gRPC code); bytes shipped per group by design (a group is what
//! one sync ships); nothing carries an op id or a volume id.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

/// Every metric of one agent.
pub struct AgentMetrics {
    pub registry: Arc<Registry>,
    pub op_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Gauge,
    pub shipped_bytes: Family<GroupLabel, Counter>,
    pub syncs: Family<OpLabels, Counter>,
    pub received_bytes: Counter,
    /// Restarts of the backend's data-plane process, as the driver counts them (brought
    /// up to date before each scrape).
    pub backend_restarts: Counter,
    /// Failed syncs, per group (by design: a failing group must be named).
    pub sync_failures: Family<GroupLabel, Counter>,
    /// TCP connections accepted (from orchestrators and peer agents, each kept for many
    /// calls): steady once its callers connected.
    pub accepted_connections: Counter,
}

fn latency() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl AgentMetrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("drover_agent");
        let op_seconds =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency as fn() -> Histogram);
        r.register("op_seconds", "Mutating operations, by operation and outcome", op_seconds.clone());
        let in_flight = Gauge::default();
        r.register("ops_in_flight", "Mutating operations running now", in_flight.clone());
        let shipped_bytes = Family::<GroupLabel, Counter>::default();
        r.register("shipped_bytes", "Bytes of recovery points shipped to the peer, by group", shipped_bytes.clone());
        let syncs = Family::<OpLabels, Counter>::default();
        r.register("syncs", "Syncs this side ran as the source (op: asked or scheduled), by outcome", syncs.clone());
        let received_bytes = Counter::default();
        r.register("received_bytes", "Bytes of recovery points received from peers", received_bytes.clone());
        let backend_restarts = Counter::default();
        r.register(
            "backend_restarts",
            "Times the backend's data-plane process (qemu-storage-daemon) was restarted after it died or hung",
            backend_restarts.clone(),
        );
        let sync_failures = Family::<GroupLabel, Counter>::default();
        r.register("sync_failures", "Syncs of the group that failed on this side (the source)", sync_failures.clone());
        let accepted_connections = Counter::default();
        r.register(
            "accepted_connections",
            "TCP connections this agent accepted (callers keep and reuse theirs)",
            accepted_connections.clone(),
        );
        Arc::new(Self {
            registry: Arc::new(r),
            op_seconds,
            in_flight,
            shipped_bytes,
            syncs,
            received_bytes,
            backend_restarts,
            sync_failures,
            accepted_connections,
        })
    }

    /// Brings the counters the driver keeps up to date.
    pub fn refresh(&self, driver: &dyn crate::driver::Driver) {
        let now = driver.backend_restarts();
        let seen = self.backend_restarts.get();
        if now > seen {
            self.backend_restarts.inc_by(now - seen);
        }
    }

    /// A sync this side ran as the source: `how` is `asked` or `scheduled`.
    pub fn synced(
        &self,
        group: &str,
        how: &str,
        result: &Result<crate::driver::SyncReport, crate::driver::DriverError>,
    ) {
        let outcome = match result {
            Ok(r) => {
                self.shipped_bytes.get_or_create(&GroupLabel { group: group.to_string() }).inc_by(r.bytes);
                "ok".to_string()
            }
            Err(e) => {
                self.sync_failures.get_or_create(&GroupLabel { group: group.to_string() }).inc();
                format!("{:?}", e.to_status().code())
            }
        };
        self.syncs.get_or_create(&OpLabels { op: how.into(), outcome }).inc();
    }
}
