//! The orchestrator's Prometheus metrics (served at `metrics_listen`, see
//! `drover_proto::metrics`).
//!
//! Label sets stay bounded: API latency is by method (the fixed list of RPCs) and gRPC
//! code; store metrics and executions have no per-object labels. The group series are
//! per group by design (`group` is the group's name, `project` its project), as an RPO
//! is per group; they follow the groups that exist (a deleted group's series go).
//!
//! Group gauges are read, not counted: each scrape refreshes them (concurrent scrapes
//! share one refresh), asking the agents for the newest point of each replicated group,
//! [`REFRESH_PARALLEL`] groups at a time. That is one agent call per replicated volume
//! per refresh. A scrape waits for its refresh at most [`REFRESH_WAIT`], so an agent
//! that stops answering (each of its calls then waits out the probe deadline) or a very
//! large deployment cannot make scrapes time out: past the wait the scrape is served the
//! values as they stand (the last refresh's, some already renewed) and the refresh goes
//! on for the next one. `drover_metrics_refresh_seconds` and
//! `drover_metrics_refreshed_timestamp_seconds` say how long the last complete refresh
//! took and when it ended; a deployment of many thousands of groups should scrape less
//! often than a refresh takes.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

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

/// Groups whose agents a refresh asks at once.
pub const REFRESH_PARALLEL: usize = 32;

/// How long a scrape waits for its refresh before it is served the values as they stand.
/// Prometheus gives a scrape 10 s by default.
pub const REFRESH_WAIT: Duration = Duration::from_secs(5);

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
    pub refresh_seconds: FGauge,
    pub refreshed_timestamp_seconds: FGauge,
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
        let refresh_seconds = FGauge::default();
        r.register(
            "metrics_refresh_seconds",
            "How long the last complete refresh of the group and backend gauges took",
            refresh_seconds.clone(),
        );
        let refreshed_timestamp_seconds = FGauge::default();
        r.register(
            "metrics_refreshed_timestamp_seconds",
            "When the last complete refresh of the group and backend gauges ended (Unix time)",
            refreshed_timestamp_seconds.clone(),
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
            refresh_seconds,
            refreshed_timestamp_seconds,
            refreshed: tokio::sync::Mutex::new(None),
            live: Default::default(),
        })
    }

    /// Brings the read gauges up to date, waiting at most [`REFRESH_WAIT`]; the refresh
    /// runs on after that, and the next scrape gets its values.
    pub async fn refresh(&self, core: &Arc<Core>) {
        let asked = Instant::now();
        let run = {
            let core = core.clone();
            tokio::spawn(async move { core.metrics.refresh_since(&core, asked).await })
        };
        if tokio::time::timeout(REFRESH_WAIT, run).await.is_err() {
            tracing::warn!(
                wait_ms = REFRESH_WAIT.as_millis() as u64,
                "the metrics refresh is still running; this scrape shows the values as they stand \
                 (see drover_metrics_refresh_seconds; scrape less often, or bring back the agents that do not answer)"
            );
        }
    }

    /// A refresh that starts after `asked`, unless one did meanwhile. Scrapes that arrive
    /// while a refresh runs wait for it; then one more refresh serves them all.
    async fn refresh_since(&self, core: &Arc<Core>, asked: Instant) {
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|started| started >= asked) {
            return;
        }
        let started = Instant::now();
        match self.read(core).await {
            Ok(()) => {
                self.refresh_seconds.set(started.elapsed().as_secs_f64());
                self.refreshed_timestamp_seconds.set(crate::model::now_ms() as f64 / 1000.0);
            }
            Err(e) => tracing::warn!(error = %e, "could not refresh the metrics; they show the last values read"),
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
            now.interval.insert(l);
        }
        // The agents' answers, several groups at once: an agent that does not answer
        // costs its probe deadline once per batch, not once per group. (The futures own
        // their group: a spawned refresh cannot borrow into a lazily mapped iterator.)
        let asks: Vec<_> = groups
            .into_iter()
            .filter(|g| matches!(g.replication_status.as_str(), rs::ENABLED | rs::FAILED_OVER))
            .map(|g| {
                let core = core.clone();
                async move { crate::service::shared::volume_infos(&core, &g).await.map(|infos| (g, infos)) }
            })
            .collect();
        let mut asked = futures::stream::iter(asks).buffer_unordered(REFRESH_PARALLEL);
        while let Some((g, infos)) = asked.try_next().await? {
            let l = GroupLabel { group: g.name.clone(), project: g.project.clone() };
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
        let backends = core.repo.list::<crate::model::BackendRec>(keys::BACKENDS).await?;
        // Every backend probed at once, for the same reason.
        let described = futures::future::join_all(backends.iter().map(|b| sites.describe(&b.rec))).await;
        for (b, d) in backends.iter().zip(described) {
            let label = BackendLabel { backend: b.rec.name.clone() };
            let d = d?;
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
