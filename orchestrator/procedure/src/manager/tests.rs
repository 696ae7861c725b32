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
    let token = CancellationToken::new();
    let config = ManagerConfig {
        owner_id: format!("o-{}", uuid::Uuid::now_v7()),
        lease_ttl: ttl,
        scan_interval: Duration::from_millis(100),
    };
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
