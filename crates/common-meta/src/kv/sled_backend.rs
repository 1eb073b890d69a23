//! `SledKvBackend`: a durable single-node [`KvBackend`] over [`SledKvStore`], with group
//! commit.
//!
//! **Writes:** one committer thread owns every write. It takes the first queued
//! transaction and every other one already waiting (up to [`MAX_GROUP`]), commits them as
//! one group ([`SledKvStore::commit`]: in order, each seeing those before it, one sled
//! batch), flushes (fsync) once, and only then answers each writer. So concurrent writers
//! share one fsync, and the number of fsyncs grows with time, not with the writers.
//!
//! **Durability contract:** a write is acknowledged only after the flush of a batch that
//! contains it returned. A concurrent reader may observe a group whose flush is still in
//! progress; none of its writers has been acknowledged yet. If the batch or the flush
//! fails, every writer of the group gets the error.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::limits::KvLimits;
use crate::kv::sled_store::SledKvStore;
use crate::kv::types::{TxnRequest, TxnResponse};

/// Most transactions committed in one sled batch and fsync.
pub const MAX_GROUP: usize = 1024;

/// A durable [`KvBackend`] on a sled database in a directory.
#[derive(Clone, Debug)]
pub struct SledKvBackend {
    store: Arc<SledKvStore>,
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

fn stopped() -> Error {
    Error::TaskJoin("the sled committer has stopped".to_string())
}

impl SledKvBackend {
    /// Opens (or creates) the store in directory `path`.
    pub fn open(path: impl AsRef<Path>, limits: KvLimits) -> Result<Self> {
        let store = Arc::new(SledKvStore::open(path, limits)?);
        let (queue, jobs) = mpsc::channel();
        let committer = Arc::clone(&store);
        let thread = std::thread::Builder::new()
            .name("sled-committer".to_string())
            .spawn(move || commit_loop(&committer, &jobs))
            .map_err(|source| Error::Io {
                context: "starting the sled committer thread".to_string(),
                source,
            })?;
        Ok(SledKvBackend {
            store,
            writer: Arc::new(Writer {
                queue: Some(queue),
                thread: Some(thread),
            }),
        })
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.store.revision()
    }
}

/// The committer thread: groups queued writes, one batch and one fsync per group.
fn commit_loop(store: &SledKvStore, jobs: &mpsc::Receiver<WriteJob>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let (txns, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|job| (job.txn, job.reply)).unzip();
        let committed = store
            .commit(txns)
            .and_then(|answers| store.flush().map(|()| answers));
        match committed {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A writer that gave up waiting is not an error of the store.
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "committing a write group failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone_for_group()));
                }
            }
        }
    }
}

#[async_trait]
impl KvBackend for SledKvBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        if req.is_read_only() {
            // Inline: a read never fsyncs and sled serves it from its page cache; the
            // blocking pool's hand-off costs more than the rare cold read it would hide.
            return self.store.read(req);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queue = self.writer.queue.as_ref().ok_or_else(stopped)?;
        queue
            .send(WriteJob { txn: req, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
