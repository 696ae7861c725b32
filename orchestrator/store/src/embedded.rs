//! The embedded store: durable, single-node, on redb.
//!
//! Transactions are committed with redb's default durability (fsync at commit), so an
//! acknowledged write survives SIGKILL; concurrent writers share commits (group commit:
//! one redb write transaction and one fsync for every transaction queued while the
//! previous commit ran, each still its own revision; see `Inner::apply`). Revisions,
//! create/mod revisions, versions and leases mean what they mean in etcd. Watch history is
//! kept in an events table, trimmed to the newest [`HISTORY_REVISIONS`] revisions.
//!
//! Lease deadlines live in memory: on open, every persisted lease gets a full TTL again,
//! as etcd does after a restart.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use crate::{
    Compare, KeyValue, KvStore, Page, StoreError, Txn, TxnOp, TxnResponse, WatchEvent, WatchStream, page_start,
    prefix_end,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
/// (lease id, key) pairs, so a revoke finds its keys without a scan.
const LEASE_KEYS: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("lease_keys");
/// (revision, index within the revision) to an encoded event.
const EVENTS: TableDefinition<(i64, u32), &[u8]> = TableDefinition::new("events");

/// How many revisions of watch history the embedded store keeps.
pub const HISTORY_REVISIONS: i64 = 50_000;
const REVISION: &str = "revision";
const LEASE_SEQ: &str = "lease_seq";
const COMPACTED: &str = "compacted";
const EXPIRY_TICK: Duration = Duration::from_millis(250);

