//! What the supervisor decides to move, as pure functions of the routes, the nodes'
//! health and the work in flight (table-tested below).

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster_plane::selector::{Candidate, Selector};

/// One region's leadership, as the routes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lead {
    /// The region.
    pub region: u64,
    /// Its leader.
    pub leader: u64,
    /// Its followers.
    pub followers: Vec<u64>,
    /// The route marks the leader downgrading since this Unix ms (a migration moves
    /// it, or one ended without putting it back).
    pub downgrading_since: Option<u64>,
}

/// A migration to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The regions.
    pub regions: Vec<u64>,
    /// Their leader now.
    pub from: u64,
    /// Where they go.
    pub to: u64,
}

/// Most regions in one migration (a failover of thousands of regions is a few dozen
/// procedures, each a few raft writes per table).
pub const BATCH: usize = 256;

/// Moves the regions of `leads` that `wanted` picks to `candidates` (never to their
/// leader), in batches per (from, to), at most `budget` batches. A region goes to an
/// alive follower of its own first (it holds a copy), else where `selector` places it.
pub fn plan(
    leads: &[Lead],
    wanted: impl Fn(&Lead) -> bool,
    candidates: &[Candidate],
    selector: &Selector,
    budget: usize,
) -> Vec<Move> {
    let mut batches: BTreeMap<(u64, u64), Vec<u64>> = BTreeMap::new();
    let ids: BTreeSet<u64> = candidates.iter().map(|c| c.id).collect();
    for lead in leads.iter().filter(|l| wanted(l)) {
        let to = match lead.followers.iter().find(|f| ids.contains(f)) {
            Some(follower) => *follower,
            None => {
                let others: Vec<Candidate> = candidates
                    .iter()
                    .filter(|c| c.id != lead.leader)
                    .cloned()
                    .collect();
                match selector.place(&others, 1, 0) {
                    Ok(placed) if !placed.is_empty() => placed[0].leader,
                    _ => continue,
                }
            }
        };
        batches
            .entry((lead.leader, to))
            .or_default()
            .push(lead.region);
    }
    let mut out = Vec::new();
    for ((from, to), regions) in batches {
        for chunk in regions.chunks(BATCH) {
            if out.len() >= budget {
                return out;
            }
            out.push(Move {
                regions: chunk.to_vec(),
                from,
                to,
            });
        }
    }
    out
}

