//! Id sequences: `__seq/{name}` holds the next id no one has reserved yet (decimal
//! text). An allocator reserves a batch of ids with one compare-and-put of that mark
//! and hands them out from memory, so most allocations cost no write.
//!
//! Ids are unique whatever happens (a reservation is a committed compare-and-put), and
//! a new allocator (a new leader) starts above every id any allocator reserved before
//! it. Ids an allocator reserved but never handed out are skipped: a sequence has gaps.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::key::{MetaKey, SequenceKey};
use crate::kv::{CompareAndPutRequest, KvBackend};

/// Most ids one call may ask for.
pub const MAX_IDS_PER_CALL: u64 = 1_000_000;

/// Compare-and-put attempts before an allocation gives up (other allocators kept
/// winning the race).
const MAX_ATTEMPTS: usize = 64;

/// Hands out ids of one sequence; see the module doc.
pub struct Sequence {
    backend: Arc<dyn KvBackend>,
    key: SequenceKey,
    /// The first id of a sequence never used.
    start: u64,
    /// Ids reserved per write.
    batch: u64,
    /// Reserved and not yet handed out.
    cached: Mutex<Range<u64>>,
    /// Held while a reservation is being written.
    reserving: tokio::sync::Mutex<()>,
}

impl Sequence {
    /// The sequence `name` on `backend`, starting at `start`, reserving `batch` ids per
    /// write (at least 1).
    pub fn new(backend: Arc<dyn KvBackend>, name: &str, start: u64, batch: u64) -> Result<Self> {
        Ok(Sequence {
            backend,
            key: SequenceKey::new(name)?,
            start,
            batch: batch.max(1),
            cached: Mutex::new(0..0),
            reserving: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Range<u64>> {
        // Only whole-range replacements happen under the lock: never torn.
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `count` consecutive new ids.
    pub async fn next(&self, count: u64) -> Result<Range<u64>> {
        if count == 0 || count > MAX_IDS_PER_CALL {
            return Err(Error::invalid_argument(format!(
                "asked for {count} ids of sequence {}; ask for 1 to {MAX_IDS_PER_CALL}",
                self.key.name()
            )));
        }
        if let Some(out) = self.take(count) {
            return Ok(out);
        }
        // One reservation at a time: callers that find the cache empty together wait
        // for one write instead of racing each other's compare-and-puts (an async
        // lock: waiting parks the task, not the thread).
        let _reserving = self.reserving.lock().await;
        if let Some(out) = self.take(count) {
            return Ok(out);
        }
        let reserved = self.reserve(count.max(self.batch)).await?;
        let out = reserved.start..reserved.start + count;
        let mut cached = self.cached();
        // Another allocator of the same sequence (a test, or a process racing this
        // one) may have filled the cache meanwhile: keep the later remainder, so ids
        // handed out here only grow (the other becomes a gap).
        if out.end > cached.start {
            *cached = out.end..reserved.end;
        }
        Ok(out)
    }

    /// `count` ids from the reserved ones, if there are enough.
    fn take(&self, count: u64) -> Option<Range<u64>> {
        let mut cached = self.cached();
        if cached.end - cached.start >= count {
            let out = cached.start..cached.start + count;
            cached.start = out.end;
            return Some(out);
        }
        None
    }

    /// Forgets the ids reserved and not handed out (on losing leadership: the next
    /// allocator starts above them).
    pub fn reset(&self) {
        *self.cached() = 0..0;
    }

    /// Reserves `count` ids in the store.
    async fn reserve(&self, count: u64) -> Result<Range<u64>> {
        let key = self.key.encode();
        for _ in 0..MAX_ATTEMPTS {
            let stored = self.backend.get(&key).await?.map(|kv| kv.value);
            let first = match &stored {
                None => self.start,
                // Never below the start, whoever wrote the mark.
                Some(bytes) => std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    .ok_or_else(|| Error::Corrupted {
                        location: format!("sequence {}", self.key.name()),
                        reason: format!("{:?} is not a number", String::from_utf8_lossy(bytes)),
                    })?
                    .max(self.start),
            };
            let end = first.checked_add(count).ok_or_else(|| {
                Error::invalid_argument(format!("sequence {} is exhausted", self.key.name()))
            })?;
            let written = self
                .backend
                .compare_and_put(CompareAndPutRequest {
                    key: key.clone(),
                    expect: stored,
                    value: end.to_string().into_bytes(),
                })
                .await?;
            if written.success {
                return Ok(first..end);
            }
        }
        Err(Error::Unavailable {
            message: format!(
                "sequence {}: {MAX_ATTEMPTS} reservations lost to other allocators; retry",
                self.key.name()
            ),
        })
    }
}

/// The sequences of one leader, by name, made on first use: `table_id` starts at
/// [`FIRST_TABLE_ID`](crate::model::table::FIRST_TABLE_ID), any other at 1.
pub struct Sequences {
    backend: Arc<dyn KvBackend>,
    batch: u64,
    by_name: Mutex<std::collections::HashMap<String, Arc<Sequence>>>,
}

/// The sequence of table ids.
pub const TABLE_ID_SEQUENCE: &str = "table_id";

impl Sequences {
    /// Sequences on `backend` reserving `batch` ids per write.
    pub fn new(backend: Arc<dyn KvBackend>, batch: u64) -> Self {
        Sequences {
            backend,
            batch,
            by_name: Mutex::default(),
        }
    }

    fn sequence(&self, name: &str) -> Result<Arc<Sequence>> {
        let mut by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sequence) = by_name.get(name) {
            return Ok(sequence.clone());
        }
        let start = match name {
            TABLE_ID_SEQUENCE => u64::from(crate::model::table::FIRST_TABLE_ID),
            _ => 1,
        };
        let sequence = Arc::new(Sequence::new(
            self.backend.clone(),
            name,
            start,
            self.batch,
        )?);
        by_name.insert(name.to_string(), sequence.clone());
        Ok(sequence)
    }

    /// `count` new ids of sequence `name`.
    pub async fn next(&self, name: &str, count: u64) -> Result<Range<u64>> {
        self.sequence(name)?.next(count).await
    }

    /// Forgets every reserved id (see [`Sequence::reset`]): call on every change of
    /// leadership.
    pub fn reset(&self) {
        let by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        for sequence in by_name.values() {
            sequence.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{MemoryKvBackend, PutRequest};

    fn backend() -> Arc<dyn KvBackend> {
        Arc::new(MemoryKvBackend::default())
    }

    #[tokio::test]
    async fn ids_are_consecutive_and_one_write_reserves_a_batch() {
        let kv = backend();
        let seq = Sequence::new(kv.clone(), "table_id", 1024, 100).unwrap();
        assert_eq!(seq.next(1).await.unwrap(), 1024..1025);
        let revision = kv
            .get(b"__seq/table_id")
            .await
            .unwrap()
            .unwrap()
            .mod_revision;
        assert_eq!(seq.next(5).await.unwrap(), 1025..1030);
        assert_eq!(seq.next(94).await.unwrap(), 1030..1124);
        let now = kv.get(b"__seq/table_id").await.unwrap().unwrap();
        assert_eq!(now.mod_revision, revision, "served from the batch");
        assert_eq!(now.value, b"1124");
        // Past the batch: a new reservation; a large ask reserves what it needs.
        assert_eq!(seq.next(250).await.unwrap(), 1124..1374);
        assert_eq!(
            kv.get(b"__seq/table_id").await.unwrap().unwrap().value,
            b"1374"
        );
    }

    #[tokio::test]
    async fn a_new_allocator_starts_above_everything_reserved_before_it() {
        let kv = backend();
        let old = Sequence::new(kv.clone(), "s", 1, 10).unwrap();
        let a = old.next(3).await.unwrap();
        let new = Sequence::new(kv.clone(), "s", 1, 10).unwrap();
        let b = new.next(3).await.unwrap();
        assert!(
            b.start >= 11,
            "above the old allocator's batch: {a:?} then {b:?}"
        );
        // The old one (a deposed leader) still hands out only its own reservation.
        let c = old.next(3).await.unwrap();
        assert!(c.end <= 11);
        old.reset();
        assert!(old.next(1).await.unwrap().start >= b.end);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_never_share_an_id() {
        let kv = backend();
        let seq = Arc::new(Sequence::new(kv, "s", 0, 7).unwrap());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let seq = seq.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for n in 1..=20 {
                    got.extend(seq.next(n % 5 + 1).await.unwrap());
                }
                got
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), total, "every id handed out once");
    }

    #[tokio::test]
    async fn bad_asks_and_a_corrupt_mark_are_refused() {
        let kv = backend();
        let seq = Sequence::new(kv.clone(), "s", 0, 10).unwrap();
        for count in [0, MAX_IDS_PER_CALL + 1] {
            let err = seq.next(count).await.unwrap_err().to_string();
            assert!(err.contains("ask for 1 to"), "{err}");
        }
        assert!(Sequence::new(kv.clone(), "a/b", 0, 1).is_err());
        kv.put(PutRequest::new("__seq/s", "twelve")).await.unwrap();
        let err = seq.next(1).await.unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
        kv.put(PutRequest::new("__seq/s", u64::MAX.to_string()))
            .await
            .unwrap();
        let err = seq.next(1).await.unwrap_err().to_string();
        assert!(err.contains("exhausted"), "{err}");
    }

    #[tokio::test]
    async fn table_ids_start_at_1024_others_at_1_and_a_reset_moves_on() {
        let kv = backend();
        let sequences = Sequences::new(kv.clone(), 10);
        assert_eq!(
            sequences.next(TABLE_ID_SEQUENCE, 2).await.unwrap(),
            1024..1026
        );
        assert_eq!(sequences.next("region", 1).await.unwrap(), 1..2);
        // A mark below the start (written by anyone) never brings ids under it.
        kv.put(PutRequest::new("__seq/table_id", "5"))
            .await
            .unwrap();
        sequences.reset();
        assert_eq!(
            sequences.next(TABLE_ID_SEQUENCE, 1).await.unwrap(),
            1024..1025
        );
        sequences.reset();
        // The reset dropped 1025..1034: the next reservation starts above them.
        assert_eq!(
            sequences.next(TABLE_ID_SEQUENCE, 1).await.unwrap(),
            1034..1035
        );
        assert!(sequences.next("bad/name", 1).await.is_err());
    }

    /// A backend that lets other tasks run before every call, as a network would.
    struct Yielding(Arc<dyn KvBackend>);

    #[async_trait::async_trait]
    impl KvBackend for Yielding {
        fn name(&self) -> &'static str {
            "yielding"
        }

        async fn txn(&self, req: crate::kv::TxnRequest) -> Result<crate::kv::TxnResponse> {
            tokio::task::yield_now().await;
            self.0.txn(req).await
        }
    }

    #[tokio::test]
    async fn callers_that_miss_together_share_one_reservation() {
        let kv = backend();
        let yielding: Arc<dyn KvBackend> = Arc::new(Yielding(kv.clone()));
        let seq = Arc::new(Sequence::new(yielding, "s", 1, 100).unwrap());
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let seq = seq.clone();
                tokio::spawn(async move { seq.next(1).await.unwrap() })
            })
            .collect();
        let mut got = Vec::new();
        for caller in callers {
            got.push(caller.await.unwrap().start);
        }
        got.sort_unstable();
        assert_eq!(got, (1..33).collect::<Vec<_>>());
        let mark = kv.get(b"__seq/s").await.unwrap().unwrap();
        assert_eq!(mark.version, 1, "one write for the 32 ids");
    }
}
