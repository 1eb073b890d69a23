//! Leases in [`SledKvStore`]: their records and the keys attached to each.
//!
//! ```text
//! 0x06 {id i64 BE}          -> meta.v1.LeaseRecord (granted TTL, checkpointed remaining)
//! 0x07 {id i64 BE}{key}     -> empty: `key` is attached to lease `id`
//! ```
//!
//! Both are written in the batch of the write that changes them: a grant or revoke
//! command, a checkpoint, or any write that attaches a key to a lease or detaches it
//! (a put with another lease or none, a delete). Expiry is not the store's: the leader
//! decides it by its clock and proposes a revoke.

use std::collections::BTreeMap;

use meta_proto::v1 as pb;
use prost::Message as _;

use super::{SledKvStore, TREE, storage_error};
use crate::error::{Error, Result};
use crate::kv::engine::Entry;

pub(super) const LEASE_PREFIX: u8 = 0x06;
pub(super) const ATTACHED_PREFIX: u8 = 0x07;

pub(super) fn lease_key(id: i64) -> [u8; 9] {
    let mut key = [LEASE_PREFIX; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

fn attached_prefix(id: i64) -> [u8; 9] {
    let mut key = [ATTACHED_PREFIX; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

pub(super) fn attached_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut out = attached_prefix(id).to_vec();
    out.extend_from_slice(key);
    out
}

fn decode_record(id: i64, bytes: &[u8]) -> Result<pb::LeaseRecord> {
    pb::LeaseRecord::decode(bytes).map_err(|e| Error::Corrupted {
        location: format!("tree {TREE} lease {id}"),
        reason: e.to_string(),
    })
}

/// Adds to `batch` the attachment changes of a group's key changes: for each key, its
/// lease before the group (`before`) against its lease after.
pub(super) fn record_attachments(
    batch: &mut sled::Batch,
    changes: &BTreeMap<Vec<u8>, Option<Entry>>,
    before: &BTreeMap<Vec<u8>, Option<Entry>>,
) {
    for (key, after) in changes {
        let before = before
            .get(key)
            .and_then(Option::as_ref)
            .map_or(0, |e| e.lease);
        let after = after.as_ref().map_or(0, |e| e.lease);
        if before == after {
            continue;
        }
        if before != 0 {
            batch.remove(attached_key(before, key));
        }
        if after != 0 {
            batch.insert(attached_key(after, key), Vec::new());
        }
    }
}

impl SledKvStore {
    /// Lease `id`'s record, if it exists.
    pub fn lease(&self, id: i64) -> Result<Option<pb::LeaseRecord>> {
        match self
            .tree
            .get(lease_key(id))
            .map_err(storage_error("reading a lease"))?
        {
            None => Ok(None),
            Some(bytes) => decode_record(id, &bytes).map(Some),
        }
    }

    /// Every lease with its record, by id.
    pub fn leases(&self) -> Result<Vec<(i64, pb::LeaseRecord)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([LEASE_PREFIX]) {
            let (key, value) = item.map_err(storage_error("listing leases"))?;
            let id = <[u8; 8]>::try_from(&key[1..])
                .map(i64::from_be_bytes)
                .map_err(|_| Error::Corrupted {
                    location: format!("tree {TREE} lease key {key:?}"),
                    reason: "not 8 bytes of id".to_string(),
                })?;
            out.push((id, decode_record(id, &value)?));
        }
        Ok(out)
    }

    /// The keys attached to lease `id`, in key order.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(attached_prefix(id)) {
            let (key, _) = item.map_err(storage_error("listing a lease's keys"))?;
            out.push(key[9..].to_vec());
        }
        Ok(out)
    }
}
