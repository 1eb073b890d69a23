//! A simulator of many datanodes in one process, each a real [`HeartbeatTask`] on this
//! crate: it handshakes, reports region stats (a fraction of them changing each beat),
//! and answers instructions (opening, closing, upgrading and downgrading its regions).
//! Used by tests (kill a node, make one slow) and by `cargo xtask sim` and
//! `cargo xtask bench heartbeat`.
//!
//! Regions follow their leases: a node reports the role its [`RegionLeaseKeeper`]
//! holds, and, when writes are on ([`SimOptions::write_every`]), writes an entry to
//! every region it may write, each tick. Entries go to one log per region shared by
//! all nodes (the shared storage or replicated WAL failover assumes): a downgrade
//! answers the last entry written, an upgrade catches up to it. Every lease event and
//! write goes to a [`history::History`] that [`history::check`] judges.

pub mod groups;
pub mod history;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use common_meta::{Error, Result};
use meta_proto::v1 as pb;

use crate::client::{MetaClient, MetaClientOptions};
use crate::heartbeat::{
    HeartbeatState, HeartbeatTask, InstructionHandler, NodeIdentity, RttObserver, StatsProvider,
};
use crate::region_lease::{LeaseRole, RegionLeaseKeeper};
use history::{Event, History};

/// A table to create against simulated datanodes: `greptime.public.{name}` with a
/// `host` tag, a `ts` time index and a `usage` field, in `regions` regions (its id is
/// allocated by meta).
pub fn sample_table(name: &str, regions: u32) -> common_meta::model::table::TableInfo {
    use common_meta::model::table::{ColumnSchema, SemanticType, TableInfo};
    let column = |name: &str, data_type: &str, semantic_type| ColumnSchema {
        name: name.to_string(),
        data_type: data_type.to_string(),
        nullable: true,
        default: None,
        semantic_type,
    };
    TableInfo {
        id: 0,
        catalog: "greptime".into(),
        schema: "public".into(),
        name: name.into(),
        engine: "mito".into(),
        columns: vec![
            column("host", "string", SemanticType::Tag),
            column("ts", "timestamp_ms", SemanticType::Timestamp),
            column("usage", "float64", SemanticType::Field),
        ],
        primary_key: vec!["host".into()],
        time_index: Some("ts".into()),
        options: Default::default(),
        partition: Default::default(),
        regions,
        version: 0,
        created_ms: 0,
        updated_ms: 0,
    }
}

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// How many nodes.
    pub nodes: usize,
    /// The first node's id; the others follow.
    pub first_node_id: u64,
    /// Regions each node starts with.
    pub regions_per_node: usize,
    /// Fraction of a node's regions whose stats change between two heartbeats.
    pub churn: f64,
    /// Nodes sharing one connection per member (datanodes each have their own; a few
    /// hundred streams per connection keep the simulator's sockets few).
    pub nodes_per_connection: usize,
    /// Node starts are spread over this long, so their heartbeats do not all fall in
    /// the same instant.
    pub ramp: Duration,
    /// Each node writes every region it may write this often; zero writes nothing.
    pub write_every: Duration,
    /// Record every lease event and write in the history (for the checker; it grows
    /// with every heartbeat, so long runs leave it off).
    pub record: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            nodes: 10,
            first_node_id: 1,
            regions_per_node: 10,
            churn: 0.01,
            nodes_per_connection: 100,
            ramp: Duration::ZERO,
            write_every: Duration::ZERO,
            record: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single update: never torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The regions' shared logs: the last entry of each region, whoever wrote it.
type Wal = Mutex<BTreeMap<u64, u64>>;

