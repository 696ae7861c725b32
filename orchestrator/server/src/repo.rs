//! Typed access to records in the store, and input validation shared by the services.

use std::sync::Arc;

use drover_store::{Compare, KvStore, Txn, TxnOp, TxnResponse};
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{ApiError, ApiResult};
use crate::model::{GroupRec, SnapshotRec, VolumeRec, keys};

/// A record with the mod_revision it was read at: what a transaction compares against.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub rec: T,
    pub rev: i64,
}

/// What the final write of a procedure step must still find: its records at the revision
/// the step read them, and the step's owner still holding its claim on the execution (an
/// owner that lost its lease without noticing, while another took over, writes nothing).
#[derive(Debug, Clone)]
pub struct Expect {
    pub rev: i64,
    pub claim: Compare,
}

impl Expect {
    /// The step of `ctx` read its records at `rev`.
    pub fn of(ctx: &drover_procedure::Context, rev: i64) -> Self {
        Self { rev, claim: ctx.claim() }
    }

    /// `txn` with the owner's claim compared.
    pub fn claimed(&self, txn: Txn) -> Txn {
        txn.when(self.claim.clone())
    }

    /// `txn` comparing `key` at the revision read.
    pub fn at(&self, txn: Txn, key: &str) -> Txn {
        txn.when(Compare::ModRevisionEquals(key.as_bytes().to_vec(), self.rev))
    }
}

/// Typed reads and transactions over the store.
#[derive(Clone)]
pub struct Repo {
    store: Arc<dyn KvStore>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

fn corrupt(key: &str, e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("stored record {key} is unreadable ({e}); restore it from a backup or delete it"))
}

impl Repo {
    pub fn new(store: Arc<dyn KvStore>) -> Self {
        Self { store, metrics: None }
    }

