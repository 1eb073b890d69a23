//! `Runs`: the log's entries on disk, one sled key per run of consecutive entries (the
//! entries of one append), not one per entry: a Ready of 64 writes costs one sled
//! insert instead of 64, and compaction removes a run at a time.
//!
//! ```text
//! tree raft_runs: first index (u64 BE) -> [u64 BE last index]([u32 BE length][Entry])*
//! ```
//!
//! Runs never overlap: an append that starts inside a run cuts that run short and
//! replaces every run after it, in the same sled batch as its own run. A run may start
//! at or below the compaction point (its dead entries are skipped); a run wholly at or
//! below it is removed. An in-memory map of every run's first and last index (loaded at
//! open) finds the run holding an index without touching disk.
//!
//! The formats before 4 kept one key per entry in the tree `raft_log`; `open` moves
//! them into runs (an explicit, logged migration that is redone whole if it was cut).

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use raft::StorageError;
use raft::prelude::Entry;

use super::{decode, encode, other};

const RUNS_TREE: &str = "raft_runs";
/// Where the formats before 4 kept the log, one key per entry.
const LEGACY_TREE: &str = "raft_log";
/// Most entries of one run written by the migration.
const MIGRATED_RUN: usize = 1024;

/// The log's runs; see the module doc.
pub(super) struct Runs {
    tree: sled::Tree,
    /// First index -> last index of every run on disk.
    map: RwLock<BTreeMap<u64, u64>>,
}

/// The stored bytes of a run of `entries` (consecutive; see the module doc).
pub fn encode_run(entries: &[Entry]) -> raft::Result<Vec<u8>> {
    let last = entries.last().map_or(0, |e| e.index);
    let mut out = Vec::with_capacity(8 + entries.len() * 64);
    out.extend_from_slice(&last.to_be_bytes());
    for entry in entries {
        let bytes = encode("entry", entry)?;
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

fn run_last(bytes: &[u8]) -> raft::Result<u64> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| other("reading the log", "a run without its header"))
}

/// The entries of a run's stored bytes; an error for bytes that are not a run.
pub fn decode_run(bytes: &[u8]) -> raft::Result<Vec<Entry>> {
    let mut rest = bytes
        .get(8..)
        .ok_or_else(|| other("reading the log", "a run without its header"))?;
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| other("reading the log", "a truncated run"))? as usize;
        let body = rest
            .get(4..4 + len)
            .ok_or_else(|| other("reading the log", "a truncated run"))?;
        entries.push(decode("entry", body)?);
        rest = &rest[4 + len..];
    }
    Ok(entries)
}

fn key_index(key: &[u8]) -> raft::Result<u64> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| other("reading the log", format!("bad index key {key:?}")))
}

impl Runs {
    /// Opens the runs in `db` (migrating a per-entry log), drops the runs wholly at or
    /// below `compacted`, and returns them with the last index they hold (`compacted`
    /// when none).
    pub(super) fn open(db: &sled::Db, compacted: u64) -> raft::Result<(Runs, u64)> {
        let tree = db
            .open_tree(RUNS_TREE)
            .map_err(|e| other("opening tree", e))?;
        migrate(db, &tree)?;
        let mut map = BTreeMap::new();
        let mut dead = sled::Batch::default();
        for item in tree.iter() {
            let (key, value) = item.map_err(|e| other("reading the log", e))?;
            let (first, last) = (key_index(&key)?, run_last(&value)?);
            if last <= compacted {
                dead.remove(key);
            } else {
                map.insert(first, last);
            }
        }
        tree.apply_batch(dead)
            .map_err(|e| other("removing dead entries", e))?;
        let last = map.values().max().copied().unwrap_or(0).max(compacted);
        Ok((
            Runs {
                tree,
                map: RwLock::new(map),
            },
            last,
        ))
    }

