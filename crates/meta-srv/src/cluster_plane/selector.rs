//! Placement of new regions: which datanode leads each region, and which hold its
//! followers. A pure function of the candidates it is given (the caller keeps only
//! active, alive datanodes), so every policy is table-tested.
//!
//! - `round_robin` (default): in turn over the candidates by id, continuing where the
//!   previous placement stopped, so tables spread evenly.
//! - `lease_based`: at random among the candidates.
//! - `load_based`: the candidate with the fewest regions (its heartbeat stats plus what
//!   this placement gave it) first.
//!
//! Followers go to other nodes than the leader, preferring zones (the `zone` label)
//! the region does not use yet, then the least loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::SelectorKind;

/// A datanode that may take regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its id.
    pub id: u64,
    /// Its address, as it registered.
    pub addr: String,
    /// Its `zone` label, if any.
    pub zone: Option<String>,
    /// Regions it holds now (from its heartbeats).
    pub regions: usize,
}

/// Where one region goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node that leads it.
    pub leader: u64,
    /// Nodes that follow it.
    pub followers: Vec<u64>,
}

/// Places regions by one policy; keeps the round-robin position between calls.
#[derive(Debug, Default)]
pub struct Selector {
    kind: SelectorKind,
    next: AtomicUsize,
}

impl Selector {
    /// A selector of policy `kind`.
    pub fn new(kind: SelectorKind) -> Self {
        Selector {
            kind,
            next: AtomicUsize::new(0),
        }
    }

    /// Places `regions` regions with `followers` followers each on `candidates`.
    /// Errors name what is missing.
    pub fn place(
        &self,
        candidates: &[Candidate],
        regions: usize,
        followers: usize,
    ) -> Result<Vec<Placement>, String> {
        if candidates.is_empty() {
            return Err("no datanode can take regions".to_string());
        }
        if followers >= candidates.len() {
            return Err(format!(
                "{followers} followers per region need {} datanodes, and {} can take regions",
                followers + 1,
                candidates.len()
            ));
        }
        let mut sorted = candidates.to_vec();
        sorted.sort_by_key(|c| c.id);
        let mut load: BTreeMap<u64, usize> = sorted.iter().map(|c| (c.id, c.regions)).collect();
        let leaders: Vec<u64> = match self.kind {
            SelectorKind::RoundRobin => {
                let start = self.next.fetch_add(regions, Ordering::Relaxed);
                (0..regions)
                    .map(|i| sorted[(start + i) % sorted.len()].id)
                    .collect()
            }
            SelectorKind::LeaseBased => (0..regions)
                .map(|_| sorted[random_below(sorted.len())].id)
                .collect(),
            SelectorKind::LoadBased => (0..regions)
                .map(|_| {
                    // Fewest regions first; ties to the lowest id. Non-empty: checked above.
                    let (id, _) = load
                        .iter()
                        .min_by_key(|(id, n)| (**n, **id))
                        .map(|(id, n)| (*id, *n))
                        .unwrap_or((sorted[0].id, 0));
                    *load.entry(id).or_default() += 1;
                    id
                })
                .collect(),
        };
        if self.kind != SelectorKind::LoadBased {
            for leader in &leaders {
                *load.entry(*leader).or_default() += 1;
            }
        }
        let zone_of: BTreeMap<u64, Option<&str>> =
            sorted.iter().map(|c| (c.id, c.zone.as_deref())).collect();
        let mut out = Vec::with_capacity(regions);
        for leader in leaders {
            let mut used_nodes = BTreeSet::from([leader]);
            let mut used_zones: BTreeSet<Option<&str>> = BTreeSet::from([zone_of[&leader]]);
            let mut chosen = Vec::with_capacity(followers);
            for _ in 0..followers {
                let pick = sorted
                    .iter()
                    .filter(|c| !used_nodes.contains(&c.id))
                    .min_by_key(|c| {
                        let new_zone = c.zone.is_some() && !used_zones.contains(&c.zone.as_deref());
                        (!new_zone, load[&c.id], c.id)
                    })
                    .map(|c| c.id);
                let Some(pick) = pick else { break };
                used_nodes.insert(pick);
                used_zones.insert(zone_of[&pick]);
                *load.entry(pick).or_default() += 1;
                chosen.push(pick);
            }
            out.push(Placement {
                leader,
                followers: chosen,
            });
        }
        Ok(out)
    }
}

/// A random number below `n` (n > 0); placement needs spread, not secrecy.
fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: the clock's nanoseconds spread well enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return nanos as usize % n;
    }
    (u64::from_le_bytes(bytes) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, zone: &str, regions: usize) -> Candidate {
        Candidate {
            id,
            addr: String::new(),
            zone: (!zone.is_empty()).then(|| zone.to_string()),
            regions,
        }
    }

    fn leaders(p: &[Placement]) -> Vec<u64> {
        p.iter().map(|p| p.leader).collect()
    }

    #[test]
    fn round_robin_continues_across_tables() {
        let selector = Selector::new(SelectorKind::RoundRobin);
        let nodes = [node(3, "", 0), node(1, "", 0), node(2, "", 0)];
        assert_eq!(
            leaders(&selector.place(&nodes, 4, 0).unwrap()),
            [1, 2, 3, 1]
        );
        assert_eq!(leaders(&selector.place(&nodes, 2, 0).unwrap()), [2, 3]);
    }

    #[test]
    fn load_based_fills_the_emptiest_first() {
        let selector = Selector::new(SelectorKind::LoadBased);
        let nodes = [node(1, "", 5), node(2, "", 0), node(3, "", 1)];
        assert_eq!(
            leaders(&selector.place(&nodes, 5, 0).unwrap()),
            [2, 2, 3, 2, 3]
        );
    }

    #[test]
    fn lease_based_stays_among_the_candidates() {
        let selector = Selector::new(SelectorKind::LeaseBased);
        let nodes = [node(7, "", 0), node(9, "", 0)];
        let placed = selector.place(&nodes, 200, 0).unwrap();
        assert!(placed.iter().all(|p| p.leader == 7 || p.leader == 9));
        // 200 fair coin flips all landing on one side: about 1 in 10^60.
        assert!(placed.iter().any(|p| p.leader == 7) && placed.iter().any(|p| p.leader == 9));
    }

    #[test]
    fn followers_spread_over_zones_and_never_share_the_leaders_node() {
        let selector = Selector::new(SelectorKind::RoundRobin);
        let nodes = [
            node(1, "a", 0),
            node(2, "a", 0),
            node(3, "b", 0),
            node(4, "c", 0),
        ];
        for p in selector.place(&nodes, 8, 2).unwrap() {
            let mut all = vec![p.leader];
            all.extend(&p.followers);
            let zones: BTreeSet<_> = all
                .iter()
                .map(|id| nodes.iter().find(|n| n.id == *id).unwrap().zone.clone())
                .collect();
            assert_eq!(zones.len(), 3, "three zones for three replicas: {p:?}");
            assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 3, "{p:?}");
        }
    }

    #[test]
    fn nothing_to_place_on_is_an_error_naming_what_is_missing() {
        let selector = Selector::default();
        assert!(
            selector
                .place(&[], 1, 0)
                .unwrap_err()
                .contains("no datanode")
        );
        let err = selector.place(&[node(1, "", 0)], 1, 1).unwrap_err();
        assert!(err.contains("need 2 datanodes"), "{err}");
    }
}
