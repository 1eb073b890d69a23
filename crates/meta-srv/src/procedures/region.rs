//! Region procedures: migration (asked for by an operator, or by the supervisor for
//! failover, drain and balancing), and the checks every request to move regions goes
//! through.
//!
//! | module | what |
//! | --- | --- |
//! | `migrate` | `MigrateRegions`: open candidate -> mark downgrading -> downgrade (or wait out the lease) -> upgrade -> route -> close old |

pub mod migrate;

use std::sync::Arc;
use std::time::Duration;

use common_meta::Error;
use common_meta::model::node::{NodeRole, NodeState};
use common_meta::model::table::RegionId;
use meta_proto::v1 as pb;
use procedure::{BoxedProcedure, ProcedureManager, ProcedureWithId, Watcher};

use crate::procedures::ddl::context::DdlContext;
use migrate::MigrateRegions;

/// Registers the region procedures' loaders.
pub fn register(manager: &ProcedureManager, ctx: &Arc<DdlContext>) -> procedure::Result<()> {
    let ctx = ctx.clone();
    manager.register_loader(
        migrate::TYPE_NAME,
        Box::new(move |json| {
            Ok(Box::new(MigrateRegions::load(ctx.clone(), json)?) as BoxedProcedure)
        }),
    )
}

/// The node that leads every region of `regions` now (they must share one), checking
/// that they exist and that none is being moved.
pub async fn leader_of(ctx: &DdlContext, regions: &[u64]) -> Result<u64, Error> {
    if regions.is_empty() {
        return Err(Error::invalid_argument("name at least one region to move"));
    }
    let mut from = None;
    for region in regions {
        let id = RegionId::from(*region);
        let (_, route) = ctx.tables.table_local(id.table_id()).await?;
        let leader = route
            .as_ref()
            .and_then(|r| r.value.regions.iter().find(|e| e.region == id))
            .ok_or_else(|| Error::NotFound {
                what: format!("region {id}"),
            })?
            .leader
            .as_ref()
            .map(|p| p.id)
            .ok_or_else(|| Error::FailedPrecondition {
                message: format!("region {id} has no leader"),
            })?;
        if let Some(op) = ctx.plane.leases.operation(*region) {
            return Err(Error::FailedPrecondition {
                message: format!(
                    "region {id} is already being moved (datanode {} to {}) by procedure {}",
                    op.from, op.to, op.procedure
                ),
            });
        }
        match from {
            None => from = Some(leader),
            Some(f) if f != leader => {
                return Err(Error::invalid_argument(format!(
                    "the regions have different leaders (datanodes {f} and {leader}): move them separately"
                )));
            }
            Some(_) => {}
        }
    }
    from.ok_or_else(|| Error::invalid_argument("name at least one region to move"))
}

/// Checks that datanode `to` may take regions led by `from` now: another node,
/// registered, a datanode, active, alive.
pub async fn check_target(ctx: &DdlContext, from: u64, to: u64) -> Result<(), Error> {
    if to == from {
        return Err(Error::invalid_argument(format!(
            "the regions are already led by datanode {to}"
        )));
    }
    let node = ctx.nodes.get(to).await?.ok_or_else(|| Error::NotFound {
        what: format!("datanode {to}"),
    })?;
    if node.role != NodeRole::Datanode {
        return Err(Error::invalid_argument(format!(
            "node {to} is a {:?}, not a datanode",
            node.role
        )));
    }
    let refuse = |why: String| Err(Error::FailedPrecondition { message: why });
    match node.state {
        NodeState::Active => {}
        NodeState::Joining => {
            return refuse(format!(
                "datanode {to} is joining: activate it first (`metactl node activate {to}`)"
            ));
        }
        NodeState::Draining => return refuse(format!("datanode {to} is draining")),
        NodeState::Decommissioned => return refuse(format!("datanode {to} is decommissioned")),
    }
    let view = ctx.plane.view(to, common_meta::time::unix_ms());
    if view.liveness != pb::Liveness::Alive {
        return refuse(format!(
            "datanode {to} is not alive ({})",
            crate::cluster_plane::live_nodes::liveness_name(view.liveness)
        ));
    }
    Ok(())
}

/// Submits a migration of `regions` from `from` to `to`; its procedure id and a
/// watcher (None when the manager no longer runs it).
pub async fn submit(
    manager: &ProcedureManager,
    ctx: &Arc<DdlContext>,
    regions: Vec<u64>,
    (from, to): (u64, u64),
    timeout: Duration,
    reason: &str,
) -> Result<(String, Option<Watcher>), Error> {
    let first = regions.iter().min().copied().unwrap_or_default();
    let id = format!(
        "migrate-{}-{from}-to-{to}-{}",
        RegionId::from(first),
        common_meta::time::unix_ms()
    );
    let mut tables = Vec::new();
    let ids: std::collections::BTreeSet<u32> = regions
        .iter()
        .map(|r| RegionId::from(*r).table_id())
        .collect();
    for table in ids {
        if let (Some(info), _) = ctx.tables.table_local(table).await? {
            let info = info.value;
            tables.push([info.catalog, info.schema, info.name]);
        }
    }
    // Registered now, so that a second request for a region finds this one even
    // before its first step runs.
    let term = (*ctx.plane.leadership.borrow()).unwrap_or(0);
    for (i, region) in regions.iter().enumerate() {
        let op = crate::cluster_plane::region_lease::Operation {
            procedure: id.clone(),
            from,
            to,
        };
        if let Err(busy) = ctx.plane.leases.begin(term, *region, op) {
            for earlier in &regions[..i] {
                ctx.plane.leases.end(*earlier, &id);
            }
            return Err(busy.error(*region));
        }
    }
    let procedure = MigrateRegions::new(
        ctx.clone(),
        regions.clone(),
        from,
        to,
        timeout,
        reason,
        tables,
    );
    let unregister = || {
        for region in &regions {
            ctx.plane.leases.end(*region, &id);
        }
    };
    match manager
        .submit(ProcedureWithId {
            id: id.clone(),
            procedure: Box::new(procedure),
        })
        .await
    {
        Ok(watcher) => Ok((id, Some(watcher))),
        Err(procedure::Error::Duplicate(_)) => Ok((id.clone(), manager.watch(&id))),
        Err(e) => {
            unregister();
            Err(Error::Unavailable {
                message: format!("the migration was not submitted: {e}"),
            })
        }
    }
}