    fn map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, u64>> {
        // Updated only after its sled write succeeded, a whole entry at a time.
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, u64>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn load(&self, first: u64) -> raft::Result<Vec<Entry>> {
        match self
            .tree
            .get(first.to_be_bytes())
            .map_err(|e| other("reading entries", e))?
        {
            Some(bytes) => decode_run(&bytes),
            None => Err(other("reading entries", format!("run {first} is missing"))),
        }
    }

    /// Writes `entries` (consecutive, non-empty) as a run, replacing every entry at or
    /// after the first of them, in one sled batch.
    pub(super) fn append(&self, entries: &[Entry]) -> raft::Result<()> {
        let (first, last) = (entries[0].index, entries[entries.len() - 1].index);
        let mut map = self.map_mut();
        let mut batch = sled::Batch::default();
        let replaced: Vec<u64> = map.range(first..).map(|(start, _)| *start).collect();
        for start in &replaced {
            batch.remove(&start.to_be_bytes());
        }
        let cut = match map.range(..first).next_back() {
            Some((&start, &end)) if end >= first => {
                let kept: Vec<Entry> = self
                    .load(start)?
                    .into_iter()
                    .filter(|e| e.index < first)
                    .collect();
                batch.insert(&start.to_be_bytes(), encode_run(&kept)?);
                Some(start)
            }
            _ => None,
        };
        batch.insert(&first.to_be_bytes(), encode_run(entries)?);
        self.tree
            .apply_batch(batch)
            .map_err(|e| other("appending entries", e))?;
        for start in replaced {
            map.remove(&start);
        }
        if let Some(start) = cut {
            map.insert(start, first - 1);
        }
        map.insert(first, last);
        Ok(())
    }

    /// The entries of `[low, high)` as far as `keep(kept so far, next)` lets it add
    /// them one by one (always at least the first).
    pub(super) fn read(
        &self,
        low: u64,
        high: u64,
        mut keep: impl FnMut(&[Entry], &Entry) -> bool,
    ) -> raft::Result<Vec<Entry>> {
        let starts: Vec<u64> = {
            let map = self.map();
            let from = map
                .range(..=low)
                .next_back()
                .map_or(low, |(start, _)| *start);
            map.range(from..high).map(|(start, _)| *start).collect()
        };
        let mut entries: Vec<Entry> = Vec::new();
        for start in starts {
            for entry in self.load(start)? {
                if entry.index < low || entry.index >= high {
                    continue;
                }
                // `keep` sees every entry (it may count them), the first is always kept.
                if !keep(&entries, &entry) && !entries.is_empty() {
                    return Ok(entries);
                }
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    /// The entry at `index`.
    pub(super) fn entry(&self, index: u64) -> raft::Result<Entry> {
        let start = self
            .map()
            .range(..=index)
            .next_back()
            .filter(|(_, end)| **end >= index)
            .map(|(start, _)| *start)
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        self.load(start)?
            .into_iter()
            .find(|e| e.index == index)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    /// Removes the runs wholly at or below `index` (compaction).
    pub(super) fn remove_through(&self, index: u64) -> raft::Result<()> {
        let mut map = self.map_mut();
        let dead: Vec<u64> = map
            .iter()
            .filter(|(_, end)| **end <= index)
            .map(|(start, _)| *start)
            .collect();
        let mut batch = sled::Batch::default();
        for start in &dead {
            batch.remove(&start.to_be_bytes());
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| other("compacting", e))?;
        for start in dead {
            map.remove(&start);
        }
        Ok(())
    }

    /// Removes every run (a snapshot replaced the log).
    pub(super) fn clear(&self) -> raft::Result<()> {
        self.remove_through(u64::MAX)
    }

    /// Whether any run holds `index`.
    #[cfg(test)]
    pub(super) fn holds(&self, index: u64) -> bool {
        self.map()
            .range(..=index)
            .next_back()
            .is_some_and(|(_, end)| *end >= index)
    }
}

/// Moves a per-entry log (formats before 4) into runs. Redone whole when a crash cut
/// it: the old tree goes only after the runs are written (sled keeps a prefix of
/// writes, so a dropped old tree means the runs are there).
fn migrate(db: &sled::Db, runs: &sled::Tree) -> raft::Result<()> {
    if !db
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == LEGACY_TREE.as_bytes())
    {
        return Ok(());
    }
    let legacy = db
        .open_tree(LEGACY_TREE)
        .map_err(|e| other("opening tree", e))?;
    if !legacy.is_empty() {
        tracing::info!(
            entries = legacy.len(),
            "data format migration: the raft log moves into runs of entries"
        );
        runs.clear().map_err(|e| other("migrating the log", e))?;
        let mut run: Vec<Entry> = Vec::new();
        let flush = |run: &mut Vec<Entry>| -> raft::Result<()> {
            if let Some(first) = run.first() {
                runs.insert(first.index.to_be_bytes(), encode_run(run)?)
                    .map_err(|e| other("migrating the log", e))?;
            }
            run.clear();
            Ok(())
        };
        for item in legacy.iter() {
            let (_, bytes) = item.map_err(|e| other("migrating the log", e))?;
            let entry: Entry = decode("entry", &bytes)?;
            if run.last().is_some_and(|e| e.index + 1 != entry.index) || run.len() >= MIGRATED_RUN {
                flush(&mut run)?;
            }
            run.push(entry);
        }
        flush(&mut run)?;
    }
    db.drop_tree(LEGACY_TREE)
        .map_err(|e| other("migrating the log", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range
            .map(|index| Entry {
                index,
                term,
                data: format!("e{index}t{term}").into_bytes().into(),
                ..Default::default()
            })
            .collect()
    }

    fn all(runs: &Runs, low: u64, high: u64) -> Vec<(u64, u64)> {
        runs.read(low, high, |_, _| true)
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn an_append_inside_a_run_cuts_it_and_replaces_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (runs, last) = Runs::open(&db, 0).unwrap();
        assert_eq!(last, 0);
        runs.append(&entries(1..=4, 1)).unwrap();
        runs.append(&entries(5..=8, 1)).unwrap();
        runs.append(&entries(3..=6, 2)).unwrap();
        let expected: Vec<(u64, u64)> = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2), (6, 2)].into();
        assert_eq!(all(&runs, 1, 9), expected);
        assert!(!runs.holds(7), "the old tail is gone");
        assert_eq!(runs.entry(2).unwrap().term, 1);
        assert!(runs.entry(7).is_err());
        // A limit stops the read, but never before the first entry.
        assert_eq!(runs.read(2, 7, |kept, _| kept.len() < 2).unwrap().len(), 2);
        assert_eq!(runs.read(2, 7, |_, _| false).unwrap().len(), 1);

        drop(runs);
        let (runs, last) = Runs::open(&db, 2).unwrap();
        assert_eq!(last, 6, "reopened from disk");
        assert_eq!(all(&runs, 3, 7), expected[2..]);
        runs.remove_through(5).unwrap();
        assert!(runs.holds(6) && !runs.holds(2), "only whole runs go");
    }

    #[test]
    fn a_per_entry_log_is_migrated_into_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let legacy = db.open_tree(LEGACY_TREE).unwrap();
        for entry in entries(1..=2500, 3) {
            legacy
                .insert(entry.index.to_be_bytes(), encode("entry", &entry).unwrap())
                .unwrap();
        }
        let (runs, last) = Runs::open(&db, 0).unwrap();
        assert_eq!(last, 2500);
        assert_eq!(all(&runs, 1, 2501).len(), 2500);
        assert_eq!(runs.entry(1234).unwrap().term, 3);
        assert_eq!(runs.map().len(), 3, "runs of at most {MIGRATED_RUN}");
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n.as_ref() == LEGACY_TREE.as_bytes()),
            "the old tree is dropped"
        );
    }
}
