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
//! ```
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
use std::sync::{PoisonError, RwLock};

use meta_proto::v1 as pb;
use prost::Message as _;

use crate::error::{Error, Result};
use crate::kv::command::{Applied, Command, SessionRef};
use crate::kv::engine::{self, Entry, Layered, ReadView, ScanItem};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnRequest, TxnResponse};

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
        // No background flusher: it only logs a failed sync (a later flush may then
        // succeed over lost pages); the caller's flushes, which fail stop, do the syncing.
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .map_err(|source| Error::Storage {
                context: format!("opening sled database at {}", path.display()),
                source,
            })?;
        Self::open_in(db, limits)
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
        Ok(SledKvStore {
            db,
            tree,
            lock: RwLock::new(()),
            revision: AtomicI64::new(revision),
            applied: AtomicU64::new(applied),
            limits,
        })
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
            .map(|txn| (0, Command::Txn { txn, session: None }))
            .collect();
        Ok(self
            .write_group(commands, Vec::new(), None)?
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
            revision: start,
            changes: BTreeMap::new(),
            sessions: BTreeMap::new(),
        };
        let mut answers = Vec::with_capacity(commands.len());
        for (index, command) in commands {
            answers.push(group.run(index, command)?);
        }
        let Group {
            revision,
            changes,
            sessions,
            ..
        } = group;
        if revision == start && applied.is_none() && sessions.is_empty() && system.is_empty() {
            return Ok(answers);
        }
        let mut batch = sled::Batch::default();
        for (key, change) in changes {
            match change {
                Some(entry) => batch.insert(data_key(&key), entry.encode()),
                None => batch.remove(data_key(&key)),
            }
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
        batch.insert(REVISION_KEY, &revision.to_be_bytes());
        if let Some(applied) = applied {
            batch.insert(APPLIED_KEY, &applied.to_be_bytes());
        }
        // The guard only orders readers against this batch; sled's own state is
        // consistent whatever a panicking holder did, so a poisoned lock is safe to take.
        let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        self.tree
            .apply_batch(batch)
            .map_err(storage_error("applying a write batch"))?;
        self.revision.store(revision, Ordering::Release);
        if let Some(applied) = applied {
            self.applied.store(applied, Ordering::Release);
        }
        Ok(answers)
    }

    /// A consistent copy of the whole store (data, revision, applied index) and the
    /// applied index it reflects, for a raft snapshot. Blocks writers while it copies.
    ///
    /// Format: a sequence of `[u32 BE key length][key][u32 BE value length][value]` of
    /// the raw tree entries. It is sent between members of one version: not a format
    /// to keep on disk across upgrades.
    pub fn snapshot(&self) -> Result<(Vec<u8>, u64)> {
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (key, value) = item.map_err(storage_error("copying the store"))?;
            for part in [key.as_ref(), value.as_ref()] {
                let len = u32::try_from(part.len()).map_err(|_| Error::Corrupted {
                    location: format!("tree {TREE}"),
                    reason: "an entry over 4 GiB".to_string(),
                })?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        Ok((out, self.applied_index()))
    }

    /// Replaces the whole store with a [`SledKvStore::snapshot`] copy, in one atomic
    /// batch (a crash leaves the old state or the new one, never a mix). Not flushed.
    pub fn restore(&self, snapshot: &[u8]) -> Result<()> {
        let bad = |reason: &str| Error::Corrupted {
            location: "a received snapshot".to_string(),
            reason: reason.to_string(),
        };
        let mut entries = Vec::new();
        let mut rest = snapshot;
        while !rest.is_empty() {
            let mut parts = [Vec::new(), Vec::new()];
            for part in &mut parts {
                let len_bytes: [u8; 4] = rest
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad("truncated length"))?;
                let len = u32::from_be_bytes(len_bytes) as usize;
                let body = rest.get(4..4 + len).ok_or_else(|| bad("truncated entry"))?;
                *part = body.to_vec();
                rest = &rest[4 + len..];
            }
            let [key, value] = parts;
            entries.push((key, value));
        }
        let read_meta = |name: &[u8]| -> u64 {
            entries
                .iter()
                .find(|(k, _)| k.as_slice() == name)
                .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, u64::from_be_bytes)
        };
        let revision = read_meta(REVISION_KEY) as i64;
        let applied = read_meta(APPLIED_KEY);
        let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        for item in self.tree.iter().keys() {
            batch.remove(item.map_err(storage_error("reading keys to replace"))?);
        }
        for (key, value) in entries {
            batch.insert(key, value);
        }
        self.tree
            .apply_batch(batch)
            .map_err(storage_error("installing a snapshot"))?;
        self.revision.store(revision, Ordering::Release);
        self.applied.store(applied, Ordering::Release);
        Ok(())
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map(drop)
            .map_err(storage_error("flushing writes to disk"))
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

