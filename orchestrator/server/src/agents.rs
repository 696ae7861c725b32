//! Reaching agents: which agents serve a backend, their liveness, and calls with
//! deadlines and bounded, jittered retries of idempotent calls.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use drover_proto::agent::v1 as apb;
use drover_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::config::OrchestratorConfig;
use crate::error::{ApiError, ApiResult};
use crate::model::{AgentRec, keys};
use crate::repo::Repo;

/// Dials and calls agents.
pub struct AgentPool {
    repo: Repo,
    config: OrchestratorConfig,
    channels: Mutex<HashMap<String, Channel>>,
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

/// Whether a call may be retried as it is: only calls carrying an op_id, and only on
/// failures that say nothing was decided.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown)
}

/// An op context for one agent call.
pub fn ctx(op_id: String, epoch: u64, fence_scope: String) -> Option<apb::OpContext> {
    Some(apb::OpContext { op_id, epoch, fence_scope })
}

impl AgentPool {
    pub fn new(repo: Repo, config: OrchestratorConfig) -> Self {
        Self { repo, config, channels: Mutex::new(HashMap::new()) }
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

    /// The live registrations of a backend's agents (their leases are current).
    pub async fn registrations(&self, backend: &str) -> ApiResult<Vec<AgentRec>> {
        Ok(self.repo.list::<AgentRec>(&keys::agents_of(backend)).await?.into_iter().map(|v| v.rec).collect())
    }

    fn channel(&self, endpoint: &str, timeout: Duration) -> ApiResult<Channel> {
        let key = format!("{endpoint}|{}", timeout.as_millis());
        let mut map = self.channels.lock().expect("channel map poisoned");
        if let Some(ch) = map.get(&key) {
            return Ok(ch.clone());
        }
        let ch = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| ApiError::Internal(format!("agent endpoint {endpoint:?} is not a URI: {e}")))?
            .connect_timeout(timeout.min(Duration::from_secs(3)))
            .timeout(timeout)
            .connect_lazy();
        map.insert(key, ch.clone());
        Ok(ch)
    }

    /// A client for one agent endpoint, with a per-call deadline.
    pub fn client(&self, endpoint: &str, timeout: Duration) -> ApiResult<AgentClient<Channel>> {
        Ok(AgentClient::new(self.channel(endpoint, timeout)?))
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

    /// Calls a backend's agents: the first registered agent that answers serves the call.
    /// Idempotent calls (with an op_id) are retried up to three times with jitter on
    /// transient failures; others are tried once per agent.
    pub async fn call<T, F, Fut>(&self, backend: &str, kind: Deadline, idempotent: bool, f: F) -> Result<T, Status>
    where
        F: Fn(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let timeout = self.deadline(backend, kind);
        let agents = self.registrations(backend).await.map_err(Status::from)?;
        if agents.is_empty() {
            return Err(Status::unavailable(format!(
                "backend {backend} has no live agent; start its agent, or check `drover backend show {backend}`"
            )));
        }
        let mut last = Status::unavailable(format!("no agent of backend {backend} answered"));
        for agent in &agents {
            let client = self.client(&agent.endpoint, timeout).map_err(Status::from)?;
            let once = || {
                let client = client.clone();
                let fut = f(client);
                async move {
                    match tokio::time::timeout(timeout, fut).await {
                        Ok(r) => r.map(tonic::Response::into_inner),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "agent {} of backend {backend} did not answer within {timeout:?}",
                            agent.agent_id
                        ))),
                    }
                }
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
        }
        Err(last)
    }
}
