//! Fenced on return (DESIGN.md invariant 6): an agent that starts again may have been gone
//! while its groups were failed over away. Its driver holds writes on every group it was
//! primary for (see [`Driver::held_groups`]) until an orchestrator says, per group, that
//! this side is still the active one (release), that it is not (demote here, with the
//! fence raised to the group's epoch, so this side's writes since its last shipped point
//! stay as divergent changes for the operator to keep or discard), or that a transition
//! is in flight (keep holding and ask again).

use std::sync::Arc;

use drover_proto::v1 as pb;

use crate::driver::{Driver, HeldGroup, OpInfo, in_op};
use crate::ledger::Ledger;

/// What the registration loop needs to settle held groups.
#[derive(Clone)]
pub struct Fencing {
    pub driver: Arc<dyn Driver>,
    pub ledger: Ledger,
}

impl Fencing {
    /// The groups still held, with this agent's highest epoch for each.
    pub fn claims(&self) -> Vec<pb::HeldGroup> {
        self.driver
            .held_groups()
            .into_iter()
            .map(|HeldGroup { group_id, volume_ids }| {
                let epoch = self.ledger.highest_epoch(&format!("group/{group_id}")).unwrap_or(0);
                pb::HeldGroup { group_id, epoch, volume_ids }
            })
            .collect()
    }

    /// Carries out the orchestrator's verdicts; returns how many groups are still held.
    pub async fn settle(&self, claims: &[pb::HeldGroup], verdicts: Vec<pb::PrimaryVerdict>) -> usize {
        for v in verdicts {
            let Some(claim) = claims.iter().find(|c| c.group_id == v.group_id) else { continue };
            let group = &v.group_id;
            match pb::PrimaryDecision::try_from(v.decision).unwrap_or(pb::PrimaryDecision::Unspecified) {
                pb::PrimaryDecision::Release => match self.driver.release_group(group).await {
                    Ok(()) => {
                        tracing::info!(%group, "the orchestrator confirmed this side as primary; writes released")
                    }
                    Err(e) => tracing::warn!(%group, error = %e, "cannot release writes; asking again"),
                },
                pb::PrimaryDecision::Demote => {
                    if let Err(e) = self.demote(claim, v.epoch).await {
                        tracing::warn!(
                            %group,
                            error = %e,
                            "cannot demote every volume of a group failed over away; the group stays held (read-only) \
                             and is asked about again at the next round"
                        );
                    } else {
                        tracing::warn!(%group, epoch = v.epoch, reason = %v.reason, "fenced on return: demoted a group failed over away while this agent was gone");
                    }
                }
                _ => tracing::info!(%group, reason = %v.reason, "writes stay held"),
            }
        }
        self.driver.held_groups().len()
    }

    async fn demote(&self, claim: &pb::HeldGroup, epoch: u64) -> Result<(), String> {
        let scope = format!("group/{}", claim.group_id);
        // A newer epoch already admitted here is as good: the fence only ever rises.
        let _ = self
            .ledger
            .admit_epoch(&scope, epoch)
            .await
            .map_err(|e| format!("cannot raise the fence of {scope}: {e}"))?;
        let op = OpInfo { op_id: format!("fenced-on-return/{}/{epoch}", claim.group_id), epoch, scope };
        // Every volume is tried: one that cannot be demoted (disabled while held, so no
        // longer replicated) must not leave the group's other primaries undemoted.
        let mut failed = Vec::new();
        for volume in &claim.volume_ids {
            if let Err(e) = in_op(op.clone(), self.driver.demote(volume)).await {
                failed.push(format!("demote {volume}: {e}"));
            }
        }
        if failed.is_empty() { Ok(()) } else { Err(failed.join("; ")) }
    }
}