fn decode_session(id: u64, bytes: &[u8]) -> Result<pb::SessionRecord> {
    pb::SessionRecord::decode(bytes).map_err(|e| Error::Corrupted {
        location: format!("tree {TREE} session {id}"),
        reason: e.to_string(),
    })
}

/// The changes of one write group as they accumulate: each command sees those before it.
struct Group<'a> {
    store: &'a SledKvStore,
    limits: KvLimits,
    revision: i64,
    changes: BTreeMap<Vec<u8>, Option<Entry>>,
    /// Session records written (`None`: removed) by the group.
    sessions: BTreeMap<u64, Option<pb::SessionRecord>>,
}

impl Group<'_> {
    /// Runs one command. The outer `Err` is a storage failure (the whole group fails);
    /// the inner one is the command's own refusal, decided alike on every member.
    fn run(&mut self, index: u64, command: Command) -> Result<Result<Applied>> {
        match command {
            Command::Noop => Ok(Ok(Applied::Done)),
            Command::Txn { txn, session: None } => self.txn(txn),
            Command::Txn {
                txn,
                session: Some(session),
            } => self.session_txn(txn, session),
            Command::OpenSession { ttl_ms } => {
                if index == 0 {
                    return Ok(Err(Error::invalid_argument(
                        "sessions exist only in a replicated store",
                    )));
                }
                let record = pb::SessionRecord {
                    ttl_ms,
                    ..Default::default()
                };
                self.sessions.insert(index, Some(record));
                Ok(Ok(Applied::SessionOpened { id: index, ttl_ms }))
            }
            Command::CloseSessions { ids } => {
                for id in ids {
                    self.sessions.insert(id, None);
                }
                Ok(Ok(Applied::Done))
            }
        }
    }

    fn txn(&mut self, txn: TxnRequest) -> Result<Result<Applied>> {
        let view = Layered {
            base: self.store,
            changes: &self.changes,
        };
        match engine::execute(&view, self.revision, &self.limits, txn) {
            Ok((response, write)) => {
                if let Some(write) = write {
                    self.revision = write.revision;
                    self.changes.extend(write.changes);
                }
                Ok(Ok(Applied::Txn(response)))
            }
            Err(e @ Error::InvalidArgument { .. }) => Ok(Err(e)),
            // A read failure is this member's problem, not the request's: never let it
            // turn into a different outcome on one replica.
            Err(e) => Err(e),
        }
    }

    fn session_txn(&mut self, txn: TxnRequest, session: SessionRef) -> Result<Result<Applied>> {
        if let Err(e) = session.validate() {
            return Ok(Err(e));
        }
        let record = match self.sessions.get(&session.id) {
            Some(record) => record.clone(),
            None => self.store.load_session(session.id)?,
        };
        let Some(mut record) = record else {
            return Ok(Err(Error::SessionExpired { id: session.id }));
        };
        // Forget what the client says it holds, whatever this command's fate.
        record.acked = record.acked.max(session.acked);
        let acked = record.acked;
        record.answers.retain(|a| a.seq >= acked);
        let answer = if let Some(kept) = record.answers.iter().find(|a| a.seq == session.seq) {
            kept_answer(kept)
        } else if session.seq < record.acked {
            Err(Error::invalid_argument(format!(
                "write {} of session {} is below the acknowledged mark {}: its answer was already received and forgotten",
                session.seq, session.id, record.acked
            )))
        } else if record.answers.len() >= MAX_UNACKED_ANSWERS {
            Err(Error::invalid_argument(format!(
                "session {} holds {MAX_UNACKED_ANSWERS} unacknowledged answers; acknowledge answered writes (SessionRef.acked) before sending more",
                session.id
            )))
        } else {
            let answer = self.txn(txn)?;
            let outcome = match &answer {
                Ok(Applied::Txn(response)) => pb::session_answer::Outcome::Response(
                    crate::rpc::txn_response_to_pb(response.clone(), 0),
                ),
                Ok(other) => {
                    return Err(Error::Remote {
                        code: "Internal".to_string(),
                        message: format!("a transaction was answered {other:?}"),
                    });
                }
                Err(e) => pb::session_answer::Outcome::Refused(e.to_string()),
            };
            record.answers.push(pb::SessionAnswer {
                seq: session.seq,
                outcome: Some(outcome),
            });
            answer
        };
        self.sessions.insert(session.id, Some(record));
        Ok(answer)
    }
}

