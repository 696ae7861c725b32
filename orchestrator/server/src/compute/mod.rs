//! Reaching a site's compute side: a gRPC `drover.compute.v1.ComputeHook` service, a
//! webhook (JSON POSTed, signed with HMAC-SHA256), or a command (the call as JSON on
//! stdin). Configured per site (`[compute.<site>]`); every call yields an outcome per
//! instance (success, error with the reason, not capable).
//!
//! Notifications: every configured site hears when an execution of a notified kind
//! (runbooks, group transitions and adoptions by default) starts and ends. They are
//! sent once, from the orchestrator that started or ended the execution, with bounded
//! retries; one that cannot be delivered is logged, not queued (an orchestrator that
//! dies in between sends nothing).

mod exec;
mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::compute::v1 as cpb;
use serde::{Deserialize, Serialize};

/// How one site's compute side is reached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeSite {
    /// `grpc`, `webhook` or `exec`.
    pub kind: String,
    /// grpc: the service's endpoint (`http://host:port` or `https://…`).
    pub endpoint: String,
    /// webhook: the URL POSTed to (`http://…` or `https://…`).
    pub url: String,
    /// webhook: a file holding the shared secret the body is signed with.
    pub secret_file: PathBuf,
    /// grpc and webhook over TLS: the CA to trust (default: Drover's CA for grpc, the
    /// system bundle for webhooks).
    pub ca_file: PathBuf,
    /// exec: the program and its arguments.
    pub command: Vec<String>,
    /// Per call (each attempt).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// webhook: how many times a 5xx answer is retried (other failures are not).
    pub retries: u32,
    /// The execution kinds whose start and end are notified.
    pub notify_kinds: Vec<String>,
}

impl Default for ComputeSite {
    fn default() -> Self {
        Self {
            kind: String::new(),
            endpoint: String::new(),
            url: String::new(),
            secret_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            command: Vec::new(),
            timeout: Duration::from_secs(10),
            retries: 2,
            notify_kinds: ["runbook", "group-transition", "adopt"].map(String::from).to_vec(),
        }
    }
}

impl ComputeSite {
    /// Whether the settings are complete for their kind; else what is missing.
    pub fn validate(&self, site: &str) -> Result<(), String> {
        let table = format!("compute.{site}");
        match self.kind.as_str() {
            "grpc" if self.endpoint.is_empty() => Err(format!("`{table}.endpoint` is required for kind grpc")),
            "webhook" if self.url.is_empty() => Err(format!("`{table}.url` is required for kind webhook")),
            "webhook" if !self.url.starts_with("http://") && !self.url.starts_with("https://") => {
                Err(format!("`{table}.url` = {:?} must start with http:// or https://", self.url))
            }
            "webhook" if self.secret_file.as_os_str().is_empty() => {
                Err(format!("`{table}.secret_file` is required for kind webhook (the HMAC key)"))
            }
            "exec" if self.command.is_empty() => Err(format!("`{table}.command` is required for kind exec")),
            "grpc" | "webhook" | "exec" if self.timeout.is_zero() => {
                Err(format!("`{table}.timeout` must be longer than 0s"))
            }
            "grpc" | "webhook" | "exec" => Ok(()),
            other => Err(format!("`{table}.kind` = {other:?} is not one of grpc, webhook, exec")),
        }
    }
}

/// What happened to one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub instance_id: String,
    /// success, error or not-capable.
    pub result: String,
    pub reason: String,
}

/// A call to a compute side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", content = "request", rename_all = "snake_case")]
pub enum Call {
    ListInstances(cpb::ListInstancesRequest),
    Stop(cpb::InstancesRequest),
    Start(cpb::InstancesRequest),
    Quiesce(cpb::InstancesRequest),
    Unquiesce(cpb::InstancesRequest),
    RefreshAttachments(cpb::RefreshRequest),
    Notify(cpb::NotifyRequest),
}

impl Call {
    /// The call's name, as webhooks and commands see it (`X-Drover-Call`).
    pub fn name(&self) -> &'static str {
        match self {
            Call::ListInstances(_) => "list_instances",
            Call::Stop(_) => "stop",
            Call::Start(_) => "start",
            Call::Quiesce(_) => "quiesce",
            Call::Unquiesce(_) => "unquiesce",
            Call::RefreshAttachments(_) => "refresh_attachments",
            Call::Notify(_) => "notify",
        }
    }

    /// The instances the call is about (for outcomes a transport cannot tell apart).
    fn instance_ids(&self) -> Vec<String> {
        match self {
            Call::Stop(r) | Call::Start(r) | Call::Quiesce(r) | Call::Unquiesce(r) => r.instance_ids.clone(),
            Call::RefreshAttachments(r) => r.instance_ids.clone(),
            Call::ListInstances(_) | Call::Notify(_) => Vec::new(),
        }
    }
}

