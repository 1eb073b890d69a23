//! The pure KV executor shared by every local backend.
//!
//! [`execute`] runs one [`TxnRequest`] against a read view and returns the response and
//! the writes to make, without touching storage itself: the memory backend applies the
//! [`WriteSet`] to a `BTreeMap`, the sled backend to one atomic sled batch. Every KV call
//! is a transaction here, so the revision, version and `prev_kv` rules live in one place.
//!
//! Determinism: no clocks and no randomness, so the same request on the same state gives
//! the same result on every replica.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::collections::btree_map;
use std::iter::Peekable;
use std::ops::Bound;

use crate::error::{Error, Result};
use crate::kv::limits::KvLimits;
use crate::kv::types::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, KeyValue,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnOp, TxnOpResponse, TxnRequest,
    TxnResponse,
};

/// What the store holds for one live key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to (0 = none).
    pub lease: i64,
    pub value: Vec<u8>,
}

/// Bytes of the fixed header of an encoded [`Entry`]: three big-endian i64.
const ENTRY_HEADER: usize = 24;

/// Set in the encoded version when a lease id follows the header (versions are never
/// negative, so entries written before leases existed never have it).
const LEASE_FLAG: i64 = i64::MIN;

impl Entry {
    pub(crate) fn to_key_value(&self, key: &[u8], keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if keys_only {
                Vec::new()
            } else {
                self.value.clone()
            },
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }

    /// The on-disk form: create, mod, version (big-endian i64 each; the version's sign
    /// bit set when a lease is attached), the lease id (only then), then the value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENTRY_HEADER + 8 + self.value.len());
        out.extend_from_slice(&self.create_revision.to_be_bytes());
        out.extend_from_slice(&self.mod_revision.to_be_bytes());
        if self.lease == 0 {
            out.extend_from_slice(&self.version.to_be_bytes());
        } else {
            out.extend_from_slice(&(self.version | LEASE_FLAG).to_be_bytes());
            out.extend_from_slice(&self.lease.to_be_bytes());
        }
        out.extend_from_slice(&self.value);
        out
    }

    /// Decodes [`Entry::encode`]'s output; `Err` carries the reason.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Entry, String> {
        if bytes.len() < ENTRY_HEADER {
            return Err(format!(
                "entry of {} bytes is shorter than its {ENTRY_HEADER}-byte header",
                bytes.len()
            ));
        }
        let field = |i: usize| {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            i64::from_be_bytes(buf)
        };
        let version = field(2);
        if version & LEASE_FLAG == 0 {
            return Ok(Entry {
                create_revision: field(0),
                mod_revision: field(1),
                version,
                lease: 0,
                value: bytes[ENTRY_HEADER..].to_vec(),
            });
        }
        if bytes.len() < ENTRY_HEADER + 8 {
            return Err(format!(
                "entry of {} bytes is shorter than its header with a lease",
                bytes.len()
            ));
        }
        Ok(Entry {
            create_revision: field(0),
            mod_revision: field(1),
            version: version & !LEASE_FLAG,
            lease: field(3),
            value: bytes[ENTRY_HEADER + 8..].to_vec(),
        })
    }
}

/// A key and entry as a scan yields them.
pub(crate) type ScanItem = Result<(Vec<u8>, Entry)>;

/// A consistent view of the store the executor reads from.
pub(crate) trait ReadView {
    /// The entry of `key`, if it exists.
    fn get(&self, key: &[u8]) -> Result<Option<Entry>>;
    /// Entries with `start <= key < end` (`end = None`: no upper bound), in key order.
    /// Callers guarantee `start < end`.
    fn scan<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 'a>;
    /// The store as of an earlier `revision`, or the refusal ([`Error::Compacted`],
    /// [`Error::FutureRevision`]).
    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>>;
    /// Whether lease `id` exists (a put may attach keys to it).
    fn lease_exists(&self, id: i64) -> Result<bool>;
}

/// The writes of one transaction: every changed key (`None` = deleted) and the new revision.
#[derive(Debug)]
pub(crate) struct WriteSet {
    pub revision: i64,
    pub changes: BTreeMap<Vec<u8>, Option<Entry>>,
}

