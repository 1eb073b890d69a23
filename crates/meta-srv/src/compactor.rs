//! Automatic compaction of the KV history, as etcd's `--auto-compaction-mode`.
//!
//! - `periodic`: every tenth of the retention, this member notes (time, revision);
//!   once a note is `retention` old, the leader compacts at its revision. So the
//!   history of at least the last `retention` stays readable and watchable.
//! - `revision`: every five minutes (or the retention's tenth when shorter: tests), the
//!   leader compacts at `current - retention` when that is past the compacted revision.
//!
//! Every member keeps notes, so a new leader compacts on time. Only the leader
//! proposes; a compaction that finds the history already compacted further is no
//! error. Compaction goes through raft (`Command::Compact`), so every member discards
//! the same history.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::KvBackend;
use tokio::sync::watch;

use crate::raft::backend::RaftKvBackend;

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// The history of this long.
    Period(Duration),
    /// This many revisions.
    Revisions(i64),
}

/// The leader's compaction task.
pub struct Compactor {
    backend: RaftKvBackend,
    leadership: watch::Receiver<Option<u64>>,
    retention: Retention,
}

impl Compactor {
    /// A compactor of `backend`'s history that acts while `leadership` says this member
    /// leads.
    pub fn new(
        backend: RaftKvBackend,
        leadership: watch::Receiver<Option<u64>>,
        retention: Retention,
    ) -> Self {
        Compactor {
            backend,
            leadership,
            retention,
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let every = match self.retention {
            Retention::Period(period) => (period / 10).max(Duration::from_millis(100)),
            Retention::Revisions(_) => Duration::from_secs(300),
        };
        let mut notes: VecDeque<(Instant, i64)> = VecDeque::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                stopping = stop.wait_for(|s| *s) => {
                    drop(stopping);
                    return;
                }
            }
            let current = self.backend.local_revision();
            let target = match self.retention {
                Retention::Period(period) => {
                    let now = Instant::now();
                    notes.push_back((now, current));
                    let mut due = None;
                    while let Some(&(at, revision)) = notes.front() {
                        if now.duration_since(at) < period {
                            break;
                        }
                        due = Some(revision);
                        notes.pop_front();
                    }
                    due
                }
                Retention::Revisions(keep) => Some(current - keep),
            };
            let Some(target) = target else { continue };
            let leads = self.leadership.borrow().is_some();
            if !leads || target <= self.backend.store().compacted() || target < 1 {
                continue;
            }
            match self.backend.compact(target).await {
                Ok(_) => tracing::info!(revision = target, "compacted the KV history"),
                Err(Error::Compacted { .. } | Error::NotLeader { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, revision = target, "automatic compaction failed")
                }
            }
        }
    }
}
