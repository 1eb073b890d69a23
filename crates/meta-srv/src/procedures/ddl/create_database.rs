//! Create database: one step, writing `__schema/{catalog}/{schema}` if absent.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use common_meta::model::table::SchemaValue;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{DdlContext, dump_state, load_state, locks_for_schema, step_error};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.CreateDatabase";

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    #[serde(default)]
    options: BTreeMap<String, String>,
    if_not_exists: bool,
}

/// The create-database procedure.
pub struct CreateDatabase {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl CreateDatabase {
    /// A new create of `catalog.schema`.
    pub fn new(
        ctx: Arc<DdlContext>,
        catalog: &str,
        schema: &str,
        options: BTreeMap<String, String>,
        if_not_exists: bool,
    ) -> Self {
        CreateDatabase {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                options,
                if_not_exists,
            },
            ctx,
        }
    }

    /// Rebuilds a create from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("create-database", json)?;
        Ok(CreateDatabase { data, ctx })
    }
}

#[async_trait]
impl Procedure for CreateDatabase {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        let d = &self.data;
        let value = SchemaValue {
            options: d.options.clone(),
            created_by: Some(ctx.procedure_id.clone()),
            created_ms: common_meta::time::unix_ms(),
        };
        let created = self
            .ctx
            .catalogs
            .create_schema(&d.catalog, &d.schema, &value)
            .await
            .map_err(step_error)?;
        if !created && !d.if_not_exists {
            // A retry of this very procedure finds its own schema: that is a success.
            let existing = self
                .ctx
                .catalogs
                .schema(&d.catalog, &d.schema)
                .await
                .map_err(step_error)?;
            if existing.and_then(|v| v.created_by).as_deref() != Some(ctx.procedure_id.as_str()) {
                return Err(step_error(common_meta::Error::AlreadyExists {
                    what: format!("schema {}.{}", d.catalog, d.schema),
                }));
            }
        }
        Ok(Status::Done { output: None })
    }

    fn dump(&self) -> procedure::Result<String> {
        dump_state(&self.data)
    }

    fn lock_key(&self) -> LockKey {
        locks_for_schema(&self.data.catalog, &self.data.schema)
    }
}
