//! Failover and failback as explicit states, each one a step of the group's procedure:
//!
//! - **Reprotect** (failback only): the side we return to becomes a secondary at a point
//!   it shares with the active side; after a disaster its divergent changes are discarded
//!   only with the operator's recorded consent.
//! - **FinalSync** (planned moves): the active side stops writes, ships a last recovery
//!   point and demotes itself once the other side has it: the one owner of demotion. When
//!   the source refuses (it ships only from a primary), the state asks both sides for
//!   their roles: a source already demoted at the point the target holds needs no final
//!   sync (a retry after the promote failed).
//! - **Promote**: the target becomes primary (forced in a disaster, which never touches
//!   the failed side and records the divergence point). Promoting a primary is a no-op
//!   at the agent, and a forced promote is replayed by its op_id (which keeps its
//!   divergence point); when a planned promote is refused, the state asks the target for
//!   the volume's role, and a volume a cut-off move already promoted counts as promoted.
//! - **Record**: one transaction writes the final statuses, outcomes and history.
//!
//! Roles are read only after a refusal, never before the call: a move whose calls
//! succeed makes no probe (at scale the probes were a third of a move's agent calls and
//! a serial round trip in each of the final sync and the promote).
//!
//! Each state persists what it found ([`FailoverProgress`]) before the next runs, except
//! the promote: the record follows it in the same step of the group's procedure (a
//! promote run again after a crash is a no-op, or a replay by its op_id).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// The states of a move, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverState {
    Reprotect,
    FinalSync,
    Promote,
    Record,
}

impl FailoverState {
    /// The first state of a move.
    pub fn first(failback: bool, force: bool) -> Self {
        if failback && !force {
            FailoverState::Reprotect
        } else if !force {
            FailoverState::FinalSync
        } else {
            FailoverState::Promote
        }
    }

    /// The state after this one.
    pub fn next(self, force: bool) -> Option<Self> {
        match self {
            FailoverState::Reprotect if force => Some(FailoverState::Promote),
            FailoverState::Reprotect => Some(FailoverState::FinalSync),
            FailoverState::FinalSync => Some(FailoverState::Promote),
            FailoverState::Promote => Some(FailoverState::Record),
            FailoverState::Record => None,
        }
    }

    /// The step name shown in executions.
    pub fn name(self) -> &'static str {
        match self {
            FailoverState::Reprotect => "reprotect",
            FailoverState::FinalSync => "final-sync",
            FailoverState::Promote => "promote",
            FailoverState::Record => "record",
        }
    }
}

/// What the states of a move found so far; persisted between them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverProgress {
    /// What happened, for the group's history.
    pub notes: Vec<String>,
    /// Why the move cannot go on; every volume then ends in error with this reason.
    pub blocked: Option<String>,
    /// Per volume, once promoted: the divergence point of a forced promote, or why it failed.
    pub outcomes: Vec<(String, Result<Option<String>, String>)>,
    /// What the final sync shipped (bytes, milliseconds), once it ran.
    #[serde(default)]
    pub final_sync: Option<(i64, i64)>,
    /// Final sync rounds given up so far (the agent recorded every attempt of each as
    /// failed): round `n` > 0 runs under the op_id `<op>/final-sync/<n>`.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub sync_rounds: u32,
    /// The same for each volume's operations (reprotect's demote and resync, the
    /// promote), by `<volume>/<operation>`: round `n` > 0 runs under
    /// `<op>/<volume>/<operation>/<n>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rounds: BTreeMap<String, u32>,
    /// When the current state (reprotect, final sync, promote; or an enable's or a
    /// disable's calls) first failed for a cause that may pass (ms since the epoch; 0
    /// while it has not): it runs again for the orchestrator's `move_patience` after.
    /// Cleared when the state succeeds.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub failing_since_ms: i64,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

