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
//! ```
//!
//! **Contract:** [`SledKvStore::apply`] and [`SledKvStore::commit`] write a group of
//! transactions, the new revision and (for raft) the applied index in one batch: after a
//! crash either the whole group or none of it is there, so a replayed raft entry is
//! recognised by its index and skipped. Neither flushes: durability is the caller's
//! ([`SledKvStore::flush`] for a single node, the raft log for a replicated one).
//! Only one thread may write at a time (the committer, or the raft driver); readers may
//! run concurrently and see either all or none of a group.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::kv::engine::{self, Entry, Layered, ReadView, ScanItem};
use crate::kv::limits::KvLimits;
use crate::kv::types::{TxnRequest, TxnResponse};

const TREE: &str = "kv";
const META_PREFIX: u8 = 0x00;
const DATA_PREFIX: u8 = 0x01;
const REVISION_KEY: &[u8] = b"\x00revision";
const APPLIED_KEY: &[u8] = b"\x00applied";

// The meta keys sort before every data key, so data scans never meet them.
const _: () = assert!(META_PREFIX < DATA_PREFIX);

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
        let db = sled::Config::new()
            .path(path)
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
        self.write_group(txns.into_iter().map(Some).collect(), None)
    }

    /// Checks a transaction against this store's limits, as [`SledKvStore::commit`]
    /// would; a replicated write calls it before proposing.
    pub fn check(&self, txn: &TxnRequest) -> Result<()> {
        self.limits.check_txn(txn)
    }

    /// Applies committed raft entries `(index, txn)` in order (a `None` txn, such as a
    /// configuration change, only advances the applied index). Entries at or below the
    /// applied index were applied before a crash and are skipped: their answer is `None`.
    /// The group, the new revision and the last index are written in one batch. Not
    /// flushed: the raft log makes the entries durable.
    ///
    /// Determinism: limits are not checked here (the proposer checked them with
    /// [`SledKvStore::check`]), so every member applies an entry the same way whatever
    /// its own configuration; a storage error fails the whole call instead of becoming
    /// one transaction's answer.
    pub fn apply(
        &self,
        entries: Vec<(u64, Option<TxnRequest>)>,
    ) -> Result<Vec<Option<Result<TxnResponse>>>> {
        let applied = self.applied_index();
        let last = entries.iter().map(|(i, _)| *i).max().unwrap_or(applied);
        let mut skipped = Vec::with_capacity(entries.len());
        let mut fresh = Vec::with_capacity(entries.len());
        for (index, txn) in entries {
            skipped.push(index <= applied);
            if index > applied {
                fresh.push(txn);
            }
        }
        let mut answers = self
            .write_group(fresh, (last > applied).then_some(last))?
            .into_iter();
        Ok(skipped
            .into_iter()
            .map(|skip| if skip { None } else { answers.next() })
            .collect())
    }

    fn write_group(
        &self,
        txns: Vec<Option<TxnRequest>>,
        applied: Option<u64>,
    ) -> Result<Vec<Result<TxnResponse>>> {
        // Only one writer at a time (see the module doc): the state read here is stable.
        let limits = if applied.is_some() {
            KvLimits::unlimited()
        } else {
            self.limits
        };
        let start = self.revision();
        let mut revision = start;
        let mut changes = BTreeMap::new();
        let mut answers = Vec::with_capacity(txns.len());
        for txn in txns {
            let Some(txn) = txn else {
                answers.push(Ok(TxnResponse {
                    revision,
                    ..Default::default()
                }));
                continue;
            };
            let view = Layered {
                base: self,
                changes: &changes,
            };
            match engine::execute(&view, revision, &limits, txn) {
                Ok((response, write)) => {
                    if let Some(write) = write {
                        revision = write.revision;
                        changes.extend(write.changes);
                    }
                    answers.push(Ok(response));
                }
                Err(e @ Error::InvalidArgument { .. }) => answers.push(Err(e)),
                // A read failure is this member's problem, not the request's: never let
                // it turn into a different outcome on one replica.
                Err(e) => return Err(e),
            }
        }
        if revision == start && applied.is_none() {
            return Ok(answers);
        }
        let mut batch = sled::Batch::default();
        for (key, change) in changes {
            match change {
                Some(entry) => batch.insert(data_key(&key), entry.encode()),
                None => batch.remove(data_key(&key)),
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
                .apply(vec![(1, Some(put("a"))), (2, None), (3, Some(put("b")))])
                .unwrap();
            assert!(answers.iter().all(|a| matches!(a, Some(Ok(_)))));
            assert_eq!((store.applied_index(), store.revision()), (3, 2));
            store.flush().unwrap();
        }
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        assert_eq!((store.applied_index(), store.revision()), (3, 2));
        // A crash before the driver learned of the apply replays 2..=4: only 4 is new.
        let answers = store
            .apply(vec![(2, None), (3, Some(put("b"))), (4, Some(put("c")))])
            .unwrap();
        assert!(answers[0].is_none() && answers[1].is_none());
        assert_eq!(answers[2].as_ref().unwrap().as_ref().unwrap().revision, 3);
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
            .apply(vec![(1, Some(put("a"))), (2, Some(put("b"))), (3, None)])
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
        let applied = store.apply(vec![(1, Some(long))]).unwrap();
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
