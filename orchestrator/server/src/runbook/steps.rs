//! What each kind of step does to one item: submitting and following a group's
//! execution, freezing a backend, checking a group, listing divergence, running a
//! command. A new kind adds its variant to `schema::Step` and its work here.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_procedure::{ExecutionStatus, ProcedureError, keys as ekeys};
use drover_proto::v1 as pb;
use drover_store::{Compare, Txn};

use super::kinds::StepKind;
use super::plan::{Item, select};
use super::schema::{Dur, Selector};
use crate::error::{ApiError, ApiResult};
use crate::model::{BackendRec, GroupRec, keys, now_ms, replication_status as rs};
use crate::procedures::{Answer, step_error};
use crate::repo::{Versioned, put};
use crate::service::Core;
use crate::service::replication::ReplicationApi;
use crate::service::shared::point_time_ms;

/// Submits the item's execution (as a child of `parent`), or adopts the one a crash of
/// this run left: the group's lock held by an execution of this run, or the group at the
/// goal already (the plan checked it was not, before the item was marked starting).
///
/// `read` is the group as this run read it when it found the group could move, in this
/// process, since the item became `starting`: nothing can have been submitted for the
/// item since (only this function submits, and the run hands a record over once), so
/// neither the lock nor the group is read again. Should that submit fail for any reason
/// (the group changed since, or an outcome that is not known), the item goes the way a
/// resumed one does.
pub async fn start(
    core: &std::sync::Arc<Core>,
    def: &dyn StepKind,
    item: &Item,
    parent: &str,
    read: Option<Versioned<GroupRec>>,
) -> Result<Item, ProcedureError> {
    let mut item = item.clone();
    let api = ReplicationApi { core: core.clone(), parent: parent.to_string() };
    if let Some(g) = read
        && let Ok(id) = def.submit(&api, &g).await
    {
        item.status = "running".into();
        item.execution_id = id;
        return Ok(item);
    }
    let lock = ekeys::lock(&format!("group/{}", item.target));
    if let Some(kv) = core.repo.store().get(lock.as_bytes()).await.map_err(|e| ProcedureError::Retry(e.to_string()))? {
        let holder = String::from_utf8_lossy(&kv.value).into_owned();
        if let Ok(Some(rec)) = core.procedures.get(&holder).await
            && rec.parent == parent
        {
            item.status = "running".into();
            item.execution_id = holder;
            return Ok(item);
        }
    }
    let Some(g) = core.repo.get::<GroupRec>(&keys::group(&item.target)).await.map_err(step_error)? else {
        item.status = "skipped".into();
        item.reason = "the group no longer exists".into();
        return Ok(item);
    };
    if def.at_goal(&g.rec) {
        item.status = "succeeded".into();
        item.reason = "done (its execution ended while this run was being resumed)".into();
        item.ended_ms = now_ms();
        return Ok(item);
    }
    let submitted = def.submit(&api, &g).await;
    match submitted {
        Ok(id) => {
            item.status = "running".into();
            item.execution_id = id;
        }
        Err(ApiError::Unavailable(m)) => return Err(ProcedureError::Retry(m)),
        Err(e) => {
            item.status = "failed".into();
            item.reason = e.to_string();
            item.ended_ms = now_ms();
        }
    }
    Ok(item)
}

