//! Hotspot split: routes whose load stays high are split at the middle of their load.
//!
//! Nodes report each route's reads and writes since their previous stats, with sampled
//! keys (`GroupStat` in their heartbeats); [`RouteLoads`] sums them over one window.
//! At the end of each window [`Hotspots::close`] scores every route (writes x 4 +
//! reads, per second) and splits a route hot for `hotspot_windows` windows in a row
//! at the weighted median of its sampled keys; the halves are then left alone for
//! `hotspot_cooldown_ms`, and no split is made once the catalog holds `max_routes`.
//! Everything here is leader memory, started again by a new leader; the splits are
//! ordinary split procedures.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common_meta::model::route::{RouteCatalog, RouteDescriptor, RouteState};
use common_meta::time::unix_ms;
use meta_proto::v1 as pb;
use tokio::sync::watch;

use crate::cluster_plane::supervisor::Supervisor;
use crate::config::RoutesConfig;
use crate::procedure_host::ProcedureHost;
use crate::procedures::route::{RouteContext, procedure_id, split};

/// Samples kept per route and window; more are thinned, their weight kept.
const MAX_SAMPLES: usize = 1_024;

/// Writes weigh this much more than reads in a route's score.
pub const WRITE_WEIGHT: u64 = 4;

/// One route's load in the current window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gathered {
    /// Reads served.
    pub reads: u64,
    /// Writes served.
    pub writes: u64,
    /// Sampled keys and the load each stands for.
    pub samples: Vec<(Vec<u8>, u64)>,
}

impl Gathered {
    /// writes x 4 + reads.
    pub fn score(&self) -> u64 {
        self.writes
            .saturating_mul(WRITE_WEIGHT)
            .saturating_add(self.reads)
    }

    fn add(&mut self, load: &pb::RouteLoad) {
        self.reads = self.reads.saturating_add(load.reads);
        self.writes = self.writes.saturating_add(load.writes);
        self.samples
            .extend(load.samples.iter().map(|s| (s.key.clone(), s.weight)));
        if self.samples.len() > MAX_SAMPLES {
            // Keep every other sample (in key order), carrying its neighbour's weight.
            self.samples.sort();
            let mut thinned = Vec::with_capacity(self.samples.len() / 2 + 1);
            for pair in self.samples.chunks(2) {
                let weight = pair.iter().map(|(_, w)| *w).fold(0u64, u64::saturating_add);
                thinned.push((pair[0].0.clone(), weight));
            }
            self.samples = thinned;
        }
    }
}

/// The load reported in the current window, by route (leader memory).
#[derive(Default)]
pub struct RouteLoads {
    state: Mutex<(u64, HashMap<u64, Gathered>)>,
}

impl RouteLoads {
    fn state(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Gathered>)> {
        // Each critical section is a single update: never torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one node's report, made in leadership `term` (a newer term starts empty).
    pub fn record(&self, term: u64, groups: &[pb::GroupStat]) {
        if groups.iter().all(|g| g.routes.is_empty()) {
            return;
        }
        let mut state = self.state();
        if term > state.0 {
            *state = (term, HashMap::new());
        }
        if term < state.0 {
            return;
        }
        for load in groups.iter().flat_map(|g| &g.routes) {
            state.1.entry(load.route_id).or_default().add(load);
        }
    }

    /// Ends the window: what it gathered, if it belongs to `term`.
    pub fn take(&self, term: u64) -> HashMap<u64, Gathered> {
        let mut state = self.state();
        if state.0 != term {
            *state = (term, HashMap::new());
            return HashMap::new();
        }
        std::mem::take(&mut state.1)
    }
}

/// The key splitting `route`'s sampled load in two halves: the weighted median of
/// the samples inside the route and above its start; None without one.
pub fn split_key(route: &RouteDescriptor, samples: &[(Vec<u8>, u64)]) -> Option<Vec<u8>> {
    let mut keys: BTreeMap<&[u8], u64> = BTreeMap::new();
    for (key, weight) in samples {
        if route.contains(key) && key.as_slice() != route.start.as_slice() && *weight > 0 {
            let total = keys.entry(key.as_slice()).or_default();
            *total = total.saturating_add(*weight);
        }
    }
    let total: u64 = keys.values().fold(0, |a, w| a.saturating_add(*w));
    let mut seen = 0u64;
    for (key, weight) in &keys {
        seen = seen.saturating_add(*weight);
        if seen.saturating_mul(2) >= total {
            return Some(key.to_vec());
        }
    }
    None
}

/// A split the hotspot detector decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The hot route.
    pub route_id: u64,
    /// Where to split it.
    pub key: Vec<u8>,
}

