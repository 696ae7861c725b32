//! The runbook file: its types, its parameters, and loading it with errors that name the
//! file, line and column (runbooks/README.md documents the format).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::kinds::{self, StepKind};

/// A runbook as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Declared parameters, by name.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// Each step is a one-key map: its kind, holding its fields (`- failover: {…}`).
    #[serde(with = "serde_norway::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
}

/// A parameter's declaration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub kind: ParamType,
    #[serde(default)]
    pub description: String,
    /// The value when none is given; without it the parameter is required.
    #[serde(default)]
    pub default: Option<serde_norway::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Boolean,
    Duration,
}

/// One step, written as its kind holding its fields (`- failover: {name: …, …}`); every
/// step has a unique `name`. Each kind is a type in [`super::kinds`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Freeze(kinds::Freeze),
    Thaw(kinds::Thaw),
    Sync(kinds::SyncNow),
    Failover(kinds::Failover),
    Failback(kinds::Failback),
    Verify(kinds::Verify),
    Prompt(kinds::Prompt),
    Wait(kinds::Wait),
    TestClone(kinds::TestClone),
    TestCleanup(kinds::TestCleanup),
    Exec(kinds::Exec),
    AdoptPlan(kinds::AdoptPlan),
    AdoptApply(kinds::AdoptApply),
    Notify(kinds::Notify),
    #[serde(rename = "compute.stop")]
    ComputeStop(kinds::ComputeStop),
    #[serde(rename = "compute.quiesce")]
    ComputeQuiesce(kinds::ComputeQuiesce),
    #[serde(rename = "compute.unquiesce")]
    ComputeUnquiesce(kinds::ComputeUnquiesce),
    #[serde(rename = "compute.refresh")]
    ComputeRefresh(kinds::ComputeRefresh),
    #[serde(rename = "compute.start")]
    ComputeStart(kinds::ComputeStart),
}

/// Which groups a step acts on; every given field must match.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Groups whose primary backend is at this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Groups whose primary backend is this one.
    #[serde(default)]
    pub backend: Option<String>,
    /// Groups that replicate to this backend.
    #[serde(default)]
    pub target: Option<String>,
    /// Groups by name.
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub project: Option<String>,
    /// Groups carrying every one of these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Only groups in these tiers (1 to 9).
    #[serde(default)]
    pub tiers: Vec<Tier>,
}

/// Which backends a freeze or thaw acts on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSelector {
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub names: Vec<String>,
}

/// A group tier, 1 (first) to 9 (last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Tier(pub u32);

impl<'de> Deserialize<'de> for Tier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if !crate::model::TIERS.contains(&n) {
            return Err(serde::de::Error::custom(format!("tier {n} is out of range: tiers are 1 (first) to 9 (last)")));
        }
        Ok(Tier(n))
    }
}

/// A duration written like `30s`, `5m` or `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration ({e}); write it like 30s, 5m or 1h30m"))
        })
    }
}

impl Step {
    /// The kind's behaviour.
    pub fn as_kind(&self) -> &dyn StepKind {
        match self {
            Step::Freeze(s) => s,
            Step::Thaw(s) => s,
            Step::Sync(s) => s,
            Step::Failover(s) => s,
            Step::Failback(s) => s,
            Step::Verify(s) => s,
            Step::Prompt(s) => s,
            Step::Wait(s) => s,
            Step::TestClone(s) => s,
            Step::TestCleanup(s) => s,
            Step::Exec(s) => s,
            Step::AdoptPlan(s) => s,
            Step::AdoptApply(s) => s,
            Step::Notify(s) => s,
            Step::ComputeStop(s) => s,
            Step::ComputeQuiesce(s) => s,
            Step::ComputeUnquiesce(s) => s,
            Step::ComputeRefresh(s) => s,
            Step::ComputeStart(s) => s,
        }
    }

    pub fn name(&self) -> &str {
        self.as_kind().name()
    }

    /// The kind as written in the file.
    pub fn kind(&self) -> &'static str {
        self.as_kind().kind()
    }

    /// The group selector of a step that acts on groups.
    pub fn groups(&self) -> Option<&Selector> {
        self.as_kind().groups()
    }
}

