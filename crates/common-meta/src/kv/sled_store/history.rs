//! The revision history of [`SledKvStore`]: every version of every key until compaction,
//! read by reads at a past revision and by watchers catching up (one history serves
//! both).
//!
//! Two sled key families in the store's tree, written in the same batch as the data:
//!
//! ```text
//! 0x04 {revision i64 BE}{key}          -> [kind] [Entry encoding, for a put]
//! 0x05 {esc(key)}{revision i64 BE}     -> [kind]
//! ```
//!
//! The first lists the changes in revision order (a watcher's catch-up reads it); the
//! second lists each key's versions in order (a read at revision R takes a key's last
//! version at or below R). `kind` is 1 for a put and 2 for a delete; in the first
//! family, 3 marks a key's current version, whose entry is the data entry itself
//! (`0x01 {key}`): the value is stored once. The write that supersedes it rewrites the
//! record as a full put, in its own batch. Readers outside the writer take the store's
//! read lock, so they never see a record and a data entry from different batches. `esc` makes the
//! key order-preserving and prefix-free: each 0x00 byte becomes 0x00 0xff and the key
//! ends with 0x00 0x00, so `{esc(key)}{revision}` sorts by key, then revision.
//!
//! **Compaction** at C (`0x00 "compacted"`) is decided by a replicated command; the
//! sweep that follows removes, for every key changed since the last sweep
//! (`0x00 "swept"`), each version at or below C except the newest, and that one too if
//! it is a delete. A read at C or later is therefore unchanged. A crash between the
//! decision and the sweep is finished at the next open.

use std::collections::BTreeMap;

use std::sync::PoisonError;

use super::{SledKvStore, storage_error};
use crate::error::{Error, Result};
use crate::kv::engine::{Entry, ReadView, ScanItem};

pub(super) const CHANGE_PREFIX: u8 = 0x04;
pub(super) const VERSION_PREFIX: u8 = 0x05;
pub(super) const COMPACTED_KEY: &[u8] = b"\x00compacted";
pub(super) const SWEPT_KEY: &[u8] = b"\x00swept";
/// Present once the store keeps history (every store made since it existed).
const HISTORY_KEY: &[u8] = b"\x00history";

const PUT: u8 = 1;
const DELETE: u8 = 2;
/// A put that is the key's current version: the entry is the data entry.
const CURRENT: u8 = 3;

/// How many changes one sweep batch covers, so a large compaction is written in pieces.
const SWEEP_CHUNK: usize = 10_000;

/// One change of one key, as the history keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The revision of the write.
    pub revision: i64,
    /// The key.
    pub key: Vec<u8>,
    /// The key after the write; `None` for a delete.
    pub entry: Option<Entry>,
}

pub(super) fn change_key(revision: i64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.push(CHANGE_PREFIX);
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(key);
    out
}

fn escaped(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 3);
    out.push(VERSION_PREFIX);
    for &byte in key {
        out.push(byte);
        if byte == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 0]);
    out
}

pub(super) fn version_key(key: &[u8], revision: i64) -> Vec<u8> {
    let mut out = escaped(key);
    out.extend_from_slice(&revision.to_be_bytes());
    out
}

/// Splits a version key into the user key and the revision.
fn parse_version_key(stored: &[u8]) -> Option<(Vec<u8>, i64)> {
    let body = stored.get(1..)?;
    let mut key = Vec::with_capacity(body.len());
    let mut at = 0;
    loop {
        match (body.get(at)?, body.get(at + 1)) {
            (0, Some(0)) => break,
            (0, Some(0xff)) => {
                key.push(0);
                at += 2;
            }
            (0, _) => return None,
            (&byte, _) => {
                key.push(byte);
                at += 1;
            }
        }
    }
    let revision: [u8; 8] = body.get(at + 2..)?.try_into().ok()?;
    Some((key, i64::from_be_bytes(revision)))
}

