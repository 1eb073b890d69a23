//! The metadata plane's values: catalogs, schemas, tables, their regions and where the
//! regions live, stored as JSON under the keys of [`crate::key`]:
//!
//! ```text
//! __catalog/{catalog}                           CatalogValue
//! __schema/{catalog}/{schema}                   SchemaValue
//! __table_info/{table_id}                       TableInfo
//! __table_route/{table_id}                      TableRoute
//! __datanode_table/{node_id}/{table_id}         DatanodeTable
//! ```
//!
//! **Forward compatibility.** Every value is read by binaries older and newer than the
//! one that wrote it: a field added later has a default (`#[serde(default)]`), and
//! fields a reader does not know are ignored, never refused. Never rename or retype a
//! field; add a new one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::TableNameKey;

/// Most regions one table may have.
pub const MAX_REGIONS: u32 = 1024;

/// Table ids below this are reserved (system tables); user tables start here.
pub const FIRST_TABLE_ID: u32 = 1024;

/// A region: `table_id << 32 | region_number`. Shown to people as
/// `table_id.region_number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegionId(u64);

impl RegionId {
    /// Region `region_number` of table `table_id`.
    pub fn new(table_id: u32, region_number: u32) -> RegionId {
        RegionId((u64::from(table_id) << 32) | u64::from(region_number))
    }

    /// The id as one number (as the wire and heartbeats carry it).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The table the region belongs to.
    pub fn table_id(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The region's number within its table.
    pub fn region_number(self) -> u32 {
        self.0 as u32
    }
}

impl From<u64> for RegionId {
    fn from(id: u64) -> RegionId {
        RegionId(id)
    }
}

impl std::fmt::Display for RegionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.table_id(), self.region_number())
    }
}

impl std::str::FromStr for RegionId {
    type Err = Error;

    /// `table_id.region_number`, or the whole id as one number.
    fn from_str(text: &str) -> Result<RegionId> {
        let bad = || {
            Error::invalid_argument(format!(
                "region id {text:?} is neither TABLE_ID.REGION_NUMBER nor a number"
            ))
        };
        match text.split_once('.') {
            Some((table, region)) => Ok(RegionId::new(
                table.parse().map_err(|_| bad())?,
                region.parse().map_err(|_| bad())?,
            )),
            None => text.parse::<u64>().map(RegionId).map_err(|_| bad()),
        }
    }
}

/// The value of `__table_name/{catalog}/{schema}/{table}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableNameValue {
    /// The table the name points at.
    pub table_id: u32,
}

/// A catalog: the top of the name space.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CatalogValue {
    /// When it was created (Unix milliseconds).
    #[serde(default)]
    pub created_ms: u64,
}

/// A schema (a database) inside a catalog.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SchemaValue {
    /// Options such as `ttl`, passed to the tables created in it.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// The procedure that created it, if one did.
    #[serde(default)]
    pub created_by: Option<String>,
    /// When it was created (Unix milliseconds).
    #[serde(default)]
    pub created_ms: u64,
}

/// What a column is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SemanticType {
    /// Part of the primary key.
    Tag,
    /// A value.
    #[default]
    Field,
    /// The time index.
    Timestamp,
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// Its name, unique in the table.
    pub name: String,
    /// Its type, as the database names it (opaque here).
    pub data_type: String,
    /// Whether it may hold nulls.
    #[serde(default = "yes")]
    pub nullable: bool,
    /// Its default value, as the database writes it (opaque here).
    #[serde(default)]
    pub default: Option<String>,
    /// What it is for.
    #[serde(default)]
    pub semantic_type: SemanticType,
}

fn yes() -> bool {
    true
}

/// How rows are spread over regions: the columns the rule reads and one expression
/// per region (both opaque here: the database evaluates them).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PartitionRule {
    /// The columns the expressions read.
    #[serde(default)]
    pub columns: Vec<String>,
    /// One expression per region, in region-number order.
    #[serde(default)]
    pub exprs: Vec<String>,
}

/// Everything about a table but where its regions live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Its id (at least [`FIRST_TABLE_ID`] for user tables).
    pub id: u32,
    /// Its catalog.
    pub catalog: String,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// The storage engine, as the database names it.
    #[serde(default)]
    pub engine: String,
    /// Its columns, in order.
    pub columns: Vec<ColumnSchema>,
    /// The columns of the primary key, in order (tags).
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// The time index column, if any.
    #[serde(default)]
    pub time_index: Option<String>,
    /// Table options.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// How rows are spread over its regions.
    #[serde(default)]
    pub partition: PartitionRule,
    /// How many regions it has (numbered from 0).
    pub regions: u32,
    /// Bumped by every alter.
    #[serde(default)]
    pub version: u64,
    /// When it was created and last changed (Unix milliseconds).
    #[serde(default)]
    pub created_ms: u64,
    /// See `created_ms`.
    #[serde(default)]
    pub updated_ms: u64,
}