/// What a compute side answered.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub instances: Vec<cpb::Instance>,
    pub outcomes: Vec<Outcome>,
}

fn outcome_of(o: cpb::InstanceOutcome) -> Outcome {
    let result = match cpb::OutcomeKind::try_from(o.kind) {
        Ok(cpb::OutcomeKind::Success) => "success",
        Ok(cpb::OutcomeKind::NotCapable) => "not-capable",
        _ => "error",
    };
    Outcome { instance_id: o.instance_id, result: result.into(), reason: o.reason }
}

/// Reads a JSON answer of a webhook or command: `{"instances": […]}` or
/// `{"outcomes": […]}` in the drover.compute.v1 JSON form; empty is no answer.
fn parse_answer(body: &[u8]) -> Result<Answer, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Answer::default());
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Wire {
        instances: Vec<cpb::Instance>,
        outcomes: Vec<cpb::InstanceOutcome>,
    }
    let w: Wire = serde_json::from_slice(body).map_err(|e| format!("unreadable answer: {e}"))?;
    Ok(Answer { instances: w.instances, outcomes: w.outcomes.into_iter().map(outcome_of).collect() })
}

/// Every instance of `call` failed the same way (the transport failed, not an instance).
fn all_failed(call: &Call, why: &str) -> Answer {
    let outcomes = call
        .instance_ids()
        .into_iter()
        .map(|id| Outcome { instance_id: id, result: "error".into(), reason: why.to_string() })
        .collect();
    Answer { instances: Vec::new(), outcomes }
}

/// Notifications sent at once, over every site.
const NOTIFY_IN_FLIGHT: usize = 8;

/// The compute sides of every configured site.
#[derive(Clone)]
pub struct Hooks {
    sites: Arc<BTreeMap<String, ComputeSite>>,
    /// Bounds the notifications in flight (a site failover of a thousand groups starts
    /// and ends two thousand executions: not two thousand commands at once).
    notifying: Arc<tokio::sync::Semaphore>,
    /// Drover's own TLS files, for gRPC hooks over https without a CA of their own.
    tls: Option<drover_proto::tls::TlsFiles>,
}

impl Hooks {
    pub fn new(sites: BTreeMap<String, ComputeSite>, tls: Option<drover_proto::tls::TlsFiles>) -> Self {
        Self { sites: Arc::new(sites), tls, notifying: Arc::new(tokio::sync::Semaphore::new(NOTIFY_IN_FLIGHT)) }
    }

    /// The sites with a compute side.
    pub fn sites(&self) -> Vec<String> {
        self.sites.keys().cloned().collect()
    }

    /// Makes `call` to `site`'s compute side. An error is a failure to reach it or an
    /// answer it could not make; instance failures are outcomes.
    pub async fn call(&self, site: &str, call: &Call) -> Result<Answer, String> {
        let Some(cfg) = self.sites.get(site) else {
            return Err(format!("site {site} has no compute side configured (`[compute.{site}]`)"));
        };
        let answer = match cfg.kind.as_str() {
            "webhook" => webhook::post(cfg, call).await.and_then(|body| parse_answer(&body)),
            "exec" => exec::run(cfg, call).await.and_then(|body| parse_answer(&body)),
            _ => self.grpc(cfg, call).await,
        };
        tracing::info!(site, call = call.name(), ok = answer.is_ok(), "compute call");
        answer
    }

    /// [`Hooks::call`], with a failure to reach the site turned into an error outcome
    /// for each instance of the call.
    pub async fn call_instances(&self, site: &str, call: &Call) -> Answer {
        match self.call(site, call).await {
            Ok(a) => a,
            Err(why) => all_failed(call, &why),
        }
    }

