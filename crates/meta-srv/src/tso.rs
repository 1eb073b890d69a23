//! The timestamp oracle: strictly increasing timestamps `physical_ms << 18 | logical`
//! (PD's layout), handed out by the leader only.
//!
//! **Window.** The leader never hands out a timestamp whose physical part is at or
//! above the *bound* it persisted through raft (`__tso/bound`, see
//! `common_meta::key`). It keeps the bound about `save_interval` ahead of the clock,
//! writing a new one before the old runs out, so requests do not wait on the log.
//!
//! **Leader changes.** A new leader reads the bound its predecessor persisted and starts
//! its own window at `max(now, bound)`: every timestamp before it had a lower physical
//! part, so no waiting is needed. It serves only once its own bound committed in its
//! term.
//!
//! **Only while used.** The bound is a key of the store, so each write moves the store
//! revision. A leader therefore starts its window at the first request, and extends it
//! only while requests come: an idle cluster writes nothing. The first request after
//! a pause waits for one write (a lapsed window is never served from: its physical part
//! would lag the clock). The window is forgotten on every path that ends a leadership: a change of term
//! seen by the keeper task, a request that finds the term moved, a failed write.
//!
//! **Clocks.** A clock that steps back never takes the physical part back (it stays
//! where it was and the logical part grows). A clock far ahead of the persisted bound
//! is logged. When the logical part would overflow within one millisecond the physical
//! part moves on by one, but never to the bound: then the request waits for the next
//! window.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common_meta::key::TSO_BOUND_KEY;
use common_meta::kv::{
    Compare, CompareOp, CompareTarget, KvBackend, PutRequest, RangeRequest, TxnOp, TxnRequest,
};
use common_meta::{Error, Result};
use tokio::sync::{Notify, watch};

use crate::raft::backend::RaftKvBackend;

/// Bits of the logical part.
pub const LOGICAL_BITS: u32 = 18;

/// Logical values per millisecond.
const LOGICAL_LIMIT: u64 = 1 << LOGICAL_BITS;

/// The most timestamps one request may ask for.
pub const MAX_COUNT: u32 = 10_000;

/// How often the keeper looks at the window.
const TICK: Duration = Duration::from_millis(50);

/// A clock this far ahead of the persisted bound is logged.
const FAR_AHEAD_MS: u64 = 60 * 60 * 1000;

/// A timestamp from its parts.
pub fn compose(physical_ms: u64, logical: u64) -> u64 {
    physical_ms << LOGICAL_BITS | logical
}

/// A timestamp's physical part, in unix milliseconds.
pub fn physical_of(timestamp: u64) -> u64 {
    timestamp >> LOGICAL_BITS
}

/// A timestamp's logical part.
pub fn logical_of(timestamp: u64) -> u64 {
    timestamp & (LOGICAL_LIMIT - 1)
}

/// Where the oracle reads the time (tests put in their own).
pub trait Clock: Send + Sync + 'static {
    /// Unix milliseconds now.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// The leader's window: what it handed out last and the persisted bound.
#[derive(Debug, Clone, Copy)]
struct Window {
    term: u64,
    physical: u64,
    logical: u64,
    bound: u64,
}

/// The timestamp oracle of one member (serving while it leads).
pub struct Oracle {
    backend: RaftKvBackend,
    clock: Mutex<Arc<dyn Clock>>,
    save_interval: u64,
    window: Mutex<Option<Window>>,
    /// Woken when a new window is installed.
    extended: Notify,
    /// Woken when a request needs a new window now (none yet, lapsed, or full).
    wanted: Notify,
    /// A request is waiting for a window.
    asked: std::sync::atomic::AtomicBool,
    /// When a timestamp was last handed out (unix ms by the clock).
    used: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Oracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oracle")
            .field("save_interval", &self.save_interval)
            .finish_non_exhaustive()
    }
}

enum Step {
    Done(u64),
    /// The window has no room left: wait for the next one.
    Wait,
}

