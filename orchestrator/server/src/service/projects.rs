//! `drover.v1.ProjectService`: what an admin allows one project's members beyond the
//! defaults (today: disaster failovers), kept under `projects/<name>`.

use std::sync::Arc;

use drover_proto::v1 as pb;
use drover_store::Txn;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::Core;
use crate::auth::caller;
use crate::error::ApiResult;
use crate::repo::{Repo, put, validate_name};

fn key(project: &str) -> String {
    format!("projects/{project}")
}

/// A project's policy as stored (absent: the defaults).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyRec {
    #[serde(default)]
    pub allow_member_disaster_failover: bool,
}

/// The policy of `project` (the defaults when none was set).
pub async fn policy(repo: &Repo, project: &str) -> ApiResult<PolicyRec> {
    Ok(repo.get::<PolicyRec>(&key(project)).await?.map(|v| v.rec).unwrap_or_default())
}

/// `drover.v1.ProjectService`.
pub struct ProjectApi {
    pub core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::project_service_server::ProjectService for ProjectApi {
    async fn get_project_policy(
        &self,
        req: Request<pb::GetProjectPolicyRequest>,
    ) -> Result<Response<pb::ProjectPolicy>, Status> {
        let who = caller(&req);
        let project = who.scope(&req.into_inner().project)?;
        validate_name("project", &project)?;
        let p = policy(&self.core.repo, &project).await?;
        Ok(Response::new(pb::ProjectPolicy {
            project,
            allow_member_disaster_failover: p.allow_member_disaster_failover,
        }))
    }

    async fn set_project_policy(&self, req: Request<pb::ProjectPolicy>) -> Result<Response<pb::ProjectPolicy>, Status> {
        let r = req.into_inner();
        validate_name("project", &r.project)?;
        let rec = PolicyRec { allow_member_disaster_failover: r.allow_member_disaster_failover };
        // The whole policy is written at once: the last admin to set it wins.
        self.core.repo.txn(Txn::new().and_then(put(&key(&r.project), &rec))).await?;
        Ok(Response::new(r))
    }
}
