//! The procedure framework against its contract: crash at every persist (before and
//! after the write) on the forward, rollback and parent/child paths; locks; retries;
//! poisoned records; pause; TTL.

// Tests throughout: a panic is how they report.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use procedure::{
    BoxedProcedure, Context, Error, ManagerConfig, MemoryStateStore, Procedure, ProcedureManager,
    ProcedureState, ProcedureWithId, Result, StateStore, Status,
};
use serde::{Deserialize, Serialize};

const DEADLINE: Duration = Duration::from_secs(20);

/// Probes until `probe` answers `Ok`, failing the test with its last `Err` (what is
/// still missing) after [`DEADLINE`]: the one place these tests wait on a condition.
async fn wait_until<F, Fut>(mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        match probe().await {
            Ok(()) => return,
            Err(why) => assert!(
                std::time::Instant::now() < until,
                "not within {DEADLINE:?}: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a crashing put writes before it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    BeforeWrite,
    AfterWrite,
}

/// A store that dies at its n-th put: that put and everything after fail.
struct CrashingStore {
    inner: Arc<MemoryStateStore>,
    puts_left: AtomicI64,
    mode: Crash,
    /// Becomes true at the crash (a watch, so tests await it instead of polling).
    crashed: tokio::sync::watch::Sender<bool>,
    puts: AtomicUsize,
}

impl CrashingStore {
    fn new(inner: Arc<MemoryStateStore>, crash_at: i64, mode: Crash) -> Self {
        CrashingStore {
            inner,
            puts_left: AtomicI64::new(crash_at),
            mode,
            crashed: tokio::sync::watch::Sender::new(false),
            puts: AtomicUsize::new(0),
        }
    }

    fn dead(key: &str) -> Error {
        Error::Store {
            key: key.to_string(),
            message: "crashed".to_string(),
            retryable: false,
        }
    }
}

#[async_trait]
impl StateStore for CrashingStore {
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        if *self.crashed.borrow() {
            return Err(Self::dead(key));
        }
        self.puts.fetch_add(1, Ordering::SeqCst);
        if self.puts_left.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.crashed.send_replace(true);
            if self.mode == Crash::AfterWrite {
                self.inner.put(key, value).await?;
            }
            return Err(Self::dead(key));
        }
        self.inner.put(key, value).await
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if *self.crashed.borrow() {
            return Err(Self::dead(key));
        }
        self.inner.get(key).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        if *self.crashed.borrow() {
            return Err(Self::dead(key));
        }
        self.inner.delete(key).await
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        if *self.crashed.borrow() {
            return Err(Self::dead(prefix));
        }
        self.inner.scan_prefix(prefix).await
    }
}

/// Effects recorded by steps: each step does a compare-and-put (insert if absent), so a
/// re-run step does not apply twice; `runs` counts executions.
#[derive(Default)]
struct World {
    effects: Mutex<HashMap<String, u32>>,
    runs: Mutex<HashMap<String, u32>>,
}

impl World {
    fn effect_once(&self, key: &str) {
        *self
            .runs
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        self.effects
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_insert(1);
    }

    fn undo(&self, key: &str) {
        self.effects.lock().unwrap().remove(key);
    }

    fn effects(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.effects.lock().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }
}

/// K steps with one effect each; optionally fails for good at step `fail_at` (and
/// rolls back its effects), optionally suspends on two children at step 1.
#[derive(Serialize, Deserialize, Clone)]
struct Steps {
    name: String,
    k: u32,
    next: u32,
    fail_at: Option<u32>,
    children: bool,
    #[serde(skip)]
    world: Option<Arc<World>>,
}

const STEPS: &str = "test.Steps";

#[async_trait]
impl Procedure for Steps {
    fn type_name(&self) -> &str {
        STEPS
    }

    async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
        let world = self.world.clone().expect("world attached by the loader");
        if self.fail_at == Some(self.next) {
            return Err(Error::external(format!("step {} refuses", self.next)));
        }
        if self.next == self.k {
            return Ok(Status::Done {
                output: Some(format!("{} done", self.name)),
            });
        }
        world.effect_once(&format!("{}/{}", self.name, self.next));
        self.next += 1;
        if self.children && self.next == 1 {
            let child = |n: &str| ProcedureWithId {
                id: format!("{}-{n}", self.name),
                procedure: Box::new(Steps {
                    name: format!("{}-{n}", self.name),
                    k: 2,
                    next: 0,
                    fail_at: None,
                    children: false,
                    world: Some(world.clone()),
                }),
            };
            return Ok(Status::Suspended {
                subprocedures: vec![child("a"), child("b")],
                persist: true,
            });
        }
        Ok(Status::Executing { persist: true })
    }

    fn dump(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::external(e.to_string()))
    }

    fn rollback_supported(&self) -> bool {
        true
    }

    async fn rollback(&mut self, _ctx: &Context) -> Result<()> {
        let world = self.world.clone().expect("world attached by the loader");
        for step in 0..self.next {
            world.undo(&format!("{}/{}", self.name, step));
        }
        Ok(())
    }
}