pub(super) fn change_value(entry: Option<&Entry>) -> Vec<u8> {
    match entry {
        Some(entry) => {
            let mut out = vec![PUT];
            out.extend_from_slice(&entry.encode());
            out
        }
        None => vec![DELETE],
    }
}

fn corrupted(what: &str, stored: &[u8], reason: impl Into<String>) -> Error {
    Error::Corrupted {
        location: format!("history {what} {stored:?}"),
        reason: reason.into(),
    }
}

fn revision_of(stored: &[u8]) -> Result<i64> {
    let revision: [u8; 8] = stored
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupted("change", stored, "key shorter than a revision"))?;
    Ok(i64::from_be_bytes(revision))
}

/// Adds the history of a group's writes to `batch`: each write's changes at its
/// revision (`history`), the last version of each key in the group marked current, and
/// the version that was current before the group (`before`) rewritten as a full put.
pub(super) fn record(
    batch: &mut sled::Batch,
    history: &[super::group::Written],
    finals: &BTreeMap<Vec<u8>, Option<Entry>>,
    before: &BTreeMap<Vec<u8>, Option<Entry>>,
) {
    for (key, entry) in before {
        if let Some(entry) = entry {
            batch.insert(
                change_key(entry.mod_revision, key),
                change_value(Some(entry)),
            );
        }
    }
    for (revision, changes) in history {
        for (key, entry) in changes {
            let current = finals
                .get(key)
                .and_then(Option::as_ref)
                .is_some_and(|last| last.mod_revision == *revision);
            let (value, kind) = match entry {
                Some(_) if current => (vec![CURRENT], PUT),
                Some(entry) => (change_value(Some(entry)), PUT),
                None => (vec![DELETE], DELETE),
            };
            batch.insert(change_key(*revision, key), value);
            batch.insert(version_key(key, *revision), vec![kind]);
        }
    }
}

