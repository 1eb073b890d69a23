//! `metactl db` and `metactl table` (with `table route`): the metadata plane.
//!
//! Names: a database is `SCHEMA` (in the default catalog `greptime`) or
//! `CATALOG.SCHEMA`; a table is `TABLE` (in `greptime.public`), `SCHEMA.TABLE` or
//! `CATALOG.SCHEMA.TABLE`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use common_meta::model::table::{ColumnSchema, SemanticType, TableInfo, TableRoute};
use meta_client::MetaClient;
use meta_proto::v1 as pb;
use serde_json::json;

use super::{Failure, Output, print};

const DEFAULT_CATALOG: &str = "greptime";
const DEFAULT_SCHEMA: &str = "public";

#[derive(Subcommand)]
pub enum DbCommand {
    /// Create database NAME (SCHEMA or CATALOG.SCHEMA).
    Create {
        name: String,
        /// Succeed if it exists already.
        #[arg(long)]
        if_not_exists: bool,
        /// An option of the database, KEY=VALUE (repeatable), such as ttl=7d.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
    },
    /// Drop database NAME and every table in it.
    Drop {
        name: String,
        /// Succeed if it does not exist.
        #[arg(long)]
        if_exists: bool,
    },
    /// List databases (of CATALOG, or of every catalog).
    List { catalog: Option<String> },
}

#[derive(Subcommand)]
pub enum TableCommand {
    /// Create table NAME with N regions placed by the cluster's selector.
    Create {
        name: String,
        /// Regions (1 to 1024).
        #[arg(long, default_value_t = 1)]
        regions: u32,
        /// A JSON file with the table's columns, primary_key, time_index, engine,
        /// options and partition (as `table show --output json` prints them); without
        /// it: host (tag), ts (time index), value (field).
        #[arg(long)]
        schema_file: Option<PathBuf>,
        /// Succeed (printing its id) if the table exists already.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// Drop table NAME and its regions.
    Drop {
        name: String,
        /// Succeed if it does not exist.
        #[arg(long)]
        if_exists: bool,
    },
    /// Show table NAME: id, version, columns, options, regions.
    Show { name: String },
    /// List the tables of SCHEMA (SCHEMA or CATALOG.SCHEMA; every schema of the default
    /// catalog when not given).
    List { schema: Option<String> },
    /// Change table NAME's columns or options.
    Alter {
        name: String,
        /// Add column NAME:TYPE[:tag|field|timestamp] (repeatable).
        #[arg(long = "add-column", value_name = "NAME:TYPE")]
        add_columns: Vec<String>,
        /// Drop column NAME (repeatable).
        #[arg(long = "drop-column", value_name = "NAME")]
        drop_columns: Vec<String>,
        /// Rename column FROM to TO.
        #[arg(long = "rename-column", value_name = "FROM:TO")]
        rename_column: Option<String>,
        /// Set option KEY=VALUE (an empty VALUE removes it; repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set_options: Vec<String>,
    },
    /// Remove every row of table NAME.
    Truncate { name: String },
    /// Rename table NAME to NEW_NAME (in the same schema).
    Rename { name: String, new_name: String },
    /// Where table NAME's regions are: region, leader node, followers, state.
    Route { name: String },
}

fn bad(message: String) -> Failure {
    Failure(format!("error: {message}"))
}

/// `SCHEMA` or `CATALOG.SCHEMA`.
fn database_name(name: &str) -> Result<(String, String), Failure> {
    match name.split('.').collect::<Vec<_>>()[..] {
        [schema] => Ok((DEFAULT_CATALOG.to_string(), schema.to_string())),
        [catalog, schema] => Ok((catalog.to_string(), schema.to_string())),
        _ => Err(bad(format!(
            "{name:?} is not a database name: give SCHEMA or CATALOG.SCHEMA"
        ))),
    }
}

/// `TABLE`, `SCHEMA.TABLE` or `CATALOG.SCHEMA.TABLE`.
fn table_name(name: &str) -> Result<(String, String, String), Failure> {
    let owned = |s: &str| s.to_string();
    match name.split('.').collect::<Vec<_>>()[..] {
        [table] => Ok((owned(DEFAULT_CATALOG), owned(DEFAULT_SCHEMA), owned(table))),
        [schema, table] => Ok((owned(DEFAULT_CATALOG), owned(schema), owned(table))),
        [catalog, schema, table] => Ok((owned(catalog), owned(schema), owned(table))),
        _ => Err(bad(format!(
            "{name:?} is not a table name: give TABLE, SCHEMA.TABLE or CATALOG.SCHEMA.TABLE"
        ))),
    }
}

/// `KEY=VALUE` pairs.
fn pairs(items: &[String], what: &str) -> Result<BTreeMap<String, String>, Failure> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| bad(format!("{what} {item:?} is not KEY=VALUE")))
        })
        .collect()
}

