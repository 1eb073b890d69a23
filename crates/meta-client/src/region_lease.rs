//! `RegionLeaseKeeper`: the node's side of region leases. One deadline per region, on
//! the node's own monotonic clock, counted from when the heartbeat that won it was
//! *sent* (the leader echoes that instant): an answer that took long shortens the
//! lease, so the node always stops writing no later than the leader assumes.
//!
//! A region is writable only while it holds an unexpired leader lease. At start every
//! region is read-only until a lease grants it leadership; a downgrade instruction
//! revokes leadership at once. `HeartbeatTask` renews the keeper from every answer,
//! tells the node's handler about role changes and expiries, and closes the regions
//! the leader calls closeable: a datanode only asks [`RegionLeaseKeeper::writable`]
//! before each write.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use meta_proto::v1 as pb;

/// What a lease lets the node do with a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRole {
    /// Write it.
    Leader,
    /// Serve it read-only.
    Follower,
    /// Keep it open, write nothing: it is being moved away.
    Downgrading,
}

/// A role change the keeper saw: the region's role now (None: no lease any more, the
/// region is read-only).
pub type RoleChange = (u64, Option<LeaseRole>);

#[derive(Debug, Clone, Copy)]
struct Held {
    role: LeaseRole,
    until: Instant,
}

/// What one renewal changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Regions whose role changed.
    pub changes: Vec<RoleChange>,
    /// Regions the leader says to close.
    pub close: Vec<u64>,
}

/// What a keeper reports to an observer (the simulator's history, for the checker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A leader lease on `region` taken at `from`, running until `until`.
    Leader {
        /// The region.
        region: u64,
        /// When the answer granting it was taken.
        from: Instant,
        /// When it ends.
        until: Instant,
    },
    /// Leadership of `region` ended early at `at` (revoked, closed, forgotten).
    Ended {
        /// The region.
        region: u64,
        /// When.
        at: Instant,
    },
}

/// Receives a keeper's lease events.
pub type LeaseObserver = Box<dyn Fn(LeaseEvent) + Send + Sync>;

/// Per-region lease deadlines of one node; see the module doc.
pub struct RegionLeaseKeeper {
    origin: Instant,
    /// How fast this node's clock runs against real time, in parts per million
    /// (1,000,000: exact); a simulator's skew.
    rate_ppm: std::sync::atomic::AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    observer: std::sync::OnceLock<LeaseObserver>,
}

impl std::fmt::Debug for RegionLeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionLeaseKeeper")
            .field("held", &self.held().len())
            .finish()
    }
}

impl Default for RegionLeaseKeeper {
    fn default() -> Self {
        RegionLeaseKeeper {
            origin: Instant::now(),
            rate_ppm: std::sync::atomic::AtomicU64::new(1_000_000),
            held: Mutex::new(HashMap::new()),
            observer: std::sync::OnceLock::new(),
        }
    }
}

impl RegionLeaseKeeper {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        // Every critical section is one map update: never torn.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports every leader lease taken and ended early to `observer` (once; later
    /// calls are ignored).
    pub fn observe(&self, observer: LeaseObserver) {
        let _ = self.observer.set(observer);
    }

    fn report(&self, event: LeaseEvent) {
        if let Some(observer) = self.observer.get() {
            observer(event);
        }
    }

    /// Makes this node's clock run at `rate` times real time (a simulated skew: 0.95
    /// is 5% slow). Set it before the first lease.
    pub fn skew(&self, rate: f64) {
        let ppm = (rate * 1e6).round().max(1.0) as u64;
        self.rate_ppm
            .store(ppm, std::sync::atomic::Ordering::Relaxed);
    }

    fn rate(&self) -> f64 {
        self.rate_ppm.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
    }

    /// The keeper's clock now, in ms from its origin: what a heartbeat carries as its
    /// send instant.
    pub fn now_ms(&self) -> u64 {
        (self.origin.elapsed().as_secs_f64() * 1e3 * self.rate()) as u64
    }

    /// The real instant at which the keeper's clock reads `ms`.
    pub fn instant(&self, ms: u64) -> Instant {
        self.origin + Duration::from_secs_f64(ms as f64 / 1e3 / self.rate())
    }

    /// The region's role now; None when it holds no unexpired lease.
    pub fn role(&self, region: u64) -> Option<LeaseRole> {
        self.role_at(region, Instant::now())
    }

    /// The region's role at `now`.
    pub fn role_at(&self, region: u64, now: Instant) -> Option<LeaseRole> {
        self.held()
            .get(&region)
            .filter(|h| now < h.until)
            .map(|h| h.role)
    }

    /// True while the node holds an unexpired leader lease on `region`: the only
    /// condition under which it may write it.
    pub fn writable(&self, region: u64) -> bool {
        self.role(region) == Some(LeaseRole::Leader)
    }

    /// When the region's lease ends, if it holds one.
    pub fn deadline(&self, region: u64) -> Option<Instant> {
        self.held().get(&region).map(|h| h.until)
    }

