//! The replication role rules, once for every driver (modelled on csi-addons
//! replication): who may be promoted, demoted or resynced, and what each changes. A
//! driver keeps the facts ([`RoleFacts`]) in its own state, asks these functions before
//! it acts, and stores what they return; it adds only rules of its own storage (such as
//! "a replica with no complete point cannot be promoted").

use crate::driver::{DriverError, Role};

/// What the rules need to know about one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoleFacts {
    /// Primary, secondary, or not replicated.
    pub role: Option<Role>,
    /// A secondary that was primary and stepped down (or was created as a replica); only
    /// a demoted volume may be resynced, i.e. have its divergent changes discarded.
    pub demoted: bool,
    /// This secondary's primary announced, with a final sync, that it demoted itself: a
    /// planned promote is safe.
    pub peer_demoted: bool,
}

/// What a rule says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The volume is already where the call would put it: succeed without acting.
    AlreadyDone,
    /// Act, then store the facts given.
    Proceed(RoleFacts),
}

fn not_replicated(volume_id: &str) -> DriverError {
    DriverError::FailedPrecondition(format!("volume {volume_id} is not replicated; enable replication first"))
}

/// The role of a volume replication is enabled on.
pub fn on_enable(role: Role) -> RoleFacts {
    RoleFacts { role: Some(role), demoted: role == Role::Secondary, peer_demoted: false }
}

/// Promote: a primary is already promoted; a secondary needs its primary demoted (a
/// planned move) or `force` (a disaster).
pub fn promote(volume_id: &str, facts: RoleFacts, force: bool) -> Result<Verdict, DriverError> {
    match facts.role {
        None => Err(not_replicated(volume_id)),
        Some(Role::Primary) => Ok(Verdict::AlreadyDone),
        Some(Role::Secondary) if !force && !facts.peer_demoted => Err(DriverError::FailedPrecondition(format!(
            "volume {volume_id} is a secondary whose primary was not demoted; fail over as planned (final sync) or \
             promote with force"
        ))),
        Some(Role::Secondary) => {
            Ok(Verdict::Proceed(RoleFacts { role: Some(Role::Primary), demoted: false, peer_demoted: false }))
        }
    }
}

/// Demote: a secondary is already demoted; a primary steps down.
pub fn demote(volume_id: &str, facts: RoleFacts) -> Result<Verdict, DriverError> {
    match facts.role {
        None => Err(not_replicated(volume_id)),
        Some(Role::Secondary) => Ok(Verdict::AlreadyDone),
        Some(Role::Primary) => {
            Ok(Verdict::Proceed(RoleFacts { role: Some(Role::Secondary), demoted: true, peer_demoted: false }))
        }
    }
}

/// Resync (allow the next point from the peer to discard local changes): only a demoted
/// secondary.
pub fn resync(volume_id: &str, facts: RoleFacts) -> Result<Verdict, DriverError> {
    match facts.role {
        None => Err(not_replicated(volume_id)),
        Some(Role::Secondary) if facts.demoted => Ok(Verdict::Proceed(facts)),
        Some(_) => Err(DriverError::FailedPrecondition(format!(
            "volume {volume_id} is not demoted; demote it before a resync"
        ))),
    }
}

/// A primary whose final sync the peer acknowledged: it demoted itself.
pub fn after_final_sync() -> RoleFacts {
    RoleFacts { role: Some(Role::Secondary), demoted: true, peer_demoted: false }
}

/// A secondary that applied a point: a final point means its primary demoted itself.
pub fn after_applied(facts: RoleFacts, final_sync: bool) -> RoleFacts {
    RoleFacts { peer_demoted: final_sync, ..facts }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: RoleFacts = RoleFacts { role: Some(Role::Primary), demoted: false, peer_demoted: false };
    const SECONDARY: RoleFacts = RoleFacts { role: Some(Role::Secondary), demoted: true, peer_demoted: false };

    #[test]
    fn a_planned_promote_needs_the_primary_demoted_and_a_forced_one_does_not() {
        assert!(promote("v", SECONDARY, false).is_err());
        let after_final = after_applied(SECONDARY, true);
        assert_eq!(promote("v", after_final, false).unwrap(), Verdict::Proceed(PRIMARY));
        assert_eq!(promote("v", SECONDARY, true).unwrap(), Verdict::Proceed(PRIMARY));
        assert_eq!(promote("v", PRIMARY, false).unwrap(), Verdict::AlreadyDone);
        assert!(promote("v", RoleFacts::default(), true).is_err());
    }

    #[test]
    fn demote_and_resync() {
        assert_eq!(demote("v", PRIMARY).unwrap(), Verdict::Proceed(SECONDARY));
        assert_eq!(demote("v", SECONDARY).unwrap(), Verdict::AlreadyDone);
        assert!(resync("v", PRIMARY).is_err());
        assert!(resync("v", RoleFacts { demoted: false, ..SECONDARY }).is_err());
        assert_eq!(resync("v", SECONDARY).unwrap(), Verdict::Proceed(SECONDARY));
        assert_eq!(after_final_sync(), SECONDARY);
        assert_eq!(on_enable(Role::Secondary), SECONDARY);
    }
}