/// Runs `txn` against `view`, whose store is at `revision`.
///
/// Returns the response and, if the transaction changed anything, the writes that the
/// caller must apply atomically (together with the new revision) before acknowledging.
pub(crate) fn execute(
    view: &dyn ReadView,
    revision: i64,
    limits: &KvLimits,
    txn: TxnRequest,
) -> Result<(TxnResponse, Option<WriteSet>)> {
    limits.check_txn(&txn)?;
    let mut exec = Executor {
        view,
        overlay: BTreeMap::new(),
        write_revision: revision + 1,
    };
    let mut response = exec.txn(txn)?;
    let (final_revision, writes) = if exec.overlay.is_empty() {
        (revision, None)
    } else {
        let write = WriteSet {
            revision: exec.write_revision,
            changes: exec.overlay,
        };
        (write.revision, Some(write))
    };
    stamp(&mut response, final_revision);
    Ok((response, writes))
}

/// Sets the revision of a transaction's answer and of every answer in it.
fn stamp(response: &mut TxnResponse, revision: i64) {
    response.revision = revision;
    for answer in &mut response.responses {
        match answer {
            TxnOpResponse::Range(r) => r.revision = revision,
            TxnOpResponse::Put(r) => r.revision = revision,
            TxnOpResponse::DeleteRange(r) => r.revision = revision,
            TxnOpResponse::Txn(nested) => stamp(nested, revision),
        }
    }
}

/// The half-open key interval a `(key, range_end)` pair names, etcd style.
enum KeySpan<'a> {
    Single(&'a [u8]),
    Range {
        start: &'a [u8],
        end: Option<&'a [u8]>,
    },
    Empty,
}

fn key_span<'a>(key: &'a [u8], range_end: &'a [u8]) -> KeySpan<'a> {
    match range_end {
        [] => KeySpan::Single(key),
        [0] => KeySpan::Range {
            start: key,
            end: None,
        },
        end if end <= key => KeySpan::Empty,
        end => KeySpan::Range {
            start: key,
            end: Some(end),
        },
    }
}

/// A view with pending changes layered over a base view: `changes` wins on equal keys
/// and its `None`s hide base entries. Transactions read their own writes through one;
/// a group of transactions committed together reads the group's earlier writes.
pub(crate) struct Layered<'a> {
    pub base: &'a dyn ReadView,
    pub changes: &'a BTreeMap<Vec<u8>, Option<Entry>>,
}

impl ReadView for Layered<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        self.base.lease_exists(id)
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        // Pending changes have no revision of their own here: a past revision is the
        // base's.
        self.base.at_revision(revision)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        match self.changes.get(key) {
            Some(entry) => Ok(entry.clone()),
            None => self.base.get(key),
        }
    }

    fn scan<'s>(
        &'s self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 's> {
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        Box::new(Merge {
            base: self.base.scan(start, end).peekable(),
            overlay: self
                .changes
                .range::<[u8], _>((Bound::Included(start), upper))
                .peekable(),
        })
    }
}

struct Executor<'v> {
    view: &'v dyn ReadView,
    /// This transaction's writes so far; later ops read through it.
    overlay: BTreeMap<Vec<u8>, Option<Entry>>,
    write_revision: i64,
}

