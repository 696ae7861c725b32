//! The state machine of group replication, in one table.
//!
//! Every group request is checked here ([`check`]) before anything is written, and every
//! transition's final write is checked here too ([`verify_end`]): a status the table does
//! not allow is never written. The transient status a request goes through and the ones
//! it may end in come from its [`Rule`], not from the code that drives it.

use crate::error::{ApiError, ApiResult};

/// A group's (and its volumes') replication status, in Cinder's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReplicationStatus {
    Disabled,
    Enabling,
    Enabled,
    FailingOver,
    FailedOver,
    FailingBack,
    Disabling,
    Error,
    NotCapable,
}

use ReplicationStatus as S;

impl ReplicationStatus {
    /// Every status.
    pub const ALL: [ReplicationStatus; 9] = [
        S::Disabled,
        S::Enabling,
        S::Enabled,
        S::FailingOver,
        S::FailedOver,
        S::FailingBack,
        S::Disabling,
        S::Error,
        S::NotCapable,
    ];

    /// The name stored in records and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            S::Disabled => "disabled",
            S::Enabling => "enabling",
            S::Enabled => "enabled",
            S::FailingOver => "failing-over",
            S::FailedOver => "failed-over",
            S::FailingBack => "failing-back",
            S::Disabling => "disabling",
            S::Error => "error",
            S::NotCapable => "not-capable",
        }
    }

    /// The status a stored name stands for.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether an operation is in the middle of it; none may be left behind.
    pub fn is_transient(self) -> bool {
        matches!(self, S::Enabling | S::FailingOver | S::FailingBack | S::Disabling)
    }
}

/// What a request asks of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupAction {
    Enable,
    Disable,
    Failover,
    Failback,
    Sync,
}

impl GroupAction {
    /// The name used in pending ops and history.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupAction::Enable => "enable",
            GroupAction::Disable => "disable",
            GroupAction::Failover => "failover",
            GroupAction::Failback => "failback",
            GroupAction::Sync => "sync",
        }
    }

    /// The action a pending op's name stands for.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Enable, Self::Disable, Self::Failover, Self::Failback, Self::Sync].into_iter().find(|a| a.as_str() == s)
    }
}

/// Where a group is, besides its status: the conditions some rules depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Active on its primary backend.
    pub at_home: bool,
    /// Has a replication target.
    pub has_target: bool,
}

/// A condition on a group's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Active on its primary backend.
    AtHome,
    /// Active on its primary, with a replication target.
    AtHomeWithTarget,
    /// Active on its replication target (failed over).
    Away,
}

impl When {
    fn holds(self, p: Position) -> bool {
        match self {
            When::Always => true,
            When::AtHome => p.at_home,
            When::AtHomeWithTarget => p.at_home && p.has_target,
            When::Away => !p.at_home,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            When::Always => "",
            When::AtHome => " while active on its primary backend",
            When::AtHomeWithTarget => " while active on its primary backend with a replication target",
            When::Away => " while failed over",
        }
    }
}

/// One allowed transition: `action` from `from` (when `when` holds) goes through `via`
/// and ends in `success` or, when it fails, `failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub action: GroupAction,
    pub from: ReplicationStatus,
    pub when: When,
    /// The transient status while it runs; `None` for actions that do not change it.
    pub via: Option<ReplicationStatus>,
    pub success: ReplicationStatus,
    pub failure: ReplicationStatus,
}

const fn rule(
    action: GroupAction,
    from: ReplicationStatus,
    when: When,
    via: Option<ReplicationStatus>,
    success: ReplicationStatus,
    failure: ReplicationStatus,
) -> Rule {
    Rule { action, from, when, via, success, failure }
}

use GroupAction as A;

/// The table: every transition a group may make. Nothing else is ever written.
pub const TABLE: &[Rule] = &[
    rule(A::Enable, S::Disabled, When::AtHome, Some(S::Enabling), S::Enabled, S::Error),
    // A failed enable (or a failed disable) at home is retried from error.
    rule(A::Enable, S::Error, When::AtHome, Some(S::Enabling), S::Enabled, S::Error),
    rule(A::Disable, S::Enabled, When::AtHome, Some(S::Disabling), S::Disabled, S::Error),
    rule(A::Disable, S::Error, When::AtHome, Some(S::Disabling), S::Disabled, S::Error),
    rule(A::Failover, S::Enabled, When::AtHomeWithTarget, Some(S::FailingOver), S::FailedOver, S::Error),
    rule(A::Failover, S::Error, When::AtHomeWithTarget, Some(S::FailingOver), S::FailedOver, S::Error),
    rule(A::Failback, S::FailedOver, When::Away, Some(S::FailingBack), S::Enabled, S::Error),
    rule(A::Failback, S::Error, When::Away, Some(S::FailingBack), S::Enabled, S::Error),
    rule(A::Sync, S::Enabled, When::Always, None, S::Enabled, S::Enabled),
    rule(A::Sync, S::FailedOver, When::Always, None, S::FailedOver, S::FailedOver),
];

