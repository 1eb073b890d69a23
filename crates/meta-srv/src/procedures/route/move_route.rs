//! Move a route to another group of the data plane. The route keeps its id and range;
//! at every catalog version exactly one group may write it, or none:
//!
//! 1. `Mark`: the route becomes `MigratingSource` (still written at the source).
//! 2. `Prepare`: the target group's leader starts copying the range.
//! 3. `Fence`: the route becomes `WriteFenced` (nobody writes it), then the source's
//!    leader stops writing it and answers the last entry it wrote.
//! 4. `CatchUp`: the target's leader holds the range up to that entry.
//! 5. `CutOver`: one save, compared on the catalog version: the route is on the target
//!    group, `MigratingTarget` (written at the target).
//! 6. `Release`: the source's leader drops its copy (best effort), and the route
//!    becomes `Active` (unfenced).
//!
//! Each step is saved and idempotent: a catalog step that finds its change made says
//! so, and a group leader answers an instruction it already carried out as done.
//! Before the cut-over, a failure (a refusal, or the deadline) rolls back: the route is
//! `Active` at the source again, the target drops its partial copy and the source
//! writes again. From the cut-over on, the move only goes forward.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common_meta::model::route::{RouteCatalog, RouteDescriptor, RouteState};
use common_meta::time::unix_ms;
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::{Change, Outcome, RouteContext, change_catalog, lock_of};
use crate::procedures::ddl::context::{dump_state, load_state};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.MoveRoute";

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Mark the route `MigratingSource`.
    Mark,
    /// Ask the target to copy.
    Prepare,
    /// Fence the route, then the source.
    Fence,
    /// Ask the target to catch up.
    CatchUp,
    /// Route the range to the target.
    CutOver,
    /// Drop the source's copy and unfence.
    Release,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Data {
    /// The route moved.
    pub route_id: u64,
    /// The group it leaves.
    pub from: u64,
    /// The group it goes to.
    pub to: u64,
    /// Unix ms after which a move not yet cut over rolls back.
    pub deadline_ms: u64,
    /// The next step.
    pub step: Step,
    /// The last entry the source wrote in the range (its answer to the fence).
    #[serde(default)]
    pub last_entry_id: u64,
}

/// Checks that `catalog` lets route `id` move to `to` now: the group it is on.
pub fn plan(catalog: &RouteCatalog, id: u64, to: u64) -> common_meta::Result<u64> {
    let route = catalog
        .route(id)
        .ok_or_else(|| common_meta::Error::NotFound {
            what: format!("route {id}"),
        })?;
    if route.group_id == to {
        return Err(common_meta::Error::invalid_argument(format!(
            "route {id} is on group {to} already"
        )));
    }
    if route.state != RouteState::Active {
        return Err(common_meta::Error::FailedPrecondition {
            message: format!(
                "route {id} is {:?}: only an Active route is moved",
                route.state
            ),
        });
    }
    Ok(route.group_id)
}

/// The move procedure.
pub struct MoveRoute {
    data: Data,
    ctx: Arc<RouteContext>,
}

/// Refuses a catalog step: the route is not where the move left it.
fn changed_under(route: &RouteDescriptor) -> common_meta::Error {
    common_meta::Error::FailedPrecondition {
        message: format!(
            "route {} changed under the move: {:?} on group {}",
            route.route_id, route.state, route.group_id
        ),
    }
}

impl MoveRoute {
    /// A move of route `route_id` from group `from` to `to`, cut over within `timeout`
    /// or rolled back.
    pub fn new(
        ctx: Arc<RouteContext>,
        route_id: u64,
        from: u64,
        to: u64,
        timeout: Duration,
    ) -> Self {
        MoveRoute {
            data: Data {
                route_id,
                from,
                to,
                deadline_ms: unix_ms() + timeout.as_millis() as u64,
                step: Step::Mark,
                last_entry_id: 0,
            },
            ctx,
        }
    }

