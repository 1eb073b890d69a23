//! Drop table: prepare (find the table; persisted) -> move its keys to tombstones (it
//! is gone for readers) -> invalidate caches -> drop the regions on their datanodes ->
//! delete the tombstones. A failure before the regions are dropped rolls back by
//! restoring the keys; from then on the drop only goes forward (a datanode that stays
//! unreachable is skipped: no key names its regions any more).

use std::sync::Arc;

use async_trait::async_trait;
use common_meta::manager::Versioned;
use common_meta::model::table::{TableInfo, TableRoute};
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{
    DdlContext, Unreachable, dump_state, load_state, regions_by_node, step_error, table_idents,
};
use super::{done_with_table, locks_for_table, unknown_table};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.DropTable";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Prepare,
    Tombstone,
    Invalidate,
    DropRegions,
    Purge,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    table: String,
    if_exists: bool,
    step: Step,
    #[serde(default)]
    found: Option<(TableInfo, TableRoute)>,
}

/// The drop-table procedure.
pub struct DropTable {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl DropTable {
    /// A new drop of `catalog.schema.table`.
    pub fn new(
        ctx: Arc<DdlContext>,
        catalog: &str,
        schema: &str,
        table: &str,
        if_exists: bool,
    ) -> Self {
        DropTable {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                table: table.to_string(),
                if_exists,
                step: Step::Prepare,
                found: None,
            },
            ctx,
        }
    }

    /// Rebuilds a drop from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("drop-table", json)?;
        Ok(DropTable { data, ctx })
    }

    fn found(&self) -> procedure::Result<&(TableInfo, TableRoute)> {
        self.data
            .found
            .as_ref()
            .ok_or_else(|| procedure::Error::external("drop-table state has no table"))
    }
}

/// Reads table `catalog.schema.table`'s info and route, if it exists (the caller holds
/// the name's procedure lock).
pub(super) async fn find_table(
    ctx: &DdlContext,
    catalog: &str,
    schema: &str,
    table: &str,
) -> procedure::Result<Option<(Versioned<TableInfo>, TableRoute)>> {
    // Local reads: every caller holds the table name's lock (see table_id_local).
    let Some(id) = ctx
        .tables
        .table_id_local(catalog, schema, table)
        .await
        .map_err(step_error)?
    else {
        return Ok(None);
    };
    let (info, route) = ctx.tables.table_local(id).await.map_err(step_error)?;
    match (info, route) {
        (Some(info), Some(route)) => Ok(Some((info, route.value))),
        _ => Err(procedure::Error::external(format!(
            "table {catalog}.{schema}.{table} (id {id}) has a name but no info or route"
        ))),
    }
}

/// Drops the regions of `route` on their datanodes, skipping nodes that stay
/// unreachable.
pub(super) async fn drop_regions(
    ctx: &DdlContext,
    pctx: &Context,
    route: &TableRoute,
) -> procedure::Result<()> {
    ctx.on_nodes(
        pctx,
        "drop",
        &regions_by_node(route),
        |region_ids| pb::Instruction {
            kind: Some(pb::instruction::Kind::DropRegions(pb::DropRegions {
                region_ids,
            })),
        },
        Unreachable::Skip,
    )
    .await
}

#[async_trait]
impl Procedure for DropTable {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let d = &self.data;
        match d.step {
            Step::Prepare => match find_table(&self.ctx, &d.catalog, &d.schema, &d.table).await? {
                Some((info, route)) => {
                    self.data.found = Some((info.value, route));
                    self.data.step = Step::Tombstone;
                    Ok(Status::Executing { persist: true })
                }
                None if d.if_exists => Ok(Status::Done { output: None }),
                None => Err(step_error(unknown_table(&d.catalog, &d.schema, &d.table))),
            },
            Step::Tombstone => {
                let (info, route) = self.found()?;
                self.ctx
                    .tables
                    .tombstone_table(info, route)
                    .await
                    .map_err(step_error)?;
                self.data.step = Step::Invalidate;
                // Not saved: a repeat of the tombstone step finds nothing left to move.
                Ok(Status::Executing { persist: false })
            }
            Step::Invalidate => {
                let (info, _) = self.found()?;
                self.ctx
                    .invalidate(table_idents(info.id, &d.catalog, &d.schema, &d.table))
                    .await;
                self.data.step = Step::DropRegions;
                Ok(Status::Executing { persist: true })
            }
            Step::DropRegions => {
                let (_, route) = self.found()?;
                drop_regions(&self.ctx, ctx, route).await?;
                self.data.step = Step::Purge;
                // Not saved: dropping a region again is a success.
                Ok(Status::Executing { persist: false })
            }
            Step::Purge => {
                let (info, route) = self.found()?;
                self.ctx
                    .tables
                    .purge_table(info, route)
                    .await
                    .map_err(step_error)?;
                Ok(done_with_table(info.id))
            }
        }
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        locks_for_table(&self.data.catalog, &self.data.schema, &self.data.table)
    }

    fn rollback_supported(&self) -> bool {
        true
    }

    async fn rollback(&mut self, _ctx: &Context) -> procedure::Result<()> {
        match (&self.data.found, self.data.step) {
            (Some((info, route)), Step::Tombstone | Step::Invalidate) => {
                self.ctx
                    .tables
                    .restore_table(info, route)
                    .await
                    .map_err(step_error)?;
                let d = &self.data;
                self.ctx
                    .invalidate(table_idents(info.id, &d.catalog, &d.schema, &d.table))
                    .await;
                Ok(())
            }
            // Nothing changed yet, or regions are being dropped: nothing to restore
            // them to (see the module doc).
            _ => Ok(()),
        }
    }
}
