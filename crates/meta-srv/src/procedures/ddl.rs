//! DDL as procedures: one file per DDL, a shared [`context::DdlContext`], and the
//! translation of a `meta.v1.DdlTask` into a checked procedure.
//!
//! Locks (as GreptimeDB takes them): `catalog/{c}` shared, `schema/{c}/{s}` shared by
//! table DDL and exclusive by database DDL, `table_name/{c}/{s}/{t}` exclusive by every
//! DDL of that table (a rename locks both names). Concurrent creates of one name run
//! one after the other: the first creates, the others find it (AlreadyExists, or its
//! id with `if_not_exists`).

pub mod alter_table;
pub mod context;
pub mod create_database;
pub mod create_table;
pub mod drop_database;
pub mod drop_table;
pub mod rename_table;
pub mod truncate_table;

use std::sync::Arc;

use common_meta::Error;
use common_meta::key::{SchemaKey, TableNameKey};
use common_meta::kv::KvLimits;
use common_meta::manager::catalog::{DEFAULT_CATALOG, DEFAULT_SCHEMA};
use common_meta::model::table::{ColumnSchema, TableInfo};
use meta_proto::v1 as pb;
use procedure::{BoxedProcedure, LockKey, LockMode, ProcedureManager, Status};

use alter_table::{AlterSpec, AlterTable};
use context::DdlContext;
use create_database::CreateDatabase;
use create_table::CreateTable;
use drop_database::DropDatabase;
use drop_table::DropTable;
use rename_table::RenameTable;
use truncate_table::TruncateTable;

/// The locks of a DDL of table `catalog.schema.table`.
pub fn locks_for_table(catalog: &str, schema: &str, table: &str) -> LockKey {
    LockKey::shared(format!("catalog/{catalog}"))
        .with(format!("schema/{catalog}/{schema}"), LockMode::Shared)
        .with(
            format!("table_name/{catalog}/{schema}/{table}"),
            LockMode::Exclusive,
        )
}

/// A finished DDL about table `id` (its output is the id).
pub fn done_with_table(id: u32) -> Status {
    Status::Done {
        output: Some(id.to_string()),
    }
}

/// The error of a schema that does not exist.
pub fn unknown_schema(catalog: &str, schema: &str) -> Error {
    Error::NotFound {
        what: format!("schema {catalog}.{schema}"),
    }
}

/// The error of a table that does not exist.
pub fn unknown_table(catalog: &str, schema: &str, table: &str) -> Error {
    Error::NotFound {
        what: format!("table {catalog}.{schema}.{table}"),
    }
}

/// Registers every DDL type's loader on `manager`.
pub fn register(manager: &ProcedureManager, ctx: &Arc<DdlContext>) -> procedure::Result<()> {
    macro_rules! loader {
        ($module:ident, $ty:ident) => {{
            let ctx = ctx.clone();
            manager.register_loader(
                $module::TYPE_NAME,
                Box::new(move |json| Ok(Box::new($ty::load(ctx.clone(), json)?) as BoxedProcedure)),
            )?;
        }};
    }
    loader!(create_database, CreateDatabase);
    loader!(drop_database, DropDatabase);
    loader!(create_table, CreateTable);
    loader!(drop_table, DropTable);
    loader!(alter_table, AlterTable);
    loader!(truncate_table, TruncateTable);
    loader!(rename_table, RenameTable);
    Ok(())
}

fn or_default<'a>(name: &'a str, default: &'a str) -> &'a str {
    if name.is_empty() { default } else { name }
}

/// `catalog.schema` with the defaults for empty parts, checked.
fn schema_of<'a>(catalog: &'a str, schema: &'a str) -> Result<(&'a str, &'a str), Error> {
    let (catalog, schema) = (
        or_default(catalog, DEFAULT_CATALOG),
        or_default(schema, DEFAULT_SCHEMA),
    );
    SchemaKey::new(catalog, schema)?;
    Ok((catalog, schema))
}

/// `catalog.schema.table` with the defaults for empty catalog and schema, checked.
fn table_of<'a>(
    catalog: &'a str,
    schema: &'a str,
    table: &'a str,
) -> Result<(&'a str, &'a str, &'a str), Error> {
    let (catalog, schema) = schema_of(catalog, schema)?;
    TableNameKey::new(catalog, schema, table)?;
    Ok((catalog, schema, table))
}

/// Room kept in a request beside the table info (keys, route, compares).
const INFO_HEADROOM: usize = 64 * 1024;

/// The largest table info: one value, and small enough that an alter's transaction
/// (the info read as its compare, plus the new one) fits in one request.
pub fn max_info_bytes(limits: &KvLimits) -> usize {
    limits
        .max_value_bytes
        .min(limits.max_request_bytes.saturating_sub(INFO_HEADROOM) / 2)
}

