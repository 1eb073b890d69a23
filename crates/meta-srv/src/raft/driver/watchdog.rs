//! The storage watchdog: storage work (an fsync, a batch) stuck past `storage_stall`
//! fails the member, since sled can wait forever on a full disk instead of failing.

use super::*;

/// When a thread entered its storage work, for the watchdog (0: not in it).
pub(crate) struct StorageWatch {
    pub(super) origin: Instant,
    pub(super) busy_since_ms: std::sync::atomic::AtomicU64,
    /// Set when the driver thread ends: the watchdog ends too.
    pub(super) done: std::sync::atomic::AtomicBool,
}

impl Default for StorageWatch {
    fn default() -> Self {
        StorageWatch {
            origin: Instant::now(),
            busy_since_ms: Default::default(),
            done: Default::default(),
        }
    }
}

impl StorageWatch {
    /// Marks the start of storage work.
    pub(crate) fn enter(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.busy_since_ms
            .store(now.max(1), std::sync::atomic::Ordering::Release);
    }

    /// Marks its end.
    pub(crate) fn leave(&self) {
        self.busy_since_ms
            .store(0, std::sync::atomic::Ordering::Release);
    }

    /// How long the current storage work has lasted, if any.
    pub(super) fn busy_for(&self) -> Option<Duration> {
        match self
            .busy_since_ms
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            since => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }
}

/// Publishes the member's failure once (the first reason wins) and that it leads no
/// more.
pub(super) fn publish_failure(
    member: u64,
    reason: String,
    leader: &tokio::sync::watch::Sender<Option<u64>>,
    failure: &tokio::sync::watch::Sender<Option<String>>,
) {
    leader.send_replace(None);
    failure.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        tracing::error!(member, %reason, "raft member failed and stops");
        *current = Some(reason);
        true
    });
}

/// Watches the driver's storage work: one that has not returned after `stall` fails the
/// member (the driver thread is stuck and cannot).
pub(super) fn spawn_watchdog(
    member: u64,
    stall: Duration,
    watched: Vec<Arc<StorageWatch>>,
    leader: Arc<tokio::sync::watch::Sender<Option<u64>>>,
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name(format!("raft-watchdog-{member}"))
        .spawn(move || {
            while !watched[0].done.load(std::sync::atomic::Ordering::Acquire) {
                // A periodic check on its own thread, not a synchronisation.
                std::thread::sleep(Duration::from_millis(250));
                if let Some(stuck) = watched.iter().filter_map(|w| w.busy_for()).max()
                    && stuck >= stall
                {
                    let reason = format!(
                        "storage has not completed a write for {}s (a full or broken disk?)",
                        stuck.as_secs()
                    );
                    publish_failure(member, reason, &leader, &failure);
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|source| Error::Io {
            context: "starting the raft watchdog thread".to_string(),
            source,
        })
}
