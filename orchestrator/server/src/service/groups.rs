//! Group types and groups. Membership changes are one transaction over the group and
//! every volume they touch, each compared at the revision it was read.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use drover_proto::v1 as pb;
use drover_store::{Compare, Txn, TxnOp};
use tonic::{Request, Response, Status};

use super::Core;
use super::shared::{group_type, writable_backend};
use crate::error::{ApiError, ApiResult, raced};
use crate::model::{
    GroupRec, GroupTypeRec, MAX_GROUP_VOLUMES, VolumeRec, keys, now_ms, replication_status, volume_status,
};
use crate::repo::{Versioned, put, validate_name};

/// `drover.v1.GroupService`.
pub struct GroupApi {
    pub core: Arc<Core>,
}

fn type_to_pb(t: GroupTypeRec) -> pb::GroupType {
    pb::GroupType { name: t.name, description: t.description, specs: t.specs.into_iter().collect(), builtin: t.builtin }
}

/// Seeds the built-in group types if they are missing.
pub async fn seed_group_types(core: &Core) -> ApiResult<()> {
    for t in GroupTypeRec::builtins() {
        let key = keys::group_type(&t.name);
        core.repo.txn(Txn::new().when(Compare::Absent(key.clone().into_bytes())).and_then(put(&key, &t))).await?;
    }
    Ok(())
}

