//! `LiveNodes`: what the leader knows in memory about heartbeating nodes: a failure
//! detector and the latest region stats per node. Never persisted: a new leader
//! rebuilds it from the next heartbeats.
//!
//! Until the leader has heard a registered node it calls it `unknown`, for one
//! detection window counted from when the leadership started (as if the node had beaten
//! then); a node still silent after that is `failed`. So a new leader neither declares
//! healthy nodes dead nor waits forever on a node that died with the old leader.
//!
//! Region stats arrive full on a stream's first stats and as deltas after (see
//! `NodeStats` in the proto): applying one costs what changed, not what the node holds.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use meta_proto::v1 as pb;

use crate::cluster_plane::failure_detector::{DetectorConfig, Liveness, PhiAccrualDetector};

/// The leader's latest knowledge of one region, kept compact (a leader may hold
/// millions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionLoad {
    /// The role the node reports (`pb::RegionRole`).
    pub role: i32,
    /// Approximate size in bytes.
    pub bytes: u64,
    /// Approximate row count.
    pub rows: u64,
    /// Reads per second.
    pub read_rate: f32,
    /// Writes per second.
    pub write_rate: f32,
}

impl From<&pb::RegionStat> for RegionLoad {
    fn from(stat: &pb::RegionStat) -> Self {
        RegionLoad {
            role: stat.role,
            bytes: stat.approximate_bytes,
            rows: stat.approximate_rows,
            read_rate: stat.read_rate as f32,
            write_rate: stat.write_rate as f32,
        }
    }
}

struct Live {
    /// The stream whose reports count (newer streams of the node replace older ones).
    stream: u64,
    detector: PhiAccrualDetector,
    regions: HashMap<u64, RegionLoad>,
    /// The stream sent full stats: `regions` is every region the node holds.
    full: bool,
    /// The data-plane groups the node hosts (range-sharded data planes), with whether
    /// it leads each, as its latest stats say.
    groups: Vec<(u64, bool)>,
}

/// Why a stream's report was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// The leader's view belongs to a newer term than the stream's.
    Term,
    /// A newer stream of the node took over.
    Replaced,
    /// The node was removed (forgotten) while its stream was open.
    Removed,
}

/// How people read a liveness (metactl, `GET /nodes`).
pub fn liveness_name(liveness: pb::Liveness) -> &'static str {
    match liveness {
        pb::Liveness::Alive => "alive",
        pb::Liveness::Suspect => "suspect",
        pb::Liveness::Failed => "failed",
        pb::Liveness::Unknown | pb::Liveness::Unspecified => "unknown",
    }
}

/// A node's liveness as the leader reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveView {
    /// Alive, suspect, failed, or unknown (not heard since this leader started, for
    /// less than a detection window).
    pub liveness: pb::Liveness,
    /// The detector's phi.
    pub phi: f64,
    /// ms since the last heartbeat, when one was heard.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Regions the node holds, as its stats say.
    pub regions: usize,
}

struct State {
    /// The leadership term this view belongs to.
    term: u64,
    /// When that leadership started, ms since the Unix epoch.
    since_ms: u64,
    nodes: HashMap<u64, Live>,
}

impl State {
    /// Takes a report of a stream in `term`: a newer term resets the view first (in the
    /// same critical section, so no report of the new term is lost to a late reset); an
    /// older one is refused.
    fn enter(&mut self, term: u64, now_ms: u64) -> Result<(), Stale> {
        if term > self.term {
            self.term = term;
            self.since_ms = now_ms;
            self.nodes.clear();
        }
        if term < self.term {
            return Err(Stale::Term);
        }
        Ok(())
    }

    fn current(&mut self, id: u64, stream: u64) -> Result<&mut Live, Stale> {
        match self.nodes.get_mut(&id) {
            Some(live) if live.stream == stream => Ok(live),
            Some(_) => Err(Stale::Replaced),
            None => Err(Stale::Removed),
        }
    }
}

/// The leader's in-memory view of heartbeating nodes.
pub struct LiveNodes {
    config: DetectorConfig,
    state: Mutex<State>,
}

