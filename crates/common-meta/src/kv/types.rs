//! Request and response types of the [`KvBackend`](crate::kv::KvBackend) API.
//!
//! They mirror the `meta.v1` Store messages; `crate::rpc` converts between the two.

/// A key with its value and per-key metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty in a `keys_only` range).
    pub value: Vec<u8>,
    /// Revision of the write that created the key since it last did not exist.
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Number of writes since creation: 1 after the first put.
    pub version: i64,
    /// The lease the key is attached to (0 = none).
    pub lease: i64,
}

/// Reads a key or a range of keys.
///
/// `range_end` follows etcd: empty reads only `key`; `[0]` reads every key `>= key`
/// (so `key = [0], range_end = [0]` reads everything); otherwise `[key, range_end)`.
/// Use [`prefix_end`](crate::kv::prefix_end) to read a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range, see the type doc.
    pub range_end: Vec<u8>,
    /// At most this many keys; 0 means no limit.
    pub limit: i64,
    /// Leave values out.
    pub keys_only: bool,
    /// Return only the count.
    pub count_only: bool,
    /// Read as of this revision (0 = the current one); see [`Error::Compacted`] and
    /// [`Error::FutureRevision`](crate::Error::FutureRevision) for the bounds.
    ///
    /// [`Error::Compacted`]: crate::Error::Compacted
    pub revision: i64,
}

impl RangeRequest {
    /// Reads one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        RangeRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Reads every key that starts with `prefix`; an empty prefix reads every key.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let mut key = prefix.into();
        let range_end = crate::kv::prefix_end(&key);
        if key.is_empty() {
            // Keys are never empty, so the whole store is "from \0 to the end".
            key = vec![0];
        }
        RangeRequest {
            key,
            range_end,
            ..Default::default()
        }
    }

    /// Sets the limit.
    pub fn with_limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Reads as of `revision` (0 = now).
    pub fn at_revision(mut self, revision: i64) -> Self {
        self.revision = revision;
        self
    }
}

/// The result of a range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResponse {
    /// Store revision when served.
    pub revision: i64,
    /// The keys found, in key order (empty for `count_only`).
    pub kvs: Vec<KeyValue>,
    /// More keys were in range than the limit allowed.
    pub more: bool,
    /// Number of keys in range, regardless of the limit.
    pub count: i64,
}

/// Writes one key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutRequest {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Return the previous key-value.
    pub prev_kv: bool,
    /// Attach the key to this lease (0 = none; a put without a lease detaches the key).
    pub lease: i64,
    /// Keep the key's current value (`value` must be empty); the key must exist.
    pub ignore_value: bool,
    /// Keep the key's current lease (`lease` must be 0); the key must exist.
    pub ignore_lease: bool,
}

impl PutRequest {
    /// A put of `key = value` without `prev_kv` or lease.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }
    }

    /// Attaches the key to `lease`.
    pub fn with_lease(mut self, lease: i64) -> Self {
        self.lease = lease;
        self
    }
}

/// The result of a put.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutResponse {
    /// Store revision after the put.
    pub revision: i64,
    /// The previous key-value when asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// Deletes a key or a range of keys; `range_end` as in [`RangeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range.
    pub range_end: Vec<u8>,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

impl DeleteRangeRequest {
    /// Deletes one key.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        }
    }
}

/// The result of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeResponse {
    /// Store revision after the delete (unchanged when nothing was deleted).
    pub revision: i64,
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted key-values when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Reads several keys at once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGetRequest {
    /// The keys.
    pub keys: Vec<Vec<u8>>,
}

/// The result of a batch get.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchGetResponse {
    /// Store revision when served.
    pub revision: i64,
    /// The keys that exist, in request order.
    pub kvs: Vec<KeyValue>,
}

/// Writes several keys in one atomic write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchPutRequest {
    /// Keys and values.
    pub kvs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Return the previous key-values.
    pub prev_kv: bool,
}

/// The result of a batch put.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchPutResponse {
    /// Store revision after the write.
    pub revision: i64,
    /// Previous key-values of the keys that existed, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Deletes several keys in one atomic write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchDeleteRequest {
    /// The keys.
    pub keys: Vec<Vec<u8>>,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

/// The result of a batch delete.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchDeleteResponse {
    /// Store revision after the write.
    pub revision: i64,
    /// Number of keys deleted.
    pub deleted: i64,
    /// The deleted key-values when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// Writes `value` only if the key currently holds `expect`, or, with `expect = None`,
/// only if the key does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompareAndPutRequest {
    /// The key.
    pub key: Vec<u8>,
    /// The value the key must hold, or `None` for "must not exist".
    pub expect: Option<Vec<u8>>,
    /// The new value.
    pub value: Vec<u8>,
}

/// The result of a compare-and-put: a failed compare is a value, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompareAndPutResponse {
    /// Store revision after the call.
    pub revision: i64,
    /// Whether the compare held and the value was written.
    pub success: bool,
    /// The key before the call (on success) or as it is now (on failure).
    pub prev_kv: Option<KeyValue>,
}

/// How a [`Compare`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompareOp {
    /// `==`
    #[default]
    Equal,
    /// `!=`
    NotEqual,
    /// `<` (the key's attribute is less than the target)
    Less,
    /// `>`
    Greater,
}

