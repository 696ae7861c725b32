//! Reaching agents: which agents serve a backend, their liveness, and calls with
//! deadlines and bounded, jittered retries of idempotent calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use drover_proto::agent::v1 as apb;
use drover_proto::agent::v1::agent_client::AgentClient;
use drover_proto::trace::{Inject, Traced};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::config::OrchestratorConfig;
use crate::error::{ApiError, ApiResult};
use crate::model::{AgentRec, keys};
use crate::repo::Repo;

/// Dials and calls agents.
pub struct AgentPool {
    repo: Repo,
    config: OrchestratorConfig,
    channels: Mutex<HashMap<String, Channel>>,
    view: std::sync::Arc<RegistrationView>,
}

/// Every agent registration, as the store holds them, kept current by a watch (see
/// [`AgentPool::follow_registrations`]): calls find their agents here instead of reading
/// the store each time. While the watch is not live (at start, or after the store broke
/// it) every lookup reads the store.
#[derive(Default)]
pub struct RegistrationView {
    state: std::sync::RwLock<ViewState>,
    /// Lookups answered from the view, and from the store (for tests and metrics).
    pub hits: std::sync::atomic::AtomicU64,
    pub misses: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct ViewState {
    /// A snapshot was read and the watch from its revision runs.
    live: bool,
    /// The store revision the view reflects.
    revision: i64,
    /// Registration key to record.
    agents: std::collections::BTreeMap<String, AgentRec>,
}

impl RegistrationView {
    /// A backend's registrations, when the view is live and knows some.
    fn lookup(&self, backend: &str) -> Option<Vec<AgentRec>> {
        let state = self.state.read().expect("registration view poisoned");
        if !state.live {
            return None;
        }
        let prefix = keys::agents_of(backend);
        let found: Vec<AgentRec> = state
            .agents
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, r)| r.clone())
            .collect();
        (!found.is_empty()).then_some(found)
    }

    /// The revision the view reflects, while it is live.
    pub fn revision(&self) -> Option<i64> {
        let state = self.state.read().expect("registration view poisoned");
        state.live.then_some(state.revision)
    }

    fn stale(&self) {
        self.state.write().expect("registration view poisoned").live = false;
    }
}

/// Which of a backend's deadlines a call gets (each may be set per backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// An ordinary call.
    Call,
    /// A call to the side a group is failing away from.
    FailedSite,
    /// A liveness or information probe.
    Probe,
    /// A recovery point sync.
    Sync,
}

/// What a failed agent call means for the caller: the one classifier every agent call
/// goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The agent decided: retrying the same request cannot succeed.
    Terminal,
    /// Nothing happened (a read, or a mutation the agent reports failed transiently):
    /// trying again may succeed.
    Retryable,
    /// The call may or may not have taken effect (deadline, lost connection, the target
    /// busy, an agent error): for a mutation, ask the agent before doing anything else.
    Unknown,
}

/// Classifies a failed call. Only the agent's considered refusals are terminal; anything
/// else leaves a mutation's outcome unknown until the agent is asked.
pub fn classify(status: &Status) -> Failure {
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::Unimplemented
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated => Failure::Terminal,
        _ => Failure::Unknown,
    }
}

/// Metadata on the error of a mutation whose every attempt the agent recorded as failed
/// for a transient cause: none of them runs any more, so the caller may start the work
/// again under a new op_id (see [`attempts_spent`]).
const ATTEMPTS_SPENT: &str = "drover-attempts-spent";

/// Whether `status` is the error of a mutation whose attempts were all recorded as failed
/// by the agent ([`AgentPool::mutate`] after [`MAX_ATTEMPTS`]). An error without it may
/// leave the outcome unknown, and only the same op_id may be sent again.
pub fn attempts_spent(status: &Status) -> bool {
    status.metadata().get(ATTEMPTS_SPENT).is_some()
}

fn retryable(status: &Status) -> bool {
    classify(status) != Failure::Terminal
}

