//! The apply thread: applies committed entries to the state machine while the driver
//! goes on stepping, appending and replicating (raft-rs asynchronous ready).
//!
//! The driver hands it each Ready's committed entries in order, with the reply of each
//! entry this member proposed. It takes every job already queued, decodes the entries,
//! applies them in one `SledKvStore::apply_with` batch (skipping any at or below the
//! applied index, so a replay is harmless), answers the proposers, and tells the driver
//! the new applied index (`Command::Applied`), which then advances raft's applied index
//! and serves the reads waiting for it. A storage error stops the thread and is
//! reported (`Command::ApplyFailed`): the member then fails stop.
//!
//! When the thread is idle the driver applies a job itself ([`Applier::idle`],
//! [`apply_jobs`]): under a light load a thread hand-off costs more than the apply.
//!
//! Entries that change the configuration are not sent here: the driver drains this
//! thread ([`Applier::drain`]) and applies them itself, since raft-rs must learn the new
//! configuration on its own thread and the configuration is written in the same batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use common_meta::Error;
use common_meta::kv::{self, Applied, SledKvStore};
use raft::prelude::Entry;

use crate::raft::driver::{Command, DriverHandle, Reply, StorageWatch};

/// Committed entries to apply, each with the reply of its proposer if it was proposed
/// here.
pub struct ApplyJob {
    /// The entries, in log order.
    pub entries: Vec<Entry>,
    /// One slot per entry.
    pub replies: Vec<Option<Reply<Applied>>>,
}

enum Message {
    Job(ApplyJob),
    /// Answered once every job queued before it is applied.
    Drain(mpsc::Sender<()>),
}

/// The handle of the apply thread; dropping it ends the thread after the queued jobs.
pub struct Applier {
    queue: Option<mpsc::Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    /// Jobs queued and not yet applied.
    queued: Arc<AtomicUsize>,
}

impl Applier {
    /// Starts the thread for member `id`; it applies to `store`, reports to `driver`
    /// and marks each batch in `watch` for the storage watchdog.
    pub(crate) fn start(
        id: u64,
        store: Arc<SledKvStore>,
        driver: DriverHandle,
        watch: Arc<StorageWatch>,
        applies: prometheus::Histogram,
    ) -> Result<Applier, Error> {
        let (queue, jobs) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raft-apply-{id}"))
            .spawn(move || apply_loop(&store, &jobs, &driver, &watch, &taken, &applies))
            .map_err(|source| Error::Io {
                context: "starting the raft apply thread".to_string(),
                source,
            })?;
        Ok(Applier {
            queue: Some(queue),
            thread: Some(thread),
            queued,
        })
    }

    /// Queues a job. Fails only when the thread has stopped (after a storage error).
    pub fn apply(&self, job: ApplyJob) -> Result<(), Error> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.queue
            .as_ref()
            .and_then(|q| q.send(Message::Job(job)).ok())
            .ok_or_else(stopped)
    }

    /// True when every job queued so far is applied: the caller may then apply the
    /// next one itself ([`apply_jobs`]) and spare a thread hand-off.
    pub fn idle(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Waits until every job queued so far is applied (before the driver applies a
    /// configuration change or installs a snapshot itself).
    pub fn drain(&self) -> Result<(), Error> {
        let (done, wait) = mpsc::channel();
        self.queue
            .as_ref()
            .and_then(|q| q.send(Message::Drain(done)).ok())
            .ok_or_else(stopped)?;
        wait.recv().map_err(|_| stopped())
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> Error {
    Error::Unavailable {
        message: "the raft apply thread has stopped".to_string(),
    }
}

fn apply_loop(
    store: &SledKvStore,
    jobs: &mpsc::Receiver<Message>,
    driver: &DriverHandle,
    watch: &StorageWatch,
    queued: &AtomicUsize,
    applies: &prometheus::Histogram,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = Vec::new();
        let mut drained = Vec::new();
        let mut next = Some(first);
        // Everything already queued joins one batch (one sled write for all).
        while let Some(message) = next {
            match message {
                Message::Job(job) => batch.push(job),
                Message::Drain(done) => {
                    // Jobs queued after a drain request are not its business, but taking
                    // them now is harmless: the answer goes out after this batch.
                    drained.push(done);
                }
            }
            next = jobs.try_recv().ok();
        }
        if !batch.is_empty() {
            let taken = batch.len();
            watch.enter();
            let applied = apply_jobs(store, batch, applies);
            watch.leave();
            queued.fetch_sub(taken, Ordering::AcqRel);
            match applied {
                Ok(applied) => {
                    let _ = driver.send(Command::Applied { index: applied });
                }
                Err(e) => {
                    let _ = driver.send(Command::ApplyFailed {
                        reason: e.to_string(),
                    });
                    return;
                }
            }
        }
        for done in drained {
            let _ = done.send(());
        }
    }
}

/// Applies the jobs in one batch and answers their proposers; returns the applied index.
pub fn apply_jobs(
    store: &SledKvStore,
    jobs: Vec<ApplyJob>,
    applies: &prometheus::Histogram,
) -> Result<u64, Error> {
    let _timer = applies.start_timer();
    let mut batch = Vec::new();
    let mut replies = Vec::new();
    for job in jobs {
        for (entry, reply) in job.entries.into_iter().zip(job.replies) {
            match kv::Command::decode(&entry.data) {
                Ok(command) => {
                    batch.push((entry.index, command));
                    replies.push(reply);
                }
                Err(e) => {
                    // Deterministic on every member: the entry changes nothing.
                    batch.push((entry.index, kv::Command::Noop));
                    replies.push(None);
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }
    let answers = store.apply(batch)?;
    for (reply, answer) in replies.into_iter().zip(answers) {
        if let (Some(reply), Some(answer)) = (reply, answer) {
            let _ = reply.send(answer);
        }
    }
    Ok(store.applied_index())
}