/// What a [`Compare`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 when absent).
    Version(i64),
    /// The key's create revision (0 when absent).
    CreateRevision(i64),
    /// The key's mod revision (0 when absent).
    ModRevision(i64),
    /// The key's value; every value compare on an absent key fails.
    Value(Vec<u8>),
    /// The key's lease (0 when absent or when it has none).
    Lease(i64),
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// Empty: only `key`. Otherwise every key of the span (as in [`RangeRequest`])
    /// must pass; an empty span compares as one absent key.
    pub range_end: Vec<u8>,
    /// The comparison.
    pub op: CompareOp,
    /// The attribute and the operand.
    pub target: CompareTarget,
}

impl Compare {
    /// A compare of `key`'s attribute against `target` with `op`.
    pub fn new(key: impl Into<Vec<u8>>, op: CompareOp, target: CompareTarget) -> Self {
        Compare {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target,
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// A read.
    Range(RangeRequest),
    /// A write.
    Put(PutRequest),
    /// A delete.
    DeleteRange(DeleteRangeRequest),
    /// A transaction nested in this one: its compares see the earlier ops' writes,
    /// and its writes are part of the outer transaction's one revision.
    Txn(TxnRequest),
}

/// The result of one transaction operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResponse {
    /// Result of a read.
    Range(RangeResponse),
    /// Result of a write.
    Put(PutResponse),
    /// Result of a delete.
    DeleteRange(DeleteRangeResponse),
    /// Result of a nested transaction.
    Txn(TxnResponse),
}

/// If every compare holds, runs `success`, else `failure`, atomically. Later ops see the
/// effects of earlier ones in the same list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    /// The conditions (all must hold).
    pub compare: Vec<Compare>,
    /// Ops run when every compare holds.
    pub success: Vec<TxnOp>,
    /// Ops run otherwise.
    pub failure: Vec<TxnOp>,
}

impl TxnRequest {
    /// True when the transaction uses what etcd's API added to the replicated format
    /// (a put that keeps the value or lease, a lease or range compare, a nested
    /// transaction): a member of an older version would apply it differently.
    pub fn uses_extensions(&self) -> bool {
        self.compare
            .iter()
            .any(|c| !c.range_end.is_empty() || matches!(c.target, CompareTarget::Lease(_)))
            || self.success.iter().chain(&self.failure).any(|op| match op {
                TxnOp::Put(put) => put.ignore_value || put.ignore_lease,
                TxnOp::Txn(_) => true,
                TxnOp::Range(_) | TxnOp::DeleteRange(_) => false,
            })
    }

    /// True when no op of either branch writes: the request can be served as a read.
    pub fn is_read_only(&self) -> bool {
        self.success.iter().chain(&self.failure).all(|op| match op {
            TxnOp::Range(_) => true,
            TxnOp::Txn(nested) => nested.is_read_only(),
            TxnOp::Put(_) | TxnOp::DeleteRange(_) => false,
        })
    }
}

/// The result of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    /// Store revision after the transaction (bumped once if it wrote anything).
    pub revision: i64,
    /// Whether the compares held (`success` ran) or not (`failure` ran).
    pub succeeded: bool,
    /// One response per op that ran, in order.
    pub responses: Vec<TxnOpResponse>,
}

/// What a change did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was written.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change of one key, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for a delete only `key` and `mod_revision` (the
    /// revision of the delete) are set.
    pub kv: KeyValue,
    /// The key's version before the change, when the watcher asked for it and it existed.
    pub prev_kv: Option<KeyValue>,
}

/// Starts a watcher; see `meta.v1.WatchCreateRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchRequest {
    /// First key (inclusive).
    pub key: Vec<u8>,
    /// End of the range, as in [`RangeRequest`].
    pub range_end: Vec<u8>,
    /// First revision to deliver; 0 = changes after the current revision.
    pub start_revision: i64,
    /// Deliver each event with the key's previous version.
    pub prev_kv: bool,
    /// Leave out puts.
    pub no_put: bool,
    /// Leave out deletes.
    pub no_delete: bool,
    /// Send a progress notice when idle.
    pub progress_notify: bool,
}

impl WatchRequest {
    /// Watches one key from the next change on.
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        WatchRequest {
            key: key.into(),
            ..Default::default()
        }
    }

    /// Watches every key starting with `prefix` from the next change on.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let range = RangeRequest::prefix(prefix);
        WatchRequest {
            key: range.key,
            range_end: range.range_end,
            ..Default::default()
        }
    }

    /// Starts at `revision`.
    pub fn from_revision(mut self, revision: i64) -> Self {
        self.start_revision = revision;
        self
    }
}

/// What a watcher receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchResponse {
    /// Events, in revision order; all events of one revision are in one response.
    /// `revision` is the store revision they were sent at (at least the last event's).
    Events {
        /// Store revision when sent.
        revision: i64,
        /// The events.
        events: Vec<Event>,
    },
    /// Every matching event at or below `revision` has been delivered.
    Progress {
        /// The revision.
        revision: i64,
        /// An answer to [`WatchStream::progress`](crate::kv::WatchStream::progress)
        /// (`false`: an idle notice the watcher asked for at creation).
        requested: bool,
    },
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id.
    pub id: i64,
    /// The TTL granted, in seconds (at least the backend's minimum).
    pub ttl: i64,
}

/// What is known of a lease now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTimeToLive {
    /// Its id.
    pub id: i64,
    /// Seconds left (rounded up); -1 when the lease does not exist.
    pub ttl: i64,
    /// The TTL it was granted with.
    pub granted_ttl: i64,
    /// The keys attached, when asked for.
    pub keys: Vec<Vec<u8>>,
}