/// A mutating agent request: it carries an op context whose op_id the pool may suffix
/// (`#2`, `#3`, …) to retry after the agent recorded a transient failure.
pub trait Mutation: Clone + Send + 'static {
    /// The request's op context.
    fn ctx_mut(&mut self) -> &mut Option<apb::OpContext>;
}

macro_rules! mutations {
    ($($t:ty),* $(,)?) => {
        $(impl Mutation for $t {
            fn ctx_mut(&mut self) -> &mut Option<apb::OpContext> {
                &mut self.ctx
            }
        })*
    };
}

mutations!(
    apb::CreateVolumeRequest,
    apb::DeleteVolumeRequest,
    apb::ExtendVolumeRequest,
    apb::CreateGroupSnapshotRequest,
    apb::DeleteSnapshotRequest,
    apb::AttachVolumeRequest,
    apb::DetachVolumeRequest,
    apb::ManageVolumeRequest,
    apb::UnmanageVolumeRequest,
    apb::EnableReplicationRequest,
    apb::DisableReplicationRequest,
    apb::PromoteVolumeRequest,
    apb::DemoteVolumeRequest,
    apb::ResyncVolumeRequest,
    apb::SyncGroupRequest,
    apb::CloneRecoveryPointRequest,
    apb::DeleteCloneRequest,
);

/// How many times a mutation is tried under new op_ids after the agent recorded a
/// transient failure.
const MAX_ATTEMPTS: u32 = 4;

/// The op_id of attempt `n` (1-based) of an operation: the base id, then `base#n`.
pub fn attempt_op_id(base: &str, n: u32) -> String {
    if n <= 1 { base.to_string() } else { format!("{base}#{n}") }
}

/// An op context for one agent call.
pub fn ctx(op_id: String, epoch: u64, fence_scope: String) -> Option<apb::OpContext> {
    Some(apb::OpContext { op_id, epoch, fence_scope })
}

impl AgentPool {
    pub fn new(repo: Repo, config: OrchestratorConfig) -> Self {
        Self { repo, config, channels: Mutex::new(HashMap::new()), view: Default::default() }
    }

    /// The registration view, for its counters.
    pub fn view(&self) -> &RegistrationView {
        &self.view
    }

    /// Keeps the registration view current until `shutdown`: reads every registration at
    /// one revision, then applies the watch's changes from the next one (a lease that
    /// lapses deletes its registration, which the watch reports). A broken watch makes
    /// the view stale (lookups read the store) until a new snapshot is read.
    pub fn follow_registrations(&self, shutdown: tokio_util::sync::CancellationToken) {
        let (view, store) = (self.view.clone(), self.repo.store().clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let ended = tokio::select! {
                    r = follow(&view, store.as_ref()) => r,
                    () = shutdown.cancelled() => return,
                };
                view.stale();
                tracing::debug!(error = %ended, "the agent registration watch ended; reading the store until it is back");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// The deadline of a call of `kind` to `backend`.
    pub fn deadline(&self, backend: &str, kind: Deadline) -> Duration {
        let s = self.config.backend(backend);
        match kind {
            Deadline::Call => s.agent_call_timeout,
            Deadline::FailedSite => s.failed_site_timeout,
            Deadline::Probe => s.probe_timeout,
            Deadline::Sync => s.sync_timeout,
        }
    }

    /// The live registrations of a backend's agents (their leases are current): from
    /// the view when it is live and knows the backend, else from the store (a backend
    /// with no agent in the view is always read, so a registration the watch has not
    /// delivered yet is found).
    pub async fn registrations(&self, backend: &str) -> ApiResult<Vec<AgentRec>> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(found) = self.view.lookup(backend) {
            self.view.hits.fetch_add(1, Relaxed);
            return Ok(found);
        }
        self.view.misses.fetch_add(1, Relaxed);
        self.stored_registrations(backend).await
    }

    /// Where the agent that calls to `backend` go to listens now (the one
    /// [`AgentPool::call`] picks); `None` when the backend has no live agent or the
    /// store cannot say.
    pub async fn endpoint(&self, backend: &str) -> Option<String> {
        let agents = self.registrations(backend).await.ok()?;
        pick_agent(backend, agents).ok().map(|a| a.endpoint)
    }

    /// A backend's registrations read from the store now.
    pub async fn stored_registrations(&self, backend: &str) -> ApiResult<Vec<AgentRec>> {
        Ok(self.repo.list::<AgentRec>(&keys::agents_of(backend)).await?.into_iter().map(|v| v.rec).collect())
    }

    fn channel(&self, endpoint: &str, timeout: Duration) -> ApiResult<Channel> {
        let key = format!("{endpoint}|{}", timeout.as_millis());
        let mut map = self.channels.lock().expect("channel map poisoned");
        if let Some(ch) = map.get(&key) {
            return Ok(ch.clone());
        }
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| ApiError::Internal(format!("agent endpoint {endpoint:?} is not a URI: {e}")))?;
        // Agents accept mutations only from a client certificate of the orchestrator
        // role, and this checks the agent's certificate is an agent's.
        if let Some(tls) = self.config.tls_files() {
            let cfg = tls.client(drover_proto::tls::AGENT_NAME).map_err(ApiError::Unavailable)?;
            ep = ep.tls_config(cfg).map_err(|e| ApiError::Internal(format!("TLS towards agent {endpoint}: {e}")))?;
        }
        let ch = ep.connect_timeout(timeout.min(Duration::from_secs(3))).timeout(timeout).connect_lazy();
        map.insert(key, ch.clone());
        Ok(ch)
    }

