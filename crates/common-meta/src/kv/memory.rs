//! `MemoryKvBackend`: the KV store in a `BTreeMap`, for tests and tools. Not durable.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{PoisonError, RwLock};

use async_trait::async_trait;

use crate::error::Result;
use crate::kv::KvBackend;
use crate::kv::engine::{self, Entry, ReadView, ScanItem, WriteSet};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnRequest, TxnResponse};

/// An in-memory [`KvBackend`] with the same semantics as the durable ones.
#[derive(Debug, Default)]
pub struct MemoryKvBackend {
    state: RwLock<MemState>,
    limits: KvLimits,
}

#[derive(Debug, Default)]
struct MemState {
    map: BTreeMap<Vec<u8>, Entry>,
    revision: i64,
}

impl MemoryKvBackend {
    /// An empty store enforcing `limits`.
    pub fn with_limits(limits: KvLimits) -> Self {
        MemoryKvBackend {
            state: RwLock::default(),
            limits,
        }
    }
}

impl ReadView for MemState {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        Ok(self.map.get(key).cloned())
    }

    fn scan<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 'a> {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        Box::new(
            self.map
                .range::<[u8], _>((Bound::Included(start), upper))
                .map(|(k, e)| Ok((k.clone(), e.clone()))),
        )
    }
}

impl MemState {
    fn apply(&mut self, write: WriteSet) {
        for (key, change) in write.changes {
            match change {
                Some(entry) => self.map.insert(key, entry),
                None => self.map.remove(&key),
            };
        }
        self.revision = write.revision;
    }
}

#[async_trait]
impl KvBackend for MemoryKvBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        // A poisoned lock cannot hold a half-applied write: `apply` only runs after the
        // executor succeeded and does not panic, so the state is still consistent.
        if req.is_read_only() {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            return Ok(engine::execute(&*state, state.revision, &self.limits, req)?.0);
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let (response, write) = engine::execute(&*state, state.revision, &self.limits, req)?;
        if let Some(write) = write {
            state.apply(write);
        }
        Ok(response)
    }
}
