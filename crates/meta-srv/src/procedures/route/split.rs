//! Split a route at a key: the route owning the key becomes two routes of the same
//! group with new ids, each naming it as parent. One catalog save; run again (a new
//! leader resuming it), it finds its children and saves nothing.

use std::sync::Arc;

use async_trait::async_trait;
use common_meta::model::route::RouteCatalog;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::{Change, Outcome, RouteContext, change_catalog, lock_of};
use crate::procedures::ddl::context::{dump_state, load_state};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.SplitRoute";

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Data {
    /// Where to split.
    pub key: Vec<u8>,
    /// The route that owned the key when the split was asked.
    pub parent: u64,
    /// Why (manual, hotspot): shown to operators.
    pub reason: String,
}

/// The children of `parent` split at `key`, if the catalog holds them (either may have
/// been split again since: one of this split's halves still starts or ends at `key`).
fn children(catalog: &RouteCatalog, parent: u64, key: &[u8]) -> Option<Outcome> {
    if catalog.route(parent).is_some() {
        return None;
    }
    let kids: Vec<_> = catalog
        .routes
        .iter()
        .filter(|r| r.parent_route_id == Some(parent))
        .cloned()
        .collect();
    let here = kids
        .iter()
        .any(|r| r.start == key || r.end.as_deref() == Some(key));
    here.then_some(Outcome {
        version: catalog.version,
        routes: kids,
    })
}

/// Checks that `catalog` can split `parent` at `key` now, and returns the result.
pub fn plan(catalog: &RouteCatalog, key: &[u8]) -> common_meta::Result<(u64, RouteCatalog)> {
    let next = catalog.split_at(key)?;
    // split_at found an owner, or it would have refused.
    let parent = catalog.owner(key).map_or(0, |r| r.route_id);
    Ok((parent, next))
}

/// The split procedure.
pub struct SplitRoute {
    data: Data,
    ctx: Arc<RouteContext>,
}

impl SplitRoute {
    /// A split of `parent` (the owner of `key` when planned) at `key`.
    pub fn new(ctx: Arc<RouteContext>, key: Vec<u8>, parent: u64, reason: &str) -> Self {
        SplitRoute {
            data: Data {
                key,
                parent,
                reason: reason.to_string(),
            },
            ctx,
        }
    }

    /// Rebuilds a split from its persisted state.
    pub fn load(ctx: Arc<RouteContext>, json: &str) -> procedure::Result<Self> {
        Ok(SplitRoute {
            data: load_state("split-route", json)?,
            ctx,
        })
    }
}

#[async_trait]
impl Procedure for SplitRoute {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let Data { key, parent, .. } = &self.data;
        let saved = change_catalog(&self.ctx, |catalog| {
            if children(catalog, *parent, key).is_some() {
                return Ok(Change::Done);
            }
            let (owner, next) = plan(catalog, key)?;
            if owner != *parent {
                return Err(common_meta::Error::FailedPrecondition {
                    message: format!(
                        "route {parent} no longer owns the key (route {owner} does): not split"
                    ),
                });
            }
            Ok(Change::Save(next))
        })
        .await?;
        let outcome = children(&saved, *parent, key).ok_or_else(|| {
            procedure::Error::external(format!("route {parent} was changed by someone else"))
        })?;
        tracing::info!(
            procedure = %ctx.procedure_id,
            parent,
            children = ?outcome.routes.iter().map(|r| r.route_id).collect::<Vec<_>>(),
            version = outcome.version,
            reason = %self.data.reason,
            "route split"
        );
        Ok(Status::Done {
            output: outcome.output(),
        })
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        LockKey::exclusive(lock_of(self.data.parent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_recognises_its_own_children_and_nothing_else() {
        let first = RouteCatalog::initial(1);
        let (parent, next) = plan(&first, b"m").unwrap();
        assert_eq!(parent, 1);
        assert!(children(&first, 1, b"m").is_none());
        let done = children(&next, 1, b"m").unwrap();
        assert_eq!(done.routes.len(), 2);
        // Split elsewhere: not this split's children.
        let (_, other) = plan(&first, b"c").unwrap();
        assert!(children(&other, 1, b"m").is_none());
    }
}