    /// Rebuilds a move from its persisted state.
    pub fn load(ctx: Arc<RouteContext>, json: &str) -> procedure::Result<Self> {
        Ok(MoveRoute {
            data: load_state("move-route", json)?,
            ctx,
        })
    }

    fn late(&self) -> Option<common_meta::Error> {
        (unix_ms() > self.data.deadline_ms).then(|| common_meta::Error::FailedPrecondition {
            message: format!(
                "the move of route {} did not cut over in time (step {:?})",
                self.data.route_id, self.data.step
            ),
        })
    }

    /// Moves the route from state `from_state` on group `on` to `next` (on group
    /// `next_group`); a route already there is left alone. `late` refuses a change that
    /// is still to be made after the deadline.
    async fn transition(
        &self,
        (on, from_state): (u64, RouteState),
        (next_group, next): (u64, RouteState),
        late: bool,
    ) -> procedure::Result<RouteCatalog> {
        let id = self.data.route_id;
        change_catalog(&self.ctx, |catalog| {
            let route = catalog
                .route(id)
                .ok_or_else(|| common_meta::Error::NotFound {
                    what: format!("route {id}"),
                })?;
            if route.group_id == next_group && route.state == next {
                return Ok(Change::Done);
            }
            if route.group_id != on || route.state != from_state {
                return Err(changed_under(route));
            }
            if let Some(late) = self.late().filter(|_| late) {
                return Err(late);
            }
            Ok(Change::Save(catalog.with_route(id, |r| {
                r.group_id = next_group;
                r.state = next;
                Ok(())
            })?))
        })
        .await
    }

    /// Sends `action` to the leader of `group` and waits for its answer.
    async fn tell(
        &self,
        group: u64,
        action: pb::RouteAction,
    ) -> procedure::Result<pb::InstructionReply> {
        let leader = self.ctx.plane.live.group_leader(group).ok_or_else(|| {
            procedure::Error::retry_later(format!("no node reports leading group {group}"))
        })?;
        let (route, version) = match self
            .ctx
            .table()
            .await
            .map_err(crate::procedures::ddl::context::step_error)?
        {
            Some(table) => table.route(self.data.route_id),
            None => {
                let catalog = self
                    .ctx
                    .catalog()
                    .await
                    .map_err(crate::procedures::ddl::context::step_error)?;
                (catalog.route(self.data.route_id).cloned(), catalog.version)
            }
        };
        let route = route.as_ref();
        let instruction = pb::Instruction {
            kind: Some(pb::instruction::Kind::Route(pb::RouteInstruction {
                action: action.into(),
                route_id: self.data.route_id,
                start: route.map(|r| r.start.clone()).unwrap_or_default(),
                end: route.and_then(|r| r.end.clone()),
                source_group: self.data.from,
                target_group: self.data.to,
                last_entry_id: self.data.last_entry_id,
                catalog_version: version,
            })),
        };
        let reply = self
            .ctx
            .plane
            .send(leader, instruction, self.ctx.instruction_timeout)
            .await
            .map_err(|e| {
                procedure::Error::retry_later(format!(
                    "group {group}'s leader (node {leader}) did not answer {}: {e}",
                    action.as_str_name()
                ))
            })?;
        if !reply.ok {
            return Err(procedure::Error::external(format!(
                "group {group}'s leader (node {leader}) refused {}: {}",
                action.as_str_name(),
                reply.error
            )));
        }
        Ok(reply)
    }

    /// Best effort: a failure is logged, the move goes on.
    async fn tell_or_log(&self, ctx: &Context, group: u64, action: pb::RouteAction) {
        if let Err(e) = self.tell(group, action).await {
            tracing::info!(procedure = %ctx.procedure_id, group, error = %e, "route instruction not carried out");
        }
    }