impl GroupApi {
    /// Resolves volumes that are to join `group_id`: each exists in the project, lives on
    /// the group's backend, is available and belongs to no other group.
    async fn joining(&self, refs: &[String], project: &str, backend: &str) -> ApiResult<Vec<Versioned<VolumeRec>>> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for r in refs {
            let v = self.core.repo.volume(r, project).await?;
            if !seen.insert(v.rec.id.clone()) {
                return Err(ApiError::InvalidArgument(format!("volume {r} is listed twice")));
            }
            if v.rec.project != project {
                return Err(ApiError::InvalidArgument(format!(
                    "volume {} belongs to project {}, not {project}",
                    v.rec.name, v.rec.project
                )));
            }
            if v.rec.backend != backend {
                return Err(ApiError::InvalidArgument(format!(
                    "volume {} is on backend {}, but the group is on {backend}; a group's volumes share one backend",
                    v.rec.name, v.rec.backend
                )));
            }
            if !v.rec.group_id.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in group {}; remove it from that group first",
                    v.rec.name, v.rec.group_id
                )));
            }
            if v.rec.status != volume_status::AVAILABLE {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is {}; it must be available",
                    v.rec.name, v.rec.status
                )));
            }
            out.push(v);
        }
        Ok(out)
    }

    fn require_membership_changeable(g: &GroupRec) -> ApiResult<()> {
        let s = g.replication_status.as_str();
        if s != replication_status::DISABLED && s != replication_status::NOT_CAPABLE {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} has replication status {s}; disable replication before changing or deleting the group",
                g.name
            )));
        }
        Ok(())
    }

    /// A group of new volumes made from a snapshot's volumes (Cinder's group create from a
    /// group snapshot). Each volume is made by its own execution, then the group of them
    /// is written; everything is checked first, so bad input makes nothing.
    async fn create_from_snapshot(&self, mut r: pb::CreateGroupRequest) -> ApiResult<GroupRec> {
        crate::repo::validate_new_name("name", &r.name)?;
        validate_name("project", &r.project)?;
        if !r.volumes.is_empty() {
            return Err(ApiError::InvalidArgument(
                "`volumes` must be empty with `from_group_snapshot`: the group's volumes are made from the snapshot"
                    .into(),
            ));
        }
        group_type(&self.core, &r.group_type).await?;
        let snap = self.core.repo.snapshot(&r.from_group_snapshot, &r.project).await?.rec;
        if !r.backend.is_empty() && r.backend != snap.backend {
            return Err(ApiError::InvalidArgument(format!(
                "snapshot {} is at backend {}; a group made from it is made there (leave `backend` empty)",
                snap.name, snap.backend
            )));
        }
        if self.core.repo.store().get(keys::group_name(&r.project, &r.name).as_bytes()).await?.is_some() {
            return Err(ApiError::AlreadyExists(format!(
                "group {} already exists in project {}; pick another name",
                r.name, r.project
            )));
        }
        let names: Vec<String> = snap.members.iter().map(|m| format!("{}-{}", r.name, m.volume_name)).collect();
        for n in &names {
            crate::repo::validate_new_name("volume name made from the group name", n)?;
            if self.core.repo.store().get(keys::volume_name(&r.project, n).as_bytes()).await?.is_some() {
                return Err(ApiError::AlreadyExists(format!(
                    "volume {n} (the name the group's volume would take) already exists; pick another group name"
                )));
            }
        }
        let volumes = super::volumes::VolumeApi { core: self.core.clone() };
        let mut made = Vec::new();
        for (m, name) in snap.members.iter().zip(&names) {
            let v = volumes
                .create(pb::CreateVolumeRequest {
                    name: name.clone(),
                    project: r.project.clone(),
                    from_snapshot: snap.id.clone(),
                    from_volume: m.volume_id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    let so_far = if made.is_empty() { "none".to_string() } else { made.join(", ") };
                    e.with_context(&format!(
                        "making volume {name} of group {}; volumes made so far: {so_far} (delete them, or make the \
                         group of them with `drover group create`)",
                        r.name
                    ))
                })?;
            made.push(v.name);
        }
        r.backend = snap.backend.clone();
        r.volumes = made;
        self.create(r).await
    }

    pub(crate) async fn create(&self, r: pb::CreateGroupRequest) -> ApiResult<GroupRec> {
        crate::repo::validate_new_name("name", &r.name)?;
        validate_name("project", &r.project)?;
        if r.volumes.len() > MAX_GROUP_VOLUMES {
            return Err(ApiError::InvalidArgument(format!(
                "a group holds at most {MAX_GROUP_VOLUMES} volumes, and {} were named; split them into several groups",
                r.volumes.len()
            )));
        }
        let gtype = group_type(&self.core, &r.group_type).await?;
        writable_backend(&self.core, &r.backend, "volume").await?;
        let members = self.joining(&r.volumes, &r.project, &r.backend).await?;
        let id = uuid::Uuid::now_v7().to_string();
        let repl = if gtype.replicates() { replication_status::DISABLED } else { replication_status::NOT_CAPABLE };
        let mut rec = GroupRec {
            id: id.clone(),
            name: r.name.clone(),
            project: r.project.clone(),
            group_type: gtype.name.clone(),
            volume_ids: members.iter().map(|v| v.rec.id.clone()).collect(),
            primary_backend: r.backend.clone(),
            active_backend: r.backend.clone(),
            replication_target: String::new(),
            replication_status: repl.into(),
            status_reason: String::new(),
            epoch: 0,
            history: Vec::new(),
            created_at_ms: now_ms(),
            pending: None,
            sync_interval_seconds: crate::model::DEFAULT_SYNC_INTERVAL_SECONDS,
            divergence_point: String::new(),
            labels: Default::default(),
            tier: crate::model::DEFAULT_TIER,
            for_volume: String::new(),
            app_consistent_point: String::new(),
        };
        rec.record("create", format!("created on backend {} with {} volume(s)", r.backend, members.len()), 0);
        let name_key = keys::group_name(&r.project, &r.name);
        let mut txn = Txn::new()
            .when(Compare::Absent(name_key.clone().into_bytes()))
            .and_then(TxnOp::put(name_key, id.clone()))
            .and_then_all(rec.writes());
        for v in &members {
            let mut vol = v.rec.clone();
            vol.group_id = id.clone();
            vol.replication_status = repl.into();
            txn = txn
                .when(Compare::ModRevisionEquals(keys::volume(&vol.id).into_bytes(), v.rev))
                .and_then(put(&keys::volume(&vol.id), &vol));
        }
        if !self.core.repo.txn(txn).await?.succeeded {
            if self.core.repo.store().get(keys::group_name(&r.project, &r.name).as_bytes()).await?.is_some() {
                return Err(ApiError::AlreadyExists(format!(
                    "group {} already exists in project {}",
                    r.name, r.project
                )));
            }
            return Err(raced("a volume of the new group"));
        }
        tracing::info!(group = %id, name = %r.name, "group created");
        Ok(rec)
    }

    /// Sets labels and the tier: placement for runbooks, allowed in any state.
    async fn relabel(&self, r: &pb::UpdateGroupRequest) -> ApiResult<GroupRec> {
        if r.tier != 0 && !crate::model::TIERS.contains(&r.tier) {
            return Err(ApiError::InvalidArgument(format!(
                "tier {} is out of range: tiers run from {} (first) to {} (last)",
                r.tier,
                crate::model::TIERS.start(),
                crate::model::TIERS.end()
            )));
        }
        for (k, v) in &r.set_labels {
            validate_label(k, v)?;
        }
        let g = self.core.repo.group(&r.group, &r.project).await?;
        let mut rec = g.rec.clone();
        for k in &r.remove_labels {
            rec.labels.remove(k);
        }
        rec.labels.extend(r.set_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if r.tier != 0 {
            rec.tier = r.tier;
        }
        let labels: Vec<String> = rec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rec.record("update", format!("tier {}, labels [{}]", rec.tier, labels.join(", ")), 0);
        let txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::group(&rec.id).into_bytes(), g.rev))
            .and_then_all(rec.writes());
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(raced(&format!("group {}", rec.name)));
        }
        Ok(rec)
    }

    pub(crate) async fn update(&self, r: pb::UpdateGroupRequest) -> ApiResult<GroupRec> {
        let placement = !r.set_labels.is_empty() || !r.remove_labels.is_empty() || r.tier != 0;
        let membership = !r.add_volumes.is_empty() || !r.remove_volumes.is_empty();
        if placement && membership {
            return Err(ApiError::InvalidArgument(
                "change volumes and labels/tier in separate updates (membership has rules of its own)".into(),
            ));
        }
        if placement {
            return self.relabel(&r).await;
        }
        let g = self.core.repo.group(&r.group, &r.project).await?;
        Self::require_membership_changeable(&g.rec)?;
        if membership && !g.rec.for_volume.is_empty() {
            // A volume's own group stays that volume's alone: another volume in it would
            // move with the per-volume calls and be missing from group listings, and an
            // emptied one would block the volume's next enable by its name.
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is volume {}'s own replication group (`drover volume enable-replication`) and holds that \
                 volume alone; put volumes together in a group of their own (`drover group create`), or stop this \
                 volume's replication with `drover volume disable-replication {}`",
                g.rec.name, g.rec.for_volume, g.rec.for_volume
            )));
        }
        if !membership {
            return Err(ApiError::InvalidArgument(
                "nothing to update: name volumes to add or remove, labels to set or remove, or a tier".into(),
            ));
        }
        let changing = r.add_volumes.len() + r.remove_volumes.len();
        if changing > MAX_GROUP_VOLUMES {
            return Err(ApiError::InvalidArgument(format!(
                "one update adds and removes at most {MAX_GROUP_VOLUMES} volumes together, and {changing} were named; \
                 split the change into several updates"
            )));
        }
        let after = (g.rec.volume_ids.len() + r.add_volumes.len()).saturating_sub(r.remove_volumes.len());
        if after > MAX_GROUP_VOLUMES {
            return Err(ApiError::InvalidArgument(format!(
                "group {} would hold {after} volumes, and a group holds at most {MAX_GROUP_VOLUMES}; \
                 put the rest in another group",
                g.rec.name
            )));
        }
        writable_backend(&self.core, &g.rec.primary_backend, "volume").await?;
        let adding = self.joining(&r.add_volumes, &g.rec.project, &g.rec.primary_backend).await?;
        let mut removing = Vec::new();
        for v in &r.remove_volumes {
            let vol = self.core.repo.volume(v, &g.rec.project).await?;
            if vol.rec.group_id != g.rec.id {
                return Err(ApiError::InvalidArgument(format!(
                    "volume {v} is not in group {}; `drover group show {}` lists its volumes",
                    g.rec.name, g.rec.name
                )));
            }
            removing.push(vol);
        }
        let mut rec = g.rec.clone();
        let mut txn = Txn::new().when(Compare::ModRevisionEquals(keys::group(&rec.id).into_bytes(), g.rev));
        for v in &adding {
            let mut vol = v.rec.clone();
            vol.group_id = rec.id.clone();
            vol.replication_status = rec.replication_status.clone();
            rec.volume_ids.push(vol.id.clone());
            txn = txn
                .when(Compare::ModRevisionEquals(keys::volume(&vol.id).into_bytes(), v.rev))
                .and_then(put(&keys::volume(&vol.id), &vol));
        }
        for v in &removing {
            let mut vol = v.rec.clone();
            vol.group_id.clear();
            vol.replication_status = replication_status::DISABLED.into();
            rec.volume_ids.retain(|id| *id != vol.id);
            txn = txn
                .when(Compare::ModRevisionEquals(keys::volume(&vol.id).into_bytes(), v.rev))
                .and_then(put(&keys::volume(&vol.id), &vol));
        }
        rec.record("update", format!("added {}, removed {} volume(s)", adding.len(), removing.len()), 0);
        txn = txn.and_then_all(rec.writes());
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(raced(&format!("group {}", rec.name)));
        }
        Ok(rec)
    }

    async fn delete(&self, r: pb::DeleteGroupRequest) -> ApiResult<()> {
        let g = self.core.repo.group(&r.group, &r.project).await?;
        Self::require_membership_changeable(&g.rec)?;
        let mut txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::group(&g.rec.id).into_bytes(), g.rev))
            .and_then(TxnOp::delete(keys::group(&g.rec.id)))
            .and_then(TxnOp::delete(keys::group_name(&g.rec.project, &g.rec.name)))
            .and_then(TxnOp::DeletePrefix { prefix: keys::group_events(&g.rec.id).into_bytes() });
        for id in &g.rec.volume_ids {
            let Some(v) = self.core.repo.get::<VolumeRec>(&keys::volume(id)).await? else { continue };
            let mut vol = v.rec.clone();
            vol.group_id.clear();
            vol.replication_status = replication_status::DISABLED.into();
            txn = txn
                .when(Compare::ModRevisionEquals(keys::volume(id).into_bytes(), v.rev))
                .and_then(put(&keys::volume(id), &vol));
        }
        if !self.core.repo.txn(txn).await?.succeeded {
            return Err(raced(&format!("group {}", g.rec.name)));
        }
        tracing::info!(group = %g.rec.id, "group deleted");
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::group_service_server::GroupService for GroupApi {
    async fn list_group_types(
        &self,
        _req: Request<pb::ListGroupTypesRequest>,
    ) -> Result<Response<pb::ListGroupTypesResponse>, Status> {
        let types = self.core.repo.list::<GroupTypeRec>(keys::GROUP_TYPES).await?;
        Ok(Response::new(pb::ListGroupTypesResponse {
            group_types: types.into_iter().map(|t| type_to_pb(t.rec)).collect(),
        }))
    }

    async fn get_group_type(&self, req: Request<pb::GetGroupTypeRequest>) -> Result<Response<pb::GroupType>, Status> {
        Ok(Response::new(type_to_pb(group_type(&self.core, &req.into_inner().name).await?)))
    }

    async fn create_group_type(
        &self,
        req: Request<pb::CreateGroupTypeRequest>,
    ) -> Result<Response<pb::GroupType>, Status> {
        let r = req.into_inner();
        validate_name("name", &r.name)?;
        validate_specs(&r.specs)?;
        let rec = GroupTypeRec {
            name: r.name.clone(),
            description: r.description,
            specs: r.specs.into_iter().collect::<BTreeMap<_, _>>(),
            builtin: false,
        };
        let key = keys::group_type(&r.name);
        if !self
            .core
            .repo
            .txn(Txn::new().when(Compare::Absent(key.clone().into_bytes())).and_then(put(&key, &rec)))
            .await?
            .succeeded
        {
            return Err(ApiError::AlreadyExists(format!("group type {} already exists", r.name)).into());
        }
        Ok(Response::new(type_to_pb(rec)))
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let r = crate::auth::scoped(req)?;
        let g =
            if r.from_group_snapshot.is_empty() { self.create(r).await? } else { self.create_from_snapshot(r).await? };
        Ok(Response::new(self.core.repo.group_pb(&g).await?))
    }

    async fn get_group(&self, req: Request<pb::GetGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let r = crate::auth::scoped(req)?;
        let (g, mut out) = self.core.repo.group_shown(&r.group, &r.project).await?;
        let s = g.replication_status.as_str();
        if s == replication_status::ENABLED || s == replication_status::FAILED_OVER {
            let infos = super::shared::volume_infos(&self.core, &g).await?;
            out.rpo_ms = super::shared::rpo_ms(&infos);
        }
        Ok(Response::new(out))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let r = crate::auth::scoped(req)?;
        let index = if r.project.is_empty() {
            None
        } else {
            validate_name("project", &r.project)?;
            Some(keys::group_name(&r.project, ""))
        };
        let paging = crate::repo::PageRequest { limit: r.limit, marker: r.marker };
        let (groups, next_marker) = self.core.repo.page::<GroupRec>(keys::GROUPS, index, &paging).await?;
        Ok(Response::new(pb::ListGroupsResponse {
            // A volume's own replication group is shown through the volume.
            groups: groups.iter().filter(|g| g.for_volume.is_empty()).map(GroupRec::to_pb).collect(),
            next_marker,
        }))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        self.delete(crate::auth::scoped(req)?).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn list_group_events(
        &self,
        req: Request<pb::ListGroupEventsRequest>,
    ) -> Result<Response<pb::ListGroupEventsResponse>, Status> {
        let r = crate::auth::scoped(req)?;
        let limit = crate::repo::PageRequest { limit: r.limit, marker: r.marker.clone() }.limit()?;
        if r.marker.contains('/') {
            return Err(ApiError::InvalidArgument(
                "`marker` is not a marker this server gave (pass the previous page's next_marker)".into(),
            )
            .into());
        }
        let g = self.core.repo.group(&r.group, &r.project).await?.rec;
        let (events, next_marker) = self.core.repo.group_history(&g.id, &r.marker, limit).await?;
        let events = events.iter().map(crate::model::GroupEventRec::to_pb).collect();
        Ok(Response::new(pb::ListGroupEventsResponse { events, next_marker }))
    }

    async fn update_group(&self, req: Request<pb::UpdateGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let g = self.update(crate::auth::scoped(req)?).await?;
        Ok(Response::new(self.core.repo.group_pb(&g).await?))
    }
}

/// Deletes history events older than `retention` (keeping each group's newest
/// [`crate::model::HISTORY_LIMIT`] whatever their age), every `every`, until the process
/// stops. Reads the events in pages, group by group, newest first.
pub async fn prune_history_forever(
    repo: crate::repo::Repo,
    retention: std::time::Duration,
    every: std::time::Duration,
) {
    loop {
        if let Err(e) = prune_history(&repo, retention).await {
            tracing::warn!(error = %e, "pruning group history failed; retrying later");
        }
        tokio::time::sleep(every).await;
    }
}

/// One pass of [`prune_history_forever`]; how many events it deleted.
pub async fn prune_history(repo: &crate::repo::Repo, retention: std::time::Duration) -> ApiResult<usize> {
    let horizon = crate::model::now_ms() - retention.as_millis() as i64;
    let prefix = keys::GROUP_EVENTS.as_bytes();
    let (mut after, mut group, mut kept, mut doomed, mut deleted) = (Vec::new(), Vec::new(), 0, Vec::new(), 0);
    loop {
        let page = repo.store().range_page(prefix, &after, 500).await?;
        for kv in &page.kvs {
            // group-events/<group>/<inverted ms>-<salt>
            let rest = &kv.key[prefix.len()..];
            let Some(slash) = rest.iter().position(|b| *b == b'/') else { continue };
            if rest[..slash] != group[..] {
                group = rest[..slash].to_vec();
                kept = 0;
            }
            kept += 1;
            let at = keys::group_event_time(&rest[slash + 1..]);
            if kept > crate::model::HISTORY_LIMIT && at.is_some_and(|at| at < horizon) {
                doomed.push(TxnOp::delete(kv.key.clone()));
            }
        }
        while doomed.len() >= 100 || (!page.more && !doomed.is_empty()) {
            let n = doomed.len().min(100);
            repo.txn(Txn::new().and_then_all(doomed.drain(..n))).await?;
            deleted += n;
        }
        match page.kvs.last() {
            Some(last) if page.more => after = last.key.clone(),
            _ => return Ok(deleted),
        }
    }
}

/// A label key is a name; its value is up to 128 printable characters without spaces.
fn validate_label(key: &str, value: &str) -> ApiResult<()> {
    validate_name("label key", key)?;
    if value.len() > 128 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::InvalidArgument(format!(
            "label {key}={value:?}: a value is at most 128 characters, without spaces"
        )));
    }
    Ok(())
}

