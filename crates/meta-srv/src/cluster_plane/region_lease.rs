//! Region leases: in every answer to a datanode's stats, the leader says what the node
//! may do with each region it reported, for one lease length counted from the node's
//! own send instant (so a slow answer shortens a lease, never lengthens it).
//!
//! The decision ([`decide`]) is a pure function of the table's route and of the
//! migrations in flight: the route's leader gets `leader` (or `downgrading` while the
//! route marks it so), its followers and a migration's candidate get `follower`, any
//! other holder `closeable`; a region of an unknown table gets nothing (a create is
//! committing it, or a drop is removing it: either way nobody may write it).
//!
//! Fencing, which makes failover safe:
//! - Leader grants are recorded per (region, node) with the ledger's monotonic clock
//!   *before*
//!   the route is read, so after a route change is applied, [`LeaseLedger::expiry_bound`]
//!   is a time after which no lease granted on the old route can still run.
//! - A grant rests on a quorum confirmation (a linearizable read) at most
//!   `confirm_ms` (one election timeout) old: a leader cut off from its quorum, or
//!   whose raft thread is stuck, stops granting before another can be elected. The
//!   first one of a term also brings the applied state up to every earlier commit.
//!   A new leader still assumes a deposed one may have granted until
//!   `deposed_leader_ms` after this term began.
//! - While a grant reads routes, its node is marked in flight, and `expiry_bound`
//!   counts the mark as a grant.
//! - Nothing is called closeable during the first lease length of a term: the
//!   migrations of the previous term are not registered again until they resume.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use common_meta::key::{FENCE_KEY, MetaKey, TableRouteKey};
use common_meta::kv::{KvBackend, RangeRequest};
use common_meta::manager::from_json;
use common_meta::model::table::{LeaderState, RegionId, RegionRoute, TableRoute};
use meta_proto::v1 as pb;

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a lease lasts from the node's send instant, in ms.
    pub lease_ms: u64,
    /// How long after a term begins a deposed leader may still grant, in ms.
    pub deposed_leader_ms: u64,
    /// The oldest quorum confirmation (a linearizable read) a grant may rest on, in
    /// ms: one election timeout, so a leader cut off from its quorum, or whose raft
    /// thread is stuck, stops granting before another leader can be elected.
    pub confirm_ms: u64,
}

impl LeaseConfig {
    /// Slack for clocks that run at slightly different rates (10% of a lease, at least
    /// 100 ms).
    pub fn margin_ms(&self) -> u64 {
        (self.lease_ms / 10).max(100)
    }
}

/// What a node may do with one region it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Write it until the lease ends.
    Leader,
    /// Keep it open read-only.
    Follower,
    /// Keep it open, write nothing: it is being moved away.
    Downgrading,
    /// Close it: the route does not give it to this node.
    Closeable,
}

/// The grant for `region` held by `node`, given its table's `route` (None: the table
/// is unknown) and the node a migration of the region is moving it to, if any.
pub fn decide(
    node: u64,
    region: RegionId,
    route: Option<&TableRoute>,
    candidate: Option<u64>,
) -> Option<Grant> {
    let entry = route.and_then(|r| entry_of(r, region));
    if candidate == Some(node) {
        // Opened for a migration to this node: not led here until the route says so.
        let leads = entry
            .and_then(|e| e.leader.as_ref())
            .is_some_and(|p| p.id == node);
        if !leads {
            return Some(Grant::Follower);
        }
    }
    route?;
    let Some(entry) = entry else {
        return Some(Grant::Closeable);
    };
    if entry.leader.as_ref().is_some_and(|p| p.id == node) {
        return Some(match entry.leader_state {
            LeaderState::Serving => Grant::Leader,
            LeaderState::Downgrading => Grant::Downgrading,
        });
    }
    if entry.followers.iter().any(|p| p.id == node) {
        return Some(Grant::Follower);
    }
    Some(Grant::Closeable)
}

/// The route entry of `region`: routes keep their regions in number order, so it is
/// usually at the region's number.
fn entry_of(route: &TableRoute, region: RegionId) -> Option<&RegionRoute> {
    route
        .regions
        .get(region.region_number() as usize)
        .filter(|e| e.region == region)
        .or_else(|| route.regions.iter().find(|e| e.region == region))
}

