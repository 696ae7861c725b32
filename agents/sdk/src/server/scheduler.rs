//! The periodic sync scheduler: the primary side takes each replicated group's recovery
//! points at its interval, so the RPO holds even while no orchestrator is up.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::driver::{Driver, ScheduledSync};

/// Periodic syncs that failed, waiting for the next heartbeat to tell the orchestrator
/// (which makes them user messages). Bounded: the oldest go first when it is full.
#[derive(Clone, Default)]
pub struct SyncFailures(Arc<std::sync::Mutex<Vec<drover_proto::v1::SyncFailure>>>);

/// The most failures kept between two heartbeats.
const MAX_KEPT: usize = 100;

impl SyncFailures {
    fn push(&self, group_id: &str, error: String) {
        let mut q = self.0.lock().expect("sync failures");
        if q.len() == MAX_KEPT {
            q.remove(0);
        }
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        q.push(drover_proto::v1::SyncFailure { group_id: group_id.to_string(), error, at_ms });
    }

    /// Takes every failure kept so far.
    pub fn drain(&self) -> Vec<drover_proto::v1::SyncFailure> {
        std::mem::take(&mut *self.0.lock().expect("sync failures"))
    }
}

/// Where the backends that periodic syncs ship to have their agents now, as the
/// orchestrator last said in a heartbeat's answer. The scheduler says which backends it
/// needs; the registration loop asks about them and keeps the answer.
///
/// Without it a primary keeps the address its driver stored at the last orchestrated
/// sync, and a peer agent that came back elsewhere (a new host, another `advertise`)
/// would be dialed at its old address until the group's next orchestrated sync.
#[derive(Clone, Default)]
pub struct PeerEndpoints(Arc<std::sync::Mutex<PeerState>>);

#[derive(Default)]
struct PeerState {
    wanted: BTreeSet<String>,
    known: HashMap<String, String>,
}

impl PeerEndpoints {
    /// The backends the scheduled syncs ship to now.
    pub fn wanted(&self) -> Vec<String> {
        self.0.lock().expect("peer endpoints").wanted.iter().cloned().collect()
    }

    /// Keeps the orchestrator's answer. A backend it left out has no live agent: its
    /// syncs go back to the address the driver stored.
    pub fn learn(&self, endpoints: HashMap<String, String>) {
        let endpoints: HashMap<String, String> = endpoints.into_iter().filter(|(_, e)| !e.is_empty()).collect();
        let mut st = self.0.lock().expect("peer endpoints");
        for (backend, endpoint) in &endpoints {
            if st.known.get(backend) != Some(endpoint) {
                tracing::info!(backend = %backend, endpoint = %endpoint, "peer agent endpoint");
            }
        }
        st.known = endpoints;
    }

    fn want(&self, backends: BTreeSet<String>) {
        self.0.lock().expect("peer endpoints").wanted = backends;
    }

    fn endpoint(&self, backend: &str) -> Option<String> {
        self.0.lock().expect("peer endpoints").known.get(backend).cloned()
    }
}

/// Runs each replicated group's periodic sync on the primary side, so the RPO holds even
/// while no orchestrator is up. The driver serialises syncs of one group. Each sync is
/// given its peer's endpoint when `peers` knows it.
pub(super) async fn run_scheduler(
    driver: Arc<dyn Driver>,
    failures: SyncFailures,
    peers: PeerEndpoints,
    metrics: Arc<crate::metrics::AgentMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut last: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
        running.retain(|_, h| !h.is_finished());
        let now = tokio::time::Instant::now();
        let schedule = driver.sync_schedule();
        peers.want(schedule.iter().map(|s| s.peer_backend.clone()).filter(|b| !b.is_empty()).collect());
        for ScheduledSync { group_id: group, interval, peer_backend } in schedule {
            // A group's first point is taken when replication is enabled; the clock starts now.
            let since = *last.entry(group.clone()).or_insert(now);
            if now.duration_since(since) < interval || running.contains_key(&group) {
                continue;
            }
            last.insert(group.clone(), now);
            let d = driver.clone();
            let g = group.clone();
            let failures = failures.clone();
            let metrics = metrics.clone();
            let endpoint = peers.endpoint(&peer_backend);
            running.insert(
                group,
                tokio::spawn(async move {
                    let result = d.sync_group(&g, false, endpoint.as_deref()).await;
                    metrics.synced(&g, "scheduled", &result);
                    match result {
                        Ok(r) => tracing::info!(group = %g, rp = %r.recovery_point_id, bytes = r.bytes, ms = r.duration_ms, "periodic sync"),
                        Err(e) => {
                            tracing::warn!(group = %g, error = %e, "periodic sync failed; will retry at the next interval");
                            failures.push(&g, e.to_string());
                        }
                    }
                }),
            );
        }
    }
}