/// Why a runbook was refused: where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunbookError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RunbookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.message)
    }
}

impl std::error::Error for RunbookError {}

/// The 1-based line and column of byte `index` of `text`.
pub(crate) fn position(text: &str, index: usize) -> (usize, usize) {
    let before = &text[..index.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |n| before.len() - n - 1) + 1;
    (line, column)
}

/// A loaded runbook: the file as written, its parameters' values, and the runbook with
/// them filled in.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub file: String,
    pub runbook: Runbook,
    /// Every declared parameter's value (given, or its default), as text.
    pub params: BTreeMap<String, String>,
}

struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, index: usize, message: String) -> RunbookError {
        let (line, column) = position(self.text, index);
        RunbookError { file: self.file.to_string(), line, column, message }
    }

    fn at_line_col(&self, line: usize, column: usize, message: String) -> RunbookError {
        RunbookError { file: self.file.to_string(), line, column, message }
    }

    /// The position of the `nth` (0-based) occurrence of `needle` at or after `from`.
    fn find(&self, needle: &str, from: usize, nth: usize) -> Option<usize> {
        let mut at = from;
        for _ in 0..=nth {
            let i = self.text.get(at..)?.find(needle)? + at;
            if nth == 0 {
                return Some(i);
            }
            at = i + needle.len();
        }
        Some(at - needle.len())
    }

    /// Byte index of the start of 1-based `line`.
    fn line_start(&self, line: usize) -> usize {
        self.text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum()
    }
}

/// One `{{ name }}` reference in the text.
struct Reference {
    start: usize,
    end: usize,
    name: String,
}

fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("{{") {
        let start = at + i;
        let Some(j) = text[start..].find("}}") else { break };
        let end = start + j + 2;
        out.push(Reference { start, end, name: text[start + 2..end - 2].trim().to_string() });
        at = end;
    }
    out
}

/// Checks a parameter value against its type; returns the text to put in its place.
fn typed(kind: ParamType, value: &str) -> Result<String, String> {
    match kind {
        ParamType::String => {
            if value.contains(['\n', '"', '\\']) {
                Err("a string parameter cannot hold a newline, a quote or a backslash".into())
            } else {
                Ok(value.to_string())
            }
        }
        ParamType::Integer => value.parse::<i64>().map(|n| n.to_string()).map_err(|_| "expected an integer".into()),
        ParamType::Boolean => match value {
            "true" | "false" => Ok(value.to_string()),
            _ => Err("expected true or false".into()),
        },
        ParamType::Duration => humantime::parse_duration(value)
            .map(|_| value.to_string())
            .map_err(|e| format!("expected a duration like 30s or 5m ({e})")),
    }
}

/// A stand-in for a required parameter nobody gave, so the rest of the file can be
/// checked (`drover runbook validate` without `--param`).
fn placeholder(kind: ParamType, name: &str) -> String {
    match kind {
        ParamType::String => format!("<{name}>"),
        ParamType::Integer => "1".into(),
        ParamType::Boolean => "false".into(),
        ParamType::Duration => "1s".into(),
    }
}

/// The declarations alone, read before anything is substituted.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    params: BTreeMap<String, ParamSpec>,
}

fn yaml_error(src: &Source, e: serde_norway::Error) -> RunbookError {
    let message = e.to_string();
    // serde_norway appends " at line L column C"; the position goes in front instead.
    let message = message.split(" at line ").next().unwrap_or(&message).to_string();
    let Some(loc) = e.location() else {
        return src.at_line_col(1, 1, message);
    };
    // An unknown field is reported at its mapping's start: point at the field itself.
    if let Some(field) = message.split("unknown field `").nth(1).and_then(|r| r.split('`').next()) {
        let from = src.line_start(loc.line());
        if let Some(i) = src.find(&format!("{field}:"), from, 0) {
            return src.at(i, message);
        }
    }
    // A value the message quotes (a duration that does not parse) is found from there.
    let from = src.line_start(loc.line());
    let quoted = message.split('"').nth(1).filter(|q| !q.is_empty() && message.matches('"').count() >= 2);
    if let Some(i) = quoted.and_then(|q| src.find(q, from, 0)) {
        return src.at(i, message);
    }
    src.at_line_col(loc.line(), loc.column(), message)
}