/// Leader moves that even out leader counts across `candidates` (nodes absent from
/// them count as not there), one region per move, at most `budget` moves, while the
/// busiest leads more than `tolerance` regions above the idlest. `movable` says which
/// regions may move now (not cooling down, not moving); a node none of whose regions
/// may move is passed over for the next busiest, so one node cooling down (say, the
/// target of the last round of moves) does not hold the others back.
pub fn balance(
    leads: &[Lead],
    candidates: &[Candidate],
    tolerance: usize,
    movable: impl Fn(u64) -> bool,
    budget: usize,
) -> Vec<Move> {
    let mut count: BTreeMap<u64, Vec<u64>> =
        candidates.iter().map(|c| (c.id, Vec::new())).collect();
    for lead in leads {
        if let Some(regions) = count.get_mut(&lead.leader) {
            regions.push(lead.region);
        }
    }
    let mut out = Vec::new();
    let mut passed_over = std::collections::BTreeSet::new();
    while out.len() < budget {
        let Some((busiest, most)) = count
            .iter()
            .filter(|(id, _)| !passed_over.contains(*id))
            .max_by_key(|(id, r)| (r.len(), std::cmp::Reverse(**id)))
            .map(|(id, r)| (*id, r.len()))
        else {
            break;
        };
        let Some((idlest, least)) = count
            .iter()
            .min_by_key(|(id, r)| (r.len(), **id))
            .map(|(id, r)| (*id, r.len()))
        else {
            break;
        };
        if most <= least + tolerance.max(1) {
            break;
        }
        let regions = count
            .get_mut(&busiest)
            .map(std::mem::take)
            .unwrap_or_default();
        let pick = regions.iter().position(|r| movable(*r));
        let mut regions = regions;
        let Some(i) = pick else {
            // Nothing of the busiest may move now: try the next busiest.
            count.insert(busiest, regions);
            passed_over.insert(busiest);
            continue;
        };
        let region = regions.remove(i);
        count.insert(busiest, regions);
        if let Some(r) = count.get_mut(&idlest) {
            r.push(region);
        }
        out.push(Move {
            regions: vec![region],
            from: busiest,
            to: idlest,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SelectorKind;

    fn candidate(id: u64) -> Candidate {
        Candidate {
            id,
            addr: String::new(),
            zone: None,
            regions: 0,
        }
    }

    fn lead(region: u64, leader: u64, followers: &[u64]) -> Lead {
        Lead {
            region,
            leader,
            followers: followers.to_vec(),
            downgrading_since: None,
        }
    }

    #[test]
    fn failover_prefers_followers_and_batches_per_target() {
        let leads = vec![
            lead(1, 9, &[]),
            lead(2, 9, &[3]),
            lead(3, 9, &[]),
            lead(4, 2, &[]),
        ];
        let candidates = [candidate(2), candidate(3)];
        let selector = Selector::new(SelectorKind::RoundRobin);
        let moves = plan(&leads, |l| l.leader == 9, &candidates, &selector, 10);
        let regions: usize = moves.iter().map(|m| m.regions.len()).sum();
        assert_eq!(regions, 3, "{moves:?}");
        assert!(moves.iter().all(|m| m.from == 9 && m.to != 9));
        assert!(moves.iter().any(|m| m.to == 3 && m.regions.contains(&2)));
        // One batch per target.
        let targets: BTreeSet<u64> = moves.iter().map(|m| m.to).collect();
        assert_eq!(targets.len(), moves.len());
        // A budget of one submits one batch.
        assert_eq!(
            plan(&leads, |l| l.leader == 9, &candidates, &selector, 1).len(),
            1
        );
        // No candidate: nothing to plan.
        assert!(plan(&leads, |l| l.leader == 9, &[], &selector, 10).is_empty());
    }

    #[test]
    fn balancing_evens_leaders_within_the_tolerance() {
        let leads: Vec<Lead> = (0..10).map(|r| lead(r, 1, &[])).collect();
        let candidates = [candidate(1), candidate(2), candidate(3)];
        let moves = balance(&leads, &candidates, 1, |_| true, 100);
        let mut count: BTreeMap<u64, i64> = BTreeMap::from([(1, 10), (2, 0), (3, 0)]);
        for m in &moves {
            *count.get_mut(&m.from).unwrap() -= 1;
            *count.get_mut(&m.to).unwrap() += 1;
        }
        let (max, min) = (
            *count.values().max().unwrap(),
            *count.values().min().unwrap(),
        );
        assert!(max - min <= 1, "{count:?}");
        // Respects the budget and what may not move.
        assert_eq!(balance(&leads, &candidates, 1, |_| true, 2).len(), 2);
        assert!(balance(&leads, &candidates, 1, |_| false, 5).is_empty());
        // Already balanced within the tolerance.
        let even = vec![lead(1, 1, &[]), lead(2, 2, &[]), lead(3, 2, &[])];
        assert!(balance(&even, &candidates[..2], 1, |_| true, 5).is_empty());
    }

    #[test]
    fn a_busiest_node_that_is_cooling_down_does_not_hold_the_others_back() {
        // Node 2 leads six regions that just arrived (cooling down), node 1 five, node
        // 3 one: the moves come from node 1 until it is within the tolerance.
        let mut leads: Vec<Lead> = (0..6).map(|r| lead(r, 2, &[])).collect();
        leads.extend((10..15).map(|r| lead(r, 1, &[])));
        leads.push(lead(20, 3, &[]));
        let candidates = [candidate(1), candidate(2), candidate(3)];
        let cooling = |region: u64| region >= 6;
        let moves = balance(&leads, &candidates, 1, cooling, 100);
        assert!(!moves.is_empty());
        assert!(moves.iter().all(|m| m.from == 1 && m.to == 3), "{moves:?}");
        // 1: 5 -> 3, 3: 1 -> 3; node 2 stays at 6 until it may move.
        assert_eq!(moves.len(), 2, "{moves:?}");
    }
}
