//! Alter table: prepare (find the table, compute its next info; persisted) -> alter
//! the regions on their datanodes -> replace the info with a compare on the one read
//! (version + 1) -> invalidate caches. A failure before the commit leaves the stored
//! info as it was and rolls the regions that took the new schema back to it (best
//! effort: one that cannot be reached keeps the newer schema until the alter is
//! repeated).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use common_meta::manager::Versioned;
use common_meta::model::table::{ColumnSchema, TableInfo, TableRoute};
use meta_proto::v1 as pb;
use procedure::{Context, LockKey, Procedure, Status};
use serde::{Deserialize, Serialize};

use super::context::{
    DdlContext, Unreachable, dump_state, load_state, regions_by_node, step_error, table_idents,
};
use super::drop_table::find_table;
use super::{done_with_table, locks_for_table, unknown_table};

/// The type name persisted with the procedure.
pub const TYPE_NAME: &str = "metasrv.AlterTable";

/// What an alter changes, applied in this order: drop, rename, add, options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlterSpec {
    /// Columns to add.
    #[serde(default)]
    pub add_columns: Vec<ColumnSchema>,
    /// Columns to drop.
    #[serde(default)]
    pub drop_columns: Vec<String>,
    /// A column to rename: (from, to).
    #[serde(default)]
    pub rename_column: Option<(String, String)>,
    /// Options to set; an empty value removes the option.
    #[serde(default)]
    pub set_options: BTreeMap<String, String>,
}

impl AlterSpec {
    /// `info` after this alter (version + 1), or why it cannot be.
    pub fn apply(&self, info: &TableInfo, now_ms: u64) -> common_meta::Result<TableInfo> {
        let name = format!("{}.{}.{}", info.catalog, info.schema, info.name);
        let bad = |why: String| {
            Err(common_meta::Error::invalid_argument(format!(
                "table {name}: {why}"
            )))
        };
        if self.add_columns.is_empty()
            && self.drop_columns.is_empty()
            && self.rename_column.is_none()
            && self.set_options.is_empty()
        {
            return bad("the alter changes nothing".to_string());
        }
        let mut next = info.clone();
        for column in &self.drop_columns {
            if !next.columns.iter().any(|c| c.name == *column) {
                return bad(format!("has no column {column:?} to drop"));
            }
            if next.time_index.as_deref() == Some(column) || next.primary_key.contains(column) {
                return bad(format!(
                    "column {column:?} is the time index or in the primary key and cannot be dropped"
                ));
            }
            next.columns.retain(|c| c.name != *column);
        }
        if let Some((from, to)) = &self.rename_column {
            if next.columns.iter().any(|c| c.name == *to) {
                return bad(format!("column {to:?} exists already"));
            }
            let Some(column) = next.columns.iter_mut().find(|c| c.name == *from) else {
                return bad(format!("has no column {from:?} to rename"));
            };
            column.name = to.clone();
            for key in next.primary_key.iter_mut().filter(|k| *k == from) {
                *key = to.clone();
            }
            if next.time_index.as_deref() == Some(from) {
                next.time_index = Some(to.clone());
            }
        }
        for column in &self.add_columns {
            if next.columns.iter().any(|c| c.name == column.name) {
                return bad(format!("column {:?} exists already", column.name));
            }
            next.columns.push(column.clone());
        }
        for (key, value) in &self.set_options {
            if value.is_empty() {
                next.options.remove(key);
            } else {
                next.options.insert(key.clone(), value.clone());
            }
        }
        next.version += 1;
        next.updated_ms = now_ms;
        next.validate()?;
        Ok(next)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Prepare,
    AlterRegions,
    Commit,
    Invalidate,
}

/// The persisted state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Data {
    catalog: String,
    schema: String,
    table: String,
    spec: AlterSpec,
    step: Step,
    /// The info read at prepare, as stored (the operand of the commit's compare).
    #[serde(default)]
    old: Option<String>,
    #[serde(default)]
    new: Option<TableInfo>,
    #[serde(default)]
    route: Option<TableRoute>,
}

