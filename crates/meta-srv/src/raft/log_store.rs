//! `LogStore`: raft-rs [`Storage`] on sled, in the database the KV state shares.
//!
//! Layout:
//!
//! ```text
//! tree raft_meta: "hard_state" -> HardState   (rust-protobuf encoding)
//!                 "snapshot"   -> SnapshotMetadata of the last compaction point
//!                 "boot"       -> u64 BE, how many times this member has started
//! tree raft_runs: the entries, one key per run of consecutive entries (`runs.rs`)
//! state machine system value "conf_state" -> ConfState (see below)
//! ```
//!
//! The configuration is not the log's: it is the state machine's, as of its applied
//! index. The driver writes it (and the member addresses) in the same atomic batch as
//! the entries it applies (`SledKvStore::apply_with`), so after a crash the
//! configuration, the members, the data, the sessions and the applied index all stand
//! at the same entry, and a replayed configuration change meets the configuration it
//! was made for. (The first data format kept it in `raft_meta`; `open` moves it.)
//!
//! Snapshots are not kept: [`Storage::snapshot`] copies the state machine when raft
//! asks, either inline (on the driver thread, so nothing applies meanwhile) or, once
//! [`LogStore::use_snapshot_files`] was called, as a file built on a thread of its own
//! for the peers that take files (`snapshot.rs`, which also defines the bytes).
//!
//! **Contract (raft-rs `Storage`, and what the driver relies on):**
//! - `entries(low, high)` returns `[low, high)`; `low < first_index()` is
//!   `Compacted`, `high > last_index() + 1` is `Unavailable`.
//! - `term(i)` answers for `i` in `[first_index() - 1, last_index()]`.
//! - [`LogStore::append`] replaces every entry at or after the first appended index (a
//!   conflicting suffix from an old leader) in one atomic batch; [`LogStore::set_hard_state`]
//!   and [`LogStore::set_conf_state`] write in place. None of them flushes: the driver
//!   calls [`LogStore::flush`] once per `Ready`, before sending any message that depends
//!   on the written state and before acknowledging any client.
//! - Reads see writes at once (sled is read-your-writes), flushed or not.

use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use common_meta::kv::{SledKvStore, SystemWrite};
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::raft::members::Members;
use crate::raft::snapshot::{FileRef, SnapshotFiles, read_envelope, snapshot_of, write_envelope};

mod recent;
mod runs;

use recent::Recent;
use runs::Runs;
pub use runs::{decode_run, encode_run};

const META_TREE: &str = "raft_meta";
const HARD_STATE: &[u8] = b"hard_state";
/// The name of the state machine's system value that holds the configuration.
pub const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";
const BOOT: &[u8] = b"boot";

/// Most entries one `Storage::entries` call returns (see there).
pub const MAX_ENTRIES_PER_READ: usize = 256;

/// Raft log storage; cheap to clone (the driver and raft-rs share one).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    meta: sled::Tree,
    runs: Runs,
    /// The state machine and member map, copied into snapshots.
    store: Arc<SledKvStore>,
    members: Arc<Members>,
    /// Cached copies of what is on disk, so raft-rs's frequent calls are cheap.
    state: RwLock<Cached>,
    /// The newest entries, decoded: raft-rs reads back every entry it commits and the
    /// terms of recent ones (with asynchronous ready nothing stays in its own memory),
    /// and a restarted follower's catch-up reads recent entries again and again.
    recent: RwLock<Recent>,
    /// Where snapshots are built and received as files, when they are.
    files: OnceLock<Arc<SnapshotFiles>>,
}

#[derive(Clone, Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    last_index: u64,
}

fn other(context: &str, e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(
        format!("raft log store: {context}: {e}").into(),
    ))
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> raft::Result<M> {
    M::parse_from_bytes(bytes).map_err(|e| other(&format!("decoding {what}"), e))
}

fn encode<M: protobuf::Message>(what: &str, message: &M) -> raft::Result<Vec<u8>> {
    message
        .write_to_bytes()
        .map_err(|e| other(&format!("encoding {what}"), e))
}