impl Executor<'_> {
    fn layered(&self) -> Layered<'_> {
        Layered {
            base: self.view,
            changes: &self.overlay,
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        self.layered().get(key)
    }

    /// Visits the live entries of a span in key order until `visit` returns false.
    fn visit(&self, span: KeySpan<'_>, visit: &mut dyn FnMut(&[u8], &Entry) -> bool) -> Result<()> {
        visit_span(&self.layered(), span, visit)
    }

    /// Runs a transaction (the outer one or a nested one) against the current overlay.
    fn txn(&mut self, txn: TxnRequest) -> Result<TxnResponse> {
        let mut succeeded = true;
        for compare in &txn.compare {
            if !self.holds(compare)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                TxnOp::Range(req) => TxnOpResponse::Range(self.range(&req)?),
                TxnOp::Put(req) => TxnOpResponse::Put(self.put(req)?),
                TxnOp::DeleteRange(req) => TxnOpResponse::DeleteRange(self.delete_range(&req)?),
                TxnOp::Txn(nested) => TxnOpResponse::Txn(self.txn(nested)?),
            });
        }
        Ok(TxnResponse {
            revision: 0,
            succeeded,
            responses,
        })
    }

    fn holds(&self, compare: &Compare) -> Result<bool> {
        if compare.range_end.is_empty() {
            let entry = self.get(&compare.key)?;
            return Ok(passes(compare, entry.as_ref()));
        }
        // Every key of the span must pass; an empty span is one absent key.
        let (mut all, mut any) = (true, false);
        self.visit(
            key_span(&compare.key, &compare.range_end),
            &mut |_, entry| {
                any = true;
                all = passes(compare, Some(entry));
                all
            },
        )?;
        Ok(if any { all } else { passes(compare, None) })
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        if req.revision != 0 {
            // As of that revision: before this transaction's own writes.
            let current = self.write_revision - 1;
            if req.revision > current {
                return Err(Error::FutureRevision {
                    requested: req.revision,
                    current,
                });
            }
            if req.revision < 0 {
                return Err(Error::invalid_argument(format!(
                    "range revision {} is negative",
                    req.revision
                )));
            }
            return range_over(&*self.view.at_revision(req.revision)?, req);
        }
        range_over(&self.layered(), req)
    }

    fn put(&mut self, req: PutRequest) -> Result<PutResponse> {
        let prev = self.get(&req.key)?;
        let kept = if req.ignore_value || req.ignore_lease {
            let Some(prev) = &prev else {
                return Err(Error::NotFound {
                    what: format!(
                        "key {:?} (a put that keeps its value or lease needs it)",
                        String::from_utf8_lossy(&req.key)
                    ),
                });
            };
            Some(prev)
        } else {
            None
        };
        let lease = match kept {
            Some(prev) if req.ignore_lease => prev.lease,
            _ => req.lease,
        };
        if lease != 0 && !req.ignore_lease && !self.view.lease_exists(lease)? {
            return Err(Error::LeaseNotFound { id: lease });
        }
        let value = match kept {
            Some(prev) if req.ignore_value => prev.value.clone(),
            _ => req.value,
        };
        let entry = Entry {
            create_revision: prev
                .as_ref()
                .map_or(self.write_revision, |p| p.create_revision),
            mod_revision: self.write_revision,
            version: prev.as_ref().map_or(0, |p| p.version) + 1,
            lease,
            value,
        };
        let prev_kv = prev
            .filter(|_| req.prev_kv)
            .map(|p| p.to_key_value(&req.key, false));
        self.overlay.insert(req.key, Some(entry));
        Ok(PutResponse {
            revision: 0,
            prev_kv,
        })
    }

    fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let mut doomed = Vec::new();
        self.visit(key_span(&req.key, &req.range_end), &mut |key, entry| {
            doomed.push(entry.to_key_value(key, false));
            true
        })?;
        let deleted = i64::try_from(doomed.len())
            .map_err(|_| Error::invalid_argument("delete_range matched too many keys"))?;
        for kv in &doomed {
            self.overlay.insert(kv.key.clone(), None);
        }
        Ok(DeleteRangeResponse {
            revision: 0,
            deleted,
            prev_kvs: if req.prev_kv { doomed } else { Vec::new() },
        })
    }
}

/// Whether one key (`None`: absent) passes a compare. An absent key has version,
/// revisions and lease 0, and fails every value compare.
fn passes(compare: &Compare, entry: Option<&Entry>) -> bool {
    let ordering = match (&compare.target, entry) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(target), Some(e)) => e.value.as_slice().cmp(target.as_slice()),
        (CompareTarget::Version(target), e) => e.map_or(0, |e| e.version).cmp(target),
        (CompareTarget::CreateRevision(target), e) => {
            e.map_or(0, |e| e.create_revision).cmp(target)
        }
        (CompareTarget::ModRevision(target), e) => e.map_or(0, |e| e.mod_revision).cmp(target),
        (CompareTarget::Lease(target), e) => e.map_or(0, |e| e.lease).cmp(target),
    };
    match compare.op {
        CompareOp::Equal => ordering == Ordering::Equal,
        CompareOp::NotEqual => ordering != Ordering::Equal,
        CompareOp::Less => ordering == Ordering::Less,
        CompareOp::Greater => ordering == Ordering::Greater,
    }
}

