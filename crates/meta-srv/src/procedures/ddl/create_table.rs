//! Create table: plan (check the schema and the name, allocate the id, place the
//! regions; done by the submitter, so the first saved record already holds the plan)
//! -> under the lock, check the name again, then create the regions on their
//! datanodes, all nodes at once (retried while a node does not answer) -> commit every
//! key in one transaction (it also requires the schema to exist) -> invalidate caches.
//! A refusal or an unreachable datanode rolls back: the regions asked for are dropped,
//! and no key was written.
//!
//! Saved states: the plan (at submission), then done. A crash in between repeats the
//! region creates (creating an existing region is a success) and the commit (which
//! finds its own table): three raft writes per create, not five.

use std::sync::Arc;

use async_trait::async_trait;
use common_meta::manager::CreateOutcome;
use common_meta::model::sequence::TABLE_ID_SEQUENCE;
use common_meta::model::table::{Peer, RegionRoute, TableInfo, TableRoute};
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{
    DdlContext, Unreachable, dump_state, load_state, regions_by_node, step_error, table_idents,
};
use super::{done_with_table, locks_for_table, unknown_schema};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.CreateTable";

/// Table option: followers per region (0 unless given).
pub const FOLLOWERS_OPTION: &str = "followers";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    /// Planned (by the submitter); the regions are next.
    CreateRegions,
    Commit,
    Invalidate,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    info: TableInfo,
    if_not_exists: bool,
    step: Step,
    #[serde(default)]
    route: Option<TableRoute>,
    /// Regions were asked for (what a rollback must drop).
    #[serde(default)]
    asked: bool,
}

/// What submitting a create comes to.
pub enum Plan {
    /// Run this procedure.
    Run(Box<CreateTable>),
    /// The table exists and the create said `if_not_exists`: its id.
    Exists(u32),
}

/// The create-table procedure.
pub struct CreateTable {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl CreateTable {
    /// Plans a create of `info`: checks (schema, name), allocates the id and places the
    /// regions. Outside any lock: the procedure checks the name again under its lock,
    /// and the commit requires the schema.
    pub async fn plan(
        ctx: Arc<DdlContext>,
        info: TableInfo,
        if_not_exists: bool,
    ) -> Result<Plan, common_meta::Error> {
        let mut create = CreateTable {
            data: Data {
                info,
                if_not_exists,
                step: Step::CreateRegions,
                route: None,
                asked: false,
            },
            ctx,
        };
        match create.prepare().await? {
            Some(id) => Ok(Plan::Exists(id)),
            None => Ok(Plan::Run(Box::new(create))),
        }
    }

    /// Rebuilds a create from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("create-table", json)?;
        Ok(CreateTable { data, ctx })
    }

    /// Fills in the id and the route; `Some(id)` when the table exists and the create
    /// said `if_not_exists`.
    async fn prepare(&mut self) -> Result<Option<u32>, common_meta::Error> {
        let info = &self.data.info;
        let ctx = &self.ctx;
        if ctx
            .catalogs
            .schema(&info.catalog, &info.schema)
            .await?
            .is_none()
        {
            return Err(unknown_schema(&info.catalog, &info.schema));
        }
        if let Some(id) = ctx
            .tables
            .table_id_local(&info.catalog, &info.schema, &info.name)
            .await?
        {
            if self.data.if_not_exists {
                return Ok(Some(id));
            }
            return Err(exists(info, id));
        }
        let followers = match info.options.get(FOLLOWERS_OPTION) {
            None => 0,
            Some(n) => n.parse().map_err(|_| {
                common_meta::Error::invalid_argument(format!(
                    "table option {FOLLOWERS_OPTION} must be a number, not {n:?}"
                ))
            })?,
        };
        let candidates = ctx.candidates().await?;
        let placements = ctx
            .selector
            .place(&candidates, info.regions as usize, followers)
            .map_err(|message| common_meta::Error::FailedPrecondition { message })?;
        let id = ctx.next_ids(TABLE_ID_SEQUENCE, 1).await?.start;
        let id = u32::try_from(id).map_err(|_| common_meta::Error::FailedPrecondition {
            message: "table ids are exhausted".to_string(),
        })?;
        let peer = |node: u64| Peer {
            id: node,
            addr: candidates
                .iter()
                .find(|c| c.id == node)
                .map(|c| c.addr.clone())
                .unwrap_or_default(),
        };
        let now = common_meta::time::unix_ms();
        let info = &mut self.data.info;
        info.id = id;
        info.version = 0;
        info.created_ms = now;
        info.updated_ms = now;
        let route = TableRoute {
            regions: info
                .region_ids()
                .zip(placements)
                .map(|(region, placement)| RegionRoute {
                    region,
                    leader: Some(peer(placement.leader)),
                    followers: placement.followers.into_iter().map(peer).collect(),
                    leader_state: Default::default(),
                    leader_down_since: None,
                })
                .collect(),
            version: 0,
        };
        self.data.route = Some(route);
        Ok(None)
    }

