//! Adoption after a disaster: compare what a backend holds with what Drover knows, keep
//! the comparison as a plan, and take over exactly what the plan found adoptable.
//!
//! A plan classifies every unmanaged image of the backend:
//! - `adoptable`: unknown to Drover, safe to manage, its name (and its snapshots' names)
//!   free in its project;
//! - `managed`: its reference is the id of a volume Drover knows (here, or as the replica
//!   of a volume on another backend);
//! - `duplicate`: two images would become the same volume, or the name is taken;
//! - `unsafe`: the backend says why it cannot be taken over as it is;
//! - `unmatched`: a mapping file was given and no rule of it matches;
//! - `invalid`: the name or project the map gives it is not valid, or its group is not
//!   there;
//! - `missing`: a volume Drover knows on the backend whose image is gone (the record
//!   points at nothing).
//!
//! The plan keeps a fingerprint of the backend's unmanaged images; an apply refuses when
//! the images (apart from those this plan adopted) are no longer exactly those.

use std::collections::{BTreeMap, HashMap};

use drover_proto::agent::v1 as apb;
use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::volumes::VolumeApi;
use crate::agents::Deadline;
use crate::error::{ApiError, ApiResult};
use crate::model::{VolumeRec, now_ms};
use crate::repo::{put, validate_name, validate_new_name};
use crate::runbook::schema::position;

/// Where plans are kept.
pub fn plan_key(id: &str) -> String {
    format!("adopt-plans/{id}")
}

/// A plan as stored: the API form, and each unmanaged image's fingerprint line when it
/// was made (by reference), so an apply can tell what changed since.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRec {
    pub plan: pb::AdoptionPlan,
    pub images: BTreeMap<String, String>,
}

/// A mapping file: the first rule whose `match` fits a reference decides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptMap {
    pub rules: Vec<MapRule>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MapRule {
    /// A reference pattern: `*` any run of characters, `?` one character.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The volume's name; `{reference}` stands for the image's reference. Default: the
    /// reference.
    #[serde(default)]
    pub name: Option<String>,
    /// The project; default: the plan's.
    #[serde(default)]
    pub project: Option<String>,
    /// A group of the project to add the volume to once adopted.
    #[serde(default)]
    pub group: Option<String>,
    /// The group's type: when the group does not exist, the first adoption creates it
    /// with this type (on the plan's backend).
    #[serde(default, rename = "type")]
    pub group_type: Option<String>,
    /// Leave what matches alone (listed as unmatched).
    #[serde(default)]
    pub skip: bool,
}

/// Whether `text` fits the wildcard `pattern` (`*` and `?`).
pub fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Parses and checks a mapping file; errors name `file:line:col`.
pub fn parse_map(file: &str, text: &str) -> ApiResult<AdoptMap> {
    let bad = |line: usize, col: usize, msg: String| {
        ApiError::InvalidArgument(format!("{file}:{line}:{col}: {msg}; see docs/adoption.md for the format"))
    };
    let map: AdoptMap = serde_norway::from_str(text).map_err(|e| {
        let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        bad(line, col, e.to_string())
    })?;
    // Where each rule is: its `match` key, in order.
    let mut at = 0;
    for (i, rule) in map.rules.iter().enumerate() {
        let found = text[at..].find("match").map(|n| n + at);
        let (line, col) = found.map_or((1, 1), |n| position(text, n));
        if let Some(n) = found {
            at = n + 5;
        }
        if rule.pattern.is_empty() {
            return Err(bad(line, col, format!("rule {} has an empty `match`", i + 1)));
        }
        if let Some(p) = &rule.project {
            validate_name("project", p).map_err(|e| bad(line, col, format!("rule {}: {e}", i + 1)))?;
        }
        if let Some(n) = &rule.name {
            let probe = n.replace("{reference}", "x");
            if probe.contains(['{', '}']) {
                return Err(bad(
                    line,
                    col,
                    format!("rule {}: `name` {n:?} may use only {{reference}} as a placeholder", i + 1),
                ));
            }
        }
        if let Some(g) = &rule.group {
            validate_name("group", g).map_err(|e| bad(line, col, format!("rule {}: {e}", i + 1)))?;
        }
        if let Some(t) = &rule.group_type {
            if rule.group.is_none() {
                return Err(bad(
                    line,
                    col,
                    format!("rule {}: `type` {t:?} is the type of its `group`; name the group", i + 1),
                ));
            }
            validate_name("type", t).map_err(|e| bad(line, col, format!("rule {}: {e}", i + 1)))?;
        }
    }
    Ok(map)
}

