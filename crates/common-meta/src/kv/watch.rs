//! Watchers over a [`SledKvStore`]: every change from a start revision on, in order,
//! once each, whole revisions at a time, fed by the store's writes and caught up from
//! its history.
//!
//! A watcher is one task. It is **synced** when it has seen every revision the store
//! published: the writer then hands it each new batch of changes that touches its range
//! through a bounded channel ([`WatchHub::publish`], which never waits). A watcher whose
//! channel is full is marked **unsynced** and gets nothing more from the writer; it reads
//! the history instead ([`SledKvStore::changes`]) from the revision it needs next, in
//! chunks, and syncs again once it has caught up (checked under the hub's lock, which
//! the writer also takes to publish, so no batch slips between). A slow watcher
//! therefore never slows the writer, and costs memory only for its bounded channels.
//! If the history it needs was compacted away, it ends with [`Error::Compacted`].
//!
//! A progress notice claims revision R only when every change at or below R that
//! matches the watcher was handed to its consumer: it is taken under the hub's lock,
//! with the watcher synced and its channel empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::kv::sled_store::{Change, SledKvStore};
use crate::kv::types::{Event, EventKind, KeyValue, WatchRequest, WatchResponse};

/// Batches a synced watcher may have queued before it is marked unsynced.
const SYNCED_QUEUE: usize = 64;
/// Responses a watcher may have queued for its consumer.
const OUT_QUEUE: usize = 16;
/// Changes read from the history per catch-up step (whole revisions: may be more).
const CATCH_UP_CHUNK: usize = 1000;
/// Queued batches a watcher merges into one response at most.
const MERGE_BATCHES: usize = 64;
/// Changes past which a watcher stops merging queued batches into one response.
const MERGE_CHANGES: usize = 1000;
/// How long a watcher waits for its consumer to take a response before it is
/// cancelled as stalled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an idle watcher that asked for progress notices gets one.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

/// One batch of changes as the writer published them: the revisions after the previous
/// batch, through `to`.
#[derive(Debug)]
pub(crate) struct Published {
    to: i64,
    /// The changes; `None` when the writer could not list them (a snapshot replaced the
    /// store): every watcher must read the history.
    changes: Option<Vec<Change>>,
}

struct Subscriber {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    single: bool,
    queue: mpsc::Sender<Arc<Published>>,
    synced: Arc<AtomicBool>,
}

impl Subscriber {
    fn wants(&self, published: &Published) -> bool {
        match &published.changes {
            None => true,
            Some(changes) => changes.iter().any(|c| self.matches(&c.key)),
        }
    }

    fn matches(&self, key: &[u8]) -> bool {
        span_matches(&self.start, self.end.as_deref(), self.single, key)
    }
}

fn span_matches(start: &[u8], end: Option<&[u8]>, single: bool, key: &[u8]) -> bool {
    if single {
        return key == start;
    }
    key >= start && end.is_none_or(|end| key < end)
}

#[derive(Default)]
struct Hub {
    /// The last revision published.
    revision: i64,
    next_id: u64,
    subscribers: HashMap<u64, Subscriber>,
}

/// The registry of a store's watchers; the store's writer publishes to it.
pub struct WatchHub {
    hub: Mutex<Hub>,
    stall_timeout: Mutex<Duration>,
    progress_interval: Mutex<Duration>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub")
            .field("watchers", &self.watchers())
            .finish()
    }
}

