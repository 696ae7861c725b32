//! Clients for every drover.v1 service over one channel, stamping the API version.

use std::time::Duration;

use drover_proto::v1::{
    audit_service_client::AuditServiceClient, cluster_service_client::ClusterServiceClient,
    execution_service_client::ExecutionServiceClient, group_service_client::GroupServiceClient,
    message_service_client::MessageServiceClient, project_service_client::ProjectServiceClient,
    replication_service_client::ReplicationServiceClient, runbook_service_client::RunbookServiceClient,
    site_service_client::SiteServiceClient, snapshot_service_client::SnapshotServiceClient,
    token_service_client::TokenServiceClient, version_service_client::VersionServiceClient,
    volume_service_client::VolumeServiceClient,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// What stamps the API version on a request (tests send other versions).
pub type Version = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// The interceptor every client uses: the API version, and the bearer token if any.
#[derive(Clone)]
pub struct Stamp {
    version: Version,
    token: Option<tonic::metadata::AsciiMetadataValue>,
}

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = (self.version)(req)?;
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Ch = InterceptedService<Channel, Stamp>;

/// The largest answer a client takes (tonic's default is 4 MiB). A runbook's plan and
/// its execution list every group they move, about 300 bytes each per step, so a site
/// runbook over tens of thousands of groups answers with tens of MiB. (Watch updates
/// carry at most 500 items per step, and lists are paged.)
pub const MAX_ANSWER: usize = 256 << 20;

/// One client per drover.v1 service.
#[derive(Clone)]
pub struct Clients {
    pub version: VersionServiceClient<Ch>,
    pub sites: SiteServiceClient<Ch>,
    pub volumes: VolumeServiceClient<Ch>,
    pub snapshots: SnapshotServiceClient<Ch>,
    pub groups: GroupServiceClient<Ch>,
    pub replication: ReplicationServiceClient<Ch>,
    pub executions: ExecutionServiceClient<Ch>,
    pub runbooks: RunbookServiceClient<Ch>,
    pub cluster: ClusterServiceClient<Ch>,
    pub tokens: TokenServiceClient<Ch>,
    pub audit: AuditServiceClient<Ch>,
    pub messages: MessageServiceClient<Ch>,
    pub projects: ProjectServiceClient<Ch>,
}

impl Clients {
    /// Connects to an orchestrator; `timeout` bounds each call. `endpoint` may list
    /// several orchestrators of one cluster, comma-separated: the first that answers is
    /// used (any member serves every request), so any of them may be down. The clients
    /// stay with that member; connect again to move to another.
    /// `ca` is the cluster's CA certificate, needed for `https://` endpoints.
    pub async fn connect(
        endpoint: &str,
        timeout: Duration,
        token: Option<&str>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let list: Vec<&str> = endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()).collect();
        if list.is_empty() {
            return Err("no orchestrator endpoint given (set --endpoint or DROVER_ENDPOINT)".into());
        }
        let mut failures = Vec::new();
        for e in &list {
            let mut ep = Endpoint::from_shared(e.to_string())
                .map_err(|err| format!("bad endpoint {e:?}: {err}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(timeout);
            if e.starts_with("https://") {
                let ca = ca.ok_or_else(|| {
                    format!("{e} is a TLS endpoint: pass the cluster's CA certificate with --ca-file or DROVER_CA_FILE")
                })?;
                let tls = drover_proto::tls::user_client(ca)?;
                ep = ep.tls_config(tls).map_err(|err| format!("TLS towards {e}: {err}"))?;
            }
            match ep.connect().await {
                Ok(channel) => return Self::with_stamp(channel, drover_proto::stamp_api_version, token),
                Err(err) => failures.push(format!("{e}: {err}")),
            }
        }
        Err(format!(
            "cannot reach any orchestrator ({}); is one running? (set --endpoint or DROVER_ENDPOINT)",
            failures.join("; ")
        ))
    }

    /// Clients over a channel with a chosen version stamp (tests use it to send other
    /// API versions) and token.
    pub fn with_stamp(channel: Channel, version: Version, token: Option<&str>) -> Result<Self, String> {
        let token = match token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                "the API token holds characters a header cannot carry; check the token file".to_string()
            })?),
            None => None,
        };
        let stamp = Stamp { version, token };
        let ch = || InterceptedService::new(channel.clone(), stamp.clone());
        Ok(Self {
            version: VersionServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            sites: SiteServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            volumes: VolumeServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            snapshots: SnapshotServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            groups: GroupServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            replication: ReplicationServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            executions: ExecutionServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            runbooks: RunbookServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            cluster: ClusterServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            tokens: TokenServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            audit: AuditServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            messages: MessageServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
            projects: ProjectServiceClient::new(ch()).max_decoding_message_size(MAX_ANSWER),
        })
    }
}
