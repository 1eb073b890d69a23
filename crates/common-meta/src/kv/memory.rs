//! `MemoryKvBackend`: a store that lives in memory, for tests and tools. Not durable.
//!
//! It is the same [`SledKvStore`] every other backend uses (so the history, compaction
//! and watch behave exactly alike), on a temporary sled database in RAM (`/dev/shm`
//! where there is one) that is removed when the backend is dropped. Writes are applied
//! in turn under a lock and never flushed.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::command::{Applied, Command};
use crate::kv::limits::KvLimits;
use crate::kv::sled_store::SledKvStore;
use crate::kv::types::{TxnRequest, TxnResponse, WatchRequest};
use crate::kv::watch::WatchStream;

/// An in-memory [`KvBackend`] with the same semantics as the durable ones.
#[derive(Debug)]
pub struct MemoryKvBackend {
    store: Arc<SledKvStore>,
    /// The store takes one writer at a time.
    writer: Mutex<()>,
}

impl Default for MemoryKvBackend {
    /// An empty store with the default limits.
    ///
    /// # Panics
    /// When the temporary database cannot be created (no room in memory or in the
    /// temporary directory); [`MemoryKvBackend::new`] returns that error instead.
    fn default() -> Self {
        Self::with_limits(KvLimits::default())
    }
}

impl MemoryKvBackend {
    /// An empty store enforcing `limits`, or the error of creating its database.
    pub fn new(limits: KvLimits) -> Result<Self> {
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .map_err(|source| Error::Storage {
                context: "creating a temporary in-memory database".to_string(),
                source,
            })?;
        Ok(MemoryKvBackend {
            store: Arc::new(SledKvStore::open_in(db, limits)?),
            writer: Mutex::new(()),
        })
    }

    /// An empty store enforcing `limits`.
    ///
    /// # Panics
    /// As [`MemoryKvBackend::default`].
    pub fn with_limits(limits: KvLimits) -> Self {
        match Self::new(limits) {
            Ok(backend) => backend,
            Err(e) => panic!("cannot create an in-memory KV store: {e}"),
        }
    }

    /// The store underneath (its history and watchers).
    pub fn store(&self) -> &Arc<SledKvStore> {
        &self.store
    }

    fn write(&self, command: Command) -> Result<Applied> {
        // A panic while holding the lock leaves no half-written state: each group is one
        // sled batch.
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.store
            .commit_commands(vec![command])?
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(Error::Remote {
                    code: "Internal".to_string(),
                    message: "a write got no answer".to_string(),
                })
            })
    }
}

#[async_trait]
impl KvBackend for MemoryKvBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if req.is_read_only() {
            return self.store.read(req);
        }
        match self.write(Command::Txn {
            txn: req,
            session: None,
        })? {
            Applied::Txn(response) => Ok(response),
            other => Err(Error::Remote {
                code: "Internal".to_string(),
                message: format!("a transaction was answered {other:?}"),
            }),
        }
    }

    async fn compact(&self, revision: i64) -> Result<i64> {
        self.write(Command::Compact { revision })?;
        Ok(self.store.revision())
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        crate::kv::watch::watch(&self.store, req)
    }
}