/// Refuses a table info over [`max_info_bytes`], before anything runs.
pub fn check_info_size(info: &TableInfo, limits: &KvLimits) -> Result<(), Error> {
    let bytes = serde_json::to_vec(info).map_or(usize::MAX, |b| b.len());
    let max = max_info_bytes(limits);
    if bytes > max {
        return Err(Error::invalid_argument(format!(
            "table {}.{}.{}: its info is {bytes} bytes, more than {max} (max_value_bytes, and half of max_request_bytes so an alter can compare and replace it)",
            info.catalog, info.schema, info.name
        )));
    }
    Ok(())
}

fn json_field<T: serde::de::DeserializeOwned>(field: &str, json: &str) -> Result<T, Error> {
    serde_json::from_str(json).map_err(|e| {
        Error::invalid_argument(format!("{field} is not valid JSON of its model: {e}"))
    })
}

/// What a submitted task comes to before any procedure runs.
pub enum Planned {
    /// Run this procedure.
    Run(BoxedProcedure),
    /// Nothing to do: a create with `if_not_exists` found table `id`.
    Exists(u32),
}

/// The procedure that carries `task` out, after every check that needs no lock (names,
/// the table's schema, its size; a create also plans its table): bad input is refused
/// here, before anything runs.
pub async fn procedure_for(
    ctx: &Arc<DdlContext>,
    task: pb::DdlTask,
    limits: &KvLimits,
) -> Result<Planned, Error> {
    use pb::ddl_task::Kind;
    let ctx = ctx.clone();
    let Some(kind) = task.kind else {
        return Err(Error::invalid_argument("the DDL task is empty"));
    };
    Ok(Planned::Run(match kind {
        Kind::CreateDatabase(t) => {
            if t.schema.is_empty() {
                return Err(Error::invalid_argument("a database needs a name"));
            }
            let (catalog, schema) = schema_of(&t.catalog, &t.schema)?;
            Box::new(CreateDatabase::new(
                ctx,
                catalog,
                schema,
                t.options.into_iter().collect(),
                t.if_not_exists,
            ))
        }
        Kind::DropDatabase(t) => {
            if t.schema.is_empty() {
                return Err(Error::invalid_argument("a database needs a name"));
            }
            let (catalog, schema) = schema_of(&t.catalog, &t.schema)?;
            if let Some(refusal) = drop_database::refuse_default(catalog, schema) {
                return Err(refusal);
            }
            Box::new(DropDatabase::new(ctx, catalog, schema, t.if_exists))
        }
        Kind::CreateTable(t) => {
            let mut info: TableInfo = json_field("table_info_json", &t.table_info_json)?;
            let (catalog, schema) = schema_of(&info.catalog, &info.schema)?;
            let (catalog, schema) = (catalog.to_string(), schema.to_string());
            info.catalog = catalog;
            info.schema = schema;
            info.validate()?;
            check_info_size(&info, limits)?;
            match CreateTable::plan(ctx, info, t.if_not_exists).await? {
                create_table::Plan::Run(create) => create,
                create_table::Plan::Exists(id) => return Ok(Planned::Exists(id)),
            }
        }
        Kind::DropTable(t) => {
            let (catalog, schema, table) = table_of(&t.catalog, &t.schema, &t.table)?;
            Box::new(DropTable::new(ctx, catalog, schema, table, t.if_exists))
        }
        Kind::AlterTable(t) => {
            let (catalog, schema, table) = table_of(&t.catalog, &t.schema, &t.table)?;
            let add_columns = t
                .add_columns_json
                .iter()
                .map(|json| json_field::<ColumnSchema>("add_columns_json", json))
                .collect::<Result<Vec<_>, _>>()?;
            let rename_column = match (
                t.rename_column_from.is_empty(),
                t.rename_column_to.is_empty(),
            ) {
                (true, true) => None,
                (false, false) => Some((t.rename_column_from.clone(), t.rename_column_to.clone())),
                _ => {
                    return Err(Error::invalid_argument(
                        "rename_column_from and rename_column_to go together",
                    ));
                }
            };
            let spec = AlterSpec {
                add_columns,
                drop_columns: t.drop_columns.clone(),
                rename_column,
                set_options: t.set_options.into_iter().collect(),
            };
            if spec == AlterSpec::default() {
                return Err(Error::invalid_argument(format!(
                    "table {catalog}.{schema}.{table}: the alter changes nothing"
                )));
            }
            Box::new(AlterTable::new(ctx, catalog, schema, table, spec))
        }
        Kind::TruncateTable(t) => {
            let (catalog, schema, table) = table_of(&t.catalog, &t.schema, &t.table)?;
            Box::new(TruncateTable::new(ctx, catalog, schema, table))
        }
        Kind::RenameTable(t) => {
            let (catalog, schema, table) = table_of(&t.catalog, &t.schema, &t.table)?;
            TableNameKey::new(catalog, schema, &t.new_name)?;
            if t.new_name == table {
                return Err(Error::invalid_argument(format!(
                    "table {catalog}.{schema}.{table} already has that name"
                )));
            }
            Box::new(RenameTable::new(ctx, catalog, schema, table, &t.new_name))
        }
    }))
}
