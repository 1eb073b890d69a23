//! Phi-accrual failure detection (Hayashibara et al.; the variant Akka and GreptimeDB
//! use), one detector per node, fed by heartbeat arrival times.
//!
//! phi is the (negative log10) probability that a heartbeat this late would still
//! arrive, given the distribution of past intervals: it grows smoothly with silence and
//! adapts to each node's own rhythm. A pure value type: time is passed in, so the
//! detector is tested without clocks or sleeps.

use std::collections::VecDeque;

/// Tuning of a [`PhiAccrualDetector`]; GreptimeDB's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    /// phi at or above which a node counts as failed.
    pub threshold: f64,
    /// Lower bound of the interval standard deviation, ms (so a perfectly regular node
    /// is not declared dead by a small jitter).
    pub min_std_dev_ms: f64,
    /// Extra silence tolerated on top of the mean interval, ms (GC pauses, hiccups).
    pub acceptable_pause_ms: f64,
    /// Interval assumed before any has been observed, ms.
    pub first_interval_ms: f64,
    /// Most intervals remembered.
    pub window: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            threshold: 8.0,
            min_std_dev_ms: 100.0,
            acceptable_pause_ms: 10_000.0,
            first_interval_ms: 1_000.0,
            window: 1_000,
        }
    }
}

/// A node's liveness as the detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// phi below half the threshold.
    Alive,
    /// phi between half the threshold and the threshold.
    Suspect,
    /// phi at or above the threshold.
    Failed,
}

/// One node's detector.
#[derive(Debug, Clone)]
pub struct PhiAccrualDetector {
    config: DetectorConfig,
    intervals: VecDeque<f64>,
    last_ms: Option<u64>,
}

impl PhiAccrualDetector {
    /// A detector that has seen no heartbeat yet.
    pub fn new(config: DetectorConfig) -> Self {
        PhiAccrualDetector {
            config,
            intervals: VecDeque::new(),
            last_ms: None,
        }
    }

    /// Records a heartbeat that arrived at `now_ms`.
    pub fn heartbeat(&mut self, now_ms: u64) {
        if let Some(last) = self.last_ms {
            if now_ms < last {
                return;
            }
            if self.intervals.len() == self.config.window {
                self.intervals.pop_front();
            }
            self.intervals.push_back((now_ms - last) as f64);
        } else {
            // Seed with a guess so the first real interval is not the only sample.
            let guess = self.config.first_interval_ms;
            self.intervals.push_back(guess - guess / 4.0);
            self.intervals.push_back(guess + guess / 4.0);
        }
        self.last_ms = Some(now_ms);
    }

    /// When the last heartbeat arrived.
    pub fn last_heartbeat_ms(&self) -> Option<u64> {
        self.last_ms
    }

    /// phi at `now_ms` (0 before the first heartbeat).
    pub fn phi(&self, now_ms: u64) -> f64 {
        let Some(last) = self.last_ms else {
            return 0.0;
        };
        let n = self.intervals.len() as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let variance = self
            .intervals
            .iter()
            .map(|i| (i - mean).powi(2))
            .sum::<f64>()
            / n;
        let std_dev = variance.sqrt().max(self.config.min_std_dev_ms);
        let mean = mean + self.config.acceptable_pause_ms;
        let elapsed = now_ms.saturating_sub(last) as f64;
        // Logistic approximation of the normal CDF (Akka's).
        let y = (elapsed - mean) / std_dev;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let phi = if elapsed > mean {
            -(e / (1.0 + e)).log10()
        } else {
            -(1.0 - 1.0 / (1.0 + e)).log10()
        };
        if phi.is_finite() {
            phi.max(0.0)
        } else {
            f64::MAX
        }
    }

    /// The node's liveness at `now_ms`.
    pub fn liveness(&self, now_ms: u64) -> Liveness {
        let phi = self.phi(now_ms);
        if phi >= self.config.threshold {
            Liveness::Failed
        } else if phi >= self.config.threshold / 2.0 {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node beating every `interval` ms for 100 beats, the last at t = 1,000 s.
    const LAST: u64 = 1_000_000;

    fn steady(interval: u64, config: DetectorConfig) -> PhiAccrualDetector {
        let mut d = PhiAccrualDetector::new(config);
        let mut t = LAST - 100 * interval;
        while t <= LAST {
            d.heartbeat(t);
            t += interval;
        }
        d
    }

    #[test]
    fn liveness_over_silence() {
        let config = DetectorConfig::default();
        let d = steady(1_000, config);
        // Each case: ms of silence after the last beat and the liveness expected. The
        // mean interval is 1 s, plus the 10 s acceptable pause, std dev floor 100 ms:
        // phi is 0.3 at 11 s, 4.7 at 11.4 s, 10.8 at 11.6 s.
        let cases = [
            (0, Liveness::Alive),
            (1_000, Liveness::Alive),
            (11_000, Liveness::Alive),
            (11_400, Liveness::Suspect),
            (11_600, Liveness::Failed),
            (60_000, Liveness::Failed),
        ];
        for (silence, want) in cases {
            let at = LAST + silence;
            assert_eq!(
                d.liveness(at),
                want,
                "after {silence} ms: phi {}",
                d.phi(at)
            );
        }
    }

    #[test]
    fn phi_grows_with_silence_and_resets_on_a_beat() {
        let mut d = steady(1_000, DetectorConfig::default());
        let mut last = -1.0;
        for silence in (0..20_000).step_by(500) {
            let phi = d.phi(LAST + silence);
            assert!(phi >= last, "phi is monotone in silence");
            last = phi;
        }
        assert!(last > 8.0);
        d.heartbeat(LAST + 20_000);
        assert!(d.phi(LAST + 20_100) < 1.0, "a beat brings phi down");
    }

    #[test]
    fn no_heartbeat_yet_is_not_a_failure_and_time_going_back_is_ignored() {
        let mut d = PhiAccrualDetector::new(DetectorConfig::default());
        assert_eq!(d.liveness(1_000_000), Liveness::Alive);
        d.heartbeat(5_000);
        d.heartbeat(4_000);
        assert_eq!(d.last_heartbeat_ms(), Some(5_000));
    }

    #[test]
    fn a_slow_but_regular_node_is_judged_by_its_own_rhythm() {
        let config = DetectorConfig {
            acceptable_pause_ms: 0.0,
            ..DetectorConfig::default()
        };
        let fast = steady(100, config);
        let slow = steady(5_000, config);
        // Two seconds of silence is alarming for a 100 ms node, normal for a 5 s one.
        assert_eq!(fast.liveness(LAST + 2_000), Liveness::Failed);
        assert_eq!(slow.liveness(LAST + 2_000), Liveness::Alive);
    }
}