    fn route(&self) -> procedure::Result<&TableRoute> {
        self.data
            .route
            .as_ref()
            .ok_or_else(|| procedure::Error::external("create-table state has no route"))
    }

    async fn create_regions(&mut self, ctx: &Context) -> procedure::Result<Status> {
        // The name again, now under the lock: a racing create of the name that won
        // is found before any region is asked for.
        let info = &self.data.info;
        let holder = self
            .ctx
            .tables
            .table_id_local(&info.catalog, &info.schema, &info.name)
            .await
            .map_err(step_error)?;
        match holder {
            // An earlier run of this procedure committed: only invalidation is left.
            Some(id) if id == info.id => {
                self.data.step = Step::Invalidate;
                return Ok(Status::Executing { persist: false });
            }
            Some(id) if self.data.if_not_exists => return Ok(done_with_table(id)),
            Some(id) => return Err(step_error(exists(info, id))),
            None => {}
        }
        let info_json = serde_json::to_string(&self.data.info)
            .map_err(|e| procedure::Error::external(e.to_string()))?;
        let by_node = regions_by_node(self.route()?);
        self.data.asked = true;
        self.ctx
            .on_nodes(
                ctx,
                "create",
                &by_node,
                |region_ids| pb::Instruction {
                    kind: Some(pb::instruction::Kind::CreateRegions(pb::CreateRegions {
                        table_info_json: info_json.clone(),
                        region_ids,
                    })),
                },
                Unreachable::Fail,
            )
            .await?;
        self.data.step = Step::Commit;
        // Not saved: repeating the creates after a crash is harmless.
        Ok(Status::Executing { persist: false })
    }

    async fn commit(&mut self) -> procedure::Result<Status> {
        let route = self.route()?.clone();
        let info = &self.data.info;
        let tables = &self.ctx.tables;
        let outcome = match tables.create_table(info, &route).await {
            // The commit may or may not have applied: a write through the log tells,
            // so the step never ends (nor rolls back) on a guess.
            Err(e) if e.is_outcome_unknown() => {
                if tables.fence_absent(info.id).await.map_err(step_error)? {
                    return Err(procedure::Error::retry_later(e.to_string()));
                }
                CreateOutcome::Created
            }
            other => other.map_err(step_error)?,
        };
        match outcome {
            CreateOutcome::Created => {
                self.data.step = Step::Invalidate;
                // Not saved: after a crash the commit runs again, and finds its own
                // table (`Created`); one raft write less per create.
                Ok(Status::Executing { persist: false })
            }
            // Someone wrote the name outside the lock (a raw KV write): roll back.
            CreateOutcome::Exists(id) => Err(step_error(exists(info, id))),
        }
    }
}

fn exists(info: &TableInfo, id: u32) -> common_meta::Error {
    common_meta::Error::AlreadyExists {
        what: format!(
            "table {}.{}.{} (id {id})",
            info.catalog, info.schema, info.name
        ),
    }
}

#[async_trait]
impl Procedure for CreateTable {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        match self.data.step {
            Step::CreateRegions => self.create_regions(ctx).await,
            Step::Commit => self.commit().await,
            Step::Invalidate => {
                let info = &self.data.info;
                self.ctx
                    .invalidate(table_idents(
                        info.id,
                        &info.catalog,
                        &info.schema,
                        &info.name,
                    ))
                    .await;
                Ok(done_with_table(info.id))
            }
        }
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        let info = &self.data.info;
        locks_for_table(&info.catalog, &info.schema, &info.name)
    }

    fn rollback_supported(&self) -> bool {
        true
    }

    async fn rollback(&mut self, ctx: &Context) -> procedure::Result<()> {
        // Nothing was written before regions were asked for; a failed commit wrote
        // nothing either (one transaction). Drop what the datanodes may have created.
        let Some(route) = &self.data.route else {
            return Ok(());
        };
        if !self.data.asked {
            return Ok(());
        }
        if self.data.step == Step::Invalidate {
            // Committed: the table exists and stays (only invalidation can have failed).
            return Ok(());
        }
        if self.data.step == Step::Commit
            && !self
                .ctx
                .tables
                .fence_absent(self.data.info.id)
                .await
                .map_err(step_error)?
        {
            // The commit applied after all: its regions belong to a live table.
            tracing::warn!(procedure = %ctx.procedure_id, "create committed; regions kept");
            return Ok(());
        }
        // Refusals and nodes away past the attempts are logged and left (the metadata
        // never named these regions; the node's lease closes them).
        super::drop_table::drop_regions(&self.ctx, ctx, route).await
    }
}
