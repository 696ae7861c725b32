use std::collections::BTreeMap;

use super::*;

const GOOD: &str = r#"name: planned
description: a planned move of a site
params:
  site:
    type: string
    description: the site to leave
  max_parallel:
    type: integer
    default: 4
steps:
  - freeze:
      name: freeze
      backends: { site: "{{ site }}" }
  - failover:
      name: move
      groups: { site: "{{ site }}", tiers: [1, 2] }
      max_parallel: {{ max_parallel }}
  - verify:
      name: ok
      groups: { site: "{{ site }}" }
      status: failed-over
      max_rpo: 5m
"#;

fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The error for `text`, as `line:col: message`.
fn refused(text: &str, given: &[(&str, &str)]) -> RunbookError {
    load("rb.yaml", text, &params(given), true).expect_err("the runbook is refused")
}

#[test]
fn a_good_runbook_loads_with_its_parameters() {
    let l = load("rb.yaml", GOOD, &params(&[("site", "site-a")]), true).unwrap();
    assert_eq!(l.params["max_parallel"], "4");
    assert_eq!(l.runbook.steps.len(), 3);
    match &l.runbook.steps[1] {
        Step::Failover(f) => {
            assert_eq!(f.groups.site.as_deref(), Some("site-a"));
            assert_eq!(f.groups.tiers, [Tier(1), Tier(2)]);
            assert_eq!(f.max_parallel.get(), 4);
            assert!(!f.force);
        }
        other => panic!("{other:?}"),
    }
    // Validation without parameters puts placeholders in.
    let v = load("rb.yaml", GOOD, &BTreeMap::new(), false).unwrap();
    assert_eq!(v.params["site"], "<site>");
}

/// A mistake: what it is, the file, the parameters given, where and what the error says.
type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)], (usize, usize), &'a str);

/// Each mistake gives one error at the right line and column, saying what was expected.
#[test]
fn every_mistake_names_file_line_and_column() {
    let cases: Vec<Case> = vec![
        (
            "unknown key",
            GOOD.replace("      status: failed-over\n", "      status: failed-over\n      colour: red\n"),
            &[("site", "a")],
            (22, 7),
            "unknown field `colour`",
        ),
        ("wrong type", GOOD.replace("max_rpo: 5m", "max_rpo: [5]"), &[("site", "a")], (22, 16), "expected a string"),
        (
            "unknown step kind",
            GOOD.replace("- freeze:", "- defrost:"),
            &[("site", "a")],
            (11, 5),
            "unknown variant `defrost`",
        ),
        (
            "unknown parameter in the file",
            GOOD.replace("backends: { site: \"{{ site }}\" }", "backends: { site: \"{{ place }}\" }"),
            &[("site", "a")],
            (13, 26),
            "unknown parameter `place`",
        ),
        (
            "unknown parameter given",
            GOOD.to_string(),
            &[("site", "a"), ("colour", "red")],
            (3, 1),
            "unknown parameter `colour` given",
        ),
        ("missing required parameter", GOOD.to_string(), &[], (4, 3), "parameter `site` (string) is required"),
        (
            "parameter of the wrong type",
            GOOD.to_string(),
            &[("site", "a"), ("max_parallel", "lots")],
            (7, 3),
            "expected an integer",
        ),
        (
            "tier out of range",
            GOOD.replace("tiers: [1, 2]", "tiers: [1, 12]"),
            &[("site", "a")],
            (16, 35),
            "tier 12 is out of range",
        ),
        ("max_parallel 0", GOOD.to_string(), &[("site", "a"), ("max_parallel", "0")], (17, 21), "expected a nonzero"),
        (
            "bad duration",
            GOOD.replace("max_rpo: 5m", "max_rpo: five minutes"),
            &[("site", "a")],
            (22, 16),
            "is not a duration",
        ),
        (
            "duplicate step names",
            GOOD.replace("name: ok", "name: move"),
            &[("site", "a")],
            (19, 7),
            "duplicate step name `move`",
        ),
        (
            "YAML syntax error",
            GOOD.replace("groups: { site: \"{{ site }}\" }\n", "groups: { site: \n"),
            &[("site", "a")],
            (21, 13),
            "did not find expected",
        ),
        (
            "prompt without a message",
            GOOD.replace(
                "- freeze:\n      name: freeze\n      backends: { site: \"{{ site }}\" }",
                "- prompt:\n      name: ask",
            ),
            &[("site", "a")],
            (12, 7),
            "missing field `message`",
        ),
        (
            "wait without what to wait for",
            GOOD.replace(
                "- freeze:\n      name: freeze\n      backends: { site: \"{{ site }}\" }",
                "- wait:\n      name: pause",
            ),
            &[("site", "a")],
            (12, 7),
            "needs either `duration` or `until`",
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, given, (line, column), says) in &cases {
        let e = refused(text, given);
        let ok = e.file == "rb.yaml" && (e.line, e.column) == (*line, *column) && e.message.contains(says);
        if !ok {
            failures.push(format!("{what}: got {e}; wanted {line}:{column} saying {says:?}"));
        }
        assert!(!e.message.contains(" at line "), "{what}: the position is said once: {e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_shipped_runbook_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runbooks");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            load(&path.display().to_string(), &text, &BTreeMap::new(), false).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 4, "the shipped runbooks are there ({n})");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any text, and any mangling of a good runbook (a byte range cut out, a parameter of
    /// any value): the loader answers without panicking, and every refusal names the file.
    #[test]
    fn any_text_loads_or_is_refused_without_panic(
        text in "(?s).{0,400}",
        cut in 0usize..GOOD.len(),
        len in 0usize..40,
        value in ".{0,30}",
    ) {
        for t in [text.clone(), {
            let mut g = GOOD.to_string();
            let end = (cut + len).min(g.len());
            if g.is_char_boundary(cut) && g.is_char_boundary(end) {
                g.replace_range(cut..end, "");
            }
            g
        }] {
            if let Err(e) = load("rb.yaml", &t, &params(&[("site", &value)]), true) {
                proptest::prop_assert!(e.to_string().contains("rb.yaml"), "{e}");
            }
        }
    }
}