    /// Takes the leases of one heartbeat answer (at `now`). Leases already over when
    /// they arrive are ignored.
    pub fn renew(&self, leases: &pb::RegionLeases, now: Instant) -> Renewal {
        // The lease ends when this node's own clock has run `lease_ms` past the send
        // instant (a slow clock holds it longer in real time: the leader's margin).
        let until = self.instant(leases.send_instant_ms.saturating_add(leases.lease_ms));
        let mut renewal = Renewal::default();
        let mut held = self.held();
        if until > now {
            for (regions, role) in [
                (&leases.leader, LeaseRole::Leader),
                (&leases.follower, LeaseRole::Follower),
                (&leases.downgrading, LeaseRole::Downgrading),
            ] {
                for region in regions {
                    let before = held.get(region).filter(|h| now < h.until).map(|h| h.role);
                    let entry = held.entry(*region).or_insert(Held { role, until });
                    // An answer overtaken by a later one never shortens a lease of
                    // the same role.
                    if entry.role != role || entry.until < until {
                        entry.until = until;
                    }
                    entry.role = role;
                    if role == LeaseRole::Leader {
                        self.report(LeaseEvent::Leader {
                            region: *region,
                            from: now,
                            until: entry.until,
                        });
                    } else if before == Some(LeaseRole::Leader) {
                        self.report(LeaseEvent::Ended {
                            region: *region,
                            at: now,
                        });
                    }
                    if before != Some(role) {
                        renewal.changes.push((*region, Some(role)));
                    }
                }
            }
        }
        for region in &leases.closeable {
            if let Some(h) = held.remove(region)
                && now < h.until
            {
                renewal.changes.push((*region, None));
                if h.role == LeaseRole::Leader {
                    self.report(LeaseEvent::Ended {
                        region: *region,
                        at: now,
                    });
                }
            }
            renewal.close.push(*region);
        }
        renewal
    }

    /// Stops writing `region` at once (a downgrade): a leader lease becomes a
    /// downgrading one. True when it was a leader.
    pub fn revoke(&self, region: u64) -> bool {
        let revoked = match self.held().get_mut(&region) {
            Some(h) if h.role == LeaseRole::Leader => {
                h.role = LeaseRole::Downgrading;
                true
            }
            _ => false,
        };
        if revoked {
            self.report(LeaseEvent::Ended {
                region,
                at: Instant::now(),
            });
        }
        revoked
    }

    /// Forgets `region` (closed or dropped).
    pub fn forget(&self, region: u64) {
        let held = self.held().remove(&region);
        if held.is_some_and(|h| h.role == LeaseRole::Leader) {
            self.report(LeaseEvent::Ended {
                region,
                at: Instant::now(),
            });
        }
    }

    /// Removes the leases over at `now`, returning their regions.
    pub fn expire(&self, now: Instant) -> Vec<u64> {
        let mut held = self.held();
        let over: Vec<u64> = held
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(r, _)| *r)
            .collect();
        for region in &over {
            held.remove(region);
        }
        over
    }

    /// The earliest lease end, if any lease is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.held().values().map(|h| h.until).min()
    }

    /// Regions with a lease, and their roles (expired ones included until `expire`).
    pub fn snapshot(&self) -> Vec<(u64, LeaseRole, Instant)> {
        let mut all: Vec<_> = self
            .held()
            .iter()
            .map(|(r, h)| (*r, h.role, h.until))
            .collect();
        all.sort_unstable_by_key(|(r, _, _)| *r);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(send: u64, lease: u64, leader: &[u64], closeable: &[u64]) -> pb::RegionLeases {
        pb::RegionLeases {
            send_instant_ms: send,
            lease_ms: lease,
            leader: leader.to_vec(),
            closeable: closeable.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_runs_from_the_send_instant() {
        let keeper = RegionLeaseKeeper::default();
        let at = |ms| keeper.instant(ms);
        // Sent at 1 s, answered at 4 s, 5 s lease: it ends at 6 s, not 9 s.
        let renewal = keeper.renew(&leases(1_000, 5_000, &[7], &[]), at(4_000));
        assert_eq!(renewal.changes, vec![(7, Some(LeaseRole::Leader))]);
        assert_eq!(keeper.role_at(7, at(5_999)), Some(LeaseRole::Leader));
        assert_eq!(keeper.role_at(7, at(6_000)), None);
        // An answer that arrives after its lease would have ended grants nothing.
        let late = keeper.renew(&leases(1_000, 5_000, &[8], &[]), at(6_500));
        assert!(late.changes.is_empty());
        assert_eq!(keeper.role_at(8, at(6_500)), None);
        assert_eq!(keeper.expire(at(6_500)), vec![7]);
        assert_eq!(keeper.next_expiry(), None);
    }

    #[test]
    fn a_slow_clock_holds_a_lease_longer_in_real_time() {
        let keeper = RegionLeaseKeeper::default();
        keeper.skew(0.5);
        keeper.renew(&leases(0, 1_000, &[7], &[]), keeper.instant(0));
        // 1 s on a clock at half speed is 2 s of real time.
        let real = keeper.deadline(7).unwrap() - keeper.instant(0);
        assert_eq!(real.as_millis(), 2_000);
    }

    #[test]
    fn an_overtaken_answer_never_shortens_a_lease() {
        let keeper = RegionLeaseKeeper::default();
        let at = |ms| keeper.instant(ms);
        keeper.renew(&leases(2_000, 5_000, &[7], &[]), at(2_100));
        let renewal = keeper.renew(&leases(1_000, 5_000, &[7], &[]), at(2_200));
        assert!(renewal.changes.is_empty());
        assert_eq!(keeper.deadline(7), Some(at(7_000)));
    }

    #[test]
    fn revoke_and_close() {
        let keeper = RegionLeaseKeeper::default();
        let now = keeper.instant(10);
        keeper.renew(&leases(0, 60_000, &[1, 2], &[]), now);
        assert!(keeper.revoke(1));
        assert!(!keeper.revoke(1), "already downgrading");
        assert_eq!(keeper.role_at(1, now), Some(LeaseRole::Downgrading));
        let renewal = keeper.renew(&leases(5, 60_000, &[], &[2, 3]), now);
        assert_eq!(renewal.changes, vec![(2, None)]);
        assert_eq!(renewal.close, vec![2, 3]);
        assert_eq!(keeper.role_at(2, now), None);
    }
}
