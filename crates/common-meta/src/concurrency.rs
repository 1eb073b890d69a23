//! Locks and leader elections over any [`KvBackend`], in the style of etcd's
//! `concurrency` package: one algorithm, used by meta-client's `Mutex` and `Election`
//! and by the server's etcd `Lock` and `Election` services.
//!
//! A contender writes one key `{prefix}{lease id in hex}` attached to its lease, created
//! in a transaction that leaves an existing key alone. The contender whose key has the
//! lowest create revision holds the lock (or leads); the others each watch the key just
//! ahead of theirs and look again when it is deleted (released, resigned, or gone with
//! its lease), so a release wakes one contender, not all.
//!
//! The holder's key create revision is a **fencing token**: it only grows. A write that
//! must only happen while the lock is held compares it ([`Held::still_held`]) in the
//! same transaction, so a holder whose lease expired cannot write.

use crate::kv::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, EventKind, KeyValue, KvBackend,
    PutRequest, RangeRequest, TxnOp, TxnOpResponse, TxnRequest, WatchRequest, WatchResponse,
};
use crate::{Error, Result};

/// A contender's key and its create revision (the fencing token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The contender's key.
    pub key: Vec<u8>,
    /// Its create revision: only grows from holder to holder.
    pub token: i64,
}

impl Held {
    /// The compare that holds only while this contender still holds: use it in the
    /// transaction of any write the lock guards.
    pub fn still_held(&self) -> Compare {
        Compare::new(
            self.key.clone(),
            CompareOp::Equal,
            CompareTarget::CreateRevision(self.token),
        )
    }
}

/// The contender key of `lease` under `prefix`: the prefix, then the lease id in hex.
pub fn contender_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

/// Writes the contender's key `key` (with `value`, attached to `lease`) unless it is
/// there already, then waits until it is first in line under `prefix`.
pub async fn queue_and_wait(
    kv: &dyn KvBackend,
    key: Vec<u8>,
    lease: i64,
    prefix: &[u8],
    value: &[u8],
) -> Result<Held> {
    let txn = TxnRequest {
        compare: vec![Compare::new(
            key.clone(),
            CompareOp::Equal,
            CompareTarget::CreateRevision(0),
        )],
        success: vec![TxnOp::Put(
            PutRequest::new(key.clone(), value.to_vec()).with_lease(lease),
        )],
        failure: vec![TxnOp::Range(RangeRequest::key(key.clone()))],
    };
    let response = kv.txn(txn).await?;
    let token = if response.succeeded {
        response.revision
    } else {
        match response.responses.into_iter().next() {
            Some(TxnOpResponse::Range(r)) => {
                r.kvs.first().map(|kv| kv.create_revision).ok_or_else(|| {
                    Error::FailedPrecondition {
                        message: "the contender's key vanished while queueing".to_string(),
                    }
                })?
            }
            other => {
                return Err(Error::Remote {
                    code: "Internal".to_string(),
                    message: format!("a queueing txn answered {other:?}"),
                });
            }
        }
    };
    let held = Held { key, token };
    loop {
        let line = kv.range(RangeRequest::prefix(prefix.to_vec())).await?;
        if !line.kvs.iter().any(|kv| kv.key == held.key) {
            return Err(Error::FailedPrecondition {
                message: format!("the lease {lease:x} ended while waiting"),
            });
        }
        // The contender just ahead of this one, if any.
        let ahead = line
            .kvs
            .iter()
            .filter(|kv| kv.create_revision < token)
            .max_by_key(|kv| kv.create_revision);
        let Some(ahead) = ahead else {
            return Ok(held);
        };
        wait_for_delete(kv, &ahead.key, line.revision + 1).await?;
    }
}

/// Returns once `key` is deleted at or after revision `from`.
pub async fn wait_for_delete(kv: &dyn KvBackend, key: &[u8], from: i64) -> Result<()> {
    let mut stream = kv
        .watch(WatchRequest::key(key.to_vec()).from_revision(from))
        .await?;
    while let Some(response) = stream.next().await {
        if let WatchResponse::Events { events, .. } = response?
            && events.iter().any(|e| e.kind == EventKind::Delete)
        {
            return Ok(());
        }
    }
    Err(Error::Unavailable {
        message: "the watch on the contender ahead ended".to_string(),
    })
}

/// Deletes the contender's key if it is still the one created at its token.
pub async fn leave(kv: &dyn KvBackend, held: &Held) -> Result<()> {
    let txn = TxnRequest {
        compare: vec![held.still_held()],
        success: vec![TxnOp::DeleteRange(DeleteRangeRequest::key(
            held.key.clone(),
        ))],
        failure: Vec::new(),
    };
    kv.txn(txn).await.map(drop)
}

/// Sets the value of a held key (an election's proclamation); `false` when it is no
/// longer held.
pub async fn proclaim(kv: &dyn KvBackend, held: &Held, lease: i64, value: &[u8]) -> Result<bool> {
    let txn = TxnRequest {
        compare: vec![held.still_held()],
        success: vec![TxnOp::Put(
            PutRequest::new(held.key.clone(), value.to_vec()).with_lease(lease),
        )],
        failure: Vec::new(),
    };
    Ok(kv.txn(txn).await?.succeeded)
}

/// The first contender under `prefix` (the holder, the leader), with the revision
/// the answer was read at.
pub async fn first_in_line(kv: &dyn KvBackend, prefix: &[u8]) -> Result<(Option<KeyValue>, i64)> {
    let line = kv.range(RangeRequest::prefix(prefix.to_vec())).await?;
    let revision = line.revision;
    Ok((
        line.kvs.into_iter().min_by_key(|kv| kv.create_revision),
        revision,
    ))
}
