//! The tower layer in front of every orchestrator service: finds the method's rule,
//! checks the bearer token, refuses before the handler runs when the caller falls short,
//! attaches the [`Caller`] for the handler, and leaves an audit record of every mutating
//! call (accepted or refused).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::audit::{self, AuditRec};
use super::tokens::{Rejected, Verifier};
use super::{Caller, Need, Role, rule_for};
use crate::repo::Repo;

/// What the layer needs: the token verifier and the store for audit records.
pub struct Guard {
    pub verifier: Verifier,
    pub repo: Repo,
    /// Whether the server runs TLS: agents' calls then need an agent certificate.
    pub tls: bool,
    /// Tenants' limits.
    pub limits: TenantLimits,
    /// Where request latencies go.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The status a response carries in its headers (a refusal is trailers-only); an answer
/// carries its status in trailers, OK for every unary reply.
fn header_code<B>(resp: &http::Response<B>) -> tonic::Code {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
        .unwrap_or(tonic::Code::Ok)
}

impl Guard {
    /// Records a request's latency under its method (any path that is no known method
    /// counts as `unknown`, so callers cannot grow the label set) and code.
    fn observe(&self, path: &str, code: tonic::Code, started: std::time::Instant) {
        let known =
            rule_for(path).is_some() || path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.");
        let labels = crate::metrics::Api {
            method: if known { path.to_string() } else { "unknown".into() },
            code: format!("{code:?}"),
        };
        self.metrics.api_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    }
}

/// Per-project limits on non-admin callers' mutating calls.
pub struct TenantLimits {
    pub per_second: f64,
    pub burst: f64,
    pub max_running: usize,
    pub procedures: std::sync::Arc<drover_procedure::Manager>,
    /// Each project's token bucket: tokens left and when it was last filled.
    pub buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl TenantLimits {
    /// Takes one call from the project's bucket, or says when the next one fits.
    fn take(&self, project: &str) -> Result<(), std::time::Duration> {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets");
        let (tokens, at) = buckets.entry(project.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }

    /// Refuses a tenant's mutating call over the rate or the running-executions limit.
    async fn check(&self, caller: &Caller) -> Result<(), Status> {
        if let Err(wait) = self.take(&caller.project) {
            return Err(Status::resource_exhausted(format!(
                "project {} made more than {} changes a second (bursts of {}); retry in {} ms",
                caller.project,
                self.per_second,
                self.burst,
                wait.as_millis().max(1)
            )));
        }
        // From the index of pending executions, not by reading every execution ever run.
        let running = self
            .procedures
            .running_in(&caller.project)
            .await
            .map_err(|e| Status::unavailable(format!("{e}; retry shortly")))?;
        if running >= self.max_running {
            return Err(Status::resource_exhausted(format!(
                "project {} has {running} executions running, the most it may; wait for one to end \
                 (`drover execution list --status running`) and retry",
                caller.project
            )));
        }
        Ok(())
    }
}

impl Guard {
    /// The caller a request may go ahead as, or the status that refuses it.
    async fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<Option<Caller>, (Status, Option<Caller>)> {
        let Some(rule) = rule_for(path) else {
            return Err((
                Status::permission_denied(format!("{path} has no authorization rule; no one may call it")),
                None,
            ));
        };
        let need = match rule.need {
            Need::Public => return Ok(None),
            Need::Agent => return self.admit_agent(path, ext).map(|()| None).map_err(|s| (s, None)),
            Need::Role(r) => r,
        };
        let method = path.rsplit('/').next().unwrap_or(path);
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err((
                Status::unauthenticated(format!(
                    "{method} needs an API token: pass --token-file FILE or set DROVER_TOKEN (an admin makes tokens with `drover token create`)"
                )),
                None,
            ));
        };
        let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim).unwrap_or("");
        let caller = match self.verifier.verify(token).await {
            Ok(c) => c,
            Err(Rejected::Invalid) => {
                return Err((
                    Status::unauthenticated(
                        "the API token is not valid: check the token file or DROVER_TOKEN, or ask an admin for a new token",
                    ),
                    None,
                ));
            }
            Err(Rejected::Revoked { id, at_ms }) => {
                return Err((
                    Status::unauthenticated(format!(
                        "API token {id} was revoked (at {at_ms} ms since the epoch); ask an admin for a new one"
                    )),
                    None,
                ));
            }
            Err(Rejected::Unavailable(e)) => {
                return Err((Status::unavailable(format!("the token could not be checked: {e}; retry shortly")), None));
            }
        };
        if caller.role < need {
            let what = match need {
                Role::Admin => "an admin token",
                Role::Member => "a member or admin token",
                Role::Reader => "a token",
            };
            return Err((
                Status::permission_denied(format!(
                    "{method} needs {what}; this token ({}) is a {} of project {}",
                    caller.token_id,
                    caller.role.as_str(),
                    caller.project
                )),
                Some(caller),
            ));
        }
        if rule.mutates && !caller.is_admin() {
            self.limits.check(&caller).await.map_err(|s| (s, Some(caller.clone())))?;
        }
        Ok(Some(caller))
    }
}

impl Guard {
    /// Agents' calls need a client certificate of the agent role (over TLS).
    fn admit_agent(&self, path: &str, ext: &http::Extensions) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        let certs = drover_proto::tls::peer_certs(ext).unwrap_or_default();
        match drover_proto::tls::peer_role(&certs) {
            Some(drover_proto::tls::PeerRole::Agent) => Ok(()),
            _ => Err(Status::permission_denied(format!(
                "{path} is for agents: it needs a client certificate of the agent role, signed by this cluster's CA"
            ))),
        }
    }
}

