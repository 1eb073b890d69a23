//! The record of simulated datanodes' region leases and writes, and the checker of the
//! promise failover rests on:
//!
//! 1. no two nodes ever hold a valid leader lease on one region at the same instant;
//! 2. no node writes a region outside a leader lease it holds.
//!
//! Every simulated node shares one monotonic clock (the process's), so intervals of
//! different nodes compare directly. A node's leader interval runs from the instant it
//! took the answer granting it to the lease's end, cut short when the lease ended
//! early (a downgrade, a close). A node with a skewed clock ([`crate::sim`]'s skew)
//! records the real instants, which is what the checker must judge.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::region_lease::LeaseEvent;

/// One recorded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Node `node`'s keeper reported a lease event.
    Lease {
        /// The node.
        node: u64,
        /// What happened.
        event: LeaseEvent,
    },
    /// Node `node` wrote entry `entry` of `region` at `at`.
    Write {
        /// The node.
        node: u64,
        /// The region.
        region: u64,
        /// The entry written.
        entry: u64,
        /// When.
        at: Instant,
    },
}

/// An append-only log of events of every simulated node.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    /// Appends `event`.
    pub fn record(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }

    /// Every event so far, in the order recorded.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A broken promise found by [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes held a valid leader lease on `region` at once.
    TwoLeaders {
        /// The region.
        region: u64,
        /// The nodes.
        nodes: (u64, u64),
        /// How long the leases overlapped.
        overlap: std::time::Duration,
    },
    /// `node` wrote `region` outside every leader lease it held.
    WriteWithoutLease {
        /// The region.
        region: u64,
        /// The node.
        node: u64,
        /// The entry written.
        entry: u64,
    },
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Leader intervals checked.
    pub leases: usize,
    /// Writes checked.
    pub writes: usize,
    /// Every violation.
    pub violations: Vec<Violation>,
}

/// Each node's leader intervals per region, cut short where they ended early.
fn intervals(events: &[Event]) -> BTreeMap<u64, HashMap<u64, Vec<(Instant, Instant)>>> {
    let mut out: BTreeMap<u64, HashMap<u64, Vec<(Instant, Instant)>>> = BTreeMap::new();
    for event in events {
        let Event::Lease { node, event } = event else {
            continue;
        };
        match *event {
            LeaseEvent::Leader {
                region,
                from,
                until,
            } => out
                .entry(region)
                .or_default()
                .entry(*node)
                .or_default()
                .push((from, until)),
            LeaseEvent::Ended { region, at } => {
                if let Some(spans) = out.get_mut(&region).and_then(|r| r.get_mut(node)) {
                    for span in spans.iter_mut().filter(|s| s.0 <= at && at < s.1) {
                        span.1 = at;
                    }
                }
            }
        }
    }
    out
}

/// Checks `events` (as [`History::events`] returns them) against both promises.
pub fn check(events: &[Event]) -> Report {
    let spans = intervals(events);
    let mut report = Report::default();
    for (region, nodes) in &spans {
        let mut all: Vec<(Instant, Instant, u64)> = nodes
            .iter()
            .flat_map(|(node, s)| s.iter().map(move |(a, b)| (*a, *b, *node)))
            .filter(|(a, b, _)| a < b)
            .collect();
        report.leases += all.len();
        all.sort_unstable();
        // Sweep: the furthest-reaching lease of each other node seen so far.
        let mut reach: HashMap<u64, Instant> = HashMap::new();
        for (from, until, node) in all {
            for (other, end) in &reach {
                if *other != node && *end > from {
                    report.violations.push(Violation::TwoLeaders {
                        region: *region,
                        nodes: (*other, node),
                        overlap: (*end).min(until) - from,
                    });
                }
            }
            let end = reach.entry(node).or_insert(until);
            *end = (*end).max(until);
        }
    }
    for event in events {
        let Event::Write {
            node,
            region,
            entry,
            at,
        } = *event
        else {
            continue;
        };
        report.writes += 1;
        let covered = spans
            .get(&region)
            .and_then(|n| n.get(&node))
            .is_some_and(|s| s.iter().any(|(a, b)| *a <= at && at < *b));
        if !covered {
            report.violations.push(Violation::WriteWithoutLease {
                region,
                node,
                entry,
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lease(node: u64, region: u64, from: Instant, until: Instant) -> Event {
        Event::Lease {
            node,
            event: LeaseEvent::Leader {
                region,
                from,
                until,
            },
        }
    }

    fn write(node: u64, region: u64, at: Instant) -> Event {
        Event::Write {
            node,
            region,
            entry: 1,
            at,
        }
    }

    #[test]
    fn a_clean_handover_passes() {
        let t = Instant::now();
        let s = |ms| t + Duration::from_millis(ms);
        let events = [
            lease(1, 7, s(0), s(100)),
            lease(1, 7, s(50), s(150)),
            write(1, 7, s(120)),
            Event::Lease {
                node: 1,
                event: LeaseEvent::Ended {
                    region: 7,
                    at: s(130),
                },
            },
            lease(2, 7, s(140), s(300)),
            write(2, 7, s(200)),
        ];
        let report = check(&events);
        assert_eq!(report.violations, vec![]);
        assert_eq!((report.leases, report.writes), (3, 2));
    }

    #[test]
    fn overlapping_leaders_are_caught() {
        let t = Instant::now();
        let s = |ms| t + Duration::from_millis(ms);
        // Node 2 is granted the region while node 1's lease still runs.
        let events = [lease(1, 7, s(0), s(100)), lease(2, 7, s(60), s(200))];
        let report = check(&events);
        assert_eq!(
            report.violations,
            vec![Violation::TwoLeaders {
                region: 7,
                nodes: (1, 2),
                overlap: Duration::from_millis(40),
            }]
        );
    }

    #[test]
    fn a_write_outside_a_lease_is_caught() {
        let t = Instant::now();
        let s = |ms| t + Duration::from_millis(ms);
        let events = [
            lease(1, 7, s(0), s(100)),
            Event::Lease {
                node: 1,
                event: LeaseEvent::Ended {
                    region: 7,
                    at: s(50),
                },
            },
            // After the downgrade, and on a region never leased here.
            write(1, 7, s(60)),
            write(1, 8, s(10)),
        ];
        let report = check(&events);
        assert_eq!(report.violations.len(), 2, "{:?}", report.violations);
    }
}