fn manager(
    store: Arc<dyn StateStore>,
    world: &Arc<World>,
    config: ManagerConfig,
) -> ProcedureManager {
    let manager = ProcedureManager::new(store, config);
    let world = world.clone();
    manager
        .register_loader(
            STEPS,
            Box::new(move |data: &str| {
                let mut steps: Steps =
                    serde_json::from_str(data).map_err(|e| Error::external(e.to_string()))?;
                steps.world = Some(world.clone());
                Ok(Box::new(steps) as BoxedProcedure)
            }),
        )
        .unwrap();
    manager
}

fn fast() -> ManagerConfig {
    ManagerConfig {
        max_retries: 3,
        retry_delay: Duration::from_millis(1),
        max_retry_delay: Duration::from_millis(5),
        ..ManagerConfig::default()
    }
}

fn steps(
    name: &str,
    k: u32,
    fail_at: Option<u32>,
    children: bool,
    world: &Arc<World>,
) -> ProcedureWithId {
    ProcedureWithId {
        id: name.to_string(),
        procedure: Box::new(Steps {
            name: name.to_string(),
            k,
            next: 0,
            fail_at,
            children,
            world: Some(world.clone()),
        }),
    }
}

/// Submits `procedure` (which must be accepted) and waits, with a deadline, for how it
/// ends.
async fn finish(m: &ProcedureManager, procedure: ProcedureWithId) -> Result<Option<String>> {
    let watcher = m.submit(procedure).await.expect("submitted");
    tokio::time::timeout(DEADLINE, watcher.wait())
        .await
        .expect("the procedure finished in time")
}

/// Waits (with a deadline) until the store has crashed.
async fn crashed(store: &CrashingStore) {
    let mut crashed = store.crashed.subscribe();
    tokio::time::timeout(DEADLINE, crashed.wait_for(|c| *c))
        .await
        .expect("the store crashed in time")
        .expect("the store is alive while the test runs");
}