    /// A client for one agent endpoint, with a per-call deadline.
    /// A client of one agent; its calls carry the current span's trace (`traceparent`).
    pub fn client(&self, endpoint: &str, timeout: Duration) -> ApiResult<AgentClient<Traced>> {
        Ok(AgentClient::with_interceptor(self.channel(endpoint, timeout)?, Inject))
    }

    /// Probes one agent; `Err` says why it is not ready.
    pub async fn probe(&self, endpoint: &str, timeout: Duration) -> Result<(), String> {
        let mut client = self.client(endpoint, timeout).map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, client.probe(apb::ProbeRequest {})).await {
            Err(_) => Err(format!("no answer within {timeout:?}")),
            Ok(Err(s)) => Err(s.message().to_string()),
            Ok(Ok(r)) if r.get_ref().ready => Ok(()),
            Ok(Ok(r)) => Err(r.into_inner().detail),
        }
    }

    /// Runs one mutation on a backend's agent and returns its outcome, never running it
    /// twice (DESIGN.md: "honest about the unknown").
    ///
    /// - A success or a terminal refusal is the answer.
    /// - Any other failure leaves the outcome unknown, so the agent is asked
    ///   (`GetOperation`) before anything else: `running` is waited for; `succeeded` is
    ///   fetched by sending the same op_id again (the agent replays it); `failed` with a
    ///   transient code is tried again under the next op_id (`base#2`, …, at most
    ///   [`MAX_ATTEMPTS`]); `unknown` means the agent never started it, so the same op_id
    ///   is sent again.
    /// - An agent that cannot be asked leaves the outcome unknown: the error says so, and
    ///   the caller (a procedure) resumes later with the same op_id.
    ///
    /// Walking the attempts is deterministic, so a resumed procedure finds every earlier
    /// attempt's record on the agent and continues where the last one ended.
    pub async fn mutate<R, T, F, Fut>(&self, backend: &str, kind: Deadline, req: R, f: F) -> Result<T, Status>
    where
        R: Mutation,
        F: Fn(AgentClient<Traced>, R) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let timeout = self.deadline(backend, kind);
        let base = req.clone().ctx_mut().as_ref().map(|c| c.op_id.clone()).unwrap_or_default();
        let mut attempt = 1;
        let mut unreachable = 0u32;
        let mut backoff = Duration::from_millis(100);
        let (mut store_wait, mut store_waited) = (Duration::from_millis(100), Duration::ZERO);
        loop {
            let op_id = attempt_op_id(&base, attempt);
            let mut req = req.clone();
            if let Some(ctx) = req.ctx_mut() {
                ctx.op_id = op_id.clone();
            }
            let agent = match self.registrations(backend).await {
                Ok(list) => pick_agent(backend, list)?,
                // The orchestrator's own store did not answer (an etcd restart): nothing was
                // sent, so waiting for the store is safe, up to the call's deadline.
                Err(e) if store_waited < timeout => {
                    tracing::warn!(backend, error = %e, "cannot read the backend's agents from the store; waiting for it");
                    tokio::time::sleep(store_wait).await;
                    store_waited += store_wait;
                    store_wait = (store_wait * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(Status::from(e)),
            };
            let client = self.client(&agent.endpoint, timeout).map_err(Status::from)?;
            let epoch = req.clone().ctx_mut().as_ref().map_or(0, |c| c.epoch);
            let span = tracing::info_span!("agent_call", backend, agent = %agent.agent_id, op_id = %op_id, epoch);
            let answer = match tokio::time::timeout(timeout, f(client, req)).instrument(span).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "agent {} of backend {backend} did not answer within {timeout:?}",
                    agent.agent_id
                ))),
            };
            let failed = match answer {
                Ok(v) => return Ok(v),
                Err(s) if classify(&s) == Failure::Terminal => return Err(s),
                Err(s) => s,
            };
            tracing::info!(backend, op_id, code = ?failed.code(), error = failed.message(), "outcome unknown; asking the agent");
            match self.ask(&agent.endpoint, &op_id, timeout).await {
                Ok(rec) => {
                    unreachable = 0;
                    match rec.state.as_str() {
                        // Fetch the recorded answer by sending the same op_id again.
                        "succeeded" => continue,
                        "failed" => {
                            let status = Status::new(Code::from_i32(rec.code), rec.message);
                            if classify(&status) == Failure::Terminal {
                                return Err(status);
                            }
                            if attempt >= MAX_ATTEMPTS {
                                let mut spent = tonic::metadata::MetadataMap::new();
                                spent.insert(ATTEMPTS_SPENT, tonic::metadata::MetadataValue::from(attempt));
                                return Err(Status::with_metadata(
                                    status.code(),
                                    format!("{} (after {attempt} attempts of operation {base})", status.message()),
                                    spent,
                                ));
                            }
                            attempt += 1;
                            continue;
                        }
                        "running" => {
                            self.wait_finished(&agent.endpoint, &op_id, timeout).await?;
                            continue;
                        }
                        // Never started (or the target was busy with another op): send the
                        // same op_id again after a pause.
                        _ => {}
                    }
                }
                Err(e) => {
                    unreachable += 1;
                    if unreachable >= 4 {
                        return Err(Status::unavailable(format!(
                            "the outcome of operation {op_id} on backend {backend} is unknown: its agent could not be \
                             asked ({}); first error: {}",
                            e.message(),
                            failed.message()
                        )));
                    }
                }
            }
            tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(0..50))).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Raises the fence of `scope` to `epoch` on every live agent of `backend`. A new owner
    /// does this on taking over, so the old owner is refused there from then on.
    pub async fn fence(&self, backend: &str, scope: &str, epoch: i64, kind: Deadline) -> Result<(), Status> {
        let timeout = self.deadline(backend, kind);
        let agents = self.registrations(backend).await.map_err(Status::from)?;
        if agents.is_empty() {
            return Err(Status::unavailable(format!("backend {backend} has no live agent to fence")));
        }
        for agent in agents {
            let mut client = self.client(&agent.endpoint, timeout).map_err(Status::from)?;
            let req = apb::FenceRequest {
                ctx: Some(apb::OpContext { op_id: "fence".into(), epoch: epoch as u64, fence_scope: scope.into() }),
            };
            match tokio::time::timeout(timeout, client.fence(req)).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => return Err(Status::deadline_exceeded(format!("fencing {scope} on {backend} timed out"))),
            }
        }
        Ok(())
    }

    /// Asks an agent what became of an op.
    async fn ask(&self, endpoint: &str, op_id: &str, timeout: Duration) -> Result<apb::OperationRecord, Status> {
        let probe = timeout.min(Duration::from_secs(5));
        let mut client = self.client(endpoint, probe).map_err(Status::from)?;
        let req = apb::GetOperationRequest { op_id: op_id.to_string() };
        match tokio::time::timeout(probe, client.get_operation(req)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!("GetOperation {op_id} had no answer within {probe:?}"))),
        }
    }

    /// Waits until the agent no longer reports the op as running (bounded by twice the
    /// call's deadline).
    async fn wait_finished(&self, endpoint: &str, op_id: &str, timeout: Duration) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + timeout * 2;
        let mut pause = Duration::from_millis(50);
        loop {
            let rec = self.ask(endpoint, op_id, timeout).await?;
            if rec.state != "running" {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!(
                    "operation {op_id} is still running on its agent after {:?}; it will be asked again on resume",
                    timeout * 2
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Calls a backend's agents: the first registered agent that answers serves the call.
    /// Idempotent calls (with an op_id) are retried up to three times with jitter on
    /// transient failures; others are tried once per agent.
    pub async fn call<T, F, Fut>(&self, backend: &str, kind: Deadline, idempotent: bool, f: F) -> Result<T, Status>
    where
        F: Fn(AgentClient<Traced>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let timeout = self.deadline(backend, kind);
        let mut agents = self.registrations(backend).await.map_err(Status::from)?;
        if agents.is_empty() {
            return Err(Status::unavailable(format!(
                "backend {backend} has no live agent; start its agent, or check `drover backend show {backend}`"
            )));
        }
        agents.reverse();
        let mut last = Status::unavailable(format!("no agent of backend {backend} answered"));
        let mut tried: Vec<String> = Vec::new();
        // Agents as the view knows them; if none answers, once more with any registration
        // the store holds that was not tried (an agent that came back on a new address an
        // instant ago, before the watch told the view).
        while let Some(agent) = agents.pop() {
            if tried.contains(&agent.endpoint) {
                continue;
            }
            tried.push(agent.endpoint.clone());
            let agent = &agent;
            let client = self.client(&agent.endpoint, timeout).map_err(Status::from)?;
            let once = || {
                let client = client.clone();
                let fut = f(client);
                let span = tracing::debug_span!("agent_call", backend, agent = %agent.agent_id);
                async move {
                    match tokio::time::timeout(timeout, fut).await {
                        Ok(r) => r.map(tonic::Response::into_inner),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "agent {} of backend {backend} did not answer within {timeout:?}",
                            agent.agent_id
                        ))),
                    }
                }
                .instrument(span)
            };
            let result = if idempotent {
                once.retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(1))
                        .with_max_times(3)
                        .with_jitter(),
                )
                .when(retryable)
                .await
            } else {
                once().await
            };
            match result {
                Ok(v) => return Ok(v),
                // Only transport-level failures move on to the backend's next agent.
                Err(s) if retryable(&s) && (idempotent || s.code() == Code::Unavailable) => last = s,
                Err(s) => return Err(s),
            }
            if agents.is_empty()
                && self.view.revision().is_some()
                && let Ok(stored) = self.stored_registrations(backend).await
            {
                agents = stored.into_iter().rev().filter(|a| !tried.contains(&a.endpoint)).collect();
            }
        }
        Err(last)
    }
}