/// Wraps the orchestrator's routes in a [`Guarded`] service.
#[derive(Clone)]
pub struct AuthLayer {
    pub guard: Arc<Guard>,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded { inner, guard: self.guard.clone() }
    }
}

/// The guarded service.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    guard: Arc<Guard>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Guarded<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        // The clone is ready only after poll_ready; call the one that was polled.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let path = req.uri().path().to_string();
            let mutates = rule_for(&path).is_none_or(|r| r.mutates);
            let ext = req.extensions();
            let peer = ext
                .get::<TcpConnectInfo>()
                .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().map(|i| i.get_ref()))
                .and_then(|i| i.remote_addr())
                .map(|a| a.to_string())
                .unwrap_or_default();
            let audit = |caller: Option<&Caller>, code: tonic::Code, message: String| {
                let c = caller.cloned();
                let rec = AuditRec {
                    token_id: c.as_ref().map(|c| c.token_id.clone()).unwrap_or_default(),
                    project: c.as_ref().map(|c| c.project.clone()).unwrap_or_default(),
                    role: c.as_ref().map(|c| c.role.as_str().to_string()).unwrap_or_default(),
                    method: path.clone(),
                    code: format!("{code:?}"),
                    message,
                    peer: peer.clone(),
                    ..Default::default()
                };
                let repo = guard.repo.clone();
                async move { audit::record(&repo, rec).await }
            };
            match guard.admit(&path, req.headers(), req.extensions()).await {
                Err((status, caller)) => {
                    guard.observe(&path, status.code(), started);
                    if mutates {
                        tokio::spawn(audit(caller.as_ref(), status.code(), status.message().to_string()));
                    }
                    Ok(status.into_http())
                }
                Ok(caller) => {
                    if let Some(c) = &caller {
                        req.extensions_mut().insert(c.clone());
                    }
                    // A call that waits on an execution answers inside the caller's deadline.
                    let timeout = crate::deadline::of(req.headers());
                    let mut resp = crate::deadline::scope(timeout, inner.call(req)).await?;
                    undecodable_is_invalid(&mut resp);
                    let code = header_code(&resp);
                    guard.observe(&path, code, started);
                    if mutates {
                        let message = resp
                            .headers()
                            .get("grpc-message")
                            .and_then(|v| v.to_str().ok())
                            // grpc-message is percent-encoded on the wire.
                            .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy().into_owned())
                            .unwrap_or_default();
                        tokio::spawn(audit(caller.as_ref(), code, message));
                    }
                    Ok(resp)
                }
            }
        })
    }
}

/// tonic answers a request body it cannot decode (invalid UTF-8 in a string, a wrong
/// wire type, a truncated message) with INTERNAL, as if the server had failed. It is the
/// client's mistake: say so with INVALID_ARGUMENT. The status is in the headers of such
/// a trailers-only answer.
fn undecodable_is_invalid<B>(resp: &mut http::Response<B>) {
    let h = resp.headers();
    if h.get("grpc-status").and_then(|v| v.to_str().ok()) != Some("13") {
        return;
    }
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(|m| percent_encoding::percent_decode_str(m).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    if !(message.starts_with("failed to decode Protobuf message") || message.starts_with("Unexpected EOF decoding")) {
        return;
    }
    let text =
        format!("the request is not a valid message for this method ({message}); check the client's proto files");
    let encoded = percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC).to_string();
    let h = resp.headers_mut();
    h.insert("grpc-status", http::HeaderValue::from_static("3"));
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
}