/// A migration in flight, as leases see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The procedure moving the region.
    pub procedure: String,
    /// The node it leaves.
    pub from: u64,
    /// The node it goes to (its candidate is kept open there).
    pub to: u64,
}

/// Why a migration could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// Another procedure moves the region (its id).
    Moving(String),
    /// This member no longer leads in the term asked for.
    NotLeading,
}

impl Busy {
    /// The error to answer for `region`.
    pub fn error(&self, region: u64) -> common_meta::Error {
        match self {
            Busy::Moving(procedure) => common_meta::Error::FailedPrecondition {
                message: format!(
                    "region {} is already being moved by procedure {procedure}",
                    RegionId::from(region)
                ),
            },
            Busy::NotLeading => common_meta::Error::NotLeader { leader: None },
        }
    }
}

struct State {
    term: u64,
    since_ms: u64,
    /// When (ledger clock) the latest linearizable read that passed in `term` was
    /// asked: the leadership was confirmed by a quorum after that instant.
    confirmed_ms: Option<u64>,
    /// node -> (grants being computed, the latest arrival among them): a grant whose
    /// routes are still being read counts in `expiry_bound` as if given.
    inflight: HashMap<u64, (u32, u64)>,
    /// (region, node) -> when the leader last granted it leadership (leader's clock).
    granted: HashMap<(u64, u64), u64>,
    /// Regions being migrated (registered by their procedures, every term anew).
    operations: HashMap<u64, Operation>,
    /// Table routes by id: the bytes last read and their decoding.
    routes: HashMap<u32, (Vec<u8>, Arc<TableRoute>)>,
}

impl State {
    fn enter(&mut self, term: u64, now_ms: u64) -> bool {
        if term > self.term {
            self.term = term;
            self.since_ms = now_ms;
            self.confirmed_ms = None;
            self.inflight.clear();
            self.granted.clear();
            self.operations.clear();
        }
        term == self.term
    }
}

/// Ends a grant's in-flight mark, however the grant ends.
struct Inflight<'a> {
    ledger: &'a LeaseLedger,
    node: u64,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut state = self.ledger.state();
        if let Some(entry) = state.inflight.get_mut(&self.node) {
            entry.0 = entry.0.saturating_sub(1);
            if entry.0 == 0 {
                state.inflight.remove(&self.node);
            }
        }
    }
}

/// The leader's record of region leases and migrations in flight; reset every term.
pub struct LeaseLedger {
    /// The ledger's clock: monotonic, so a wall clock stepped forward cannot cut a
    /// fence short. Every time it keeps or answers is ms since this instant.
    origin: std::time::Instant,
    config: LeaseConfig,
    kv: Arc<dyn KvBackend>,
    state: Mutex<State>,
    /// Breaks the fence on purpose (see [`LeaseLedger::break_fence_for_tests`]).
    unfenced: std::sync::atomic::AtomicBool,
}

