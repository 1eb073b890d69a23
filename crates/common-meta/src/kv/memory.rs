//! `MemoryKvBackend`: a store that lives in memory, for tests and tools. Not durable.
//!
//! It is the same [`SledKvStore`] every other backend uses (so the history, compaction
//! and watch behave exactly alike), on a temporary sled database in RAM (`/dev/shm`
//! where there is one) that is removed when the backend is dropped. Writes are applied
//! in turn under a lock and never flushed. Leases expire by this process's clock.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::command::{Applied, Command};
use crate::kv::lease::{self, LeaseWriter, Lessor, LocalLeases};
use crate::kv::limits::KvLimits;
use crate::kv::sled_store::SledKvStore;
use crate::kv::types::{LeaseGrant, LeaseTimeToLive, TxnRequest, TxnResponse, WatchRequest};
use crate::kv::watch::WatchStream;

/// An in-memory [`KvBackend`] with the same semantics as the durable ones.
#[derive(Debug)]
pub struct MemoryKvBackend {
    inner: Arc<MemoryInner>,
    leases: LocalLeases,
}

#[derive(Debug)]
struct MemoryInner {
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
        let inner = Arc::new(MemoryInner {
            store: Arc::new(SledKvStore::open_in(db, limits)?),
            writer: Mutex::new(()),
        });
        let leases = LocalLeases::open(&inner.store, writer_of(&inner))?;
        Ok(MemoryKvBackend { inner, leases })
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

    /// The store underneath (its history, watchers and leases).
    pub fn store(&self) -> &Arc<SledKvStore> {
        &self.inner.store
    }

    /// Times the leases of this backend.
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.leases.lessor
    }

    fn leased(&self) -> &MemoryInner {
        self.leases.start(writer_of(&self.inner));
        &self.inner
    }
}

fn writer_of(inner: &Arc<MemoryInner>) -> Weak<dyn LeaseWriter> {
    let weak: Weak<MemoryInner> = Arc::downgrade(inner);
    weak
}

impl MemoryInner {
    fn write_now(&self, command: Command) -> Result<Applied> {
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
impl LeaseWriter for MemoryInner {
    fn store(&self) -> &SledKvStore {
        &self.store
    }

    async fn write(&self, command: Command) -> Result<Applied> {
        self.write_now(command)
    }
}

#[async_trait]
impl KvBackend for MemoryKvBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if req.is_read_only() {
            return self.inner.store.read(req);
        }
        match self.inner.write_now(Command::Txn {
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
        self.inner.write_now(Command::Compact { revision })?;
        Ok(self.inner.store.revision())
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        crate::kv::watch::watch(&self.inner.store, req)
    }

    async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        lease::grant(self.leased(), &self.leases.lessor, ttl, id).await
    }

    async fn lease_revoke(&self, id: i64) -> Result<()> {
        lease::revoke(self.leased(), &self.leases.lessor, id).await
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        lease::keep_alive(self.leased(), &self.leases.lessor, id).await
    }

    async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive> {
        lease::time_to_live(&self.leased().store, &self.leases.lessor, id, keys)
    }

    async fn leases(&self) -> Result<Vec<i64>> {
        Ok(self
            .inner
            .store
            .leases()?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }
}
