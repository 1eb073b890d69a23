//! `SledKvStore`: the KV state on sled — data, store revision and the index of the last
//! applied replicated entry — shared by `SledKvBackend` (single node, group commit) and
//! meta-srv's raft state machine.
//!
//! Layout, all in the one sled tree `kv` so every change is a single atomic sled batch:
//!
//! ```text
//! 0x00 "revision"  -> store revision, i64 big-endian
//! 0x00 "applied"   -> index of the last applied raft entry, u64 big-endian (raft only)
//! 0x01 {user key}  -> Entry: create_revision, mod_revision, version (i64 BE each), value
//! 0x02 {id u64 BE}  -> meta.v1.SessionRecord of an open client session (raft only)
//! 0x03 {name}       -> a system value the replication layer keeps with the state
//!                      machine (its configuration, member addresses, boot counter);
//!                      opaque here
//! 0x00 "compacted" -> the compacted revision, i64 BE; 0x00 "swept": how far its sweep got
//! 0x00 "auth"      -> the auth state (users, roles, on or off), JSON (`crate::auth`)
//! 0x04, 0x05        -> the revision history (see `history.rs`)
//! ```
//!
//! Every write also records its changes in the history and, once its batch is applied,
//! hands them to the store's watchers ([`crate::kv::watch`]).
//!
//! Client sessions make writes exactly-once: a [`Command::Txn`] naming a session whose
//! answer for that seq is kept is answered with it and applies nothing; otherwise it
//! applies and its answer is kept, in the same batch as its data, until the client
//! acknowledges it (`SessionRef::acked`). A write naming a session that is not open is
//! refused ([`Error::SessionExpired`]). Every decision depends only on the store and the
//! command, never on a clock, so every member decides alike.
//!
//! **Contract:** [`SledKvStore::apply`] and [`SledKvStore::commit`] write a group of
//! transactions, the new revision, the sessions and system values they change and (for
//! raft) the applied index in one batch: after a crash either the whole group or none
//! of it is there, so a replayed raft entry is recognised by its index and skipped, and
//! a configuration change is never replayed onto a configuration that already holds it. Neither flushes: durability is the caller's
//! ([`SledKvStore::flush`] for a single node, the raft log for a replicated one).
//! Only one thread may write at a time (the committer, or the raft driver); readers may
//! run concurrently and see either all or none of a group.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use meta_proto::v1 as pb;
use prost::Message as _;

use crate::auth::AuthState;
use crate::error::{Error, Result};
use crate::kv::command::{Applied, Command};
use crate::kv::engine::{self, Entry, ReadView, ScanItem};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnRequest, TxnResponse};

mod copy;
mod group;
mod history;
mod lease;

pub use copy::StoreCopy;
use group::{Group, decode_session};
pub(crate) use history::Change;
pub(crate) use history::{AtRevision, check_readable};

const TREE: &str = "kv";
const META_PREFIX: u8 = 0x00;
const DATA_PREFIX: u8 = 0x01;
const SESSION_PREFIX: u8 = 0x02;
const SYSTEM_PREFIX: u8 = 0x03;

/// A change of a system value: `(name, Some(value))` sets it, `(name, None)` removes it.
pub type SystemWrite = (Vec<u8>, Option<Vec<u8>>);

fn system_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(SYSTEM_PREFIX);
    key.extend_from_slice(name);
    key
}
const REVISION_KEY: &[u8] = b"\x00revision";
const APPLIED_KEY: &[u8] = b"\x00applied";
const AUTH_KEY: &[u8] = b"\x00auth";

// The meta keys sort before every data key and the session records after them, so data
// scans (which end at DATA_PREFIX + 1) never meet either.
const _: () = assert!(
    META_PREFIX < DATA_PREFIX
        && DATA_PREFIX + 1 == SESSION_PREFIX
        && SESSION_PREFIX < SYSTEM_PREFIX
);

/// Most answers one session keeps unacknowledged; a write beyond it is refused until the
/// client acknowledges some (a client that never acknowledges must not grow a record
/// without bound).
pub const MAX_UNACKED_ANSWERS: usize = 4096;