/// The rule that lets `action` run on a group in `status` at `position`, or the error
/// (FailedPrecondition, naming the current status and what would be needed).
pub fn check(action: GroupAction, status: &str, position: Position, group: &str) -> ApiResult<Rule> {
    let current = ReplicationStatus::parse(status).ok_or_else(|| {
        ApiError::Internal(format!("group {group} has an unknown replication status {status:?}; repair its record"))
    })?;
    if let Some(r) = TABLE.iter().find(|r| r.action == action && r.from == current && r.when.holds(position)) {
        return Ok(*r);
    }
    let needs: Vec<String> = TABLE
        .iter()
        .filter(|r| r.action == action)
        .map(|r| format!("{}{}", r.from.as_str(), r.when.describe()))
        .collect();
    let hint = if current.is_transient() {
        "; an operation is running on it: follow it with `drover execution list --status running`"
    } else {
        ""
    };
    Err(ApiError::FailedPrecondition(format!(
        "group {group} has replication status {status}{}; {} needs {}{hint}",
        if position.at_home { "" } else { " and is failed over" },
        action.as_str(),
        needs.join(", or ")
    )))
}

/// Where a group is, from its record.
pub fn position(group: &crate::model::GroupRec) -> Position {
    Position {
        at_home: group.active_backend == group.primary_backend,
        has_target: !group.replication_target.is_empty(),
    }
}

/// The transient status `action` goes through (the same in every rule of an action).
pub fn via(action: GroupAction) -> Option<ReplicationStatus> {
    TABLE.iter().find(|r| r.action == action).and_then(|r| r.via)
}

/// Checks the final write of a transition: from the rule of `action` that put the group
/// into `via`, may it end in `to`?
pub fn verify_end(action: GroupAction, via: &str, to: &str) -> ApiResult<()> {
    let (via_s, to_s) = (ReplicationStatus::parse(via), ReplicationStatus::parse(to));
    let ok = TABLE.iter().any(|r| {
        r.action == action
            && r.via.map(|v| Some(v) == via_s).unwrap_or(false)
            && (Some(r.success) == to_s || Some(r.failure) == to_s)
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::Internal(format!(
            "refusing to write replication status {to} after {} from {via}: the transition table does not allow it",
            action.as_str()
        )))
    }
}

/// A volume's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeStatus {
    Creating,
    Available,
    Extending,
    Deleting,
    Error,
}

impl VolumeStatus {
    /// Every status.
    pub const ALL: [VolumeStatus; 5] = [
        VolumeStatus::Creating,
        VolumeStatus::Available,
        VolumeStatus::Extending,
        VolumeStatus::Deleting,
        VolumeStatus::Error,
    ];

    /// The name stored in records and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeStatus::Creating => "creating",
            VolumeStatus::Available => "available",
            VolumeStatus::Extending => "extending",
            VolumeStatus::Deleting => "deleting",
            VolumeStatus::Error => "error",
        }
    }

    /// The status a stored name stands for.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What a request asks of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeAction {
    Create,
    Manage,
    Delete,
    Extend,
    Unmanage,
}

impl VolumeAction {
    /// The name used in pending ops.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeAction::Create => "create",
            VolumeAction::Manage => "manage",
            VolumeAction::Delete => "delete",
            VolumeAction::Extend => "extend",
            VolumeAction::Unmanage => "unmanage",
        }
    }
}

/// One allowed volume transition. `None` stands for "no record": before a create, after
/// a delete (or a create the backend refused, which leaves nothing behind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeRule {
    pub action: VolumeAction,
    pub from: Option<VolumeStatus>,
    pub via: VolumeStatus,
    pub ends: &'static [Option<VolumeStatus>],
}

use VolumeStatus as V;

