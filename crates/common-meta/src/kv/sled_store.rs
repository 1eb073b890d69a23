//! `SledKvBackend`: the durable KV store on sled.
//!
//! Layout, all in the one sled tree `kv` so a write is a single atomic sled batch:
//!
//! ```text
//! 0x00 "revision"  -> store revision, i64 big-endian
//! 0x01 {user key}  -> Entry: create_revision, mod_revision, version (i64 BE each), value
//! ```
//!
//! **Writes (group commit):** one committer thread owns every write. It takes the first
//! queued transaction and every other one already waiting (up to [`MAX_GROUP`]), executes
//! them in order, each seeing the writes of those before it, applies all of their
//! changes and the final revision as one sled batch, flushes (fsync) once, and only then
//! answers each writer. So concurrent writers share one fsync, and the number of fsyncs
//! grows with time rather than with the number of writers.
//!
//! **Durability contract:** a write is acknowledged only after `sled::Db::flush` returned
//! for a batch containing it. The batch is atomic: after a crash either all of a group or
//! none of it is there, and the stored revision always matches the stored data. A
//! concurrent reader may observe a group whose flush is still in progress; none of its
//! writers has been acknowledged yet. If the batch or the flush fails, every writer of the
//! group gets the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::engine::{self, Entry, Layered, ReadView, ScanItem};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnOp, TxnRequest, TxnResponse};

const TREE: &str = "kv";
const META_PREFIX: u8 = 0x00;
const DATA_PREFIX: u8 = 0x01;
const REVISION_KEY: &[u8] = b"\x00revision";

/// Most transactions committed in one sled batch and fsync.
pub const MAX_GROUP: usize = 1024;

/// A durable [`KvBackend`] on a sled database in a directory.
#[derive(Clone, Debug)]
pub struct SledKvBackend {
    inner: Arc<SledInner>,
    writer: Arc<Writer>,
}

/// One transaction waiting for the committer, and where its answer goes.
struct WriteJob {
    txn: TxnRequest,
    reply: tokio::sync::oneshot::Sender<Result<TxnResponse>>,
}

/// The handle of the committer thread: dropping the last one closes the queue and waits
/// for the thread, so the database is closed when the backend is gone.
#[derive(Debug)]
struct Writer {
    queue: Option<mpsc::Sender<WriteJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // The thread only ends by its queue closing; a panic in it was already reported.
            let _ = thread.join();
        }
    }
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
        let inner = Arc::new(SledInner {
            db,
            tree,
            lock: RwLock::new(()),
            revision: AtomicI64::new(revision),
            limits,
            path,
        });
        let (queue, jobs) = mpsc::channel();
        let committer = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("sled-committer".to_string())
            .spawn(move || committer.commit_loop(&jobs))
            .map_err(|source| Error::Io {
                context: "starting the sled committer thread".to_string(),
                source,
            })?;
        Ok(SledKvBackend {
            inner,
            writer: Arc::new(Writer {
                queue: Some(queue),
                thread: Some(thread),
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

    /// Serves a read-only transaction under the read lock.
    fn read_blocking(&self, req: TxnRequest) -> Result<TxnResponse> {
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        let revision = self.revision.load(Ordering::Acquire);
        Ok(engine::execute(self, revision, &self.limits, req)?.0)
    }

    /// The committer thread: groups queued writes, one batch and one fsync per group.
    fn commit_loop(&self, jobs: &mpsc::Receiver<WriteJob>) {
        while let Ok(first) = jobs.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match jobs.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
    }

    fn commit_group(&self, group: Vec<WriteJob>) {
        // Only this thread writes, so the state read here cannot change underneath.
        let start_revision = self.revision.load(Ordering::Acquire);
        let mut revision = start_revision;
        let mut changes = BTreeMap::new();
        let mut answers = Vec::with_capacity(group.len());
        for job in group {
            let view = Layered {
                base: self,
                changes: &changes,
            };
            match engine::execute(&view, revision, &self.limits, job.txn) {
                Ok((response, write)) => {
                    if let Some(write) = write {
                        revision = write.revision;
                        changes.extend(write.changes);
                    }
                    answers.push((job.reply, Ok(response)));
                }
                // Refused before it changed anything: answer at once.
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        // Answers that read the group's unflushed writes wait for the flush too.
        let durable = if revision == start_revision {
            Ok(())
        } else {
            self.apply(changes, revision).and_then(|()| {
                self.db
                    .flush()
                    .map(drop)
                    .map_err(Self::storage_error("flushing writes to disk"))
            })
        };
        for (reply, answer) in answers {
            let answer = match &durable {
                Ok(()) => answer,
                Err(e) => Err(e.clone_for_group()),
            };
            // A writer that gave up waiting is not an error of the store.
            let _ = reply.send(answer);
        }
    }

    fn apply(&self, changes: BTreeMap<Vec<u8>, Option<Entry>>, revision: i64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (key, change) in changes {
            match change {
                Some(entry) => batch.insert(data_key(&key), entry.encode()),
                None => batch.remove(data_key(&key)),
            }
        }
        batch.insert(REVISION_KEY, &revision.to_be_bytes());
        // The guard only orders readers against this batch; sled's own state is
        // consistent whatever a panicking holder did, so a poisoned lock is safe to take.
        let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        self.tree
            .apply_batch(batch)
            .map_err(Self::storage_error("applying a write batch"))?;
        self.revision.store(revision, Ordering::Release);
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
        let read_only = req
            .success
            .iter()
            .chain(&req.failure)
            .all(|op| matches!(op, TxnOp::Range(_)));
        if read_only {
            // sled reads may block on disk: keep them off the reactor.
            let inner = Arc::clone(&self.inner);
            return tokio::task::spawn_blocking(move || inner.read_blocking(req))
                .await
                .map_err(|e| Error::TaskJoin(e.to_string()))?;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queue = self
            .writer
            .queue
            .as_ref()
            .ok_or_else(|| Error::TaskJoin("the sled committer has stopped".to_string()))?;
        queue
            .send(WriteJob { txn: req, reply })
            .map_err(|_| Error::TaskJoin("the sled committer has stopped".to_string()))?;
        answer
            .await
            .map_err(|_| Error::TaskJoin("the sled committer dropped a write".to_string()))?
    }
}

// Compile-time reminder that the meta prefix sorts before every data key.
const _: () = assert!(META_PREFIX < DATA_PREFIX);
