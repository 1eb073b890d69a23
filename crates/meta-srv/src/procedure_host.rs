//! `ProcedureHost`: runs the procedure manager on the leader only.
//!
//! It follows the raft member's leadership: when this member starts leading (and its
//! term has a committed entry), a new `ProcedureManager` over the replicated KV store
//! recovers every unfinished procedure and runs it; when leadership is lost, the manager
//! is stopped at once (its runners are aborted) and the next leader's manager finishes
//! their work from the last persisted steps.

use std::sync::{Arc, Mutex, PoisonError};

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
    /// Follows `leadership`, running a manager over `kv` while this member leads.
    pub fn start(
        mut leadership: watch::Receiver<bool>,
        kv: Arc<dyn KvBackend>,
        limits: KvLimits,
        config: ManagerConfig,
        loaders: LoaderRegistry,
    ) -> ProcedureHost {
        let current = Arc::new(Mutex::new(None));
        let shared = current.clone();
        let task = tokio::spawn(async move {
            loop {
                if leadership.wait_for(|leads| *leads).await.is_err() {
                    return;
                }
                let store = Arc::new(KvStateStore::new(kv.clone(), &limits));
                let manager = ProcedureManager::new(store, config.clone());
                let started = match loaders(&manager) {
                    Ok(()) => manager.start().await,
                    Err(e) => Err(e),
                };
                match started {
                    Ok(()) => {
                        tracing::info!("leading: procedure manager started");
                        *slot(&shared) = Some(manager.clone());
                    }
                    Err(e) => {
                        // Typically leadership was lost meanwhile; the loop decides.
                        tracing::warn!(error = %e, "procedure manager did not start");
                        manager.stop();
                    }
                }
                if leadership.wait_for(|leads| !*leads).await.is_err() {
                    manager.stop();
                    return;
                }
                manager.stop();
                *slot(&shared) = None;
                tracing::info!("leadership lost: procedure manager stopped");
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