impl Oracle {
    /// An oracle over `backend` reading `clock`, persisting windows `save_interval_ms`
    /// ahead.
    pub fn new(backend: RaftKvBackend, clock: Arc<dyn Clock>, save_interval_ms: u64) -> Self {
        Oracle {
            backend,
            clock: Mutex::new(clock),
            save_interval: save_interval_ms,
            window: Mutex::new(None),
            extended: Notify::new(),
            wanted: Notify::new(),
            asked: std::sync::atomic::AtomicBool::new(false),
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Option<Window>> {
        // Only whole-value updates happen under the lock: never torn.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the time from `clock` from now on (tests step it).
    pub fn set_clock(&self, clock: Arc<dyn Clock>) {
        *self.clock.lock().unwrap_or_else(PoisonError::into_inner) = clock;
    }

    fn now_ms(&self) -> u64 {
        let clock = self
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        clock.now_ms()
    }

    /// Whether this member leads (and so may serve once its window is persisted).
    pub fn leads(&self) -> bool {
        self.backend.leadership().borrow().is_some()
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader { leader: None }
    }

    /// `count` consecutive timestamps; the highest is returned. "Not leader" when this
    /// member does not lead (or has not yet persisted its first window).
    pub async fn get(&self, count: u32) -> Result<u64> {
        if count == 0 || count > MAX_COUNT {
            return Err(Error::invalid_argument(format!(
                "count {count} is out of range: ask for 1 to {MAX_COUNT} timestamps"
            )));
        }
        loop {
            let extended = self.extended.notified();
            tokio::pin!(extended);
            extended.as_mut().enable();
            match self.step(u64::from(count))? {
                Step::Done(timestamp) => return Ok(timestamp),
                Step::Wait => {
                    self.asked.store(true, std::sync::atomic::Ordering::Release);
                    self.wanted.notify_one();
                    // Bounded: a leader that cannot write loses its window (and the
                    // next step answers "not leader").
                    if tokio::time::timeout(Duration::from_secs(5), extended)
                        .await
                        .is_err()
                    {
                        return Err(Error::Unavailable {
                            message: "the timestamp window could not be extended in time"
                                .to_string(),
                        });
                    }
                }
            }
        }
    }

    fn step(&self, count: u64) -> Result<Step> {
        let term = *self.backend.leadership().borrow();
        let mut guard = self.window();
        let Some(w) = guard.as_mut() else {
            // Leading without a window: the first request starts it.
            return if term.is_some() {
                Ok(Step::Wait)
            } else {
                Err(self.not_leader())
            };
        };
        if term != Some(w.term) {
            *guard = None;
            return Err(self.not_leader());
        }
        let now = self.now_ms();
        if now >= w.bound {
            // The window lapsed while idle: a new one first.
            return Ok(Step::Wait);
        }
        // Never back (a clock stepping back); below the bound (checked above).
        let physical = now.max(w.physical);
        if physical > w.physical {
            w.physical = physical;
            w.logical = 0;
        }
        if w.logical + count >= LOGICAL_LIMIT {
            if w.physical + 1 >= w.bound {
                return Ok(Step::Wait);
            }
            w.physical += 1;
            w.logical = 0;
        }
        w.logical += count;
        self.used.store(now, std::sync::atomic::Ordering::Release);
        Ok(Step::Done(compose(w.physical, w.logical)))
    }

    /// Keeps the window while this member leads, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut leadership = self.backend.leadership();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = leadership.changed() => {}
                () = self.wanted.notified() => {}
                stopping = stop.wait_for(|s| *s) => {
                    drop(stopping);
                    *self.window() = None;
                    return;
                }
            }
            let term = *leadership.borrow_and_update();
            let installed = *self.window();
            let asked = self.asked.load(std::sync::atomic::Ordering::Acquire);
            let outcome = match (term, installed) {
                (None, _) => {
                    *self.window() = None;
                    continue;
                }
                (Some(term), Some(w)) if w.term == term => self.extend(term, w, asked).await,
                (Some(term), installed) => {
                    if installed.is_some() {
                        *self.window() = None;
                    }
                    if !asked {
                        continue;
                    }
                    self.start(term).await
                }
            };
            if let Err(e) = outcome {
                // A window this member cannot persist is not served.
                *self.window() = None;
                if !matches!(e, Error::NotLeader { .. }) {
                    tracing::warn!(error = %e, "persisting the timestamp window failed");
                }
            }
        }
    }

