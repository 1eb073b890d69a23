//! Saves that fail: retried while the procedure keeps its locks, then failed visibly
//! and parked until recovery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use procedure::{
    BoxedProcedure, Context, Error, LockKey, ManagerConfig, MemoryStateStore, Procedure,
    ProcedureManager, ProcedureState, ProcedureWithId, Result, StateStore, Status,
};

use crate::locks::{Critical, Locked};
use crate::*;

/// A store whose puts fail while `failing` says so (a store that is briefly, or for
/// good, unwritable); reads always work.
struct FlakyStore {
    inner: MemoryStateStore,
    /// Puts still to fail (`u32::MAX`: forever).
    failing: AtomicU32,
    /// Puts still to let through before failing forever (`u32::MAX`: no such limit).
    passing: AtomicU32,
    failed: AtomicU32,
}

impl FlakyStore {
    fn new(failing: u32) -> Self {
        FlakyStore {
            inner: MemoryStateStore::default(),
            failing: AtomicU32::new(failing),
            passing: AtomicU32::new(u32::MAX),
            failed: AtomicU32::new(0),
        }
    }

    /// A store that takes `passing` puts, then fails every one.
    fn failing_after(passing: u32) -> Self {
        let store = Self::new(0);
        store.passing.store(passing, Ordering::SeqCst);
        store
    }
}

#[async_trait]
impl StateStore for FlakyStore {
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let passing = self.passing.load(Ordering::SeqCst);
        if passing == 0 {
            self.failing.store(u32::MAX, Ordering::SeqCst);
            self.passing.store(u32::MAX, Ordering::SeqCst);
        } else if passing != u32::MAX {
            self.passing.fetch_sub(1, Ordering::SeqCst);
        }
        let left = self.failing.load(Ordering::SeqCst);
        if left > 0 {
            if left != u32::MAX {
                self.failing.fetch_sub(1, Ordering::SeqCst);
            }
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Store {
                key: key.to_string(),
                message: "the disk is unwritable".to_string(),
                retryable: true,
            });
        }
        self.inner.put(key, value).await
    }
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner.scan_prefix(prefix).await
    }
}

/// A procedure that takes `shared/key` exclusively, saves one step, then finishes.
struct TwoSteps {
    done: bool,
}

#[async_trait]
impl Procedure for TwoSteps {
    fn type_name(&self) -> &str {
        "test.TwoSteps"
    }
    async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
        if self.done {
            return Ok(Status::Done {
                output: Some("finished".into()),
            });
        }
        self.done = true;
        Ok(Status::Executing { persist: true })
    }
    fn dump(&self) -> Result<String> {
        Ok(String::new())
    }
    fn lock_key(&self) -> LockKey {
        LockKey::exclusive("shared/key")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_fails_for_a_while_is_retried_and_the_procedure_finishes() {
    let store = Arc::new(FlakyStore::new(0));
    let m = ProcedureManager::new(store.clone(), fast());
    m.start().await.unwrap();
    // Submitted while writable; its step's save then fails five times.
    store.failing.store(5, Ordering::SeqCst);
    let w = m
        .submit(ProcedureWithId {
            id: "flaky".into(),
            procedure: Box::new(TwoSteps { done: false }),
        })
        .await;
    // The first save (at submit) is not retried: the caller is told at once.
    let err = w.err().unwrap();
    assert!(err.to_string().contains("unwritable"), "{err}");
    store.failing.store(5, Ordering::SeqCst);
    store.failed.store(0, Ordering::SeqCst);
    // Fail the saves after submission instead.
    let m = ProcedureManager::new(
        store.clone(),
        ManagerConfig {
            max_persist_retries: 10,
            ..fast()
        },
    );
    m.start().await.unwrap();
    store.failing.store(0, Ordering::SeqCst);
    let w = m
        .submit(ProcedureWithId {
            id: "flaky2".into(),
            procedure: Box::new(TwoSteps { done: false }),
        })
        .await
        .unwrap();
    store.failing.store(5, Ordering::SeqCst);
    let output = tokio::time::timeout(DEADLINE, w.wait())
        .await
        .expect("finished")
        .unwrap();
    assert_eq!(output.as_deref(), Some("finished"));
    assert_eq!(
        store.failed.load(Ordering::SeqCst),
        5,
        "every failure was retried"
    );
    let saved = m.state("flaky2").await.unwrap().unwrap();
    assert_eq!(saved.state, ProcedureState::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_procedure_that_cannot_be_saved_fails_visibly_and_keeps_its_locks() {
    // The submission's record is saved; nothing after it.
    let store = Arc::new(FlakyStore::failing_after(1));
    let m = ProcedureManager::new(
        store.clone(),
        ManagerConfig {
            max_persist_retries: 3,
            ..fast()
        },
    );
    m.start().await.unwrap();
    let w = m
        .submit(ProcedureWithId {
            id: "stuck".into(),
            procedure: Box::new(TwoSteps { done: false }),
        })
        .await
        .unwrap();
    let err = tokio::time::timeout(DEADLINE, w.wait())
        .await
        .expect("the watcher is answered")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("could not be saved after 4 attempts"),
        "{err}"
    );
    assert!(err.to_string().contains("locks are kept"), "{err}");

    // Another procedure on the same key must not run over the half-done one.
    store.failing.store(0, Ordering::SeqCst);
    let critical = Arc::new(Critical {
        inside: AtomicU32::new(0),
        max_inside: AtomicU32::new(0),
    });
    let next = m
        .submit(ProcedureWithId {
            id: "next".into(),
            procedure: Box::new(Locked {
                lock: LockKey::exclusive("shared/key"),
                critical: critical.clone(),
                barrier: None,
            }),
        })
        .await
        .unwrap();
    // Bounded check of an absence: it does not start while the lock is kept.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), m.watch("next").unwrap().wait())
            .await
            .is_err(),
        "the lock was kept"
    );
    assert_eq!(critical.max_inside.load(Ordering::SeqCst), 0);
    drop(next);

    // Recovery decides: a new manager on the store resumes it from its last save.
    m.shutdown().await;
    let m = ProcedureManager::new(store.clone(), fast());
    m.register_loader(
        "test.TwoSteps",
        Box::new(|_: &str| Ok(Box::new(TwoSteps { done: true }) as BoxedProcedure)),
    )
    .unwrap();
    m.register_loader(
        "test.Locked",
        Box::new(move |_: &str| {
            Ok(Box::new(Locked {
                lock: LockKey::exclusive("shared/key"),
                critical: critical.clone(),
                barrier: None,
            }) as BoxedProcedure)
        }),
    )
    .unwrap();
    m.start().await.unwrap();
    // Recovered procedures may finish before a watcher could be taken: read the store.
    for id in ["stuck", "next"] {
        wait_until(|| async {
            match m.state(id).await.unwrap().map(|r| r.state) {
                Some(ProcedureState::Done) => Ok(()),
                state => Err(format!("{id} not recovered and finished: {state:?}")),
            }
        })
        .await;
    }
}
