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
mod regions;

use regions::{SimRegions, Wal, lock};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common_meta::{Error, Result};
use meta_proto::v1 as pb;

use crate::client::{MetaClient, MetaClientOptions};
use crate::heartbeat::{HeartbeatState, HeartbeatTask, NodeIdentity, RttObserver};
use crate::region_lease::RegionLeaseKeeper;
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
