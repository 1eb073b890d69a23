//! `LeaseKeeper`: the leader's side of lease expiry (see `common_meta::kv::lease`).
//!
//! While this member leads it keeps a deadline for every lease in the state machine:
//! leases it did not grant itself (granted by an earlier leader, or not yet seen) are
//! taken over with their checkpointed remaining TTL, or their whole TTL, plus one
//! election timeout; it revokes each lease whose deadline passed (a replicated write
//! that deletes the lease's keys in one revision), and checkpoints every lease's
//! remaining TTL through the log every `checkpoint_every`, so a run of leader changes
//! cannot keep a lease alive for ever. When it stops leading it forgets every deadline.

use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::lease::{self, LeaseWriter};
use tokio::sync::watch;

use crate::raft::backend::RaftKvBackend;

/// How often the keeper looks for expired leases.
const TICK: Duration = Duration::from_millis(100);
/// How often it takes over leases it does not time yet.
const RESYNC: Duration = Duration::from_secs(1);

/// The leader's lease expiry task.
pub struct LeaseKeeper {
    backend: RaftKvBackend,
    /// What a lease taken over gets on top of its remaining TTL.
    extend: Duration,
    checkpoint_every: Duration,
    /// Leases revoked on expiry, counted for the metrics.
    expired: Option<prometheus::IntCounter>,
}

impl LeaseKeeper {
    /// A keeper of `backend`'s leases: taken-over leases get `extend` (one election
    /// timeout) more; remaining TTLs are checkpointed every `checkpoint_every`.
    pub fn new(backend: RaftKvBackend, extend: Duration, checkpoint_every: Duration) -> Self {
        LeaseKeeper {
            backend,
            extend,
            checkpoint_every,
            expired: None,
        }
    }

    /// Counts the leases it revokes on expiry in `expired`.
    pub fn counting(mut self, expired: prometheus::IntCounter) -> Self {
        self.expired = Some(expired);
        self
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let lessor = self.backend.lessor().clone();
        let leadership = self.backend.leadership();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut term = None;
        let mut synced = Instant::now();
        let mut checkpointed = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                stopping = stop.wait_for(|s| *s) => {
                    drop(stopping);
                    return;
                }
            }
            let now = Instant::now();
            let current = *leadership.borrow();
            if current != term {
                // A new term (or none): deadlines of another term mean nothing here.
                lessor.clear();
                term = current;
                synced = now - RESYNC;
                checkpointed = now;
            }
            if term.is_none() {
                continue;
            }
            if now.duration_since(synced) >= RESYNC {
                synced = now;
                match self.backend.store().leases() {
                    Ok(leases) => lessor.load(&leases, self.extend, now),
                    Err(e) => tracing::warn!(error = %e, "reading leases failed"),
                }
            }
            for id in lessor.expired(now) {
                match lease::revoke(&self.backend, &lessor, id).await {
                    Ok(()) => {
                        tracing::debug!(lease = id, "lease expired and was revoked");
                        if let Some(expired) = &self.expired {
                            expired.inc();
                        }
                    }
                    Err(Error::LeaseNotFound { .. } | Error::NotLeader { .. }) => {}
                    Err(e) => {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed")
                    }
                }
            }
            if now.duration_since(checkpointed) >= self.checkpoint_every {
                checkpointed = now;
                let leases = lessor.checkpoints(now);
                if !leases.is_empty()
                    && let Err(e) = self
                        .backend
                        .write(common_meta::kv::Command::LeaseCheckpoint { leases })
                        .await
                {
                    tracing::debug!(error = %e, "checkpointing lease TTLs failed");
                }
            }
        }
    }
}
