//! Who may call what: bearer tokens, roles and projects, enforced in one place.
//!
//! [`RULES`] names what every RPC needs. The [`layer::AuthLayer`] in front of every
//! service looks the called method up there, checks the token, refuses the call before
//! any handler runs when the role falls short, and otherwise hands the handler the
//! [`Caller`]. A method with no entry is refused (and a unit test fails), so an RPC added
//! later cannot be served unguarded by omission. Project scope is the handler's part:
//! it passes the project it was asked for through [`Caller::scope`], and records of
//! another project are `NotFound` to anyone but an admin.

pub mod audit;
pub mod layer;
pub mod tokens;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};

/// A token's role. Ordered: each role may do everything the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads its own project.
    Reader,
    /// Creates, changes and fails over its own project's volumes and groups.
    Member,
    /// Everything, in every project.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Member => "member",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> ApiResult<Self> {
        match s {
            "reader" => Ok(Role::Reader),
            "member" => Ok(Role::Member),
            "admin" => Ok(Role::Admin),
            other => {
                Err(ApiError::InvalidArgument(format!("`role` {other:?} is not a role; use admin, member or reader")))
            }
        }
    }
}

/// Who is calling: attached to every admitted request by the auth layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub project: String,
    pub role: Role,
}

impl Caller {
    /// The orchestrator itself, for calls it makes to its own services (runbook steps).
    pub fn system() -> Self {
        Self { token_id: String::new(), project: String::new(), role: Role::Admin }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The project a request acts in, given the project it named (empty: none). An admin
    /// acts where it asks (empty stays empty: every project, for lists). Anyone else
    /// acts in its own project; naming another one is refused.
    pub fn scope(&self, requested: &str) -> ApiResult<String> {
        if self.is_admin() || requested.is_empty() || requested == self.project {
            return Ok(if self.is_admin() { requested.to_string() } else { self.project.clone() });
        }
        Err(ApiError::PermissionDenied(format!(
            "this token belongs to project {p}; it cannot act in project {requested} (pass --project {p}, or set \
             DROVER_PROJECT={p})",
            p = self.project
        )))
    }

    /// Whether a record of `project` exists for this caller. Records of other projects
    /// are reported as not found, never as forbidden.
    pub fn sees(&self, project: &str) -> bool {
        self.is_admin() || project == self.project
    }
}

/// The caller of a request: the one the auth layer attached, or the orchestrator itself
/// for a request built inside the process (nothing from outside reaches a handler
/// without passing the layer, which always attaches one).
pub fn caller<T>(req: &tonic::Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or_else(Caller::system)
}

/// A request that names the project it acts in.
pub trait InProject {
    fn project_mut(&mut self) -> &mut String;
}

macro_rules! in_project {
    ($($t:ident),* $(,)?) => {
        $(impl InProject for drover_proto::v1::$t {
            fn project_mut(&mut self) -> &mut String {
                &mut self.project
            }
        })*
    };
}

in_project!(
    AttachVolumeRequest,
    CreateGroupSnapshotRequest,
    CreateSnapshotRequest,
    DeleteSnapshotRequest,
    GetSnapshotRequest,
    ListSnapshotsRequest,
    CreateGroupRequest,
    CreateVolumeRequest,
    DeleteGroupRequest,
    DeleteVolumeRequest,
    DisableReplicationRequest,
    EnableReplicationRequest,
    ExtendVolumeRequest,
    FailoverGroupRequest,
    FailoverVolumeRequest,
    GetGroupRequest,
    GetReplicationInfoRequest,
    GetVolumeRequest,
    ListGroupEventsRequest,
    ListGroupsRequest,
    ListReplicationTargetsRequest,
    ListVolumesRequest,
    ManageVolumeRequest,
    SyncGroupRequest,
    UnmanageVolumeRequest,
    UpdateGroupRequest,
    VolumeReplicationRequest,
);

/// The request's message with its project set to the one the caller acts in (see
/// [`Caller::scope`]): every lookup the handler makes afterwards stays in that project.
pub fn scoped<T: InProject>(req: tonic::Request<T>) -> ApiResult<T> {
    let who = caller(&req);
    let mut r = req.into_inner();
    let p = who.scope(r.project_mut())?;
    *r.project_mut() = p;
    Ok(r)
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: no token is read.
    Public,
    /// Agents' own calls (registration, heartbeats). They carry no user token; agent
    /// identity comes with mutual TLS.
    Agent,
    /// At least this role.
    Role(Role),
}

/// One entry of the table.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub need: Need,
    /// Whether a call changes something (and so leaves an audit record).
    pub mutates: bool,
}

const fn read(role: Role) -> Rule {
    Rule { need: Need::Role(role), mutates: false }
}

const fn change(role: Role) -> Rule {
    Rule { need: Need::Role(role), mutates: true }
}

use Role::{Admin, Member, Reader};

