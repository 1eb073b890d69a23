//! One simulated node's regions and behaviour (`SimRegions`): the stats it reports
//! (with churn, roles from its leases), how it answers region, DDL and route
//! instructions, and its writes to the regions it may write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use meta_proto::v1 as pb;

use super::groups;
use super::history::{Event, History};
use crate::heartbeat::{InstructionHandler, StatsProvider};
use crate::region_lease::{LeaseRole, RegionLeaseKeeper};

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single update: never torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The regions' shared logs: the last entry of each region, whoever wrote it.
pub(super) type Wal = Mutex<BTreeMap<u64, u64>>;

/// One simulated node's regions and behaviour.
pub(super) struct SimRegions {
    pub(super) node: u64,
    /// The node's leases (set once its task started).
    pub(super) keeper: std::sync::OnceLock<Arc<RegionLeaseKeeper>>,
    /// The last entry this node wrote or replayed, per region.
    pub(super) entries: Mutex<BTreeMap<u64, u64>>,
    pub(super) wal: Arc<Wal>,
    pub(super) history: Arc<History>,
    /// Writes go to the history.
    pub(super) record: bool,
    /// Cleared when the node is killed: it writes no more.
    pub(super) running: std::sync::atomic::AtomicBool,
    pub(super) regions: Mutex<BTreeMap<u64, pb::RegionStat>>,
    pub(super) churn: f64,
    pub(super) beats: AtomicU64,
    /// Silence to keep before the next heartbeat (a slow node), taken once.
    pub(super) pause: Mutex<Option<Duration>>,
    /// In that silence now.
    pub(super) stalled: std::sync::atomic::AtomicBool,
    /// Cut off from the meta cluster (see [`Simulator::isolate`]).
    pub(super) isolated: std::sync::atomic::AtomicBool,
    pub(super) handled: Arc<AtomicU64>,
    /// Refuse region creates, alters, opens, upgrades and downgrades (a datanode whose
    /// disk is full).
    pub(super) refuse: std::sync::atomic::AtomicBool,
    /// Cache invalidations received.
    pub(super) invalidations: AtomicU64,
    /// Region instructions received (create, drop, alter, truncate, open, upgrade).
    pub(super) region_requests: AtomicU64,
    /// How long region instructions take (a slow disk).
    pub(super) region_delay: Mutex<Duration>,
    /// How long cache invalidations take to be answered.
    pub(super) invalidate_delay: Mutex<Duration>,
    /// The data-plane groups it hosts.
    pub(super) groups: groups::SimGroups,
}