    /// The persisted bound and the revision it was written at (0, 0 when none).
    async fn persisted(&self) -> Result<(u64, i64)> {
        let read = self
            .backend
            .range(RangeRequest::key(TSO_BOUND_KEY.to_vec()))
            .await?;
        let Some(kv) = read.kvs.first() else {
            return Ok((0, 0));
        };
        let bound = std::str::from_utf8(&kv.value)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Error::Corrupted {
                location: "__tso/bound".to_string(),
                reason: format!("not a number: {:?}", String::from_utf8_lossy(&kv.value)),
            })?;
        Ok((bound, kv.mod_revision))
    }

    /// Writes `bound` if the key is still as read at `revision`; true when it was.
    async fn persist(&self, bound: u64, revision: i64) -> Result<bool> {
        let txn = TxnRequest {
            compare: vec![Compare::new(
                TSO_BOUND_KEY.to_vec(),
                CompareOp::Equal,
                CompareTarget::ModRevision(revision),
            )],
            success: vec![TxnOp::Put(PutRequest::new(
                TSO_BOUND_KEY.to_vec(),
                bound.to_string().into_bytes(),
            ))],
            failure: Vec::new(),
        };
        Ok(self.backend.txn(txn).await?.succeeded)
    }

    /// A new leadership in `term`: the first window, above the predecessor's bound.
    async fn start(&self, term: u64) -> Result<()> {
        let (previous, revision) = self.persisted().await?;
        let now = self.now_ms();
        if previous != 0 && now > previous + FAR_AHEAD_MS {
            tracing::warn!(
                now,
                previous,
                "the clock is far ahead of the last persisted timestamp window"
            );
        }
        let physical = now.max(previous);
        let bound = physical + self.save_interval;
        if !self.persist(bound, revision).await? {
            // Someone wrote it meanwhile (a stale leader): look again next turn.
            return Ok(());
        }
        if *self.backend.leadership().borrow() != Some(term) {
            return Ok(());
        }
        *self.window() = Some(Window {
            term,
            physical,
            logical: 0,
            bound,
        });
        self.asked
            .store(false, std::sync::atomic::Ordering::Release);
        self.extended.notify_waiters();
        tracing::info!(term, physical, bound, "timestamp oracle serving");
        Ok(())
    }

    /// Moves the bound ahead once less than a third of the window is left, while
    /// timestamps are being handed out or a request waits for room.
    async fn extend(&self, term: u64, w: Window, asked: bool) -> Result<()> {
        let now = self.now_ms();
        let used = self.used.load(std::sync::atomic::Ordering::Acquire);
        if !asked && now.saturating_sub(used) > self.save_interval {
            return Ok(());
        }
        // A request out of room has taken the physical part to the bound's last
        // millisecond, so this also extends for it.
        let base = now.max(w.physical);
        if w.bound > base + self.save_interval / 3 {
            return Ok(());
        }
        let (persisted, revision) = self.persisted().await?;
        let bound = base.max(persisted) + self.save_interval;
        if !self.persist(bound, revision).await? {
            return Err(Error::FailedPrecondition {
                message: "the timestamp window was written by another member".to_string(),
            });
        }
        let mut guard = self.window();
        match guard.as_mut() {
            Some(current) if current.term == term => {
                current.bound = current.bound.max(bound);
            }
            _ => return Ok(()),
        }
        drop(guard);
        self.asked
            .store(false, std::sync::atomic::Ordering::Release);
        self.extended.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_split_into_their_parts() {
        let ts = compose(1_700_000_000_000, 5);
        assert_eq!((physical_of(ts), logical_of(ts)), (1_700_000_000_000, 5));
        assert!(compose(2, 0) > compose(1, LOGICAL_LIMIT - 1));
    }
}