impl LeaseLedger {
    /// A ledger reading routes from `kv` (this member's store).
    pub fn new(config: LeaseConfig, kv: Arc<dyn KvBackend>) -> Self {
        LeaseLedger {
            origin: std::time::Instant::now(),
            config,
            kv,
            state: Mutex::new(State {
                term: 0,
                since_ms: 0,
                confirmed_ms: None,
                inflight: HashMap::new(),
                granted: HashMap::new(),
                operations: HashMap::new(),
                routes: HashMap::new(),
            }),
            unfenced: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Makes [`LeaseLedger::expiry_bound`] answer 0: a migration then never waits for
    /// an old leader's lease. This breaks the promise failover rests on; it exists only
    /// so that tests can show the history checker catches a broken rule.
    #[doc(hidden)]
    pub fn break_fence_for_tests(&self) {
        self.unfenced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every critical section is a few map updates with no early exit: never torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ledger's clock now (monotonic ms): what [`LeaseLedger::grant`],
    /// [`LeaseLedger::advance`] and [`LeaseLedger::expiry_bound`] speak.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The lease timing.
    pub fn config(&self) -> LeaseConfig {
        self.config
    }

    /// Starts term `term` at `now_ms` if it is newer (leadership won).
    pub fn advance(&self, term: u64, now_ms: u64) {
        self.state().enter(term, now_ms);
    }

    /// Registers a migration of `region` in term `term`.
    pub fn begin(&self, term: u64, region: u64, operation: Operation) -> Result<(), Busy> {
        let mut state = self.state();
        if !state.enter(term, self.now_ms()) {
            return Err(Busy::NotLeading);
        }
        match state.operations.get(&region) {
            Some(running) if running.procedure != operation.procedure => {
                Err(Busy::Moving(running.procedure.clone()))
            }
            _ => {
                state.operations.insert(region, operation);
                Ok(())
            }
        }
    }

    /// Forgets the migration of `region` by `procedure` (done or rolled back).
    pub fn end(&self, region: u64, procedure: &str) {
        let mut state = self.state();
        if state
            .operations
            .get(&region)
            .is_some_and(|o| o.procedure == procedure)
        {
            state.operations.remove(&region);
        }
    }

    /// The migration of `region` in flight, if any.
    pub fn operation(&self, region: u64) -> Option<Operation> {
        self.state().operations.get(&region).cloned()
    }

    /// Every migration in flight, by region.
    pub fn operations(&self) -> BTreeMap<u64, Operation> {
        self.state()
            .operations
            .iter()
            .map(|(r, o)| (*r, o.clone()))
            .collect()
    }

    /// When (the ledger's clock, ms) every leader lease of `region` that `node` may hold
    /// has surely ended: its last grant seen by this leader, or what a deposed leader
    /// may have granted early in this term, plus a lease and the margin. Call it after
    /// the route change that stops new grants is applied.
    pub fn expiry_bound(&self, region: u64, node: u64) -> u64 {
        if self.unfenced.load(std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        let state = self.state();
        let last = state.granted.get(&(region, node)).copied().unwrap_or(0);
        let computing = state.inflight.get(&node).map_or(0, |(_, at)| *at);
        last.max(computing)
            .max(state.since_ms + self.config.deposed_leader_ms)
            + self.config.lease_ms
            + self.config.margin_ms()
    }

    /// Makes sure a quorum confirmed this leadership no longer than `confirm_ms`
    /// before `now_ms` (a linearizable read when not). The first one of a term also
    /// brings the applied state up to every earlier commit.
    async fn confirmed(&self, term: u64, now_ms: u64) -> common_meta::Result<()> {
        let fresh = {
            let state = self.state();
            state.term == term
                && state
                    .confirmed_ms
                    .is_some_and(|c| now_ms.saturating_sub(c) <= self.config.confirm_ms)
        };
        if fresh {
            return Ok(());
        }
        let asked = self.now_ms();
        self.kv.get(FENCE_KEY.as_bytes()).await?;
        let mut state = self.state();
        if state.term == term {
            state.confirmed_ms = Some(state.confirmed_ms.map_or(asked, |c| c.max(asked)));
        }
        Ok(())
    }

    /// Table `id`'s route from this member's applied state (decoded only when its
    /// bytes changed).
    async fn route(&self, id: u32) -> common_meta::Result<Option<Arc<TableRoute>>> {
        let key = TableRouteKey::new(id).encode();
        let found = self
            .kv
            .range_serializable(RangeRequest::key(key.clone()))
            .await?
            .kvs
            .into_iter()
            .next();
        let Some(kv) = found else {
            self.state().routes.remove(&id);
            return Ok(None);
        };
        if let Some((raw, route)) = self.state().routes.get(&id)
            && *raw == kv.value
        {
            return Ok(Some(route.clone()));
        }
        let route: Arc<TableRoute> = Arc::new(from_json(&key, &kv.value)?);
        self.state().routes.insert(id, (kv.value, route.clone()));
        Ok(Some(route))
    }

    /// The leases of `node` in term `term` for `regions` (the regions of its stats),
    /// answering a request sent at the node's `send_instant_ms`; records leader grants
    /// at `now_ms` (the ledger's clock when the request arrived) before reading any
    /// route.
    pub async fn grant(
        &self,
        term: u64,
        node: u64,
        regions: &[u64],
        send_instant_ms: u64,
        now_ms: u64,
    ) -> common_meta::Result<pb::RegionLeases> {
        // The leadership task may not have started the term yet.
        {
            let mut state = self.state();
            if !state.enter(term, now_ms) {
                return Err(common_meta::Error::Unavailable {
                    message: "leadership moved on".to_string(),
                });
            }
            // From here until the grants are recorded, `expiry_bound` counts this
            // answer as given (its routes may be read before a change is applied).
            let entry = state.inflight.entry(node).or_insert((0, now_ms));
            entry.0 += 1;
            entry.1 = entry.1.max(now_ms);
        }
        let _computing = Inflight { ledger: self, node };
        self.confirmed(term, now_ms).await?;
        let mut by_table: BTreeMap<u32, Vec<RegionId>> = BTreeMap::new();
        for region in regions {
            let region = RegionId::from(*region);
            by_table.entry(region.table_id()).or_default().push(region);
        }
        let mut leases = pb::RegionLeases {
            send_instant_ms,
            lease_ms: self.config.lease_ms,
            ..Default::default()
        };
        // Taken before any route is read: a grant made on a route read before a change
        // is then never later than what `expiry_bound` sees after it.
        let may_close = {
            let state = self.state();
            now_ms >= state.since_ms + self.config.lease_ms
        };
        // The migrations' candidates among these regions, in one critical section.
        let candidates: HashMap<u64, u64> = {
            let state = self.state();
            if state.operations.is_empty() {
                HashMap::new()
            } else {
                regions
                    .iter()
                    .filter_map(|r| state.operations.get(r).map(|o| (*r, o.to)))
                    .collect()
            }
        };
        let mut leading = Vec::new();
        for (table, regions) in by_table {
            let route = self.route(table).await?;
            for region in regions {
                let candidate = candidates.get(&region.as_u64()).copied();
                match decide(node, region, route.as_deref(), candidate) {
                    Some(Grant::Leader) => leading.push(region.as_u64()),
                    Some(Grant::Follower) => leases.follower.push(region.as_u64()),
                    Some(Grant::Downgrading) => leases.downgrading.push(region.as_u64()),
                    Some(Grant::Closeable) if may_close => leases.closeable.push(region.as_u64()),
                    Some(Grant::Closeable) | None => {}
                }
            }
        }
        {
            let mut state = self.state();
            if state.term != term {
                // The term ended while routes were read: grant nothing.
                return Err(common_meta::Error::Unavailable {
                    message: "leadership moved on".to_string(),
                });
            }
            for region in &leading {
                state.granted.insert((*region, node), now_ms);
            }
        }
        leases.leader = leading;
        Ok(leases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common_meta::model::table::Peer;

    fn route(leader: u64, followers: &[u64], state: LeaderState) -> TableRoute {
        let peer = |id| Peer {
            id,
            addr: String::new(),
        };
        TableRoute {
            regions: vec![RegionRoute {
                region: RegionId::new(1024, 0),
                leader: Some(peer(leader)),
                followers: followers.iter().map(|f| peer(*f)).collect(),
                leader_state: state,
                leader_down_since: None,
            }],
            version: 1,
        }
    }

    #[test]
    fn decisions() {
        let r = RegionId::new(1024, 0);
        let other = RegionId::new(1024, 7);
        let serving = route(1, &[2], LeaderState::Serving);
        let moving = route(1, &[2], LeaderState::Downgrading);
        // Each case: node, region, route, candidate, grant.
        let cases = [
            (1, r, Some(&serving), None, Some(Grant::Leader)),
            (1, r, Some(&moving), None, Some(Grant::Downgrading)),
            (1, r, Some(&moving), Some(3), Some(Grant::Downgrading)),
            (2, r, Some(&serving), None, Some(Grant::Follower)),
            (3, r, Some(&serving), None, Some(Grant::Closeable)),
            (3, r, Some(&moving), Some(3), Some(Grant::Follower)),
            (3, r, None, Some(3), Some(Grant::Follower)),
            (1, other, Some(&serving), None, Some(Grant::Closeable)),
            (1, r, None, None, None),
            // Once the route names the candidate as leader, it leads.
            (
                3,
                r,
                Some(&route(3, &[], LeaderState::Serving)),
                Some(3),
                Some(Grant::Leader),
            ),
        ];
        for (node, region, route, candidate, want) in cases {
            assert_eq!(
                decide(node, region, route, candidate),
                want,
                "node {node} region {region} candidate {candidate:?}"
            );
        }
    }

    fn ledger() -> LeaseLedger {
        LeaseLedger::new(
            LeaseConfig {
                lease_ms: 10_000,
                deposed_leader_ms: 2_000,
                confirm_ms: 1_000,
            },
            Arc::new(common_meta::kv::MemoryKvBackend::default()),
        )
    }

    #[test]
    fn the_bound_covers_the_last_grant_and_a_deposed_leader() {
        let ledger = ledger();
        ledger.advance(3, 100_000);
        // Nothing granted in this term: a deposed leader may have, until 102 s.
        assert_eq!(ledger.expiry_bound(7, 1), 102_000 + 10_000 + 1_000);
        ledger.state().granted.insert((7, 1), 150_000);
        assert_eq!(ledger.expiry_bound(7, 1), 150_000 + 11_000);
        // Another node's grant says nothing about node 1's.
        assert_eq!(ledger.expiry_bound(7, 2), 113_000);
        // A new term forgets this one's grants and starts its own fence.
        ledger.advance(4, 200_000);
        assert_eq!(ledger.expiry_bound(7, 1), 213_000);
    }

    #[test]
    fn one_migration_per_region() {
        let ledger = ledger();
        let op = |p: &str| Operation {
            procedure: p.to_string(),
            from: 1,
            to: 2,
        };
        ledger.begin(1, 9, op("a")).unwrap();
        ledger.begin(1, 9, op("a")).unwrap();
        assert_eq!(
            ledger.begin(1, 9, op("b")),
            Err(Busy::Moving("a".to_string()))
        );
        ledger.end(9, "b");
        assert!(ledger.operation(9).is_some());
        ledger.end(9, "a");
        ledger.begin(1, 9, op("b")).unwrap();
        assert_eq!(
            ledger.begin(0, 10, op("c")),
            Err(Busy::NotLeading),
            "an older term"
        );
    }

    #[tokio::test]
    async fn grants_follow_the_route() {
        let kv: Arc<dyn KvBackend> = Arc::new(common_meta::kv::MemoryKvBackend::default());
        let ledger = LeaseLedger::new(
            LeaseConfig {
                lease_ms: 1_000,
                deposed_leader_ms: 0,
                confirm_ms: 1_000,
            },
            kv.clone(),
        );
        let put = |route: TableRoute| {
            let kv = kv.clone();
            async move {
                kv.put(common_meta::kv::PutRequest::new(
                    TableRouteKey::new(1024).encode(),
                    serde_json::to_vec(&route).unwrap(),
                ))
                .await
                .unwrap();
            }
        };
        put(route(1, &[2], LeaderState::Serving)).await;
        let r = RegionId::new(1024, 0).as_u64();
        let stray = RegionId::new(1024, 5).as_u64();
        let unknown = RegionId::new(2000, 0).as_u64();
        ledger.advance(1, 0);
        let leases = ledger
            .grant(1, 1, &[r, stray, unknown], 77, 5_000)
            .await
            .unwrap();
        assert_eq!(
            (
                leases.send_instant_ms,
                leases.lease_ms,
                leases.leader,
                leases.closeable
            ),
            (77, 1_000, vec![r], vec![stray])
        );
        assert_eq!(ledger.expiry_bound(r, 1), 5_000 + 1_000 + 100);
        // The route changes: the cached decoding is not used.
        put(route(2, &[], LeaderState::Serving)).await;
        let leases = ledger.grant(1, 1, &[r], 78, 6_000).await.unwrap();
        assert_eq!((leases.leader.len(), leases.closeable), (0, vec![r]));
        // Early in a term nothing is closed.
        ledger.advance(2, 10_000);
        let leases = ledger.grant(2, 1, &[r], 79, 10_500).await.unwrap();
        assert!(leases.closeable.is_empty() && leases.leader.is_empty());
    }
}