impl TableInfo {
    /// The ids of its regions, in number order.
    pub fn region_ids(&self) -> impl Iterator<Item = RegionId> + '_ {
        (0..self.regions).map(|number| RegionId::new(self.id, number))
    }

    /// The key of its full name (checks the three names).
    pub fn name_key(&self) -> Result<TableNameKey> {
        TableNameKey::new(&self.catalog, &self.schema, &self.name)
    }

    /// Checks what a database could not live with: names, column names unique and not
    /// empty, the primary key and the time index naming columns, 1 to
    /// [`MAX_REGIONS`] regions, one partition expression per region when there are any.
    pub fn validate(&self) -> Result<()> {
        self.name_key()?;
        let bad = |why: String| {
            Err(Error::invalid_argument(format!(
                "table {}.{}.{}: {why}",
                self.catalog, self.schema, self.name
            )))
        };
        if self.columns.is_empty() {
            return bad("has no column".to_string());
        }
        let mut seen = std::collections::BTreeSet::new();
        for column in &self.columns {
            if column.name.is_empty() || column.name.chars().any(char::is_control) {
                return bad(format!("column name {:?} is not valid", column.name));
            }
            if !seen.insert(column.name.as_str()) {
                return bad(format!("column {:?} appears twice", column.name));
            }
        }
        for key in &self.primary_key {
            if !seen.contains(key.as_str()) {
                return bad(format!("primary key column {key:?} is not a column"));
            }
        }
        if let Some(time) = &self.time_index
            && !seen.contains(time.as_str())
        {
            return bad(format!("time index {time:?} is not a column"));
        }
        if self.regions == 0 || self.regions > MAX_REGIONS {
            return bad(format!(
                "{} regions; a table has 1 to {MAX_REGIONS}",
                self.regions
            ));
        }
        if !self.partition.exprs.is_empty() && self.partition.exprs.len() != self.regions as usize {
            return bad(format!(
                "{} partition expressions for {} regions",
                self.partition.exprs.len(),
                self.regions
            ));
        }
        Ok(())
    }
}

/// A datanode as a route names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node's id.
    pub id: u64,
    /// Where it serves, as it registered.
    #[serde(default)]
    pub addr: String,
}

/// The state of a region's leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaderState {
    /// Writes go to the leader.
    #[default]
    Serving,
    /// The leader is being moved away and must not write.
    Downgrading,
}

/// Where one region lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRoute {
    /// The region.
    pub region: RegionId,
    /// The node that writes it.
    pub leader: Option<Peer>,
    /// Nodes that hold read-only copies.
    #[serde(default)]
    pub followers: Vec<Peer>,
    /// The leader's state.
    #[serde(default)]
    pub leader_state: LeaderState,
    /// Since when the leader is downgrading (Unix milliseconds).
    #[serde(default)]
    pub leader_down_since: Option<u64>,
}

/// Where every region of a table lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRoute {
    /// One route per region, in region-number order.
    pub regions: Vec<RegionRoute>,
    /// Bumped by every change of a route (compare on it to change one safely).
    #[serde(default)]
    pub version: u64,
}

impl TableRoute {
    /// The regions led by node `node`.
    pub fn led_by(&self, node: u64) -> impl Iterator<Item = RegionId> + '_ {
        self.regions
            .iter()
            .filter(move |r| r.leader.as_ref().is_some_and(|p| p.id == node))
            .map(|r| r.region)
    }
}

impl TableRoute {
    /// The nodes holding regions of `info` (as leader or follower), each with the
    /// regions it holds: the `__datanode_table` values this route implies.
    pub fn datanode_tables(&self, info: &TableInfo) -> BTreeMap<u64, DatanodeTable> {
        let mut out: BTreeMap<u64, DatanodeTable> = BTreeMap::new();
        for route in &self.regions {
            for peer in route.leader.iter().chain(&route.followers) {
                let entry = out.entry(peer.id).or_insert_with(|| DatanodeTable {
                    regions: Vec::new(),
                    engine: info.engine.clone(),
                    options: info.options.clone(),
                });
                if !entry.regions.contains(&route.region.region_number()) {
                    entry.regions.push(route.region.region_number());
                }
            }
        }
        for table in out.values_mut() {
            table.regions.sort_unstable();
        }
        out
    }
}