    async fn grpc(&self, cfg: &ComputeSite, call: &Call) -> Result<Answer, String> {
        use cpb::compute_hook_client::ComputeHookClient;
        let mut ep = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| format!("compute endpoint {:?} is not a URI: {e}", cfg.endpoint))?
            .connect_timeout(cfg.timeout)
            .timeout(cfg.timeout);
        if cfg.endpoint.starts_with("https://") {
            let tls = match (cfg.ca_file.as_os_str().is_empty(), &self.tls) {
                (false, _) => {
                    let pem = std::fs::read(&cfg.ca_file)
                        .map_err(|e| format!("cannot read the compute CA {}: {e}", cfg.ca_file.display()))?;
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                (true, Some(files)) => files.client(drover_proto::tls::AGENT_NAME)?,
                (true, None) => return Err("an https compute endpoint needs `ca_file`".into()),
            };
            ep = ep.tls_config(tls).map_err(|e| format!("TLS towards {}: {e}", cfg.endpoint))?;
        }
        let mut c = ComputeHookClient::new(ep.connect_lazy());
        let err = |s: tonic::Status| format!("{} ({:?})", s.message(), s.code());
        let outcomes = |r: Result<tonic::Response<cpb::InstancesResponse>, tonic::Status>| {
            r.map(|r| Answer {
                instances: Vec::new(),
                outcomes: r.into_inner().outcomes.into_iter().map(outcome_of).collect(),
            })
            .map_err(err)
        };
        match call.clone() {
            Call::ListInstances(r) => c
                .list_instances(r)
                .await
                .map(|r| Answer { instances: r.into_inner().instances, outcomes: Vec::new() })
                .map_err(err),
            Call::Stop(r) => outcomes(c.stop(r).await),
            Call::Start(r) => outcomes(c.start(r).await),
            Call::Quiesce(r) => outcomes(c.quiesce(r).await),
            Call::Unquiesce(r) => outcomes(c.unquiesce(r).await),
            Call::RefreshAttachments(r) => outcomes(c.refresh_attachments(r).await),
            Call::Notify(r) => c.notify(r).await.map(|_| Answer::default()).map_err(err),
        }
    }

    /// Tells every site whose settings notify `kind` about an execution's start or end,
    /// in the background.
    pub fn notify_execution(&self, event: &str, rec: &drover_procedure::ExecutionRec, report: String) {
        let req = cpb::NotifyRequest {
            op_id: format!("{}:{event}", rec.id),
            event: event.to_string(),
            execution_id: rec.id.clone(),
            kind: rec.kind.clone(),
            summary: rec.summary.clone(),
            status: rec.status.as_str().to_string(),
            error: rec.error.clone(),
            project: rec.project.clone(),
            report,
            at_ms: crate::model::now_ms(),
        };
        for (site, cfg) in self.sites.iter() {
            if !cfg.notify_kinds.iter().any(|k| k == &rec.kind) {
                continue;
            }
            let (hooks, site, call) = (self.clone(), site.clone(), Call::Notify(req.clone()));
            tokio::spawn(async move {
                let Ok(_slot) = hooks.notifying.clone().acquire_owned().await else { return };
                if let Err(e) = hooks.call(&site, &call).await {
                    tracing::warn!(site = %site, error = %e, "could not notify the compute side; it is not sent again");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_needs_its_settings() {
        let site = |kind: &str| ComputeSite { kind: kind.into(), ..Default::default() };
        assert!(site("grpc").validate("a").unwrap_err().contains("compute.a.endpoint"));
        assert!(site("webhook").validate("a").unwrap_err().contains("compute.a.url"));
        let w = ComputeSite { url: "ftp://x".into(), ..site("webhook") };
        assert!(w.validate("a").unwrap_err().contains("http://"));
        let w = ComputeSite { url: "http://x".into(), ..site("webhook") };
        assert!(w.validate("a").unwrap_err().contains("secret_file"));
        assert!(site("exec").validate("a").unwrap_err().contains("command"));
        assert!(site("pigeon").validate("a").unwrap_err().contains("not one of"));
        let ok = ComputeSite { command: vec!["/bin/true".into()], ..site("exec") };
        assert_eq!(ok.validate("a"), Ok(()));
    }

    #[test]
    fn answers_read_the_compute_json_form() {
        let a = parse_answer(br#"{"outcomes":[{"instance_id":"i1","kind":1,"reason":""},{"instance_id":"i2","kind":3,"reason":"no agent"}]}"#)
            .unwrap();
        assert_eq!(a.outcomes[0].result, "success");
        assert_eq!((a.outcomes[1].result.as_str(), a.outcomes[1].reason.as_str()), ("not-capable", "no agent"));
        assert!(parse_answer(b"  ").unwrap().outcomes.is_empty());
        assert!(parse_answer(b"{").unwrap_err().contains("unreadable"));
        let call = Call::Stop(cpb::InstancesRequest { instance_ids: vec!["i1".into()], ..Default::default() });
        assert_eq!(all_failed(&call, "down").outcomes[0].result, "error");
        let json = serde_json::to_value(&call).unwrap();
        assert_eq!((json["call"].as_str(), json["request"]["instance_ids"][0].as_str()), (Some("stop"), Some("i1")));
    }
}