impl LiveNodes {
    /// An empty view with detectors tuned by `config`, for a leadership that started
    /// at `since_ms` (term 0: any term's first report resets it).
    pub fn new(config: DetectorConfig, since_ms: u64) -> Self {
        LiveNodes {
            config,
            state: Mutex::new(State {
                term: 0,
                since_ms,
                nodes: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent (no await, no early exit
        // between related updates): a poisoned lock holds nothing torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts term `term` at `now_ms` if it is newer than the view's (leadership won).
    pub fn advance(&self, term: u64, now_ms: u64) {
        let _ = self.state().enter(term, now_ms);
    }

    /// Makes `stream` (of term `term`) the one whose reports count for node `id`,
    /// unless a newer stream already did. The detector's history carries over; the
    /// regions wait for the stream's full stats.
    pub fn claim(&self, term: u64, id: u64, stream: u64, now_ms: u64) -> Result<(), Stale> {
        let config = self.config;
        let mut state = self.state();
        state.enter(term, now_ms)?;
        let live = state.nodes.entry(id).or_insert_with(|| Live {
            stream,
            detector: PhiAccrualDetector::new(config),
            regions: HashMap::new(),
            full: false,
            groups: Vec::new(),
        });
        if live.stream > stream {
            return Err(Stale::Replaced);
        }
        if live.stream < stream {
            live.stream = stream;
            live.regions.clear();
            live.full = false;
            live.groups.clear();
        }
        Ok(())
    }

    /// Records a heartbeat of node `id` on `stream` at `now_ms` (feeds its detector).
    pub fn beat(&self, term: u64, id: u64, stream: u64, now_ms: u64) -> Result<(), Stale> {
        let mut state = self.state();
        state.enter(term, now_ms)?;
        state.current(id, stream)?.detector.heartbeat(now_ms);
        Ok(())
    }

    /// Applies node `id`'s stats from `stream`: a full report replaces what is known, a
    /// delta updates and removes only the regions it names. Returns the regions touched.
    pub fn apply_stats(
        &self,
        term: u64,
        id: u64,
        stream: u64,
        stats: &pb::NodeStats,
        now_ms: u64,
    ) -> Result<usize, Stale> {
        let mut state = self.state();
        state.enter(term, now_ms)?;
        let live = state.current(id, stream)?;
        if stats.full {
            live.regions.clear();
            live.full = true;
        }
        for stat in &stats.regions {
            live.regions.insert(stat.region_id, RegionLoad::from(stat));
        }
        for region in &stats.removed_regions {
            live.regions.remove(region);
        }
        // Every stats message names every group (never a delta).
        live.groups = stats
            .groups
            .iter()
            .map(|g| (g.group_id, g.leader))
            .collect();
        Ok(stats.regions.len() + stats.removed_regions.len())
    }

    /// Forgets node `id` (it was removed); its open stream, if any, is refused next.
    pub fn forget(&self, id: u64) {
        self.state().nodes.remove(&id);
    }

    /// The regions node `id` holds, as its stats say.
    pub fn region_ids(&self, id: u64) -> Vec<u64> {
        self.state()
            .nodes
            .get(&id)
            .map(|live| live.regions.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every region node `id` holds, once its stream sent full stats (None before).
    pub fn reported(&self, id: u64) -> Option<std::collections::HashSet<u64>> {
        self.state()
            .nodes
            .get(&id)
            .filter(|live| live.full)
            .map(|live| live.regions.keys().copied().collect())
    }

    /// Every data-plane group some node reports hosting.
    pub fn groups(&self) -> std::collections::BTreeSet<u64> {
        self.state()
            .nodes
            .values()
            .flat_map(|live| live.groups.iter().map(|(group, _)| *group))
            .collect()
    }

    /// The node reporting to lead `group` whose heartbeat is the most recent (two may
    /// say so for a moment while the group elects).
    pub fn group_leader(&self, group: u64) -> Option<u64> {
        self.state()
            .nodes
            .iter()
            .filter(|(_, live)| live.groups.contains(&(group, true)))
            .max_by_key(|(_, live)| live.detector.last_heartbeat_ms())
            .map(|(id, _)| *id)
    }

    /// What is known of region `region` on node `id`.
    pub fn region(&self, id: u64, region: u64) -> Option<RegionLoad> {
        self.state()
            .nodes
            .get(&id)
            .and_then(|live| live.regions.get(&region).copied())
    }

    /// Node `id` as seen at `now_ms`.
    pub fn view(&self, id: u64, now_ms: u64) -> LiveView {
        let state = self.state();
        let heard = state
            .nodes
            .get(&id)
            .filter(|live| live.detector.last_heartbeat_ms().is_some());
        match heard {
            None => {
                // Judge the silence since the leadership started, as if the node had
                // beaten then: unknown for one detection window, failed after.
                let mut detector = PhiAccrualDetector::new(self.config);
                detector.heartbeat(state.since_ms);
                let phi = detector.phi(now_ms);
                LiveView {
                    liveness: match detector.liveness(now_ms) {
                        Liveness::Failed => pb::Liveness::Failed,
                        Liveness::Alive | Liveness::Suspect => pb::Liveness::Unknown,
                    },
                    phi,
                    last_heartbeat_age_ms: None,
                    regions: 0,
                }
            }
            Some(live) => LiveView {
                liveness: match live.detector.liveness(now_ms) {
                    Liveness::Alive => pb::Liveness::Alive,
                    Liveness::Suspect => pb::Liveness::Suspect,
                    Liveness::Failed => pb::Liveness::Failed,
                },
                phi: live.detector.phi(now_ms),
                last_heartbeat_age_ms: live
                    .detector
                    .last_heartbeat_ms()
                    .map(|last| now_ms.saturating_sub(last)),
                regions: live.regions.len(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, bytes: u64) -> pb::RegionStat {
        pb::RegionStat {
            region_id: id,
            role: pb::RegionRole::Leader.into(),
            approximate_bytes: bytes,
            ..Default::default()
        }
    }

    fn full(ids: std::ops::RangeInclusive<u64>) -> pb::NodeStats {
        pb::NodeStats {
            regions: ids.map(|id| region(id, 10)).collect(),
            full: true,
            removed_regions: Vec::new(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn unheard_nodes_are_unknown_for_a_window_and_silence_fails_heard_ones() {
        let live = LiveNodes::new(DetectorConfig::default(), 0);
        live.advance(1, 0);
        assert_eq!(live.view(1, 1_000).liveness, pb::Liveness::Unknown);
        // Default window: 1 s first interval + 10 s pause, plus the std dev margin.
        assert_eq!(live.view(1, 30_000).liveness, pb::Liveness::Failed);
        live.claim(1, 1, 1, 0).unwrap();
        assert_eq!(
            live.view(1, 1_000).liveness,
            pb::Liveness::Unknown,
            "claimed but never heard is judged from the leadership's start"
        );
        for t in (0..=10_000).step_by(1_000) {
            live.beat(1, 1, 1, t).unwrap();
        }
        let now = live.view(1, 10_500);
        assert_eq!(
            (now.liveness, now.last_heartbeat_age_ms),
            (pb::Liveness::Alive, Some(500))
        );
        assert_eq!(live.view(1, 40_000).liveness, pb::Liveness::Failed);
        // A new term resets at once, even before the leadership task runs.
        live.claim(2, 1, 5, 40_000).unwrap();
        assert_eq!(live.view(1, 40_100).liveness, pb::Liveness::Unknown);
        assert_eq!(live.view(1, 70_000).liveness, pb::Liveness::Failed);
        assert_eq!(live.beat(1, 1, 1, 40_200), Err(Stale::Term));
        live.advance(1, 50_000);
        assert_eq!(
            live.beat(2, 1, 5, 50_000),
            Ok(()),
            "an older advance changes nothing"
        );
    }

    #[test]
    fn full_stats_replace_and_deltas_touch_only_what_they_name() {
        let live = LiveNodes::new(DetectorConfig::default(), 0);
        live.claim(1, 1, 1, 0).unwrap();
        live.beat(1, 1, 1, 0).unwrap();
        assert_eq!(live.apply_stats(1, 1, 1, &full(1..=100), 0), Ok(100));
        assert_eq!(live.view(1, 0).regions, 100);
        let delta = pb::NodeStats {
            regions: vec![region(5, 99), region(101, 1)],
            full: false,
            removed_regions: vec![7, 8],
            groups: Vec::new(),
        };
        assert_eq!(live.apply_stats(1, 1, 1, &delta, 0), Ok(4));
        assert_eq!(live.view(1, 0).regions, 99);
        assert_eq!(live.region(1, 5).map(|r| r.bytes), Some(99));
        assert_eq!(live.region(1, 6).map(|r| r.bytes), Some(10));
        assert_eq!(live.region(1, 7), None);
        live.apply_stats(1, 1, 1, &full(1..=1), 0).unwrap();
        assert_eq!(live.view(1, 0).regions, 1, "a full report replaces");
    }

    #[test]
    fn only_the_newest_stream_of_a_node_counts() {
        let live = LiveNodes::new(DetectorConfig::default(), 0);
        live.claim(1, 1, 3, 0).unwrap();
        live.beat(1, 1, 3, 0).unwrap();
        live.apply_stats(1, 1, 3, &full(1..=10), 0).unwrap();
        // A newer stream takes over: regions wait for its full report.
        live.claim(1, 1, 4, 0).unwrap();
        assert_eq!(live.view(1, 0).regions, 0);
        let late = pb::NodeStats {
            regions: vec![region(50, 1)],
            full: false,
            removed_regions: vec![1],
            groups: Vec::new(),
        };
        assert_eq!(live.apply_stats(1, 1, 3, &late, 0), Err(Stale::Replaced));
        assert_eq!(live.beat(1, 1, 3, 10), Err(Stale::Replaced));
        assert_eq!(
            live.claim(1, 1, 3, 0),
            Err(Stale::Replaced),
            "no going back"
        );
        live.apply_stats(1, 1, 4, &full(1..=2), 0).unwrap();
        assert_eq!(live.view(1, 0).regions, 2);
        live.forget(1);
        assert_eq!(live.beat(1, 1, 4, 20), Err(Stale::Removed));
    }
}
