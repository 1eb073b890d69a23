//! Size and count limits of KV requests, checked by every backend before it executes
//! anything, so a bad request fails the same way whichever backend serves it.

use crate::error::{Error, Result};
use crate::kv::types::{Compare, CompareTarget, TxnOp, TxnRequest};

/// Limits on KV requests. The defaults match etcd's spirit: small keys, values up to
/// 1.5 MiB, and requests that fit comfortably in one consensus entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Largest key, in bytes (also bounds `range_end`).
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
    /// Most compares, and most ops in each of the success and failure lists, of one txn.
    pub max_txn_ops: usize,
    /// Largest request, in bytes (keys, values and ranges added up; on the wire, the encoded size).
    pub max_request_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_bytes: 8 * 1024,
            max_value_bytes: 3 * 512 * 1024,
            max_txn_ops: 128,
            max_request_bytes: 2 * 1024 * 1024,
        }
    }
}

impl KvLimits {
    /// No limit at all: for applying already-committed replicated entries, which were
    /// checked before they were proposed and must apply the same way on every member
    /// whatever its configured limits.
    pub fn unlimited() -> Self {
        KvLimits {
            max_key_bytes: usize::MAX,
            max_value_bytes: usize::MAX,
            max_txn_ops: usize::MAX,
            max_request_bytes: usize::MAX,
        }
    }

    /// Checks a transaction (every KvBackend call is one) against these limits.
    pub fn check_txn(&self, txn: &TxnRequest) -> Result<()> {
        let total = self.check_txn_size(txn)?;
        if total > self.max_request_bytes {
            return Err(self.request_too_large(total));
        }
        Ok(())
    }

    /// Checks one transaction level (nested ones included) and returns its size.
    fn check_txn_size(&self, txn: &TxnRequest) -> Result<usize> {
        for (list, len) in [
            ("compare", txn.compare.len()),
            ("success", txn.success.len()),
            ("failure", txn.failure.len()),
        ] {
            if len > self.max_txn_ops {
                return Err(Error::invalid_argument(format!(
                    "txn has {len} {list} ops, more than max_txn_ops ({})",
                    self.max_txn_ops
                )));
            }
        }
        let mut total = 0usize;
        for compare in &txn.compare {
            total += self.check_compare(compare)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            total += self.check_op(op)?;
        }
        Ok(total)
    }

    /// The error for a request of `size` bytes over `max_request_bytes`.
    pub fn request_too_large(&self, size: usize) -> Error {
        Error::invalid_argument(format!(
            "request of {size} bytes exceeds max_request_bytes ({})",
            self.max_request_bytes
        ))
    }

    fn check_compare(&self, compare: &Compare) -> Result<usize> {
        let mut size = self.check_range(&compare.key, &compare.range_end)?;
        if let CompareTarget::Value(value) = &compare.target {
            size += self.check_value(value)?;
        }
        Ok(size)
    }

    fn check_op(&self, op: &TxnOp) -> Result<usize> {
        match op {
            TxnOp::Range(range) => {
                if range.limit < 0 {
                    return Err(Error::invalid_argument(format!(
                        "range limit must not be negative, got {}",
                        range.limit
                    )));
                }
                self.check_range(&range.key, &range.range_end)
            }
            TxnOp::Put(put) => {
                if put.ignore_value && !put.value.is_empty() {
                    return Err(Error::invalid_argument(
                        "a put that keeps the current value (ignore_value) must not give one",
                    ));
                }
                if put.ignore_lease && put.lease != 0 {
                    return Err(Error::invalid_argument(
                        "a put that keeps the current lease (ignore_lease) must not give one",
                    ));
                }
                Ok(self.check_key(&put.key, "key")? + self.check_value(&put.value)?)
            }
            TxnOp::DeleteRange(delete) => self.check_range(&delete.key, &delete.range_end),
            TxnOp::Txn(nested) => self.check_txn_size(nested),
        }
    }

    fn check_range(&self, key: &[u8], range_end: &[u8]) -> Result<usize> {
        let size = self.check_key(key, "key")?;
        if range_end.len() > self.max_key_bytes {
            return Err(Error::invalid_argument(format!(
                "range_end of {} bytes exceeds max_key_bytes ({})",
                range_end.len(),
                self.max_key_bytes
            )));
        }
        Ok(size + range_end.len())
    }

    fn check_key(&self, key: &[u8], what: &str) -> Result<usize> {
        if key.is_empty() && self.max_key_bytes != usize::MAX {
            return Err(Error::invalid_argument(format!("{what} must not be empty")));
        }
        if key.len() > self.max_key_bytes {
            return Err(Error::invalid_argument(format!(
                "{what} of {} bytes exceeds max_key_bytes ({})",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(key.len())
    }

    fn check_value(&self, value: &[u8]) -> Result<usize> {
        if value.len() > self.max_value_bytes {
            return Err(Error::invalid_argument(format!(
                "value of {} bytes exceeds max_value_bytes ({})",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(value.len())
    }
}
