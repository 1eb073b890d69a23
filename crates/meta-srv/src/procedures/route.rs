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
/// of `change` fails the step for good; storage errors are retried.
pub async fn change_catalog(
    routes: &RouteCatalogManager,
    change: impl Fn(&RouteCatalog) -> common_meta::Result<Change>,
) -> procedure::Result<RouteCatalog> {
    loop {
        let (base, _) = routes.load().await.map_err(step_error)?;
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