/// Visits the live entries of a span of `view` in key order until `visit` returns false.
fn visit_span(
    view: &dyn ReadView,
    span: KeySpan<'_>,
    visit: &mut dyn FnMut(&[u8], &Entry) -> bool,
) -> Result<()> {
    match span {
        KeySpan::Empty => Ok(()),
        KeySpan::Single(key) => {
            if let Some(entry) = view.get(key)? {
                visit(key, &entry);
            }
            Ok(())
        }
        KeySpan::Range { start, end } => {
            for item in view.scan(start, end) {
                let (key, entry) = item?;
                if !visit(&key, &entry) {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// A range over `view`: the rules of `limit`, `count`, `more`, `keys_only` and
/// `count_only` in one place, for current and past revisions alike.
fn range_over(view: &dyn ReadView, req: &RangeRequest) -> Result<RangeResponse> {
    let limit = usize::try_from(req.limit).unwrap_or(0);
    let mut response = RangeResponse::default();
    visit_span(
        view,
        key_span(&req.key, &req.range_end),
        &mut |key, entry| {
            response.count += 1;
            if req.count_only {
                return true;
            }
            if limit == 0 || response.kvs.len() < limit {
                response.kvs.push(entry.to_key_value(key, req.keys_only));
            } else {
                response.more = true;
            }
            true
        },
    )?;
    Ok(response)
}

/// Merges a base scan with pending changes (see [`Layered`]).
struct Merge<'a, B: Iterator<Item = ScanItem>> {
    base: Peekable<B>,
    overlay: Peekable<btree_map::Range<'a, Vec<u8>, Option<Entry>>>,
}

impl<B: Iterator<Item = ScanItem>> Iterator for Merge<'_, B> {
    type Item = ScanItem;

    fn next(&mut self) -> Option<ScanItem> {
        loop {
            let take_overlay = match (self.base.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => return self.base.next(),
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(Ok((base_key, _))), Some((over_key, _))) => {
                    match base_key.as_slice().cmp(over_key.as_slice()) {
                        Ordering::Less => false,
                        Ordering::Equal => {
                            // Shadowed by the overlay: drop the base entry.
                            self.base.next();
                            true
                        }
                        Ordering::Greater => true,
                    }
                }
            };
            if !take_overlay {
                return self.base.next();
            }
            if let Some((key, Some(entry))) = self.overlay.next() {
                return Some(Ok((key.clone(), entry.clone())));
            }
            // A deletion in the overlay: nothing to yield for that key.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_rejects_short_input() {
        let entry = Entry {
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 0,
            value: b"hello".to_vec(),
        };
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry.clone()));
        let leased = Entry {
            lease: 77,
            ..entry.clone()
        };
        let encoded = leased.encode();
        assert_eq!(encoded.len(), entry.encode().len() + 8);
        assert_eq!(Entry::decode(&encoded), Ok(leased));
        let err = Entry::decode(&[1, 2, 3]).unwrap_err();
        assert!(err.contains("shorter than"), "{err}");
    }

    #[test]
    fn key_span_follows_etcd_conventions() {
        assert!(matches!(key_span(b"a", b""), KeySpan::Single(b"a")));
        assert!(matches!(
            key_span(b"a", b"\0"),
            KeySpan::Range {
                start: b"a",
                end: None
            }
        ));
        assert!(matches!(
            key_span(b"a", b"b"),
            KeySpan::Range {
                start: b"a",
                end: Some(b"b")
            }
        ));
        assert!(matches!(key_span(b"b", b"a"), KeySpan::Empty));
        assert!(matches!(key_span(b"b", b"b"), KeySpan::Empty));
    }
}