impl LogStore {
    /// Opens the log in `db` (creating its trees on first use); snapshots copy `store`
    /// and `members`.
    pub fn open(
        db: sled::Db,
        store: Arc<SledKvStore>,
        members: Arc<Members>,
    ) -> raft::Result<LogStore> {
        let meta = db
            .open_tree(META_TREE)
            .map_err(|e| other("opening tree", e))?;
        let read = |key: &[u8]| meta.get(key).map_err(|e| other("reading metadata", e));
        let hard_state = match read(HARD_STATE)? {
            Some(bytes) => decode("hard state", &bytes)?,
            None => HardState::default(),
        };
        let conf_state = match store
            .system(CONF_STATE)
            .map_err(|e| other("reading the configuration", e))?
        {
            Some(bytes) => decode("conf state", &bytes)?,
            None => match read(CONF_STATE)? {
                Some(bytes) => {
                    tracing::info!(
                        "data format migration: the configuration moves into the state machine"
                    );
                    store
                        .write_system(vec![(CONF_STATE.to_vec(), Some(bytes.to_vec()))])
                        .map_err(|e| other("migrating the configuration", e))?;
                    meta.remove(CONF_STATE)
                        .map_err(|e| other("migrating the configuration", e))?;
                    decode("conf state", &bytes)?
                }
                None => ConfState::default(),
            },
        };
        let snapshot = match read(SNAPSHOT)? {
            Some(bytes) => decode("snapshot metadata", &bytes)?,
            None => SnapshotMetadata::default(),
        };
        // Entries at or below the snapshot index can survive a crash during a snapshot
        // install (see apply_snapshot): they are dead, and removed here.
        let (runs, last_index) = Runs::open(&db, snapshot.index)?;
        Ok(LogStore {
            inner: Arc::new(Inner {
                meta,
                runs,
                store,
                members,
                state: RwLock::new(Cached {
                    hard_state,
                    conf_state,
                    snapshot,
                    last_index,
                }),
                recent: RwLock::default(),
                files: OnceLock::new(),
            }),
        })
    }

    fn cached(&self) -> Cached {
        // Every writer replaces whole fields after its sled write succeeded, so a
        // poisoned lock still holds a consistent copy.
        self.inner
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the cache without copying all of it (raft-rs calls these often).
    fn read<T>(&self, read: impl FnOnce(&Cached) -> T) -> T {
        read(
            &self
                .inner
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn recent(&self) -> std::sync::RwLockReadGuard<'_, Recent> {
        // Written only by whole-entry pushes and pops: a poisoned lock is still whole.
        self.inner
            .recent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn recent_mut(&self) -> std::sync::RwLockWriteGuard<'_, Recent> {
        self.inner
            .recent
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Cached)) {
        change(
            &mut self
                .inner
                .state
                .write()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }

    /// From now on, snapshots for the members `files` streams to are built and sent as
    /// files (see `snapshot.rs`); set once, at start.
    pub fn use_snapshot_files(&self, files: Arc<SnapshotFiles>) {
        let _ = self.inner.files.set(files);
    }

    /// The index of a snapshot file lately given to raft-rs, whose following entries
    /// the log should keep (see `SnapshotFiles::in_use`).
    pub fn snapshot_in_use(&self) -> Option<u64> {
        self.inner.files.get().and_then(|files| files.in_use())
    }

    /// True when this member has never been initialised (no conf state, no log).
    pub fn is_empty(&self) -> bool {
        let c = self.cached();
        c.conf_state.voters.is_empty() && c.conf_state.learners.is_empty() && c.last_index == 0
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.read(|c| c.hard_state.clone())
    }

    /// The commit index of the hard state written so far.
    pub fn commit(&self) -> u64 {
        self.read(|c| c.hard_state.commit)
    }

    /// The persisted configuration.
    pub fn conf_state(&self) -> ConfState {
        self.read(|c| c.conf_state.clone())
    }

    /// Appends `entries`, first removing every stored entry at or after `entries[0].index`.
    pub fn append(&self, entries: &[Entry]) -> raft::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let cached = self.cached();
        if first.index <= cached.snapshot.index || first.index > cached.last_index + 1 {
            return Err(other(
                "append",
                format!(
                    "entries from {} do not follow the log ({}..={})",
                    first.index,
                    cached.snapshot.index + 1,
                    cached.last_index
                ),
            ));
        }
        self.inner.runs.append(entries)?;
        let last = entries[entries.len() - 1].index;
        self.update(|c| c.last_index = last);
        self.recent_mut().append(entries);
        Ok(())
    }

    /// Stores the hard state.
    pub fn set_hard_state(&self, hard_state: &HardState) -> raft::Result<()> {
        self.inner
            .meta
            .insert(HARD_STATE, encode("hard state", hard_state)?)
            .map_err(|e| other("writing hard state", e))?;
        let hard_state = hard_state.clone();
        self.update(|c| c.hard_state = hard_state);
        Ok(())
    }

    /// Stores a new commit index in the hard state.
    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        let mut hard_state = self.hard_state();
        hard_state.commit = commit;
        self.set_hard_state(&hard_state)
    }

