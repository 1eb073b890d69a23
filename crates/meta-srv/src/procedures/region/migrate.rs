//! Region migration: move the leadership of regions from one datanode to another
//! without ever letting both write one region.
//!
//! Steps (each saved, each idempotent; a new meta leader resumes at the last saved):
//! 1. `open`: open a candidate of every region on `to` (it holds a follower lease while
//!    the migration is registered in the lease ledger).
//! 2. `mark`: the routes mark `from` as a downgrading leader (compare on the route):
//!    from now on no lease lets `from` write them.
//! 3. `downgrade`: `from` stops writing at once and says the last entry it wrote. A
//!    region it cannot confirm (the node is failed, silent, or lost the region) is
//!    *fenced by time* instead: the next step waits until every leader lease `from`
//!    may hold has surely ended ([`LeaseLedger::expiry_bound`]).
//! 4. `fence`: that wait, for the unconfirmed regions only.
//! 5. `upgrade`: the candidate replays the log up to the last entry (opened again
//!    first, in case a leader change closed it).
//! 6. `route`: the routes name `to` as the serving leader; its next heartbeat gets
//!    the leader lease.
//! 7. `close`: every node drops what it cached of the tables (best effort), and
//!    `from` closes its copies (best effort: if it is away, its next leases call them
//!    closeable).
//!
//! Rollback (a failure before `route`): the routes serve from `from` again and the
//! candidates on `to` are closed. After `route` the migration only goes forward.
//!
//! [`LeaseLedger::expiry_bound`]: crate::cluster_plane::region_lease::LeaseLedger::expiry_bound

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common_meta::model::table::{LeaderState, Peer, RegionId, RegionRoute};
use common_meta::time::unix_ms;
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, LockMode, Procedure, Status};
use serde::{Deserialize, Serialize};

use crate::cluster_plane::region_lease::Operation;
use crate::procedures::ddl::context::{DdlContext, dump_state, load_state, step_error};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.MigrateRegions";

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Open candidates on `to`.
    Open,
    /// Mark the routes downgrading.
    Mark,
    /// Ask `from` to stop writing.
    Downgrade,
    /// Wait out the leases of regions whose downgrade was not confirmed.
    Fence,
    /// Catch the candidates up.
    Upgrade,
    /// Route the regions to `to`.
    Route,
    /// Close the copies on `from`.
    Close,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Data {
    /// The regions moved.
    pub regions: Vec<u64>,
    /// The node they leave.
    pub from: u64,
    /// The node they go to.
    pub to: u64,
    /// Why (manual, failover, drain, balance): shown to operators.
    #[serde(default)]
    pub reason: String,
    /// Unix ms after which a migration not yet routed rolls back.
    pub deadline_ms: u64,
    /// The next step.
    pub step: Step,
    /// Regions `from` confirmed it stopped writing, with their last entries.
    #[serde(default)]
    pub confirmed: BTreeMap<u64, u64>,
    /// Regions already led by `to` when the migration started (nothing to do).
    #[serde(default)]
    pub already: BTreeSet<u64>,
    /// Regions whose copy on `to` this migration opened (`to` was not in the route):
    /// the only ones a rollback closes (a follower's copy stays).
    #[serde(default)]
    pub opened: BTreeSet<u64>,
    /// The tables of the regions, `[catalog, schema, table]`: their names are locked
    /// shared, so table DDL waits for the migration and the other way round.
    #[serde(default)]
    pub tables: Vec<[String; 3]>,
}