/// Each unmanaged image's fingerprint line, by reference: what an apply compares.
pub fn image_lines(images: &[pb::ManageableVolume]) -> BTreeMap<String, String> {
    images
        .iter()
        .map(|m| {
            let snaps: Vec<&str> = m.snapshots.iter().map(|s| s.reference.as_str()).collect();
            let line =
                format!("{}|{}|{}|{}|{}", m.reference, m.size_bytes, m.safe_to_manage, m.backing_file, snaps.join(","));
            (m.reference.clone(), line)
        })
        .collect()
}

/// The fingerprint of a backend's unmanaged images (their lines, in reference order).
pub fn fingerprint(lines: &BTreeMap<String, String>) -> String {
    let joined: Vec<&str> = lines.values().map(String::as_str).collect();
    let digest = Sha256::digest(joined.join("\n").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// What changed between the images a plan saw and those there now: references added,
/// gone and changed; empty when nothing did.
pub fn changes(then: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> String {
    let added: Vec<&str> = now.keys().filter(|r| !then.contains_key(*r)).map(String::as_str).collect();
    let gone: Vec<&str> = then.keys().filter(|r| !now.contains_key(*r)).map(String::as_str).collect();
    let changed: Vec<&str> =
        now.iter().filter(|(r, l)| then.get(*r).is_some_and(|t| t != *l)).map(|(r, _)| r.as_str()).collect();
    let mut parts = Vec::new();
    for (what, list) in [("added", added), ("gone", gone), ("changed", changed)] {
        if !list.is_empty() {
            parts.push(format!("{what}: {}", list.join(", ")));
        }
    }
    parts.join("; ")
}

/// A reference as a volume name: characters a name cannot hold become '_'.
fn as_name(reference: &str) -> String {
    let mut n: String =
        reference.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        n.insert(0, 'v');
    }
    n
}

impl VolumeApi {
    /// Makes and keeps an adoption plan for `r.backend`.
    pub(crate) async fn plan_adoption(&self, r: &pb::PlanAdoptionRequest) -> ApiResult<pb::AdoptionPlan> {
        let map = match r.map.trim().is_empty() {
            true => None,
            false => Some(parse_map(if r.map_file.is_empty() { "map" } else { &r.map_file }, &r.map)?),
        };
        if !r.project.is_empty() {
            validate_name("project", &r.project)?;
        } else if map.is_none() {
            return Err(ApiError::InvalidArgument(
                "give the project adopted volumes go to (--project), or a mapping file that names projects (--map)"
                    .into(),
            ));
        }
        let images = self.list_manageable(&r.backend).await?;
        let volumes: Vec<VolumeRec> =
            self.core.repo.list::<VolumeRec>(crate::model::keys::VOLUMES).await?.into_iter().map(|v| v.rec).collect();
        let by_id: HashMap<&str, &VolumeRec> = volumes.iter().map(|v| (v.id.as_str(), v)).collect();
        let by_name: HashMap<(&str, &str), &VolumeRec> =
            volumes.iter().map(|v| ((v.project.as_str(), v.name.as_str()), v)).collect();
        let mut items = Vec::new();
        for m in &images {
            let mut item =
                pb::AdoptionItem { reference: m.reference.clone(), size_bytes: m.size_bytes, ..Default::default() };
            if let Some(v) = by_id.get(m.reference.as_str()) {
                item.category = "managed".into();
                item.volume_id = v.id.clone();
                item.name = v.name.clone();
                item.project = v.project.clone();
                item.reason = match v.active_backend == r.backend || v.backend == r.backend {
                    true => format!("Drover manages it as volume {} (project {})", v.name, v.project),
                    false => format!(
                        "it is a replica of volume {} (project {}), active on backend {}",
                        v.name, v.project, v.active_backend
                    ),
                };
                items.push(item);
                continue;
            }
            if !m.safe_to_manage {
                item.category = "unsafe".into();
                item.reason = m.reason_not_safe.clone();
                items.push(item);
                continue;
            }
            let rule = map.as_ref().map(|map| map.rules.iter().find(|rule| wildcard(&rule.pattern, &m.reference)));
            let rule = match rule {
                None => None,
                Some(None) => {
                    item.category = "unmatched".into();
                    item.reason = "no rule of the map matches it".into();
                    items.push(item);
                    continue;
                }
                Some(Some(rule)) if rule.skip => {
                    item.category = "unmatched".into();
                    item.reason = format!("the map skips it (rule {:?})", rule.pattern);
                    items.push(item);
                    continue;
                }
                Some(Some(rule)) => Some(rule),
            };
            item.name = match rule.and_then(|rule| rule.name.as_ref()) {
                Some(t) => t.replace("{reference}", &m.reference),
                None => as_name(&m.reference),
            };
            item.project = rule.and_then(|rule| rule.project.clone()).unwrap_or_else(|| r.project.clone());
            item.group = rule.and_then(|rule| rule.group.clone()).unwrap_or_default();
            item.group_type = rule.and_then(|rule| rule.group_type.clone()).unwrap_or_default();
            item.snapshots = m
                .snapshots
                .iter()
                .filter(|s| s.kind != "backing-file")
                .map(|s| format!("{}.{}", item.name, as_name(&s.reference)))
                .collect();
            item.category = "adoptable".into();
            if let Err(e) = validate_new_name("name", &item.name) {
                (item.category, item.reason) = ("invalid".into(), e.to_string());
            } else if item.project.is_empty() {
                (item.category, item.reason) =
                    ("invalid".into(), "no project: the matching rule names none and the plan has none".into());
            } else if let Some(bad) = item.snapshots.iter().find_map(|s| validate_name("snapshot name", s).err()) {
                (item.category, item.reason) = ("invalid".into(), bad.to_string());
            } else if !item.group.is_empty() {
                match self.core.repo.group(&item.group, &item.project).await {
                    Ok(g) if !g.rec.active_backend.is_empty() && g.rec.active_backend != r.backend => {
                        (item.category, item.reason) = (
                            "invalid".into(),
                            format!(
                                "group {} is active on backend {}, not {}",
                                item.group, g.rec.active_backend, r.backend
                            ),
                        );
                    }
                    Ok(_) => {}
                    Err(ApiError::NotFound(_)) if !item.group_type.is_empty() => {
                        let known = self
                            .core
                            .repo
                            .get::<crate::model::GroupTypeRec>(&crate::model::keys::group_type(&item.group_type))
                            .await?
                            .is_some();
                        item.reason = match known {
                            true => format!("group {} is created with type {}", item.group, item.group_type),
                            false => {
                                item.category = "invalid".into();
                                format!("there is no group type {}; see `drover group-type list`", item.group_type)
                            }
                        };
                    }
                    Err(ApiError::NotFound(_)) => {
                        (item.category, item.reason) = (
                            "invalid".into(),
                            format!(
                                "project {} has no group {}; create it first, or give its `type` in the map",
                                item.project, item.group
                            ),
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
            items.push(item);
        }
        self.mark_duplicates(&mut items, &by_name).await?;
        items.extend(self.missing_images(r, &volumes).await?);
        let lines = image_lines(&images);
        let plan = pb::AdoptionPlan {
            id: uuid::Uuid::now_v7().to_string(),
            backend: r.backend.clone(),
            project: r.project.clone(),
            created_at_ms: now_ms(),
            fingerprint: fingerprint(&lines),
            items,
            executions: Vec::new(),
        };
        let rec = PlanRec { plan: plan.clone(), images: lines };
        self.core.repo.txn(drover_store::Txn::new().and_then(put(&plan_key(&plan.id), &rec))).await?;
        tracing::info!(plan = %plan.id, backend = %plan.backend, items = plan.items.len(), "adoption planned");
        Ok(plan)
    }

    /// A kept plan, with the outcomes of its applies.
    pub(crate) async fn adoption_plan(&self, id: &str) -> ApiResult<PlanRec> {
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ApiError::InvalidArgument(format!("{id:?} is not a plan id; `drover adopt plan` prints one")));
        }
        Ok(self
            .core
            .repo
            .get::<PlanRec>(&plan_key(id))
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("no adoption plan {id}; make one with `drover adopt plan --backend B`"))
            })?
            .rec)
    }

    /// Adoptable items that would become the same volume, or whose name (or a snapshot
    /// name) is taken, become duplicates.
    async fn mark_duplicates(
        &self,
        items: &mut [pb::AdoptionItem],
        by_name: &HashMap<(&str, &str), &VolumeRec>,
    ) -> ApiResult<()> {
        let mut claims: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for i in items.iter().filter(|i| i.category == "adoptable") {
            claims.entry((i.project.clone(), i.name.clone())).or_default().push(i.reference.clone());
        }
        for i in items.iter_mut().filter(|i| i.category == "adoptable") {
            let refs = &claims[&(i.project.clone(), i.name.clone())];
            if refs.len() > 1 {
                i.category = "duplicate".into();
                i.reason = format!(
                    "{} images would be volume {} of project {}: {}; map them to different names",
                    refs.len(),
                    i.name,
                    i.project,
                    refs.join(", ")
                );
            } else if let Some(v) = by_name.get(&(i.project.as_str(), i.name.as_str())) {
                i.category = "duplicate".into();
                i.reason = format!(
                    "project {} already has a volume {} (id {}, backend {}); map the image to another name",
                    i.project, i.name, v.id, v.active_backend
                );
            } else {
                for s in &i.snapshots {
                    let key = crate::model::keys::snapshot_name(&i.project, s);
                    if self.core.repo.store().get(key.as_bytes()).await.map_err(ApiError::from)?.is_some() {
                        i.category = "duplicate".into();
                        i.reason =
                            format!("project {} already has a snapshot {s}; map the image to another name", i.project);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Volumes Drover knows active on the backend (in the plan's project, if it has one)
    /// whose image the backend no longer has.
    /// `volumes` are the records the plan read once.
    async fn missing_images(
        &self,
        r: &pb::PlanAdoptionRequest,
        volumes: &[VolumeRec],
    ) -> ApiResult<Vec<pb::AdoptionItem>> {
        let mut out = Vec::new();
        for v in volumes.iter().cloned() {
            if v.active_backend != r.backend || (!r.project.is_empty() && v.project != r.project) {
                continue;
            }
            let id = v.id.clone();
            let answer = self
                .core
                .agents
                .call(&r.backend, Deadline::Call, false, |mut c| {
                    let id = id.clone();
                    async move { c.get_volume(apb::GetVolumeRequest { volume_id: id }).await }
                })
                .await;
            match answer {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => out.push(pb::AdoptionItem {
                    category: "missing".into(),
                    reason: format!(
                        "backend {} has no image for it; delete the record (`drover volume delete {} --project {}`) \
                         or restore the image",
                        r.backend, v.name, v.project
                    ),
                    name: v.name,
                    project: v.project,
                    size_bytes: v.size_bytes as i64,
                    volume_id: v.id,
                    ..Default::default()
                }),
                Err(s) => {
                    return Err(super::shared::from_agent(&r.backend, &format!("look up volume {}", v.name), &s));
                }
            }
        }
        Ok(out)
    }

    /// Submits the execution that applies plan `id`.
    pub(crate) async fn apply_adoption(&self, id: &str) -> ApiResult<drover_procedure::ExecutionRec> {
        let plan = self.adoption_plan(id).await?;
        let proc = crate::procedures::Adopt::new(self.core.clone(), &plan.plan);
        let eid =
            self.core.procedures.submit(Box::new(proc)).await.map_err(|e| {
                crate::procedures::submit_error(e, &format!("adoption on backend {}", plan.plan.backend))
            })?;
        self.core
            .procedures
            .get(&eid)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Internal(format!("execution {eid} vanished right after it was submitted")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_globs_do() {
        assert!(wildcard("db-*", "db-01"));
        assert!(wildcard("*", ""));
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("a?c", "ac"));
        assert!(wildcard("*-replica-*", "db-replica-7"));
        assert!(!wildcard("db-*", "web-01"));
    }

    #[test]
    fn a_mapping_file_with_a_mistake_is_refused_at_its_line_and_column() {
        let e = parse_map("map.yaml", "rules:\n  - match: db-*\n    nmae: x\n").unwrap_err().to_string();
        assert!(e.contains("map.yaml:3:5") && e.contains("nmae"), "{e}");
        let e = parse_map("map.yaml", "rules:\n  - match: a\n  - match: b\n    project: \"no way\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("map.yaml:3:5") && e.contains("rule 2"), "{e}");
        let e = parse_map("m", "rules:\n  - match: x\n    name: \"{volume}\"\n").unwrap_err().to_string();
        assert!(e.contains("m:2:5") && e.contains("{reference}"), "{e}");
        let e = parse_map("m", "rules:\n  - match: x\n    type: consistent-replication\n").unwrap_err().to_string();
        assert!(e.contains("m:2:5") && e.contains("name the group"), "{e}");
        let ok =
            parse_map("m", "rules:\n  - match: \"db-*\"\n    name: \"prod-{reference}\"\n    project: fin\n").unwrap();
        assert_eq!(ok.rules[0].project.as_deref(), Some("fin"));
    }

    #[test]
    fn the_fingerprint_follows_the_images_not_their_order() {
        let img = |r: &str, size: i64| pb::ManageableVolume {
            reference: r.into(),
            size_bytes: size,
            safe_to_manage: true,
            ..Default::default()
        };
        let f = |list: &[pb::ManageableVolume]| fingerprint(&image_lines(list));
        let a = f(&[img("a", 1), img("b", 2)]);
        assert_eq!(a, f(&[img("b", 2), img("a", 1)]));
        assert_ne!(a, f(&[img("a", 1), img("b", 2), img("c", 3)]));
        assert_ne!(a, f(&[img("a", 1), img("b", 3)]));
        let then = image_lines(&[img("a", 1), img("b", 2)]);
        assert_eq!(changes(&then, &image_lines(&[img("a", 1), img("c", 3)])), "added: c; gone: b");
        assert_eq!(changes(&then, &image_lines(&[img("a", 2), img("b", 2)])), "changed: a");
        assert_eq!(changes(&then, &then), "");
    }
}
