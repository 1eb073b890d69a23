//! `ProcedureManager`: runs procedures, persists them after every step that asks,
//! retries, rolls back, locks, runs children, and recovers everything unfinished.
//!
//! State diagram (persisted states in capitals):
//!
//! ```text
//! submit -> RUNNING --step ok--> RUNNING ... --Done--> DONE
//!              |  ^                 |
//!   retryable  |  | after backoff   | non-retryable (or retries exhausted)
//!              v  |                 v
//!           Retrying        ROLLING_BACK --rollback ok--> FAILED
//!                           (or straight to FAILED without rollback support)
//! ```
//!
//! **A procedure is never abandoned.** Saving its state is retried with backoff (up to
//! `max_persist_retries`) while it keeps its locks. If the store stays unwritable, the
//! procedure is failed visibly in this manager (state Failed with the reason; its
//! watchers, and those of its ancestors, are answered) but keeps its locks until the
//! manager stops: its last saved state is still unfinished in the store, and only the
//! next manager's recovery (a restart, a new leader) decides its fate. Nothing else may
//! take its keys over half-done state meanwhile.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::{AbortHandle, JoinHandle};

use crate::error::{Error, Result};
use crate::lock::LockTable;

mod children;
mod execute;
mod failure;
mod pause;
mod persist;

use crate::procedure::{BoxedProcedure, Context, Loader, ProcedureWithId, Status};
use crate::store::{
    ChildSeed, ProcedureRecord, ProcedureState, RECORD_PREFIX, StateStore, record_key,
};
use children::{run_children, suspend};
use execute::{guarded, run};
use failure::{fail, park};

/// Settings of a [`ProcedureManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerConfig {
    /// Retries of a step that fails with a retryable error before it counts as failed.
    pub max_retries: u32,
    /// First pause before a retry; doubles per retry up to `max_retry_delay`, with jitter.
    pub retry_delay: Duration,
    /// Longest pause before a retry.
    pub max_retry_delay: Duration,
    /// Most root procedures running at once (children do not count: they run inside
    /// their root's slot, so a full manager cannot deadlock on them).
    pub max_running: usize,
    /// How long finished records stay queryable before they are removed.
    pub finished_ttl: Duration,
    /// Attempts to save a procedure's state (with the retry backoff) before it is failed
    /// visibly and parked with its locks (see the module doc).
    pub max_persist_retries: u32,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            max_retries: 10,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(10),
            max_running: 256,
            finished_ttl: Duration::from_secs(3600),
            max_persist_retries: 20,
        }
    }
}

/// What a watcher sees of a procedure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Its state.
    pub state: ProcedureState,
    /// Persisted steps.
    pub step: u64,
    /// Output once done.
    pub output: Option<String>,
    /// Error once failed.
    pub error: Option<String>,
}

/// Follows one procedure until it finishes.
pub struct Watcher {
    id: String,
    progress: watch::Receiver<Progress>,
}