/// The alter-table procedure.
pub struct AlterTable {
    data: Data,
    ctx: Arc<DdlContext>,
}

impl AlterTable {
    /// A new alter of `catalog.schema.table`.
    pub fn new(
        ctx: Arc<DdlContext>,
        catalog: &str,
        schema: &str,
        table: &str,
        spec: AlterSpec,
    ) -> Self {
        AlterTable {
            data: Data {
                catalog: catalog.to_string(),
                schema: schema.to_string(),
                table: table.to_string(),
                spec,
                step: Step::Prepare,
                old: None,
                new: None,
                route: None,
            },
            ctx,
        }
    }

    /// Rebuilds an alter from its persisted state.
    pub fn load(ctx: Arc<DdlContext>, json: &str) -> procedure::Result<Self> {
        let data = load_state("alter-table", json)?;
        Ok(AlterTable { data, ctx })
    }

    fn new_info(&self) -> procedure::Result<&TableInfo> {
        self.data
            .new
            .as_ref()
            .ok_or_else(|| procedure::Error::external("alter-table state has no new info"))
    }

    /// Sends the table's regions to `info_json` on every node holding them.
    async fn alter_regions(
        &self,
        ctx: &Context,
        info_json: &str,
        unreachable: Unreachable,
    ) -> procedure::Result<()> {
        let route = self.data.route.clone().unwrap_or(TableRoute {
            regions: Vec::new(),
            version: 0,
        });
        self.ctx
            .on_nodes(
                ctx,
                "alter",
                &regions_by_node(&route),
                |region_ids| pb::Instruction {
                    kind: Some(pb::instruction::Kind::AlterRegions(pb::AlterRegions {
                        table_info_json: info_json.to_string(),
                        region_ids,
                    })),
                },
                unreachable,
            )
            .await
    }

    async fn prepare(&mut self) -> procedure::Result<Status> {
        let d = &self.data;
        let Some((old, route)) = find_table(&self.ctx, &d.catalog, &d.schema, &d.table).await?
        else {
            return Err(step_error(unknown_table(&d.catalog, &d.schema, &d.table)));
        };
        let new = d
            .spec
            .apply(&old.value, common_meta::time::unix_ms())
            .map_err(step_error)?;
        super::check_info_size(&new, &self.ctx.limits).map_err(step_error)?;
        self.data.old = Some(String::from_utf8_lossy(&old.raw).into_owned());
        self.data.new = Some(new);
        self.data.route = Some(route);
        self.data.step = Step::AlterRegions;
        Ok(Status::Executing { persist: true })
    }
}

#[async_trait]
impl Procedure for AlterTable {
    fn type_name(&self) -> &str {
        TYPE_NAME
    }