impl SledKvStore {
    /// The compacted revision: reads below it fail (0 = never compacted).
    pub fn compacted(&self) -> i64 {
        self.compacted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Checks that `revision` can be read: not above the current revision, not below the
    /// compacted one.
    pub fn check_readable(&self, revision: i64) -> Result<()> {
        check_readable(revision, self.revision(), self.compacted())
    }

    /// The changes with revisions in `from..=to`, in revision order (keys in order
    /// within one revision), at least `limit` when there are that many but never a
    /// revision cut in two. `Err(Compacted)` when `from` is below the compacted
    /// revision.
    pub(crate) fn changes(&self, from: i64, to: i64, limit: usize) -> Result<Vec<Change>> {
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        let compacted = self.compacted();
        if from < compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted,
            });
        }
        let mut out: Vec<Change> = Vec::new();
        if to < from {
            return Ok(out);
        }
        let upper = change_key(to.saturating_add(1), b"");
        for item in self.tree.range(change_key(from, b"")..upper) {
            let (stored, value) = item.map_err(storage_error("reading the history"))?;
            let change = self.decode_change(&stored, &value)?;
            if out.len() >= limit && out.last().is_some_and(|l| l.revision != change.revision) {
                break;
            }
            out.push(change);
        }
        // A sweep may have run since the check above; what it removed is not a gap the
        // caller may be handed silently.
        let compacted = self.compacted();
        if from < compacted {
            return Err(Error::Compacted {
                requested: from,
                compacted,
            });
        }
        Ok(out)
    }

    /// A CRC-32 of the history up to `revision` (0: the current one), from the
    /// compacted revision on: every change's revision, key and entry in revision
    /// order. Members that applied the same log agree on it (etcd's `HashKV`). Answers
    /// `(hash, compacted revision, revision hashed)`; a revision out of the readable
    /// range is refused as reads are.
    pub fn hash_history(&self, revision: i64) -> Result<(u32, i64, i64)> {
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        let to = if revision == 0 {
            self.revision()
        } else {
            revision
        };
        self.check_readable(to)?;
        let compacted = self.compacted();
        let mut hasher = crc32fast::Hasher::new();
        let upper = change_key(to.saturating_add(1), b"");
        for item in self.tree.range(change_key(compacted, b"")..upper) {
            let (stored, value) = item.map_err(storage_error("reading the history"))?;
            let change = self.decode_change(&stored, &value)?;
            hasher.update(&change.revision.to_be_bytes());
            hasher.update(&(change.key.len() as u64).to_be_bytes());
            hasher.update(&change.key);
            match &change.entry {
                Some(entry) => {
                    hasher.update(&[PUT]);
                    hasher.update(&entry.encode());
                }
                None => hasher.update(&[DELETE]),
            }
        }
        Ok((hasher.finalize(), compacted, to))
    }

    /// The version of `key` as of `revision` (`None`: absent then), from the history.
    pub(crate) fn entry_at(&self, key: &[u8], revision: i64) -> Result<Option<Entry>> {
        let from = version_key(key, 0);
        let to = version_key(key, revision.saturating_add(1));
        let Some(item) = self.tree.range(from..to).next_back() else {
            return Ok(None);
        };
        let (stored, kind) = item.map_err(storage_error("reading the history"))?;
        self.version_entry(&stored, &kind)
    }

    /// The entry a version-index item points at (`None` for a delete).
    fn version_entry(&self, stored: &[u8], kind: &[u8]) -> Result<Option<Entry>> {
        match kind {
            [DELETE] => Ok(None),
            [PUT] => {
                let (key, revision) = parse_version_key(stored)
                    .ok_or_else(|| corrupted("version", stored, "malformed key"))?;
                let at = change_key(revision, &key);
                let value = self
                    .tree
                    .get(&at)
                    .map_err(storage_error("reading the history"))?
                    .ok_or_else(|| corrupted("version", stored, "its change is missing"))?;
                Ok(self.decode_change(&at, &value)?.entry)
            }
            _ => Err(corrupted("version", stored, "unknown kind")),
        }
    }

    /// The version of `key` just before `revision` (a watcher's `prev_kv`).
    pub(crate) fn previous(&self, key: &[u8], revision: i64) -> Result<Option<Entry>> {
        let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
        self.entry_at(key, revision - 1)
    }

    /// Decodes a change record; a current version's entry is read from the data.
    fn decode_change(&self, stored: &[u8], value: &[u8]) -> Result<Change> {
        let revision = revision_of(stored)?;
        let key = stored[9..].to_vec();
        let entry = match value.split_first() {
            Some((&PUT, rest)) => {
                Some(Entry::decode(rest).map_err(|reason| corrupted("change", stored, reason))?)
            }
            Some((&CURRENT, [])) => {
                let entry = ReadView::get(self, &key)?
                    .filter(|e| e.mod_revision == revision)
                    .ok_or_else(|| {
                        corrupted("change", stored, "marked current, but the key moved on")
                    })?;
                Some(entry)
            }
            Some((&DELETE, [])) => None,
            _ => return Err(corrupted("change", stored, "unknown kind")),
        };
        Ok(Change {
            revision,
            key,
            entry,
        })
    }

    /// Removes the history the compaction at `to` made unreadable, for keys changed
    /// since the last sweep; records `to` as swept. Runs on the writing thread.
    ///
    /// Kept: each key's newest version at or below `to` if it is a put, or if it is
    /// at `to` itself (so a watch from the compacted revision still sees that
    /// revision's deletes). The next sweep starts at the last swept revision again, so
    /// those deletes go then.
    pub(super) fn sweep(&self, to: i64) -> Result<()> {
        let mut from = self.read_i64(SWEPT_KEY)?;
        while from <= to {
            // The keys changed in the next chunk of revisions (whole revisions only).
            let mut keys = std::collections::BTreeSet::new();
            let mut next = to + 1;
            let upper = change_key(to.saturating_add(1), b"");
            for item in self.tree.range(change_key(from, b"")..upper) {
                let (stored, _) = item.map_err(storage_error("reading the history"))?;
                let revision = revision_of(&stored)?;
                if keys.len() >= SWEEP_CHUNK && revision > from {
                    next = revision;
                    break;
                }
                keys.insert(stored[9..].to_vec());
            }
            let mut batch = sled::Batch::default();
            for key in keys {
                let versions = self
                    .tree
                    .range(version_key(&key, 0)..version_key(&key, to.saturating_add(1)));
                let mut found = Vec::new();
                for item in versions {
                    let (stored, kind) = item.map_err(storage_error("reading the history"))?;
                    let (_, revision) = parse_version_key(&stored)
                        .ok_or_else(|| corrupted("version", &stored, "malformed key"))?;
                    found.push((revision, kind.first() == Some(&PUT)));
                }
                let keep_last = found
                    .last()
                    .is_some_and(|(revision, put)| *put || *revision == to);
                let doomed = found.len() - usize::from(keep_last);
                for (revision, _) in &found[..doomed] {
                    batch.remove(version_key(&key, *revision));
                    batch.remove(change_key(*revision, &key));
                }
            }
            batch.insert(SWEPT_KEY, &(next - 1).to_be_bytes());
            self.tree
                .apply_batch(batch)
                .map_err(storage_error("sweeping compacted history"))?;
            from = next;
        }
        Ok(())
    }

    /// Starts the history of a store written before history existed: each key's
    /// current version becomes its history, and the store counts as compacted at its
    /// revision (what came before was never kept). One batch; a no-op once done.
    pub(super) fn start_history(&self) -> Result<()> {
        if self
            .tree
            .contains_key(HISTORY_KEY)
            .map_err(storage_error("reading store metadata"))?
        {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for item in ReadView::scan(self, &[0], None) {
            let (key, entry) = item?;
            batch.insert(change_key(entry.mod_revision, &key), vec![CURRENT]);
            batch.insert(version_key(&key, entry.mod_revision), vec![PUT]);
        }
        let revision = self.revision();
        if revision > 0 {
            batch.insert(COMPACTED_KEY, &revision.to_be_bytes());
            batch.insert(SWEPT_KEY, &revision.to_be_bytes());
        }
        batch.insert(HISTORY_KEY, &[1u8][..]);
        self.tree
            .apply_batch(batch)
            .map_err(storage_error("starting the history"))?;
        self.compacted
            .store(revision, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// How many changes the history holds (for tests and status: space reclaimed by
    /// compaction shows here).
    pub fn history_len(&self) -> usize {
        self.tree.scan_prefix([CHANGE_PREFIX]).count()
    }
}

/// The raw entries of a store copy (sorted by key), with a history started when the
/// copy has none (a copy from a member that kept no history): each data entry's
/// current version, compacted at the copy's `revision`. Data entries that do not
/// decode are refused.
pub(super) fn with_history(
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    revision: i64,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if entries
        .binary_search_by(|(k, _)| k.as_slice().cmp(HISTORY_KEY))
        .is_ok()
    {
        return Ok(entries);
    }
    let mut extra = Vec::new();
    for (key, value) in &entries {
        if key.first() != Some(&super::DATA_PREFIX) {
            continue;
        }
        let entry = Entry::decode(value).map_err(|reason| corrupted("data", key, reason))?;
        extra.push((change_key(entry.mod_revision, &key[1..]), vec![CURRENT]));
        extra.push((version_key(&key[1..], entry.mod_revision), vec![PUT]));
    }
    if revision > 0 {
        extra.push((COMPACTED_KEY.to_vec(), revision.to_be_bytes().to_vec()));
        extra.push((SWEPT_KEY.to_vec(), revision.to_be_bytes().to_vec()));
    }
    extra.push((HISTORY_KEY.to_vec(), vec![1]));
    let mut all: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = extra.into_iter().collect();
    // The copy's own entries win over what was derived.
    all.extend(entries);
    Ok(all.into_iter().collect())
}

/// Checks `revision` against a store at `current`, compacted at `compacted`.
pub(crate) fn check_readable(revision: i64, current: i64, compacted: i64) -> Result<()> {
    if revision > current {
        return Err(Error::FutureRevision {
            requested: revision,
            current,
        });
    }
    if revision < compacted {
        return Err(Error::Compacted {
            requested: revision,
            compacted,
        });
    }
    Ok(())
}

/// The store as of a past revision, read from the history: a [`ReadView`], so a range
/// at a revision follows exactly the rules of a current one.
pub(crate) struct AtRevision<'a> {
    pub store: &'a SledKvStore,
    pub revision: i64,
}

impl ReadView for AtRevision<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        ReadView::lease_exists(self.store, id)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.store.entry_at(key, self.revision)
    }

    fn scan<'s>(
        &'s self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 's> {
        let lower = escaped(start);
        let upper = end.map_or_else(|| vec![VERSION_PREFIX + 1], escaped);
        Box::new(LiveAt {
            store: self.store,
            revision: self.revision,
            versions: self.store.tree.range(lower..upper),
            pending: None,
            failed: false,
        })
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        self.store.at_revision(revision)
    }
}

