//! The engine against the embedded store: detached runs, locks, resume by another
//! manager at a higher epoch, cancel, children.

use async_trait::async_trait;
use drover_store::EmbeddedStore;
use serde::{Deserialize, Serialize};

use super::*;

/// Counts its steps; blocks at step `block_at` until the gate opens.
#[derive(Serialize, Deserialize)]
struct Counter {
    name: String,
    done: u32,
    total: u32,
    block_at: u32,
    #[serde(skip)]
    ran: Arc<Mutex<Vec<(u32, i64)>>>,
    #[serde(skip, default = "closed_gate")]
    gate: Arc<tokio::sync::Semaphore>,
}

fn closed_gate() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(0))
}

#[async_trait]
impl Procedure for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn summary(&self) -> String {
        format!("count to {}", self.total)
    }
    fn locks(&self) -> Vec<String> {
        vec![format!("counter/{}", self.name)]
    }
    fn step(&self) -> String {
        format!("step-{}", self.done + 1)
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        let step = self.done + 1;
        if step == self.block_at {
            self.gate.acquire().await.unwrap().forget();
        }
        self.ran.lock().unwrap().push((step, ctx.epoch));
        self.done = step;
        if self.done == self.total {
            Ok(Status::Done { output: serde_json::json!({ "counted": self.done }) })
        } else {
            Ok(Status::Executing { note: format!("counted {step}") })
        }
    }
}

struct Rig {
    ran: Arc<Mutex<Vec<(u32, i64)>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

fn manager(store: &Arc<dyn KvStore>, rig: &Rig, ttl: Duration) -> (Arc<Manager>, CancellationToken) {
    manager_scanning(store, rig, ttl, Duration::from_millis(100))
}

/// A manager whose timed recovery scan runs every `scan`.
fn manager_scanning(
    store: &Arc<dyn KvStore>,
    rig: &Rig,
    ttl: Duration,
    scan: Duration,
) -> (Arc<Manager>, CancellationToken) {
    let token = CancellationToken::new();
    let config = ManagerConfig { owner_id: format!("o-{}", uuid::Uuid::now_v7()), lease_ttl: ttl, scan_interval: scan };
    let m = Manager::new(store.clone(), config, token.clone());
    let (ran, gate) = (rig.ran.clone(), rig.gate.clone());
    m.register(
        "counter",
        Box::new(move |state| {
            let mut c: Counter = serde_json::from_value(state).map_err(|e| e.to_string())?;
            c.ran = ran.clone();
            c.gate = gate.clone();
            Ok(Box::new(c) as Box<dyn Procedure>)
        }),
    );
    m.start();
    (m, token)
}

fn counter(rig: &Rig, name: &str, total: u32, block_at: u32) -> Box<dyn Procedure> {
    Box::new(Counter { name: name.into(), done: 0, total, block_at, ran: rig.ran.clone(), gate: rig.gate.clone() })
}

async fn store(dir: &tempfile::TempDir) -> Arc<dyn KvStore> {
    Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap())
}

fn rig() -> Rig {
    Rig { ran: Arc::new(Mutex::new(Vec::new())), gate: Arc::new(tokio::sync::Semaphore::new(0)) }
}

