//! The log writer thread: makes the driver's log writes durable off its thread, so
//! the driver goes on stepping and replicating while the disk syncs (raft-rs
//! asynchronous ready), and many Readies share one fsync (group commit).
//!
//! The driver writes each Ready's entries and hard state into sled (visible to raft-rs
//! through `LogStore` at once, not yet durable), then queues the Ready's number here.
//! The thread takes every number already queued, fsyncs once if any of them needs it,
//! and reports the highest as persisted (`Command::Persisted`); the driver then tells
//! raft-rs (`on_persist_ready`) and sends the messages that promised durability. A
//! failed fsync stops the thread and is reported (`Command::PersistFailed`): the
//! member then fails stop.

use std::sync::mpsc;
use std::thread::JoinHandle;

use common_meta::Error;

use std::sync::Arc;

use crate::raft::driver::{Command, DriverHandle, StorageWatch};
use crate::raft::log_store::LogStore;

/// One Ready written by the driver, to be made durable.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// The Ready's number (raft-rs `Ready::number`).
    pub number: u64,
    /// Whether it must be fsynced (raft-rs `Ready::must_sync`): false when only the
    /// commit index moved.
    pub must_sync: bool,
}

/// The handle of the writer thread; dropping it ends the thread.
pub struct Persister {
    queue: Option<mpsc::Sender<Written>>,
    thread: Option<JoinHandle<()>>,
}

impl Persister {
    /// Starts the writer of member `id`'s `log`, reporting to `driver`; each fsync is
    /// marked in `watch` for the storage watchdog.
    pub(crate) fn start(
        id: u64,
        log: LogStore,
        driver: DriverHandle,
        watch: Arc<StorageWatch>,
        fsyncs: prometheus::Histogram,
    ) -> Result<Persister, Error> {
        let (queue, written) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("raft-log-{id}"))
            .spawn(move || persist_loop(&log, &written, &driver, &watch, &fsyncs))
            .map_err(|source| Error::Io {
                context: "starting the raft log writer thread".to_string(),
                source,
            })?;
        Ok(Persister {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues a written Ready. Fails only when the thread has stopped.
    pub fn persist(&self, written: Written) -> Result<(), Error> {
        self.queue
            .as_ref()
            .and_then(|q| q.send(written).ok())
            .ok_or_else(|| Error::Unavailable {
                message: "the raft log writer has stopped".to_string(),
            })
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn persist_loop(
    log: &LogStore,
    written: &mpsc::Receiver<Written>,
    driver: &DriverHandle,
    watch: &StorageWatch,
    fsyncs: &prometheus::Histogram,
) {
    while let Ok(first) = written.recv() {
        let mut last = first;
        let mut sync = first.must_sync;
        for more in written.try_iter() {
            last = more;
            sync |= more.must_sync;
        }
        if sync {
            watch.enter();
            let timer = fsyncs.start_timer();
            let flushed = log.flush();
            timer.observe_duration();
            watch.leave();
            if let Err(e) = flushed {
                let _ = driver.send(Command::PersistFailed {
                    reason: e.to_string(),
                });
                return;
            }
        }
        let _ = driver.send(Command::Persisted {
            number: last.number,
        });
    }
}