    /// The same, timing its transactions and counting their conflicts in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    /// A page of a group's history, newest first: up to `limit` events after the
    /// event key `after` (empty: from the newest), and the key to continue from (empty
    /// at the end). Events stored twice (see `GroupRec::event_writes`) are shown once.
    pub async fn group_history(
        &self,
        group_id: &str,
        after: &str,
        limit: usize,
    ) -> ApiResult<(Vec<crate::model::GroupEventRec>, String)> {
        let prefix = keys::group_events(group_id);
        let start = if after.is_empty() { String::new() } else { format!("{prefix}{after}") };
        let page = self.store.range_page(prefix.as_bytes(), start.as_bytes(), limit).await?;
        let mut events: Vec<crate::model::GroupEventRec> = Vec::with_capacity(page.kvs.len());
        for kv in &page.kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let e: crate::model::GroupEventRec = serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?;
            if !events.contains(&e) {
                events.push(e);
            }
        }
        let next = match (page.more, page.kvs.last()) {
            (true, Some(last)) => String::from_utf8_lossy(&last.key[prefix.len()..]).into_owned(),
            _ => String::new(),
        };
        Ok((events, next))
    }

    /// A group as the API shows it: with its newest [`crate::model::HISTORY_LIMIT`]
    /// events, oldest first (and any the record still holds inline).
    pub async fn group_pb(&self, rec: &GroupRec) -> ApiResult<drover_proto::v1::Group> {
        let (events, _) = self.group_history(&rec.id, "", crate::model::HISTORY_LIMIT).await?;
        Ok(Self::shown(rec, events))
    }

    /// A group by id or name, with [`Repo::group_pb`]'s view of it. Given an id, the
    /// record and its newest history page are read at once (one round trip, and on etcd
    /// often one request); given a name, the page is read once the name gave the id.
    pub async fn group_shown(&self, id_or_name: &str, project: &str) -> ApiResult<(GroupRec, drover_proto::v1::Group)> {
        let (g, page) = futures::join!(
            self.group(id_or_name, project),
            self.group_history(id_or_name, "", crate::model::HISTORY_LIMIT)
        );
        let g = g?.rec;
        // The page read beside the record is the group's only when the request named it
        // by id: a name's page is read now (an id of another project was not found).
        let events = match page {
            Ok((events, _)) if g.id == id_or_name => events,
            _ => self.group_history(&g.id, "", crate::model::HISTORY_LIMIT).await?.0,
        };
        let shown = Self::shown(&g, events);
        Ok((g, shown))
    }

    /// `rec` with `events` (newest first, as [`Repo::group_history`] gives them) merged
    /// into the history the record holds inline.
    fn shown(rec: &GroupRec, mut events: Vec<crate::model::GroupEventRec>) -> drover_proto::v1::Group {
        events.reverse();
        for e in &rec.history {
            if !events.contains(e) {
                events.push(e.clone());
            }
        }
        events.sort_by_key(|e| e.at_ms);
        let skip = events.len().saturating_sub(crate::model::HISTORY_LIMIT);
        let mut shown = rec.clone();
        shown.history = events.split_off(skip);
        shown.to_pb()
    }

    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> ApiResult<Option<Versioned<T>>> {
        match self.store.get(key.as_bytes()).await? {
            Some(kv) => Ok(Some(Versioned {
                rec: serde_json::from_slice(&kv.value).map_err(|e| corrupt(key, e))?,
                rev: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> ApiResult<Vec<Versioned<T>>> {
        let (kvs, _) = self.store.range(prefix.as_bytes()).await?;
        kvs.into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                Ok(Versioned {
                    rec: serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?,
                    rev: kv.mod_revision,
                })
            })
            .collect()
    }

    pub async fn txn(&self, txn: Txn) -> ApiResult<TxnResponse> {
        let started = std::time::Instant::now();
        let r = self.store.txn(txn).await?;
        if let Some(m) = &self.metrics {
            m.store_txn_seconds.observe(started.elapsed().as_secs_f64());
            if !r.succeeded {
                m.store_txn_conflicts.inc();
            }
        }
        Ok(r)
    }

    /// Resolves a volume by id, or by name within a project.
    pub async fn volume(&self, id_or_name: &str, project: &str) -> ApiResult<Versioned<VolumeRec>> {
        self.resolve("volume", id_or_name, project, keys::volume, keys::volume_name).await
    }

    /// Resolves a snapshot by id, or by name within a project.
    pub async fn snapshot(&self, id_or_name: &str, project: &str) -> ApiResult<Versioned<SnapshotRec>> {
        self.resolve("snapshot", id_or_name, project, keys::snapshot, keys::snapshot_name).await
    }

    /// One page of the records under `all` (every project, in key order), or, with
    /// `index` (a name index prefix such as `names/groups/<project>/`), of that index's
    /// records in name order. Returns them and the marker of the next page (empty when
    /// none follows).
    pub async fn page<T: DeserializeOwned>(
        &self,
        all: &str,
        index: Option<String>,
        request: &PageRequest,
    ) -> ApiResult<(Vec<T>, String)> {
        let limit = request.limit()?;
        let prefix = index.clone().unwrap_or_else(|| all.to_string());
        let after = if request.marker.is_empty() { String::new() } else { format!("{prefix}{}", request.marker) };
        let page = self.store.range_page(prefix.as_bytes(), after.as_bytes(), limit).await?;
        let next = match (page.more, page.kvs.last()) {
            (true, Some(last)) => String::from_utf8_lossy(&last.key[prefix.len()..]).into_owned(),
            _ => String::new(),
        };
        let mut out = Vec::new();
        if index.is_some() {
            let keys: Vec<String> =
                page.kvs.iter().map(|kv| format!("{all}{}", String::from_utf8_lossy(&kv.value))).collect();
            let recs = futures::future::join_all(keys.iter().map(|k| self.get::<T>(k))).await;
            for r in recs {
                // A name whose record went meanwhile (deleted between the two reads).
                if let Some(v) = r? {
                    out.push(v.rec);
                }
            }
        } else {
            for kv in &page.kvs {
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                out.push(serde_json::from_slice(&kv.value).map_err(|e| corrupt(&key, e))?);
            }
        }
        Ok((out, next))
    }

    /// Resolves a group by id, or by name within a project.
    pub async fn group(&self, id_or_name: &str, project: &str) -> ApiResult<Versioned<GroupRec>> {
        self.resolve("group", id_or_name, project, keys::group, keys::group_name).await
    }

    async fn resolve<T: DeserializeOwned + InProject>(
        &self,
        kind: &str,
        id_or_name: &str,
        project: &str,
        record_key: fn(&str) -> String,
        name_key: fn(&str, &str) -> String,
    ) -> ApiResult<Versioned<T>> {
        require(kind, id_or_name)?;
        // By id: when a project is named, only a record of that project counts (a
        // non-admin's requests always name theirs), so an id of another project is not
        // found, exactly like one that does not exist.
        if let Some(v) = self.get::<T>(&record_key(id_or_name)).await?
            && (project.is_empty() || v.rec.project() == project)
        {
            return Ok(v);
        }
        if !project.is_empty()
            && let Some(id) = self.store.get(name_key(project, id_or_name).as_bytes()).await?
            && let Some(v) = self.get::<T>(&record_key(&String::from_utf8_lossy(&id.value))).await?
        {
            return Ok(v);
        }
        Err(ApiError::NotFound(format!(
            "{kind} {id_or_name:?} not found{}; list them with `drover {kind} list`",
            if project.is_empty() { String::new() } else { format!(" in project {project}") }
        )))
    }
}

/// A repo on a fresh embedded store in a temporary directory (kept while the guard lives).
#[cfg(test)]
pub(crate) async fn temp_repo() -> (tempfile::TempDir, Repo) {
    let dir = tempfile::tempdir().unwrap();
    let store = drover_store::EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap();
    (dir, Repo::new(std::sync::Arc::new(store)))
}

/// The most records one page of a listing holds.
pub const MAX_PAGE: u32 = 1000;

/// The paging fields of a list request.
pub struct PageRequest {
    pub limit: u32,
    pub marker: String,
}

impl PageRequest {
    /// The page size: 0 means the maximum; above it is refused.
    pub fn limit(&self) -> ApiResult<usize> {
        if self.marker.chars().any(char::is_control) || self.marker.len() > 512 {
            return Err(ApiError::InvalidArgument(
                "`marker` is not a marker this server gave (pass the previous page's next_marker)".into(),
            ));
        }
        match self.limit {
            0 => Ok(MAX_PAGE as usize),
            n if n > MAX_PAGE => Err(ApiError::InvalidArgument(format!(
                "`limit` {n} is above the maximum page of {MAX_PAGE}; ask for at most {MAX_PAGE} and follow `next_marker`"
            ))),
            n => Ok(n as usize),
        }
    }
}

/// A record that belongs to a project.
pub trait InProject {
    fn project(&self) -> &str;
}

impl InProject for VolumeRec {
    fn project(&self) -> &str {
        &self.project
    }
}

impl InProject for SnapshotRec {
    fn project(&self) -> &str {
        &self.project
    }
}

impl InProject for GroupRec {
    fn project(&self) -> &str {
        &self.project
    }
}

/// A put of a record as JSON.
pub fn put<T: Serialize>(key: &str, rec: &T) -> TxnOp {
    TxnOp::put(key.as_bytes(), serde_json::to_vec(rec).expect("records serialise"))
}

/// A required, non-blank field.
pub fn require(field: &str, value: &str) -> ApiResult<()> {
    if value.trim().is_empty() {
        return Err(ApiError::InvalidArgument(format!("`{field}` is required")));
    }
    Ok(())
}

/// The longest name Drover accepts.
pub const MAX_NAME_LEN: usize = 64;

/// Validates a name: 1 to 64 characters of letters, digits, `.`, `_` and `-`, starting
/// with a letter or digit.
pub fn validate_name(field: &str, name: &str) -> ApiResult<()> {
    if name.is_empty() {
        return Err(ApiError::InvalidArgument(format!("`{field}` must not be empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ApiError::InvalidArgument(format!(
            "`{field}` is {} characters long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    let ok_first = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok_first || !ok_rest {
        return Err(ApiError::InvalidArgument(format!(
            "`{field}` {name:?} may hold only letters, digits, '.', '_' and '-', and must start with a letter or digit"
        )));
    }
    Ok(())
}

/// Validates the name of a new volume or group: a valid name that is not shaped like an
/// id, since lookups take an id or a name and an id wins.
pub fn validate_new_name(field: &str, name: &str) -> ApiResult<()> {
    validate_name(field, name)?;
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(ApiError::InvalidArgument(format!(
            "`{field}` {name:?} is shaped like an id, which lookups would take for one; pick a name that is not a UUID"
        )));
    }
    Ok(())
}

/// The largest volume Drover accepts: 64 TiB.
pub const MAX_VOLUME_BYTES: i64 = 64 << 40;

/// Validates a volume size in bytes.
pub fn validate_size(field: &str, size: i64) -> ApiResult<u64> {
    if size <= 0 {
        return Err(ApiError::InvalidArgument(format!("`{field}` must be positive, got {size}")));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "`{field}` {size} exceeds the limit of {MAX_VOLUME_BYTES} bytes (64 TiB)"
        )));
    }
    if size % 512 != 0 {
        return Err(ApiError::InvalidArgument(format!("`{field}` {size} is not a multiple of 512 bytes")));
    }
    Ok(size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_for_length_and_characters() {
        assert!(validate_name("name", "db-01.data_a").is_ok());
        assert!(validate_name("name", "").unwrap_err().to_string().contains("empty"));
        assert!(validate_name("name", &"a".repeat(65)).unwrap_err().to_string().contains("limit is 64"));
        assert!(validate_name("name", "-x").is_err());
        assert!(validate_name("name", "a b").is_err());
    }

    #[test]
    fn sizes_must_be_positive_bounded_and_aligned() {
        assert_eq!(validate_size("size_bytes", 1 << 20).unwrap(), 1 << 20);
        assert!(validate_size("size_bytes", 0).unwrap_err().to_string().contains("positive"));
        assert!(validate_size("size_bytes", -5).is_err());
        assert!(validate_size("size_bytes", i64::MAX).unwrap_err().to_string().contains("64 TiB"));
        assert!(validate_size("size_bytes", 1000).unwrap_err().to_string().contains("512"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any string: no panic, and what is accepted is a valid name by the rules.
        #[test]
        fn any_name_is_judged_without_panic(name in ".{0,80}") {
            if validate_name("name", &name).is_ok() {
                proptest::prop_assert!(name.len() <= MAX_NAME_LEN && !name.is_empty());
                proptest::prop_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
            }
            if validate_new_name("name", &name).is_ok() {
                proptest::prop_assert!(uuid::Uuid::parse_str(&name).is_err());
            }
        }

        /// Any size: no panic, and what is accepted is positive, aligned and bounded.
        #[test]
        fn any_size_is_judged_without_panic(size in proptest::prelude::any::<i64>()) {
            if let Ok(s) = validate_size("size_bytes", size) {
                proptest::prop_assert!(s > 0 && s % 512 == 0 && s <= MAX_VOLUME_BYTES as u64);
            }
        }
    }
}
