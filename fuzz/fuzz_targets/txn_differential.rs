//! Transactions from the wire (`meta.v1.TxnRequest` bytes, as a client sends them,
//! nested transactions, range and lease compares and puts keeping a value included),
//! executed by the real engine (through `MemoryKvBackend`) and by a plain model written
//! from etcd's rules: every answer the engine gives, and the store it leaves, must be
//! the model's. The engine may refuse a request (limits, bad fields); the model is not
//! asked about refused requests, which must change nothing.
//!
//! Input: a sequence of `[u16 LE length][TxnRequest bytes]`.
#![no_main]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use common_meta::kv::{
    Compare, CompareOp, CompareTarget, DeleteRangeResponse, KeyValue, KvBackend, MemoryKvBackend,
    PutResponse, RangeRequest, RangeResponse, TxnOp, TxnOpResponse, TxnRequest, TxnResponse,
};
use meta_proto::v1 as pb;
use prost::Message as _;

/// The memory backend never waits: its futures finish on the first poll.
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("the memory backend waited"),
    }
}

#[derive(Clone, Debug)]
struct Record {
    value: Vec<u8>,
    create: i64,
    modified: i64,
    version: i64,
}

#[derive(Default)]
struct Model {
    revision: i64,
    keys: BTreeMap<Vec<u8>, Record>,
}

fn in_span(key: &[u8], start: &[u8], range_end: &[u8]) -> bool {
    match range_end {
        [] => key == start,
        [0] => key >= start,
        end => key >= start && key < end,
    }
}

fn kv(key: &[u8], record: &Record, with_value: bool) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: if with_value {
            record.value.clone()
        } else {
            Vec::new()
        },
        create_revision: record.create,
        mod_revision: record.modified,
        version: record.version,
        lease: 0,
    }
}

/// Whether one key (`None`: absent) passes a compare: an absent key has version,
/// revisions and lease 0 and fails every value compare. No lease is ever granted
/// here, so every key's lease is 0.
fn passes(c: &Compare, record: Option<&Record>) -> bool {
    let ordering = match (&c.target, record) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(r)) => r.value.cmp(v),
        (CompareTarget::Version(v), r) => r.map_or(0, |r| r.version).cmp(v),
        (CompareTarget::CreateRevision(v), r) => r.map_or(0, |r| r.create).cmp(v),
        (CompareTarget::ModRevision(v), r) => r.map_or(0, |r| r.modified).cmp(v),
        (CompareTarget::Lease(v), _) => 0.cmp(v),
    };
    match c.op {
        CompareOp::Equal => ordering.is_eq(),
        CompareOp::NotEqual => ordering.is_ne(),
        CompareOp::Less => ordering.is_lt(),
        CompareOp::Greater => ordering.is_gt(),
    }
}

/// Whether a compare holds: for a range, every key in it passes, and an empty range
/// is one absent key.
fn holds(keys: &BTreeMap<Vec<u8>, Record>, c: &Compare) -> bool {
    if c.range_end.is_empty() {
        return passes(c, keys.get(&c.key));
    }
    let matched: Vec<&Record> = keys
        .iter()
        .filter(|(k, _)| in_span(k, &c.key, &c.range_end))
        .map(|(_, r)| r)
        .collect();
    if matched.is_empty() {
        passes(c, None)
    } else {
        matched.into_iter().all(|r| passes(c, Some(r)))
    }
}