/// The most specs one group type may carry.
const MAX_SPECS: usize = 64;
const SPEC_FALSE: &str = "<is> False";

/// Checks a group type's specs: the two boolean specs Drover acts on take `<is> True` or
/// `<is> False`; other keys must be scoped (`scope:key`, as Cinder's `capabilities:…`)
/// and are kept for other tools; keys and values are 1 to 255 printable characters.
fn validate_specs(specs: &std::collections::HashMap<String, String>) -> Result<(), ApiError> {
    use crate::model::{SPEC_CONSISTENT_SNAPSHOT, SPEC_REPLICATION, SPEC_TRUE};
    if specs.len() > MAX_SPECS {
        return Err(ApiError::InvalidArgument(format!(
            "`specs` has {} entries; a group type takes at most {MAX_SPECS}",
            specs.len()
        )));
    }
    let printable = |t: &str| !t.is_empty() && t.len() <= 255 && !t.chars().any(char::is_control);
    for (k, v) in specs {
        if !printable(k) || k.trim() != k {
            return Err(ApiError::InvalidArgument(format!(
                "spec key {k:?} must be 1 to 255 printable characters without surrounding spaces"
            )));
        }
        if k == SPEC_REPLICATION || k == SPEC_CONSISTENT_SNAPSHOT {
            if v != SPEC_TRUE && v != SPEC_FALSE {
                return Err(ApiError::InvalidArgument(format!(
                    "spec {k} is a boolean: give {SPEC_TRUE:?} or {SPEC_FALSE:?}, not {v:?}"
                )));
            }
        } else if !k.contains(':') {
            return Err(ApiError::InvalidArgument(format!(
                "spec key {k:?} is not one Drover knows ({SPEC_REPLICATION}, {SPEC_CONSISTENT_SNAPSHOT}); keys for \
                 other tools must be scoped, like capabilities:{k}"
            )));
        } else if !printable(v) {
            return Err(ApiError::InvalidArgument(format!(
                "spec {k}: the value must be 1 to 255 printable characters"
            )));
        }
    }
    Ok(())
}
