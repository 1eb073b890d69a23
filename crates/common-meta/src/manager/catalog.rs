//! Catalogs and schemas: `__catalog/{catalog}` and `__schema/{catalog}/{schema}`.
//!
//! The default catalog `greptime` and its schema `public` exist from the start, so a
//! table can be created at once: they are built in (read as existing whether or not a
//! key holds them, never written, never dropped), so a new cluster's store stays empty
//! until someone writes to it.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::key::{CatalogKey, MetaKey, SchemaKey};
use crate::kv::{
    Compare, CompareOp, CompareTarget, KvBackend, PutRequest, RangeRequest, TxnOp, TxnOpResponse,
    TxnRequest,
};
use crate::model::table::{CatalogValue, SchemaValue};

use super::{from_json, to_json};

/// The catalog every cluster has.
pub const DEFAULT_CATALOG: &str = "greptime";
/// The schema of the default catalog every cluster has.
pub const DEFAULT_SCHEMA: &str = "public";

/// Reads and writes catalogs and schemas.
#[derive(Clone)]
pub struct CatalogManager {
    kv: Arc<dyn KvBackend>,
}

/// A schema with its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaEntry {
    /// Its catalog.
    pub catalog: String,
    /// Its name.
    pub schema: String,
    /// Its value.
    pub value: SchemaValue,
}

impl CatalogManager {
    /// A manager over `kv`.
    pub fn new(kv: Arc<dyn KvBackend>) -> Self {
        CatalogManager { kv }
    }

