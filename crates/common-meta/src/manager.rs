//! Managers of multi-key metadata: each wraps the keys of one concept in transactions
//! with compares, so a change is all or nothing and a lost race is a value.
//!
//! - [`catalog`]: catalogs and schemas (databases).
//! - [`table`]: a table's name, info, route and per-datanode keys; drop through
//!   tombstones.

pub mod catalog;
pub mod route;
pub mod table;

pub use catalog::CatalogManager;
pub use table::{CreateOutcome, TableMetadataManager, Versioned};

use crate::error::{Error, Result};

/// Encodes a model value as the JSON the store keeps.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Corrupted {
        location: "a metadata value being written".to_string(),
        reason: e.to_string(),
    })
}

/// Decodes the JSON kept at `key`.
pub fn from_json<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupted {
        location: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}