    /// Stores the configuration on its own (bootstrap; applied changes go through
    /// [`LogStore::conf_state_write`] instead).
    pub fn set_conf_state(&self, conf_state: &ConfState) -> raft::Result<()> {
        self.inner
            .store
            .write_system(vec![Self::conf_state_write(conf_state)?])
            .map_err(|e| other("writing conf state", e))?;
        self.conf_state_changed(conf_state.clone());
        Ok(())
    }

    /// The system write that records `conf_state`, for the batch of the entry that
    /// changed it; then call [`LogStore::conf_state_changed`].
    pub fn conf_state_write(conf_state: &ConfState) -> raft::Result<SystemWrite> {
        Ok((CONF_STATE.to_vec(), Some(encode("conf state", conf_state)?)))
    }

    /// Updates the cached configuration once its write is persisted.
    pub fn conf_state_changed(&self, conf_state: ConfState) {
        self.update(|c| c.conf_state = conf_state);
    }

    /// Counts a start of this member and returns the new count (flushed before it
    /// returns): proposal ids are made from it, so an entry proposed before a restart
    /// never answers a proposal made after it, whatever the clock does.
    pub fn next_boot(&self) -> raft::Result<u64> {
        let previous = match self
            .inner
            .meta
            .get(BOOT)
            .map_err(|e| other("reading the boot counter", e))?
        {
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| other("reading the boot counter", "not 8 bytes"))?,
            None => 0,
        };
        let boot = previous + 1;
        self.inner
            .meta
            .insert(BOOT, &boot.to_be_bytes())
            .map_err(|e| other("writing the boot counter", e))?;
        self.flush()?;
        Ok(boot)
    }

    /// Index of the first entry still in the log.
    pub fn first_index_now(&self) -> u64 {
        self.read(|c| c.snapshot.index + 1)
    }

    /// Drops every entry up to and including `index` (which the state machine must have
    /// applied), remembering its term as the compaction point. Not flushed.
    pub fn compact(&self, index: u64) -> raft::Result<()> {
        let cached = self.cached();
        if index <= cached.snapshot.index {
            return Ok(());
        }
        if index > cached.last_index || index > self.inner.store.applied_index() {
            return Err(other(
                "compact",
                format!("index {index} is not applied or not in the log"),
            ));
        }
        let mut metadata = SnapshotMetadata {
            index,
            term: self.term(index)?,
            ..Default::default()
        };
        metadata.set_conf_state(cached.conf_state.clone());
        self.inner
            .meta
            .insert(SNAPSHOT, encode("snapshot metadata", &metadata)?)
            .map_err(|e| other("writing the compaction point", e))?;
        self.inner.runs.remove_through(index)?;
        self.recent_mut().compact(index);
        self.update(|c| c.snapshot = metadata);
        Ok(())
    }

    /// Installs a snapshot from the leader: state machine, members, configuration, and a
    /// log that now starts after the snapshot. Not flushed.
    ///
    /// Crash safety (sled recovers a prefix of writes): the state machine goes first
    /// (one atomic batch, with the configuration and member map it holds; a crash after
    /// it only leaves the state machine ahead of a log that replays as skipped entries),
    /// then snapshot metadata and hard state in one batch of the meta tree, then the
    /// stale entries are removed (a crash
    /// before that leaves entries at or below the snapshot index, which `open` ignores).
    pub fn apply_snapshot(&self, snapshot: &Snapshot) -> raft::Result<()> {
        let data = snapshot.get_data();
        let installing = |e: common_meta::Error| other("installing a snapshot", e);
        let members = match FileRef::decode(data) {
            Some(file) => {
                let opened = std::fs::File::open(&file.path).map_err(|e| {
                    other(
                        "installing a snapshot",
                        format!("{}: {e}", file.path.display()),
                    )
                })?;
                let mut input = std::io::BufReader::with_capacity(1 << 20, opened);
                let members = read_envelope(&mut input, &self.inner.store).map_err(installing)?;
                // Received for this install only: the leader sends a new one if needed.
                let _ = std::fs::remove_file(&file.path);
                if let Some(files) = self.inner.files.get() {
                    files.installed(snapshot.get_metadata().index);
                }
                members
            }
            None => read_envelope(&mut &data[..], &self.inner.store).map_err(installing)?,
        };
        // The store brought the persisted member map and configuration with it.
        self.inner.members.replace_all(members);

        let metadata = snapshot.get_metadata().clone();
        let cached = self.cached();
        let mut hard_state = cached.hard_state.clone();
        hard_state.term = hard_state.term.max(metadata.term);
        hard_state.commit = hard_state.commit.max(metadata.index);
        let conf_state = metadata.get_conf_state().clone();
        let mut meta = sled::Batch::default();
        meta.insert(SNAPSHOT, encode("snapshot metadata", &metadata)?);
        meta.insert(HARD_STATE, encode("hard state", &hard_state)?);
        self.inner
            .meta
            .apply_batch(meta)
            .map_err(|e| other("writing snapshot metadata", e))?;

        self.inner.runs.clear()?;
        self.recent_mut().clear();
        self.update(|c| {
            c.last_index = metadata.index;
            c.snapshot = metadata;
            c.conf_state = conf_state;
            c.hard_state = hard_state;
        });
        Ok(())
    }

    /// Makes every write so far durable (the shared database, synced).
    pub fn flush(&self) -> raft::Result<()> {
        // The log and the state machine share the database: the store's flush is the
        // database's, made durable (see `SledKvStore::flush`).
        self.inner.store.flush().map_err(|e| other("flushing", e))
    }

    fn entry(&self, index: u64) -> raft::Result<Entry> {
        self.inner.runs.entry(index)
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.cached();
        Ok(RaftState {
            hard_state: c.hard_state,
            conf_state: c.conf_state,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let (snapshot_index, last_index) = self.read(|c| (c.snapshot.index, c.last_index));
        if low <= snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        // Stop reading at `max_size` (always at least one entry, as raft-rs's
        // `limit_size`) and at MAX_ENTRIES_PER_READ: raft-rs asks again for a lagging
        // follower at every heartbeat response while it probes (and every linearizable
        // read round sends heartbeats), so one call must stay cheap. Decoding a whole
        // backlog per call stalled every client while a restarted member caught up.
        // Returning fewer entries than asked is allowed: raft sends what it got.
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut size = 0u64;
        // Whether to add `entry` after `kept` others (the first is added regardless).
        let mut keep = |kept: usize, entry: &Entry| {
            size = size.saturating_add(u64::from(protobuf::Message::compute_size(entry)));
            size <= max_size && kept < MAX_ENTRIES_PER_READ
        };
        {
            let recent = self.recent();
            if recent.first_index().is_some_and(|first| first <= low) {
                let mut entries = Vec::new();
                for index in low..high {
                    let Some(entry) = recent.get(index) else {
                        break;
                    };
                    if !keep(entries.len(), entry) && !entries.is_empty() {
                        break;
                    }
                    entries.push(entry.clone());
                }
                if !entries.is_empty() {
                    return Ok(entries);
                }
            }
        }
        self.inner
            .runs
            .read(low, high, |kept, entry| keep(kept.len(), entry))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snapshot_index, snapshot_term, last_index) =
            self.read(|c| (c.snapshot.index, c.snapshot.term, c.last_index));
        if idx == snapshot_index {
            return Ok(snapshot_term);
        }
        if idx < snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some(entry) = self.recent().get(idx) {
            return Ok(entry.term);
        }
        Ok(self.entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read(|c| c.snapshot.index + 1))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read(|c| c.last_index))
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if let Some(files) = self.inner.files.get()
            && files.streams_to(to)
        {
            return files.snapshot(self, request_index);
        }
        // Inline: copied here, on the driver thread, so nothing applies meanwhile and
        // the cached configuration is the copy's.
        let copy = self
            .inner
            .store
            .copy()
            .map_err(|e| other("copying the state machine", e))?;
        let applied = copy.applied();
        if applied < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut data = Vec::new();
        write_envelope(&mut data, &self.inner.members.all(), &copy)
            .map_err(|e| other("copying the state machine", e))?;
        Ok(snapshot_of(
            data,
            applied,
            self.term(applied)?,
            self.cached().conf_state,
        ))
    }
}

#[cfg(test)]
mod tests;