/// The detector's memory across windows (pure: time and load passed in).
#[derive(Debug, Default)]
pub struct Hotspots {
    /// Consecutive hot windows, by route.
    streak: HashMap<u64, u32>,
    /// Routes split, with the end of their halves' cooldown (unix ms).
    cooling: HashMap<u64, u64>,
}

impl Hotspots {
    /// Scores the window that ended at `now_ms` and answers the splits to make.
    pub fn close(
        &mut self,
        window: &HashMap<u64, Gathered>,
        catalog: &RouteCatalog,
        config: &RoutesConfig,
        now_ms: u64,
    ) -> Vec<Decision> {
        self.cooling.retain(|_, until| *until > now_ms);
        let window_ms = config.hotspot_window_ms.max(1);
        let mut decisions = Vec::new();
        let mut streak = HashMap::new();
        for route in &catalog.routes {
            let Some(load) = window.get(&route.route_id) else {
                continue;
            };
            let per_second = load.score().saturating_mul(1_000) / window_ms;
            if route.state != RouteState::Active || per_second < config.hotspot_threshold {
                continue;
            }
            let hot = self.streak.get(&route.route_id).copied().unwrap_or(0) + 1;
            let cooling = [Some(route.route_id), route.parent_route_id]
                .into_iter()
                .flatten()
                .any(|id| self.cooling.contains_key(&id));
            let room = (catalog.routes.len() + decisions.len()) < config.max_routes as usize;
            if hot < config.hotspot_windows || cooling || !room {
                streak.insert(route.route_id, hot);
                continue;
            }
            match split_key(route, &load.samples) {
                Some(key) => {
                    self.cooling.insert(
                        route.route_id,
                        now_ms.saturating_add(config.hotspot_cooldown_ms),
                    );
                    decisions.push(Decision {
                        route_id: route.route_id,
                        key,
                    });
                }
                None => {
                    tracing::debug!(route = route.route_id, "hot route with no key to split at");
                    streak.insert(route.route_id, hot);
                }
            }
        }
        // A route not hot in this window starts again.
        self.streak = streak;
        decisions
    }
}

