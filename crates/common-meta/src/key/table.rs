//! Table keys: `__table_name/{catalog}/{schema}/{table}`, `__table_info/{table_id}`,
//! `__table_route/{table_id}`.

use super::{MetaKey, U32_WIDTH, check_name, decoded_name, parse_u32, segments};
use crate::error::Result;

/// `__table_name/{catalog}/{schema}/{table}`: maps a table's full name to its id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableNameKey {
    catalog: String,
    schema: String,
    table: String,
}

impl TableNameKey {
    /// The key of `catalog.schema.table`; refuses names that cannot be a key segment.
    pub fn new(catalog: &str, schema: &str, table: &str) -> Result<Self> {
        check_name("catalog", catalog)?;
        check_name("schema", schema)?;
        check_name("table", table)?;
        Ok(TableNameKey {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    /// The catalog's name.
    pub fn catalog(&self) -> &str {
        &self.catalog
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl MetaKey for TableNameKey {
    const PREFIX: &'static str = "__table_name";

    fn encode(&self) -> Vec<u8> {
        format!(
            "{}/{}/{}/{}",
            Self::PREFIX,
            self.catalog,
            self.schema,
            self.table
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [catalog, schema, table] = segments(bytes, Self::PREFIX)?;
        Ok(TableNameKey {
            catalog: decoded_name(bytes, "catalog", catalog)?,
            schema: decoded_name(bytes, "schema", schema)?,
            table: decoded_name(bytes, "table", table)?,
        })
    }
}

/// Defines a key that is a prefix and a fixed-width table id.
macro_rules! table_id_key {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name {
            /// The table's id.
            pub table_id: u32,
        }

        impl $name {
            /// The key of table `table_id`.
            pub fn new(table_id: u32) -> Self {
                $name { table_id }
            }
        }

        impl MetaKey for $name {
            const PREFIX: &'static str = $prefix;

            fn encode(&self) -> Vec<u8> {
                format!("{}/{:0w$}", Self::PREFIX, self.table_id, w = U32_WIDTH).into_bytes()
            }

            fn decode(bytes: &[u8]) -> Result<Self> {
                let [id] = segments(bytes, Self::PREFIX)?;
                Ok($name::new(parse_u32(bytes, id, "table id")?))
            }
        }
    };
}

table_id_key!(
    /// `__table_info/{table_id:010}`: a table's `TableInfo`.
    TableInfoKey,
    "__table_info"
);

table_id_key!(
    /// `__table_route/{table_id:010}`: a table's versioned `TableRoute`.
    TableRouteKey,
    "__table_route"
);
