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
//! fails, every writer of the group gets the error (an unknown outcome when the flush
//! failed: the group may or may not be on disk).
//!
//! **Fail-stop:** after a failed batch or flush the backend is poisoned: what sled holds
//! in memory may be ahead of the disk, so it answers nothing more (reads included, so
//! that no one sees a write reported failed) and every later call fails as unavailable
//! with the reason. Reopening the directory recovers what is on disk.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::kv::KvBackend;
use crate::kv::command::{Applied, Command};
use crate::kv::lease::{self, LeaseWriter, Lessor, LocalLeases};
use crate::kv::limits::KvLimits;
use crate::kv::sled_store::SledKvStore;
use crate::kv::types::{LeaseGrant, LeaseTimeToLive, TxnRequest, TxnResponse, WatchRequest};
use crate::kv::watch::WatchStream;

/// Most transactions committed in one sled batch and fsync.
pub const MAX_GROUP: usize = 1024;

/// A durable [`KvBackend`] on a sled database in a directory.
#[derive(Clone, Debug)]
pub struct SledKvBackend {
    core: Arc<Core>,
    leases: Arc<LocalLeases>,
}

/// The store, its committer and its health: dropped with the last backend clone (the
/// lease expiry task only holds it weakly).
#[derive(Debug)]
struct Core {
    store: Arc<SledKvStore>,
    writer: Writer,
    health: Arc<Health>,
}

/// Whether the backend may still answer; see "Fail-stop" in the module doc.
#[derive(Debug, Default)]
struct Health {
    poisoned: OnceLock<String>,
    /// Fault injection: the next flush fails.
    #[cfg(any(test, feature = "testing"))]
    fail_next_flush: std::sync::atomic::AtomicBool,
}

impl Health {
    fn check(&self) -> Result<()> {
        match self.poisoned.get() {
            None => Ok(()),
            Some(reason) => Err(Error::Unavailable {
                message: format!(
                    "the store stopped after failing to persist ({reason}); reopen it to recover what is on disk"
                ),
            }),
        }
    }

    fn poison(&self, reason: &Error) {
        let _ = self.poisoned.set(reason.to_string());
    }

    fn flush(&self, store: &SledKvStore) -> Result<()> {
        #[cfg(any(test, feature = "testing"))]
        if self
            .fail_next_flush
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Error::Io {
                context: "flushing writes to disk (injected)".to_string(),
                source: std::io::Error::other("injected fsync failure"),
            });
        }
        store.flush()
    }
}

/// One write (a transaction or a compaction) waiting for the committer, and where its
/// answer goes.
struct WriteJob {
    command: Command,
    reply: tokio::sync::oneshot::Sender<Result<Applied>>,
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
        let health = Arc::new(Health::default());
        let committer_health = Arc::clone(&health);
        let thread = std::thread::Builder::new()
            .name("sled-committer".to_string())
            .spawn(move || commit_loop(&committer, &committer_health, &jobs))
            .map_err(|source| Error::Io {
                context: "starting the sled committer thread".to_string(),
                source,
            })?;
        let core = Arc::new(Core {
            store,
            writer: Writer {
                queue: Some(queue),
                thread: Some(thread),
            },
            health,
        });
        let weak: std::sync::Weak<Core> = Arc::downgrade(&core);
        let leases = Arc::new(LocalLeases::open(&core.store, weak)?);
        Ok(SledKvBackend { core, leases })
    }

    /// Times the leases of this backend.
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.leases.lessor
    }

    fn leased(&self) -> &Core {
        let weak: std::sync::Weak<Core> = Arc::downgrade(&self.core);
        self.leases.start(weak);
        &self.core
    }

    /// Makes the next flush fail as a broken disk's fsync would (fault-injection tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn fail_next_flush(&self) {
        self.core
            .health
            .fail_next_flush
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.core.store.revision()
    }
}

/// The committer thread: groups queued writes, one batch and one fsync per group.
fn commit_loop(store: &SledKvStore, health: &Health, jobs: &mpsc::Receiver<WriteJob>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let (commands, replies): (Vec<_>, Vec<_>) = group
            .into_iter()
            .map(|job| (job.command, job.reply))
            .unzip();
        if let Err(e) = health.check() {
            for reply in replies {
                let _ = reply.send(Err(e.clone_for_group()));
            }
            continue;
        }
        let committed = match store.commit_commands(commands) {
            Ok(answers) => health.flush(store).map(|()| answers).map_err(|e| {
                Error::outcome_unknown(format!("{e}; the write may or may not be on disk"))
            }),
            Err(e) => Err(e),
        };
        match committed {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A writer that gave up waiting is not an error of the store.
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "persisting a write group failed; the store stops answering");
                health.poison(&e);
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
        self.core.health.check()?;
        if req.is_read_only() {
            // Inline: a read never fsyncs and sled serves it from its page cache; the
            // blocking pool's hand-off costs more than the rare cold read it would hide.
            return self.core.store.read(req);
        }
        match self
            .core
            .write(Command::Txn {
                txn: req,
                session: None,
            })
            .await?
        {
            Applied::Txn(response) => Ok(response),
            other => Err(Error::Remote {
                code: "Internal".to_string(),
                message: format!("a transaction was answered {other:?}"),
            }),
        }
    }

    async fn compact(&self, revision: i64) -> Result<i64> {
        self.core.write(Command::Compact { revision }).await?;
        Ok(self.core.store.revision())
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        self.core.health.check()?;
        crate::kv::watch::watch(&self.core.store, req)
    }

    async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        lease::grant(self.leased(), &self.leases.lessor, ttl, id).await
    }

    async fn lease_revoke(&self, id: i64) -> Result<()> {
        lease::revoke(self.leased(), &self.leases.lessor, id).await
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        self.core.health.check()?;
        lease::keep_alive(self.leased(), &self.leases.lessor, id).await
    }

    async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive> {
        self.core.health.check()?;
        lease::time_to_live(&self.leased().store, &self.leases.lessor, id, keys)
    }

    async fn leases(&self) -> Result<Vec<i64>> {
        self.core.health.check()?;
        Ok(self
            .core
            .store
            .leases()?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }
}

#[async_trait]
impl LeaseWriter for Core {
    fn store(&self) -> &SledKvStore {
        &self.store
    }

    /// Hands a write to the committer and waits for its answer (after the fsync).
    async fn write(&self, command: Command) -> Result<Applied> {
        self.health.check()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queue = self.writer.queue.as_ref().ok_or_else(stopped)?;
        queue
            .send(WriteJob { command, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl SledKvBackend {
    /// The store underneath (its history, watchers and leases).
    pub fn store(&self) -> &Arc<SledKvStore> {
        &self.core.store
    }
}