/// Reads every registration at one revision into `view`, then applies the watch from the
/// next revision until it breaks; returns why it ended.
async fn follow(view: &RegistrationView, store: &dyn drover_store::KvStore) -> drover_store::StoreError {
    use futures::StreamExt;
    let (kvs, revision) = match store.range(keys::AGENTS.as_bytes()).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let mut events = match store.watch(keys::AGENTS.as_bytes(), revision + 1).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    {
        let mut state = view.state.write().expect("registration view poisoned");
        state.agents = kvs
            .into_iter()
            .filter_map(|kv| {
                let rec = serde_json::from_slice::<AgentRec>(&kv.value).ok()?;
                Some((String::from_utf8_lossy(&kv.key).into_owned(), rec))
            })
            .collect();
        state.revision = revision;
        state.live = true;
    }
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => return e,
        };
        let mut state = view.state.write().expect("registration view poisoned");
        let key = String::from_utf8_lossy(event.key()).into_owned();
        match &event {
            drover_store::WatchEvent::Put(kv) => match serde_json::from_slice::<AgentRec>(&kv.value) {
                Ok(rec) => {
                    state.agents.insert(key, rec);
                }
                Err(_) => {
                    state.agents.remove(&key);
                }
            },
            drover_store::WatchEvent::Delete(_) => {
                state.agents.remove(&key);
            }
        }
        state.revision = event.revision();
    }
    drover_store::StoreError::Unavailable("the watch stream ended".into())
}

