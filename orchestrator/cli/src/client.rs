//! Clients for every drover.v1 service over one channel, stamping the API version.

use std::time::Duration;

use drover_proto::v1::{
    execution_service_client::ExecutionServiceClient, group_service_client::GroupServiceClient,
    replication_service_client::ReplicationServiceClient, runbook_service_client::RunbookServiceClient,
    site_service_client::SiteServiceClient, version_service_client::VersionServiceClient,
    volume_service_client::VolumeServiceClient,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The interceptor type every client uses.
pub type Stamp = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type Ch = InterceptedService<Channel, Stamp>;

/// One client per drover.v1 service.
#[derive(Clone)]
pub struct Clients {
    pub version: VersionServiceClient<Ch>,
    pub sites: SiteServiceClient<Ch>,
    pub volumes: VolumeServiceClient<Ch>,
    pub groups: GroupServiceClient<Ch>,
    pub replication: ReplicationServiceClient<Ch>,
    pub executions: ExecutionServiceClient<Ch>,
    pub runbooks: RunbookServiceClient<Ch>,
}

impl Clients {
    /// Connects to an orchestrator; `timeout` bounds each call.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot reach the orchestrator at {endpoint}: {e}; is it running? (set --endpoint or DROVER_ENDPOINT)"))?;
        Ok(Self::with_interceptor(channel, drover_proto::stamp_api_version))
    }

    /// Clients over a channel with a chosen interceptor (tests use it to send other
    /// API versions).
    pub fn with_interceptor(channel: Channel, stamp: Stamp) -> Self {
        let ch = || InterceptedService::new(channel.clone(), stamp);
        Self {
            version: VersionServiceClient::new(ch()),
            sites: SiteServiceClient::new(ch()),
            volumes: VolumeServiceClient::new(ch()),
            groups: GroupServiceClient::new(ch()),
            replication: ReplicationServiceClient::new(ch()),
            executions: ExecutionServiceClient::new(ch()),
            runbooks: RunbookServiceClient::new(ch()),
        }
    }
}