impl WatchHub {
    pub(crate) fn new(revision: i64) -> Self {
        WatchHub {
            hub: Mutex::new(Hub {
                revision,
                ..Default::default()
            }),
            stall_timeout: Mutex::new(DEFAULT_STALL_TIMEOUT),
            progress_interval: Mutex::new(DEFAULT_PROGRESS_INTERVAL),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        // The hub holds no invariant a panicking holder could break halfway: the worst
        // is a subscriber left synced, whose full queue marks it unsynced next time.
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many watchers are registered.
    pub fn watchers(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Sets how long a watcher may wait on its consumer before it is cancelled, and how
    /// often idle watchers that asked for them get progress notices.
    pub fn configure(&self, stall_timeout: Duration, progress_interval: Duration) {
        *self
            .stall_timeout
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stall_timeout;
        *self
            .progress_interval
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = progress_interval;
    }

    /// Hands a written batch to every synced watcher it concerns, without waiting: a
    /// watcher whose queue is full becomes unsynced and catches up from the history.
    pub(crate) fn publish(&self, to: i64, changes: Option<Vec<Change>>) {
        let published = Arc::new(Published { to, changes });
        let mut hub = self.lock();
        hub.revision = to;
        hub.subscribers.retain(|_, sub| {
            if !sub.synced.load(Ordering::Acquire) || !sub.wants(&published) {
                return true;
            }
            match sub.queue.try_send(published.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.synced.store(false, Ordering::Release);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn revision(&self) -> i64 {
        self.lock().revision
    }
}

mod stream;
#[cfg(test)]
mod tests;

pub use stream::{Control, WatchControl, WatchStream};

/// Checks a watch request's range: an inverted range matches nothing and is refused.
pub fn check_request(req: &WatchRequest) -> Result<()> {
    if req.key.is_empty() {
        return Err(Error::invalid_argument("a watch needs a key"));
    }
    if !req.range_end.is_empty() && req.range_end != [0] && req.range_end <= req.key {
        return Err(Error::invalid_argument(format!(
            "watch range end {:?} is not after its key {:?}",
            String::from_utf8_lossy(&req.range_end),
            String::from_utf8_lossy(&req.key)
        )));
    }
    if req.start_revision < 0 {
        return Err(Error::invalid_argument(format!(
            "start revision {} is negative",
            req.start_revision
        )));
    }
    Ok(())
}

/// Starts a watcher on `store` (see the module doc). A start revision below the
/// compacted revision is refused with [`Error::Compacted`].
pub fn watch(store: &Arc<SledKvStore>, req: WatchRequest) -> Result<WatchStream> {
    check_request(&req)?;
    let compacted = store.compacted();
    if req.start_revision != 0 && req.start_revision < compacted {
        return Err(Error::Compacted {
            requested: req.start_revision,
            compacted,
        });
    }
    let hub = store.hub();
    let (queue, batches) = mpsc::channel(SYNCED_QUEUE);
    let synced = Arc::new(AtomicBool::new(false));
    let single = req.range_end.is_empty();
    let end = (!single && req.range_end != [0]).then(|| req.range_end.clone());
    // Registered under the hub's lock: every revision after `next - 1` reaches the
    // watcher either as a batch or through the history. A watcher starting now (or in
    // the future) is synced from the first batch, so a compaction cannot overtake it
    // before its task first runs.
    let (id, next) = {
        let mut hub = hub.lock();
        let id = hub.next_id;
        hub.next_id += 1;
        let next = if req.start_revision == 0 {
            hub.revision + 1
        } else {
            req.start_revision
        };
        synced.store(next > hub.revision, Ordering::Release);
        hub.subscribers.insert(
            id,
            Subscriber {
                start: req.key.clone(),
                end: end.clone(),
                single,
                queue,
                synced: synced.clone(),
            },
        );
        (id, next)
    };
    let (out, responses) = mpsc::channel(OUT_QUEUE);
    let (control, controls) = mpsc::channel(4);
    let stall = *hub
        .stall_timeout
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let progress = *hub
        .progress_interval
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let task = Watcher {
        store: store.clone(),
        id,
        start: req.key,
        end,
        single,
        prev_kv: req.prev_kv,
        no_put: req.no_put,
        no_delete: req.no_delete,
        progress_notify: req.progress_notify.then_some(progress),
        next,
        synced,
        batches,
        controls,
        out,
        stall,
    };
    tokio::spawn(task.run());
    Ok(WatchStream::new(responses, control))
}

struct Watcher {
    store: Arc<SledKvStore>,
    id: u64,
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    single: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: Option<Duration>,
    /// The next revision this watcher must deliver.
    next: i64,
    synced: Arc<AtomicBool>,
    batches: mpsc::Receiver<Arc<Published>>,
    controls: mpsc::Receiver<Control>,
    out: mpsc::Sender<Result<WatchResponse>>,
    stall: Duration,
}

/// Why a watcher stops.
enum Stop {
    /// The consumer went away.
    Gone,
    /// The watcher ends with this error for the consumer.
    Fail(Error),
    /// The consumer took nothing for the stall timeout; the error says so.
    Stalled(Error),
}

impl Watcher {
    async fn run(mut self) {
        let result = self.serve().await;
        self.store.hub().lock().subscribers.remove(&self.id);
        match result {
            Err(Stop::Stalled(error)) => {
                // It takes nothing: best effort.
                let _ = self.out.try_send(Err(error));
            }
            Err(Stop::Fail(error)) => {
                let _ = tokio::time::timeout(self.stall, self.out.send(Err(error))).await;
            }
            Ok(()) | Err(Stop::Gone) => {}
        }
    }

    async fn serve(&mut self) -> std::result::Result<(), Stop> {
        let mut idle = self.progress_notify.map(|every| {
            let mut timer = tokio::time::interval(every);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        });
        if let Some(timer) = idle.as_mut() {
            timer.tick().await;
        }
        loop {
            if !self.synced.load(Ordering::Acquire) {
                self.catch_up().await?;
                continue;
            }
            tokio::select! {
                batch = self.batches.recv() => match batch {
                    Some(batch) => self.take(&batch).await?,
                    // Only the hub holds the sender, and only while registered.
                    None => return Err(Stop::Gone),
                },
                control = self.controls.recv() => match control {
                    Some(Control::Progress) => {
                        let revision = self.progress_point().await?;
                        self.send(WatchResponse::Progress { revision, requested: true }).await?;
                    }
                    None => return Err(Stop::Gone),
                },
                _ = async { idle.as_mut().expect("guarded by the branch condition").tick().await }, if idle.is_some() => {
                    if let Some(revision) = self.quiet_point() {
                        self.send(WatchResponse::Progress { revision, requested: false }).await?;
                    }
                }
                () = self.out.closed() => return Err(Stop::Gone),
            }
        }
    }

    /// Reads the history from `next` up to the hub's revision, then syncs if nothing
    /// was published meanwhile.
    async fn catch_up(&mut self) -> std::result::Result<(), Stop> {
        let store = self.store.clone();
        let hub = store.hub();
        loop {
            let target = hub.revision();
            if self.next <= target {
                let changes = self
                    .store
                    .changes(self.next, target, CATCH_UP_CHUNK)
                    .map_err(Stop::Fail)?;
                let last = match changes.last() {
                    // A partial read ends at a whole revision; a full one at `target`.
                    Some(last) if changes.len() >= CATCH_UP_CHUNK => last.revision,
                    _ => target,
                };
                self.deliver(changes, last).await?;
                self.next = last + 1;
                // Batches queued before this catch-up are now behind `next`.
                continue;
            }
            let hub_state = hub.lock();
            if hub_state.revision < self.next {
                // Nothing published since the read: from here on every batch comes
                // through the queue. Older batches still in it are skipped by `take`.
                self.synced.store(true, Ordering::Release);
                return Ok(());
            }
        }
    }

    /// Handles a published batch and the ones queued behind it, as one response:
    /// a watcher that fell behind catches up in fewer, larger responses (whole
    /// revisions each, as always). Skips what was delivered already.
    async fn take(&mut self, first: &Published) -> std::result::Result<(), Stop> {
        let mut fresh: Vec<Change> = Vec::new();
        let mut through = None;
        let mut queued: Option<Arc<Published>> = None;
        let mut taken = 0;
        loop {
            let batch = queued.as_deref().unwrap_or(first);
            if batch.to >= self.next {
                let Some(changes) = &batch.changes else {
                    // The writer could not list this one: deliver what was gathered,
                    // then read the rest from the history.
                    if let Some(through) = through {
                        self.deliver(fresh, through).await?;
                    }
                    self.synced.store(false, Ordering::Release);
                    return Ok(());
                };
                // A synced watcher misses no batch that concerns it (the writer skips
                // only the ones that do not), so there is no gap to read here.
                let next = self.next.max(through.map_or(0, |t: i64| t + 1));
                fresh.extend(changes.iter().filter(|c| c.revision >= next).cloned());
                through = Some(batch.to);
            }
            taken += 1;
            if taken >= MERGE_BATCHES || fresh.len() >= MERGE_CHANGES {
                break;
            }
            match self.batches.try_recv() {
                Ok(more) => queued = Some(more),
                Err(_) => break,
            }
        }
        if let Some(through) = through {
            self.deliver(fresh, through).await?;
        }
        Ok(())
    }

    /// Hands the matching changes (all revisions up to `through`) to the consumer.
    async fn deliver(
        &mut self,
        changes: Vec<Change>,
        through: i64,
    ) -> std::result::Result<(), Stop> {
        let mut events = Vec::new();
        for change in changes {
            if !span_matches(&self.start, self.end.as_deref(), self.single, &change.key) {
                continue;
            }
            let kind = if change.entry.is_some() {
                EventKind::Put
            } else {
                EventKind::Delete
            };
            if (kind == EventKind::Put && self.no_put)
                || (kind == EventKind::Delete && self.no_delete)
            {
                continue;
            }
            let prev_kv = if self.prev_kv {
                self.store
                    .previous(&change.key, change.revision)
                    .map_err(Stop::Fail)?
                    .map(|e| e.to_key_value(&change.key, false))
            } else {
                None
            };
            let kv = match &change.entry {
                Some(entry) => entry.to_key_value(&change.key, false),
                None => KeyValue {
                    key: change.key,
                    mod_revision: change.revision,
                    ..Default::default()
                },
            };
            events.push(Event { kind, kv, prev_kv });
        }
        self.next = self.next.max(through + 1);
        if events.is_empty() {
            return Ok(());
        }
        let revision = through.max(events.last().map_or(0, |e| e.kv.mod_revision));
        self.send(WatchResponse::Events { revision, events }).await
    }

    async fn send(&mut self, response: WatchResponse) -> std::result::Result<(), Stop> {
        // Most sends find room: no timer for those (one per event per watcher adds up).
        let response = match self.out.try_send(Ok(response)) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::Gone),
            Err(mpsc::error::TrySendError::Full(response)) => response,
        };
        match tokio::time::timeout(self.stall, self.out.send(response)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Stalled(Error::Unavailable {
                message: format!(
                    "watcher cancelled: its consumer took no response for {:?}",
                    self.stall
                ),
            })),
        }
    }

    /// The revision a progress notice may claim now, if the watcher is synced with
    /// nothing queued; `None` otherwise.
    fn quiet_point(&self) -> Option<i64> {
        let hub = self.store.hub().lock();
        (self.synced.load(Ordering::Acquire) && self.batches.is_empty()).then_some(hub.revision)
    }

    /// Works through queued batches (and a catch-up) until a progress point exists.
    async fn progress_point(&mut self) -> std::result::Result<i64, Stop> {
        loop {
            if let Some(revision) = self.quiet_point() {
                return Ok(revision);
            }
            if !self.synced.load(Ordering::Acquire) {
                self.catch_up().await?;
                continue;
            }
            match self.batches.recv().await {
                Some(batch) => self.take(&batch).await?,
                None => return Err(Stop::Gone),
            }
        }
    }
}