impl Watcher {
    /// The procedure's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits until the procedure finishes: its output when done, its error when failed,
    /// [`Error::Stopped`] when the manager stops first.
    pub async fn wait(mut self) -> Result<Option<String>> {
        let progress = self
            .progress
            .wait_for(|p| p.state.is_finished())
            .await
            .map_err(|_| Error::Stopped)?
            .clone();
        match progress.state {
            ProcedureState::Done => Ok(progress.output),
            _ => Err(Error::external(progress.error.unwrap_or_default())),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Finished = Result<(ProcedureState, Option<String>)>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Inner {
    store: Arc<dyn StateStore>,
    config: ManagerConfig,
    loaders: RwLock<HashMap<String, Loader>>,
    progress: Mutex<HashMap<String, watch::Sender<Progress>>>,
    locks: LockTable,
    slots: Semaphore,
    paused: watch::Sender<bool>,
    /// Procedures paused one by one (`pause.rs`), kept in the store too.
    paused_ids: watch::Sender<HashSet<String>>,
    /// Set by `stop`; checked under the `tasks` lock before anything is spawned.
    stopped: AtomicBool,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Tasks still alive (aborted ones count until they are gone).
    live: watch::Sender<usize>,
    /// Unfinished children found at recovery (or just created), for their parent.
    orphans: Mutex<HashMap<String, (ProcedureRecord, BoxedProcedure)>>,
    /// Child -> parent, for the lock check against every ancestor.
    parents: Mutex<HashMap<String, String>>,
}

/// Runs procedures; see the module doc. Cheap to clone.
#[derive(Clone)]
pub struct ProcedureManager {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one collection update: never torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn record_of(id: &str, type_name: &str, parent: Option<&str>, data: String) -> ProcedureRecord {
    let now = now_ms();
    ProcedureRecord {
        id: id.to_string(),
        type_name: type_name.to_string(),
        parent_id: parent.map(str::to_string),
        state: ProcedureState::Running,
        step: 0,
        data,
        children: Vec::new(),
        error: None,
        output: None,
        created_ms: now,
        updated_ms: now,
    }
}

/// Counts a task as live until it ends or is aborted.
struct LiveGuard(Arc<Inner>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Releases a runner's locks however it ends (done, failed, aborted, panicked).
struct LockRelease(Arc<Inner>, String);

impl Drop for LockRelease {
    fn drop(&mut self) {
        self.0.locks.release(&self.1);
    }
}

impl ProcedureManager {
    /// A manager over `store`; call [`ProcedureManager::start`] before submitting.
    pub fn new(store: Arc<dyn StateStore>, config: ManagerConfig) -> Self {
        let slots = Semaphore::new(config.max_running.clamp(1, Semaphore::MAX_PERMITS));
        ProcedureManager {
            inner: Arc::new(Inner {
                store,
                config,
                loaders: RwLock::new(HashMap::new()),
                progress: Mutex::new(HashMap::new()),
                locks: LockTable::default(),
                slots,
                paused: watch::channel(false).0,
                paused_ids: watch::channel(HashSet::new()).0,
                stopped: AtomicBool::new(false),
                tasks: Mutex::new(Vec::new()),
                live: watch::channel(0).0,
                orphans: Mutex::new(HashMap::new()),
                parents: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Registers the loader that rebuilds procedures of `type_name` from their state.
    pub fn register_loader(&self, type_name: &str, loader: Loader) -> Result<()> {
        let mut loaders = self
            .inner
            .loaders
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if loaders.contains_key(type_name) {
            return Err(Error::Duplicate(format!("loader {type_name}")));
        }
        loaders.insert(type_name.to_string(), loader);
        Ok(())
    }

    /// Recovers every unfinished procedure from the store and resumes it at its last
    /// persisted step (roots resume their children; a rollback resumes its rollback). A
    /// record that cannot be loaded is marked failed, naming why, and the rest go on.
    /// Also starts the removal of finished records after their TTL.
    pub async fn start(&self) -> Result<()> {
        let records = self.inner.store.scan_prefix(RECORD_PREFIX).await?;
        let mut unfinished = Vec::new();
        for (key, bytes) in records {
            let record: ProcedureRecord = match serde_json::from_slice(&bytes) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(%key, error = %e, "undecodable procedure record; left as is");
                    continue;
                }
            };
            if record.state.is_finished() {
                continue;
            }
            match self.inner.load(&record.type_name, &record.data) {
                Ok(procedure) => unfinished.push((record, procedure)),
                Err(reason) => {
                    let mut record = record;
                    let error = Error::Poisoned {
                        id: record.id.clone(),
                        type_name: record.type_name.clone(),
                        reason: reason.to_string(),
                    };
                    tracing::error!(error = %error, "procedure cannot be recovered");
                    record.state = ProcedureState::Failed;
                    record.error = Some(error.to_string());
                    self.inner.persist(&mut record).await?;
                }
            }
        }
        let unfinished_ids: HashSet<String> =
            unfinished.iter().map(|(r, _)| r.id.clone()).collect();
        // Before any runner starts: a procedure paused by hand must not take a step.
        self.load_paused(&unfinished_ids).await?;
        // Children first: every parent must find its children when its runner starts.
        let mut roots = Vec::new();
        for (record, procedure) in unfinished {
            self.inner.track(&record);
            let parent = record
                .parent_id
                .clone()
                .filter(|p| unfinished_ids.contains(p));
            if let Some(parent) = parent {
                lock(&self.inner.parents).insert(record.id.clone(), parent);
                lock(&self.inner.orphans).insert(record.id.clone(), (record, procedure));
            } else {
                roots.push((record, procedure));
            }
        }
        // Recovered roots take their locks now, before the caller can submit anything
        // new: a procedure that was cut short between two saves must finish (or roll
        // back) before new work on the same keys runs, since its next step may repeat
        // one it already did. Those whose keys another recovered root took wait as
        // usual. Recovered roots run outside the `max_running` slots: one holding keys
        // while it waits for a slot could block the roots that hold the slots.
        for (record, procedure) in roots {
            tracing::info!(id = %record.id, step = record.step, "resuming procedure");
            let locked = self
                .inner
                .locks
                .try_acquire(&record.id, &procedure.lock_key());
            self.spawn_recovered(record, procedure, locked)?;
        }
        self.spawn_cleaner()?;
        Ok(())
    }

    /// Persists a new procedure and starts it; the watcher follows it to the end. An id
    /// this manager runs, or whose record is finished, is `Duplicate`; an id whose
    /// unfinished record nothing runs (a save reported failed that happened) is run
    /// from that record, and its watcher returned.
    pub async fn submit(&self, procedure: ProcedureWithId) -> Result<Watcher> {
        let ProcedureWithId { id, procedure } = procedure;
        let data = procedure.dump()?;
        let mut record = record_of(&id, procedure.type_name(), None, data);
        // Reserve the id first, so that two submissions of one id cannot both run.
        let progress = self.inner.reserve(&record)?;
        let known = match self.inner.store.get(&record_key(&id)).await {
            Ok(found) => found,
            Err(e) => {
                self.inner.unreserve(&id);
                return Err(e);
            }
        };
        if let Some(bytes) = known {
            // A saved, unfinished record nothing runs (its first save was reported
            // failed, but it happened): run it now, rather than leave it to the next
            // recovery. Anything else is a duplicate.
            let orphan = serde_json::from_slice::<ProcedureRecord>(&bytes)
                .ok()
                .filter(|r| !r.state.is_finished() && r.parent_id.is_none())
                .and_then(|r| Some((self.inner.load(&r.type_name, &r.data).ok()?, r)));
            self.inner.unreserve(&id);
            let Some((procedure, record)) = orphan else {
                return Err(Error::Duplicate(id));
            };
            let progress = self.inner.reserve(&record)?;
            tracing::info!(%id, "running a saved procedure that had no runner");
            self.spawn_root(record, procedure)?;
            return Ok(Watcher { id, progress });
        }
        if let Err(e) = self.inner.persist_once(&mut record).await {
            self.inner.unreserve(&id);
            return Err(e);
        }
        self.spawn_root(record, procedure)?;
        Ok(Watcher { id, progress })
    }

    /// A watcher of a procedure this manager runs or recovered.
    pub fn watch(&self, id: &str) -> Option<Watcher> {
        lock(&self.inner.progress).get(id).map(|sender| Watcher {
            id: id.to_string(),
            progress: sender.subscribe(),
        })
    }

    /// A procedure's record, with its in-memory state (e.g. retrying) when it runs here.
    pub async fn state(&self, id: &str) -> Result<Option<ProcedureRecord>> {
        let Some(bytes) = self.inner.store.get(&record_key(id)).await? else {
            return Ok(None);
        };
        let mut record: ProcedureRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::external(format!("undecodable record of procedure {id}: {e}")))?;
        if let Some(progress) = lock(&self.inner.progress).get(id) {
            // The in-memory progress is published right after each save: unless the
            // store is already a save ahead, it is the newer view, taken whole (a state
            // from one and an output from the other could read "done, no output").
            let progress = progress.borrow();
            if progress.step >= record.step {
                record.state = progress.state;
                record.step = progress.step;
                record.output.clone_from(&progress.output);
                record.error.clone_from(&progress.error);
            }
        }
        Ok(Some(record))
    }

    /// Every procedure the store knows, oldest first.
    pub async fn list(&self) -> Result<Vec<ProcedureRecord>> {
        let mut records = Vec::new();
        for (_, bytes) in self.inner.store.scan_prefix(RECORD_PREFIX).await? {
            if let Ok(mut record) = serde_json::from_slice::<ProcedureRecord>(&bytes) {
                if let Some(progress) = lock(&self.inner.progress).get(&record.id) {
                    record.state = progress.borrow().state;
                }
                records.push(record);
            }
        }
        records.sort_by_key(|r| (r.created_ms, r.id.clone()));
        Ok(records)
    }

    /// Stops running procedures before their next step until [`ProcedureManager::resume`].
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
    }

    /// Lets paused procedures go on.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
    }

    /// Stops every runner at once and refuses new work; watchers end with
    /// [`Error::Stopped`]. What was not persisted is redone by the next manager's
    /// recovery. Used when leadership is lost, and by tests as a crash.
    pub fn stop(&self) {
        {
            let mut tasks = lock(&self.inner.tasks);
            self.inner.stopped.store(true, Ordering::SeqCst);
            for task in tasks.drain(..) {
                task.abort();
            }
        }
        lock(&self.inner.progress).clear();
    }

    /// [`ProcedureManager::stop`], then waits until every runner is gone, so a new
    /// manager on the same store never races an old runner.
    pub async fn shutdown(&self) {
        self.stop();
        let mut live = self.inner.live.subscribe();
        // The sender lives in `inner`, which we hold: this cannot fail.
        let _ = live.wait_for(|n| *n == 0).await;
    }

    fn spawn_root(&self, record: ProcedureRecord, procedure: BoxedProcedure) -> Result<()> {
        let inner = self.inner.clone();
        self.inner
            .spawn(async move {
                // Slots only for roots; children run inside their root's slot.
                let Ok(_slot) = inner.slots.acquire().await else {
                    return;
                };
                let id = record.id.clone();
                if let Err(e) = run(inner.clone(), record, procedure, false).await {
                    tracing::warn!(%id, error = %e, "procedure runner stopped");
                }
            })
            .map(drop)
    }

    /// Starts a recovered root (see `start`): no slot, its locks taken if `locked`.
    fn spawn_recovered(
        &self,
        record: ProcedureRecord,
        procedure: BoxedProcedure,
        locked: bool,
    ) -> Result<()> {
        let inner = self.inner.clone();
        let id = record.id.clone();
        let spawned = self.inner.spawn(async move {
            let id = record.id.clone();
            if let Err(e) = run(inner.clone(), record, procedure, locked).await {
                tracing::warn!(%id, error = %e, "procedure runner stopped");
            }
        });
        if spawned.is_err() && locked {
            self.inner.locks.release(&id);
        }
        spawned.map(drop)
    }

    fn spawn_cleaner(&self) -> Result<()> {
        let inner = self.inner.clone();
        let period = (inner.config.finished_ttl / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(60));
        self.inner
            .spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    if let Err(e) = inner.remove_expired().await {
                        // Try again next period: a store hiccup must not end cleaning.
                        tracing::warn!(error = %e, "removing finished procedures failed");
                    }
                }
            })
            .map(drop)
    }
}

impl Inner {
    /// Spawns a task counted as live and abortable by `stop`, unless stopped.
    fn spawn<T: Send + 'static>(
        self: &Arc<Self>,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<JoinHandle<T>> {
        let mut tasks = lock(&self.tasks);
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        self.live.send_modify(|n| *n += 1);
        let guard = LiveGuard(self.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            future.await
        });
        tasks.push(task.abort_handle());
        Ok(task)
    }

