//! Fenced on return, the orchestrator's half: an agent that starts again holds writes on
//! the groups it was primary for and asks here whether it still is (see
//! `drover_agent::returning`). The answer comes from the group record alone, never from
//! the other side, so it holds while the other site is gone too.

use drover_proto::v1 as pb;
use drover_store::{Compare, Txn};

use super::sites::SiteApi;
use crate::error::ApiResult;
use crate::model::{GroupRec, keys};
use crate::repo::validate_name;

/// How many times a verdict re-reads a group after losing a race to record it.
const ATTEMPTS: usize = 5;

/// The history action recorded when a returning old primary is demoted.
pub const FENCED_ON_RETURN: &str = "fenced-on-return";

fn verdict(group: &str, decision: pb::PrimaryDecision, epoch: u64, reason: String) -> pb::PrimaryVerdict {
    pb::PrimaryVerdict { group_id: group.to_string(), decision: decision as i32, epoch, reason }
}

impl SiteApi {
    pub(super) async fn confirm_primaries(
        &self,
        r: pb::ConfirmPrimariesRequest,
    ) -> ApiResult<pb::ConfirmPrimariesResponse> {
        validate_name("backend", &r.backend)?;
        let mut verdicts = Vec::with_capacity(r.groups.len());
        for claim in &r.groups {
            verdicts.push(self.confirm_one(&r.backend, claim).await?);
        }
        Ok(pb::ConfirmPrimariesResponse { verdicts })
    }

    async fn confirm_one(&self, backend: &str, claim: &pb::HeldGroup) -> ApiResult<pb::PrimaryVerdict> {
        use pb::PrimaryDecision::{Demote, Hold, Release};
        let id = &claim.group_id;
        for _ in 0..ATTEMPTS {
            let Some(g) = self.core.repo.get::<GroupRec>(&keys::group(id)).await? else {
                return Ok(verdict(id, Release, claim.epoch, "the group no longer exists".into()));
            };
            let rec = &g.rec;
            if let Some(p) = &rec.pending
                && !(p.force && p.target != backend)
            {
                let reason = format!("a {} of the group is in flight; ask again when it ends", p.action);
                return Ok(verdict(id, Hold, rec.epoch, reason));
            }
            let forced_away = rec.pending.as_ref().is_some_and(|p| p.force && p.target != backend);
            if rec.active_backend == backend && !forced_away {
                return Ok(verdict(id, Release, rec.epoch, format!("{backend} is still the group's active side")));
            }
            let active = rec.pending.as_ref().filter(|_| forced_away).map_or(&rec.active_backend, |p| &p.target);
            let reason = format!(
                "{backend} came back still primary, but the group was failed over to {active} while it was gone; \
                 it was demoted at epoch {}. Its writes after the last point it shipped{} are divergent: fail back \
                 with `--discard-changes-on {backend}` to drop them",
                rec.epoch,
                if rec.divergence_point.is_empty() { String::new() } else { format!(" ({})", rec.divergence_point) },
            );
            // Once per epoch: the newest events tell whether this demotion is recorded.
            let (newest, _) = self.core.repo.group_history(&rec.id, "", crate::model::HISTORY_LIMIT).await?;
            let recorded =
                newest.iter().chain(&rec.history).any(|e| e.action == FENCED_ON_RETURN && e.epoch == rec.epoch);
            if recorded {
                return Ok(verdict(id, Demote, rec.epoch, reason));
            }
            let mut next = rec.clone();
            next.record(FENCED_ON_RETURN, reason.clone(), rec.epoch);
            let txn = Txn::new()
                .when(Compare::ModRevisionEquals(keys::group(id).into_bytes(), g.rev))
                .and_then_all(next.writes());
            if self.core.repo.txn(txn).await?.succeeded {
                tracing::warn!(group = %id, %backend, epoch = rec.epoch, "fenced on return: a returning old primary is demoted");
                return Ok(verdict(id, Demote, rec.epoch, reason));
            }
        }
        Ok(verdict(id, Hold, claim.epoch, "the group changed while this was decided; ask again".into()))
    }
}