/// The item with its outcome once its execution ended; `None` while it runs.
pub async fn finished(
    core: &Core,
    def: &dyn StepKind,
    item: &Item,
    run_started_ms: i64,
) -> Result<Option<Item>, ProcedureError> {
    let rec = match core.procedures.get(&item.execution_id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            let mut item = item.clone();
            item.status = "failed".into();
            item.reason = format!("execution {} is gone", item.execution_id);
            return Ok(Some(item));
        }
        Err(e) => return Err(ProcedureError::Retry(e.to_string())),
    };
    if !rec.status.is_terminal() {
        return Ok(None);
    }
    let mut item = item.clone();
    item.ended_ms = rec.updated_ms;
    let answer = serde_json::from_value::<Answer>(rec.output.clone());
    let failure = match (rec.status, answer) {
        (ExecutionStatus::Succeeded, Ok(Answer::Ok { value })) => {
            let group = value.get("group").and_then(|g| serde_json::from_value::<pb::Group>(g.clone()).ok());
            let bad: Vec<String> = value
                .get("items")
                .and_then(|i| i.as_array())
                .into_iter()
                .flatten()
                .filter(|i| i.get("outcome").and_then(|o| o.as_str()) != Some("success"))
                .map(|i| format!("{}: {}", i["volume_id"].as_str().unwrap_or("?"), i["reason"].as_str().unwrap_or("")))
                .collect();
            match group {
                Some(g) if g.replication_status == rs::ERROR => Some(g.status_reason),
                Some(g) if !bad.is_empty() => Some(format!("{}: {}", g.name, bad.join("; "))),
                Some(g) => {
                    if matches!(def.kind(), "failover" | "failback") {
                        item.rto_ms = (rec.updated_ms - run_started_ms).max(0);
                        // A planned move ships everything with its final sync.
                        item.rpo_ms = if def.forced() {
                            point_time_ms(&g.divergence_point).map_or(-1, |t| (item.started_ms - t).max(0))
                        } else {
                            0
                        };
                        let field = |k: &str| value.get(k).and_then(|v| v.as_i64()).unwrap_or(-1);
                        item.sync_bytes = field("final_sync_bytes");
                        item.sync_ms = field("final_sync_ms");
                    }
                    None
                }
                None => None,
            }
        }
        (ExecutionStatus::Succeeded, Ok(Answer::Err { message, .. })) => Some(message),
        (ExecutionStatus::Succeeded, Err(e)) => Some(format!("unreadable result: {e}")),
        (status, _) => Some(format!("execution {} {}: {}", rec.id, status.as_str(), rec.error)),
    };
    match failure {
        None => item.status = "succeeded".into(),
        Some(why) => {
            item.status = "failed".into();
            item.reason = why;
        }
    }
    Ok(Some(item))
}

/// Freezes or thaws a backend (idempotent), while `claim` (the step owner's) holds.
pub async fn set_frozen(core: &Core, backend: &str, frozen: bool, claim: Compare) -> ApiResult<()> {
    for _ in 0..5 {
        let b = core
            .repo
            .get::<BackendRec>(&keys::backend(backend))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("backend {backend} is gone")))?;
        if b.rec.frozen == frozen {
            return Ok(());
        }
        let mut rec = b.rec.clone();
        rec.frozen = frozen;
        let txn = Txn::new()
            .when(Compare::ModRevisionEquals(keys::backend(backend).into_bytes(), b.rev))
            .when(claim.clone())
            .and_then(put(&keys::backend(backend), &rec));
        if core.repo.txn(txn).await?.succeeded {
            return Ok(());
        }
        if !core.repo.txn(Txn::new().when(claim.clone())).await?.succeeded {
            return Err(ApiError::Aborted(format!(
                "this orchestrator lost its claim on the execution before backend {backend} was {}; its new owner carries on",
                if frozen { "frozen" } else { "thawed" }
            )));
        }
    }
    Err(crate::error::raced(&format!("backend {backend}")))
}

/// Checks each item's group: its status and, when asked, its RPO. Returns how many failed.
pub async fn verify(core: &Core, items: &mut [Item], status: Option<&str>, max_rpo: Option<Dur>) -> ApiResult<usize> {
    use futures::StreamExt;
    // Several groups at a time: each check is a store read (and, with an RPO bound, the
    // agents' view of its volumes), and a site's check covers thousands of groups.
    let targets: Vec<String> = items.iter().map(|i| i.target.clone()).collect();
    let verdicts: Vec<ApiResult<(Option<String>, Option<i64>)>> = futures::stream::iter(targets)
        .map(|target| async move { check_group(core, &target, status, max_rpo).await })
        .buffered(CHECKS_AT_ONCE)
        .collect()
        .await;
    let mut failed = 0;
    for (item, verdict) in items.iter_mut().zip(verdicts) {
        let (why, rpo) = verdict?;
        if let Some(rpo) = rpo {
            item.rpo_ms = rpo;
        }
        item.ended_ms = now_ms();
        match why {
            None => item.status = "succeeded".into(),
            Some(w) => {
                item.status = "failed".into();
                item.reason = w;
                failed += 1;
            }
        }
    }
    Ok(failed)
}