/// The leader's hotspot splitter: closes a window every `hotspot_window_ms` and
/// submits the splits [`Hotspots::close`] decides (none in maintenance mode).
pub async fn run(
    ctx: Arc<RouteContext>,
    (host, supervisor): (Arc<ProcedureHost>, Arc<Supervisor>),
    config: RoutesConfig,
    leadership: watch::Receiver<Option<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    if !config.hotspot_split {
        return;
    }
    let mut hotspots = Hotspots::default();
    let mut led = None;
    let mut ticks = tokio::time::interval(Duration::from_millis(config.hotspot_window_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let term = *leadership.borrow();
        if term != led {
            // A new leadership counts from nothing.
            hotspots = Hotspots::default();
            led = term;
        }
        let Some(term) = term else { continue };
        let window = ctx.plane.loads.take(term);
        if window.is_empty() {
            hotspots.close(&window, &RouteCatalog::default(), &config, unix_ms());
            continue;
        }
        let Some(manager) = host.manager() else {
            continue;
        };
        let paused = supervisor.switches().await.map(|s| s.maintenance);
        let catalog = ctx.catalog().await;
        let (catalog, paused) = match (catalog, paused) {
            (Ok(catalog), Ok(paused)) => (catalog, paused),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "hotspot window skipped");
                continue;
            }
        };
        let decisions = hotspots.close(&window, &catalog, &config, unix_ms());
        if paused {
            continue;
        }
        for Decision { route_id, key } in decisions {
            let procedure = split::SplitRoute::new(ctx.clone(), key.clone(), route_id, "hotspot");
            let id = procedure_id(&format!("hotspot-split-{route_id}"));
            match crate::procedures::route::submit(&manager, id.clone(), Box::new(procedure)).await
            {
                Ok(_) => {
                    tracing::info!(route = route_id, key = ?String::from_utf8_lossy(&key), procedure = %id, "splitting a hot route")
                }
                Err(e) => tracing::info!(route = route_id, error = %e, "hot route not split"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoutesConfig {
        RoutesConfig {
            hotspot_window_ms: 1_000,
            hotspot_threshold: 100,
            hotspot_windows: 3,
            hotspot_cooldown_ms: 10_000,
            max_routes: 10,
            ..RoutesConfig::default()
        }
    }

    fn load(writes: u64, keys: &[&str]) -> Gathered {
        Gathered {
            reads: 0,
            writes,
            samples: keys.iter().map(|k| (k.as_bytes().to_vec(), 1)).collect(),
        }
    }

    #[test]
    fn the_split_key_is_the_weighted_median_inside_the_route() {
        let route = RouteCatalog::initial(1).split_at(b"b").unwrap().routes[1].clone();
        assert_eq!(route.start, b"b");
        let samples = vec![
            (b"a".to_vec(), 100), // outside the route
            (b"b".to_vec(), 100), // its start: never a split key
            (b"c".to_vec(), 1),
            (b"d".to_vec(), 1),
            (b"x".to_vec(), 5),
        ];
        assert_eq!(split_key(&route, &samples), Some(b"x".to_vec()));
        assert_eq!(split_key(&route, &samples[..2]), None);
    }

    #[test]
    fn a_hot_route_splits_after_its_windows_and_then_cools_down() {
        let mut hotspots = Hotspots::default();
        let catalog = RouteCatalog::initial(1);
        let hot: HashMap<u64, Gathered> = [(1, load(50, &["k1", "k2", "k3"]))].into();
        assert!(hotspots.close(&hot, &catalog, &config(), 0).is_empty());
        assert!(hotspots.close(&hot, &catalog, &config(), 1_000).is_empty());
        let decided = hotspots.close(&hot, &catalog, &config(), 2_000);
        assert_eq!(
            decided,
            [Decision {
                route_id: 1,
                key: b"k2".to_vec()
            }]
        );
        // The halves are hot at once, but cool down first.
        let split = catalog.split_at(b"k2").unwrap();
        let halves: HashMap<u64, Gathered> =
            [(2, load(50, &["k1"])), (3, load(50, &["k3"]))].into();
        for at in [3_000, 4_000, 5_000, 11_000] {
            assert!(
                hotspots.close(&halves, &split, &config(), at).is_empty(),
                "{at}"
            );
        }
        assert_eq!(hotspots.close(&halves, &split, &config(), 12_001).len(), 2);
    }

    #[test]
    fn a_cold_or_intermittent_route_is_never_split() {
        let mut hotspots = Hotspots::default();
        let catalog = RouteCatalog::initial(1);
        let hot: HashMap<u64, Gathered> = [(1, load(50, &["k"]))].into();
        // 99 per second: below the threshold.
        let cold: HashMap<u64, Gathered> = [(
            1,
            Gathered {
                reads: 99,
                ..load(0, &["k"])
            },
        )]
        .into();
        for at in 0..20 {
            let window = if at % 3 == 2 { &cold } else { &hot };
            assert!(
                hotspots
                    .close(window, &catalog, &config(), at * 1_000)
                    .is_empty()
            );
        }
    }

    #[test]
    fn no_split_beyond_the_route_cap() {
        let mut hotspots = Hotspots::default();
        let catalog = RouteCatalog::initial(1);
        let hot: HashMap<u64, Gathered> = [(1, load(50, &["k"]))].into();
        let capped = RoutesConfig {
            max_routes: 1,
            ..config()
        };
        for at in 0..10 {
            assert!(
                hotspots
                    .close(&hot, &catalog, &capped, at * 1_000)
                    .is_empty()
            );
        }
    }

    #[test]
    fn loads_sum_per_window_and_a_new_term_starts_empty() {
        let loads = RouteLoads::default();
        let report = |writes| {
            vec![pb::GroupStat {
                group_id: 1,
                leader: true,
                routes: vec![pb::RouteLoad {
                    route_id: 1,
                    reads: 1,
                    writes,
                    samples: (0..MAX_SAMPLES as u64)
                        .map(|i| pb::KeySample {
                            key: i.to_be_bytes().to_vec(),
                            weight: 1,
                        })
                        .collect(),
                }],
            }]
        };
        loads.record(1, &report(2));
        loads.record(1, &report(3));
        let window = loads.take(1);
        assert_eq!((window[&1].reads, window[&1].writes), (2, 5));
        let weight: u64 = window[&1].samples.iter().map(|(_, w)| w).sum();
        assert!(window[&1].samples.len() <= MAX_SAMPLES);
        assert_eq!(weight, 2 * MAX_SAMPLES as u64, "thinning keeps the weight");
        assert!(loads.take(1).is_empty(), "a window is taken once");
        loads.record(1, &report(2));
        loads.record(2, &report(7));
        assert_eq!(
            loads.take(2)[&1].writes,
            7,
            "the older term's load is dropped"
        );
    }
}