#[tokio::test]
async fn a_submitted_procedure_runs_detached_to_its_end_and_releases_its_locks() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let id = m.submit(counter(&rig, "a", 3, 0)).await.unwrap();
    let rec = m.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Succeeded, "{rec:?}");
    assert_eq!(rec.output["counted"], 3);
    let names: Vec<&str> = rec.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["step-1", "step-2", "step-3"]);
    assert_eq!(rig.ran.lock().unwrap().len(), 3, "each step ran once");
    assert!(store.get(keys::lock("counter/a").as_bytes()).await.unwrap().is_none());
    assert!(store.get(keys::pending(&id).as_bytes()).await.unwrap().is_none());
    assert!(store.get(keys::owner(&id).as_bytes()).await.unwrap().is_none());
    // The lock is free again.
    let again = m.submit(counter(&rig, "a", 1, 0)).await.unwrap();
    assert_eq!(m.wait(&again, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
}

#[tokio::test]
async fn a_held_lock_refuses_a_second_procedure_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let first = m.submit(counter(&rig, "g", 2, 1)).await.unwrap();
    match m.submit(counter(&rig, "g", 1, 0)).await {
        Err(SubmitError::Locked { key, holder }) => {
            assert_eq!((key.as_str(), holder.as_str()), ("counter/g", first.as_str()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // By its choice, a submit may wait for the holder instead.
    let m2 = m.clone();
    let rig2 = Rig { ran: rig.ran.clone(), gate: rig.gate.clone() };
    let queued =
        tokio::spawn(async move { m2.submit_waiting(|| counter(&rig2, "g", 1, 0), Duration::from_secs(20)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "it waits while the holder runs");
    rig.gate.add_permits(1);
    assert_eq!(m.wait(&first, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    let second = queued.await.unwrap().expect("submitted once the lock was free");
    assert_eq!(m.wait(&second, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
}

#[tokio::test]
async fn a_dead_owners_execution_is_resumed_elsewhere_with_a_higher_epoch_and_no_step_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let ttl = Duration::from_secs(2);
    let (a, stop_a) = manager(&store, &rig, ttl);
    let (b, _stop_b) = manager(&store, &rig, ttl);
    let id = a.submit(counter(&rig, "r", 4, 3)).await.unwrap();
    // Wait until A is blocked in step 3 (steps 1 and 2 persisted).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.get(&id).await.unwrap().unwrap().steps.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "A never ran two steps");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let epoch_a = a.get(&id).await.unwrap().unwrap().epoch;
    // B leaves it alone while A's lease lives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.get(&id).await.unwrap().unwrap().owner, a.owner_id());
    // A dies: its tasks stop and its lease is no longer renewed.
    stop_a.cancel();
    rig.gate.add_permits(1);
    let rec = b.wait(&id, ttl + Duration::from_secs(8)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Succeeded, "{rec:?}");
    assert_eq!(rec.owner, b.owner_id());
    assert!(rec.epoch > epoch_a, "resumed at a higher epoch: {} vs {epoch_a}", rec.epoch);
    assert_eq!(rec.claims, 2);
    let ran = rig.ran.lock().unwrap().clone();
    let steps: Vec<u32> = ran.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [1, 2, 3, 4], "no step ran twice: {ran:?}");
    assert!(ran[2].1 > epoch_a && ran[3].1 > epoch_a, "B ran steps 3 and 4 under its epoch");
}

#[tokio::test]
async fn a_new_execution_is_its_submitters_even_while_another_member_scans() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (a, _stop_a) = manager(&store, &rig, Duration::from_secs(5));
    let (b, _stop_b) = manager(&store, &rig, Duration::from_secs(5));
    // B (and A's own recovery) scan as often as they can. Seen failing before the
    // fixes: a scan claimed a new execution between its being made pending and the
    // submitter's claim, a stale scan list let a member claim an ended execution (and
    // rewrite its record), and A's scan took A's own fresh claim for one whose task was
    // gone (claims 2).
    let scanning = tokio::spawn({
        let (a2, b) = (a.clone(), b.clone());
        async move {
            loop {
                b.wake.notify_one();
                a2.wake.notify_one();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(a.submit(counter(&rig, &format!("s{i}"), 1, 0)).await.unwrap());
    }
    for id in &ids {
        let rec = a.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(rec.status, ExecutionStatus::Succeeded, "{rec:?}");
        assert_eq!((rec.owner.as_str(), rec.claims), (a.owner_id(), 1), "{id} was claimed by another member");
    }
    scanning.abort();
    assert_eq!(rig.ran.lock().unwrap().len(), 30, "each ran once");
}

/// Starts three counters as children, then reports how many succeeded.
#[derive(Serialize, Deserialize)]
struct Parent {
    started: bool,
    #[serde(skip)]
    ran: Arc<Mutex<Vec<(u32, i64)>>>,
    #[serde(skip, default = "closed_gate")]
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Procedure for Parent {
    fn kind(&self) -> &'static str {
        "parent"
    }
    fn summary(&self) -> String {
        "three children".into()
    }
    fn locks(&self) -> Vec<String> {
        Vec::new()
    }
    fn step(&self) -> String {
        if self.started { "collect".into() } else { "start-children".into() }
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    async fn execute(&mut self, ctx: &Context) -> Result<Status, ProcedureError> {
        if !self.started {
            self.started = true;
            let procedures = (0..3)
                .map(|i| {
                    Box::new(Counter {
                        name: format!("child-{i}"),
                        done: 0,
                        total: 2,
                        block_at: 0,
                        ran: self.ran.clone(),
                        gate: self.gate.clone(),
                    }) as Box<dyn Procedure>
                })
                .collect();
            return Ok(Status::Children { procedures, note: "three counters".into() });
        }
        let ok = ctx.children.iter().filter(|c| c.status == ExecutionStatus::Succeeded).count();
        Ok(Status::Done { output: serde_json::json!({ "children": ctx.children.len(), "succeeded": ok }) })
    }
}

#[tokio::test]
async fn a_parent_waits_for_its_children_and_sees_their_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let (ran, gate) = (rig.ran.clone(), rig.gate.clone());
    m.register(
        "parent",
        Box::new(move |state| {
            let mut p: Parent = serde_json::from_value(state).map_err(|e| e.to_string())?;
            p.ran = ran.clone();
            p.gate = gate.clone();
            Ok(Box::new(p) as Box<dyn Procedure>)
        }),
    );
    // A child's lock is held by another execution: that child waits for it.
    let holder = m.submit(counter(&rig, "child-1", 1, 1)).await.unwrap();
    let id = m.submit(Box::new(Parent { started: false, ran: rig.ran.clone(), gate: rig.gate.clone() })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.get(&id).await.unwrap().unwrap().status, ExecutionStatus::Running, "waiting for child-1's lock");
    rig.gate.add_permits(1);
    let rec = m.wait(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Succeeded, "{rec:?}");
    assert_eq!(rec.output, serde_json::json!({ "children": 3, "succeeded": 3 }));
    assert_eq!(m.get(&holder).await.unwrap().unwrap().status, ExecutionStatus::Succeeded);
    let children: Vec<ExecutionRec> = m.list().await.unwrap().into_iter().filter(|e| e.parent == id).collect();
    assert_eq!(children.len(), 3);
    assert!(children.iter().all(|c| c.id.starts_with(&id)), "children ids derive from the parent's");
    // Submitted by the parent running here: they join its trace (known here, not read).
    assert_eq!(rec.trace_id.len(), 32);
    assert!(children.iter().all(|c| c.trace_id == rec.trace_id), "children share the parent's trace");
}

#[tokio::test]
async fn cancel_stops_at_the_next_step_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let id = m.submit(counter(&rig, "c", 5, 2)).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while m.get(&id).await.unwrap().unwrap().steps.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.cancel(&id).await.unwrap();
    rig.gate.add_permits(1);
    let rec = m.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Cancelled);
    assert_eq!(rec.steps.len(), 2, "the running step finished, no further one started");
    assert!(matches!(m.cancel(&id).await, Err(SubmitError::Ended { .. })));
    assert!(store.get(keys::lock("counter/c").as_bytes()).await.unwrap().is_none());
}

/// A store that refuses transactions etcd refuses by default (more than 128 comparisons,
/// or more than 128 operations in a branch), and counts reads of the pending index (one
/// per recovery scan).
struct EtcdLimits(Arc<dyn KvStore>, Arc<std::sync::atomic::AtomicUsize>);

impl EtcdLimits {
    fn over(inner: Arc<dyn KvStore>) -> Self {
        Self(inner, Default::default())
    }
}

#[async_trait]
impl KvStore for EtcdLimits {
    async fn get(&self, key: &[u8]) -> Result<Option<drover_store::KeyValue>, StoreError> {
        self.0.get(key).await
    }
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<drover_store::KeyValue>, i64), StoreError> {
        if prefix == keys::PENDING.as_bytes() {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.0.range(prefix).await
    }
    async fn range_page(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<drover_store::Page, StoreError> {
        self.0.range_page(prefix, after, limit).await
    }
    async fn txn(&self, txn: Txn) -> Result<drover_store::TxnResponse, StoreError> {
        if txn.compares.len() > 128 || txn.success.len() > 128 || txn.failure.len() > 128 {
            return Err(StoreError::Invalid("etcdserver: too many operations in txn request".into()));
        }
        let bytes: usize = txn
            .success
            .iter()
            .map(|op| match op {
                TxnOp::Put { value, .. } => value.len(),
                _ => 0,
            })
            .sum();
        if bytes > 1_572_864 {
            return Err(StoreError::Invalid("etcdserver: request is too large".into()));
        }
        self.0.txn(txn).await
    }
    async fn grant_lease(&self, ttl_secs: i64) -> Result<i64, StoreError> {
        self.0.grant_lease(ttl_secs).await
    }
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.0.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> Result<(), StoreError> {
        self.0.revoke_lease(lease).await
    }
    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<drover_store::WatchStream, StoreError> {
        self.0.watch(prefix, from_revision).await
    }
}

/// Holds many locks; ends when its gate opens.
#[derive(Serialize, Deserialize)]
struct Many {
    locks: Vec<String>,
    #[serde(skip, default = "closed_gate")]
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl Procedure for Many {
    fn kind(&self) -> &'static str {
        "many"
    }
    fn summary(&self) -> String {
        format!("hold {} locks", self.locks.len())
    }
    fn locks(&self) -> Vec<String> {
        self.locks.clone()
    }
    fn step(&self) -> String {
        "hold".into()
    }
    fn dump(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    async fn execute(&mut self, _ctx: &Context) -> Result<Status, ProcedureError> {
        self.gate.acquire().await.unwrap().forget();
        Ok(Status::Done { output: serde_json::Value::Null })
    }
}

async fn held(store: &Arc<dyn KvStore>) -> Vec<(String, String)> {
    let (kvs, _) = store.range(b"locks/").await.unwrap();
    kvs.into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), String::from_utf8_lossy(&kv.value).into_owned()))
        .collect()
}

#[tokio::test]
async fn more_locks_than_a_transaction_holds_are_taken_and_freed_in_several() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(EtcdLimits::over(store(&dir).await));
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    m.register(
        "many",
        Box::new(move |state| {
            let mut p: Many = serde_json::from_value(state).map_err(|e| e.to_string())?;
            p.gate = g.clone();
            Ok(Box::new(p) as Box<dyn Procedure>)
        }),
    );
    let many = |range: std::ops::Range<usize>| -> Box<dyn Procedure> {
        Box::new(Many { locks: range.map(|i| format!("group/g{i:04}")).collect(), gate: gate.clone() })
    };
    // 350 locks: four transactions' worth; all taken, by the one execution.
    let first = m.submit(many(0..350)).await.expect("submit with 350 locks");
    let locks = held(&store).await;
    assert_eq!(locks.len(), 350);
    assert!(locks.iter().all(|(_, holder)| *holder == first), "all held by {first}");
    // More than a record lists: the record names none and counts them; the list is kept
    // apart, in order.
    let rec = m.get(&first).await.unwrap().unwrap();
    assert_eq!((rec.locks.len(), rec.locks_apart), (0, 350));
    let listed = m.locks_of(&rec).await.unwrap();
    assert_eq!(listed, (0..350).map(|i| format!("group/g{i:04}")).collect::<Vec<_>>());
    let lists = || async { store.range(keys::APART.as_bytes()).await.unwrap().0 };
    // Another execution whose last lock is held: refused with the holder, and it leaves
    // no lock and no record behind.
    match m.submit(many(349..600)).await {
        Err(SubmitError::Locked { key, holder }) => {
            assert_eq!((key.as_str(), holder.as_str()), ("group/g0349", first.as_str()))
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(held(&store).await.len(), 350, "the refused one took nothing");
    let kept: Vec<String> = lists().await.iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect();
    assert_eq!(kept, [keys::lock_list(&first, 0)], "the refused one's lock list is gone");
    let (marks, _) = store.range(keys::ACQUIRING.as_bytes()).await.unwrap();
    assert!(marks.is_empty());
    // One that fits after the first 350 (several transactions too) runs alongside.
    let second = m.submit(many(350..700)).await.expect("disjoint locks");
    assert_eq!(held(&store).await.len(), 700);
    // One of the first's locks past the end's transaction changes hands meanwhile (as
    // after `lock_holder` freed it): its batch is freed a lock at a time, and that one
    // stays with its new holder.
    store.put(keys::lock("group/g0250").as_bytes(), b"someone-else").await.unwrap();
    // Both end; every lock of theirs is freed.
    gate.add_permits(2);
    for id in [&first, &second] {
        assert_eq!(m.wait(id, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while held(&store).await.len() > 1 {
        assert!(tokio::time::Instant::now() < deadline, "locks left: {}", held(&store).await.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(held(&store).await, [(keys::lock("group/g0250"), "someone-else".to_string())]);
}

#[tokio::test]
async fn locks_left_by_an_ended_holder_or_a_stalled_submit_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(EtcdLimits::over(store(&dir).await));
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    // An ended execution's lock (a crash fell between its end and freeing the rest).
    let done = m.submit(counter(&rig, "x", 1, 0)).await.unwrap();
    m.wait(&done, Duration::from_secs(10)).await.unwrap();
    store.put(keys::lock("counter/y").as_bytes(), done.as_bytes()).await.unwrap();
    assert_eq!(m.lock_holder("counter/y").await.unwrap(), None, "an ended holder holds nothing");
    assert!(store.get(keys::lock("counter/y").as_bytes()).await.unwrap().is_none(), "and the lock is gone");
    store.put(keys::lock("counter/y").as_bytes(), done.as_bytes()).await.unwrap();
    let y = m.submit(counter(&rig, "y", 1, 0)).await.expect("a stale lock does not refuse a submit");
    assert_eq!(m.wait(&y, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    // A submit that died while taking its locks, two minutes ago: the scan gives it up.
    let ghost = "ghost-exec";
    store.put(keys::acquiring(ghost).as_bytes(), (now_ms() - 120_000).to_string().as_bytes()).await.unwrap();
    store.put(keys::lock("counter/z").as_bytes(), ghost.as_bytes()).await.unwrap();
    let rec = serde_json::json!({
        "id": ghost, "kind": "counter", "summary": "", "status": "running", "state": null, "step": "",
        "steps": [], "locks": ["counter/z"], "created_ms": 0, "updated_ms": 0
    });
    store.put(keys::execution(ghost).as_bytes(), rec.to_string().as_bytes()).await.unwrap();
    assert_eq!(m.lock_holder("counter/z").await.unwrap().as_deref(), Some(ghost), "live while marked");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // Its record goes last, after the mark and its locks.
    while store.get(keys::execution(ghost).as_bytes()).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the stalled acquisition was not given up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.get(keys::lock("counter/z").as_bytes()).await.unwrap().is_none());
    assert!(store.get(keys::acquiring(ghost).as_bytes()).await.unwrap().is_none());
}

/// Its state grows past what the store takes once its first step ran (or, with
/// `output`, it ends at once with an output past it).
#[derive(Serialize, Deserialize)]
struct Grow {
    big: bool,
    #[serde(default)]
    output: bool,
}

#[async_trait]
impl Procedure for Grow {
    fn kind(&self) -> &'static str {
        "grow"
    }
    fn summary(&self) -> String {
        "grow".into()
    }
    fn locks(&self) -> Vec<String> {
        vec!["grow/one".into()]
    }
    fn step(&self) -> String {
        "grow".into()
    }
    fn dump(&self) -> serde_json::Value {
        if self.big {
            serde_json::json!({ "big": true, "pad": "x".repeat(2 << 20) })
        } else {
            serde_json::json!({ "big": false })
        }
    }
    async fn execute(&mut self, _ctx: &Context) -> Result<Status, ProcedureError> {
        if self.output {
            return Ok(Status::Done { output: serde_json::json!({ "pad": "y".repeat(2 << 20) }) });
        }
        self.big = true;
        Ok(Status::Executing { note: "grew".into() })
    }
}

#[tokio::test]
async fn a_record_the_store_refuses_ends_the_execution_instead_of_retrying_forever() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> = Arc::new(EtcdLimits::over(store(&dir).await));
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    m.register(
        "grow",
        Box::new(|state| {
            let big = state.get("big").and_then(|b| b.as_bool()).unwrap_or(false);
            Ok(Box::new(Grow { big, output: false }) as Box<dyn Procedure>)
        }),
    );
    let id = m.submit(Box::new(Grow { big: false, output: false })).await.unwrap();
    let rec = m.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Failed, "{rec:?}");
    assert!(
        rec.error.contains("the store refused this execution's record") && rec.error.contains("too large"),
        "{}",
        rec.error
    );
    assert!(store.get(keys::lock("grow/one").as_bytes()).await.unwrap().is_none(), "its lock is freed");
    assert!(store.get(keys::pending(&id).as_bytes()).await.unwrap().is_none(), "nothing resumes it");
    // An end whose output the store refuses: it ends once, without its output.
    let id = m.submit(Box::new(Grow { big: false, output: true })).await.unwrap();
    let rec = m.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Succeeded, "{}", rec.error);
    assert!(rec.output.is_null() && rec.error.contains("without its state and output"), "{}", rec.error);
    assert_eq!(rec.claims, 1, "ended by its first owner, not resumed");
    assert!(store.get(keys::pending(&id).as_bytes()).await.unwrap().is_none());
}

#[tokio::test]
async fn items_of_a_submit_that_never_wrote_its_record_are_swept_once_old() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    let two_hours_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 7200;
    let old = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, two_hours_ago, 0)).to_string();
    let fresh = uuid::Uuid::now_v7().to_string();
    let finished = m.submit(counter(&rig, "a", 1, 0)).await.unwrap();
    m.wait(&finished, Duration::from_secs(10)).await.unwrap();
    // Items under four ids: an old orphan, a fresh one, an execution with its record,
    // and an id whose age cannot be told.
    for id in [old.as_str(), fresh.as_str(), finished.as_str(), "not-a-uuid"] {
        for item in ["000/000000", "000/000001", "001/000000"] {
            store.put(format!("{}{item}", keys::apart(id)).as_bytes(), b"{}").await.unwrap();
        }
    }
    let items = |id: String| {
        let store = store.clone();
        async move { store.range(keys::apart(&id).as_bytes()).await.unwrap().0.len() }
    };
    assert_eq!(m.sweep_orphan_items(Duration::from_secs(3600)).await.unwrap(), 1, "only the old orphan");
    assert_eq!(items(old.clone()).await, 0);
    assert_eq!(items(fresh.clone()).await, 3, "a submit under an hour old may still write its record");
    // With no minimum age, the fresh orphan goes too; a recorded execution's items and
    // an ageless id's stay.
    assert_eq!(m.sweep_orphan_items(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(items(fresh).await, 0);
    assert_eq!(items(finished).await, 3);
    assert_eq!(items("not-a-uuid".into()).await, 3);
    assert_eq!(m.sweep_orphan_items(Duration::ZERO).await.unwrap(), 0, "nothing left to sweep");
}

/// Waits until `view` holds `key` (a request another member wrote).
async fn reaches(view: &super::signals::Watched, key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while view.is_set(key) != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "{key} never reached this member's view");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_cancel_and_a_pause_sent_to_another_member_reach_the_run_through_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (a, _stop_a) = manager(&store, &rig, Duration::from_secs(5));
    let (b, _stop_b) = manager(&store, &rig, Duration::from_secs(5));
    let wait_steps = |m: Arc<Manager>, id: String, n: usize| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while m.get(&id).await.unwrap().unwrap().steps.len() < n {
            assert!(tokio::time::Instant::now() < deadline, "{id} did not reach {n} steps");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Paused through b while its run on a waits at step 2: no step starts until b
    // resumes it.
    let id = a.submit(counter(&rig, "p", 3, 2)).await.unwrap();
    wait_steps(a.clone(), id.clone(), 1).await;
    b.pause(&id).await.unwrap();
    // a's own view (not a store read) holds the pause once the watch event lands.
    reaches(&a.pauses, &keys::pause(&id)).await;
    rig.gate.add_permits(1);
    wait_steps(a.clone(), id.clone(), 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rec = a.get(&id).await.unwrap().unwrap();
    assert_eq!((rec.steps.len(), rec.paused), (2, true), "paused after its running step: {rec:?}");
    b.resume(&id).await.unwrap();
    assert_eq!(a.wait(&id, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    assert_eq!(a.pauses.is_set(&keys::pause(&id)), Some(false), "the pause is gone from the view with its key");

    // Cancelled through b: the run on a stops at its next step boundary.
    let id = a.submit(counter(&rig, "c", 3, 2)).await.unwrap();
    wait_steps(a.clone(), id.clone(), 1).await;
    b.cancel(&id).await.unwrap();
    reaches(&a.cancels, &keys::cancel(&id)).await;
    rig.gate.add_permits(1);
    let rec = a.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Cancelled);
    assert_eq!(rec.steps.len(), 2, "the running step finished, no further one started");
}

/// An execution's end deletes its claim; the owners watch wakes a recovery scan for a
/// deleted claim, but not for the ends of the orchestrator that made them. A claim gone
/// with its owner's lease still wakes the other members at once, long before their
/// timed scan.
#[tokio::test]
async fn own_ends_wake_no_scan_and_a_lapsed_claim_wakes_one() {
    let dir = tempfile::tempdir().unwrap();
    let counting = EtcdLimits::over(store(&dir).await);
    let scans = counting.1.clone();
    let store: Arc<dyn KvStore> = Arc::new(counting);
    let rig = rig();
    let hour = Duration::from_secs(3600);
    let (a, stop_a) = manager_scanning(&store, &rig, Duration::from_secs(1), hour);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = scans.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..10 {
        let id = a.submit(counter(&rig, &format!("e{i}"), 1, 0)).await.unwrap();
        assert_eq!(a.wait(&id, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(scans.load(std::sync::atomic::Ordering::SeqCst), before, "ten ends here woke recovery scans");

    // a holds an execution at its first step and stops renewing its lease; b, whose timed
    // scan is an hour away, resumes it once the claim lapses.
    let (b, _stop_b) = manager_scanning(&store, &rig, Duration::from_secs(1), hour);
    let id = a.submit(counter(&rig, "lapsed", 2, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_a.cancel();
    rig.gate.add_permits(1);
    let rec = b.wait(&id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(rec.status, ExecutionStatus::Succeeded, "{rec:?}");
    assert!(rec.claims >= 2, "b resumed it: {rec:?}");
}

#[tokio::test]
async fn the_end_writes_hook_is_stored_in_the_end_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir).await;
    let rig = rig();
    let (m, _stop) = manager(&store, &rig, Duration::from_secs(5));
    m.on_end_writes(Arc::new(|rec: &ExecutionRec| {
        vec![TxnOp::put(format!("marks/{}", rec.id), rec.status.as_str().as_bytes().to_vec())]
    }));
    let id = m.submit(counter(&rig, "w", 2, 0)).await.unwrap();
    assert_eq!(m.wait(&id, Duration::from_secs(10)).await.unwrap().status, ExecutionStatus::Succeeded);
    let mark = store.get(format!("marks/{id}").as_bytes()).await.unwrap().expect("the hook's write is stored");
    assert_eq!(mark.value, b"succeeded");
    let record = store.get(keys::execution(&id).as_bytes()).await.unwrap().unwrap();
    assert_eq!(mark.mod_revision, record.mod_revision, "written by the transaction that ended the execution");
}
