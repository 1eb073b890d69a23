//! Data-plane groups hosted by a simulated node: what it reports of them (which it
//! leads, the load of their routes) and how it answers route instructions (the steps of
//! a route move), with the actions it received kept for tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use meta_proto::v1 as pb;

#[derive(Default)]
struct Inner {
    /// Group -> whether this node leads it.
    hosted: BTreeMap<u64, bool>,
    /// Load not reported yet, by (group, route).
    pending: BTreeMap<(u64, u64), pb::RouteLoad>,
    /// The last entry written per route (what a fence answers).
    written: BTreeMap<u64, u64>,
    /// Route instructions received: (action, route).
    actions: Vec<(pb::RouteAction, u64)>,
    refuse: bool,
    delay: Duration,
}

/// One simulated node's groups.
#[derive(Default)]
pub struct SimGroups {
    inner: Mutex<Inner>,
}

impl SimGroups {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section is a single update: never torn.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hosts `group` (leading it or not); hosting it again changes only the lead.
    pub fn host(&self, group: u64, leader: bool) {
        self.lock().hosted.insert(group, leader);
    }

    /// Adds load to report with the next stats: `reads` and `writes` on `route` of
    /// `group`, and sampled keys with their weights.
    pub fn add_load(
        &self,
        group: u64,
        route: u64,
        reads: u64,
        writes: u64,
        samples: &[(&[u8], u64)],
    ) {
        let mut inner = self.lock();
        *inner.written.entry(route).or_default() += writes;
        let load = inner
            .pending
            .entry((group, route))
            .or_insert_with(|| pb::RouteLoad {
                route_id: route,
                ..Default::default()
            });
        load.reads += reads;
        load.writes += writes;
        load.samples
            .extend(samples.iter().map(|(key, weight)| pb::KeySample {
                key: key.to_vec(),
                weight: *weight,
            }));
    }

    /// Every hosted group with the load gathered since the last report.
    pub fn report(&self) -> Vec<pb::GroupStat> {
        let mut inner = self.lock();
        let mut pending = std::mem::take(&mut inner.pending);
        inner
            .hosted
            .iter()
            .map(|(group, leader)| pb::GroupStat {
                group_id: *group,
                leader: *leader,
                routes: {
                    let keys: Vec<_> = pending
                        .range((*group, 0)..=(*group, u64::MAX))
                        .map(|(k, _)| *k)
                        .collect();
                    keys.into_iter()
                        .filter_map(|k| pending.remove(&k))
                        .collect()
                },
            })
            .collect()
    }

    /// Refuse (or stop refusing) route instructions.
    pub fn refuse(&self, refuse: bool) {
        self.lock().refuse = refuse;
    }

    /// Answer route instructions after `delay`.
    pub fn delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The route instructions received so far.
    pub fn actions(&self) -> Vec<(pb::RouteAction, u64)> {
        self.lock().actions.clone()
    }

    /// Carries out one route instruction: a fence answers the last entry written in
    /// the route, a catch-up the entry it was asked for; the rest answer 0.
    pub async fn handle(&self, instruction: pb::RouteInstruction) -> Result<u64, String> {
        let action = pb::RouteAction::try_from(instruction.action)
            .map_err(|_| format!("unknown route action {}", instruction.action))?;
        let delay = {
            let mut inner = self.lock();
            inner.actions.push((action, instruction.route_id));
            inner.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let inner = self.lock();
        let group = match action {
            pb::RouteAction::Prepare | pb::RouteAction::CatchUp | pb::RouteAction::Abort => {
                instruction.target_group
            }
            _ => instruction.source_group,
        };
        if inner.refuse {
            return Err(format!("refused: the simulated group {group} is read-only"));
        }
        if inner.hosted.get(&group) != Some(&true) {
            return Err(format!("this node does not lead group {group}"));
        }
        Ok(match action {
            pb::RouteAction::Fence => inner
                .written
                .get(&instruction.route_id)
                .copied()
                .unwrap_or(0),
            pb::RouteAction::CatchUp => instruction.last_entry_id,
            _ => 0,
        })
    }
}
