//! `drover.v1.ClusterService`: the orchestrators sharing this store, their health, and
//! what each owns.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::Core;
use crate::error::ApiError;

/// `drover.v1.ClusterService`.
pub struct ClusterApi {
    pub core: Arc<Core>,
}

/// Whether the orchestrator at `endpoint` answers a version call within a second.
async fn answers(endpoint: &str, tls: Option<&drover_proto::tls::TlsFiles>) -> bool {
    let Ok(mut ep) = tonic::transport::Endpoint::from_shared(endpoint.to_string()) else { return false };
    if let Some(t) = tls {
        match t.client(drover_proto::tls::ORCHESTRATOR_NAME).map(|c| ep.clone().tls_config(c)) {
            Ok(Ok(e)) => ep = e,
            _ => return false,
        }
    }
    let call = async {
        let channel = ep.connect_timeout(Duration::from_secs(1)).connect().await.ok()?;
        let mut client = pb::version_service_client::VersionServiceClient::new(channel);
        client.get_version(pb::GetVersionRequest {}).await.ok()
    };
    tokio::time::timeout(Duration::from_secs(1), call).await.ok().flatten().is_some()
}

#[tonic::async_trait]
impl pb::cluster_service_server::ClusterService for ClusterApi {
    async fn list_orchestrators(
        &self,
        _req: Request<pb::ListOrchestratorsRequest>,
    ) -> Result<Response<pb::ListOrchestratorsResponse>, Status> {
        let (members, owned) = self.core.procedures.members().await.map_err(ApiError::from)?;
        let me = self.core.procedures.owner_id().to_string();
        let checks = members.iter().map(|m| {
            let (id, endpoint) = (m["id"].as_str().unwrap_or("").to_string(), m["endpoint"].as_str().unwrap_or(""));
            let me = me.clone();
            async move { id == me || answers(endpoint, self.core.config.tls_files()).await }
        });
        let up = futures::future::join_all(checks).await;
        let mut orchestrators: Vec<pb::OrchestratorMember> = members
            .iter()
            .zip(up)
            .map(|(m, up)| {
                let id = m["id"].as_str().unwrap_or("").to_string();
                pb::OrchestratorMember {
                    executions_owned: owned.get(&id).copied().unwrap_or(0) as u32,
                    answering: id == me,
                    endpoint: m["endpoint"].as_str().unwrap_or("").into(),
                    version: m["version"].as_str().unwrap_or("").into(),
                    started_at_ms: m["started_at_ms"].as_i64().unwrap_or(0),
                    status: if up { "up" } else { "down" }.into(),
                    id,
                }
            })
            .collect();
        orchestrators.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        Ok(Response::new(pb::ListOrchestratorsResponse { orchestrators }))
    }
}