/// One simulated node's regions and behaviour.
struct SimRegions {
    node: u64,
    /// The node's leases (set once its task started).
    keeper: std::sync::OnceLock<Arc<RegionLeaseKeeper>>,
    /// The last entry this node wrote or replayed, per region.
    entries: Mutex<BTreeMap<u64, u64>>,
    wal: Arc<Wal>,
    history: Arc<History>,
    /// Writes go to the history.
    record: bool,
    /// Cleared when the node is killed: it writes no more.
    running: std::sync::atomic::AtomicBool,
    regions: Mutex<BTreeMap<u64, pb::RegionStat>>,
    churn: f64,
    beats: AtomicU64,
    /// Silence to keep before the next heartbeat (a slow node), taken once.
    pause: Mutex<Option<Duration>>,
    /// In that silence now.
    stalled: std::sync::atomic::AtomicBool,
    /// Cut off from the meta cluster (see [`Simulator::isolate`]).
    isolated: std::sync::atomic::AtomicBool,
    handled: Arc<AtomicU64>,
    /// Refuse region creates, alters, opens, upgrades and downgrades (a datanode whose
    /// disk is full).
    refuse: std::sync::atomic::AtomicBool,
    /// Cache invalidations received.
    invalidations: AtomicU64,
    /// Region instructions received (create, drop, alter, truncate, open, upgrade).
    region_requests: AtomicU64,
    /// How long region instructions take (a slow disk).
    region_delay: Mutex<Duration>,
    /// How long cache invalidations take to be answered.
    invalidate_delay: Mutex<Duration>,
    /// The data-plane groups it hosts.
    groups: groups::SimGroups,
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
    fn write(&self) {
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

struct SimNode {
    id: u64,
    regions: Arc<SimRegions>,
    task: Option<HeartbeatTask>,
}

/// Running simulated nodes; all stop when dropped.
pub struct Simulator {
    nodes: Vec<SimNode>,
    rtts: Arc<Mutex<Vec<Duration>>>,
    handled: Arc<AtomicU64>,
    endpoints: Vec<String>,
    options: SimOptions,
    wal: Arc<Wal>,
    history: Arc<History>,
    /// The nodes the writer writes with (killed ones skip themselves).
    writers: Arc<Mutex<Vec<Arc<SimRegions>>>>,
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

impl Simulator {
    /// Starts `options.nodes` nodes heartbeating to the cluster at `endpoints`.
    pub async fn start(endpoints: &[String], options: &SimOptions) -> Result<Self> {
        Self::start_with_tokens(endpoints, options, |_| String::new()).await
    }

    /// Like [`Simulator::start`], each node presenting `token(node_id)` as its join
    /// token.
    pub async fn start_with_tokens(
        endpoints: &[String],
        options: &SimOptions,
        token: impl Fn(u64) -> String,
    ) -> Result<Self> {
        if options.nodes_per_connection == 0 {
            return Err(Error::invalid_argument(
                "nodes_per_connection must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&options.churn) {
            return Err(Error::invalid_argument("churn is a fraction from 0 to 1"));
        }
        let mut sim = Simulator {
            nodes: Vec::with_capacity(options.nodes),
            rtts: Arc::default(),
            handled: Arc::new(AtomicU64::new(0)),
            endpoints: endpoints.to_vec(),
            options: options.clone(),
            wal: Arc::default(),
            history: Arc::default(),
            writers: Arc::default(),
            writer: None,
        };
        let started = tokio::time::Instant::now();
        let mut client = None;
        for i in 0..options.nodes {
            if i % options.nodes_per_connection == 0 {
                client = Some(MetaClient::new(endpoints, MetaClientOptions::default())?);
            }
            let Some(client) = client.clone() else {
                unreachable!("made at i = 0")
            };
            let id = options.first_node_id + i as u64;
            let regions = (0..options.regions_per_node as u64)
                .map(|r| {
                    let region_id = (id << 32) | r;
                    let stat = pb::RegionStat {
                        region_id,
                        role: pb::RegionRole::Follower.into(),
                        approximate_bytes: 1 << 20,
                        approximate_rows: 1_000,
                        read_rate: 1.0,
                        write_rate: 1.0,
                    };
                    (region_id, stat)
                })
                .collect();
            if !options.ramp.is_zero() {
                let at = started + options.ramp.mul_f64(i as f64 / options.nodes as f64);
                tokio::time::sleep_until(at).await;
            }
            let node = sim.spawn_node(client, id, regions, token(id));
            lock(&sim.writers).push(node.regions.clone());
            sim.nodes.push(node);
        }
        if !options.write_every.is_zero() {
            let every = options.write_every;
            let writers = sim.writers.clone();
            sim.writer = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let nodes = lock(&writers).clone();
                    for node in nodes.iter().filter(|n| n.running.load(Ordering::Relaxed)) {
                        node.write();
                    }
                }
            }));
        }
        Ok(sim)
    }

    /// Starts the heartbeat task of node `id` holding `regions`.
    fn spawn_node(
        &self,
        client: MetaClient,
        id: u64,
        regions: BTreeMap<u64, pb::RegionStat>,
        token: String,
    ) -> SimNode {
        let observer: RttObserver = {
            let rtts = self.rtts.clone();
            Arc::new(move |rtt| lock(&rtts).push(rtt))
        };
        let sim = Arc::new(SimRegions {
            node: id,
            keeper: std::sync::OnceLock::new(),
            entries: Mutex::new(BTreeMap::new()),
            wal: self.wal.clone(),
            history: self.history.clone(),
            record: self.options.record,
            running: std::sync::atomic::AtomicBool::new(true),
            regions: Mutex::new(regions),
            churn: self.options.churn,
            beats: AtomicU64::new(0),
            pause: Mutex::new(None),
            stalled: Default::default(),
            isolated: Default::default(),
            handled: self.handled.clone(),
            refuse: Default::default(),
            invalidations: AtomicU64::new(0),
            region_requests: AtomicU64::new(0),
            region_delay: Mutex::new(Duration::ZERO),
            invalidate_delay: Mutex::new(Duration::ZERO),
            groups: Default::default(),
        });
        let identity = NodeIdentity {
            id,
            role: pb::NodeRole::Datanode,
            addr: format!("sim-{id}:4001"),
            version: "sim".to_string(),
            labels: [("zone".to_string(), format!("z{}", id % 3))].into(),
            start_time_ms: 1,
            join_token: token,
        };
        let task = HeartbeatTask::start_observed(
            client,
            identity,
            sim.clone(),
            sim.clone(),
            Some(observer),
        );
        let keeper = task.leases();
        if self.options.record {
            let history = self.history.clone();
            keeper.observe(Box::new(move |event| {
                history.record(Event::Lease { node: id, event });
            }));
        }
        let _ = sim.keeper.set(keeper);
        SimNode {
            id,
            regions: sim,
            task: Some(task),
        }
    }

    /// Starts node `id` again after [`Simulator::kill`], as a restarted datanode: it
    /// reopens the regions it held, read-only until leases say otherwise.
    pub fn restart(&mut self, id: u64) -> Result<bool> {
        let Some(i) = self
            .nodes
            .iter()
            .position(|n| n.id == id && n.task.is_none())
        else {
            return Ok(false);
        };
        let regions = lock(&self.nodes[i].regions.regions).clone();
        let client = MetaClient::new(&self.endpoints, MetaClientOptions::default())?;
        let node = self.spawn_node(client, id, regions, String::new());
        lock(&self.writers).push(node.regions.clone());
        self.nodes[i] = node;
        Ok(true)
    }

    /// The history of every node's leases and writes (empty unless
    /// [`SimOptions::record`]).
    pub fn history(&self) -> Arc<History> {
        self.history.clone()
    }

    /// The last entry written to `region` by any node.
    pub fn last_entry(&self, region: u64) -> u64 {
        lock(&self.wal).get(&region).copied().unwrap_or(0)
    }

    /// The data-plane groups node `id` hosts (None when there is no such node):
    /// host one, report route load, see and shape its answers to route instructions.
    pub fn groups(&self, id: u64) -> Option<&groups::SimGroups> {
        self.node(id).map(|n| &n.regions.groups)
    }

    /// The leases node `id` holds (None when it is not running).
    pub fn leases(&self, id: u64) -> Option<Arc<RegionLeaseKeeper>> {
        self.node(id)?.task.as_ref().map(HeartbeatTask::leases)
    }

    fn node(&self, id: u64) -> Option<&SimNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Stops node `id` at once, as a crash would (its stream just ends; it writes no
    /// more).
    pub fn kill(&mut self, id: u64) -> bool {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .and_then(|n| {
                n.regions.running.store(false, Ordering::Relaxed);
                n.task.take()
            })
            .is_some()
    }

    /// Makes node `id` keep silent for `pause` before its next heartbeat.
    pub fn pause(&self, id: u64, pause: Duration) -> bool {
        self.node(id)
            .map(|n| *lock(&n.regions.pause) = Some(pause))
            .is_some()
    }

    /// Cuts node `id` off from the meta cluster (or heals it): no heartbeat goes out
    /// and no instruction is taken, while it keeps writing what its leases allow.
    pub fn isolate(&self, id: u64, cut: bool) -> bool {
        self.node(id)
            .map(|n| n.regions.isolated.store(cut, Ordering::Relaxed))
            .is_some()
    }

    /// Makes node `id`'s clock run at `rate` times real time (see
    /// [`RegionLeaseKeeper::skew`]).
    pub fn skew(&self, id: u64, rate: f64) -> bool {
        self.leases(id).map(|k| k.skew(rate)).is_some()
    }

    /// Makes node `id` lose `region` silently (a datanode whose region failed to
    /// load): it stops reporting it, and nobody told the leader.
    pub fn lose_region(&self, id: u64, region: u64) -> bool {
        self.node(id)
            .is_some_and(|n| lock(&n.regions.regions).remove(&region).is_some())
    }

    /// True while node `id` keeps the silence [`Simulator::pause`] asked for.
    pub fn stalled(&self, id: u64) -> bool {
        self.node(id)
            .is_some_and(|n| n.regions.stalled.load(Ordering::Relaxed))
    }

    /// Makes node `id` refuse (or accept again) region creates, alters, opens,
    /// upgrades and downgrades.
    pub fn refuse_regions(&self, id: u64, refuse: bool) -> bool {
        self.node(id)
            .map(|n| n.regions.refuse.store(refuse, Ordering::Relaxed))
            .is_some()
    }

    /// Makes node `id` take `delay` over every region DDL instruction.
    pub fn delay_regions(&self, id: u64, delay: Duration) -> bool {
        self.node(id)
            .map(|n| *lock(&n.regions.region_delay) = delay)
            .is_some()
    }

    /// Makes node `id` take `delay` before answering every cache invalidation.
    pub fn delay_invalidations(&self, id: u64, delay: Duration) -> bool {
        self.node(id)
            .map(|n| *lock(&n.regions.invalidate_delay) = delay)
            .is_some()
    }

    /// Region DDL instructions node `id` has received (answered or not yet).
    pub fn region_requests(&self, id: u64) -> u64 {
        self.node(id)
            .map_or(0, |n| n.regions.region_requests.load(Ordering::Relaxed))
    }

    /// Cache invalidations node `id` has received.
    pub fn invalidations(&self, id: u64) -> u64 {
        self.node(id)
            .map_or(0, |n| n.regions.invalidations.load(Ordering::Relaxed))
    }

    /// The ids of the simulated nodes (running or killed).
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Moves every running node to `active` (as an operator would with `metactl node
    /// activate`), waiting up to `deadline` for each to register first.
    pub async fn activate(&self, client: &MetaClient, deadline: Duration) -> Result<()> {
        let until = tokio::time::Instant::now() + deadline;
        for node in self.nodes.iter().filter(|n| n.task.is_some()) {
            loop {
                match client.set_node_state(node.id, pb::NodeState::Active).await {
                    Ok(_) => break,
                    // Not registered yet (or already active): look again shortly.
                    Err(e) if tokio::time::Instant::now() >= until => return Err(e),
                    Err(_) => {
                        if client.nodes().await?.iter().any(|v| {
                            v.node_id == node.id && v.state == pb::NodeState::Active as i32
                        }) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Regions node `id` holds now.
    pub fn regions(&self, id: u64) -> Vec<u64> {
        self.node(id)
            .map(|n| lock(&n.regions.regions).keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every running node's task state.
    pub fn states(&self) -> Vec<(u64, HeartbeatState)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.id, n.task.as_ref()?.state().borrow().clone())))
            .collect()
    }

    /// Running nodes with an open stream.
    pub fn connected(&self) -> usize {
        self.states()
            .iter()
            .filter(|(_, s)| s.connected_to.is_some())
            .count()
    }

    /// Heartbeats answered and region stats sent, summed over the nodes.
    pub fn totals(&self) -> (u64, u64) {
        self.states().iter().fold((0, 0), |(a, r), (_, s)| {
            (a + s.answered, r + s.regions_sent)
        })
    }

    /// Instructions the nodes have handled.
    pub fn instructions_handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Takes the round trips measured since the last call.
    pub fn take_rtts(&self) -> Vec<Duration> {
        std::mem::take(&mut *lock(&self.rtts))
    }
}
