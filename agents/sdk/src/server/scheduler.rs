//! The periodic sync scheduler: the primary side takes each replicated group's recovery
//! points at its interval, so the RPO holds even while no orchestrator is up.

use std::collections::HashMap;
use std::sync::Arc;

use crate::driver::Driver;

/// Runs each replicated group's periodic sync on the primary side, so the RPO holds even
/// while no orchestrator is up. The driver serialises syncs of one group.
pub(super) async fn run_scheduler(driver: Arc<dyn Driver>, shutdown: tokio_util::sync::CancellationToken) {
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
            running.insert(
                group,
                tokio::spawn(async move {
                    match d.sync_group(&g, false, None).await {
                        Ok(r) => tracing::info!(group = %g, rp = %r.recovery_point_id, bytes = r.bytes, ms = r.duration_ms, "periodic sync"),
                        Err(e) => tracing::warn!(group = %g, error = %e, "periodic sync failed; will retry at the next interval"),
                    }
                }),
            );
        }
    }
}