// A move runs its reprotect, final sync or promote again, for the orchestrator's
// `move_patience`, while they fail for a cause that may pass (an agent restarting, a
// connection lost), before it stops with its volumes in error. Until the final sync
// succeeds nothing has changed at the side that serves, so waiting is safe; after it both
// sides are secondary and only the promote serves the group again, so waiting for the
// target beats leaving it with no primary. The execution shows each failure as the step's
// last transient error meanwhile.
impl FailoverProgress {
    /// After a failure whose cause may pass: how much longer the state may be run again
    /// (None once `patience` has run out). The first such failure starts the clock.
    pub(super) fn patience_left(&mut self, patience: std::time::Duration) -> Option<std::time::Duration> {
        let now = crate::model::now_ms();
        if self.failing_since_ms == 0 {
            self.failing_since_ms = now;
        }
        patience
            .checked_sub(std::time::Duration::from_millis((now - self.failing_since_ms).max(0) as u64))
            .filter(|left| !left.is_zero())
    }

    /// Takes what a state to be run again must remember from `tried` (its rounds, and
    /// since when it fails); the rest of what the states found is found again.
    pub fn keep_retry_counts(&mut self, tried: &FailoverProgress) {
        self.sync_rounds = tried.sync_rounds;
        self.rounds = tried.rounds.clone();
        self.failing_since_ms = tried.failing_since_ms;
    }
}

/// The op_id of round `round` of an operation whose first round is `base`.
pub(super) fn round_op_id(base: String, round: u32) -> String {
    match round {
        0 => base,
        n => format!("{base}/{n}"),
    }
}

/// The op_id of a volume's operation `key` (`<volume>/<operation>`) of move `op`, in the
/// round `rounds` is at.
pub(super) fn volume_op_id(op: &str, key: &str, rounds: &BTreeMap<String, u32>) -> String {
    round_op_id(format!("{op}/{key}"), rounds.get(key).copied().unwrap_or(0))
}

/// What a run of a per-volume state learnt of its failures: whether one may pass, and
/// which operations (`<volume>/<operation>`) the agent recorded every attempt of as failed.
#[derive(Default)]
pub(super) struct Tries {
    transient: std::sync::atomic::AtomicBool,
    spent: std::sync::Mutex<Vec<String>>,
}

impl Tries {
    pub(super) fn note(&self, key: String, status: &Status) {
        if crate::agents::classify(status) != crate::agents::Failure::Terminal {
            self.transient.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if crate::agents::attempts_spent(status) {
            self.spent.lock().expect("not poisoned").push(key);
        }
    }
}

impl FailoverProgress {
    /// After a run of a per-volume state with `failed` failures: how much longer it may be
    /// run again, once its spent operations moved to their next round; None when nothing
    /// failed, no failure may pass, or the patience ran out (the failures then stand).
    pub(super) fn again(
        &mut self,
        failed: usize,
        tries: Tries,
        patience: std::time::Duration,
    ) -> Option<std::time::Duration> {
        if failed == 0 {
            self.failing_since_ms = 0;
            return None;
        }
        if !tries.transient.into_inner() {
            return None;
        }
        let left = self.patience_left(patience)?;
        for key in tries.spent.into_inner().expect("not poisoned") {
            *self.rounds.entry(key).or_default() += 1;
        }
        Some(left)
    }
}

/// One volume's role and point on a backend, as its agent reports them.
struct Seen {
    role: String,
    point: String,
}

impl ReplicationApi {
    /// Whether some agent of `backend` is registered and answers a probe.
    async fn answers(&self, backend: &str) -> bool {
        let Ok(regs) = self.core.agents.registrations(backend).await else { return false };
        for a in regs {
            let deadline = self.core.agents.deadline(backend, Deadline::Probe);
            if self.core.agents.probe(&a.endpoint, deadline).await.is_ok() {
                return true;
            }
        }
        false
    }

    async fn seen(&self, backend: &str, volume_id: &str) -> Result<Seen, String> {
        let req = apb::GetReplicationInfoRequest { volume_id: volume_id.to_string(), estimate_pending: false };
        let info = self
            .core
            .agents
            .call(backend, Deadline::Probe, false, |mut c| {
                let req = req.clone();
                async move { c.get_replication_info(req).await }
            })
            .await
            .map_err(|s| format!("backend {backend}: {}", s.message()))?;
        let role = match apb::ReplicationRole::try_from(info.role) {
            Ok(apb::ReplicationRole::Primary) => "primary",
            Ok(apb::ReplicationRole::Secondary) => "secondary",
            _ => "",
        };
        Ok(Seen { role: role.into(), point: info.recovery_point_id })
    }

