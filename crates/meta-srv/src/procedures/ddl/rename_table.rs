//! Rename table: one transaction moving the name key and bumping the info's version
//! (compare on the info read), then invalidation of the old name and the id. Both names
//! are locked, so a create of the new name waits.

use std::sync::Arc;

use async_trait::async_trait;
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, LockMode, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{DdlContext, dump_state, load_state, step_error, table_idents};
use super::drop_table::find_table;
use super::{done_with_table, locks_for_table, unknown_table};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.RenameTable";

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    table: String,
    new_name: String,
    /// The table's id, once found (persisted before the rename, so a repeat after a
    /// crash recognises its own rename under the new name).
    #[serde(default)]
    id: Option<u32>,
    /// The rename committed.
    #[serde(default)]
    renamed: bool,
}

/// The rename-table procedure.
pub struct RenameTable {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl RenameTable {
    /// A new rename of `catalog.schema.table` to `new_name`.
    pub fn new(
        ctx: Arc<DdlContext>,
        catalog: &str,
        schema: &str,
        table: &str,
        new_name: &str,
    ) -> Self {
        RenameTable {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                table: table.to_string(),
                new_name: new_name.to_string(),
                id: None,
                renamed: false,
            },
            ctx,
        }
    }

    /// Rebuilds a rename from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("rename-table", json)?;
        Ok(RenameTable { data, ctx })
    }
}

#[async_trait]
impl Procedure for RenameTable {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, _ctx: &Context) -> procedure::Result<Status> {
        let d = &self.data;
        let tables = &self.ctx.tables;
        let Some(id) = d.id else {
            let Some((info, _)) = find_table(&self.ctx, &d.catalog, &d.schema, &d.table).await?
            else {
                return Err(step_error(unknown_table(&d.catalog, &d.schema, &d.table)));
            };
            self.data.id = Some(info.value.id);
            return Ok(Status::Executing { persist: true });
        };
        if d.renamed {
            let mut idents = table_idents(id, &d.catalog, &d.schema, &d.table);
            idents.push(pb::CacheIdent {
                kind: Some(pb::cache_ident::Kind::TableName(format!(
                    "{}.{}.{}",
                    d.catalog, d.schema, d.new_name
                ))),
            });
            self.ctx.invalidate(idents).await;
            return Ok(done_with_table(id));
        }
        let holder = tables
            .table_id(&d.catalog, &d.schema, &d.new_name)
            .await
            .map_err(step_error)?;
        match holder {
            // An earlier run of this step committed the rename.
            Some(holder) if holder == id => {}
            Some(_) => {
                return Err(step_error(common_meta::Error::AlreadyExists {
                    what: format!("table {}.{}.{}", d.catalog, d.schema, d.new_name),
                }));
            }
            None => {
                let Some(info) = tables.table_info(id).await.map_err(step_error)? else {
                    return Err(step_error(unknown_table(&d.catalog, &d.schema, &d.table)));
                };
                let now = common_meta::time::unix_ms();
                if !tables
                    .rename_table(&info, &d.new_name, now)
                    .await
                    .map_err(step_error)?
                {
                    // Both names are locked: the info changed outside the lock.
                    return Err(procedure::Error::retry_later(format!(
                        "table {id} changed while it was renamed"
                    )));
                }
            }
        }
        self.data.renamed = true;
        Ok(Status::Executing { persist: true })
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        let d = &self.data;
        let mut keys = locks_for_table(&d.catalog, &d.schema, &d.table);
        keys = keys.with(
            format!("table_name/{}/{}/{}", d.catalog, d.schema, d.new_name),
            LockMode::Exclusive,
        );
        keys
    }
}
