//! Drop database: list its tables' ids (saved) -> drop them one at a time (each: read
//! and saved, then tombstones, invalidation, regions, purge; saved) -> check the schema
//! is empty and delete it -> invalidate. Holding the schema exclusively keeps every other DDL of
//! the schema out meanwhile. The default schema cannot be dropped.

use std::sync::Arc;

use async_trait::async_trait;
use common_meta::model::table::{TableInfo, TableRoute};
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{
    DdlContext, dump_state, load_state, locks_for_schema, step_error, table_idents,
};
use super::drop_table::drop_regions;
use super::unknown_schema;

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.DropDatabase";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Prepare,
    /// Dropping the tables one at a time: `current` (saved before anything happens to
    /// it) is tombstoned, its regions dropped, purged; then the next id.
    DropTables,
    DeleteSchema,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    if_exists: bool,
    step: Step,
    /// Ids of the tables still to drop (only ids: the state stays small however many
    /// tables the schema has).
    #[serde(default)]
    tables: Vec<u32>,
    /// The table being dropped, as it was before its keys moved.
    #[serde(default)]
    current: Option<(TableInfo, TableRoute)>,
}

/// The drop-database procedure.
pub struct DropDatabase {
    data: Data,
    ctx: Arc<DdlContext>,
}

/// The refusal to drop the default schema.
pub fn refuse_default(catalog: &str, schema: &str) -> Option<common_meta::Error> {
    common_meta::manager::catalog::is_default(catalog, schema).then(|| {
        common_meta::Error::invalid_argument(format!(
            "schema {catalog}.{schema} is the default and cannot be dropped"
        ))
    })
}

impl DropDatabase {
    /// A new drop of `catalog.schema`.
    pub fn new(ctx: Arc<DdlContext>, catalog: &str, schema: &str, if_exists: bool) -> Self {
        DropDatabase {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                if_exists,
                step: Step::Prepare,
                tables: Vec::new(),
                current: None,
            },
            ctx,
        }
    }

    /// Rebuilds a drop from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("drop-database", json)?;
        Ok(DropDatabase { data, ctx })
    }

    async fn prepare(&mut self) -> procedure::Result<Status> {
        let d = &self.data;
        if let Some(refusal) = refuse_default(&d.catalog, &d.schema) {
            return Err(step_error(refusal));
        }
        if self
            .ctx
            .catalogs
            .schema(&d.catalog, &d.schema)
            .await
            .map_err(step_error)?
            .is_none()
        {
            if d.if_exists {
                return Ok(Status::Done { output: None });
            }
            return Err(step_error(unknown_schema(&d.catalog, &d.schema)));
        }
        self.data.tables = self.table_ids().await?;
        self.data.step = Step::DropTables;
        Ok(Status::Executing { persist: true })
    }

    /// The ids of the tables in the schema now.
    async fn table_ids(&self) -> procedure::Result<Vec<u32>> {
        let d = &self.data;
        let infos = self
            .ctx
            .tables
            .tables(&d.catalog, Some(&d.schema))
            .await
            .map_err(step_error)?;
        Ok(infos.iter().map(|info| info.id).collect())
    }

    async fn drop_next(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let tables = &self.ctx.tables;
        let Some((info, route)) = &self.data.current else {
            let Some(id) = self.data.tables.first().copied() else {
                self.data.step = Step::DeleteSchema;
                return Ok(Status::Executing { persist: true });
            };
            self.data.tables.remove(0);
            // Local reads: the schema's exclusive lock keeps every other DDL out.
            if let (Some(info), Some(route)) = tables.table_local(id).await.map_err(step_error)? {
                self.data.current = Some((info.value, route.value));
            }
            return Ok(Status::Executing { persist: true });
        };
        // Each part is idempotent, so a repeat after a crash does no harm.
        tables
            .tombstone_table(info, route)
            .await
            .map_err(step_error)?;
        self.ctx
            .invalidate(table_idents(
                info.id,
                &info.catalog,
                &info.schema,
                &info.name,
            ))
            .await;
        drop_regions(&self.ctx, ctx, route).await?;
        tables.purge_table(info, route).await.map_err(step_error)?;
        self.data.current = None;
        Ok(Status::Executing { persist: true })
    }
}

#[async_trait]
impl Procedure for DropDatabase {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        match self.data.step {
            Step::Prepare => self.prepare().await,
            Step::DropTables => self.drop_next(ctx).await,
            Step::DeleteSchema => {
                let d = &self.data;
                // Nothing may be left in it (the lock keeps DDL out; a raw KV write
                // does not): whatever is, is dropped first.
                let left = self.table_ids().await?;
                if !left.is_empty() {
                    self.data.tables = left;
                    self.data.step = Step::DropTables;
                    return Ok(Status::Executing { persist: true });
                }
                self.ctx
                    .catalogs
                    .drop_schema(&d.catalog, &d.schema)
                    .await
                    .map_err(step_error)?;
                self.ctx
                    .invalidate(vec![pb::CacheIdent {
                        kind: Some(pb::cache_ident::Kind::Schema(format!(
                            "{}.{}",
                            d.catalog, d.schema
                        ))),
                    }])
                    .await;
                Ok(Status::Done { output: None })
            }
        }
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        locks_for_schema(&self.data.catalog, &self.data.schema)
    }
}
