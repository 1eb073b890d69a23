//! Catalogs and schemas: `__catalog/{catalog}` and `__schema/{catalog}/{schema}`.
//!
//! The default catalog `greptime` and its schema `public` exist from the start (the
//! leader makes sure of it), so a table can be created at once.

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

    /// Creates the default catalog and schema unless they exist (idempotent).
    pub async fn ensure_defaults(&self, now_ms: u64) -> Result<()> {
        self.create_catalog(DEFAULT_CATALOG, now_ms).await?;
        let value = SchemaValue {
            created_ms: now_ms,
            ..SchemaValue::default()
        };
        self.create_schema(DEFAULT_CATALOG, DEFAULT_SCHEMA, &value)
            .await?;
        Ok(())
    }

    /// Creates catalog `name`; false when it exists already.
    pub async fn create_catalog(&self, name: &str, now_ms: u64) -> Result<bool> {
        let key = CatalogKey::new(name)?.encode();
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
        let txn = TxnRequest {
            compare: vec![
                Compare::new(
                    catalog_key.clone(),
                    CompareOp::Greater,
                    CompareTarget::CreateRevision(0),
                ),
                absent(&key),
            ],
            success: vec![TxnOp::Put(PutRequest::new(key, to_json(value)?))],
            failure: vec![TxnOp::Range(RangeRequest::key(catalog_key))],
        };
        let response = self.kv.txn(txn).await?;
        if response.succeeded {
            return Ok(true);
        }
        let catalog_exists = matches!(
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
        response
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
            .collect()
    }

    /// Deletes schema `catalog.schema` (its tables must be gone); false when it was not
    /// there.
    pub async fn drop_schema(&self, catalog: &str, schema: &str) -> Result<bool> {
        let key = SchemaKey::new(catalog, schema)?.encode();
        let deleted = self
            .kv
            .delete_range(crate::kv::DeleteRangeRequest::key(key))
            .await?;
        Ok(deleted.deleted > 0)
    }
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
    async fn defaults_exist_once_schemas_need_their_catalog() {
        let manager = CatalogManager::new(Arc::new(MemoryKvBackend::default()));
        manager.ensure_defaults(5).await.unwrap();
        manager.ensure_defaults(9).await.unwrap();
        let defaults = manager.schemas(None).await.unwrap();
        assert_eq!(defaults.len(), 1);
        assert_eq!(
            (defaults[0].catalog.as_str(), defaults[0].schema.as_str()),
            (DEFAULT_CATALOG, DEFAULT_SCHEMA)
        );
        assert_eq!(defaults[0].value.created_ms, 5, "the first creation stays");

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