/// The answer a session kept for a write, as it was first given.
fn kept_answer(kept: &pb::SessionAnswer) -> Result<Applied> {
    match &kept.outcome {
        Some(pb::session_answer::Outcome::Response(response)) => {
            Ok(Applied::Txn(response.clone().try_into()?))
        }
        Some(pb::session_answer::Outcome::Refused(message)) => Err(Error::InvalidArgument {
            message: message
                .strip_prefix("invalid argument: ")
                .unwrap_or(message)
                .to_string(),
        }),
        None => Err(Error::Corrupted {
            location: format!("a session answer for write {}", kept.seq),
            reason: "no outcome".to_string(),
        }),
    }
}

impl ReadView for SledKvStore {
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
mod tests {
    use super::*;
    use crate::kv::types::{PutRequest, TxnOp};

    fn write(txn: TxnRequest) -> Command {
        Command::Txn { txn, session: None }
    }

    fn txn_answer(answer: &Option<Result<Applied>>) -> TxnResponse {
        match answer {
            Some(Ok(Applied::Txn(response))) => response.clone(),
            other => panic!("not a txn answer: {other:?}"),
        }
    }

    fn in_session(txn: TxnRequest, id: u64, seq: u64, acked: u64) -> Command {
        Command::Txn {
            txn,
            session: Some(SessionRef { id, seq, acked }),
        }
    }

    /// Creates `k` only if it does not exist: a retry that applied again would fail.
    fn create(key: &str) -> TxnRequest {
        TxnRequest {
            compare: vec![crate::kv::Compare::new(
                key.as_bytes().to_vec(),
                crate::kv::CompareOp::Equal,
                crate::kv::CompareTarget::Version(0),
            )],
            ..put(key)
        }
    }

