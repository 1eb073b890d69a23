//! `__catalog/{catalog}` and `__schema/{catalog}/{schema}`.

use super::{MetaKey, check_name, decoded_name, segments};
use crate::error::Result;

/// `__catalog/{catalog}`: a catalog's `CatalogValue`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CatalogKey {
    catalog: String,
}

impl CatalogKey {
    /// The key of `catalog`; refuses names that cannot be a key segment.
    pub fn new(catalog: &str) -> Result<Self> {
        check_name("catalog", catalog)?;
        Ok(CatalogKey {
            catalog: catalog.to_string(),
        })
    }

    /// The catalog's name.
    pub fn catalog(&self) -> &str {
        &self.catalog
    }
}

impl MetaKey for CatalogKey {
    const PREFIX: &'static str = "__catalog";

    fn encode(&self) -> Vec<u8> {
        format!("{}/{}", Self::PREFIX, self.catalog).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [catalog] = segments(bytes, Self::PREFIX)?;
        Ok(CatalogKey {
            catalog: decoded_name(bytes, "catalog", catalog)?,
        })
    }
}

/// `__schema/{catalog}/{schema}`: a schema's `SchemaValue`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SchemaKey {
    catalog: String,
    schema: String,
}

impl SchemaKey {
    /// The key of `catalog.schema`; refuses names that cannot be a key segment.
    pub fn new(catalog: &str, schema: &str) -> Result<Self> {
        check_name("catalog", catalog)?;
        check_name("schema", schema)?;
        Ok(SchemaKey {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
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
}

impl MetaKey for SchemaKey {
    const PREFIX: &'static str = "__schema";

    fn encode(&self) -> Vec<u8> {
        format!("{}/{}/{}", Self::PREFIX, self.catalog, self.schema).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [catalog, schema] = segments(bytes, Self::PREFIX)?;
        Ok(SchemaKey {
            catalog: decoded_name(bytes, "catalog", catalog)?,
            schema: decoded_name(bytes, "schema", schema)?,
        })
    }
}