/// Loads a runbook from `text` (named `file` in errors) with the parameter values
/// `given`. With `require_all` false, required parameters nobody gave get placeholders
/// (for validation); with it true, they are an error.
pub fn load(
    file: &str,
    text: &str,
    given: &BTreeMap<String, String>,
    require_all: bool,
) -> Result<Loaded, RunbookError> {
    let src = Source { file, text };
    // The parameter declarations first (a reference inside them is not substituted).
    let head: Head = serde_norway::from_str(text).map_err(|e| yaml_error(&src, e))?;
    let params_at = src.find("params:", 0, 0).unwrap_or(0);
    for name in given.keys() {
        if !head.params.contains_key(name) {
            let declared: Vec<&str> = head.params.keys().map(String::as_str).collect();
            return Err(src.at(
                params_at,
                format!(
                    "unknown parameter `{name}` given; this runbook declares: {}",
                    if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
                ),
            ));
        }
    }
    let mut values = BTreeMap::new();
    for (name, spec) in &head.params {
        let decl = src.find(&format!("{name}:"), params_at, 0).unwrap_or(params_at);
        let raw = match (given.get(name), &spec.default) {
            (Some(v), _) => v.clone(),
            (None, Some(d)) => match d {
                serde_norway::Value::String(s) => s.clone(),
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::Bool(b) => b.to_string(),
                _ => return Err(src.at(decl, format!("parameter `{name}`: a default is a string, number or boolean"))),
            },
            (None, None) if require_all => {
                return Err(src.at(
                    decl,
                    format!(
                        "parameter `{name}` ({}) is required: give it with --param {name}=VALUE",
                        format!("{:?}", spec.kind).to_lowercase()
                    ),
                ));
            }
            (None, None) => placeholder(spec.kind, name),
        };
        let value = typed(spec.kind, &raw).map_err(|e| src.at(decl, format!("parameter `{name}` = {raw:?}: {e}")))?;
        values.insert(name.clone(), value);
    }
    // Substitute every reference outside the declarations, keeping lines where they are.
    let steps_at = src.find("\nsteps:", 0, 0).unwrap_or(0);
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for r in references(text) {
        if r.start < steps_at && r.start > params_at {
            continue;
        }
        let Some(v) = values.get(&r.name) else {
            return Err(src.at(
                r.start,
                format!(
                    "unknown parameter `{}`; declare it under `params:` (declared: {})",
                    r.name,
                    values.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        out.push_str(&text[last..r.start]);
        out.push_str(v);
        last = r.end;
    }
    out.push_str(&text[last..]);
    let filled = Source { file, text: &out };
    let runbook: Runbook = serde_norway::from_str(&out).map_err(|e| yaml_error(&filled, e))?;
    check(&src, &runbook)?;
    Ok(Loaded { file: file.to_string(), runbook, params: values })
}

/// What serde cannot say: names, and kinds' own rules.
fn check(src: &Source, rb: &Runbook) -> Result<(), RunbookError> {
    if rb.steps.is_empty() {
        return Err(src.at(src.find("steps:", 0, 0).unwrap_or(0), "a runbook needs at least one step".into()));
    }
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for step in &rb.steps {
        let name = step.name();
        let n = {
            let n = seen.entry(name).or_insert(0);
            *n += 1;
            *n
        };
        let here = || {
            src.find(&format!("name: {name}"), 0, n - 1)
                .or_else(|| src.find(&format!("name: \"{name}\""), 0, n - 1))
                .unwrap_or(0)
        };
        if n > 1 {
            return Err(src.at(here(), format!("duplicate step name `{name}`: every step needs its own name")));
        }
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(src.at(here(), format!("step name {name:?} must be a non-empty word")));
        }
        let earlier: Vec<Step> = rb.steps.iter().take_while(|s| !std::ptr::eq(*s, step)).cloned().collect();
        if let Err(why) = step.as_kind().check(&earlier) {
            return Err(src.at(here(), why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
