//! `SledKvBackend`: the durable KV store on sled.
//!
//! Layout, all in the one sled tree `kv` so a write is a single atomic sled batch:
//!
//! ```text
//! 0x00 "revision"  -> store revision, i64 big-endian
//! 0x01 {user key}  -> Entry: create_revision, mod_revision, version (i64 BE each), value
//! ```
//!
//! **Durability contract:** a write is acknowledged only after `sled::Db::flush` returned,
//! that is after its batch is fsynced. The batch (data and revision together) is atomic:
//! after a crash either all of a write or none of it is there. A concurrent reader may
//! observe a write whose flush is still in progress; its writer is not acknowledged until
//! the flush completes. Flushes run outside the write lock, so writes that arrive during a
//! flush share the next one (group commit).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::engine::{self, Entry, ReadView, ScanItem, WriteSet};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnOp, TxnRequest, TxnResponse};

const TREE: &str = "kv";
const META_PREFIX: u8 = 0x00;
const DATA_PREFIX: u8 = 0x01;
const REVISION_KEY: &[u8] = b"\x00revision";

/// A durable [`KvBackend`] on a sled database in a directory.
#[derive(Clone, Debug)]
pub struct SledKvBackend {
    inner: Arc<SledInner>,
}

#[derive(Debug)]
struct SledInner {
    db: sled::Db,
    tree: sled::Tree,
    /// Writers take it exclusively for execute + apply; readers share it, so a read sees
    /// either all or none of a write.
    lock: RwLock<()>,
    revision: AtomicI64,
    limits: KvLimits,
    path: PathBuf,
}

impl SledKvBackend {
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: impl AsRef<Path>, limits: KvLimits) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|source| Error::Storage {
                context: format!("opening sled database at {}", path.display()),
                source,
            })?;
        let tree = db.open_tree(TREE).map_err(|source| Error::Storage {
            context: format!("opening tree {TREE}"),
            source,
        })?;
        let revision = match tree.get(REVISION_KEY).map_err(|source| Error::Storage {
            context: "reading the store revision".to_string(),
            source,
        })? {
            None => 0,
            Some(bytes) => {
                let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| Error::Corrupted {
                    location: format!("{} tree {TREE} key revision", path.display()),
                    reason: format!("expected 8 bytes, found {}", bytes.len()),
                })?;
                i64::from_be_bytes(bytes)
            }
        };
        Ok(SledKvBackend {
            inner: Arc::new(SledInner {
                db,
                tree,
                lock: RwLock::new(()),
                revision: AtomicI64::new(revision),
                limits,
                path,
            }),
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.inner.revision.load(Ordering::Acquire)
    }
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(DATA_PREFIX);
    out.extend_from_slice(key);
    out
}

impl SledInner {
    fn storage_error(context: &str) -> impl FnOnce(sled::Error) -> Error + '_ {
        move |source| Error::Storage {
            context: context.to_string(),
            source,
        }
    }

    fn decode(&self, stored_key: &[u8], bytes: &[u8]) -> Result<Entry> {
        Entry::decode(bytes).map_err(|reason| Error::Corrupted {
            location: format!(
                "{} tree {TREE} key {:?}",
                self.path.display(),
                String::from_utf8_lossy(&stored_key[1..])
            ),
            reason,
        })
    }

    fn txn_blocking(&self, req: TxnRequest) -> Result<TxnResponse> {
        let read_only = req
            .success
            .iter()
            .chain(&req.failure)
            .all(|op| matches!(op, TxnOp::Range(_)));
        if read_only {
            let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
            let revision = self.revision.load(Ordering::Acquire);
            return Ok(engine::execute(self, revision, &self.limits, req)?.0);
        }
        let response = {
            // The guard only protects in-process ordering; sled's own state is consistent
            // whatever a panicking holder did, so a poisoned lock is safe to take over.
            let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
            let revision = self.revision.load(Ordering::Acquire);
            let (response, write) = engine::execute(self, revision, &self.limits, req)?;
            match write {
                None => return Ok(response),
                Some(write) => self.apply(write)?,
            }
            response
        };
        self.db
            .flush()
            .map_err(Self::storage_error("flushing a write to disk"))?;
        Ok(response)
    }

    fn apply(&self, write: WriteSet) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (key, change) in write.changes {
            match change {
                Some(entry) => batch.insert(data_key(&key), entry.encode()),
                None => batch.remove(data_key(&key)),
            }
        }
        batch.insert(REVISION_KEY, &write.revision.to_be_bytes());
        self.tree
            .apply_batch(batch)
            .map_err(Self::storage_error("applying a write batch"))?;
        self.revision.store(write.revision, Ordering::Release);
        Ok(())
    }
}

impl ReadView for SledInner {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        let stored = data_key(key);
        match self
            .tree
            .get(&stored)
            .map_err(Self::storage_error("reading a key"))?
        {
            None => Ok(None),
            Some(bytes) => self.decode(&stored, &bytes).map(Some),
        }
    }

    fn scan<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 'a> {
        let upper = end.map_or_else(|| vec![DATA_PREFIX + 1], data_key);
        Box::new(self.tree.range(data_key(start)..upper).map(move |item| {
            let (stored, bytes) = item.map_err(Self::storage_error("scanning keys"))?;
            let entry = self.decode(&stored, &bytes)?;
            Ok((stored[1..].to_vec(), entry))
        }))
    }
}

#[async_trait]
impl KvBackend for SledKvBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        // sled reads may block on disk and writes fsync: keep both off the reactor.
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || inner.txn_blocking(req))
            .await
            .map_err(|e| Error::TaskJoin(e.to_string()))?
    }
}

// Compile-time reminder that the meta prefix sorts before every data key.
const _: () = assert!(META_PREFIX < DATA_PREFIX);
