//! Lease expiry: the [`Lessor`] keeps each lease's deadline in memory, by the clock of
//! the one member that decides expiry (the raft leader, or a local backend), and says
//! which leases have expired; the owner then revokes them through its write path, so
//! the revoke (and the deletion of the lease's keys) is a replicated, ordered write
//! like any other.
//!
//! The store keeps only what survives that member: each lease's granted TTL and the
//! last checkpointed remaining TTL. A new decider [`Lessor::load`]s them and gives each
//! lease its remaining TTL (or the whole TTL when none was checkpointed) plus an
//! extension (one election timeout on a new raft leader), so a lease never ends
//! earlier than its holder could know, and a run of leader changes cannot keep it
//! alive for ever once checkpoints record what is left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meta_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::kv::command::{Applied, Command};
use crate::kv::sled_store::SledKvStore;
use crate::kv::types::{LeaseGrant, LeaseTimeToLive};

/// The longest TTL a lease may be granted, in seconds (etcd's bound).
pub const MAX_TTL_SECS: i64 = 9_000_000_000;

/// How long after its deadline an expired lease whose revoke has not gone through is
/// offered again.
const RETRY_REVOKE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    ttl_secs: i64,
    /// When a revoke was last offered for it (so it is not offered at every tick).
    offered: Option<Instant>,
}

/// Deadlines of leases, by the deciding member's monotonic clock.
#[derive(Debug)]
pub struct Lessor {
    min_ttl_secs: i64,
    deadlines: Mutex<HashMap<i64, Deadline>>,
}

impl Lessor {
    /// A lessor that raises TTLs below `min_ttl_secs` to it.
    pub fn new(min_ttl_secs: i64) -> Self {
        Lessor {
            min_ttl_secs: min_ttl_secs.max(1),
            deadlines: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Deadline>> {
        // Deadlines are plain values: a panicking holder leaves none half-written.
        self.deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The smallest TTL granted.
    pub fn min_ttl_secs(&self) -> i64 {
        self.min_ttl_secs
    }

    /// The TTL a grant of `ttl_secs` gets: raised to the minimum (as etcd does);
    /// negative or above [`MAX_TTL_SECS`] is refused.
    pub fn grantable_ttl(&self, ttl_secs: i64) -> Result<i64> {
        if ttl_secs < 0 {
            return Err(Error::invalid_argument(format!(
                "lease TTL {ttl_secs} is negative"
            )));
        }
        if ttl_secs > MAX_TTL_SECS {
            return Err(Error::invalid_argument(format!(
                "lease TTL {ttl_secs} is too large (at most {MAX_TTL_SECS} seconds)"
            )));
        }
        Ok(ttl_secs.max(self.min_ttl_secs))
    }

    /// Checks a client-chosen lease id (0 means "pick one").
    pub fn check_id(id: i64) -> Result<()> {
        if id < 0 {
            return Err(Error::invalid_argument(format!(
                "lease id {id} is negative"
            )));
        }
        Ok(())
    }

    /// A fresh random lease id (positive), for a grant that did not name one.
    pub fn new_id() -> Result<i64> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| Error::Unavailable {
            message: format!("no randomness for a lease id: {e}"),
        })?;
        // Positive and non-zero, as etcd's ids are.
        Ok((i64::from_be_bytes(bytes) & i64::MAX).max(1))
    }

    /// Starts timing a lease just granted.
    pub fn granted(&self, id: i64, ttl_secs: i64, now: Instant) {
        self.lock().insert(
            id,
            Deadline {
                at: now + secs(ttl_secs),
                ttl_secs,
                offered: None,
            },
        );
    }

    /// Renews a lease for another TTL; its TTL, or `None` when it is not timed here.
    pub fn renew(&self, id: i64, now: Instant) -> Option<i64> {
        let mut deadlines = self.lock();
        let deadline = deadlines.get_mut(&id)?;
        deadline.at = now + secs(deadline.ttl_secs);
        deadline.offered = None;
        Some(deadline.ttl_secs)
    }

    /// Forgets a revoked lease.
    pub fn revoked(&self, id: i64) {
        self.lock().remove(&id);
    }

    /// Forgets every lease (this member stopped deciding).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Takes over the leases of the store: each gets its checkpointed remaining TTL (or
    /// its whole TTL) plus `extend` from `now`. Leases already timed here keep their
    /// deadline.
    pub fn load(&self, leases: &[(i64, pb::LeaseRecord)], extend: Duration, now: Instant) {
        let stored: std::collections::HashSet<i64> = leases.iter().map(|(id, _)| *id).collect();
        let mut deadlines = self.lock();
        deadlines.retain(|id, _| stored.contains(id));
        for (id, record) in leases {
            deadlines.entry(*id).or_insert_with(|| {
                let left = if record.remaining_ms > 0 {
                    Duration::from_millis(record.remaining_ms.unsigned_abs())
                } else {
                    secs(record.ttl_secs)
                };
                Deadline {
                    at: now + left + extend,
                    ttl_secs: record.ttl_secs,
                    offered: None,
                }
            });
        }
    }

    /// Time left of a lease, if timed here.
    pub fn remaining(&self, id: i64, now: Instant) -> Option<Duration> {
        self.lock()
            .get(&id)
            .map(|d| d.at.saturating_duration_since(now))
    }

    /// Leases past their deadline whose revoke is due to be offered (first time, or the
    /// last offer is [`RETRY_REVOKE`] old); marks them offered.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let mut out = Vec::new();
        for (id, deadline) in self.lock().iter_mut() {
            let due = deadline.at <= now
                && deadline
                    .offered
                    .is_none_or(|at| now.duration_since(at) >= RETRY_REVOKE);
            if due {
                deadline.offered = Some(now);
                out.push(*id);
            }
        }
        out.sort_unstable();
        out
    }

