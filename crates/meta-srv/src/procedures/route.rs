//! The range route catalog's procedures: split a route at a key, merge two adjacent
//! routes of one group, move a route to another group. Each runs on the leader under
//! the lock of the routes it changes (`route/{id}`), saves the catalog through
//! [`RouteCatalogManager`] (an optimistic save that moves the version by one), and
//! recognises its own earlier save when a new leader runs a step again.
//!
//! A change's output is a [`RouteChange`](common_meta::model::route::RouteChange) in JSON: the catalog version it saved last and
//! the routes it made.

pub mod merge;
pub mod move_route;
pub mod split;

use std::sync::Arc;
use std::time::Duration;

use common_meta::manager::route::{RouteCatalogManager, SaveOutcome};
use common_meta::model::route::RouteCatalog;
pub use common_meta::model::route::RouteChange as Outcome;
use common_meta::route_table::RouteTable;
use procedure::{BoxedProcedure, ProcedureManager, ProcedureWithId, Watcher};

use crate::cluster_plane::heartbeat_chain::ClusterPlane;
use crate::procedures::ddl::context::step_error;

/// What the route procedures share.
pub struct RouteContext {
    /// The catalog.
    pub routes: RouteCatalogManager,
    /// Group leaders (from heartbeats) and the mailbox to them.
    pub plane: Arc<ClusterPlane>,
    /// How long a group's leader has to answer one instruction.
    pub instruction_timeout: Duration,
    /// How long a move may take before it rolls back, unless the request says.
    pub move_timeout: Duration,
    /// The catalog in memory, following this member's store (made at first use).
    pub table: tokio::sync::OnceCell<RouteTable>,
}

/// How long a read waits for the in-memory table to reach the stored version before it
/// reads the whole catalog from the store instead.
const TABLE_PATIENCE: Duration = Duration::from_secs(2);

impl RouteContext {
    /// A context over `routes` (the in-memory table is made at first use).
    pub fn new(
        routes: RouteCatalogManager,
        plane: Arc<ClusterPlane>,
        instruction_timeout: Duration,
        move_timeout: Duration,
    ) -> Self {
        RouteContext {
            routes,
            plane,
            instruction_timeout,
            move_timeout,
            table: tokio::sync::OnceCell::new(),
        }
    }

    /// The in-memory table, at least at the version stored now (one linearizable read
    /// of the version key): reads of a large catalog cost O(log n), not a load of it.
    /// None when the table could not catch up in time.
    pub async fn table(&self) -> common_meta::Result<Option<&RouteTable>> {
        let version = self.routes.version().await?;
        let table = self
            .table
            .get_or_try_init(|| async {
                RouteTable::follow_with(self.routes.kv(), self.routes.initial_group()).await
            })
            .await?;
        Ok(table
            .wait_for(version, TABLE_PATIENCE)
            .await
            .then_some(table))
    }

    /// The catalog at least as new as the one stored now: from the in-memory table
    /// when it has caught up (no decoding of the whole catalog), else loaded.
    pub async fn catalog(&self) -> common_meta::Result<RouteCatalog> {
        if let Some(table) = self.table().await? {
            let current = table.current();
            return Ok(Arc::try_unwrap(current).unwrap_or_else(|shared| (*shared).clone()));
        }
        Ok(self.routes.load().await?.0)
    }
}

/// Registers the loaders of every route procedure.
pub fn register(manager: &ProcedureManager, ctx: &Arc<RouteContext>) -> procedure::Result<()> {
    let split_ctx = ctx.clone();
    manager.register_loader(
        split::TYPE_NAME,
        Box::new(move |json| Ok(Box::new(split::SplitRoute::load(split_ctx.clone(), json)?))),
    )?;
    let merge_ctx = ctx.clone();
    manager.register_loader(
        merge::TYPE_NAME,
        Box::new(move |json| Ok(Box::new(merge::MergeRoutes::load(merge_ctx.clone(), json)?))),
    )?;
    let move_ctx = ctx.clone();
    manager.register_loader(
        move_route::TYPE_NAME,
        Box::new(move |json| {
            Ok(Box::new(move_route::MoveRoute::load(
                move_ctx.clone(),
                json,
            )?))
        }),
    )
}

/// Submits `procedure` as `id`; the id and a watcher (None when the manager no longer
/// runs it).
pub async fn submit(
    manager: &ProcedureManager,
    id: String,
    procedure: BoxedProcedure,
) -> common_meta::Result<(String, Option<Watcher>)> {
    match manager
        .submit(ProcedureWithId {
            id: id.clone(),
            procedure,
        })
        .await
    {
        Ok(watcher) => Ok((id, Some(watcher))),
        Err(procedure::Error::Duplicate(_)) => Ok((id.clone(), manager.watch(&id))),
        Err(e) => Err(common_meta::Error::Unavailable {
            message: format!("the route change was not submitted: {e}"),
        }),
    }
}

/// A procedure id: `route-{what}-{unix ms}`.
pub fn procedure_id(what: &str) -> String {
    format!("route-{what}-{}", common_meta::time::unix_ms())
}

/// What a step wants of the catalog it read.
pub enum Change {
    /// Save this catalog as the next version.
    Save(RouteCatalog),
    /// Nothing to save: the step's change is there already (an earlier run saved it).
    Done,
}

/// Applies `change` to the newest catalog and saves it, starting again from a fresh
/// read when another save won; returns the catalog as it is after the step. A refusal
/// of `change` fails the step for good; storage errors are retried. The base may come
/// from the in-memory table: the save's compare on the version is the guard.
pub async fn change_catalog(
    ctx: &RouteContext,
    change: impl Fn(&RouteCatalog) -> common_meta::Result<Change>,
) -> procedure::Result<RouteCatalog> {
    let routes = &ctx.routes;
    loop {
        let base = ctx.catalog().await.map_err(step_error)?;
        let mut next = match change(&base).map_err(step_error)? {
            Change::Done => return Ok(base),
            Change::Save(next) => next,
        };
        if let SaveOutcome::Saved(version) =
            routes.save(&base, next.clone()).await.map_err(step_error)?
        {
            next.version = version;
            next.sort();
            return Ok(next);
        }
    }
}

/// The lock of one route.
pub fn lock_of(route_id: u64) -> String {
    format!("route/{route_id}")
}