/// Groups a check step reads at once.
const CHECKS_AT_ONCE: usize = 64;

/// Why the group `id` fails the check (`None` when it passes), and its RPO when the
/// check bounds it.
async fn check_group(
    core: &Core,
    id: &str,
    status: Option<&str>,
    max_rpo: Option<Dur>,
) -> ApiResult<(Option<String>, Option<i64>)> {
    let Some(g) = core.repo.get::<GroupRec>(&keys::group(id)).await? else {
        return Ok((Some("the group no longer exists".to_string()), None));
    };
    if let Some(s) = status.filter(|s| g.rec.replication_status != *s) {
        return Ok((Some(format!("replication is {}, expected {s}", g.rec.replication_status)), None));
    }
    let Some(bound) = max_rpo else { return Ok((None, None)) };
    let infos = crate::service::shared::volume_infos(core, &g.rec).await?;
    let rpo = crate::service::shared::rpo_ms(&infos);
    let why = (rpo < 0 || rpo as u128 > bound.0.as_millis()).then(|| {
        format!(
            "RPO {} exceeds the bound {}",
            if rpo < 0 { "unknown".into() } else { format!("{rpo} ms") },
            humantime::format_duration(bound.0)
        )
    });
    Ok((why, Some(rpo)))
}

/// Per selected group that diverged in a disaster: whose changes a failback discards.
pub async fn divergence(core: &Core, sel: &Selector) -> ApiResult<Vec<String>> {
    Ok(select(core, sel)
        .await?
        .into_iter()
        .filter(|g| !g.divergence_point.is_empty())
        .map(|g| {
            format!(
                "group {} (project {}): failing back to {} discards {}'s writes after recovery point {}; {} keeps its writes",
                g.name, g.project, g.primary_backend, g.primary_backend, g.divergence_point, g.active_backend
            )
        })
        .collect())
}

/// Whether every item's group has `status`; the names of those that do not.
pub async fn reached(core: &Core, items: &[Item], status: &str) -> ApiResult<(bool, Vec<String>)> {
    let mut missing = Vec::new();
    for item in items {
        let g = core.repo.get::<GroupRec>(&keys::group(&item.target)).await?;
        if g.is_none_or(|g| g.rec.replication_status != status) {
            missing.push(item.name.clone());
        }
    }
    Ok((missing.is_empty(), missing))
}

/// Runs a command with the runbook's parameters in its environment
/// (`DROVER_PARAM_<NAME>`); its exit code is the outcome.
pub async fn exec(
    command: &[String],
    timeout: Duration,
    params: &BTreeMap<String, String>,
    env: &[(&str, String)],
) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]).kill_on_drop(true).stdin(std::process::Stdio::null());
    for (k, v) in params {
        cmd.env(format!("DROVER_PARAM_{}", k.to_uppercase()), v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = command.join(" ");
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => return Err(format!("`{shown}` did not finish within {}", humantime::format_duration(timeout))),
        Ok(Err(e)) => return Err(format!("`{shown}` could not start: {e}")),
        Ok(Ok(o)) => o,
    };
    let text = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).into_owned();
    let tail: String = text.trim().chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
    if out.status.success() {
        Ok(format!("`{shown}` exited 0{}", if tail.is_empty() { String::new() } else { format!(": {tail}") }))
    } else {
        Err(format!(
            "`{shown}` failed ({}){}",
            out.status,
            if tail.is_empty() { String::new() } else { format!(": {tail}") }
        ))
    }
}