/// The regions of one table on one datanode, with what the node needs to open them:
/// a datanode reads its `__datanode_table/{node}/` keys at start to learn what to open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatanodeTable {
    /// The regions, by number.
    pub regions: Vec<u32>,
    /// The storage engine.
    #[serde(default)]
    pub engine: String,
    /// Region options (the table's, as the regions were created).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableInfo {
        let column = |name: &str, semantic_type| ColumnSchema {
            name: name.to_string(),
            data_type: "string".to_string(),
            nullable: true,
            default: None,
            semantic_type,
        };
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
            options: BTreeMap::new(),
            partition: PartitionRule::default(),
            regions: 4,
            version: 0,
            created_ms: 1,
            updated_ms: 1,
        }
    }

    #[test]
    fn a_region_id_has_both_halves_and_reads_back_from_its_display() {
        let id = RegionId::new(1024, 7);
        assert_eq!(id.as_u64(), (1024u64 << 32) | 7);
        assert_eq!((id.table_id(), id.region_number()), (1024, 7));
        assert_eq!(id.to_string(), "1024.7");
        assert_eq!("1024.7".parse::<RegionId>().unwrap(), id);
        assert_eq!(id.as_u64().to_string().parse::<RegionId>().unwrap(), id);
        assert_eq!(RegionId::from(id.as_u64()), id);
        for bad in ["", "1024.", ".7", "a.b", "1024.7.1", "99999999999.1"] {
            assert!(bad.parse::<RegionId>().is_err(), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&id).unwrap(), id.as_u64().to_string());
    }

    #[test]
    fn values_round_trip_and_read_older_and_newer_writers() {
        let info = table();
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<TableInfo>(&json).unwrap(), info);
        // A newer writer's field is ignored; an older writer's missing ones default.
        let newer = r#"{"id":1025,"catalog":"c","schema":"s","name":"t","columns":[{"name":"a","data_type":"int"}],"regions":1,"from_the_future":{"x":1}}"#;
        let read: TableInfo = serde_json::from_str(newer).unwrap();
        assert_eq!((read.id, read.version, read.time_index), (1025, 0, None));
        assert!(read.columns[0].nullable, "columns are nullable unless said");
        assert_eq!(read.columns[0].semantic_type, SemanticType::Field);

        let route = TableRoute {
            regions: vec![RegionRoute {
                region: RegionId::new(1024, 0),
                leader: Some(Peer {
                    id: 3,
                    addr: "10.0.0.3:4001".into(),
                }),
                followers: vec![],
                leader_state: LeaderState::Downgrading,
                leader_down_since: Some(5),
            }],
            version: 2,
        };
        let json = serde_json::to_string(&route).unwrap();
        assert!(json.contains(r#""leader_state":"downgrading""#), "{json}");
        assert_eq!(serde_json::from_str::<TableRoute>(&json).unwrap(), route);
        assert_eq!(
            route.led_by(3).collect::<Vec<_>>(),
            [RegionId::new(1024, 0)]
        );
        assert_eq!(route.led_by(4).count(), 0);
        let old: RegionRoute = serde_json::from_str(r#"{"region":5,"leader":null}"#).unwrap();
        assert_eq!(old.leader_state, LeaderState::Serving);
    }

    #[test]
    fn a_table_a_database_could_not_live_with_is_refused_with_the_reason() {
        assert!(table().validate().is_ok());
        assert_eq!(table().region_ids().count(), 4);
        type Breaks = Box<dyn Fn(&mut TableInfo)>;
        let cases: Vec<(&str, Breaks)> = vec![
            ("must not contain '/'", Box::new(|t| t.name = "a/b".into())),
            ("has no column", Box::new(|t| t.columns.clear())),
            (
                "appears twice",
                Box::new(|t| {
                    let again = t.columns[0].clone();
                    t.columns.push(again);
                }),
            ),
            (
                "primary key column \"nope\"",
                Box::new(|t| t.primary_key.push("nope".into())),
            ),
            (
                "time index \"when\"",
                Box::new(|t| t.time_index = Some("when".into())),
            ),
            ("0 regions", Box::new(|t| t.regions = 0)),
            ("1025 regions", Box::new(|t| t.regions = 1025)),
            (
                "1 partition expressions for 4 regions",
                Box::new(|t| t.partition.exprs = vec!["host < 'm'".into()]),
            ),
        ];
        for (reason, break_it) in cases {
            let mut bad = table();
            break_it(&mut bad);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(reason), "{reason}: {err}");
        }
    }
}
