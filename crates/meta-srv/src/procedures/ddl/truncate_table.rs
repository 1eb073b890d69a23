//! Truncate table: find it, then ask every datanode holding its regions to empty them
//! (retried while a node does not answer; metadata does not change).

use std::sync::Arc;

use async_trait::async_trait;
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{
    DdlContext, Unreachable, dump_state, load_state, regions_by_node, step_error,
};
use super::drop_table::find_table;
use super::{done_with_table, locks_for_table, unknown_table};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.TruncateTable";

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    table: String,
}

/// The truncate-table procedure.
pub struct TruncateTable {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl TruncateTable {
    /// A new truncate of `catalog.schema.table`.
    pub fn new(ctx: Arc<DdlContext>, catalog: &str, schema: &str, table: &str) -> Self {
        TruncateTable {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                table: table.to_string(),
            },
            ctx,
        }
    }

    /// Rebuilds a truncate from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("truncate-table", json)?;
        Ok(TruncateTable { data, ctx })
    }
}

#[async_trait]
impl Procedure for TruncateTable {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let d = &self.data;
        let Some((info, route)) = find_table(&self.ctx, &d.catalog, &d.schema, &d.table).await?
        else {
            return Err(step_error(unknown_table(&d.catalog, &d.schema, &d.table)));
        };
        self.ctx
            .on_nodes(
                ctx,
                "truncate",
                &regions_by_node(&route),
                |region_ids| pb::Instruction {
                    kind: Some(pb::instruction::Kind::TruncateRegions(
                        pb::TruncateRegions { region_ids },
                    )),
                },
                Unreachable::Fail,
            )
            .await?;
        Ok(done_with_table(info.value.id))
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        locks_for_table(&self.data.catalog, &self.data.schema, &self.data.table)
    }
}