/// Clones every volume of each item's group at its replication target (idempotent per
/// clone id, so a resumed step asks again and gets the same clones).
pub async fn test_clones(
    core: &Core,
    items: &mut [Item],
    step: &str,
    execution_id: &str,
    epoch: i64,
) -> Result<Vec<super::run::TestCloneRec>, ProcedureError> {
    use drover_proto::agent::v1 as apb;
    let mut made = Vec::new();
    for item in items.iter_mut().filter(|i| !i.done()) {
        item.started_ms = now_ms();
        let Some(g) = core.repo.get::<GroupRec>(&keys::group(&item.target)).await.map_err(step_error)? else {
            item.status = "skipped".into();
            item.reason = "the group no longer exists".into();
            continue;
        };
        let g = g.rec;
        if g.replication_status != rs::ENABLED {
            item.status = "skipped".into();
            item.reason =
                format!("replication is {}; test clones need a group replicating as usual", g.replication_status);
            continue;
        }
        let mut uris = Vec::new();
        let mut failure = None;
        for volume_id in &g.volume_ids {
            let clone_id = format!("t{execution_id}-{volume_id}");
            let req = apb::CloneRecoveryPointRequest {
                ctx: crate::agents::ctx(
                    format!("{execution_id}/clone/{volume_id}"),
                    epoch as u64,
                    format!("volume/{clone_id}"),
                ),
                volume_id: volume_id.clone(),
                clone_id: clone_id.clone(),
            };
            let got = core
                .agents
                .mutate(&g.replication_target, crate::agents::Deadline::Call, req, |mut c, r| async move {
                    c.clone_recovery_point(r).await
                })
                .await;
            match got {
                Ok(info) => {
                    let uri = info.connection.map(|c| c.uri).unwrap_or_default();
                    uris.push(uri.clone());
                    made.push(super::run::TestCloneRec {
                        step: step.to_string(),
                        group: g.name.clone(),
                        volume_id: volume_id.clone(),
                        backend: g.replication_target.clone(),
                        clone_id,
                        uri,
                        recovery_point_id: info.recovery_point_id,
                        deleted: false,
                    });
                }
                Err(s) if crate::service::shared::agent_refused(&s) => {
                    failure = Some(format!("{} on {}: {}", volume_id, g.replication_target, s.message()));
                    break;
                }
                Err(s) => return Err(ProcedureError::Retry(format!("cloning {volume_id}: {}", s.message()))),
            }
        }
        item.ended_ms = now_ms();
        match failure {
            None => {
                item.status = "succeeded".into();
                item.reason = format!("clones at {}: {}", g.replication_target, uris.join(" "));
            }
            Some(why) => {
                item.status = "failed".into();
                item.reason = why;
            }
        }
    }
    Ok(made)
}

/// Removes one test clone.
pub async fn delete_clone(
    core: &Core,
    c: &super::run::TestCloneRec,
    execution_id: &str,
    epoch: i64,
) -> Result<(), String> {
    use drover_proto::agent::v1 as apb;
    let req = apb::DeleteCloneRequest {
        ctx: crate::agents::ctx(
            format!("{execution_id}/unclone/{}", c.clone_id),
            epoch as u64,
            format!("volume/{}", c.clone_id),
        ),
        clone_id: c.clone_id.clone(),
    };
    core.agents
        .mutate(&c.backend, crate::agents::Deadline::Call, req, |mut a, r| async move { a.delete_clone(r).await })
        .await
        .map(|_| ())
        .map_err(|s| format!("clone {} on {}: {}", c.clone_id, c.backend, s.message()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn point_times_come_from_uuid_v7() {
        let before = crate::model::now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        let t = super::point_time_ms(&id).unwrap();
        assert!((before - 5..=before + 5000).contains(&t), "{t} vs {before}");
        assert_eq!(super::point_time_ms("not-a-uuid"), None);
    }
}