    /// Runs one state of the move of `group` (whose pending op is the move). Returns the
    /// result once [`FailoverState::Record`] has written it.
    pub(crate) async fn failover_state(
        &self,
        state: FailoverState,
        group: GroupRec,
        volumes: Vec<VolumeRec>,
        epoch: i64,
        at: &Expect,
        progress: &mut FailoverProgress,
    ) -> ApiResult<Option<pb::ReplicationResult>> {
        let op = group.pending.clone().expect("a move has a pending op");
        match state {
            FailoverState::Reprotect => self.reprotect(&group, &volumes, &op, epoch, progress).await?,
            FailoverState::FinalSync => self.final_sync(&group, &volumes, &op, epoch, progress).await?,
            FailoverState::Promote => self.promote(&volumes, &op, epoch, progress).await?,
            FailoverState::Record => return self.record(group, volumes, epoch, at, progress).await.map(Some),
        }
        Ok(None)
    }

    async fn reprotect(
        &self,
        group: &GroupRec,
        volumes: &[VolumeRec],
        op: &PendingOp,
        epoch: i64,
        progress: &mut FailoverProgress,
    ) -> ApiResult<()> {
        let to = op.target.clone();
        let scope = format!("group/{}", group.id);
        let discard = !group.divergence_point.is_empty() && op.reference == to;
        let tries = Tries::default();
        let (tries_ref, rounds) = (&tries, &progress.rounds);
        let prep = self
            .each_volume(volumes, |v| {
                let (op_id, scope, to) = (op.op_id.clone(), scope.clone(), to.clone());
                async move {
                    let key = format!("{}/reprotect-demote", v.id);
                    let demote = apb::DemoteVolumeRequest {
                        ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope.clone()),
                        volume_id: v.id.clone(),
                    };
                    self.core
                        .agents
                        .mutate(&to, Deadline::Call, demote, |mut c, req| async move { c.demote_volume(req).await })
                        .await
                        .map_err(|s| {
                            tries_ref.note(key, &s);
                            format!("reprotect: could not demote on {to}: {}", s.message())
                        })?;
                    if discard {
                        let key = format!("{}/reprotect-resync", v.id);
                        let resync = apb::ResyncVolumeRequest {
                            ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope),
                            volume_id: v.id.clone(),
                        };
                        self.core
                            .agents
                            .mutate(&to, Deadline::Call, resync, |mut c, req| async move { c.resync_volume(req).await })
                            .await
                            .map_err(|s| {
                                tries_ref.note(key, &s);
                                format!("reprotect: could not resync on {to}: {}", s.message())
                            })?;
                    }
                    Ok(None)
                }
            })
            .await;
        let failed = prep.iter().filter(|o| o.result.is_err()).count();
        // Nothing changed at the side that serves: the reprotect runs again while the
        // side it prepares may be back in a moment.
        if let Some(left) = progress.again(failed, tries, self.core.config.move_patience) {
            return Err(ApiError::Unavailable(format!(
                "{}; trying again for up to {} s more, then the move stops with its volumes in error (if it does: \
                 bring {to}'s agent back, `drover backend show {to}`, then retry)",
                Self::summarize(&prep).unwrap_or_default(),
                left.as_secs().max(1)
            )));
        }
        progress.blocked = Self::summarize(&prep);
        if discard && progress.blocked.is_none() {
            progress.notes.push(format!(
                "operator chose to discard the changes on {to} made after divergence point {}",
                group.divergence_point
            ));
        }
        Ok(())
    }

    async fn final_sync(
        &self,
        group: &GroupRec,
        volumes: &[VolumeRec],
        op: &PendingOp,
        epoch: i64,
        progress: &mut FailoverProgress,
    ) -> ApiResult<()> {
        if progress.blocked.is_some() {
            return Ok(());
        }
        let (from, to) = (group.active_backend.clone(), op.target.clone());
        let to_ep = self.endpoint(&to).await;
        let op_id = round_op_id(format!("{}/final-sync", op.op_id), progress.sync_rounds);
        match self.sync_call(&from, &group.id, op_id, epoch, true, to_ep).await {
            Ok(r) => {
                progress.failing_since_ms = 0;
                progress.final_sync = Some((r.bytes, r.duration_ms));
                progress.notes.push(format!(
                    "final sync {} shipped {} bytes in {} ms",
                    r.recovery_point_id, r.bytes, r.duration_ms
                ))
            }
            Err(_) if self.demoted_at_target_point(&from, &to, volumes).await => {
                // An earlier final sync demoted the source (a retry after the promote
                // failed): shipping again is neither possible nor needed.
                progress
                    .notes
                    .push(format!("{from} was already demoted at the point {to} holds; no final sync needed"));
            }
            Err(e) => {
                // Name the side that is really unreachable: a dead target needs its agent
                // back, not a forced failover of a healthy source.
                let (cause, advice) = if !self.answers(&to).await {
                    (
                        format!("the target {to} does not answer"),
                        format!("bring its agent back (`drover backend show {to}`), then retry"),
                    )
                } else if !self.answers(&from).await {
                    (
                        format!("{from} does not answer"),
                        "if it is lost, fail over with --force (a disaster failover)".to_string(),
                    )
                } else {
                    ("both sides answer".to_string(), "fix the cause above, then retry".to_string())
                };
                if e.transient
                    && let Some(left) = progress.patience_left(self.core.config.move_patience)
                {
                    // Either side may be back in a moment (an agent restarting): the step
                    // runs again. A round whose every attempt the agent recorded as failed
                    // is over, and the next one goes under a new op_id; otherwise the
                    // outcome is unknown and only the same op_id may be sent again.
                    if e.spent {
                        progress.sync_rounds += 1;
                    }
                    return Err(ApiError::Unavailable(format!(
                        "{}; {cause}: trying again for up to {} s more, then the move stops with its volumes in \
                         error (if it does: {advice})",
                        e.message,
                        left.as_secs().max(1)
                    )));
                }
                progress.blocked = Some(format!("{}; {cause}: {advice}", e.message))
            }
        }
        Ok(())
    }

    /// Whether every volume of the group is secondary on both sides at one point: what
    /// an earlier final sync leaves behind once the source demoted itself.
    async fn demoted_at_target_point(&self, from: &str, to: &str, volumes: &[VolumeRec]) -> bool {
        if volumes.is_empty() {
            return false;
        }
        for v in volumes {
            match tokio::join!(self.seen(from, &v.id), self.seen(to, &v.id)) {
                (Ok(s), Ok(t))
                    if s.role == "secondary" && t.role == "secondary" && !s.point.is_empty() && s.point == t.point => {}
                _ => return false,
            }
        }
        true
    }

    async fn promote(
        &self,
        volumes: &[VolumeRec],
        op: &PendingOp,
        epoch: i64,
        progress: &mut FailoverProgress,
    ) -> ApiResult<()> {
        if let Some(reason) = &progress.blocked {
            progress.outcomes = volumes.iter().map(|v| (v.id.clone(), Err(reason.clone()))).collect();
            return Ok(());
        }
        let tries = Tries::default();
        let (tries_ref, rounds) = (&tries, &progress.rounds);
        let to = op.target.clone();
        let scope = format!("group/{}", volumes.first().map(|v| v.group_id.clone()).unwrap_or_default());
        let outcomes = self
            .each_volume(volumes, |v| {
                let (op_id, scope, to) = (op.op_id.clone(), scope.clone(), to.clone());
                let force = op.force;
                async move {
                    let key = format!("{}/promote", v.id);
                    let req = apb::PromoteVolumeRequest {
                        ctx: ctx(volume_op_id(&op_id, &key, rounds), epoch as u64, scope),
                        volume_id: v.id.clone(),
                        force,
                    };
                    match self
                        .core
                        .agents
                        .mutate(&to, Deadline::Call, req, |mut c, req| async move { c.promote_volume(req).await })
                        .await
                    {
                        Ok(resp) => Ok((!resp.divergence_point.is_empty()).then_some(resp.divergence_point)),
                        // A planned promote that already happened (the op was cut off after
                        // it, and its replay was refused): the volume is where the move
                        // puts it. A forced one keeps its refusal: its replay by op_id is
                        // what returns the divergence point it recorded.
                        Err(_) if !force && self.seen(&to, &v.id).await.is_ok_and(|s| s.role == "primary") => Ok(None),
                        Err(s) => {
                            tries_ref.note(key, &s);
                            Err(format!("could not promote on {to}: {}", s.message()))
                        }
                    }
                }
            })
            .await;
        let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
        // The promote runs again: a volume whose round was spent under its next op_id, any
        // other under the same one (a volume that was promoted answers again with what it
        // recorded; one whose outcome is unknown may only be asked again).
        if let Some(left) = progress.again(failed, tries, self.core.config.move_patience) {
            let first = outcomes.iter().find_map(|o| o.result.as_ref().err()).cloned().unwrap_or_default();
            return Err(ApiError::Unavailable(format!(
                "{failed} of {} volume(s) not promoted yet, first: {first}; trying again for up to {} s more, then \
                 the move stops with its volumes in error (if it does: bring {to}'s agent back, `drover backend \
                 show {to}`, then retry)",
                outcomes.len(),
                left.as_secs().max(1)
            )));
        }
        progress.outcomes = outcomes.into_iter().map(|o| (o.volume_id, o.result)).collect();
        Ok(())
    }

    async fn record(
        &self,
        mut group: GroupRec,
        mut volumes: Vec<VolumeRec>,
        epoch: i64,
        at: &Expect,
        progress: &mut FailoverProgress,
    ) -> ApiResult<pb::ReplicationResult> {
        let op = group.pending.clone().expect("a move has a pending op");
        let failback = op.action == "failback";
        let (from, to) = (group.active_backend.clone(), op.target.clone());
        let outcomes: Vec<Outcome> = if progress.outcomes.is_empty() {
            let reason = progress.blocked.clone().unwrap_or_else(|| "the move did not reach its promote state".into());
            volumes.iter().map(|v| Outcome { volume_id: v.id.clone(), result: Err(reason.clone()) }).collect()
        } else {
            progress.outcomes.iter().map(|(id, r)| Outcome { volume_id: id.clone(), result: r.clone() }).collect()
        };
        let failure = Self::summarize(&outcomes);
        let done = if failback { rs::ENABLED } else { rs::FAILED_OVER };
        for v in &mut volumes {
            match outcomes.iter().find(|o| o.volume_id == v.id).map(|o| &o.result) {
                Some(Ok(_)) => {
                    v.active_backend = to.clone();
                    v.replication_status = done.into();
                }
                _ => v.replication_status = rs::ERROR.into(),
            }
        }
        let divergence: Vec<String> =
            outcomes.iter().filter_map(|o| o.result.as_ref().ok().and_then(|d| d.as_ref()).cloned()).collect();
        group.pending = None;
        group.epoch = epoch as u64;
        let kind = if op.force { "disaster" } else { "planned" };
        let mut notes = progress.notes.clone();
        match &failure {
            None => {
                group.replication_status = done.into();
                group.active_backend = to.clone();
                if op.force {
                    // The side we left was not demoted: it may take writes this side never
                    // sees. Record where the two histories split.
                    group.divergence_point = divergence.first().cloned().unwrap_or_else(|| "unknown".into());
                    notes.push(format!("divergence point {}", group.divergence_point));
                } else if failback {
                    group.divergence_point.clear();
                }
                let mut detail = format!("{kind} {} from {from} to {to}", op.action);
                for n in &notes {
                    detail.push_str("; ");
                    detail.push_str(n);
                }
                group.record(&op.action, detail, epoch as u64);
            }
            Some(reason) => {
                group.replication_status = rs::ERROR.into();
                group.status_reason =
                    format!("{} to {to}: {reason}; retry the same command once the cause is fixed", op.action);
                group.record(&op.action, format!("{kind} {} to {to} failed: {reason}", op.action), epoch as u64);
            }
        }
        self.finish(&op.action, &group, &volumes, at).await?;
        let mut result = Self::result(&group, &outcomes);
        if let Some((bytes, ms)) = progress.final_sync {
            result.final_sync_bytes = Some(bytes);
            result.final_sync_ms = Some(ms);
        }
        Ok(result)
    }
}
