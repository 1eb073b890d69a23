//! `ProcedureHost`: runs the procedure manager on the leader only.
//!
//! It follows the raft member's leadership: when this member starts leading (and its
//! term has a committed entry), a new `ProcedureManager` over the replicated KV store
//! recovers every unfinished procedure and runs it (retrying the recovery with backoff
//! while the term lasts); when leadership is lost or the term changes, the manager is
//! stopped at once, its runners awaited, and the next leader's manager finishes their
//! work from the last persisted steps.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common_meta::kv::{KvBackend, KvLimits};
use common_meta::state_store::KvStateStore;
use procedure::{ManagerConfig, ProcedureManager};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Registers the procedure types this server runs on a new manager.
pub type LoaderRegistry = Arc<dyn Fn(&ProcedureManager) -> procedure::Result<()> + Send + Sync>;

/// The leader-only procedure manager of one member.
pub struct ProcedureHost {
    current: Arc<Mutex<Option<ProcedureManager>>>,
    task: JoinHandle<()>,
}

fn slot(
    current: &Mutex<Option<ProcedureManager>>,
) -> std::sync::MutexGuard<'_, Option<ProcedureManager>> {
    // Only ever replaced whole: a poisoned slot still holds a valid value.
    current.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ProcedureHost {
    /// Follows `leadership` (the term this member leads in), running a manager over `kv`
    /// while this member leads, and a fresh one for every new term.
    pub fn start(
        mut leadership: watch::Receiver<Option<u64>>,
        kv: Arc<dyn KvBackend>,
        limits: KvLimits,
        config: ManagerConfig,
        loaders: LoaderRegistry,
    ) -> ProcedureHost {
        let current = Arc::new(Mutex::new(None));
        let shared = current.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok(term) = leadership.wait_for(Option::is_some).await.map(|t| *t) else {
                    return;
                };
                let mut backoff = Duration::from_millis(50);
                // Start (recover) the manager, retrying while this term lasts.
                let manager = loop {
                    if *leadership.borrow() != term {
                        break None;
                    }
                    let store = Arc::new(KvStateStore::new(kv.clone(), &limits));
                    let manager = ProcedureManager::new(store, config.clone());
                    let started = match loaders(&manager) {
                        Ok(()) => manager.start().await,
                        Err(e) => Err(e),
                    };
                    match started {
                        Ok(()) => break Some(manager),
                        Err(e) => {
                            tracing::warn!(error = %e, "procedure manager did not start; retrying");
                            manager.shutdown().await;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                if let Some(manager) = &manager {
                    tracing::info!(?term, "leading: procedure manager started");
                    *slot(&shared) = Some(manager.clone());
                }
                // Any change (lost, or a new term) ends this manager.
                let ended = leadership.wait_for(|now| *now != term).await.is_err();
                *slot(&shared) = None;
                if let Some(manager) = manager {
                    // Wait for its runners to be gone before a next manager starts.
                    manager.shutdown().await;
                    tracing::info!(?term, "leadership changed: procedure manager stopped");
                }
                if ended {
                    return;
                }
            }
        });
        ProcedureHost { current, task }
    }

    /// The running manager, when this member leads.
    pub fn manager(&self) -> Option<ProcedureManager> {
        slot(&self.current).clone()
    }
}

impl Drop for ProcedureHost {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(manager) = slot(&self.current).take() {
            manager.stop();
        }
    }
}