/// `NAME:TYPE[:tag|field|timestamp]`.
fn column(spec: &str) -> Result<ColumnSchema, Failure> {
    let parts: Vec<&str> = spec.split(':').collect();
    let semantic_type = match parts.get(2).copied() {
        None | Some("field") => SemanticType::Field,
        Some("tag") => SemanticType::Tag,
        Some("timestamp") => SemanticType::Timestamp,
        Some(other) => {
            return Err(bad(format!(
                "column {spec:?}: {other:?} is not tag, field or timestamp"
            )));
        }
    };
    match parts[..] {
        [name, data_type, ..] if !name.is_empty() && !data_type.is_empty() && parts.len() <= 3 => {
            Ok(ColumnSchema {
                name: name.to_string(),
                data_type: data_type.to_string(),
                nullable: true,
                default: None,
                semantic_type,
            })
        }
        _ => Err(bad(format!(
            "column {spec:?} is not NAME:TYPE[:tag|field|timestamp]"
        ))),
    }
}

/// The table a `table create` describes.
fn table_to_create(
    name: &str,
    regions: u32,
    schema_file: Option<&PathBuf>,
) -> Result<TableInfo, Failure> {
    let (catalog, schema, table) = table_name(name)?;
    let mut doc = match schema_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| bad(format!("{} is not JSON: {e}", path.display())))?
        }
        None => json!({
            "engine": "mito",
            "columns": [
                {"name": "host", "data_type": "string", "semantic_type": "tag"},
                {"name": "ts", "data_type": "timestamp_ms", "nullable": false, "semantic_type": "timestamp"},
                {"name": "value", "data_type": "float64", "semantic_type": "field"},
            ],
            "primary_key": ["host"],
            "time_index": "ts",
        }),
    };
    let Some(fields) = doc.as_object_mut() else {
        return Err(bad("the schema file must hold a JSON object".to_string()));
    };
    fields.insert("id".into(), json!(0));
    fields.insert("catalog".into(), json!(catalog));
    fields.insert("schema".into(), json!(schema));
    fields.insert("name".into(), json!(table));
    fields.insert("regions".into(), json!(regions));
    serde_json::from_value(doc).map_err(|e| bad(format!("the table's schema: {e}")))
}

