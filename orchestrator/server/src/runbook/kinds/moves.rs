//! Kinds that move groups through their own executions, tier by tier: `sync`,
//! `failover`, `failback`.

use std::num::NonZeroU32;

use async_trait::async_trait;
use drover_procedure::{Context, ProcedureError, Status};
use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::error::ApiResult;
use crate::model::{GroupRec, replication_status as rs};
use crate::repo::Versioned;
use crate::runbook::run::RunbookRun;
use crate::runbook::schema::Selector;
use crate::service::replication::ReplicationApi;

fn default_parallel() -> NonZeroU32 {
    NonZeroU32::new(10).expect("nonzero")
}

fn not_capable(g: &GroupRec) -> Result<(), String> {
    if g.replication_status == rs::NOT_CAPABLE {
        return Err(format!("not-capable: group type {} does not replicate", g.group_type));
    }
    Ok(())
}

/// Take and ship a recovery point of each selected group now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncNow {
    pub name: String,
    pub groups: Selector,
    /// At most this many groups at once, within a tier.
    #[serde(default = "default_parallel")]
    pub max_parallel: NonZeroU32,
    /// Go on with the next groups and tiers after one fails (else start no new one).
    #[serde(default)]
    pub continue_on_error: bool,
    /// Quiesce each group's instances for its point (application-consistent), through
    /// the active site's compute side; `quiesce_timeout` bounds it (default 10s).
    #[serde(default)]
    pub quiesce: bool,
    #[serde(default)]
    pub quiesce_timeout: Option<crate::runbook::schema::Dur>,
}

/// Fail the selected groups over to their replication target, tier by tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    pub name: String,
    pub groups: Selector,
    /// A disaster failover: never wait on the side being left.
    #[serde(default)]
    pub force: bool,
    #[serde(default = "default_parallel")]
    pub max_parallel: NonZeroU32,
    #[serde(default)]
    pub continue_on_error: bool,
}

/// Fail the selected groups back to their primary backend, tier by tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failback {
    pub name: String,
    pub groups: Selector,
    /// After a disaster, discard the changes on the side failed back to (the divergent
    /// writes); put an approved `prompt` before such a step.
    #[serde(default)]
    pub discard_diverged: bool,
    #[serde(default = "default_parallel")]
    pub max_parallel: NonZeroU32,
    #[serde(default)]
    pub continue_on_error: bool,
}

#[async_trait]
impl StepKind for SyncNow {
    fn tenant_may_run(&self) -> Result<(), String> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "sync"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        Some(&self.groups)
    }
    fn fanout(&self) -> Option<(u32, bool)> {
        Some((self.max_parallel.get(), self.continue_on_error))
    }
    fn eligibility(&self, g: &GroupRec) -> Result<(), String> {
        not_capable(g)?;
        if g.replication_status != rs::ENABLED {
            return Err(format!("replication is {}, not enabled", g.replication_status));
        }
        if g.active_backend != g.primary_backend {
            return Err("failed over: nothing to sync towards the lost side".into());
        }
        Ok(())
    }
    async fn submit(&self, api: &ReplicationApi, read: &Versioned<GroupRec>) -> ApiResult<String> {
        let g = &read.rec;
        let r = pb::SyncGroupRequest {
            group: g.id.clone(),
            project: g.project.clone(),
            no_wait: true,
            quiesce: self.quiesce,
            quiesce_timeout_ms: self.quiesce_timeout.as_ref().map_or(0, |d| d.0.as_millis() as i64),
        };
        api.sync_now_of(read.clone(), r).await.map(|r| r.execution_id)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        run.fanout(self, ctx).await
    }
}

#[async_trait]
impl StepKind for Failover {
    fn tenant_may_run(&self) -> Result<(), String> {
        if self.force {
            return Err("only an admin may run a forced (disaster) failover".into());
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "failover"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        Some(&self.groups)
    }
    fn fanout(&self) -> Option<(u32, bool)> {
        Some((self.max_parallel.get(), self.continue_on_error))
    }
    fn eligibility(&self, g: &GroupRec) -> Result<(), String> {
        not_capable(g)?;
        if g.active_backend != g.primary_backend {
            return Err(format!("already failed over to {}", g.active_backend));
        }
        if g.replication_status != rs::ENABLED {
            return Err(format!("replication is {}, not enabled", g.replication_status));
        }
        Ok(())
    }
    fn at_goal(&self, g: &GroupRec) -> bool {
        g.active_backend != g.primary_backend && g.replication_status == rs::FAILED_OVER
    }
    fn forced(&self) -> bool {
        self.force
    }
    async fn submit(&self, api: &ReplicationApi, read: &Versioned<GroupRec>) -> ApiResult<String> {
        let g = &read.rec;
        let r = pb::FailoverGroupRequest {
            group: g.id.clone(),
            project: g.project.clone(),
            target_backend: g.replication_target.clone(),
            force: self.force,
            discard_changes_on: String::new(),
            no_wait: true,
        };
        api.failover_of(read.clone(), r).await.map(|r| r.execution_id)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        run.fanout(self, ctx).await
    }
}

#[async_trait]
impl StepKind for Failback {
    fn tenant_may_run(&self) -> Result<(), String> {
        if self.discard_diverged {
            return Err("only an admin may discard a side's diverged changes".into());
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "failback"
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn groups(&self) -> Option<&Selector> {
        Some(&self.groups)
    }
    fn fanout(&self) -> Option<(u32, bool)> {
        Some((self.max_parallel.get(), self.continue_on_error))
    }
    fn eligibility(&self, g: &GroupRec) -> Result<(), String> {
        not_capable(g)?;
        if g.active_backend == g.primary_backend {
            return Err(format!("already on its primary backend {}", g.primary_backend));
        }
        if g.replication_status != rs::FAILED_OVER {
            return Err(format!("replication is {}, not failed-over", g.replication_status));
        }
        Ok(())
    }
    fn at_goal(&self, g: &GroupRec) -> bool {
        g.active_backend == g.primary_backend && g.replication_status == rs::ENABLED
    }
    async fn submit(&self, api: &ReplicationApi, read: &Versioned<GroupRec>) -> ApiResult<String> {
        let g = &read.rec;
        let discard = self.discard_diverged && !g.divergence_point.is_empty();
        let r = pb::FailoverGroupRequest {
            group: g.id.clone(),
            project: g.project.clone(),
            target_backend: "default".into(),
            force: false,
            discard_changes_on: if discard { g.primary_backend.clone() } else { String::new() },
            no_wait: true,
        };
        api.failover_of(read.clone(), r).await.map(|r| r.execution_id)
    }
    async fn run(&self, run: &mut RunbookRun, ctx: &Context) -> Result<Status, ProcedureError> {
        run.fanout(self, ctx).await
    }
}
