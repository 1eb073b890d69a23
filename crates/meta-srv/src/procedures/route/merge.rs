//! Merge a route with its right neighbour: two adjacent `Active` routes of one group
//! become one route with a new id, naming the left one as parent. One catalog save;
//! run again, it finds the merged route and saves nothing.

use std::sync::Arc;

use async_trait::async_trait;
use common_meta::model::route::RouteCatalog;
use procedure::{Context, LockKey, LockMode, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::{Change, Outcome, RouteContext, change_catalog, lock_of};
use crate::procedures::ddl::context::{dump_state, load_state};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.MergeRoutes";

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Data {
    /// The left route.
    pub left: u64,
    /// Its right neighbour when the merge was planned.
    pub right: u64,
    /// Where the merged route starts (the left route's start).
    pub start: Vec<u8>,
}

/// Checks that `catalog` can merge `left` with its right neighbour now: the neighbour's
/// id and the result.
pub fn plan(catalog: &RouteCatalog, left: u64) -> common_meta::Result<(u64, RouteCatalog)> {
    let next = catalog.merge_right(left)?;
    // merge_right found the neighbour, or it would have refused.
    let right = catalog
        .route(left)
        .and_then(|l| l.end.clone())
        .and_then(|end| catalog.routes.iter().find(|r| r.start == end))
        .map_or(0, |r| r.route_id);
    Ok((right, next))
}

/// The merged route, if the catalog holds it.
fn merged(catalog: &RouteCatalog, data: &Data) -> Option<Outcome> {
    if catalog.route(data.left).is_some() || catalog.route(data.right).is_some() {
        return None;
    }
    catalog
        .routes
        .iter()
        .find(|r| r.parent_route_id == Some(data.left) && r.start == data.start)
        .map(|r| Outcome {
            version: catalog.version,
            routes: vec![r.clone()],
        })
}

/// The merge procedure.
pub struct MergeRoutes {
    data: Data,
    ctx: Arc<RouteContext>,
}

impl MergeRoutes {
    /// A merge of `left` with `right`, its neighbour when planned; `start` is where
    /// `left` starts.
    pub fn new(ctx: Arc<RouteContext>, left: u64, right: u64, start: Vec<u8>) -> Self {
        MergeRoutes {
            data: Data { left, right, start },
            ctx,
        }
    }

    /// Rebuilds a merge from its persisted state.
    pub fn load(ctx: Arc<RouteContext>, json: &str) -> procedure::Result<Self> {
        Ok(MergeRoutes {
            data: load_state("merge-routes", json)?,
            ctx,
        })
    }
}

#[async_trait]
impl Procedure for MergeRoutes {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let data = &self.data;
        let saved = change_catalog(&self.ctx, |catalog| {
            if merged(catalog, data).is_some() {
                return Ok(Change::Done);
            }
            let (right, next) = plan(catalog, data.left)?;
            if right != data.right {
                return Err(common_meta::Error::FailedPrecondition {
                    message: format!(
                        "route {} is no longer next to route {} (route {right} is): not merged",
                        data.right, data.left
                    ),
                });
            }
            Ok(Change::Save(next))
        })
        .await?;
        let outcome = merged(&saved, data).ok_or_else(|| {
            procedure::Error::external(format!(
                "routes {} and {} were changed by someone else",
                data.left, data.right
            ))
        })?;
        tracing::info!(
            procedure = %ctx.procedure_id,
            left = data.left,
            right = data.right,
            merged = outcome.routes[0].route_id,
            version = outcome.version,
            "routes merged"
        );
        Ok(Status::Done {
            output: outcome.output(),
        })
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        LockKey::exclusive(lock_of(self.data.left))
            .with(lock_of(self.data.right), LockMode::Exclusive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_recognises_its_own_result() {
        let split = RouteCatalog::initial(1).split_at(b"m").unwrap();
        let (right, next) = plan(&split, 2).unwrap();
        assert_eq!(right, 3);
        let data = Data {
            left: 2,
            right: 3,
            start: Vec::new(),
        };
        assert!(merged(&split, &data).is_none());
        let done = merged(&next, &data).unwrap();
        assert_eq!(done.routes[0].end, None);
        assert!(
            plan(&split, 3).is_err(),
            "the last route has no right neighbour"
        );
    }
}
