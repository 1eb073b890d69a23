//! `SessionKeeper`: the leader's clock for client sessions (exactly-once writes).
//!
//! Sessions live in the replicated state machine (`SledKvStore`), but their keep-alives
//! do not go through raft: like etcd's leases, the leader keeps one deadline per session
//! in memory, renews it on each keep-alive, and proposes `CloseSessions` for the
//! sessions whose deadline passed. So expiry is decided by one member's clock and
//! recorded in the log, and apply stays deterministic. A new leader knows no deadlines:
//! it gives every open session a full TTL from when it first sees it, so a leader change
//! never expires a session early (it may let one live up to one TTL longer).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common_meta::Error;
use tokio::sync::watch;

use crate::raft::backend::RaftKvBackend;

/// TTL of a session opened without one.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(60);
/// Shortest TTL granted: a client must be able to keep up with its keep-alives.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(5);
/// Longest TTL granted: an abandoned session's answers are kept at most this long.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(3600);

/// How often the leader looks for expired sessions.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Most sessions closed by one entry.
const MAX_CLOSE_BATCH: usize = 1024;

/// The leader's session deadlines; see the module doc.
pub struct SessionKeeper {
    backend: RaftKvBackend,
    leadership: watch::Receiver<Option<u64>>,
    deadlines: Mutex<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// The term these deadlines were set in; a new term starts afresh.
    term: u64,
    by_session: HashMap<u64, Instant>,
    /// Sessions whose close is being proposed: a keep-alive for them is too late.
    closing: std::collections::HashSet<u64>,
}

/// The TTL granted for `asked_ms` (0 = the default), within the bounds.
pub fn granted_ttl(asked_ms: u64) -> Duration {
    if asked_ms == 0 {
        return DEFAULT_SESSION_TTL;
    }
    Duration::from_millis(asked_ms).clamp(MIN_SESSION_TTL, MAX_SESSION_TTL)
}

impl SessionKeeper {
    /// A keeper that acts while `leadership` says this member leads.
    pub fn new(backend: RaftKvBackend, leadership: watch::Receiver<Option<u64>>) -> Self {
        SessionKeeper {
            backend,
            leadership,
            deadlines: Mutex::new(Deadlines::default()),
        }
    }

    fn term(&self) -> Result<u64, Error> {
        (*self.leadership.borrow()).ok_or(Error::NotLeader { leader: None })
    }

    /// Runs `change` on the deadlines of `term`, resetting them if they are older.
    fn with_deadlines<T>(&self, term: u64, change: impl FnOnce(&mut Deadlines) -> T) -> T {
        // Only plain map updates happen under the lock: a poisoned one is still whole.
        let mut deadlines = self
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if deadlines.term != term {
            *deadlines = Deadlines {
                term,
                ..Deadlines::default()
            };
        }
        change(&mut deadlines)
    }

    /// Opens a session for user `owner` (empty: none; leader only); returns its id and
    /// the TTL granted.
    pub async fn open(&self, asked_ttl_ms: u64, owner: String) -> Result<(u64, Duration), Error> {
        let term = self.term()?;
        let ttl = granted_ttl(asked_ttl_ms);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let id = self.backend.open_session(ttl_ms, owner).await?;
        self.with_deadlines(term, |d| d.by_session.insert(id, Instant::now() + ttl));
        Ok((id, ttl))
    }

    /// Renews session `id` for another TTL (leader only); refuses one that is not open.
    pub async fn keep_alive(&self, id: u64) -> Result<Duration, Error> {
        let term = self.term()?;
        let mut ttl_ms = self.backend.store().session_ttl(id)?;
        if ttl_ms.is_none() {
            // A new leader's state machine may lag its log: only once it has applied
            // everything committed is an absent session surely closed.
            self.backend.read_barrier().await?;
            ttl_ms = self.backend.store().session_ttl(id)?;
        }
        let ttl_ms = ttl_ms.ok_or(Error::SessionExpired { id })?;
        let ttl = Duration::from_millis(ttl_ms);
        let closing = self.with_deadlines(term, |d| {
            if d.closing.contains(&id) {
                return true;
            }
            d.by_session.insert(id, Instant::now() + ttl);
            false
        });
        if closing {
            // Its deadline passed and its close is on the way: renewing it now would
            // tell the client a session lives that is about to end.
            return Err(Error::SessionExpired { id });
        }
        Ok(ttl)
    }

    /// Ends session `id`.
    pub async fn close(&self, id: u64) -> Result<(), Error> {
        let term = self.term()?;
        self.backend.close_sessions(vec![id]).await?;
        self.with_deadlines(term, |d| d.by_session.remove(&id));
        Ok(())
    }

    /// Expires sessions while this member leads, until `stop` says stop.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "expiring client sessions failed; retrying");
            }
        }
    }

    /// One pass: learn the open sessions, close those past their deadline.
    async fn sweep(&self) -> Result<(), Error> {
        let Ok(term) = self.term() else {
            return Ok(());
        };
        let open = self.backend.store().sessions()?;
        let now = Instant::now();
        let expired: Vec<u64> = self.with_deadlines(term, |d| {
            let mut seen = HashMap::with_capacity(open.len());
            for (id, ttl_ms) in &open {
                let deadline = d
                    .by_session
                    .get(id)
                    .copied()
                    .unwrap_or_else(|| now + Duration::from_millis(*ttl_ms));
                seen.insert(*id, deadline);
            }
            d.by_session = seen;
            let expired: Vec<u64> = d
                .by_session
                .iter()
                .filter(|(_, deadline)| **deadline <= now)
                .map(|(id, _)| *id)
                .take(MAX_CLOSE_BATCH)
                .collect();
            d.closing.extend(expired.iter().copied());
            expired
        });
        if expired.is_empty() {
            return Ok(());
        }
        tracing::info!(sessions = ?expired, "client sessions expired");
        let closed = self.backend.close_sessions(expired.clone()).await;
        self.with_deadlines(term, |d| {
            for id in &expired {
                d.closing.remove(id);
                if closed.is_ok() {
                    d.by_session.remove(id);
                }
            }
        });
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped_and_zero_means_the_default() {
        for (asked, granted) in [
            (0, DEFAULT_SESSION_TTL),
            (1, MIN_SESSION_TTL),
            (10_000, Duration::from_secs(10)),
            (u64::MAX, MAX_SESSION_TTL),
        ] {
            assert_eq!(granted_ttl(asked), granted, "asked {asked} ms");
        }
    }
}
