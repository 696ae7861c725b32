//! The periodic sync scheduler: the primary side takes each replicated group's recovery
//! points at its interval, so the RPO holds even while no orchestrator is up.

use std::collections::HashMap;
use std::sync::Arc;

use crate::driver::Driver;

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

/// Runs each replicated group's periodic sync on the primary side, so the RPO holds even
/// while no orchestrator is up. The driver serialises syncs of one group.
pub(super) async fn run_scheduler(
    driver: Arc<dyn Driver>,
    failures: SyncFailures,
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
        for (group, interval) in driver.sync_schedule() {
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
            running.insert(
                group,
                tokio::spawn(async move {
                    let result = d.sync_group(&g, false, None).await;
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
