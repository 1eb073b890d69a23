//! `procedure`: the durable, idempotent procedure framework's storage seam.
//!
//! This crate depends on no crate of Metasrv. So far it holds the [`StateStore`] trait
//! through which procedures persist their state, and [`MemoryStateStore`]; the
//! `Procedure` trait and the manager come with their own issue.
//!
//! ```
//! use procedure::{MemoryStateStore, StateStore};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = MemoryStateStore::default();
//! store.put("p/1/step", b"2".to_vec()).await?;
//! assert_eq!(store.get("p/1/step").await?, Some(b"2".to_vec()));
//! assert_eq!(store.scan_prefix("p/").await?.len(), 1);
//! # Ok::<(), procedure::Error>(())
//! # }).unwrap();
//! ```

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

/// Errors of a [`StateStore`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed; `retryable` tells whether trying again may help.
    #[error("state store error at {key}: {message}")]
    Store {
        /// The key being accessed.
        key: String,
        /// What went wrong.
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
    },
}

impl Error {
    /// True when the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store { retryable, .. } => *retryable,
        }
    }
}

/// Result of state store calls.
pub type Result<T> = std::result::Result<T, Error>;

/// Where procedures keep their state.
///
/// **Contract:** `put` and `delete` return only once the change is durable in the sense
/// of the store (in memory for [`MemoryStateStore`]); `scan_prefix` returns entries in
/// key order. Keys are `/`-separated UTF-8 paths.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Stores `value` under `key`, replacing what was there.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()>;
    /// The value under `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Removes `key`; removing an absent key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Every entry whose key starts with `prefix`, in key order.
    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
}

/// A [`StateStore`] in memory, for tests.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    entries: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStateStore {
    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // Every critical section is a single map call, so a panic cannot leave it torn.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl StateStore for MemoryStateStore {
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.entries().insert(key.to_string(), value);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.entries().get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.entries().remove(key);
        Ok(())
    }

    async fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .entries()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scan_prefix_is_ordered_and_bounded() {
        let store = MemoryStateStore::default();
        for key in ["a/2", "a/1", "ab", "b/1"] {
            store.put(key, key.as_bytes().to_vec()).await.unwrap();
        }
        let keys: Vec<String> = store
            .scan_prefix("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        store.delete("a/1").await.unwrap();
        store.delete("a/1").await.unwrap();
        assert_eq!(store.get("a/1").await.unwrap(), None);
        assert_eq!(store.scan_prefix("a/").await.unwrap().len(), 1);
    }
}