/// Why a region instruction did not succeed.
#[derive(Debug)]
enum Failed {
    /// The node answered no.
    Refused(String),
    /// No answer (no stream, failed node, timeout).
    Unreachable(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Refused(e) => write!(f, "refused: {e}"),
            Failed::Unreachable(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// The migration procedure.
pub struct MigrateRegions {
    data: Data,
    ctx: Arc<DdlContext>,
    /// The regions were registered to this procedure in the ledger: a migration
    /// refused because another one moves a region must not undo that one's work.
    owns: bool,
}

impl MigrateRegions {
    /// A migration of `regions` from `from` to `to` that must be routed within
    /// `timeout`.
    pub fn new(
        ctx: Arc<DdlContext>,
        regions: Vec<u64>,
        from: u64,
        to: u64,
        timeout: Duration,
        reason: &str,
        tables: Vec<[String; 3]>,
    ) -> Self {
        let mut regions = regions;
        regions.sort_unstable();
        regions.dedup();
        MigrateRegions {
            data: Data {
                regions,
                from,
                to,
                reason: reason.to_string(),
                deadline_ms: unix_ms() + timeout.as_millis() as u64,
                step: Step::Open,
                confirmed: BTreeMap::new(),
                already: BTreeSet::new(),
                opened: BTreeSet::new(),
                tables,
            },
            ctx,
            owns: false,
        }
    }

    /// The persisted state.
    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Rebuilds a migration from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        Ok(MigrateRegions {
            data: load_state("migrate-regions", json)?,
            ctx,
            // Loaded from the store: it ran, and registered, before.
            owns: true,
        })
    }

    /// The regions still to move (not already led by `to`).
    fn moving(&self) -> Vec<u64> {
        self.data
            .regions
            .iter()
            .filter(|r| !self.data.already.contains(r))
            .copied()
            .collect()
    }

    /// Registers the migration in the lease ledger (every step: a new leader's ledger
    /// starts empty).
    fn register(&mut self, ctx: &Context) -> procedure::Result<()> {
        let term = (*self.ctx.plane.leadership.borrow()).unwrap_or(0);
        for region in &self.data.regions {
            let op = Operation {
                procedure: ctx.procedure_id.clone(),
                from: self.data.from,
                to: self.data.to,
            };
            match self.ctx.plane.leases.begin(term, *region, op) {
                Ok(()) => {}
                Err(crate::cluster_plane::region_lease::Busy::NotLeading) => {
                    return Err(procedure::Error::retry_later("this member no longer leads"));
                }
                Err(busy) => {
                    // Another procedure owns the region: undo nothing of its work.
                    self.unregister(ctx);
                    self.owns = false;
                    return Err(procedure::Error::external(busy.error(*region).to_string()));
                }
            }
        }
        self.owns = true;
        Ok(())
    }

    fn unregister(&self, ctx: &Context) {
        for region in &self.data.regions {
            self.ctx.plane.leases.end(*region, &ctx.procedure_id);
        }
    }

    fn check_deadline(&self) -> procedure::Result<()> {
        if unix_ms() > self.data.deadline_ms {
            return Err(procedure::Error::external(format!(
                "the migration did not finish in time (step {:?}); rolling back",
                self.data.step
            )));
        }
        Ok(())
    }

    /// Sends one region instruction per region of `regions` to `node` at once; the
    /// outcomes by region (an error for a region that failed).
    async fn each(
        &self,
        node: u64,
        regions: &[u64],
        make: impl Fn(u64) -> pb::instruction::Kind,
    ) -> BTreeMap<u64, Result<pb::RegionOutcome, Failed>> {
        let deadline = Duration::from_millis(self.ctx.config.region_timeout_ms);
        let sends = regions.iter().map(|region| {
            let instruction = pb::Instruction {
                kind: Some(make(*region)),
            };
            async move {
                let outcome = match self.ctx.plane.send(node, instruction, deadline).await {
                    Err(e) => Err(Failed::Unreachable(e.to_string())),
                    Ok(reply) if !reply.ok => Err(Failed::Refused(reply.error)),
                    Ok(reply) => match reply.regions.into_iter().find(|o| o.region_id == *region) {
                        Some(o) if o.ok => Ok(o),
                        Some(o) => Err(Failed::Refused(o.error)),
                        None => Err(Failed::Refused("no outcome for the region".to_string())),
                    },
                };
                (*region, outcome)
            }
        });
        futures_util::future::join_all(sends)
            .await
            .into_iter()
            .collect()
    }

    /// Fails the step naming the regions that failed at `what`: for good when the
    /// node refused (the migration rolls back), retried when it did not answer.
    fn all_ok<T>(
        what: &str,
        node: u64,
        outcomes: &BTreeMap<u64, Result<T, Failed>>,
    ) -> procedure::Result<()> {
        let mut refused = false;
        let failed: Vec<String> = outcomes
            .iter()
            .filter_map(|(r, o)| {
                o.as_ref().err().map(|e| {
                    refused |= matches!(e, Failed::Refused(_));
                    format!("{}: {e}", RegionId::from(*r))
                })
            })
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        let message = format!(
            "datanode {node} could not {what} {} region(s): {}",
            failed.len(),
            failed.join("; ")
        );
        Err(if refused {
            procedure::Error::external(message)
        } else {
            procedure::Error::retry_later(message)
        })
    }

    /// Opens the candidates on `to`, with their tables' info.
    async fn open(&self, regions: &[u64]) -> procedure::Result<()> {
        let mut infos: BTreeMap<u32, String> = BTreeMap::new();
        for region in regions {
            let table = RegionId::from(*region).table_id();
            if let std::collections::btree_map::Entry::Vacant(slot) = infos.entry(table) {
                let (info, _) = self
                    .ctx
                    .tables
                    .table_local(table)
                    .await
                    .map_err(step_error)?;
                let info = info.ok_or_else(|| {
                    procedure::Error::external(format!("table {table} no longer exists"))
                })?;
                slot.insert(String::from_utf8_lossy(&info.raw).into_owned());
            }
        }
        let outcomes = self
            .each(self.data.to, regions, |region| {
                pb::instruction::Kind::OpenRegion(pb::RegionInstruction {
                    region_id: region,
                    table_info_json: infos
                        .get(&RegionId::from(region).table_id())
                        .cloned()
                        .unwrap_or_default(),
                    ..Default::default()
                })
            })
            .await;
        Self::all_ok("open", self.data.to, &outcomes)
    }

    /// Applies `change` to the route entry of each region of `regions`, one compare
    /// per table, retried while other writers (other migrations of the same table) win.
    /// `change` answers whether it changed the entry, or why it must not (the step
    /// fails for good).
    async fn change_routes(
        &self,
        regions: &[u64],
        change: impl Fn(&mut RegionRoute) -> Result<bool, String>,
    ) -> procedure::Result<()> {
        let mut by_table: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
        for region in regions {
            by_table
                .entry(RegionId::from(*region).table_id())
                .or_default()
                .insert(*region);
        }
        for (table, mine) in by_table {
            loop {
                let (info, route) = self
                    .ctx
                    .tables
                    .table_local(table)
                    .await
                    .map_err(step_error)?;
                let (Some(info), Some(route)) = (info, route) else {
                    return Err(procedure::Error::external(format!(
                        "table {table} no longer exists"
                    )));
                };
                let mut next = route.value.clone();
                let mut changed = false;
                for entry in next
                    .regions
                    .iter_mut()
                    .filter(|e| mine.contains(&e.region.as_u64()))
                {
                    changed |= change(entry).map_err(procedure::Error::external)?;
                }
                if !changed {
                    break;
                }
                next.version = route.value.version + 1;
                if self
                    .ctx
                    .tables
                    .update_table_route(&info.value, &route, &next)
                    .await
                    .map_err(step_error)?
                {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn step(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let (from, to) = (self.data.from, self.data.to);
        match self.data.step {
            Step::Open => {
                self.check_deadline()?;
                // Regions `to` leads already need nothing; any other leader than
                // `from` means the request is stale.
                let mut already = BTreeSet::new();
                let mut opened = BTreeSet::new();
                for region in &self.data.regions {
                    let id = RegionId::from(*region);
                    let (_, route) = self
                        .ctx
                        .tables
                        .table_local(id.table_id())
                        .await
                        .map_err(step_error)?;
                    let entry = route
                        .as_ref()
                        .and_then(|r| r.value.regions.iter().find(|e| e.region == id));
                    if entry.is_some_and(|e| !e.followers.iter().any(|p| p.id == to)) {
                        opened.insert(*region);
                    }
                    let leader = entry.map(|e| e.leader.as_ref().map_or(0, |p| p.id));
                    match leader {
                        None => {
                            return Err(procedure::Error::external(format!(
                                "region {id} does not exist"
                            )));
                        }
                        Some(l) if l == to => {
                            already.insert(*region);
                        }
                        Some(l) if l == from => {}
                        Some(l) => {
                            return Err(procedure::Error::external(format!(
                                "region {id} is led by datanode {l}, not {from}"
                            )));
                        }
                    }
                }
                self.data.already = already;
                self.data.opened = opened;
                let moving = self.moving();
                self.open(&moving).await?;
                self.data.step = Step::Mark;
            }
            Step::Mark => {
                self.check_deadline()?;
                let now = unix_ms();
                self.change_routes(&self.moving(), |e| {
                    let leader = e.leader.as_ref().map_or(0, |p| p.id);
                    if leader != from {
                        return Err(format!(
                            "region {} is led by datanode {leader} now, not {from}",
                            e.region
                        ));
                    }
                    if e.leader_state == LeaderState::Serving {
                        e.leader_state = LeaderState::Downgrading;
                        e.leader_down_since = Some(now);
                        return Ok(true);
                    }
                    Ok(false)
                })
                .await?;
                self.data.step = Step::Downgrade;
            }
            Step::Downgrade => {
                let moving = self.moving();
                let outcomes = self
                    .each(from, &moving, |region| {
                        pb::instruction::Kind::DowngradeRegion(pb::RegionInstruction {
                            region_id: region,
                            ..Default::default()
                        })
                    })
                    .await;
                for (region, outcome) in outcomes {
                    match outcome {
                        Ok(o) => {
                            self.data.confirmed.insert(region, o.last_entry_id);
                        }
                        Err(e) => tracing::info!(
                            procedure = %ctx.procedure_id,
                            region = %RegionId::from(region),
                            node = from,
                            error = %e,
                            "downgrade not confirmed: waiting out the old leader's lease"
                        ),
                    }
                }
                self.data.step = Step::Fence;
            }
            Step::Fence => {
                let bound = self
                    .moving()
                    .iter()
                    .filter(|r| !self.data.confirmed.contains_key(r))
                    .map(|r| self.ctx.plane.leases.expiry_bound(*r, from))
                    .max()
                    .unwrap_or(0);
                let now = self.ctx.plane.leases.now_ms();
                if now < bound {
                    // Short sleeps, so that a loss of leadership stops this soon.
                    let wait = Duration::from_millis((bound - now).min(500));
                    tokio::time::sleep(wait).await;
                    return Ok(Status::Executing { persist: false });
                }
                self.data.step = Step::Upgrade;
            }
            Step::Upgrade => {
                self.check_deadline()?;
                let moving = self.moving();
                self.open(&moving).await?;
                let confirmed = self.data.confirmed.clone();
                let outcomes = self
                    .each(to, &moving, |region| {
                        pb::instruction::Kind::UpgradeRegion(pb::RegionInstruction {
                            region_id: region,
                            last_entry_id: confirmed.get(&region).copied().unwrap_or(0),
                            ..Default::default()
                        })
                    })
                    .await;
                Self::all_ok("upgrade", to, &outcomes)?;
                self.data.step = Step::Route;
            }
            Step::Route => {
                let addr = self
                    .ctx
                    .nodes
                    .get(to)
                    .await
                    .map_err(step_error)?
                    .map(|n| n.addr)
                    .unwrap_or_default();
                self.change_routes(&self.moving(), |e| {
                    let leader = e.leader.as_ref().map_or(0, |p| p.id);
                    if leader == to {
                        return Ok(false);
                    }
                    if leader != from || e.leader_state != LeaderState::Downgrading {
                        return Err(format!(
                            "region {} changed under the migration: led by datanode {leader}, {:?}",
                            e.region, e.leader_state
                        ));
                    }
                    e.leader = Some(Peer {
                        id: to,
                        addr: addr.clone(),
                    });
                    e.followers.retain(|p| p.id != to);
                    e.leader_state = LeaderState::Serving;
                    e.leader_down_since = None;
                    Ok(true)
                })
                .await?;
                self.data.step = Step::Close;
            }
            Step::Close => {
                let moving = self.moving();
                // Routes changed: nodes drop what they cached of these tables (the new
                // leader's answer to it also brings it its leader lease at once,
                // instead of at its next heartbeat).
                let tables: BTreeSet<u32> = moving
                    .iter()
                    .map(|r| RegionId::from(*r).table_id())
                    .collect();
                let idents = tables
                    .into_iter()
                    .map(|id| pb::CacheIdent {
                        kind: Some(pb::cache_ident::Kind::TableId(id)),
                    })
                    .collect();
                let close = self.each(from, &moving, |region| {
                    pb::instruction::Kind::CloseRegion(pb::RegionInstruction {
                        region_id: region,
                        ..Default::default()
                    })
                });
                let (_, outcomes) = tokio::join!(self.ctx.invalidate(idents), close);
                let left = outcomes.values().filter(|o| o.is_err()).count();
                if left > 0 {
                    tracing::info!(
                        procedure = %ctx.procedure_id,
                        node = from,
                        left,
                        "old copies not closed now: the node's leases will call them closeable"
                    );
                }
                self.unregister(ctx);
                return Ok(Status::Done {
                    output: Some(format!(
                        "moved {} region(s) from datanode {from} to {to}",
                        moving.len()
                    )),
                });
            }
        }
        Ok(Status::Executing { persist: true })
    }
}

#[async_trait]
impl Procedure for MigrateRegions {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        self.register(ctx)?;
        self.step(ctx).await
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        let mut lock = LockKey::none();
        for [catalog, schema, table] in &self.data.tables {
            lock = lock
                .with(format!("catalog/{catalog}"), LockMode::Shared)
                .with(format!("schema/{catalog}/{schema}"), LockMode::Shared)
                .with(
                    format!("table_name/{catalog}/{schema}/{table}"),
                    LockMode::Shared,
                );
        }
        for region in &self.data.regions {
            lock = lock.with(format!("region/{region}"), LockMode::Exclusive);
        }
        lock
    }

    fn rollback_supported(&self) -> bool {
        true
    }

    async fn rollback(&mut self, ctx: &Context) -> procedure::Result<()> {
        if !self.owns {
            return Ok(());
        }
        if matches!(self.data.step, Step::Close) {
            // Routed already: nothing to undo (a failure here is only the close).
            self.unregister(ctx);
            return Ok(());
        }
        let (from, to) = (self.data.from, self.data.to);
        let mut moving = self.moving();
        self.change_routes(&moving, |e| {
            let leads = e.leader.as_ref().is_some_and(|p| p.id == from);
            if leads && e.leader_state == LeaderState::Downgrading {
                e.leader_state = LeaderState::Serving;
                e.leader_down_since = None;
                return Ok(true);
            }
            Ok(false)
        })
        .await
        .or_else(|e| {
            // A table dropped meanwhile has no route to restore.
            if e.to_string().contains("no longer exists") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        // Candidates the routes already name as leaders stay (a route step that
        // failed part way).
        let mut led = BTreeSet::new();
        for region in &moving {
            let id = RegionId::from(*region);
            if let Ok((_, Some(route))) = self.ctx.tables.table_local(id.table_id()).await
                && route
                    .value
                    .regions
                    .iter()
                    .any(|e| e.region == id && e.leader.as_ref().is_some_and(|p| p.id == to))
            {
                led.insert(*region);
            }
        }
        moving.retain(|r| !led.contains(r) && self.data.opened.contains(r));
        let outcomes = self
            .each(to, &moving, |region| {
                pb::instruction::Kind::CloseRegion(pb::RegionInstruction {
                    region_id: region,
                    ..Default::default()
                })
            })
            .await;
        if outcomes.values().any(Result::is_err) {
            tracing::info!(procedure = %ctx.procedure_id, "some candidates not closed: their leases will call them closeable");
        }
        self.unregister(ctx);
        Ok(())
    }
}
