//! The state store seam and the persisted procedure record.
//!
//! Layout in the store (one key per procedure, so each persist is one atomic put):
//!
//! ```text
//! procedure/{id} -> ProcedureRecord as JSON
//! paused/{id}    -> empty: procedure `id` is paused by hand (see `manager/pause.rs`)
//! ```

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Prefix of every procedure record key.
pub const RECORD_PREFIX: &str = "procedure/";

/// The key of procedure `id`'s record.
pub fn record_key(id: &str) -> String {
    format!("{RECORD_PREFIX}{id}")
}

/// Prefix of the marks of procedures paused by hand.
pub const PAUSED_PREFIX: &str = "paused/";

/// The key of procedure `id`'s pause mark.
pub fn paused_key(id: &str) -> String {
    format!("{PAUSED_PREFIX}{id}")
}

/// Where procedures keep their state.
///
/// **Contract:** `put` and `delete` return only once the change is durable in the sense
/// of the store (in memory for [`MemoryStateStore`], on a quorum for a replicated one),
/// and a `put` is atomic: a reader sees the old value or the new one. `scan_prefix`
/// returns entries in key order. Keys are `/`-separated UTF-8 paths.
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

/// Where a procedure is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcedureState {
    /// Executing steps (or waiting for a lock, a slot or its children).
    Running,
    /// A step failed with a retryable error; waiting to try again.
    Retrying,
    /// A step failed for good; undoing what it did.
    RollingBack,
    /// Finished successfully.
    Done,
    /// Finished unsuccessfully (after a rollback when supported).
    Failed,
}

impl ProcedureState {
    /// True for `Done` and `Failed`.
    pub fn is_finished(self) -> bool {
        matches!(self, ProcedureState::Done | ProcedureState::Failed)
    }
}

/// A child that a suspended parent created, kept in the parent's record so it can be
/// recreated if the crash came before the child's own record was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSeed {
    /// The child's id.
    pub id: String,
    /// Its type name.
    pub type_name: String,
    /// Its initial dumped state.
    pub data: String,
}

/// Everything persisted about one procedure. New fields must be `#[serde(default)]`:
/// records written by older versions stay loadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcedureRecord {
    /// The procedure's id.
    pub id: String,
    /// Its stable type name (selects the loader).
    pub type_name: String,
    /// The parent, for a subprocedure.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Its state.
    pub state: ProcedureState,
    /// How many steps were persisted.
    pub step: u64,
    /// The procedure's dumped state at the last persisted step.
    pub data: String,
    /// Children it is waiting for (empty when not suspended).
    #[serde(default)]
    pub children: Vec<ChildSeed>,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// Its output, once done.
    #[serde(default)]
    pub output: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Last persisted change, ms since the Unix epoch.
    pub updated_ms: u64,
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

    #[test]
    fn records_from_older_versions_load() {
        // Written before `children`, `error` and `output` existed.
        let old = r#"{"id":"p1","type_name":"t","state":"running","step":2,"data":"{}","created_ms":1,"updated_ms":2}"#;
        let record: ProcedureRecord = serde_json::from_str(old).unwrap();
        assert_eq!((record.step, record.children.len()), (2, 0));
    }
}
