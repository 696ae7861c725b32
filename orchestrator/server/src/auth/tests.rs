use super::*;

#[test]
fn every_rpc_has_exactly_one_rule() {
    let methods = api_methods();
    assert!(methods.len() > 50, "the descriptor lists the API ({} methods)", methods.len());
    let missing: Vec<_> = methods.iter().filter(|m| rule_for(m).is_none()).collect();
    assert!(missing.is_empty(), "RPCs without an authorization rule: {missing:?}");
    for (path, _) in RULES {
        assert!(methods.contains(&path.to_string()), "rule for {path}, which the API does not have");
        assert_eq!(RULES.iter().filter(|(p, _)| p == path).count(), 1, "{path} has one rule");
    }
    assert!(rule_for("/drover.v1.GroupService/NoSuchCall").is_none());
    assert!(rule_for("/drover.agent.v1.Agent/PromoteVolume").is_none(), "agent calls are not served here");
}

#[test]
fn reads_need_no_more_than_a_reader_and_only_admins_manage_the_deployment() {
    for (path, rule) in RULES {
        let method = path.rsplit('/').next().unwrap();
        if method.starts_with("Get") || method.starts_with("List") || method.starts_with("Watch") {
            assert!(!rule.mutates, "{path} is a read");
        }
        if path.contains("TokenService") || path.contains("AuditService") || path.contains("Freeze") {
            assert_eq!(rule.need, Need::Role(Role::Admin), "{path}");
        }
    }
}

#[test]
fn scope_keeps_non_admins_in_their_project() {
    let member = Caller { token_id: "t".into(), project: "a".into(), role: Role::Member };
    assert_eq!(member.scope("").unwrap(), "a");
    assert_eq!(member.scope("a").unwrap(), "a");
    assert!(matches!(member.scope("b"), Err(ApiError::PermissionDenied(_))));
    assert!(member.sees("a") && !member.sees("b"));
    let admin = Caller { role: Role::Admin, ..member };
    assert_eq!(admin.scope("").unwrap(), "", "an admin lists every project");
    assert_eq!(admin.scope("b").unwrap(), "b");
    assert!(admin.sees("b"));
}
