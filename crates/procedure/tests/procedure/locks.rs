//! Locks: exclusive and shared keys, subprocedures within their ancestors' locks, locks
//! freed when a step panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use procedure::{
    Context, LockKey, ManagerConfig, MemoryStateStore, Procedure, ProcedureManager, ProcedureState,
    ProcedureWithId, Result, Status,
};

use crate::*;

/// Tracks how many procedures are inside a step at once.
pub(crate) struct Critical {
    pub(crate) inside: AtomicU32,
    pub(crate) max_inside: AtomicU32,
}

pub(crate) struct Locked {
    pub(crate) lock: LockKey,
    pub(crate) critical: Arc<Critical>,
    pub(crate) barrier: Option<Arc<tokio::sync::Barrier>>,
}

#[async_trait]
impl Procedure for Locked {
    fn type_name(&self) -> &str {
        "test.Locked"
    }

    async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
        let now = self.critical.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.critical.max_inside.fetch_max(now, Ordering::SeqCst);
        if let Some(barrier) = &self.barrier {
            barrier.wait().await;
        }
        tokio::task::yield_now().await;
        self.critical.inside.fetch_sub(1, Ordering::SeqCst);
        Ok(Status::Done { output: None })
    }

    fn dump(&self) -> Result<String> {
        Ok(String::new())
    }

    fn lock_key(&self) -> LockKey {
        self.lock.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_locks_serialize_and_shared_locks_run_together() {
    let m = ProcedureManager::new(Arc::new(MemoryStateStore::default()), fast());
    m.start().await.unwrap();
    let critical = Arc::new(Critical {
        inside: AtomicU32::new(0),
        max_inside: AtomicU32::new(0),
    });
    let mut watchers = Vec::new();
    for i in 0..20 {
        let procedure = Locked {
            lock: LockKey::exclusive("table/1"),
            critical: critical.clone(),
            barrier: None,
        };
        watchers.push(
            m.submit(ProcedureWithId {
                id: format!("x{i}"),
                procedure: Box::new(procedure),
            })
            .await
            .unwrap(),
        );
    }
    for w in watchers {
        tokio::time::timeout(DEADLINE, w.wait())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        critical.max_inside.load(Ordering::SeqCst),
        1,
        "exclusive holders never overlap"
    );

    // Two shared holders must be inside at the same time to pass the barrier.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let mut watchers = Vec::new();
    for i in 0..2 {
        let procedure = Locked {
            lock: LockKey::shared("table/1"),
            critical: critical.clone(),
            barrier: Some(barrier.clone()),
        };
        watchers.push(
            m.submit(ProcedureWithId {
                id: format!("s{i}"),
                procedure: Box::new(procedure),
            })
            .await
            .unwrap(),
        );
    }
    for w in watchers {
        tokio::time::timeout(DEADLINE, w.wait())
            .await
            .expect("shared holders ran together")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_submissions_all_finish() {
    let world = Arc::new(World::default());
    let m = manager(
        Arc::new(MemoryStateStore::default()),
        &world,
        ManagerConfig {
            max_running: 64,
            ..fast()
        },
    );
    m.start().await.unwrap();
    let mut watchers = Vec::new();
    for i in 0..1000 {
        watchers.push(
            m.submit(steps(&format!("c{i:04}"), 2, None, false, &world))
                .await
                .unwrap(),
        );
    }
    for w in watchers {
        tokio::time::timeout(DEADLINE, w.wait())
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(world.effects().len(), 2000);
    let listed = m.list().await.unwrap();
    assert_eq!(listed.len(), 1000);
    assert!(listed.iter().all(|r| r.state == ProcedureState::Done));
}

/// Fails retryably `failures` times, then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_locks_within_its_parents_locks_and_no_other_key() {
    struct Parent {
        child_key: &'static str,
        suspended: bool,
    }
    struct Child(&'static str);
    #[async_trait]
    impl Procedure for Parent {
        fn type_name(&self) -> &str {
            "test.Parent"
        }
        async fn execute(&mut self, ctx: &Context) -> Result<Status> {
            if self.suspended {
                return Ok(Status::Done { output: None });
            }
            self.suspended = true;
            Ok(Status::Suspended {
                subprocedures: vec![ProcedureWithId {
                    id: format!("{}-child", ctx.procedure_id),
                    procedure: Box::new(Child(self.child_key)),
                }],
                persist: true,
            })
        }
        fn dump(&self) -> Result<String> {
            Ok(String::new())
        }
        fn lock_key(&self) -> LockKey {
            LockKey::exclusive("table/7")
        }
    }
    #[async_trait]
    impl Procedure for Child {
        fn type_name(&self) -> &str {
            "test.Child"
        }
        async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
            Ok(Status::Done { output: None })
        }
        fn dump(&self) -> Result<String> {
            Ok(String::new())
        }
        fn lock_key(&self) -> LockKey {
            LockKey::exclusive(self.0)
        }
    }
    let m = ProcedureManager::new(Arc::new(MemoryStateStore::default()), fast());
    m.start().await.unwrap();
    let run = |id: &str, child_key| {
        m.submit(ProcedureWithId {
            id: id.into(),
            procedure: Box::new(Parent {
                child_key,
                suspended: false,
            }),
        })
    };
    // The parent holds table/7 exclusively: its child may take it too.
    let w = run("within", "table/7").await.unwrap();
    tokio::time::timeout(DEADLINE, w.wait())
        .await
        .expect("no deadlock")
        .unwrap();
    // A key the parent does not hold could wait for another root: refused at once.
    let w = run("outside", "region/9").await.unwrap();
    let err = tokio::time::timeout(DEADLINE, w.wait())
        .await
        .expect("no deadlock")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("which none of its ancestors holds"),
        "{err}"
    );
}
struct Panics;

#[async_trait]
impl Procedure for Panics {
    fn type_name(&self) -> &str {
        "test.Panics"
    }
    async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
        panic!("boom");
    }
    fn dump(&self) -> Result<String> {
        Ok(String::new())
    }
    fn lock_key(&self) -> LockKey {
        LockKey::exclusive("shared/key")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_fails_its_procedure_and_frees_its_locks() {
    let m = ProcedureManager::new(Arc::new(MemoryStateStore::default()), fast());
    m.start().await.unwrap();
    let w = m
        .submit(ProcedureWithId {
            id: "panics".into(),
            procedure: Box::new(Panics),
        })
        .await
        .unwrap();
    let err = tokio::time::timeout(DEADLINE, w.wait())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("a step panicked: boom"), "{err}");
    let critical = Arc::new(Critical {
        inside: AtomicU32::new(0),
        max_inside: AtomicU32::new(0),
    });
    let next = Locked {
        lock: LockKey::exclusive("shared/key"),
        critical,
        barrier: None,
    };
    let w = m
        .submit(ProcedureWithId {
            id: "after".into(),
            procedure: Box::new(next),
        })
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, w.wait())
        .await
        .expect("the lock was released")
        .unwrap();
}

/// Appends its name to a shared log, after waiting for `gate` if it has one.
struct Ordered {
    name: String,
    log: Arc<std::sync::Mutex<Vec<String>>>,
    gate: Option<Arc<tokio::sync::Notify>>,
}

#[async_trait]
impl Procedure for Ordered {
    fn type_name(&self) -> &str {
        "test.Ordered"
    }

    async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        // Give a competitor every chance to run first.
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        self.log.lock().unwrap().push(self.name.clone());
        Ok(Status::Done { output: None })
    }

    fn dump(&self) -> Result<String> {
        Ok(self.name.clone())
    }

    fn lock_key(&self) -> LockKey {
        LockKey::exclusive("table/t")
    }
}

