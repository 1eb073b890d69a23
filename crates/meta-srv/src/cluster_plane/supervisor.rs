//! The region supervisor (leader only): every tick it reads the routes and the nodes'
//! health and submits region migrations for
//!
//! - **failover** (`[failover] enabled`, default on): the leader regions of failed
//!   datanodes, and regions a live datanode has left out of its stats for
//!   `region_missing_ms`;
//! - **drain**: the leader regions of draining datanodes (an operator's request: it
//!   goes on in maintenance mode);
//! - **balance** (the `balancer` switch, default off): leader regions from the busiest
//!   active datanode to the idlest, beyond `[balancer] tolerance`, with a cooldown per
//!   region.
//!
//! All share `max_concurrent_migrations` (migrations in flight, whoever started them).
//! A region whose migration failed waits `backoff_ms`, doubling per failure up to 8
//! times that. **Maintenance mode** (persisted switch) pauses failover and the
//! balancer: migrations in flight finish, no new ones start.
//!
//! Failover is safe because a migration never upgrades a candidate before the old
//! leader stopped writing, confirmed or fenced by its lease (see
//! `procedures/region/migrate.rs` and `region_lease.rs`); it needs a region's data to
//! outlive its datanode (shared storage or a replicated WAL).

pub mod plan;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common_meta::key::{MetaKey, TableRouteKey, switch_key};
use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use common_meta::model::node::{NodeRole, NodeState};
use common_meta::model::table::{LeaderState, RegionId, TableRoute};
use common_meta::time::unix_ms;
use meta_proto::v1 as pb;
use tokio::sync::watch;

use crate::config::{BalancerConfig, FailoverConfig};
use crate::procedure_host::ProcedureHost;
use crate::procedures::ddl::context::DdlContext;
use plan::{Lead, Move};

/// The persisted switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Switches {
    /// Automatic moves paused.
    pub maintenance: bool,
    /// The balancer may move regions.
    pub balancer: bool,
}

/// Name of the maintenance switch (`__switch/maintenance`).
pub const MAINTENANCE: &str = "maintenance";
/// Name of the balancer switch (`__switch/balancer`).
pub const BALANCER: &str = "balancer";

#[derive(Default)]
struct State {
    term: u64,
    /// region -> (failures, not before unix ms).
    backoff: HashMap<u64, (u32, u64)>,
    /// region -> since when its leader's stats leave it out.
    missing_since: HashMap<u64, u64>,
    /// region -> not moved by the balancer before unix ms.
    cooldown: HashMap<u64, u64>,
    /// Regions last seen waiting for failover.
    pending: usize,
    /// The term whose unfinished migrations are registered in the ledger.
    seeded: Option<u64>,
}

/// The supervisor of one member; runs while it leads.
pub struct Supervisor {
    ctx: Arc<DdlContext>,
    host: Arc<ProcedureHost>,
    kv: Arc<dyn KvBackend>,
    failover: FailoverConfig,
    balancer: BalancerConfig,
    tick: Duration,
    state: Mutex<State>,
}

impl Supervisor {
    /// A supervisor ticking every `tick`.
    pub fn new(
        ctx: Arc<DdlContext>,
        host: Arc<ProcedureHost>,
        kv: Arc<dyn KvBackend>,
        (failover, balancer): (FailoverConfig, BalancerConfig),
        tick: Duration,
    ) -> Self {
        Supervisor {
            ctx,
            host,
            kv,
            failover,
            balancer,
            tick,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Each critical section is a few map updates: never torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the supervisor while `leadership` says this member leads.
    pub fn start(
        self: Arc<Self>,
        mut leadership: watch::Receiver<Option<u64>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok(term) = leadership.wait_for(Option::is_some).await.map(|t| *t) else {
                    return;
                };
                let term = term.unwrap_or(0);
                {
                    let mut state = self.state();
                    if state.term != term {
                        *state = State {
                            term,
                            ..State::default()
                        };
                    }
                }
                if let Err(e) = self.tick(term).await {
                    tracing::debug!(error = %e, "supervisor tick failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(self.tick) => {}
                    changed = leadership.changed() => if changed.is_err() { return },
                }
            }
        })
    }

