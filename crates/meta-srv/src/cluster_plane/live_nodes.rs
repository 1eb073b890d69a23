//! `LiveNodes`: what the leader knows in memory about heartbeating nodes: a failure
//! detector and the latest stats per node. Never persisted: a new leader rebuilds it
//! from the next heartbeats, and until it has heard a node it calls it `unknown`
//! rather than failed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::cluster_plane::failure_detector::{DetectorConfig, Liveness, PhiAccrualDetector};

struct Live {
    detector: PhiAccrualDetector,
    regions: usize,
}

/// A node's liveness as the leader reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveView {
    /// `alive`, `suspect`, `failed`, or `unknown` (not heard since this leader started).
    pub liveness: &'static str,
    /// The detector's phi (0 when unknown).
    pub phi: f64,
    /// ms since the last heartbeat, when one was heard.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Regions in the latest stats.
    pub regions: usize,
}

/// The leader's in-memory view of heartbeating nodes.
pub struct LiveNodes {
    config: DetectorConfig,
    nodes: Mutex<HashMap<u64, Live>>,
}

impl LiveNodes {
    /// An empty view with detectors tuned by `config`.
    pub fn new(config: DetectorConfig) -> Self {
        LiveNodes {
            config,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // One entry update per critical section: never torn.
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a heartbeat of node `id` at `now_ms`, with its region count if it sent
    /// stats.
    pub fn beat(&self, id: u64, now_ms: u64, regions: Option<usize>) {
        let mut nodes = self.nodes();
        let live = nodes.entry(id).or_insert_with(|| Live {
            detector: PhiAccrualDetector::new(self.config),
            regions: 0,
        });
        live.detector.heartbeat(now_ms);
        if let Some(regions) = regions {
            live.regions = regions;
        }
    }

    /// Node `id` as seen at `now_ms`.
    pub fn view(&self, id: u64, now_ms: u64) -> LiveView {
        let nodes = self.nodes();
        match nodes.get(&id) {
            None => LiveView {
                liveness: "unknown",
                phi: 0.0,
                last_heartbeat_age_ms: None,
                regions: 0,
            },
            Some(live) => LiveView {
                liveness: match live.detector.liveness(now_ms) {
                    Liveness::Alive => "alive",
                    Liveness::Suspect => "suspect",
                    Liveness::Failed => "failed",
                },
                phi: live.detector.phi(now_ms),
                last_heartbeat_age_ms: live
                    .detector
                    .last_heartbeat_ms()
                    .map(|last| now_ms.saturating_sub(last)),
                regions: live.regions,
            },
        }
    }

    /// Forgets everything (leadership lost: the next term starts from heartbeats).
    pub fn clear(&self) {
        self.nodes().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unheard_nodes_are_unknown_and_silence_fails_heard_ones() {
        let live = LiveNodes::new(DetectorConfig::default());
        assert_eq!(live.view(1, 1_000).liveness, "unknown");
        for t in (0..=10_000).step_by(1_000) {
            live.beat(1, t, Some(3));
        }
        let now = live.view(1, 10_500);
        assert_eq!(
            (now.liveness, now.regions, now.last_heartbeat_age_ms),
            ("alive", 3, Some(500))
        );
        assert_eq!(live.view(1, 40_000).liveness, "failed");
        live.beat(1, 40_000, None);
        assert_eq!(
            live.view(1, 40_100).regions,
            3,
            "stats are kept until new ones come"
        );
        live.clear();
        assert_eq!(live.view(1, 40_100).liveness, "unknown");
    }
}