/// A version-index item: its stored key and its kind byte.
type IndexItem = (sled::IVec, sled::IVec);

/// Walks the version index and yields, per key, its version at `revision` if live.
struct LiveAt<'a> {
    store: &'a SledKvStore,
    revision: i64,
    versions: sled::Iter,
    /// The key being walked and its newest version at or below `revision` so far
    /// (the index item's key and kind).
    pending: Option<(Vec<u8>, Option<IndexItem>)>,
    failed: bool,
}

impl LiveAt<'_> {
    /// Ends the key being walked: its live entry, if any.
    fn finish(&mut self) -> Option<ScanItem> {
        let (key, newest) = self.pending.take()?;
        let (stored, kind) = newest?;
        match self.store.version_entry(&stored, &kind) {
            Ok(Some(entry)) => Some(Ok((key, entry))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl Iterator for LiveAt<'_> {
    type Item = ScanItem;

    fn next(&mut self) -> Option<ScanItem> {
        if self.failed {
            return None;
        }
        loop {
            let Some(item) = self.versions.next() else {
                return self.finish();
            };
            let (stored, kind) = match item {
                Ok(pair) => pair,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(storage_error("reading the history")(e)));
                }
            };
            let Some((key, revision)) = parse_version_key(&stored) else {
                self.failed = true;
                return Some(Err(corrupted("version", &stored, "malformed key")));
            };
            let same = self.pending.as_ref().is_some_and(|(k, _)| *k == key);
            let mut done = None;
            if !same {
                done = self.finish();
                self.pending = Some((key, None));
            }
            if revision <= self.revision
                && let Some((_, newest)) = self.pending.as_mut()
            {
                *newest = Some((stored, kind));
            }
            if let Some(done) = done {
                return Some(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_sort_by_key_then_revision_and_parse_back() {
        let keys: &[&[u8]] = &[
            b"", b"\0", b"\0\0", b"\0\x01", b"a", b"a\0", b"a\0b", b"ab", b"b",
        ];
        let mut encoded = Vec::new();
        for key in keys {
            for revision in [1, 2, 300] {
                let stored = version_key(key, revision);
                assert_eq!(parse_version_key(&stored), Some((key.to_vec(), revision)));
                encoded.push(stored);
            }
        }
        let mut sorted = encoded.clone();
        sorted.sort();
        assert_eq!(
            sorted, encoded,
            "the encoding keeps key order, then revision"
        );
    }

    #[test]
    fn malformed_version_keys_are_refused() {
        for bad in [&[VERSION_PREFIX, b'a'][..], &[VERSION_PREFIX, 0, 1], &[]] {
            assert_eq!(parse_version_key(bad), None, "{bad:?}");
        }
    }
}