/// The table of volume transitions. Nothing else is ever written.
pub const VOLUME_TABLE: &[VolumeRule] = &[
    VolumeRule {
        action: VolumeAction::Create,
        from: None,
        via: V::Creating,
        ends: &[Some(V::Available), Some(V::Error), None],
    },
    VolumeRule {
        action: VolumeAction::Manage,
        from: None,
        via: V::Creating,
        ends: &[Some(V::Available), Some(V::Error), None],
    },
    VolumeRule {
        action: VolumeAction::Delete,
        from: Some(V::Available),
        via: V::Deleting,
        ends: &[None, Some(V::Error)],
    },
    VolumeRule { action: VolumeAction::Delete, from: Some(V::Error), via: V::Deleting, ends: &[None, Some(V::Error)] },
    VolumeRule {
        action: VolumeAction::Extend,
        from: Some(V::Available),
        via: V::Extending,
        ends: &[Some(V::Available), Some(V::Error)],
    },
    // A failed extend leaves the size unknown and asks for the extend again; one the
    // backend refuses leaves the volume as it was (in error, when it was).
    VolumeRule {
        action: VolumeAction::Extend,
        from: Some(V::Error),
        via: V::Extending,
        ends: &[Some(V::Available), Some(V::Error)],
    },
    // An unmanage the backend refused (its precondition not met, nothing done) puts the
    // volume back as it was; one that failed otherwise leaves it in error, from which it
    // may be tried again.
    VolumeRule {
        action: VolumeAction::Unmanage,
        from: Some(V::Available),
        via: V::Deleting,
        ends: &[None, Some(V::Error), Some(V::Available)],
    },
    VolumeRule {
        action: VolumeAction::Unmanage,
        from: Some(V::Error),
        via: V::Deleting,
        ends: &[None, Some(V::Error)],
    },
];

/// The rule that lets `action` run on a volume in `status`, or FailedPrecondition naming
/// the current status and what would be needed.
pub fn check_volume(action: VolumeAction, status: &str, volume: &str) -> ApiResult<VolumeRule> {
    let current = VolumeStatus::parse(status).ok_or_else(|| {
        ApiError::Internal(format!("volume {volume} has an unknown status {status:?}; repair its record"))
    })?;
    if let Some(r) = VOLUME_TABLE.iter().find(|r| r.action == action && r.from == Some(current)) {
        return Ok(*r);
    }
    let needs: Vec<&str> =
        VOLUME_TABLE.iter().filter(|r| r.action == action).filter_map(|r| r.from.map(|f| f.as_str())).collect();
    Err(ApiError::FailedPrecondition(format!(
        "volume {volume} is {status}; {} needs it {}",
        action.as_str(),
        needs.join(" or ")
    )))
}