/// Runs `make` once without a crash to count the puts, then once per (put, mode) with
/// a crash there, recovers with a fresh manager and checks `verify`.
async fn crash_at_every_put(
    make: impl Fn(&Arc<World>) -> ProcedureWithId,
    max_reruns: u32,
    verify: impl Fn(&World, ProcedureState, Option<String>),
) {
    let clean_store = Arc::new(CrashingStore::new(
        Arc::new(MemoryStateStore::default()),
        i64::MAX,
        Crash::BeforeWrite,
    ));
    let world = Arc::new(World::default());
    let m = manager(clean_store.clone(), &world, fast());
    m.start().await.unwrap();
    let id = make(&world).id.clone();
    let out = finish(&m, make(&world)).await;
    let state = if out.is_ok() {
        ProcedureState::Done
    } else {
        ProcedureState::Failed
    };
    verify(&world, state, out.ok().flatten());
    let total = clean_store.puts.load(Ordering::SeqCst) as i64;
    assert!(total >= 3, "a run persists several times: {total}");

    for crash_at in 1..=total {
        for mode in [Crash::BeforeWrite, Crash::AfterWrite] {
            let memory = Arc::new(MemoryStateStore::default());
            let world = Arc::new(World::default());
            let store = Arc::new(CrashingStore::new(memory.clone(), crash_at, mode));
            let first = manager(store.clone(), &world, fast());
            first.start().await.unwrap();
            let submitted = first.submit(make(&world)).await;
            if let Ok(watcher) = submitted {
                // Runs until the store dies (or to the end when the crash is the last put).
                tokio::select! {
                    _ = watcher.wait() => {}
                    () = crashed(&store) => {}
                }
            }
            assert!(
                *store.crashed.borrow(),
                "crash {crash_at} {mode:?} happened"
            );
            first.stop();

            tracing::info!("--- a new manager recovers after crash {crash_at} ({mode:?})");
            let second = manager(memory.clone(), &world, fast());
            second.start().await.unwrap();
            let record = second.state(&id).await.unwrap();
            let Some(record) = record else {
                // The very first save never happened: nothing to recover, nothing done.
                assert_eq!((crash_at, mode), (1, Crash::BeforeWrite));
                assert!(world.effects().is_empty());
                continue;
            };
            let (state, output) = if record.state.is_finished() {
                (record.state, record.output)
            } else {
                let out = tokio::time::timeout(DEADLINE, second.watch(&id).unwrap().wait())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("crash {crash_at} {mode:?}: recovery finished in time")
                    });
                let state = if out.is_ok() {
                    ProcedureState::Done
                } else {
                    ProcedureState::Failed
                };
                (state, out.ok().flatten())
            };
            verify(&world, state, output);
            // Only steps that ran but were not yet saved at the crash run again: at most
            // one per procedure that was running then.
            let runs = world.runs.lock().unwrap();
            let reruns: u32 = runs.values().map(|r| r - 1).sum();
            assert!(
                reruns <= max_reruns,
                "crash {crash_at} {mode:?}: {reruns} re-runs: {runs:?}"
            );
            second.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_path_survives_a_crash_at_every_persist() {
    crash_at_every_put(
        |w| steps("fwd", 4, None, false, w),
        1,
        |world, state, output| {
            assert_eq!(state, ProcedureState::Done);
            assert_eq!(output.as_deref(), Some("fwd done"));
            assert_eq!(world.effects(), ["fwd/0", "fwd/1", "fwd/2", "fwd/3"]);
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_path_survives_a_crash_at_every_persist() {
    crash_at_every_put(
        |w| steps("rb", 5, Some(3), false, w),
        1,
        |world, state, _| {
            assert_eq!(state, ProcedureState::Failed);
            assert!(
                world.effects().is_empty(),
                "rolled back: {:?}",
                world.effects()
            );
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_and_children_survive_a_crash_at_every_persist() {
    crash_at_every_put(
        |w| steps("par", 3, None, true, w),
        2,
        |world, state, _| {
            assert_eq!(state, ProcedureState::Done);
            assert_eq!(
                world.effects(),
                [
                    "par-a/0", "par-a/1", "par-b/0", "par-b/1", "par/0", "par/1", "par/2"
                ]
            );
        },
    )
    .await;
}

struct Flaky {
    failures: u32,
    attempts: Arc<AtomicU32>,
}

#[async_trait]
impl Procedure for Flaky {
    fn type_name(&self) -> &str {
        "test.Flaky"
    }

    async fn execute(&mut self, ctx: &Context) -> Result<Status> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if ctx.attempt < self.failures {
            return Err(Error::retry_later(format!("not yet ({})", ctx.attempt)));
        }
        Ok(Status::Done {
            output: Some(ctx.attempt.to_string()),
        })
    }

    fn dump(&self) -> Result<String> {
        Ok(String::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded() {
    let m = ProcedureManager::new(Arc::new(MemoryStateStore::default()), fast());
    m.start().await.unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let ok = m
        .submit(ProcedureWithId {
            id: "f1".into(),
            procedure: Box::new(Flaky {
                failures: 3,
                attempts: attempts.clone(),
            }),
        })
        .await
        .unwrap();
    assert_eq!(
        ok.wait().await.unwrap().as_deref(),
        Some("3"),
        "succeeds on the 4th try"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 4);

    let attempts = Arc::new(AtomicU32::new(0));
    let never = m
        .submit(ProcedureWithId {
            id: "f2".into(),
            procedure: Box::new(Flaky {
                failures: 100,
                attempts: attempts.clone(),
            }),
        })
        .await
        .unwrap();
    let err = never.wait().await.unwrap_err();
    assert!(err.to_string().contains("not yet (3)"), "{err}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "1 try + max_retries (3)"
    );
    assert_eq!(
        m.state("f2").await.unwrap().unwrap().state,
        ProcedureState::Failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_record_is_reported_and_others_recover() {
    let memory = Arc::new(MemoryStateStore::default());
    let world = Arc::new(World::default());
    {
        // A run that crashes right after its first step's save leaves one unfinished.
        let store = Arc::new(CrashingStore::new(memory.clone(), 2, Crash::AfterWrite));
        let m = manager(store.clone(), &world, fast());
        m.start().await.unwrap();
        let w = m
            .submit(steps("good", 3, None, false, &world))
            .await
            .unwrap();
        tokio::select! {
            _ = w.wait() => {}
            () = crashed(&store) => {}
        }
        m.stop();
    }
    // And a record of a type nobody can load.
    let poisoned = r#"{"id":"bad","type_name":"gone.Type","state":"running","step":1,"data":"?","created_ms":1,"updated_ms":1}"#;
    memory
        .put("procedure/bad", poisoned.as_bytes().to_vec())
        .await
        .unwrap();

    let m = manager(memory.clone(), &world, fast());
    m.start().await.unwrap();
    let bad = m.state("bad").await.unwrap().unwrap();
    assert_eq!(bad.state, ProcedureState::Failed);
    assert!(
        bad.error
            .as_deref()
            .unwrap()
            .contains("no loader is registered for type \"gone.Type\""),
        "{bad:?}"
    );
    let good = tokio::time::timeout(DEADLINE, m.watch("good").unwrap().wait())
        .await
        .unwrap();
    assert_eq!(good.unwrap().as_deref(), Some("good done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_steps_and_finished_records_expire() {
    let world = Arc::new(World::default());
    let m = manager(
        Arc::new(MemoryStateStore::default()),
        &world,
        ManagerConfig {
            finished_ttl: Duration::from_millis(100),
            ..fast()
        },
    );
    m.start().await.unwrap();
    m.pause();
    let w = m.submit(steps("p", 2, None, false, &world)).await.unwrap();
    // Bounded check of an absence: nothing runs while paused.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), m.watch("p").unwrap().wait())
            .await
            .is_err()
    );
    assert!(world.effects().is_empty());
    m.resume();
    tokio::time::timeout(DEADLINE, w.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(world.effects().len(), 2);
    // Removed after the TTL.
    wait_until(|| async {
        match m.state("p").await.unwrap() {
            None => Ok(()),
            Some(_) => Err("finished record not removed".to_string()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_ids_are_refused() {
    let world = Arc::new(World::default());
    let m = manager(Arc::new(MemoryStateStore::default()), &world, fast());
    m.start().await.unwrap();
    finish(&m, steps("d", 1, None, false, &world))
        .await
        .unwrap();
    let err = m
        .submit(steps("d", 1, None, false, &world))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Duplicate(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_id_already_taken_fails_the_parent() {
    let world = Arc::new(World::default());
    let m = manager(Arc::new(MemoryStateStore::default()), &world, fast());
    m.start().await.unwrap();
    // Parent "fam" suspends on children fam-a and fam-b, but a procedure fam-a exists
    // already: the suspension is refused and the parent fails (and rolls back).
    finish(&m, steps("fam-a", 1, None, false, &world))
        .await
        .unwrap();
    let err = finish(&m, steps("fam", 3, None, true, &world))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // The parent rolled back its own first step; the sibling never started.
    assert!(
        !world
            .effects()
            .iter()
            .any(|e| e.starts_with("fam/") || e.starts_with("fam-b")),
        "{:?}",
        world.effects()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_watchers_and_refuses_new_work() {
    let world = Arc::new(World::default());
    let m = manager(Arc::new(MemoryStateStore::default()), &world, fast());
    m.start().await.unwrap();
    m.pause();
    let w = m
        .submit(steps("held", 2, None, false, &world))
        .await
        .unwrap();
    m.shutdown().await;
    let err = tokio::time::timeout(DEADLINE, w.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::Stopped), "{err}");
    let err = m
        .submit(steps("late", 1, None, false, &world))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Stopped), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_of_one_id_run_once() {
    let world = Arc::new(World::default());
    let m = manager(Arc::new(MemoryStateStore::default()), &world, fast());
    m.start().await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (m, world) = (m.clone(), world.clone());
        tasks.push(tokio::spawn(async move {
            m.submit(steps("once", 2, None, false, &world))
                .await
                .map(|w| w.id().to_string())
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(e) => assert!(matches!(e, Error::Duplicate(_)), "{e}"),
        }
    }
    assert_eq!(accepted, 1);
    tokio::time::timeout(DEADLINE, m.watch("once").unwrap().wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        world.runs.lock().unwrap().values().all(|r| *r == 1),
        "{:?}",
        world.runs.lock().unwrap()
    );
}

mod locks;
mod persist;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_procedure_paused_by_hand_waits_across_recovery_until_resumed() {
    let world = Arc::new(World::default());
    let store = Arc::new(MemoryStateStore::default());
    let m = manager(store.clone(), &world, fast());
    m.start().await.unwrap();
    // Hold everything while "held" is paused by hand, so no step of it runs first.
    m.pause();
    let held = m
        .submit(steps("held", 2, None, false, &world))
        .await
        .unwrap();
    let other = m
        .submit(steps("other", 1, None, false, &world))
        .await
        .unwrap();
    m.pause_one("held").await.unwrap();
    assert!(m.is_paused("held") && !m.is_paused("other"));
    m.resume();
    tokio::time::timeout(DEADLINE, other.wait())
        .await
        .unwrap()
        .unwrap();
    // Bounded check of an absence: the paused one does not move.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), held.wait())
            .await
            .is_err()
    );
    assert_eq!(world.effects().len(), 1, "only other's step ran");
    // Unknown and finished procedures cannot be paused.
    assert!(matches!(m.pause_one("nope").await, Err(Error::NotFound(_))));
    assert!(m.pause_one("other").await.is_err());

    // A new manager (a new leader) recovers it still paused.
    m.shutdown().await;
    let m2 = manager(store, &world, fast());
    m2.start().await.unwrap();
    assert!(m2.is_paused("held"));
    let recovered = m2.watch("held").unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), m2.watch("held").unwrap().wait())
            .await
            .is_err()
    );
    m2.resume_one("held").await.unwrap();
    assert!(!m2.is_paused("held"));
    tokio::time::timeout(DEADLINE, recovered.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(world.effects().len(), 3, "held's two steps ran once each");
}
