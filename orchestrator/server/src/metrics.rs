//! The orchestrator's Prometheus metrics (served at `metrics_listen`, see
//! `drover_proto::metrics`).
//!
//! Label sets stay bounded: API latency is by method (the fixed list of RPCs) and gRPC
//! code; store metrics and executions have no per-object labels. The group series are
//! per group by design (`group` is the group's name, `project` its project), as an RPO
//! is per group; they follow the groups that exist (a deleted group's series go).
//!
//! Group gauges are read, not counted: each scrape refreshes them (concurrent scrapes
//! share one refresh), asking the agents for the newest point of each replicated group.
//! That is one agent call per replicated volume per scrape, fine for hundreds of groups;
//! a deployment of many thousands should scrape less often.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::{GroupRec, keys, replication_status as rs};
use crate::service::Core;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Api {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
    pub project: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupState {
    pub group: String,
    pub project: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecState {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExecEnd {
    pub kind: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// Every metric of one orchestrator.
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub api_seconds: Family<Api, Histogram, fn() -> Histogram>,
    pub store_txn_seconds: Histogram,
    pub store_txn_conflicts: Counter,
    pub group_rpo_seconds: Family<GroupLabel, FGauge>,
    pub group_interval_seconds: Family<GroupLabel, FGauge>,
    pub group_last_sync_seconds: Family<GroupLabel, FGauge>,
    pub group_last_sync_bytes: Family<GroupLabel, Gauge>,
    pub group_status: Family<GroupState, Gauge>,
    pub executions: Family<ExecState, Gauge>,
    pub at_prompt: Gauge,
    pub execution_seconds: Family<ExecEnd, Histogram, fn() -> Histogram>,
    pub backend_up: Family<BackendLabel, Gauge>,
    pub backend_frozen: Family<BackendLabel, Gauge>,
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// The label sets the last refresh set, per read family: a refresh removes only those
    /// it did not set again, so a scrape encoding meanwhile never misses a live series.
    live: std::sync::Mutex<Live>,
}

#[derive(Default)]
struct Live {
    rpo: HashSet<GroupLabel>,
    interval: HashSet<GroupLabel>,
    last_sync: HashSet<GroupLabel>,
    last_bytes: HashSet<GroupLabel>,
    status: HashSet<GroupState>,
    backends: HashSet<BackendLabel>,
}

/// Removes from `family` the label sets in `before` that are not in `now`, and keeps
/// `now` as the live ones.
fn retire<L, M, C>(family: &Family<L, M, C>, before: &mut HashSet<L>, now: HashSet<L>)
where
    L: Clone + std::hash::Hash + Eq,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    for gone in before.difference(&now) {
        family.remove(gone);
    }
    *before = now;
}

fn latency() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The replication statuses a group's state set covers.
const STATUSES: [&str; 9] = [
    rs::DISABLED,
    rs::ENABLING,
    rs::ENABLED,
    rs::FAILING_OVER,
    rs::FAILED_OVER,
    rs::FAILING_BACK,
    rs::DISABLING,
    rs::ERROR,
    rs::NOT_CAPABLE,
];

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("drover");
        let api_seconds =
            Family::<Api, Histogram, fn() -> Histogram>::new_with_constructor(latency as fn() -> Histogram);
        r.register("api_request_seconds", "API request latency, by RPC and gRPC code", api_seconds.clone());
        let store_txn_seconds = latency();
        r.register("store_txn_seconds", "Latency of store transactions", store_txn_seconds.clone());
        let store_txn_conflicts = Counter::default();
        r.register(
            "store_txn_conflicts",
            "Store transactions whose comparisons failed (a concurrent change won)",
            store_txn_conflicts.clone(),
        );
        let group_rpo_seconds = Family::<GroupLabel, FGauge>::default();
        r.register(
            "group_rpo_seconds",
            "Age of the group's newest complete recovery point at its target (-1: none yet)",
            group_rpo_seconds.clone(),
        );
        let group_interval_seconds = Family::<GroupLabel, FGauge>::default();
        r.register("group_interval_seconds", "The group's replication interval", group_interval_seconds.clone());
        let group_last_sync_seconds = Family::<GroupLabel, FGauge>::default();
        r.register("group_last_sync_seconds", "How long the group's last sync took", group_last_sync_seconds.clone());
        let group_last_sync_bytes = Family::<GroupLabel, Gauge>::default();
        r.register("group_last_sync_bytes", "Bytes the group's last sync shipped", group_last_sync_bytes.clone());
        let group_status = Family::<GroupState, Gauge>::default();
        r.register(
            "group_replication_status",
            "The group's replication status (1 for the current one)",
            group_status.clone(),
        );
        let executions = Family::<ExecState, Gauge>::default();
        r.register("executions", "Executions that have not ended", executions.clone());
        let execution_seconds =
            Family::<ExecEnd, Histogram, fn() -> Histogram>::new_with_constructor(latency as fn() -> Histogram);
        r.register(
            "execution_seconds",
            "Executions that ended here, from submit to end, by kind and final status",
            execution_seconds.clone(),
        );
        let at_prompt = Gauge::default();
        r.register("executions_at_prompt", "Runbook runs waiting at a prompt for approve or reject", at_prompt.clone());
        let backend_up = Family::<BackendLabel, Gauge>::default();
        r.register("backend_up", "1 when at least one of the backend's agents answers its probe", backend_up.clone());
        let backend_frozen = Family::<BackendLabel, Gauge>::default();
        r.register(
            "backend_frozen",
            "1 while the backend is frozen (management changes refused)",
            backend_frozen.clone(),
        );
        Arc::new(Self {
            registry: Arc::new(r),
            api_seconds,
            store_txn_seconds,
            store_txn_conflicts,
            group_rpo_seconds,
            group_interval_seconds,
            group_last_sync_seconds,
            group_last_sync_bytes,
            group_status,
            executions,
            at_prompt,
            execution_seconds,
            backend_up,
            backend_frozen,
            refreshed: tokio::sync::Mutex::new(None),
            live: Default::default(),
        })
    }

    /// Brings the read gauges up to date. Scrapes that arrive while a refresh runs wait
    /// for it and use its values (it started after they asked only if it is newer).
    pub async fn refresh(&self, core: &Arc<Core>) {
        let asked = Instant::now();
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|started| started >= asked) {
            return;
        }
        let started = Instant::now();
        if let Err(e) = self.read(core).await {
            tracing::warn!(error = %e, "could not refresh the metrics; they show the last values read");
        }
        *last = Some(started);
    }

    async fn read(&self, core: &Arc<Core>) -> crate::error::ApiResult<()> {
        let groups: Vec<GroupRec> =
            core.repo.list::<GroupRec>(keys::GROUPS).await?.into_iter().map(|g| g.rec).collect();
        // Series of groups that are gone (or no longer replicate) go with them.
        let mut now = Live::default();
        for g in &groups {
            let l = GroupLabel { group: g.name.clone(), project: g.project.clone() };
            for s in STATUSES {
                let state = GroupState { group: g.name.clone(), project: g.project.clone(), status: s.into() };
                self.group_status.get_or_create(&state).set(i64::from(g.replication_status == s));
                now.status.insert(state);
            }
            self.group_interval_seconds.get_or_create(&l).set(g.sync_interval_seconds as f64);
            now.interval.insert(l.clone());
            if !matches!(g.replication_status.as_str(), rs::ENABLED | rs::FAILED_OVER) {
                continue;
            }
            let infos = crate::service::shared::volume_infos(core, g).await?;
            let rpo = crate::service::shared::rpo_ms(&infos);
            self.group_rpo_seconds.get_or_create(&l).set(if rpo < 0 { -1.0 } else { rpo as f64 / 1000.0 });
            now.rpo.insert(l.clone());
            if let Some(last) = infos.iter().max_by_key(|i| i.last_sync_time_ms) {
                self.group_last_sync_seconds.get_or_create(&l).set(last.last_sync_duration_ms as f64 / 1000.0);
                now.last_sync.insert(l.clone());
            }
            let bytes: i64 = infos.iter().map(|i| i.last_sync_bytes).sum();
            self.group_last_sync_bytes.get_or_create(&l).set(bytes);
            now.last_bytes.insert(l);
        }
        let running = core.procedures.running().await?;
        self.executions.get_or_create(&ExecState { status: "running".into() }).set(running.len() as i64);
        let prompting = running.iter().filter(|e| e.step.starts_with("prompt:")).count();
        self.at_prompt.set(prompting as i64);
        let sites = crate::service::sites::SiteApi { core: core.clone() };
        for b in core.repo.list::<crate::model::BackendRec>(keys::BACKENDS).await? {
            let label = BackendLabel { backend: b.rec.name.clone() };
            let d = sites.describe(&b.rec).await?;
            self.backend_up.get_or_create(&label).set(i64::from(d.status == "up"));
            self.backend_frozen.get_or_create(&label).set(i64::from(b.rec.frozen));
            now.backends.insert(label);
        }
        let mut live = self.live.lock().expect("live label sets");
        retire(&self.group_rpo_seconds, &mut live.rpo, now.rpo);
        retire(&self.group_interval_seconds, &mut live.interval, now.interval);
        retire(&self.group_last_sync_seconds, &mut live.last_sync, now.last_sync);
        retire(&self.group_last_sync_bytes, &mut live.last_bytes, now.last_bytes);
        retire(&self.group_status, &mut live.status, now.status);
        let mut backends = live.backends.clone();
        retire(&self.backend_up, &mut backends, now.backends.clone());
        retire(&self.backend_frozen, &mut live.backends, now.backends);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_removes_only_the_series_it_did_not_set_again() {
        let family = Family::<BackendLabel, Gauge>::default();
        let (a, b) = (BackendLabel { backend: "a".into() }, BackendLabel { backend: "b".into() });
        family.get_or_create(&a).set(1);
        family.get_or_create(&b).set(1);
        let mut live: HashSet<BackendLabel> = [a.clone(), b.clone()].into();
        retire(&family, &mut live, [b.clone()].into());
        let mut registry = Registry::default();
        registry.register("up", "test", family.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("up{backend=\"b\"} 1") && !out.contains("backend=\"a\""), "{out}");
        assert_eq!(live, [b].into());
    }
}
