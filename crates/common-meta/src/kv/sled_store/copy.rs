//! Copies of the whole store for raft snapshots: taken at one applied index, written
//! out as a byte stream, and restored from one.
//!
//! Stream format: a sequence of `[u32 BE key length][key][u32 BE value length][value]`
//! of the raw tree entries, in key order. It travels between members of one version: it
//! is not a format to keep on disk across upgrades.

use std::io::{self, Read, Write};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use super::{
    APPLIED_KEY, REVISION_KEY, SESSION_PREFIX, SYSTEM_PREFIX, SledKvStore, TREE, storage_error,
    system_key,
};
use crate::error::{Error, Result};

/// A consistent copy of the whole store (data, sessions, system values, revision and
/// applied index) as of one applied index. Taking it blocks writers only while the
/// tree's entries are gathered (values are shared with sled, not copied); writing it out
/// ([`StoreCopy::write_to`]) blocks nobody.
pub struct StoreCopy {
    entries: Vec<(sled::IVec, sled::IVec)>,
    applied: u64,
}

impl StoreCopy {
    /// The index of the last raft entry the copy reflects.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The store revision as of the copy.
    pub fn revision(&self) -> i64 {
        self.entries
            .binary_search_by(|(k, _)| k.as_ref().cmp(REVISION_KEY))
            .ok()
            .and_then(|at| <[u8; 8]>::try_from(self.entries[at].1.as_ref()).ok())
            .map_or(0, i64::from_be_bytes)
    }

    /// The copy without what belongs to one cluster's replication: the applied index,
    /// client sessions and system values (configuration, member addresses). What stays
    /// (data, history, leases, revision, compaction) is what a backup holds and what a
    /// new cluster starts from.
    pub fn portable(mut self) -> StoreCopy {
        self.entries.retain(|(key, _)| {
            key.as_ref() != APPLIED_KEY
                && !matches!(key.first(), Some(&SESSION_PREFIX | &SYSTEM_PREFIX))
        });
        self.applied = 0;
        self
    }

    /// How many bytes [`StoreCopy::write_to`] writes.
    pub fn encoded_len(&self) -> u64 {
        self.entries
            .iter()
            .map(|(k, v)| 8 + k.len() as u64 + v.len() as u64)
            .sum()
    }

    /// The system value `name` as of the copy.
    pub fn system(&self, name: &[u8]) -> Option<&[u8]> {
        let key = system_key(name);
        self.entries
            .binary_search_by(|(k, _)| k.as_ref().cmp(key.as_slice()))
            .ok()
            .map(|at| self.entries[at].1.as_ref())
    }

    /// Every system value whose name starts with `prefix`, as `(name, value)`.
    pub fn system_scan<'a>(&'a self, prefix: &[u8]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        let prefix = system_key(prefix);
        let from = self
            .entries
            .partition_point(|(k, _)| k.as_ref() < prefix.as_slice());
        self.entries[from..]
            .iter()
            .take_while(move |(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (&k[1..], v.as_ref()))
    }

    /// Writes the copy in the stream format; returns the bytes written.
    pub fn write_to(&self, out: &mut impl Write) -> Result<u64> {
        let mut written = 0u64;
        for (key, value) in &self.entries {
            for part in [key.as_ref(), value.as_ref()] {
                let len = u32::try_from(part.len()).map_err(|_| Error::Corrupted {
                    location: format!("tree {TREE}"),
                    reason: "an entry over 4 GiB".to_string(),
                })?;
                out.write_all(&len.to_be_bytes())
                    .and_then(|()| out.write_all(part))
                    .map_err(|source| Error::Io {
                        context: "writing a copy of the store".to_string(),
                        source,
                    })?;
                written += 4 + part.len() as u64;
            }
        }
        Ok(written)
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the reader ended before the first.
fn read_or_end(input: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads `len` bytes, allocating as they arrive: a length from the network is not
/// trusted to allocate up to 4 GiB before the bytes are there.
fn read_exactly(input: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    input.take(u64::from(len)).read_to_end(&mut out)?;
    if out.len() != len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(out)
}

impl SledKvStore {
    /// A consistent copy of the whole store; see [`StoreCopy`].
    pub fn copy(&self) -> Result<StoreCopy> {
        self.copying.fetch_add(1, Ordering::AcqRel);
        let copied = {
            let _guard = self.lock.read().unwrap_or_else(PoisonError::into_inner);
            self.tree
                .iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(storage_error("copying the store"))
                .map(|entries| StoreCopy {
                    entries,
                    applied: self.applied_index(),
                })
        };
        self.copying.fetch_sub(1, Ordering::AcqRel);
        copied
    }

    /// Whether a [`SledKvStore::copy`] is gathering the store now (a write would wait
    /// for it).
    pub fn copying(&self) -> bool {
        self.copying.load(Ordering::Acquire) > 0
    }

    /// Replaces the whole store with a copy in the stream format, in one atomic batch
    /// (a crash leaves the old state or the new one, never a mix). Not flushed.
    pub fn restore(&self, snapshot: &[u8]) -> Result<()> {
        self.restore_from(&mut &snapshot[..])
    }

    /// [`SledKvStore::restore`] from a reader (a snapshot file). A stream that ends
    /// inside an entry changes nothing.
    pub fn restore_from(&self, input: &mut impl Read) -> Result<()> {
        let bad = |reason: String| Error::Corrupted {
            location: "a received snapshot".to_string(),
            reason,
        };
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let (mut revision, mut applied) = (0i64, 0u64);
        let mut len = [0u8; 4];
        loop {
            match read_or_end(input, &mut len) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(bad(format!("truncated length: {e}"))),
            }
            let key = read_exactly(input, u32::from_be_bytes(len))
                .and_then(|key| input.read_exact(&mut len).map(|()| key))
                .map_err(|e| bad(format!("truncated entry: {e}")))?;
            let value = read_exactly(input, u32::from_be_bytes(len))
                .map_err(|e| bad(format!("truncated entry: {e}")))?;
            if entries.last().is_some_and(|(last, _)| *last >= key) {
                return Err(bad("entries out of key order".to_string()));
            }
            let as_u64 = |v: &[u8]| <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes);
            if key == REVISION_KEY {
                revision = as_u64(&value) as i64;
            } else if key == APPLIED_KEY {
                applied = as_u64(&value);
            }
            entries.push((key, value));
        }
        // A copy from a member that kept no history yet gets one started, in the same
        // batch (and a copy whose entries do not decode changes nothing).
        let entries = super::history::with_history(entries, revision)?;
        let _guard = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut batch = sled::Batch::default();
        for key in self.tree.iter().keys() {
            let key = key.map_err(storage_error("reading keys to replace"))?;
            if entries
                .binary_search_by(|(k, _)| k.as_slice().cmp(key.as_ref()))
                .is_err()
            {
                batch.remove(key);
            }
        }
        for (key, value) in entries {
            batch.insert(key, value);
        }
        self.tree
            .apply_batch(batch)
            .map_err(storage_error("installing a snapshot"))?;
        self.revision.store(revision, Ordering::Release);
        self.applied.store(applied, Ordering::Release);
        self.compacted.store(
            self.read_i64(super::history::COMPACTED_KEY)?,
            Ordering::Release,
        );
        drop(_guard);
        self.load_auth()?;
        // The new state's changes are not listed: every watcher reads the history (and
        // ends as compacted if the snapshot no longer has what it needs).
        self.hub.publish(revision, None);
        Ok(())
    }
}