    #[test]
    fn a_retried_session_write_gets_its_first_answer_and_applies_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
            let opened = store
                .apply(vec![(1, Command::OpenSession { ttl_ms: 5_000 })])
                .unwrap();
            assert_eq!(
                opened[0].as_ref().unwrap().as_ref().unwrap(),
                &Applied::SessionOpened {
                    id: 1,
                    ttl_ms: 5_000
                }
            );
            assert_eq!(store.sessions().unwrap(), [(1, 5_000)]);
            let first = store
                .apply(vec![(2, in_session(create("k"), 1, 1, 1))])
                .unwrap();
            let first = txn_answer(&first[0]);
            assert!(first.succeeded);
            // The reply was lost; the client sends the same write again.
            let again = store
                .apply(vec![(3, in_session(create("k"), 1, 1, 1))])
                .unwrap();
            assert_eq!(
                txn_answer(&again[0]),
                first,
                "the first answer, not a failed compare"
            );
            assert_eq!(store.revision(), 1, "applied once");
            // The next write acknowledges the first, whose answer is then forgotten.
            let second = store
                .apply(vec![(4, in_session(put("j"), 1, 2, 2))])
                .unwrap();
            assert_eq!(txn_answer(&second[0]).revision, 2);
            let stale = store
                .apply(vec![(5, in_session(create("k"), 1, 1, 1))])
                .unwrap();
            let err = stale[0].as_ref().unwrap().as_ref().unwrap_err();
            assert!(
                err.to_string().contains("below the acknowledged mark 2"),
                "{err}"
            );
            store.flush().unwrap();
        }
        // Kept answers survive a restart: they are in the same batches as the data.
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let again = store
            .apply(vec![(6, in_session(put("j"), 1, 2, 2))])
            .unwrap();
        assert_eq!(txn_answer(&again[0]).revision, 2);
        assert_eq!(store.revision(), 2);
        // A closed session refuses writes, which then change nothing.
        let closed = store
            .apply(vec![
                (7, Command::CloseSessions { ids: vec![1] }),
                (8, in_session(put("x"), 1, 3, 3)),
                (9, in_session(put("x"), 0, 1, 1)),
            ])
            .unwrap();
        assert!(
            matches!(closed[1], Some(Err(Error::SessionExpired { id: 1 }))),
            "{closed:?}"
        );
        assert!(matches!(
            closed[2],
            Some(Err(Error::InvalidArgument { .. }))
        ));
        assert_eq!(store.revision(), 2);
        assert!(store.sessions().unwrap().is_empty());
        // Sessions need the replicated store: a local commit cannot open one.
        assert!(
            store
                .write_group(
                    vec![(0, Command::OpenSession { ttl_ms: 1 })],
                    Vec::new(),
                    None
                )
                .unwrap()[0]
                .is_err()
        );
    }

    fn put(key: &str) -> TxnRequest {
        TxnRequest {
            success: vec![TxnOp::Put(PutRequest::new(key.as_bytes(), b"v".to_vec()))],
            ..Default::default()
        }
    }

    #[test]
    fn replayed_entries_are_skipped_and_the_applied_index_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
            let answers = store
                .apply(vec![
                    (1, write(put("a"))),
                    (2, Command::Noop),
                    (3, write(put("b"))),
                ])
                .unwrap();
            assert!(answers.iter().all(|a| matches!(a, Some(Ok(_)))));
            assert_eq!((store.applied_index(), store.revision()), (3, 2));
            store.flush().unwrap();
        }
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        assert_eq!((store.applied_index(), store.revision()), (3, 2));
        // A crash before the driver learned of the apply replays 2..=4: only 4 is new.
        let answers = store
            .apply(vec![
                (2, Command::Noop),
                (3, write(put("b"))),
                (4, write(put("c"))),
            ])
            .unwrap();
        assert!(answers[0].is_none() && answers[1].is_none());
        assert_eq!(txn_answer(&answers[2]).revision, 3);
        let b = engine::execute(
            &store,
            store.revision(),
            &KvLimits::default(),
            TxnRequest {
                success: vec![TxnOp::Range(crate::kv::RangeRequest::key(b"b".to_vec()))],
                ..Default::default()
            },
        )
        .unwrap()
        .0;
        match &b.responses[0] {
            crate::kv::TxnOpResponse::Range(r) => assert_eq!(r.kvs[0].version, 1, "b applied once"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snapshot_restores_data_revision_and_applied_index_exactly() {
        let source_dir = tempfile::tempdir().unwrap();
        let source = SledKvStore::open(source_dir.path(), KvLimits::default()).unwrap();
        source
            .apply(vec![
                (1, write(put("a"))),
                (2, write(put("b"))),
                (3, Command::Noop),
            ])
            .unwrap();
        let (blob, applied) = source.snapshot().unwrap();
        assert_eq!(applied, 3);

        let target_dir = tempfile::tempdir().unwrap();
        let target = SledKvStore::open(target_dir.path(), KvLimits::default()).unwrap();
        target.commit(vec![put("stale")]).unwrap();
        target.restore(&blob).unwrap();
        assert_eq!((target.revision(), target.applied_index()), (2, 3));
        let keys: Vec<Vec<u8>> = target
            .scan(b"\0", None)
            .map(|item| item.unwrap().0)
            .collect();
        assert_eq!(keys, [b"a".to_vec(), b"b".to_vec()], "stale keys are gone");
        assert_eq!(target.snapshot().unwrap().0, blob);

        let err = target.restore(&blob[..blob.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(target.revision(), 2, "a bad snapshot changes nothing");
    }

    #[test]
    fn replicated_entries_apply_whatever_the_local_limits() {
        let dir = tempfile::tempdir().unwrap();
        let small = KvLimits {
            max_key_bytes: 4,
            ..KvLimits::default()
        };
        let store = SledKvStore::open(dir.path(), small).unwrap();
        let long = put("longer-than-four");
        assert!(store.check(&long).is_err(), "the proposer refuses it");
        let answers = store.commit(vec![long.clone()]).unwrap();
        assert!(answers[0].is_err(), "a single-node commit refuses it too");
        // A member with larger limits proposed it and it committed: it must apply here.
        let applied = store.apply(vec![(1, write(long))]).unwrap();
        assert!(matches!(applied[0], Some(Ok(_))), "{applied:?}");
        assert_eq!(store.revision(), 1);
    }

    #[test]
    fn a_refused_transaction_in_a_group_is_answered_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let answers = store.commit(vec![put("a"), put(""), put("b")]).unwrap();
        assert!(answers[0].is_ok() && answers[2].is_ok());
        assert!(matches!(answers[1], Err(Error::InvalidArgument { .. })));
        assert_eq!(store.revision(), 2);
        let err = store.read(put("x")).unwrap_err();
        assert!(
            err.to_string()
                .contains("read was given a transaction that writes")
        );
    }
}