/// The agent that serves a backend's mutations: its first live registration (by agent
/// id), so an op and the question about it reach the same ledger; or why there is none.
fn pick_agent(backend: &str, mut agents: Vec<AgentRec>) -> Result<AgentRec, Status> {
    agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
    agents.into_iter().next().ok_or_else(|| {
        Status::unavailable(format!(
            "backend {backend} has no live agent; start its agent, or check `drover backend show {backend}`"
        ))
    })
}

#[cfg(test)]
mod view_tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;

    use drover_store::KvStore;

    use super::*;

    fn rec(backend: &str, id: &str, endpoint: &str) -> Vec<u8> {
        serde_json::to_vec(&AgentRec {
            agent_id: id.into(),
            site: "s".into(),
            backend: backend.into(),
            endpoint: endpoint.into(),
            driver: "mock".into(),
            driver_version: "1".into(),
            capabilities: Vec::new(),
            registered_at_ms: 0,
        })
        .unwrap()
    }

    async fn until(what: &str, ok: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn registrations_come_from_the_watched_view_and_follow_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KvStore> =
            Arc::new(drover_store::EmbeddedStore::open(&dir.path().join("store.redb")).await.unwrap());
        store.put(keys::agent("b1", "a1").as_bytes(), &rec("b1", "a1", "http://one")).await.unwrap();
        let pool = AgentPool::new(Repo::new(store.clone()), OrchestratorConfig::default());
        // Not following yet: the store answers.
        assert_eq!(pool.registrations("b1").await.unwrap()[0].endpoint, "http://one");
        assert_eq!((pool.view().hits.load(Relaxed), pool.view().misses.load(Relaxed)), (0, 1));
        let stop = tokio_util::sync::CancellationToken::new();
        pool.follow_registrations(stop.clone());
        until("the view goes live", || pool.view().revision().is_some()).await;
        for _ in 0..10 {
            assert_eq!(pool.registrations("b1").await.unwrap()[0].endpoint, "http://one");
        }
        assert_eq!(pool.view().hits.load(Relaxed), 10, "ten lookups, no store read");
        // An agent that comes back on a new address, a second agent, and one that goes.
        store.put(keys::agent("b1", "a1").as_bytes(), &rec("b1", "a1", "http://two")).await.unwrap();
        store.put(keys::agent("b2", "a9").as_bytes(), &rec("b2", "a9", "http://nine")).await.unwrap();
        let rev = store.put(keys::agent("b1", "a2").as_bytes(), &rec("b1", "a2", "http://three")).await.unwrap();
        until("the view reaches the last write", || pool.view().revision() >= Some(rev)).await;
        let b1: Vec<String> = pool.registrations("b1").await.unwrap().into_iter().map(|a| a.endpoint).collect();
        assert_eq!(b1, ["http://two", "http://three"], "only b1's, in key order");
        let rev = store.delete(keys::agent("b1", "a1").as_bytes()).await.unwrap();
        until("the delete arrives", || pool.view().revision() >= Some(rev)).await;
        assert_eq!(pool.registrations("b1").await.unwrap().len(), 1);
        // A backend the view does not know is read from the store.
        let misses = pool.view().misses.load(Relaxed);
        assert!(pool.registrations("b3").await.unwrap().is_empty());
        assert_eq!(pool.view().misses.load(Relaxed), misses + 1);
        stop.cancel();
    }
}