/// Every drover.v1 method and what it needs. Project scope is checked by the handler.
pub const RULES: &[(&str, Rule)] = &[
    ("/drover.v1.VersionService/GetVersion", Rule { need: Need::Public, mutates: false }),
    ("/drover.v1.SiteService/CreateSite", change(Admin)),
    ("/drover.v1.SiteService/ListSites", read(Reader)),
    ("/drover.v1.SiteService/ListBackends", read(Reader)),
    ("/drover.v1.SiteService/GetBackend", read(Reader)),
    ("/drover.v1.SiteService/FreezeBackend", change(Admin)),
    ("/drover.v1.SiteService/ThawBackend", change(Admin)),
    ("/drover.v1.AgentRegistry/RegisterAgent", Rule { need: Need::Agent, mutates: false }),
    ("/drover.v1.AgentRegistry/Heartbeat", Rule { need: Need::Agent, mutates: false }),
    ("/drover.v1.AgentRegistry/ConfirmPrimaries", Rule { need: Need::Agent, mutates: false }),
    ("/drover.v1.SnapshotService/CreateSnapshot", change(Member)),
    ("/drover.v1.SnapshotService/CreateGroupSnapshot", change(Member)),
    ("/drover.v1.SnapshotService/GetSnapshot", read(Reader)),
    ("/drover.v1.SnapshotService/ListSnapshots", read(Reader)),
    ("/drover.v1.SnapshotService/DeleteSnapshot", change(Member)),
    ("/drover.v1.VolumeService/CreateVolume", change(Member)),
    ("/drover.v1.VolumeService/GetVolume", read(Reader)),
    ("/drover.v1.VolumeService/ListVolumes", read(Reader)),
    ("/drover.v1.VolumeService/DeleteVolume", change(Member)),
    ("/drover.v1.VolumeService/ExtendVolume", change(Member)),
    ("/drover.v1.VolumeService/AttachVolume", change(Member)),
    ("/drover.v1.VolumeService/ListManageableVolumes", read(Admin)),
    ("/drover.v1.VolumeService/ListManageableSnapshots", read(Admin)),
    ("/drover.v1.VolumeService/PlanAdoption", change(Admin)),
    ("/drover.v1.VolumeService/GetAdoptionPlan", read(Admin)),
    ("/drover.v1.VolumeService/ApplyAdoption", change(Admin)),
    ("/drover.v1.VolumeService/ManageVolume", change(Admin)),
    ("/drover.v1.VolumeService/UnmanageVolume", change(Admin)),
    ("/drover.v1.GroupService/ListGroupTypes", read(Reader)),
    ("/drover.v1.GroupService/GetGroupType", read(Reader)),
    ("/drover.v1.GroupService/CreateGroupType", change(Admin)),
    ("/drover.v1.GroupService/CreateGroup", change(Member)),
    ("/drover.v1.GroupService/GetGroup", read(Reader)),
    ("/drover.v1.GroupService/ListGroups", read(Reader)),
    ("/drover.v1.GroupService/DeleteGroup", change(Member)),
    ("/drover.v1.GroupService/UpdateGroup", change(Member)),
    ("/drover.v1.GroupService/ListGroupEvents", read(Reader)),
    ("/drover.v1.ReplicationService/EnableReplication", change(Member)),
    ("/drover.v1.ReplicationService/DisableReplication", change(Member)),
    ("/drover.v1.ReplicationService/FailoverGroup", change(Member)),
    ("/drover.v1.ReplicationService/ListReplicationTargets", read(Reader)),
    ("/drover.v1.ReplicationService/GetReplicationInfo", read(Reader)),
    ("/drover.v1.ReplicationService/SyncGroup", change(Member)),
    ("/drover.v1.ReplicationService/EnableVolumeReplication", change(Member)),
    ("/drover.v1.ReplicationService/DisableVolumeReplication", change(Member)),
    ("/drover.v1.ReplicationService/FailoverVolume", change(Member)),
    ("/drover.v1.ReplicationService/GetVolumeReplicationInfo", read(Reader)),
    ("/drover.v1.ExecutionService/ListExecutions", read(Reader)),
    ("/drover.v1.ExecutionService/GetExecution", read(Reader)),
    ("/drover.v1.ExecutionService/WatchExecution", read(Reader)),
    ("/drover.v1.ExecutionService/CancelExecution", change(Member)),
    ("/drover.v1.ExecutionService/PauseExecution", change(Member)),
    ("/drover.v1.ExecutionService/ResumeExecution", change(Member)),
    ("/drover.v1.ExecutionService/DecidePrompt", change(Member)),
    ("/drover.v1.ExecutionService/GetExecutionReport", read(Reader)),
    ("/drover.v1.ExecutionService/ListExecutionItems", read(Reader)),
    ("/drover.v1.ClusterService/ListOrchestrators", read(Admin)),
    ("/drover.v1.RunbookService/ValidateRunbook", read(Member)),
    ("/drover.v1.RunbookService/PlanRunbook", read(Member)),
    ("/drover.v1.RunbookService/RunRunbook", change(Member)),
    ("/drover.v1.TokenService/CreateToken", change(Admin)),
    ("/drover.v1.TokenService/ListTokens", read(Admin)),
    ("/drover.v1.TokenService/RevokeToken", change(Admin)),
    ("/drover.v1.AuditService/ListAudit", read(Admin)),
    ("/drover.v1.ProjectService/GetProjectPolicy", read(Reader)),
    ("/drover.v1.ProjectService/SetProjectPolicy", change(Admin)),
    ("/drover.v1.MessageService/ListMessages", read(Reader)),
    ("/drover.v1.MessageService/GetMessage", read(Reader)),
    ("/drover.v1.MessageService/DeleteMessage", change(Member)),
];

/// Every method of the drover.v1 API as a request path (`/drover.v1.Service/Method`),
/// read from the compiled descriptors: what the tests hold [`RULES`] against.
pub fn api_methods() -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(drover_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "drover.v1") {
        for svc in &file.service {
            for m in &svc.method {
                out.push(format!("/drover.v1.{}/{}", svc.name(), m.name()));
            }
        }
    }
    out
}

/// The rule of a request path. Health checks and reflection are public; anything else
/// without an entry has none (and is refused).
pub fn rule_for(path: &str) -> Option<Rule> {
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        return Some(Rule { need: Need::Public, mutates: false });
    }
    RULES.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

#[cfg(test)]
mod tests;