#[async_trait]
impl StatsProvider for SimRegions {
    async fn stats(&self) -> Vec<pb::RegionStat> {
        let pause = lock(&self.pause).take();
        if let Some(pause) = pause {
            // The whole heartbeat loop waits here: no beat, no instruction taken.
            self.stalled.store(true, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
            self.stalled.store(false, Ordering::Relaxed);
        }
        // Cut off from the meta cluster: nothing goes out, nothing comes in, until
        // healed (the writer goes on, as a datanode serving clients would).
        while self.isolated.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let beat = self.beats.fetch_add(1, Ordering::Relaxed);
        let mut regions = lock(&self.regions);
        let total = regions.len();
        let changing = ((total as f64) * self.churn).ceil() as usize;
        if total > 0 && changing > 0 {
            // Rotate through the regions so each changes in turn.
            let start = (beat as usize * changing) % total;
            let changing = changing.min(total);
            for (i, stat) in regions.values_mut().enumerate() {
                // Region i changes when it falls in [start, start + changing), mod total.
                if (i + total - start) % total < changing {
                    stat.approximate_rows += 100;
                    stat.approximate_bytes += 4096;
                    stat.write_rate = (beat % 50) as f64;
                }
            }
        }
        let keeper = self.keeper.get();
        regions
            .values()
            .map(|stat| {
                let mut stat = *stat;
                if let Some(keeper) = keeper {
                    stat.role = match keeper.role(stat.region_id) {
                        Some(LeaseRole::Leader) => pb::RegionRole::Leader,
                        Some(LeaseRole::Downgrading) => pb::RegionRole::DowngradingLeader,
                        Some(LeaseRole::Follower) | None => pb::RegionRole::Follower,
                    }
                    .into();
                }
                stat
            })
            .collect()
    }

    async fn groups(&self) -> Vec<pb::GroupStat> {
        self.groups.report()
    }
}

/// What the simulated node does with one region of a region instruction.
fn region_outcome(region_id: u64, result: Result<(), String>) -> pb::RegionOutcome {
    pb::RegionOutcome {
        region_id,
        ok: result.is_ok(),
        error: result.err().unwrap_or_default(),
        last_entry_id: 0,
    }
}

/// The table id a region instruction's table info names (0 when it does not parse).
fn table_of(table_info_json: &str) -> u32 {
    serde_json::from_str::<common_meta::model::table::TableInfo>(table_info_json)
        .map_or(0, |info| info.id)
}

impl SimRegions {
    fn region_ddl(
        &self,
        regions: &mut BTreeMap<u64, pb::RegionStat>,
        kind: pb::instruction::Kind,
    ) -> Result<Vec<pb::RegionOutcome>, String> {
        use pb::instruction::Kind;
        let refuse = self.refuse.load(Ordering::Relaxed);
        Ok(match kind {
            Kind::CreateRegions(c) => {
                let table = table_of(&c.table_info_json);
                c.region_ids
                    .into_iter()
                    .map(|id| {
                        let result = if refuse {
                            Err("refused: the simulated disk is full".to_string())
                        } else if (id >> 32) as u32 != table {
                            Err(format!("region {id} is not of table {table}"))
                        } else {
                            // Creating a region that exists is a success: the leader
                            // may ask again after a crash.
                            regions.entry(id).or_insert(pb::RegionStat {
                                region_id: id,
                                role: pb::RegionRole::Follower.into(),
                                ..Default::default()
                            });
                            Ok(())
                        };
                        region_outcome(id, result)
                    })
                    .collect()
            }
            Kind::DropRegions(d) => d
                .region_ids
                .into_iter()
                .map(|id| {
                    regions.remove(&id);
                    region_outcome(id, Ok(()))
                })
                .collect(),
            Kind::AlterRegions(a) => a
                .region_ids
                .into_iter()
                .map(|id| {
                    let result = match regions.contains_key(&id) {
                        _ if refuse => Err("refused".to_string()),
                        true => Ok(()),
                        false => Err(format!("region {id} is not open here")),
                    };
                    region_outcome(id, result)
                })
                .collect(),
            Kind::TruncateRegions(t) => t
                .region_ids
                .into_iter()
                .map(|id| {
                    let result = match regions.get_mut(&id) {
                        Some(stat) => {
                            stat.approximate_rows = 0;
                            stat.approximate_bytes = 0;
                            Ok(())
                        }
                        None => Err(format!("region {id} is not open here")),
                    };
                    region_outcome(id, result)
                })
                .collect(),
            _ => Vec::new(),
        })
    }
}

#[async_trait]
impl InstructionHandler for SimRegions {
    async fn handle(
        &self,
        instruction: pb::Instruction,
    ) -> std::result::Result<Vec<pb::RegionOutcome>, String> {
        use pb::instruction::Kind;
        if matches!(
            instruction.kind,
            Some(
                Kind::CreateRegions(_)
                    | Kind::DropRegions(_)
                    | Kind::AlterRegions(_)
                    | Kind::TruncateRegions(_)
                    | Kind::OpenRegion(_)
                    | Kind::UpgradeRegion(_)
            )
        ) {
            self.region_requests.fetch_add(1, Ordering::Relaxed);
            let delay = *lock(&self.region_delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        if matches!(instruction.kind, Some(Kind::InvalidateCache(_))) {
            // Counted when it arrives; answered after the delay, if any.
            self.invalidations.fetch_add(1, Ordering::Relaxed);
            let delay = *lock(&self.invalidate_delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        let refuse = self.refuse.load(Ordering::Relaxed);
        let outcome =
            {
                let mut regions = lock(&self.regions);
                let mut entries = lock(&self.entries);
                match instruction.kind {
                    Some(
                        Kind::OpenRegion(r) | Kind::UpgradeRegion(r) | Kind::DowngradeRegion(r),
                    ) if refuse => Ok(vec![region_outcome(
                        r.region_id,
                        Err("refused: the simulated disk is full".to_string()),
                    )]),
                    Some(Kind::OpenRegion(r)) => {
                        regions.entry(r.region_id).or_insert(pb::RegionStat {
                            region_id: r.region_id,
                            role: pb::RegionRole::Follower.into(),
                            ..Default::default()
                        });
                        Ok(vec![region_outcome(r.region_id, Ok(()))])
                    }
                    Some(Kind::CloseRegion(r)) => {
                        regions.remove(&r.region_id);
                        entries.remove(&r.region_id);
                        Ok(vec![region_outcome(r.region_id, Ok(()))])
                    }
                    Some(Kind::UpgradeRegion(r)) | Some(Kind::DowngradeRegion(r))
                        if !regions.contains_key(&r.region_id) =>
                    {
                        Err(format!("region {} is not open here", r.region_id))
                    }
                    Some(Kind::UpgradeRegion(r)) => {
                        // Replay the shared log: everything any leader wrote.
                        let last = lock(&self.wal).get(&r.region_id).copied().unwrap_or(0);
                        if last < r.last_entry_id {
                            Err(format!(
                                "region {}: the log ends at {last}, before entry {}",
                                r.region_id, r.last_entry_id
                            ))
                        } else {
                            entries.insert(r.region_id, last);
                            let mut outcome = region_outcome(r.region_id, Ok(()));
                            outcome.last_entry_id = last;
                            Ok(vec![outcome])
                        }
                    }
                    Some(Kind::DowngradeRegion(r)) => {
                        // The task revoked the lease on receipt; under this lock no write
                        // is half done, so the entry below is the last.
                        let mut outcome = region_outcome(r.region_id, Ok(()));
                        outcome.last_entry_id = entries.get(&r.region_id).copied().unwrap_or(0);
                        Ok(vec![outcome])
                    }
                    Some(Kind::InvalidateCache(_)) => Ok(Vec::new()),
                    Some(kind) => {
                        if let Kind::DropRegions(d) = &kind {
                            d.region_ids.iter().for_each(|r| {
                                entries.remove(r);
                            });
                        }
                        self.region_ddl(&mut regions, kind)
                    }
                    None => Err("an empty instruction".to_string()),
                }
            };
        self.handled.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    async fn route(&self, instruction: pb::RouteInstruction) -> std::result::Result<u64, String> {
        let outcome = self.groups.handle(instruction).await;
        self.handled.fetch_add(1, Ordering::Relaxed);
        outcome
    }
}

impl SimRegions {
    /// Writes one entry to every region this node may write now (tick of the writer).
    pub(super) fn write(&self) {
        let Some(keeper) = self.keeper.get() else {
            return;
        };
        let regions = lock(&self.regions);
        let mut entries = lock(&self.entries);
        for region in regions.keys() {
            // Checked and written under the regions' lock, which a downgrade takes
            // before answering its last entry.
            if !keeper.writable(*region) {
                continue;
            }
            let at = std::time::Instant::now();
            let entry = {
                let mut wal = lock(&self.wal);
                let last = wal.entry(*region).or_insert(0);
                *last += 1;
                *last
            };
            entries.insert(*region, entry);
            if !self.record {
                continue;
            }
            self.history.record(Event::Write {
                node: self.node,
                region: *region,
                entry,
                at,
            });
        }
    }
}
