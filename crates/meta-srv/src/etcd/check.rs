//! etcd's checks of a request before it runs, with etcd's errors: an empty key, a
//! request over the size limit, too many operations in a transaction, a key written
//! twice in one, a put that keeps the value or lease but gives one.

use meta_proto::etcd::etcdserverpb as epb;
use prost::Message;
use tonic::Status;

use common_meta::kv::{KvLimits, key_in_span};

use super::status::{
    DUPLICATE_KEY, EMPTY_KEY, LEASE_PROVIDED, REQUEST_TOO_LARGE, TOO_MANY_OPS, VALUE_PROVIDED,
};

/// Refuses a request whose encoding is over `max_request_bytes`.
pub fn size<M: Message>(message: &M, limits: &KvLimits) -> Result<(), Status> {
    if message.encoded_len() > limits.max_request_bytes {
        return Err(REQUEST_TOO_LARGE.status());
    }
    Ok(())
}

/// A range needs a key.
pub fn range(r: &epb::RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(EMPTY_KEY.status());
    }
    Ok(())
}

/// A put needs a key, and gives no value (lease) when it keeps the current one.
pub fn put(r: &epb::PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(EMPTY_KEY.status());
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(VALUE_PROVIDED.status());
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(LEASE_PROVIDED.status());
    }
    Ok(())
}

/// A delete needs a key.
pub fn delete_range(r: &epb::DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(EMPTY_KEY.status());
    }
    Ok(())
}

/// A transaction: each list within `max_txn_ops`, each operation valid, and no key
/// written twice by the operations that run together.
pub fn txn(r: &epb::TxnRequest, limits: &KvLimits) -> Result<(), Status> {
    check_ops(r, limits)?;
    for branch in [&r.success, &r.failure] {
        writes(branch)?;
    }
    Ok(())
}

fn check_ops(r: &epb::TxnRequest, limits: &KvLimits) -> Result<(), Status> {
    use epb::request_op::Request;
    if r.compare.len() > limits.max_txn_ops
        || r.success.len() > limits.max_txn_ops
        || r.failure.len() > limits.max_txn_ops
    {
        return Err(TOO_MANY_OPS.status());
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(range)) => self::range(range)?,
            Some(Request::RequestPut(put)) => self::put(put)?,
            Some(Request::RequestDeleteRange(delete)) => delete_range(delete)?,
            Some(Request::RequestTxn(nested)) => check_ops(nested, limits)?,
            None => {}
        }
    }
    Ok(())
}

/// The keys a branch puts and the ranges it deletes (a nested transaction's either
/// branch may run with it); refuses a key put twice, or put and deleted.
fn writes(branch: &[epb::RequestOp]) -> Result<Writes, Status> {
    use epb::request_op::Request;
    let mut mine = Writes::default();
    for op in branch {
        match &op.request {
            Some(Request::RequestPut(put)) => {
                if mine.puts.contains(&put.key) {
                    return Err(DUPLICATE_KEY.status());
                }
                mine.puts.push(put.key.clone());
            }
            Some(Request::RequestDeleteRange(delete)) => {
                mine.deletes
                    .push((delete.key.clone(), delete.range_end.clone()));
            }
            Some(Request::RequestTxn(nested)) => {
                let inner = [writes(&nested.success)?, writes(&nested.failure)?];
                // Either branch runs with the operations before it, never both.
                if inner
                    .iter()
                    .any(|branch| branch.puts.iter().any(|key| mine.puts.contains(key)))
                {
                    return Err(DUPLICATE_KEY.status());
                }
                for branch in inner {
                    mine.absorb(branch);
                }
            }
            Some(Request::RequestRange(_)) | None => {}
        }
    }
    if mine.puts.iter().any(|key| {
        mine.deletes
            .iter()
            .any(|(start, end)| key_in_span(key, start, end))
    }) {
        return Err(DUPLICATE_KEY.status());
    }
    Ok(mine)
}

#[derive(Default)]
struct Writes {
    puts: Vec<Vec<u8>>,
    deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Writes {
    fn absorb(&mut self, other: Writes) {
        for key in other.puts {
            if !self.puts.contains(&key) {
                self.puts.push(key);
            }
        }
        self.deletes.extend(other.deletes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use epb::request_op::Request;

    fn put_op(key: &str) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(Request::RequestPut(epb::PutRequest {
                key: key.into(),
                ..Default::default()
            })),
        }
    }

    fn delete_op(key: &str, end: &str) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(Request::RequestDeleteRange(epb::DeleteRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn nested(success: Vec<epb::RequestOp>, failure: Vec<epb::RequestOp>) -> epb::RequestOp {
        epb::RequestOp {
            request: Some(Request::RequestTxn(epb::TxnRequest {
                success,
                failure,
                ..Default::default()
            })),
        }
    }

    fn verdict(success: Vec<epb::RequestOp>) -> Result<(), String> {
        let r = epb::TxnRequest {
            success,
            ..Default::default()
        };
        txn(&r, &KvLimits::default()).map_err(|s| s.message().to_string())
    }

    #[test]
    fn keys_written_twice_are_refused_as_etcd_does() {
        let dup = Err(DUPLICATE_KEY.text().to_string());
        assert_eq!(verdict(vec![put_op("a"), put_op("b")]), Ok(()));
        assert_eq!(verdict(vec![put_op("a"), put_op("a")]), dup);
        assert_eq!(verdict(vec![put_op("b"), delete_op("a", "c")]), dup);
        assert_eq!(verdict(vec![put_op("c"), delete_op("a", "c")]), Ok(()));
        assert_eq!(
            verdict(vec![delete_op("a", "c"), delete_op("b", "d")]),
            Ok(())
        );
        // A nested transaction's branches never run together, but either runs with
        // the outer operations.
        assert_eq!(
            verdict(vec![nested(vec![put_op("a")], vec![put_op("a")])]),
            Ok(())
        );
        assert_eq!(
            verdict(vec![put_op("a"), nested(vec![], vec![put_op("a")])]),
            dup
        );
    }

    #[test]
    fn puts_and_counts_are_checked() {
        assert_eq!(verdict(vec![put_op("")]), Err(EMPTY_KEY.text().to_string()));
        let keeps_value = epb::RequestOp {
            request: Some(Request::RequestPut(epb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ignore_value: true,
                ..Default::default()
            })),
        };
        assert_eq!(
            verdict(vec![keeps_value]),
            Err(VALUE_PROVIDED.text().to_string())
        );
        let limits = KvLimits::default();
        let many = (0..=limits.max_txn_ops)
            .map(|i| put_op(&format!("k{i}")))
            .collect();
        assert_eq!(verdict(many), Err(TOO_MANY_OPS.text().to_string()));
    }
}