/// Runs one transaction level on `keys` (writes at revision `next`); revisions of the
/// answers are set afterwards by `stamp`.
fn run(
    keys: &mut BTreeMap<Vec<u8>, Record>,
    next: i64,
    wrote: &mut bool,
    txn: &TxnRequest,
) -> TxnResponse {
    let succeeded = txn.compare.iter().all(|c| holds(keys, c));
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let mut responses = Vec::new();
    for op in ops {
        responses.push(match op {
            TxnOp::Range(r) => {
                let matched: Vec<KeyValue> = keys
                    .iter()
                    .filter(|(k, _)| in_span(k, &r.key, &r.range_end))
                    .map(|(k, rec)| kv(k, rec, !r.keys_only))
                    .collect();
                let count = matched.len() as i64;
                let limit = if r.limit > 0 {
                    r.limit as usize
                } else {
                    usize::MAX
                };
                let kvs = if r.count_only {
                    Vec::new()
                } else {
                    matched.into_iter().take(limit).collect()
                };
                TxnOpResponse::Range(RangeResponse {
                    revision: 0,
                    more: !r.count_only && (count as usize) > limit,
                    kvs,
                    count,
                })
            }
            TxnOp::Put(p) => {
                let prev = keys.get(&p.key).cloned();
                let value = match &prev {
                    Some(prev) if p.ignore_value => prev.value.clone(),
                    // The engine refuses the whole request instead.
                    None if p.ignore_value || p.ignore_lease => {
                        panic!("a put keeping a missing key's value or lease was accepted")
                    }
                    _ => p.value.clone(),
                };
                keys.insert(
                    p.key.clone(),
                    Record {
                        value,
                        create: prev.as_ref().map_or(next, |r| r.create),
                        modified: next,
                        version: prev.as_ref().map_or(1, |r| r.version + 1),
                    },
                );
                *wrote = true;
                TxnOpResponse::Put(PutResponse {
                    revision: 0,
                    prev_kv: prev.filter(|_| p.prev_kv).map(|r| kv(&p.key, &r, true)),
                })
            }
            TxnOp::DeleteRange(d) => {
                let doomed: Vec<KeyValue> = keys
                    .iter()
                    .filter(|(k, _)| in_span(k, &d.key, &d.range_end))
                    .map(|(k, rec)| kv(k, rec, true))
                    .collect();
                for gone in &doomed {
                    keys.remove(&gone.key);
                }
                *wrote |= !doomed.is_empty();
                TxnOpResponse::DeleteRange(DeleteRangeResponse {
                    revision: 0,
                    deleted: doomed.len() as i64,
                    prev_kvs: if d.prev_kv { doomed } else { Vec::new() },
                })
            }
            TxnOp::Txn(nested) => TxnOpResponse::Txn(run(keys, next, wrote, nested)),
        });
    }
    TxnResponse {
        revision: 0,
        succeeded,
        responses,
    }
}

/// Sets the revision of an answer and of every answer in it.
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

impl Model {
    fn txn(&mut self, txn: &TxnRequest) -> TxnResponse {
        let next = self.revision + 1;
        let mut keys = self.keys.clone();
        let mut wrote = false;
        let mut response = run(&mut keys, next, &mut wrote, txn);
        if wrote {
            self.revision = next;
            self.keys = keys;
        }
        stamp(&mut response, self.revision);
        response
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let backend = MemoryKvBackend::default();
    let mut model = Model::default();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        let Ok(wire) = pb::TxnRequest::decode(body) else {
            continue;
        };
        let Ok(txn) = TxnRequest::try_from(wire) else {
            continue;
        };
        let before = model.revision;
        match now(backend.txn(txn.clone())) {
            Ok(answer) => assert_eq!(answer, model.txn(&txn), "{txn:?}"),
            Err(_) => {
                let all = now(backend.range(RangeRequest::prefix(Vec::new())))
                    .expect("a full range is served");
                assert_eq!(all.revision, before, "a refused request changed the store");
            }
        }
    }
    let all = now(backend.range(RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    }))
    .expect("a full range is served");
    let expected: Vec<KeyValue> = model
        .keys
        .iter()
        .filter(|(k, _)| k.as_slice() >= [0u8].as_slice())
        .map(|(k, r)| kv(k, r, true))
        .collect();
    assert_eq!(all.kvs, expected, "the store the engine left");
    assert_eq!(all.revision, model.revision);
});