    /// Creates catalog `name`; false when it exists already.
    pub async fn create_catalog(&self, name: &str, now_ms: u64) -> Result<bool> {
        let key = CatalogKey::new(name)?.encode();
        if name == DEFAULT_CATALOG {
            return Ok(false);
        }
        let value = to_json(&CatalogValue { created_ms: now_ms })?;
        let txn = TxnRequest {
            compare: vec![absent(&key)],
            success: vec![TxnOp::Put(PutRequest::new(key, value))],
            failure: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// Catalog `name`, if it exists.
    pub async fn catalog(&self, name: &str) -> Result<Option<CatalogValue>> {
        let key = CatalogKey::new(name)?.encode();
        match self.kv.get(&key).await? {
            Some(kv) => Ok(Some(from_json(&key, &kv.value)?)),
            None if name == DEFAULT_CATALOG => Ok(Some(CatalogValue::default())),
            None => Ok(None),
        }
    }

    /// Creates schema `catalog.schema`: false when it exists already; NotFound-like
    /// [`Error::InvalidArgument`] naming the catalog when there is no such catalog.
    pub async fn create_schema(
        &self,
        catalog: &str,
        schema: &str,
        value: &SchemaValue,
    ) -> Result<bool> {
        let catalog_key = CatalogKey::new(catalog)?.encode();
        let key = SchemaKey::new(catalog, schema)?.encode();
        if is_default(catalog, schema) {
            return Ok(false);
        }
        let mut compare = vec![absent(&key)];
        if catalog != DEFAULT_CATALOG {
            compare.push(Compare::new(
                catalog_key.clone(),
                CompareOp::Greater,
                CompareTarget::CreateRevision(0),
            ));
        }
        let txn = TxnRequest {
            compare,
            success: vec![TxnOp::Put(PutRequest::new(key, to_json(value)?))],
            failure: vec![TxnOp::Range(RangeRequest::key(catalog_key))],
        };
        let response = self.kv.txn(txn).await?;
        if response.succeeded {
            return Ok(true);
        }
        let catalog_exists = catalog == DEFAULT_CATALOG
            || matches!(
                response.responses.first(),
                Some(TxnOpResponse::Range(r)) if !r.kvs.is_empty()
            );
        if !catalog_exists {
            return Err(unknown_catalog(catalog));
        }
        Ok(false)
    }

    /// Schema `catalog.schema`, if it exists.
    pub async fn schema(&self, catalog: &str, schema: &str) -> Result<Option<SchemaValue>> {
        let key = SchemaKey::new(catalog, schema)?.encode();
        if is_default(catalog, schema) {
            // Built in and never written: nothing to read.
            return Ok(Some(SchemaValue::default()));
        }
        match self.kv.get(&key).await? {
            Some(kv) => Ok(Some(from_json(&key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Every schema of `catalog` (of every catalog for `None`), by name.
    pub async fn schemas(&self, catalog: Option<&str>) -> Result<Vec<SchemaEntry>> {
        let prefix = match catalog {
            Some(catalog) => {
                CatalogKey::new(catalog)?;
                format!("{}/{catalog}/", SchemaKey::PREFIX)
            }
            None => format!("{}/", SchemaKey::PREFIX),
        };
        let response = self
            .kv
            .range(RangeRequest::prefix(prefix.into_bytes()))
            .await?;
        let mut out = response
            .kvs
            .into_iter()
            .map(|kv| {
                let key = SchemaKey::decode(&kv.key)?;
                Ok(SchemaEntry {
                    catalog: key.catalog().to_string(),
                    schema: key.schema().to_string(),
                    value: from_json(&kv.key, &kv.value)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wants_default = catalog.is_none_or(|c| c == DEFAULT_CATALOG);
        if wants_default && !out.iter().any(|e| is_default(&e.catalog, &e.schema)) {
            out.push(SchemaEntry {
                catalog: DEFAULT_CATALOG.to_string(),
                schema: DEFAULT_SCHEMA.to_string(),
                value: SchemaValue::default(),
            });
            out.sort_by(|a, b| (&a.catalog, &a.schema).cmp(&(&b.catalog, &b.schema)));
        }
        Ok(out)
    }

    /// Deletes schema `catalog.schema` (its tables must be gone); false when it was not
    /// there.
    pub async fn drop_schema(&self, catalog: &str, schema: &str) -> Result<bool> {
        let key = SchemaKey::new(catalog, schema)?.encode();
        if is_default(catalog, schema) {
            return Err(Error::invalid_argument(format!(
                "schema {catalog}.{schema} is the default and cannot be dropped"
            )));
        }
        let deleted = self
            .kv
            .delete_range(crate::kv::DeleteRangeRequest::key(key))
            .await?;
        Ok(deleted.deleted > 0)
    }
}

/// Whether `catalog.schema` is the built-in default schema.
pub fn is_default(catalog: &str, schema: &str) -> bool {
    catalog == DEFAULT_CATALOG && schema == DEFAULT_SCHEMA
}

/// "`key` does not exist".
pub(crate) fn absent(key: &[u8]) -> Compare {
    Compare::new(
        key.to_vec(),
        CompareOp::Equal,
        CompareTarget::CreateRevision(0),
    )
}

/// The error of a catalog that does not exist.
pub fn unknown_catalog(catalog: &str) -> Error {
    Error::NotFound {
        what: format!("catalog {catalog}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKvBackend;

    #[tokio::test]
    async fn defaults_are_built_in_schemas_need_their_catalog() {
        let kv = Arc::new(MemoryKvBackend::default());
        let manager = CatalogManager::new(kv.clone());
        let defaults = manager.schemas(None).await.unwrap();
        assert_eq!(defaults.len(), 1);
        assert_eq!(
            (defaults[0].catalog.as_str(), defaults[0].schema.as_str()),
            (DEFAULT_CATALOG, DEFAULT_SCHEMA)
        );
        assert!(manager.catalog(DEFAULT_CATALOG).await.unwrap().is_some());
        assert!(!manager.create_catalog(DEFAULT_CATALOG, 1).await.unwrap());
        let value = SchemaValue::default();
        assert!(
            !manager
                .create_schema(DEFAULT_CATALOG, DEFAULT_SCHEMA, &value)
                .await
                .unwrap()
        );
        let err = manager
            .drop_schema(DEFAULT_CATALOG, DEFAULT_SCHEMA)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot be dropped"), "{err}");
        let everything = kv.range(RangeRequest::prefix(Vec::new())).await.unwrap();
        assert!(
            everything.kvs.is_empty(),
            "nothing is written for the defaults"
        );

        let value = SchemaValue::default();
        assert!(
            manager
                .create_schema("greptime", "app", &value)
                .await
                .unwrap()
        );
        assert!(
            !manager
                .create_schema("greptime", "app", &value)
                .await
                .unwrap()
        );
        let err = manager
            .create_schema("nope", "app", &value)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("catalog nope"), "{err}");
        let err = manager
            .create_schema("greptime", "a/b", &value)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("must not contain '/'"), "{err}");

        assert_eq!(manager.schemas(Some("greptime")).await.unwrap().len(), 2);
        assert!(manager.schemas(Some("other")).await.unwrap().is_empty());
        assert!(manager.drop_schema("greptime", "app").await.unwrap());
        assert!(!manager.drop_schema("greptime", "app").await.unwrap());
        assert!(manager.schema("greptime", "app").await.unwrap().is_none());
    }
}