    async fn step(&mut self, ctx: &Context) -> procedure::Result<Status> {
        use RouteState::*;
        let (from, to) = (self.data.from, self.data.to);
        match self.data.step {
            Step::Mark => {
                self.transition((from, Active), (from, MigratingSource), true)
                    .await?;
                self.data.step = Step::Prepare;
            }
            Step::Prepare => {
                if let Some(late) = self.late() {
                    return Err(crate::procedures::ddl::context::step_error(late));
                }
                self.tell(to, pb::RouteAction::Prepare).await?;
                self.data.step = Step::Fence;
            }
            Step::Fence => {
                self.transition((from, MigratingSource), (from, WriteFenced), true)
                    .await?;
                let reply = self.tell(from, pb::RouteAction::Fence).await?;
                self.data.last_entry_id = reply.last_entry_id;
                self.data.step = Step::CatchUp;
            }
            Step::CatchUp => {
                if let Some(late) = self.late() {
                    return Err(crate::procedures::ddl::context::step_error(late));
                }
                self.tell(to, pb::RouteAction::CatchUp).await?;
                self.data.step = Step::CutOver;
            }
            Step::CutOver => {
                self.transition((from, WriteFenced), (to, MigratingTarget), true)
                    .await?;
                self.data.step = Step::Release;
            }
            Step::Release => {
                self.tell_or_log(ctx, from, pb::RouteAction::Release).await;
                // After the cut-over nothing rolls back: a refusal here is retried.
                let saved = self
                    .transition((to, MigratingTarget), (to, Active), false)
                    .await
                    .map_err(|e| procedure::Error::retry_later(e.to_string()))?;
                let route = saved.route(self.data.route_id).cloned();
                tracing::info!(
                    procedure = %ctx.procedure_id,
                    route = self.data.route_id,
                    from,
                    to,
                    version = saved.version,
                    "route moved"
                );
                return Ok(Status::Done {
                    output: Outcome {
                        version: saved.version,
                        routes: route.into_iter().collect(),
                    }
                    .output(),
                });
            }
        }
        Ok(Status::Executing { persist: true })
    }
}

#[async_trait]
impl Procedure for MoveRoute {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        self.step(ctx).await
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        LockKey::exclusive(lock_of(self.data.route_id))
    }

    fn rollback_supported(&self) -> bool {
        true
    }

    async fn rollback(&mut self, ctx: &Context) -> procedure::Result<()> {
        let (id, from, to) = (self.data.route_id, self.data.from, self.data.to);
        let restored = change_catalog(&self.ctx, |catalog| {
            let Some(route) = catalog.route(id) else {
                return Ok(Change::Done);
            };
            let fenced = matches!(
                route.state,
                RouteState::MigratingSource | RouteState::WriteFenced
            );
            if route.group_id != from || !fenced {
                // Not ours to undo: cut over already, or never marked.
                return Ok(Change::Done);
            }
            Ok(Change::Save(catalog.with_route(id, |r| {
                r.state = RouteState::Active;
                Ok(())
            })?))
        })
        .await?;
        if restored.route(id).is_some_and(|r| r.group_id == to) {
            return Ok(());
        }
        if !matches!(self.data.step, Step::Mark) {
            self.tell_or_log(ctx, to, pb::RouteAction::Abort).await;
            self.tell_or_log(ctx, from, pb::RouteAction::Unfence).await;
        }
        tracing::info!(procedure = %ctx.procedure_id, route = id, from, to, "route move rolled back");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_is_planned_only_for_an_active_route_off_the_target() {
        let catalog = RouteCatalog::initial(1);
        assert_eq!(plan(&catalog, 1, 2).unwrap(), 1);
        assert!(
            plan(&catalog, 1, 1)
                .unwrap_err()
                .to_string()
                .contains("already")
        );
        assert!(
            plan(&catalog, 9, 2)
                .unwrap_err()
                .to_string()
                .contains("route 9")
        );
        let fenced = catalog
            .with_route(1, |r| {
                r.state = RouteState::WriteFenced;
                Ok(())
            })
            .unwrap();
        assert!(
            plan(&fenced, 1, 2)
                .unwrap_err()
                .to_string()
                .contains("WriteFenced")
        );
    }
}