    async fn execute(&mut self, ctx: &Context) -> procedure::Result<Status> {
        match self.data.step {
            Step::Prepare => self.prepare().await,
            Step::AlterRegions => {
                let json = serde_json::to_string(self.new_info()?)
                    .map_err(|e| procedure::Error::external(e.to_string()))?;
                self.alter_regions(ctx, &json, Unreachable::Fail).await?;
                self.data.step = Step::Commit;
                Ok(Status::Executing { persist: true })
            }
            Step::Commit => {
                let new = self.new_info()?.clone();
                let old_raw = self.data.old.clone().unwrap_or_default().into_bytes();
                let old = Versioned {
                    value: serde_json::from_slice::<TableInfo>(&old_raw)
                        .map_err(|e| procedure::Error::external(e.to_string()))?,
                    raw: old_raw,
                };
                let tables = &self.ctx.tables;
                if !tables
                    .update_table_info(&old, &new)
                    .await
                    .map_err(step_error)?
                {
                    // A repeat of this commit finds its own result; anything else is a
                    // change made outside the lock.
                    let now = tables.table_info(new.id).await.map_err(step_error)?;
                    if now.map(|v| v.value) != Some(new.clone()) {
                        return Err(step_error(common_meta::Error::FailedPrecondition {
                            message: format!("table {} changed while it was altered", new.id),
                        }));
                    }
                }
                self.data.step = Step::Invalidate;
                Ok(Status::Executing { persist: true })
            }
            Step::Invalidate => {
                let new = self.new_info()?;
                self.ctx
                    .invalidate(table_idents(new.id, &new.catalog, &new.schema, &new.name))
                    .await;
                Ok(done_with_table(new.id))
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

    async fn rollback(&mut self, ctx: &Context) -> procedure::Result<()> {
        // Before the commit, regions that took the new schema go back to the stored
        // one (best effort: a node that refuses or stays away keeps what it has, and
        // a repeat of the alter brings it level). After it, the alter stands.
        let (Step::AlterRegions | Step::Commit, Some(old)) = (self.data.step, &self.data.old)
        else {
            return Ok(());
        };
        let old = old.clone();
        self.alter_regions(ctx, &old, Unreachable::Skip).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common_meta::model::table::SemanticType;

    fn column(name: &str, semantic_type: SemanticType) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            data_type: "string".into(),
            nullable: true,
            default: None,
            semantic_type,
        }
    }

    fn info() -> TableInfo {
        TableInfo {
            id: 1024,
            catalog: "greptime".into(),
            schema: "public".into(),
            name: "cpu".into(),
            engine: "mito".into(),
            columns: vec![
                column("host", SemanticType::Tag),
                column("ts", SemanticType::Timestamp),
                column("usage", SemanticType::Field),
            ],
            primary_key: vec!["host".into()],
            time_index: Some("ts".into()),
            options: BTreeMap::from([("ttl".to_string(), "7d".to_string())]),
            partition: Default::default(),
            regions: 1,
            version: 3,
            created_ms: 1,
            updated_ms: 1,
        }
    }

    #[test]
    fn an_alter_applies_in_order_and_bumps_the_version() {
        let spec = AlterSpec {
            add_columns: vec![column("usage", SemanticType::Field)],
            drop_columns: vec!["usage".into()],
            rename_column: Some(("host".into(), "hostname".into())),
            set_options: BTreeMap::from([
                ("ttl".to_string(), String::new()),
                ("compaction".to_string(), "twcs".to_string()),
            ]),
        };
        let next = spec.apply(&info(), 9).unwrap();
        let names: Vec<_> = next.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["hostname", "ts", "usage"]);
        assert_eq!(next.primary_key, ["hostname"]);
        assert_eq!((next.version, next.updated_ms), (4, 9));
        assert_eq!(next.options.len(), 1);
        assert_eq!(next.options["compaction"], "twcs");
    }

    #[test]
    fn an_alter_that_cannot_be_says_why() {
        let cases = [
            (AlterSpec::default(), "changes nothing"),
            (
                AlterSpec {
                    add_columns: vec![column("host", SemanticType::Field)],
                    ..Default::default()
                },
                "\"host\" exists already",
            ),
            (
                AlterSpec {
                    drop_columns: vec!["nope".into()],
                    ..Default::default()
                },
                "no column \"nope\" to drop",
            ),
            (
                AlterSpec {
                    drop_columns: vec!["ts".into()],
                    ..Default::default()
                },
                "cannot be dropped",
            ),
            (
                AlterSpec {
                    rename_column: Some(("nope".into(), "x".into())),
                    ..Default::default()
                },
                "no column \"nope\" to rename",
            ),
            (
                AlterSpec {
                    add_columns: vec![column("", SemanticType::Field)],
                    ..Default::default()
                },
                "is not valid",
            ),
        ];
        for (spec, reason) in cases {
            let err = spec.apply(&info(), 1).unwrap_err().to_string();
            assert!(err.contains(reason), "{reason}: {err}");
        }
    }
}