    /// The persisted switches (linearizable read).
    pub async fn switches(&self) -> common_meta::Result<Switches> {
        let read = |name| async move {
            Ok::<bool, common_meta::Error>(
                self.kv
                    .get(&switch_key(name))
                    .await?
                    .is_some_and(|kv| kv.value == b"true"),
            )
        };
        Ok(Switches {
            maintenance: read(MAINTENANCE).await?,
            balancer: read(BALANCER).await?,
        })
    }

    /// Turns switch `name` on or off (through raft).
    pub async fn set_switch(&self, name: &str, on: bool) -> common_meta::Result<()> {
        let value = if on { "true" } else { "false" };
        self.kv
            .put(PutRequest::new(switch_key(name), value.as_bytes().to_vec()))
            .await?;
        tracing::info!(switch = name, on, "switch set");
        Ok(())
    }

    /// Whether failover is configured on.
    pub fn failover_enabled(&self) -> bool {
        self.failover.enabled
    }

    /// Migrations in flight (any origin) and regions waiting for failover.
    pub fn load(&self) -> (usize, usize) {
        let running: BTreeSet<String> = self
            .ctx
            .plane
            .leases
            .operations()
            .into_values()
            .map(|o| o.procedure)
            .collect();
        (running.len(), self.state().pending)
    }

    /// Every region's leadership, from this member's applied routes.
    async fn leads(&self) -> common_meta::Result<Vec<Lead>> {
        let prefix = TableRouteKey::new(0).encode();
        let prefix = &prefix[..prefix.len() - 10];
        let routes = self
            .kv
            .range_serializable(RangeRequest::prefix(prefix.to_vec()))
            .await?;
        let mut out = Vec::new();
        for kv in routes.kvs {
            let route: TableRoute = common_meta::manager::from_json(&kv.key, &kv.value)?;
            for entry in route.regions {
                if let Some(leader) = entry.leader {
                    let downgrading = entry.leader_state == LeaderState::Downgrading;
                    out.push(Lead {
                        region: entry.region.as_u64(),
                        leader: leader.id,
                        followers: entry.followers.iter().map(|p| p.id).collect(),
                        downgrading_since: downgrading
                            .then(|| entry.leader_down_since.unwrap_or(0)),
                    });
                }
            }
        }
        Ok(out)
    }