/// The KV state machine's storage on sled; see the module doc for its contract.
#[derive(Debug)]
pub struct SledKvStore {
    db: sled::Db,
    tree: sled::Tree,
    /// Taken exclusively to apply a batch, shared by readers, so a read sees a whole group.
    lock: RwLock<()>,
    revision: AtomicI64,
    applied: AtomicU64,
    limits: KvLimits,
    /// The database's directory, whose filesystem [`SledKvStore::flush`] syncs.
    durable: OnceLock<std::fs::File>,
    /// How many [`SledKvStore::copy`] calls are gathering the store (writers wait).
    copying: std::sync::atomic::AtomicUsize,
    /// The compacted revision (reads below it fail).
    compacted: AtomicI64,
    /// The watchers this store's writes are handed to.
    hub: crate::kv::watch::WatchHub,
    /// The auth state as last applied (readers take the `Arc` and let go of the lock).
    auth: RwLock<Arc<AuthState>>,
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 1);
    out.push(DATA_PREFIX);
    out.extend_from_slice(key);
    out
}

fn session_key(id: u64) -> [u8; 9] {
    let mut key = [SESSION_PREFIX; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

fn storage_error(context: &str) -> impl FnOnce(sled::Error) -> Error + '_ {
    move |source| Error::Storage {
        context: context.to_string(),
        source,
    }
}

impl SledKvStore {
    /// Opens (or creates) a sled database in directory `path` holding only this store.
    pub fn open(path: impl AsRef<Path>, limits: KvLimits) -> Result<Self> {
        let path = path.as_ref();
        // A handle of this process that was just dropped releases sled's file lock from
        // a background thread a moment later: wait for that, briefly. (Another process
        // holding the directory is refused after the wait.)
        let patience = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            // No background flusher: it only logs a failed sync (a later flush may then
            // succeed over lost pages); the caller's flushes, which fail stop, do the
            // syncing.
            match sled::Config::new().path(path).flush_every_ms(None).open() {
                Ok(db) => break db,
                Err(source)
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < patience =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(Error::Storage {
                        context: format!("opening sled database at {}", path.display()),
                        source,
                    });
                }
            }
        };
        let store = Self::open_in(db, limits)?;
        store.sync_filesystem_of(path)?;
        Ok(store)
    }

    /// From now on [`SledKvStore::flush`] also syncs the filesystem of `dir` (the
    /// database's directory); see there.
    pub fn sync_filesystem_of(&self, dir: &Path) -> Result<()> {
        let handle = std::fs::File::open(dir).map_err(|source| Error::Io {
            context: format!("opening {}", dir.display()),
            source,
        })?;
        let _ = self.durable.set(handle);
        Ok(())
    }

    /// Opens (or creates) the store inside an open database that other trees share (the
    /// raft log), so one flush makes both durable.
    pub fn open_in(db: sled::Db, limits: KvLimits) -> Result<Self> {
        let tree = db
            .open_tree(TREE)
            .map_err(storage_error("opening tree kv"))?;
        let read_u64 = |key: &[u8], name: &str| -> Result<u64> {
            match tree
                .get(key)
                .map_err(storage_error("reading store metadata"))?
            {
                None => Ok(0),
                Some(bytes) => {
                    let bytes: [u8; 8] =
                        bytes.as_ref().try_into().map_err(|_| Error::Corrupted {
                            location: format!("tree {TREE} key {name}"),
                            reason: format!("expected 8 bytes, found {}", bytes.len()),
                        })?;
                    Ok(u64::from_be_bytes(bytes))
                }
            }
        };
        let revision = read_u64(REVISION_KEY, "revision")? as i64;
        let applied = read_u64(APPLIED_KEY, "applied")?;
        let compacted = read_u64(history::COMPACTED_KEY, "compacted")? as i64;
        let store = SledKvStore {
            db,
            tree,
            lock: RwLock::new(()),
            revision: AtomicI64::new(revision),
            applied: AtomicU64::new(applied),
            limits,
            durable: OnceLock::new(),
            copying: std::sync::atomic::AtomicUsize::new(0),
            compacted: AtomicI64::new(compacted),
            hub: crate::kv::watch::WatchHub::new(revision),
            auth: RwLock::new(Arc::default()),
        };
        store.load_auth()?;
        store.start_history()?;
        // A crash between a compaction and its sweep: finish the sweep.
        if store.read_i64(history::SWEPT_KEY)? < compacted {
            store.sweep(compacted)?;
        }
        Ok(store)
    }

    /// Reads the stored auth state into memory (at open, after a snapshot is installed).
    fn load_auth(&self) -> Result<()> {
        let state = match self
            .tree
            .get(AUTH_KEY)
            .map_err(storage_error("reading the auth state"))?
        {
            None => AuthState::default(),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupted {
                location: format!("tree {TREE} key auth"),
                reason: e.to_string(),
            })?,
        };
        *self.auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(state);
        Ok(())
    }

    /// The auth state as of the last applied write.
    pub fn auth(&self) -> Arc<AuthState> {
        // Only ever replaced whole: a poisoned lock still holds a consistent state.
        self.auth
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// An i64 kept under a meta key (0 when absent).
    fn read_i64(&self, key: &[u8]) -> Result<i64> {
        match self
            .tree
            .get(key)
            .map_err(storage_error("reading store metadata"))?
        {
            None => Ok(0),
            Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
                .map(i64::from_be_bytes)
                .map_err(|_| Error::Corrupted {
                    location: format!("tree {TREE} key {key:?}"),
                    reason: format!("expected 8 bytes, found {}", bytes.len()),
                }),
        }
    }

    /// The registry of this store's watchers.
    pub fn hub(&self) -> &crate::kv::watch::WatchHub {
        &self.hub
    }

    /// How many keys the store holds now (a scan of the data: O(n), for metrics
    /// scrapes and status, not for request paths).
    pub fn key_count(&self) -> usize {
        self.tree.scan_prefix([DATA_PREFIX]).count()
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Index of the last applied raft entry (0 when never used by raft).
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The limits every transaction is checked against.
    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// The database, for callers that share it.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Serves a read-only transaction; refuses one that would write. Blocking.
    pub fn read(&self, txn: TxnRequest) -> Result<TxnResponse> {
        if !txn.is_read_only() {
            return Err(Error::invalid_argument(
                "a read was given a transaction that writes",
            ));
        }
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        Ok(engine::execute(self, self.revision(), &self.limits, txn)?.0)
    }

    /// Executes `txns` in order, each seeing the writes of those before it, and writes
    /// all their changes and the new revision in one batch. Not flushed.
    ///
    /// The outer `Err` is a storage failure of the batch: nothing of the group was
    /// written. An inner `Err` is that transaction's own refusal (limits, bad request).
    pub fn commit(&self, txns: Vec<TxnRequest>) -> Result<Vec<Result<TxnResponse>>> {
        let commands = txns
            .into_iter()
            .map(|txn| Command::Txn { txn, session: None })
            .collect();
        Ok(self
            .commit_commands(commands)?
            .into_iter()
            .map(|answer| match answer? {
                Applied::Txn(response) => Ok(response),
                other => Err(Error::Remote {
                    code: "Internal".to_string(),
                    message: format!("a transaction was answered {other:?}"),
                }),
            })
            .collect())
    }

    /// [`SledKvStore::commit`] for any commands a single node runs (transactions and
    /// compactions; sessions exist only in a replicated store).
    pub fn commit_commands(&self, commands: Vec<Command>) -> Result<Vec<Result<Applied>>> {
        let commands = commands.into_iter().map(|c| (0, c)).collect();
        self.write_group(commands, Vec::new(), None)
    }

    /// Checks a transaction against this store's limits, as [`SledKvStore::commit`]
    /// would; a replicated write calls it before proposing.
    pub fn check(&self, txn: &TxnRequest) -> Result<()> {
        self.limits.check_txn(txn)
    }

    /// Applies committed raft entries `(index, command)` in order. Entries at or below the
    /// applied index were applied before a crash and are skipped: their answer is `None`.
    /// The group, the new revision and the last index are written in one batch. Not
    /// flushed: the raft log makes the entries durable.
    ///
    /// Determinism: limits are not checked here (the proposer checked them with
    /// [`SledKvStore::check`]), so every member applies an entry the same way whatever
    /// its own configuration; a storage error fails the whole call instead of becoming
    /// one command's answer.
    pub fn apply(&self, entries: Vec<(u64, Command)>) -> Result<Vec<Option<Result<Applied>>>> {
        self.apply_with(entries, Vec::new())
    }

    /// [`SledKvStore::apply`], also writing `system` changes in the same batch (the
    /// replication layer's configuration as of the last entry), unless every entry was
    /// applied before (then they were written with it).
    pub fn apply_with(
        &self,
        entries: Vec<(u64, Command)>,
        system: Vec<SystemWrite>,
    ) -> Result<Vec<Option<Result<Applied>>>> {
        let applied = self.applied_index();
        let last = entries.iter().map(|(i, _)| *i).max().unwrap_or(applied);
        let mut skipped = Vec::with_capacity(entries.len());
        let mut fresh = Vec::with_capacity(entries.len());
        for (index, command) in entries {
            skipped.push(index <= applied);
            if index > applied {
                fresh.push((index, command));
            }
        }
        let system = if last > applied { system } else { Vec::new() };
        let mut answers = self
            .write_group(fresh, system, (last > applied).then_some(last))?
            .into_iter();
        Ok(skipped
            .into_iter()
            .map(|skip| if skip { None } else { answers.next() })
            .collect())
    }

    /// The system value `name`, if set.
    pub fn system(&self, name: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .tree
            .get(system_key(name))
            .map_err(storage_error("reading a system value"))?
            .map(|v| v.to_vec()))
    }

    /// Every system value whose name starts with `prefix`, as `(name, value)`.
    pub fn system_scan(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(system_key(prefix)) {
            let (key, value) = item.map_err(storage_error("reading system values"))?;
            out.push((key[1..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Writes system values in one batch, outside any apply (bootstrap, migrations, the
    /// boot counter). Not flushed.
    pub fn write_system(&self, writes: Vec<SystemWrite>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (name, value) in writes {
            match value {
                Some(value) => batch.insert(system_key(&name), value),
                None => batch.remove(system_key(&name)),
            }
        }
        let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        self.tree
            .apply_batch(batch)
            .map_err(storage_error("writing system values"))
    }

    /// Every open session with its TTL, by id.
    pub fn sessions(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([SESSION_PREFIX]) {
            let (key, value) = item.map_err(storage_error("listing sessions"))?;
            let id = <[u8; 8]>::try_from(&key[1..])
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Corrupted {
                    location: format!("tree {TREE} session key {key:?}"),
                    reason: "not 8 bytes of id".to_string(),
                })?;
            out.push((id, decode_session(id, &value)?.ttl_ms));
        }
        Ok(out)
    }

    /// The user that opened session `id` (empty: none), if it is open.
    pub fn session_owner(&self, id: u64) -> Result<Option<String>> {
        Ok(self.load_session(id)?.map(|record| record.owner))
    }

    /// The TTL of session `id` if it is open.
    pub fn session_ttl(&self, id: u64) -> Result<Option<u64>> {
        Ok(self.load_session(id)?.map(|record| record.ttl_ms))
    }

    fn load_session(&self, id: u64) -> Result<Option<pb::SessionRecord>> {
        match self
            .tree
            .get(session_key(id))
            .map_err(storage_error("reading a session"))?
        {
            None => Ok(None),
            Some(bytes) => decode_session(id, &bytes).map(Some),
        }
    }

    /// Executes a group of commands (`(entry index, command)`; the index is 0 outside
    /// raft) and writes all their changes, the new revision and, for raft, the applied
    /// index in one batch.
    fn write_group(
        &self,
        commands: Vec<(u64, Command)>,
        system: Vec<SystemWrite>,
        applied: Option<u64>,
    ) -> Result<Vec<Result<Applied>>> {
        // Only one writer at a time (see the module doc): the state read here is stable.
        let limits = if applied.is_some() {
            KvLimits::unlimited()
        } else {
            self.limits
        };
        let start = self.revision();
        let mut group = Group {
            store: self,
            limits,
            start,
            revision: start,
            changes: BTreeMap::new(),
            history: Vec::new(),
            compact: None,
            leases: BTreeMap::new(),
            sessions: BTreeMap::new(),
            auth: None,
        };
        let mut answers = Vec::with_capacity(commands.len());
        for (index, command) in commands {
            answers.push(group.run(index, command)?);
        }
        let Group {
            revision,
            changes,
            history,
            compact,
            leases,
            sessions,
            auth,
            ..
        } = group;
        if revision == start
            && auth.is_none()
            && applied.is_none()
            && sessions.is_empty()
            && system.is_empty()
            && compact.is_none()
            && leases.is_empty()
        {
            return Ok(answers);
        }
        let mut batch = sled::Batch::default();
        // Each changed key as it was before the group: for its lease and its history.
        let mut before = BTreeMap::new();
        for key in changes.keys() {
            before.insert(key.clone(), ReadView::get(self, key)?);
        }
        lease::record_attachments(&mut batch, &changes, &before);
        history::record(&mut batch, &history, &changes, &before);
        for (id, record) in leases {
            match record {
                Some(record) => batch.insert(&lease::lease_key(id), record.encode_to_vec()),
                None => batch.remove(&lease::lease_key(id)),
            }
        }
        for (key, change) in changes {
            match change {
                Some(entry) => batch.insert(data_key(&key), entry.encode()),
                None => batch.remove(data_key(&key)),
            }
        }
        if let Some(compact) = compact {
            batch.insert(history::COMPACTED_KEY, &compact.to_be_bytes());
        }
        for (id, record) in sessions {
            match record {
                Some(record) => batch.insert(&session_key(id), record.encode_to_vec()),
                None => batch.remove(&session_key(id)),
            }
        }
        for (name, value) in system {
            match value {
                Some(value) => batch.insert(system_key(&name), value),
                None => batch.remove(system_key(&name)),
            }
        }
        if let Some(auth) = &auth {
            let json = serde_json::to_vec(auth)
                .unwrap_or_else(|_| unreachable!("an AuthState always encodes as JSON"));
            batch.insert(AUTH_KEY, json);
        }
        batch.insert(REVISION_KEY, &revision.to_be_bytes());
        if let Some(applied) = applied {
            batch.insert(APPLIED_KEY, &applied.to_be_bytes());
        }
        {
            // The guard only orders readers against this batch; sled's own state is
            // consistent whatever a panicking holder did, so a poisoned lock is safe to
            // take.
            let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
            self.tree
                .apply_batch(batch)
                .map_err(storage_error("applying a write batch"))?;
            self.revision.store(revision, Ordering::Release);
            if let Some(compact) = compact {
                self.compacted.store(compact, Ordering::Release);
            }
            if let Some(applied) = applied {
                self.applied.store(applied, Ordering::Release);
            }
            if let Some(auth) = auth {
                *self.auth.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(auth);
            }
        }
        if revision > start {
            let published = history
                .into_iter()
                .flat_map(|(revision, changes)| {
                    changes.into_iter().map(move |(key, entry)| Change {
                        revision,
                        key,
                        entry,
                    })
                })
                .collect();
            self.hub.publish(revision, Some(published));
        }
        if let Some(compact) = compact {
            self.sweep(compact)?;
        }
        Ok(answers)
    }

    /// Makes everything written so far durable: sled's flush, then a `syncfs` of the
    /// database's filesystem (once [`SledKvStore::sync_filesystem_of`] named it).
    ///
    /// sled's flush alone survives a crash of the process, not a power loss: on Linux it
    /// ends in `sync_file_range`, which neither flushes the device's write cache nor the
    /// file's metadata, and it never syncs the files it keeps large values in (blobs).
    /// `syncfs` does all three.
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map_err(storage_error("flushing writes to disk"))?;
        if let Some(dir) = self.durable.get() {
            rustix::fs::syncfs(dir).map_err(|errno| Error::Io {
                context: "syncing the database's filesystem".to_string(),
                source: errno.into(),
            })?;
        }
        Ok(())
    }

    fn decode(&self, stored_key: &[u8], bytes: &[u8]) -> Result<Entry> {
        Entry::decode(bytes).map_err(|reason| Error::Corrupted {
            location: format!(
                "tree {TREE} key {:?}",
                String::from_utf8_lossy(&stored_key[1..])
            ),
            reason,
        })
    }
}

impl SledKvStore {
    /// The store as of `revision` (checked against the current and compacted
    /// revisions).
    pub(crate) fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        check_readable(revision, self.revision(), self.compacted())?;
        if revision == self.revision() {
            return Ok(Box::new(self));
        }
        Ok(Box::new(AtRevision {
            store: self,
            revision,
        }))
    }
}

impl ReadView for &SledKvStore {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        (**self).lease_exists(id)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        (**self).get(key)
    }

    fn scan<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 'a> {
        (**self).scan(start, end)
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        (**self).at_revision(revision)
    }
}

impl ReadView for SledKvStore {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        Ok(self.lease(id)?.is_some())
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        SledKvStore::at_revision(self, revision)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        let stored = data_key(key);
        match self
            .tree
            .get(&stored)
            .map_err(storage_error("reading a key"))?
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
            let (stored, bytes) = item.map_err(storage_error("scanning keys"))?;
            let entry = self.decode(&stored, &bytes)?;
            Ok((stored[1..].to_vec(), entry))
        }))
    }
}

#[cfg(test)]
mod tests;