/// Registers the loader of `Ordered`, logging to `log`.
fn register_ordered(manager: &ProcedureManager, log: &Arc<std::sync::Mutex<Vec<String>>>) {
    let log = log.clone();
    manager
        .register_loader(
            "test.Ordered",
            Box::new(move |name| {
                Ok(Box::new(Ordered {
                    name: name.to_string(),
                    log: log.clone(),
                    gate: None,
                }) as procedure::BoxedProcedure)
            }),
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_procedures_hold_their_locks_before_anything_new_runs() {
    let store = Arc::new(MemoryStateStore::default());
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    // A procedure cut short: saved, then its manager stops before it finishes.
    let first = ProcedureManager::new(store.clone(), fast());
    first.start().await.unwrap();
    first
        .submit(ProcedureWithId {
            id: "cut-short".into(),
            procedure: Box::new(Ordered {
                name: "recovered".into(),
                log: log.clone(),
                gate: Some(Arc::new(tokio::sync::Notify::new())),
            }),
        })
        .await
        .unwrap();
    first.shutdown().await;

    let second = ProcedureManager::new(store.clone(), fast());
    register_ordered(&second, &log);
    second.start().await.unwrap();
    // Submitted the moment the manager is up, on the same key.
    let newer = second
        .submit(ProcedureWithId {
            id: "newer".into(),
            procedure: Box::new(Ordered {
                name: "new".into(),
                log: log.clone(),
                gate: None,
            }),
        })
        .await
        .unwrap();
    newer.wait().await.unwrap();
    wait_until(|| {
        let done = log.lock().unwrap().len() == 2;
        async move {
            done.then_some(())
                .ok_or("the recovered procedure did not finish".to_string())
        }
    })
    .await;
    assert_eq!(*log.lock().unwrap(), ["recovered", "new"]);
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_procedure_nothing_runs_is_run_when_submitted_again() {
    let store = Arc::new(MemoryStateStore::default());
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    // This manager starts first, so its recovery does not see the record below.
    let running = ProcedureManager::new(store.clone(), fast());
    register_ordered(&running, &log);
    running.start().await.unwrap();
    // A record saved with no runner: its submitter's manager stopped at once (as
    // when the save's answer was lost and the caller was told it failed).
    let other = ProcedureManager::new(store.clone(), fast());
    other.start().await.unwrap();
    other
        .submit(ProcedureWithId {
            id: "orphan".into(),
            procedure: Box::new(Ordered {
                name: "orphan".into(),
                log: log.clone(),
                gate: Some(Arc::new(tokio::sync::Notify::new())),
            }),
        })
        .await
        .unwrap();
    other.shutdown().await;
    assert!(running.watch("orphan").is_none());

    // Submitted again (a retry of the same request): run from its record.
    let watcher = running
        .submit(ProcedureWithId {
            id: "orphan".into(),
            procedure: Box::new(Ordered {
                name: "ignored".into(),
                log: log.clone(),
                gate: None,
            }),
        })
        .await
        .unwrap();
    watcher.wait().await.unwrap();
    assert_eq!(*log.lock().unwrap(), ["orphan"]);
    // Once finished, the id is a duplicate.
    let again = running
        .submit(ProcedureWithId {
            id: "orphan".into(),
            procedure: Box::new(Ordered {
                name: "ignored".into(),
                log: log.clone(),
                gate: None,
            }),
        })
        .await;
    assert!(matches!(again, Err(procedure::Error::Duplicate(_))));
    running.shutdown().await;
}