    /// What to checkpoint: every timed lease's remaining TTL in ms (at least 1).
    pub fn checkpoints(&self, now: Instant) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = self
            .lock()
            .iter()
            .map(|(id, d)| {
                let left = d.at.saturating_duration_since(now).as_millis();
                (*id, i64::try_from(left).unwrap_or(i64::MAX).max(1))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// How many leases are timed here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no lease is timed here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn secs(ttl_secs: i64) -> Duration {
    Duration::from_secs(ttl_secs.max(0).unsigned_abs())
}

/// Seconds left, rounded up, as a TTL answer shows them.
pub fn ttl_secs_left(left: Duration) -> i64 {
    let millis = left.as_millis();
    i64::try_from(millis.div_ceil(1000)).unwrap_or(i64::MAX)
}

/// The write path and state of a member that decides lease expiry itself: what the
/// lease operations below need.
#[async_trait]
pub trait LeaseWriter: Send + Sync + 'static {
    /// The store the leases live in.
    fn store(&self) -> &SledKvStore;
    /// Writes a command through the owner's write path; its answer.
    async fn write(&self, command: Command) -> Result<Applied>;
}

/// Grants a lease (`id` 0: a random one) and starts timing it.
pub async fn grant(
    writer: &dyn LeaseWriter,
    lessor: &Lessor,
    ttl_secs: i64,
    id: i64,
) -> Result<LeaseGrant> {
    Lessor::check_id(id)?;
    let ttl_secs = lessor.grantable_ttl(ttl_secs)?;
    let chosen = id == 0;
    loop {
        let id = if chosen { Lessor::new_id()? } else { id };
        match writer.write(Command::LeaseGrant { id, ttl_secs }).await {
            Ok(_) => {
                lessor.granted(id, ttl_secs, Instant::now());
                return Ok(LeaseGrant { id, ttl: ttl_secs });
            }
            // A random id that happens to be taken: draw again.
            Err(Error::AlreadyExists { .. }) if chosen => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Revokes a lease: its keys are deleted in one revision.
pub async fn revoke(writer: &dyn LeaseWriter, lessor: &Lessor, id: i64) -> Result<()> {
    let answer = writer.write(Command::LeaseRevoke { id }).await;
    if matches!(answer, Ok(_) | Err(Error::LeaseNotFound { .. })) {
        lessor.revoked(id);
    }
    answer.map(drop)
}

/// Renews a lease for another TTL; its TTL. A lease whose remaining TTL was
/// checkpointed has the checkpoint cleared first, so a new decider cannot end it
/// before the TTL granted now has passed.
pub async fn keep_alive(writer: &dyn LeaseWriter, lessor: &Lessor, id: i64) -> Result<i64> {
    let Some(record) = writer.store().lease(id)? else {
        lessor.revoked(id);
        return Err(Error::LeaseNotFound { id });
    };
    if record.remaining_ms > 0 {
        writer
            .write(Command::LeaseCheckpoint {
                leases: vec![(id, 0)],
            })
            .await?;
    }
    let now = Instant::now();
    match lessor.renew(id, now) {
        Some(ttl) => Ok(ttl),
        None => {
            // Not timed here yet (granted before this decider took over and not loaded).
            lessor.granted(id, record.ttl_secs, now);
            Ok(record.ttl_secs)
        }
    }
}

/// What is known of a lease now (`ttl` -1 when it does not exist).
pub fn time_to_live(
    store: &SledKvStore,
    lessor: &Lessor,
    id: i64,
    keys: bool,
) -> Result<LeaseTimeToLive> {
    let Some(record) = store.lease(id)? else {
        return Ok(LeaseTimeToLive {
            id,
            ttl: -1,
            granted_ttl: 0,
            keys: Vec::new(),
        });
    };
    let left = lessor
        .remaining(id, Instant::now())
        .unwrap_or_else(|| secs(record.ttl_secs));
    Ok(LeaseTimeToLive {
        id,
        ttl: ttl_secs_left(left),
        granted_ttl: record.ttl_secs,
        keys: if keys {
            store.lease_keys(id)?
        } else {
            Vec::new()
        },
    })
}

/// How often a local expiry task looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Runs expiry for a backend that decides it itself: revokes each expired lease
/// through `writer` while the backend lives. Needs a tokio runtime.
pub fn spawn_expiry(lessor: Arc<Lessor>, writer: Weak<dyn LeaseWriter>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let expired = lessor.expired(Instant::now());
            if expired.is_empty() {
                continue;
            }
            let Some(writer) = writer.upgrade() else {
                return;
            };
            for id in expired {
                if let Err(e) = revoke(&*writer, &lessor, id).await
                    && !matches!(e, Error::LeaseNotFound { .. })
                {
                    tracing::warn!(lease = id, error = %e, "revoking an expired lease failed");
                }
            }
        }
    });
}

/// The lease state of a local backend: its lessor and whether expiry runs.
#[derive(Debug)]
pub(crate) struct LocalLeases {
    pub lessor: Arc<Lessor>,
    expiry: std::sync::OnceLock<()>,
}

impl LocalLeases {
    /// Loads the store's leases (whole TTLs: a local store has no checkpoints to trust
    /// beyond them) and starts expiry when a runtime is at hand.
    pub fn open(store: &SledKvStore, writer: Weak<dyn LeaseWriter>) -> Result<Self> {
        let lessor = Arc::new(Lessor::new(1));
        lessor.load(&store.leases()?, Duration::ZERO, Instant::now());
        let leases = LocalLeases {
            lessor,
            expiry: std::sync::OnceLock::new(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            leases.start(writer);
        }
        Ok(leases)
    }

    /// Starts the expiry task once (every lease call makes sure of it).
    pub fn start(&self, writer: Weak<dyn LeaseWriter>) {
        self.expiry
            .get_or_init(|| spawn_expiry(self.lessor.clone(), writer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_raised_to_the_minimum_and_bounded() {
        let lessor = Lessor::new(2);
        assert_eq!(lessor.grantable_ttl(0).unwrap(), 2);
        assert_eq!(lessor.grantable_ttl(1).unwrap(), 2);
        assert_eq!(lessor.grantable_ttl(60).unwrap(), 60);
        assert!(lessor.grantable_ttl(-1).is_err());
        assert!(lessor.grantable_ttl(MAX_TTL_SECS + 1).is_err());
    }

    #[test]
    fn a_lease_expires_once_its_ttl_passes_unless_renewed_and_is_offered_again_later() {
        let lessor = Lessor::new(1);
        let start = Instant::now();
        lessor.granted(7, 10, start);
        assert!(lessor.expired(start + Duration::from_secs(9)).is_empty());
        assert_eq!(lessor.renew(7, start + Duration::from_secs(9)), Some(10));
        assert!(lessor.expired(start + Duration::from_secs(18)).is_empty());
        let late = start + Duration::from_secs(19);
        assert_eq!(lessor.expired(late), vec![7]);
        assert!(lessor.expired(late).is_empty(), "offered once");
        assert_eq!(lessor.expired(late + RETRY_REVOKE), vec![7], "then again");
        lessor.revoked(7);
        assert!(lessor.expired(late + Duration::from_secs(60)).is_empty());
        assert_eq!(lessor.renew(7, late), None);
    }

    #[test]
    fn a_new_decider_gives_the_checkpointed_remainder_plus_the_extension() {
        let lessor = Lessor::new(1);
        let now = Instant::now();
        let records = [
            (
                1,
                pb::LeaseRecord {
                    ttl_secs: 100,
                    remaining_ms: 3_000,
                },
            ),
            (
                2,
                pb::LeaseRecord {
                    ttl_secs: 5,
                    remaining_ms: 0,
                },
            ),
        ];
        lessor.load(&records, Duration::from_secs(1), now);
        assert_eq!(lessor.remaining(1, now), Some(Duration::from_secs(4)));
        assert_eq!(lessor.remaining(2, now), Some(Duration::from_secs(6)));
        assert_eq!(lessor.checkpoints(now), vec![(1, 4_000), (2, 6_000)]);
    }
}