/// Checks the final write of a volume transition: may `action` end in `to` (`None`: the
/// record is removed)?
pub fn verify_volume_end(action: VolumeAction, to: Option<&str>) -> ApiResult<()> {
    let end = match to {
        None => None,
        Some(t) => {
            Some(VolumeStatus::parse(t).ok_or_else(|| ApiError::Internal(format!("unknown volume status {t:?}")))?)
        }
    };
    if VOLUME_TABLE.iter().any(|r| r.action == action && r.ends.contains(&end)) {
        Ok(())
    } else {
        Err(ApiError::Internal(format!(
            "refusing to leave a volume {} after {}: the transition table does not allow it",
            to.unwrap_or("removed"),
            action.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A model group driven only through the table, as the services drive real ones.
    #[derive(Debug, Clone)]
    struct Model {
        status: ReplicationStatus,
        position: Position,
    }

    fn action() -> impl Strategy<Value = GroupAction> {
        prop_oneof![
            Just(GroupAction::Enable),
            Just(GroupAction::Disable),
            Just(GroupAction::Failover),
            Just(GroupAction::Failback),
            Just(GroupAction::Sync),
        ]
    }

    /// Applies a request with an outcome: `Some(true)` succeeds, `Some(false)` fails,
    /// `None` is cut off mid-way (the owner died) and then resumed to `resume_ok`.
    fn apply(
        m: &mut Model,
        a: GroupAction,
        outcome: Option<bool>,
        resume_ok: bool,
        written: &mut Vec<(String, String)>,
    ) {
        let Ok(r) = check(a, m.status.as_str(), m.position, "g") else { return };
        let from = m.status;
        if let Some(v) = r.via {
            written.push((from.as_str().into(), v.as_str().into()));
            m.status = v;
        }
        let ok = outcome.unwrap_or(resume_ok);
        let end = if ok { r.success } else { r.failure };
        if let Some(v) = r.via {
            verify_end(a, v.as_str(), end.as_str()).expect("the rule's own ends are allowed");
        }
        written.push((m.status.as_str().into(), end.as_str().into()));
        m.status = end;
        if ok {
            match a {
                GroupAction::Failover => m.position.at_home = false,
                GroupAction::Failback => m.position.at_home = true,
                GroupAction::Enable => m.position.has_target = true,
                GroupAction::Disable => m.position.has_target = false,
                GroupAction::Sync => {}
            }
        }
    }

    fn allowed_edges() -> Vec<(String, String)> {
        let mut edges = Vec::new();
        for r in TABLE {
            match r.via {
                Some(v) => {
                    edges.push((r.from.as_str().to_string(), v.as_str().to_string()));
                    edges.push((v.as_str().to_string(), r.success.as_str().to_string()));
                    edges.push((v.as_str().to_string(), r.failure.as_str().to_string()));
                }
                None => edges.push((r.from.as_str().to_string(), r.success.as_str().to_string())),
            }
        }
        edges
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// No request sequence writes a status the table does not allow, none leaves a
        /// transient status behind, and a group can always get back to a stable state.
        #[test]
        fn request_sequences_stay_inside_the_table(
            steps in proptest::collection::vec((action(), proptest::option::of(any::<bool>()), any::<bool>()), 1..60)
        ) {
            let mut m = Model { status: S::Disabled, position: Position { at_home: true, has_target: false } };
            let mut written = Vec::new();
            for (a, outcome, resume_ok) in steps {
                apply(&mut m, a, outcome, resume_ok, &mut written);
                prop_assert!(!m.status.is_transient(), "left in {:?}", m.status);
                // From wherever the group is, some request is allowed (no dead end).
                let exits = [GroupAction::Enable, GroupAction::Disable, GroupAction::Failover, GroupAction::Failback]
                    .into_iter()
                    .filter(|a| check(*a, m.status.as_str(), m.position, "g").is_ok())
                    .count();
                prop_assert!(exits > 0, "no way out of {:?} at {:?}", m.status, m.position);
            }
            let edges = allowed_edges();
            for w in &written {
                prop_assert!(edges.contains(w), "wrote {w:?}, which the table does not allow");
            }
        }

        /// `verify_end` refuses every end the table does not list.
        #[test]
        fn final_writes_outside_the_table_are_refused(
            a in action(),
            via in proptest::sample::select(ReplicationStatus::ALL.to_vec()),
            to in proptest::sample::select(ReplicationStatus::ALL.to_vec()),
        ) {
            let listed = TABLE.iter().any(|r| r.action == a && r.via == Some(via) && (r.success == to || r.failure == to));
            prop_assert_eq!(verify_end(a, via.as_str(), to.as_str()).is_ok(), listed);
        }
    }

    #[test]
    fn volume_transitions_follow_their_table() {
        assert!(
            check_volume(VolumeAction::Extend, "creating", "v")
                .unwrap_err()
                .to_string()
                .contains("needs it available or error")
        );
        // A failed extend says to retry it: the retry must be allowed.
        assert_eq!(check_volume(VolumeAction::Extend, "error", "v").unwrap().via, VolumeStatus::Extending);
        assert_eq!(check_volume(VolumeAction::Delete, "error", "v").unwrap().via, VolumeStatus::Deleting);
        assert!(check_volume(VolumeAction::Delete, "creating", "v").is_err());
        // A failed unmanage says "retry the unmanage": the retry must be allowed.
        assert_eq!(check_volume(VolumeAction::Unmanage, "error", "v").unwrap().via, VolumeStatus::Deleting);
        assert!(verify_volume_end(VolumeAction::Delete, None).is_ok());
        assert!(verify_volume_end(VolumeAction::Extend, None).is_err(), "an extend never removes the record");
        assert!(verify_volume_end(VolumeAction::Extend, Some("available")).is_ok());
        assert!(verify_volume_end(VolumeAction::Create, Some("deleting")).is_err());
        for rule in VOLUME_TABLE {
            for end in rule.ends {
                assert!(verify_volume_end(rule.action, end.map(|e| e.as_str())).is_ok(), "{rule:?} {end:?}");
            }
        }
    }

    #[test]
    fn refusals_name_the_current_status_and_what_is_needed() {
        let home = Position { at_home: true, has_target: true };
        let err = check(GroupAction::Failback, "enabled", home, "g1").unwrap_err().to_string();
        assert!(err.contains("has replication status enabled") && err.contains("failback needs failed-over"), "{err}");
        let err = check(GroupAction::Enable, "failing-over", home, "g1").unwrap_err().to_string();
        assert!(err.contains("operation is running"), "{err}");
        assert!(check(GroupAction::Enable, "bogus", home, "g1").unwrap_err().to_string().contains("unknown"));
    }
}