    async fn tick(self: &Arc<Self>, term: u64) -> common_meta::Result<()> {
        let Some(manager) = self.host.manager() else {
            return Ok(());
        };
        self.seed(term, &manager).await?;
        let leads = self.leads().await?;
        if leads.is_empty() {
            // No region anywhere: nothing to watch (and no node list to read).
            self.state().pending = 0;
            return Ok(());
        }
        let switches = self.switches().await?;
        let (running, _) = self.load();
        let mut budget = self
            .failover
            .max_concurrent_migrations
            .saturating_sub(running);
        let now = unix_ms();
        let moving = self.ctx.plane.leases.operations();
        // Only the nodes that lead regions matter here.
        let leading: BTreeSet<u64> = leads.iter().map(|l| l.leader).collect();
        let mut failed = BTreeSet::new();
        let mut draining = BTreeSet::new();
        for node in self.ctx.nodes.list_local().await? {
            if node.role != NodeRole::Datanode || !leading.contains(&node.id) {
                continue;
            }
            if node.state == NodeState::Draining {
                draining.insert(node.id);
            }
            if self.ctx.plane.view(node.id, now).liveness == pb::Liveness::Failed {
                failed.insert(node.id);
            }
        }
        let missing = self.missing(&leads, &failed, now);
        if leads.iter().any(|l| l.downgrading_since.is_some()) {
            self.repair(&leads, now).await?;
        }
        let work = !failed.is_empty() || !missing.is_empty() || !draining.is_empty();
        // Read only when something may move; none can take regions: nothing moves
        // this tick (the error says why).
        let candidates: Vec<_> = if work || switches.balancer {
            self.ctx.candidates().await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let ready = |region: u64| {
            !moving.contains_key(&region)
                && self
                    .state()
                    .backoff
                    .get(&region)
                    .is_none_or(|(_, at)| now >= *at)
        };
        let mut moves: Vec<(Move, &str)> = Vec::new();
        let automatic = !switches.maintenance;
        if self.failover.enabled {
            let wanted = |l: &Lead| {
                (failed.contains(&l.leader) || missing.contains(&l.region)) && ready(l.region)
            };
            // Counted in maintenance and in backoff too: the operator sees what waits.
            self.state().pending = leads
                .iter()
                .filter(|l| {
                    (failed.contains(&l.leader) || missing.contains(&l.region))
                        && !moving.contains_key(&l.region)
                })
                .count();
            if automatic {
                let planned = plan::plan(&leads, wanted, &candidates, &self.ctx.selector, budget);
                budget -= planned.len();
                moves.extend(planned.into_iter().map(|m| (m, "failover")));
            }
        } else {
            self.state().pending = 0;
        }
        if !draining.is_empty() {
            let wanted = |l: &Lead| {
                draining.contains(&l.leader) && !failed.contains(&l.leader) && ready(l.region)
            };
            let planned = plan::plan(&leads, wanted, &candidates, &self.ctx.selector, budget);
            budget -= planned.len();
            moves.extend(planned.into_iter().map(|m| (m, "drain")));
        }
        if switches.balancer && automatic && budget > 0 {
            let movable = |region: u64| {
                ready(region)
                    && self
                        .state()
                        .cooldown
                        .get(&region)
                        .is_none_or(|until| now >= *until)
            };
            let planned = plan::balance(
                &leads,
                &candidates,
                self.balancer.tolerance,
                movable,
                budget,
            );
            moves.extend(planned.into_iter().map(|m| (m, "balance")));
        }
        for (m, reason) in moves {
            self.start_move(&manager, term, m, reason).await;
        }
        Ok(())
    }

    /// Regions a live leader has left out of its full stats for `region_missing_ms`.
    fn missing(&self, leads: &[Lead], failed: &BTreeSet<u64>, now: u64) -> BTreeSet<u64> {
        let mut reported: HashMap<u64, Option<std::collections::HashSet<u64>>> = HashMap::new();
        let mut state = self.state();
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for lead in leads.iter().filter(|l| !failed.contains(&l.leader)) {
            let held = reported
                .entry(lead.leader)
                .or_insert_with(|| self.ctx.plane.live.reported(lead.leader));
            let absent = held.as_ref().is_some_and(|h| !h.contains(&lead.region));
            if !absent {
                continue;
            }
            seen.insert(lead.region);
            let since = *state.missing_since.entry(lead.region).or_insert(now);
            if now.saturating_sub(since) >= self.failover.region_missing_ms {
                out.insert(lead.region);
            }
        }
        state.missing_since.retain(|r, _| seen.contains(r));
        out
    }

    async fn start_move(
        self: &Arc<Self>,
        manager: &procedure::ProcedureManager,
        term: u64,
        m: Move,
        reason: &str,
    ) {
        let timeout = Duration::from_millis(self.failover.migration_timeout_ms);
        tracing::info!(
            from = m.from,
            to = m.to,
            regions = m.regions.len(),
            reason,
            "supervisor moves regions"
        );
        if reason == "balance" {
            let until = unix_ms() + self.balancer.cooldown_ms;
            let mut state = self.state();
            for r in &m.regions {
                state.cooldown.insert(*r, until);
            }
        }
        let submitted = crate::procedures::region::submit(
            manager,
            &self.ctx,
            m.regions.clone(),
            (m.from, m.to),
            timeout,
            reason,
        )
        .await;
        let watcher = match submitted {
            Ok((_, Some(watcher))) => watcher,
            Ok((_, None)) => return,
            Err(e) => {
                tracing::warn!(error = %e, "supervisor could not submit a migration");
                self.back_off(&m.regions);
                return;
            }
        };
        // The outcome decides the backoff; the watcher ends with the term at the latest.
        let this = self.clone();
        tokio::spawn(async move {
            match watcher.wait().await {
                Err(e) => {
                    tracing::warn!(error = %e, "a supervisor migration failed: backing off");
                    if this.state().term == term {
                        this.back_off(&m.regions);
                    }
                }
                Ok(_) => {
                    let mut state = this.state();
                    for r in &m.regions {
                        state.backoff.remove(r);
                    }
                }
            }
        });
    }

    /// After a failed move: `backoff_ms`, doubling per failure up to 8 times that.
    fn back_off(&self, regions: &[u64]) {
        let now = unix_ms();
        let mut state = self.state();
        for r in regions {
            let entry = state.backoff.entry(*r).or_insert((0, 0));
            entry.0 += 1;
            entry.1 = now + self.failover.backoff_ms * (1u64 << (entry.0 - 1).min(3));
        }
    }

    /// Registers in the ledger the regions of every unfinished migration on record,
    /// once per term, before anything new is submitted: a recovered migration keeps
    /// its regions, and nothing competes with it.
    pub async fn seed(
        &self,
        term: u64,
        manager: &procedure::ProcedureManager,
    ) -> common_meta::Result<()> {
        if self.state().seeded == Some(term) {
            return Ok(());
        }
        let records = manager
            .list()
            .await
            .map_err(|e| common_meta::Error::Unavailable {
                message: format!("listing procedures: {e}"),
            })?;
        for record in records {
            if record.type_name != crate::procedures::region::migrate::TYPE_NAME
                || record.state.is_finished()
            {
                continue;
            }
            let Ok(data) =
                serde_json::from_str::<crate::procedures::region::migrate::Data>(&record.data)
            else {
                continue;
            };
            for region in data.regions {
                let op = crate::cluster_plane::region_lease::Operation {
                    procedure: record.id.clone(),
                    from: data.from,
                    to: data.to,
                };
                // A region already registered (its procedure ran first) stays so.
                let _ = self.ctx.plane.leases.begin(term, region, op);
            }
        }
        self.state().seeded = Some(term);
        Ok(())
    }

    /// Puts back to serving the regions a migration left downgrading (its rollback
    /// ran out of retries, or its record could not be loaded): marked longer ago than
    /// any migration may take, and moved by none.
    async fn repair(&self, leads: &[Lead], now: u64) -> common_meta::Result<()> {
        let stale =
            self.failover.migration_timeout_ms + 2 * self.ctx.plane.leases.config().lease_ms;
        let mut by_table: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for lead in leads {
            let Some(since) = lead.downgrading_since else {
                continue;
            };
            if now.saturating_sub(since) > stale
                && self.ctx.plane.leases.operation(lead.region).is_none()
            {
                by_table
                    .entry(RegionId::from(lead.region).table_id())
                    .or_default()
                    .push((lead.region, lead.leader));
            }
        }
        for (table, regions) in by_table {
            let (Some(info), Some(route)) = self.ctx.tables.table_local(table).await? else {
                continue;
            };
            let mut next = route.value.clone();
            let mut changed = false;
            for entry in &mut next.regions {
                let orphan = regions.iter().any(|(r, l)| {
                    *r == entry.region.as_u64()
                        && entry.leader.as_ref().is_some_and(|p| p.id == *l)
                        && self.ctx.plane.leases.operation(*r).is_none()
                });
                if orphan && entry.leader_state == LeaderState::Downgrading {
                    tracing::warn!(region = %entry.region, "a region left downgrading by a migration serves again");
                    entry.leader_state = LeaderState::Serving;
                    entry.leader_down_since = None;
                    changed = true;
                }
            }
            if changed {
                next.version = route.value.version + 1;
                self.ctx
                    .tables
                    .update_table_route(&info.value, &route, &next)
                    .await?;
            }
        }
        Ok(())
    }
}