fn route_lines(route: &TableRoute) -> Vec<String> {
    route
        .regions
        .iter()
        .map(|r| {
            let followers: Vec<String> = r.followers.iter().map(|p| p.id.to_string()).collect();
            format!(
                "{} leader {} followers [{}] {}",
                r.region,
                r.leader
                    .as_ref()
                    .map_or("none".to_string(), |p| p.id.to_string()),
                followers.join(","),
                serde_json::to_value(r.leader_state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )
        })
        .collect()
}

pub async fn db(client: &MetaClient, command: DbCommand, output: Output) -> Result<(), Failure> {
    match command {
        DbCommand::Create {
            name,
            if_not_exists,
            options,
        } => {
            let (catalog, schema) = database_name(&name)?;
            let options = pairs(&options, "option")?;
            client
                .create_database(&catalog, &schema, options, if_not_exists)
                .await?;
            print(
                output,
                format!("database {catalog}.{schema} created"),
                json!({ "catalog": catalog, "schema": schema }),
            );
        }
        DbCommand::Drop { name, if_exists } => {
            let (catalog, schema) = database_name(&name)?;
            client.drop_database(&catalog, &schema, if_exists).await?;
            print(
                output,
                format!("database {catalog}.{schema} dropped"),
                json!({ "catalog": catalog, "schema": schema }),
            );
        }
        DbCommand::List { catalog } => {
            let dbs = client
                .list_databases(catalog.as_deref().unwrap_or(""))
                .await?;
            let lines: Vec<String> = dbs
                .iter()
                .map(|d| format!("{}.{}", d.catalog, d.schema))
                .collect();
            let json: Vec<serde_json::Value> = dbs
                .iter()
                .map(|d| {
                    json!({ "catalog": d.catalog, "schema": d.schema, "options": d.options, "created_ms": d.created_ms })
                })
                .collect();
            print(output, lines.join("\n"), json!({ "databases": json }));
        }
    }
    Ok(())
}

pub async fn table(
    client: &MetaClient,
    command: TableCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        TableCommand::Create {
            name,
            regions,
            schema_file,
            if_not_exists,
        } => {
            let info = table_to_create(&name, regions, schema_file.as_ref())?;
            let id = client.create_table(&info, if_not_exists).await?;
            print(
                output,
                format!(
                    "table {}.{}.{} created with id {id}",
                    info.catalog, info.schema, info.name
                ),
                json!({ "table_id": id }),
            );
        }
        TableCommand::Drop { name, if_exists } => {
            let (catalog, schema, table) = table_name(&name)?;
            client
                .drop_table(&catalog, &schema, &table, if_exists)
                .await?;
            print(
                output,
                format!("table {catalog}.{schema}.{table} dropped"),
                json!({ "dropped": format!("{catalog}.{schema}.{table}") }),
            );
        }
        TableCommand::Show { name } => {
            let (catalog, schema, table) = table_name(&name)?;
            let (info, route) = client.table(&catalog, &schema, &table).await?;
            let mut lines = vec![
                format!("table:    {}.{}.{}", info.catalog, info.schema, info.name),
                format!("id:       {}", info.id),
                format!("version:  {}", info.version),
                format!("engine:   {}", info.engine),
                format!("regions:  {}", info.regions),
                "columns:".to_string(),
            ];
            for c in &info.columns {
                let role = serde_json::to_value(c.semantic_type)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                lines.push(format!("  {} {} {role}", c.name, c.data_type));
            }
            if !info.options.is_empty() {
                lines.push("options:".to_string());
                lines.extend(info.options.iter().map(|(k, v)| format!("  {k}={v}")));
            }
            print(
                output,
                lines.join("\n"),
                json!({ "info": info, "route": route }),
            );
        }
        TableCommand::List { schema } => {
            let (catalog, schema) = match schema {
                Some(name) => database_name(&name)?,
                None => (DEFAULT_CATALOG.to_string(), String::new()),
            };
            let tables = client.list_tables(&catalog, &schema).await?;
            let lines: Vec<String> = tables
                .iter()
                .map(|t| {
                    format!(
                        "{} {}.{}.{} regions {}",
                        t.id, t.catalog, t.schema, t.name, t.regions
                    )
                })
                .collect();
            print(output, lines.join("\n"), json!({ "tables": tables }));
        }
        TableCommand::Alter {
            name,
            add_columns,
            drop_columns,
            rename_column,
            set_options,
        } => {
            let (catalog, schema, table) = table_name(&name)?;
            let add_columns_json = add_columns
                .iter()
                .map(|spec| {
                    let column = column(spec)?;
                    serde_json::to_string(&column).map_err(|e| bad(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (from, to) = match &rename_column {
                None => (String::new(), String::new()),
                Some(spec) => spec
                    .split_once(':')
                    .map(|(f, t)| (f.to_string(), t.to_string()))
                    .ok_or_else(|| bad(format!("--rename-column {spec:?} is not FROM:TO")))?,
            };
            client
                .alter_table(pb::AlterTableTask {
                    catalog: catalog.clone(),
                    schema: schema.clone(),
                    table: table.clone(),
                    add_columns_json,
                    drop_columns,
                    rename_column_from: from,
                    rename_column_to: to,
                    set_options: pairs(&set_options, "--set")?.into_iter().collect(),
                })
                .await?;
            let (info, _) = client.table(&catalog, &schema, &table).await?;
            print(
                output,
                format!(
                    "table {catalog}.{schema}.{table} altered (version {})",
                    info.version
                ),
                json!({ "table_id": info.id, "version": info.version }),
            );
        }
        TableCommand::Truncate { name } => {
            let (catalog, schema, table) = table_name(&name)?;
            client.truncate_table(&catalog, &schema, &table).await?;
            print(
                output,
                format!("table {catalog}.{schema}.{table} truncated"),
                json!({ "truncated": format!("{catalog}.{schema}.{table}") }),
            );
        }
        TableCommand::Rename { name, new_name } => {
            let (catalog, schema, table) = table_name(&name)?;
            client
                .rename_table(&catalog, &schema, &table, &new_name)
                .await?;
            print(
                output,
                format!("table {catalog}.{schema}.{table} renamed to {new_name}"),
                json!({ "renamed": format!("{catalog}.{schema}.{new_name}") }),
            );
        }
        TableCommand::Route { name } => table_route(client, name, output).await?,
    }
    Ok(())
}

/// `metactl table route NAME`.
async fn table_route(client: &MetaClient, name: String, output: Output) -> Result<(), Failure> {
    let (catalog, schema, table) = table_name(&name)?;
    let (info, route) = client.table(&catalog, &schema, &table).await?;
    let mut lines = vec![format!(
        "table {}.{}.{} (id {}), route version {}",
        info.catalog, info.schema, info.name, info.id, route.version
    )];
    lines.extend(route_lines(&route));
    print(
        output,
        lines.join("\n"),
        json!({ "table_id": info.id, "route": route }),
    );
    Ok(())
}