    fn load(&self, type_name: &str, data: &str) -> Result<BoxedProcedure> {
        let loaders = self.loaders.read().unwrap_or_else(PoisonError::into_inner);
        let loader = loaders.get(type_name).ok_or_else(|| {
            Error::external(format!("no loader is registered for type {type_name:?}"))
        })?;
        loader(data)
    }

    /// Claims `record.id` for a new procedure; fails if this manager already has it.
    fn reserve(&self, record: &ProcedureRecord) -> Result<watch::Receiver<Progress>> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(Error::Stopped);
        }
        let mut progress = lock(&self.progress);
        if progress.contains_key(&record.id) {
            return Err(Error::Duplicate(record.id.clone()));
        }
        let (sender, receiver) = watch::channel(Self::progress_of(record));
        progress.insert(record.id.clone(), sender);
        Ok(receiver)
    }

    fn unreserve(&self, id: &str) {
        lock(&self.progress).remove(id);
    }

    /// Starts following a recovered procedure; returns a receiver of its progress.
    fn track(&self, record: &ProcedureRecord) -> watch::Receiver<Progress> {
        let mut progress = lock(&self.progress);
        let sender = progress
            .entry(record.id.clone())
            .or_insert_with(|| watch::channel(Self::progress_of(record)).0);
        sender.subscribe()
    }

    fn progress_of(record: &ProcedureRecord) -> Progress {
        Progress {
            state: record.state,
            step: record.step,
            output: record.output.clone(),
            error: record.error.clone(),
        }
    }

    fn publish(&self, record: &ProcedureRecord) {
        if let Some(sender) = lock(&self.progress).get(&record.id) {
            sender.send_replace(Self::progress_of(record));
        }
    }

    fn set_state(&self, id: &str, state: ProcedureState) {
        if let Some(sender) = lock(&self.progress).get(id) {
            sender.send_modify(|p| p.state = state);
        }
    }

    /// The chain of parents of `id`, nearest first.
    fn ancestors(&self, id: &str) -> Vec<String> {
        let parents = lock(&self.parents);
        let mut chain = Vec::new();
        let mut at = id;
        while let Some(parent) = parents.get(at) {
            if chain.contains(parent) {
                break;
            }
            chain.push(parent.clone());
            at = parent;
        }
        chain
    }

    /// Waits while the manager, or procedure `id` itself, is paused.
    async fn wait_unpaused(&self, id: &str) {
        let mut paused = self.paused.subscribe();
        let mut one = self.paused_ids.subscribe();
        // The senders live as long as `self`: an error cannot happen while we run.
        loop {
            let _ = paused.wait_for(|p| !*p).await;
            let _ = one.wait_for(|ids| !ids.contains(id)).await;
            if !*self.paused.borrow() {
                return;
            }
        }
    }

    /// Removes finished records older than the TTL, except children whose parent is
    /// still unfinished (it may need their outcome after a crash).
    async fn remove_expired(&self) -> Result<()> {
        let ttl = self.config.finished_ttl.as_millis() as u64;
        let now = now_ms();
        let records: Vec<(String, ProcedureRecord)> = self
            .store
            .scan_prefix(RECORD_PREFIX)
            .await?
            .into_iter()
            .filter_map(|(key, bytes)| {
                serde_json::from_slice::<ProcedureRecord>(&bytes)
                    .ok()
                    .map(|r| (key, r))
            })
            .collect();
        let unfinished: HashSet<&str> = records
            .iter()
            .filter(|(_, r)| !r.state.is_finished())
            .map(|(_, r)| r.id.as_str())
            .collect();
        for (key, record) in &records {
            let parent_waits = record
                .parent_id
                .as_deref()
                .is_some_and(|p| unfinished.contains(p));
            if record.state.is_finished()
                && !parent_waits
                && record.updated_ms.saturating_add(ttl) <= now
            {
                self.store.delete(key).await?;
                lock(&self.progress).remove(&record.id);
                lock(&self.parents).remove(&record.id);
            }
        }
        Ok(())
    }
}