/// A durable single-node store in one file.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Lease id to (ttl, deadline).
    leases: Mutex<HashMap<i64, (i64, Instant)>>,
    events: broadcast::Sender<Vec<WatchEvent>>,
    /// Held from the start of a write until its events are published, so that watchers
    /// see batches in revision order.
    write_lock: Mutex<()>,
    /// Transactions waiting for the next commit (see [`Inner::apply`]).
    queue: Mutex<Vec<Queued>>,
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` and starts lease expiry.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Internal(format!("cannot create store directory {}: {e}", dir.display())))?;
        }
        let path = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || {
            Database::create(&path).map_err(|e| {
                StoreError::Internal(format!(
                    "cannot open embedded store {}: {e}; is another orchestrator using it?",
                    path.display()
                ))
            })
        })
        .await
        .map_err(internal)??;
        let store = Self::from_db(db)?;
        store.spawn_expiry();
        Ok(store)
    }

    fn from_db(db: Database) -> Result<Self, StoreError> {
        let now = Instant::now();
        let mut leases = HashMap::new();
        {
            let w = db.begin_write().map_err(internal)?;
            {
                // Create every table so that reads never meet a missing one.
                w.open_table(KV).map_err(internal)?;
                w.open_table(META).map_err(internal)?;
                w.open_table(LEASE_KEYS).map_err(internal)?;
                w.open_table(EVENTS).map_err(internal)?;
                let table = w.open_table(LEASES).map_err(internal)?;
                for row in table.iter().map_err(internal)? {
                    let (id, ttl) = row.map_err(internal)?;
                    let ttl = ttl.value();
                    leases.insert(id.value(), (ttl, now + Duration::from_secs(ttl as u64)));
                }
            }
            w.commit().map_err(internal)?;
        }
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                leases: Mutex::new(leases),
                events,
                write_lock: Mutex::new(()),
                queue: Mutex::new(Vec::new()),
            }),
        })
    }

    fn spawn_expiry(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPIRY_TICK).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = EmbeddedStore { inner };
                let expired: Vec<i64> = {
                    let now = Instant::now();
                    let leases = store.inner.leases.lock().expect("lease map poisoned");
                    leases.iter().filter(|(_, (_, d))| *d <= now).map(|(id, _)| *id).collect()
                };
                for id in expired {
                    if let Err(e) = store.revoke_lease(id).await {
                        tracing::warn!(lease = id, error = %e, "expiring lease failed");
                    }
                }
            }
        });
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(internal)?
    }
}

// Record layout in the kv table: create_revision, mod_revision, version, lease (i64 LE),
// then the value bytes.
const HEADER: usize = 32;

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<KeyValue, StoreError> {
    if bytes.len() < HEADER {
        return Err(StoreError::Internal(format!(
            "corrupt record for key {:?}: {} bytes",
            String::from_utf8_lossy(key),
            bytes.len()
        )));
    }
    let n = |i: usize| i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(KeyValue {
        key: key.to_vec(),
        value: bytes[HEADER..].to_vec(),
        create_revision: n(0),
        mod_revision: n(1),
        version: n(2),
        lease: n(3),
    })
}

// Event layout: kind byte (0 put, 1 delete), key length (u32 LE), key, record.
fn encode_event(ev: &WatchEvent) -> Vec<u8> {
    let (kind, kv) = match ev {
        WatchEvent::Put(kv) => (0u8, kv),
        WatchEvent::Delete(kv) => (1u8, kv),
    };
    let mut out = vec![kind];
    out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&kv.key);
    out.extend_from_slice(&encode_record(kv));
    out
}

fn decode_event(bytes: &[u8]) -> Result<WatchEvent, StoreError> {
    let bad = || StoreError::Internal("corrupt watch event in history".into());
    let kind = *bytes.first().ok_or_else(bad)?;
    let len = u32::from_le_bytes(bytes.get(1..5).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let key = bytes.get(5..5 + len).ok_or_else(bad)?;
    let kv = decode_record(key, &bytes[5 + len..])?;
    Ok(if kind == 0 { WatchEvent::Put(kv) } else { WatchEvent::Delete(kv) })
}

fn read_revision(meta: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64, StoreError> {
    Ok(meta.get(name).map_err(internal)?.map(|v| v.value()).unwrap_or(0))
}

fn compare_holds(kv: &impl ReadableTable<&'static [u8], &'static [u8]>, cmp: &Compare) -> Result<bool, StoreError> {
    let load = |key: &[u8]| -> Result<Option<KeyValue>, StoreError> {
        match kv.get(key).map_err(internal)? {
            Some(v) => Ok(Some(decode_record(key, v.value())?)),
            None => Ok(None),
        }
    };
    Ok(match cmp {
        Compare::ValueEquals(key, value) => load(key)?.is_some_and(|c| &c.value == value),
        Compare::ModRevisionEquals(key, rev) => load(key)?.map_or(0, |c| c.mod_revision) == *rev,
        Compare::Absent(key) => load(key)?.is_none(),
        Compare::Exists(key) => load(key)?.is_some(),
    })
}

/// A transaction waiting for the next commit, and where its answer goes.
struct Queued {
    txn: Txn,
    reply: std::sync::mpsc::SyncSender<Result<(bool, i64), StoreError>>,
}

/// The tables one commit writes.
struct Tables<'t> {
    kv: redb::Table<'t, &'static [u8], &'static [u8]>,
    meta: redb::Table<'t, &'static str, i64>,
    lease_keys: redb::Table<'t, (i64, &'static [u8]), ()>,
    leases: redb::Table<'t, i64, i64>,
    history: redb::Table<'t, (i64, u32), &'static [u8]>,
}

impl Inner {
    /// Applies a transaction and returns whether its comparisons held and the revision
    /// after it, once it is durable.
    ///
    /// Group commit: a writer queues its transaction, then takes the write lock. If the
    /// writer that held the lock took the queued transaction into its commit, the answer
    /// is already there. Otherwise this writer commits everything queued meanwhile, in
    /// arrival order, in one redb write transaction with one fsync. Each transaction still
    /// gets its own revision and its comparisons see every earlier one's writes, exactly
    /// as if they had been committed one by one; only the fsync is shared.
    fn apply(&self, txn: Txn) -> Result<(bool, i64), StoreError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.queue.lock().expect("commit queue poisoned").push(Queued { txn, reply });
        let serial = self.write_lock.lock().expect("write lock poisoned");
        if let Ok(done) = answer.try_recv() {
            return done;
        }
        let batch = std::mem::take(&mut *self.queue.lock().expect("commit queue poisoned"));
        self.commit(batch);
        drop(serial);
        answer.recv().unwrap_or_else(|_| Err(internal("the commit lost this transaction")))
    }

    /// Commits `batch` in one write transaction (the caller holds the write lock), then
    /// answers each transaction and publishes its events in revision order. A failure of
    /// the commit itself fails every transaction of the batch: none of them was applied.
    fn commit(&self, batch: Vec<Queued>) {
        let applied = (|| {
            let w = self.db.begin_write().map_err(internal)?;
            let outcomes = {
                let mut t = Tables {
                    kv: w.open_table(KV).map_err(internal)?,
                    meta: w.open_table(META).map_err(internal)?,
                    lease_keys: w.open_table(LEASE_KEYS).map_err(internal)?,
                    leases: w.open_table(LEASES).map_err(internal)?,
                    history: w.open_table(EVENTS).map_err(internal)?,
                };
                let mut outcomes = Vec::with_capacity(batch.len());
                for q in &batch {
                    outcomes.push(apply_one(&mut t, &q.txn)?);
                }
                outcomes
            };
            w.commit().map_err(internal)?;
            Ok::<_, StoreError>(outcomes)
        })();
        match applied {
            Ok(outcomes) => {
                for (q, outcome) in batch.into_iter().zip(outcomes) {
                    let answer = outcome.map(|(succeeded, revision, events)| {
                        self.publish(events);
                        (succeeded, revision)
                    });
                    let _ = q.reply.send(answer);
                }
            }
            Err(e) => {
                let why = e.to_string();
                for q in batch {
                    let _ = q.reply.send(Err(StoreError::Internal(why.clone())));
                }
            }
        }
    }

    fn publish(&self, events: Vec<WatchEvent>) {
        if !events.is_empty() {
            // An error only means that nobody watches.
            let _ = self.events.send(events);
        }
    }
}

/// One transaction inside a commit. The outer error aborts the whole commit (the store
/// itself failed); the inner one refuses this transaction alone, before it wrote
/// anything (a put bound to a lease that does not exist).
#[allow(clippy::type_complexity)]
fn apply_one(t: &mut Tables<'_>, txn: &Txn) -> Result<Result<(bool, i64, Vec<WatchEvent>), StoreError>, StoreError> {
    let mut succeeded = true;
    for cmp in &txn.compares {
        if !compare_holds(&t.kv, cmp)? {
            succeeded = false;
            break;
        }
    }
    let ops = if succeeded { &txn.success } else { &txn.failure };
    for op in ops {
        if let TxnOp::Put { lease, .. } = op
            && *lease != 0
            && t.leases.get(*lease).map_err(internal)?.is_none()
        {
            return Ok(Err(StoreError::LeaseNotFound(*lease)));
        }
    }
    let current = read_revision(&t.meta, REVISION)?;
    let next = current + 1;
    let mut events = Vec::new();
    for op in ops {
        match op {
            TxnOp::Put { key, value, lease } => {
                let old = match t.kv.get(key.as_slice()).map_err(internal)? {
                    Some(v) => Some(decode_record(key, v.value())?),
                    None => None,
                };
                if let Some(old) = &old
                    && old.lease != 0
                    && old.lease != *lease
                {
                    t.lease_keys.remove((old.lease, key.as_slice())).map_err(internal)?;
                }
                let rec = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: old.as_ref().map_or(next, |o| o.create_revision),
                    mod_revision: next,
                    version: old.as_ref().map_or(1, |o| o.version + 1),
                    lease: *lease,
                };
                t.kv.insert(key.as_slice(), encode_record(&rec).as_slice()).map_err(internal)?;
                if *lease != 0 {
                    t.lease_keys.insert((*lease, key.as_slice()), ()).map_err(internal)?;
                }
                events.push(WatchEvent::Put(rec));
            }
            TxnOp::Delete { key } => {
                delete_key(&mut t.kv, &mut t.lease_keys, key, next, &mut events)?;
            }
            TxnOp::DeletePrefix { prefix } => {
                let keys = keys_under(&t.kv, prefix)?;
                for key in keys {
                    delete_key(&mut t.kv, &mut t.lease_keys, &key, next, &mut events)?;
                }
            }
        }
    }
    let revision = if events.is_empty() { current } else { next };
    if !events.is_empty() {
        t.meta.insert(REVISION, next).map_err(internal)?;
        for (i, ev) in events.iter().enumerate() {
            t.history.insert((next, i as u32), encode_event(ev).as_slice()).map_err(internal)?;
        }
        // Trim history now and then rather than on every commit.
        if next % 1024 == 0 {
            let keep_from = next - HISTORY_REVISIONS;
            if keep_from > 0 {
                t.history.retain_in((0, 0)..(keep_from, 0), |_, _| false).map_err(internal)?;
                t.meta.insert(COMPACTED, keep_from).map_err(internal)?;
            }
        }
    }
    Ok(Ok((succeeded, revision, events)))
}

fn keys_under(
    kv: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut keys = Vec::new();
    let iter = match prefix_end(prefix) {
        Some(end) => kv.range::<&[u8]>(prefix..end.as_slice()).map_err(internal)?,
        None => kv.range::<&[u8]>(prefix..).map_err(internal)?,
    };
    for row in iter {
        let (k, _) = row.map_err(internal)?;
        keys.push(k.value().to_vec());
    }
    Ok(keys)
}

fn delete_key(
    kv: &mut redb::Table<&'static [u8], &'static [u8]>,
    lease_keys: &mut redb::Table<(i64, &'static [u8]), ()>,
    key: &[u8],
    revision: i64,
    events: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    let old = match kv.remove(key).map_err(internal)? {
        Some(v) => decode_record(key, v.value())?,
        None => return Ok(()),
    };
    if old.lease != 0 {
        lease_keys.remove((old.lease, key)).map_err(internal)?;
    }
    events.push(WatchEvent::Delete(KeyValue {
        key: key.to_vec(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: revision,
        version: 0,
        lease: 0,
    }));
    Ok(())
}

#[async_trait]
impl KvStore for EmbeddedStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_vec();
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(internal)?;
            let kv = r.open_table(KV).map_err(internal)?;
            match kv.get(key.as_slice()).map_err(internal)? {
                Some(v) => Ok(Some(decode_record(&key, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn range(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let prefix = prefix.to_vec();
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(internal)?;
            let kv = r.open_table(KV).map_err(internal)?;
            let meta = r.open_table(META).map_err(internal)?;
            let revision = read_revision(&meta, REVISION)?;
            let iter = match prefix_end(&prefix) {
                Some(end) => kv.range::<&[u8]>(prefix.as_slice()..end.as_slice()).map_err(internal)?,
                None => kv.range::<&[u8]>(prefix.as_slice()..).map_err(internal)?,
            };
            let mut out = Vec::new();
            for row in iter {
                let (k, v) = row.map_err(internal)?;
                out.push(decode_record(k.value(), v.value())?);
            }
            Ok((out, revision))
        })
        .await
    }

    async fn range_page(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Page, StoreError> {
        let (prefix, start) = (prefix.to_vec(), page_start(prefix, after));
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(internal)?;
            let kv = r.open_table(KV).map_err(internal)?;
            let iter = match prefix_end(&prefix) {
                Some(end) => kv.range::<&[u8]>(start.as_slice()..end.as_slice()).map_err(internal)?,
                None => kv.range::<&[u8]>(start.as_slice()..).map_err(internal)?,
            };
            let mut kvs = Vec::new();
            let mut more = false;
            for row in iter {
                if kvs.len() == limit {
                    more = true;
                    break;
                }
                let (k, v) = row.map_err(internal)?;
                kvs.push(decode_record(k.value(), v.value())?);
            }
            Ok(Page { kvs, more })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let (succeeded, revision) = self.blocking(move |inner| inner.apply(txn)).await?;
        Ok(TxnResponse { succeeded, revision })
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        if ttl_secs <= 0 {
            return Err(StoreError::Invalid(format!("lease TTL must be positive, got {ttl_secs}")));
        }
        let id = self
            .blocking(move |inner| {
                let w = inner.db.begin_write().map_err(internal)?;
                let id = {
                    let mut meta = w.open_table(META).map_err(internal)?;
                    let id = read_revision(&meta, LEASE_SEQ)? + 1;
                    meta.insert(LEASE_SEQ, id).map_err(internal)?;
                    w.open_table(LEASES).map_err(internal)?.insert(id, ttl_secs).map_err(internal)?;
                    id
                };
                w.commit().map_err(internal)?;
                Ok(id)
            })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(ttl_secs as u64);
        self.inner.leases.lock().expect("lease map poisoned").insert(id, (ttl_secs, deadline));
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let mut leases = self.inner.leases.lock().expect("lease map poisoned");
        let entry = leases.get_mut(&lease).ok_or(StoreError::LeaseNotFound(lease))?;
        if entry.1 <= Instant::now() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        entry.1 = Instant::now() + Duration::from_secs(entry.0 as u64);
        Ok(entry.0)
    }

    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        let found = self
            .blocking(move |inner| {
                let _serial = inner.write_lock.lock().expect("write lock poisoned");
                let w = inner.db.begin_write().map_err(internal)?;
                let (found, events) = {
                    let mut leases = w.open_table(LEASES).map_err(internal)?;
                    if leases.remove(lease).map_err(internal)?.is_none() {
                        (false, Vec::new())
                    } else {
                        let mut lease_keys = w.open_table(LEASE_KEYS).map_err(internal)?;
                        let mut keys = Vec::new();
                        for row in lease_keys.range((lease, &[][..])..(lease + 1, &[][..])).map_err(internal)? {
                            let (k, _) = row.map_err(internal)?;
                            keys.push(k.value().1.to_vec());
                        }
                        let mut kv = w.open_table(KV).map_err(internal)?;
                        let mut meta = w.open_table(META).map_err(internal)?;
                        let next = read_revision(&meta, REVISION)? + 1;
                        let mut events = Vec::new();
                        for key in keys {
                            delete_key(&mut kv, &mut lease_keys, &key, next, &mut events)?;
                        }
                        if !events.is_empty() {
                            meta.insert(REVISION, next).map_err(internal)?;
                            let mut history = w.open_table(EVENTS).map_err(internal)?;
                            for (i, ev) in events.iter().enumerate() {
                                history.insert((next, i as u32), encode_event(ev).as_slice()).map_err(internal)?;
                            }
                        }
                        (true, events)
                    }
                };
                w.commit().map_err(internal)?;
                inner.publish(events);
                Ok(found)
            })
            .await?;
        self.inner.leases.lock().expect("lease map poisoned").remove(&lease);
        if found { Ok(()) } else { Err(StoreError::LeaseNotFound(lease)) }
    }

    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history so that nothing committed in between is missed;
        // duplicates are dropped by revision below.
        let mut live = self.inner.events.subscribe();
        let prefix = prefix.to_vec();
        let (history, current) = {
            let prefix = prefix.clone();
            self.blocking(move |inner| read_history(inner, &prefix, from_revision)).await?
        };
        let store = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut last = current;
            for ev in history {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = match live.recv().await {
                    Ok(batch) => batch,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live feed: catch up from the events table.
                        let p = prefix.clone();
                        match store.blocking(move |inner| read_history(inner, &p, last + 1)).await {
                            Ok((evs, cur)) => {
                                last = cur;
                                for ev in evs {
                                    if tx.send(Ok(ev)).await.is_err() {
                                        return;
                                    }
                                }
                                continue;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let batch_revision = batch.first().map_or(last, WatchEvent::revision);
                if batch_revision <= last {
                    continue;
                }
                for ev in batch {
                    if ev.key().starts_with(&prefix) && tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                last = batch_revision;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// Reads events under `prefix` from `from` (inclusive) and the current revision.
fn read_history(inner: &Inner, prefix: &[u8], from: i64) -> Result<(Vec<WatchEvent>, i64), StoreError> {
    let r = inner.db.begin_read().map_err(internal)?;
    let meta = r.open_table(META).map_err(internal)?;
    let current = read_revision(&meta, REVISION)?;
    if from <= 0 || from > current {
        return Ok((Vec::new(), current));
    }
    let compacted = read_revision(&meta, COMPACTED)?;
    if from < compacted {
        return Err(StoreError::Compacted { requested: from, oldest: compacted });
    }
    let history = r.open_table(EVENTS).map_err(internal)?;
    let mut out = Vec::new();
    for row in history.range((from, 0)..).map_err(internal)? {
        let (_, v) = row.map_err(internal)?;
        let ev = decode_event(v.value())?;
        if ev.key().starts_with(prefix) {
            out.push(ev);
        }
    }
    Ok((out, current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Prefixed;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_store_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&dir.path().join("drover.redb")).await.unwrap());
        let n = AtomicUsize::new(0);
        crate::conformance::run_all(|| {
            let prefix = format!("/case{}/", n.fetch_add(1, Ordering::SeqCst));
            let store = store.clone();
            async move { Arc::new(Prefixed::new(store, prefix)) as Arc<dyn KvStore> }
        })
        .await;
    }

    #[tokio::test]
    async fn writes_survive_reopen_with_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).await.unwrap();
            store.put(b"a", b"1").await.unwrap();
            store.put(b"a", b"2").await.unwrap()
        };
        // The expiry task holds only a weak reference, so the database closes here.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let store = EmbeddedStore::open(&path).await.unwrap();
        let kv = store.get(b"a").await.unwrap().unwrap();
        assert_eq!((kv.value.as_slice(), kv.mod_revision, kv.version), (&b"2"[..], rev, 2));
        assert!(store.put(b"b", b"x").await.unwrap() > rev, "revisions continue after reopen");
    }
}
