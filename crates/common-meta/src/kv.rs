//! The etcd-like KV abstraction every layer above storage uses, and its local backends.
//!
//! [`KvBackend`] is the one seam: `MemoryKvBackend` (tests), `SledKvBackend` (durable)
//! and, in `meta-client`, a backend over gRPC all pass the same conformance suite
//! (`kv::conformance`, behind the `testing` feature).
//!
//! Semantics (as etcd's): ordered byte keys; one store-wide revision bumped once per
//! request that writes anything; per key `create_revision`, `mod_revision` and `version`.
//! Every call is a transaction underneath: the provided methods build a [`TxnRequest`]
//! and call [`KvBackend::txn`], so a backend implements one method to be complete.

mod command;
mod engine;
pub mod lease;
mod limits;
mod memory;
mod sled_backend;
mod sled_store;
mod types;
pub mod watch;

#[cfg(any(test, feature = "testing"))]
pub mod conformance;

use async_trait::async_trait;

pub use command::{Applied, Command, SessionRef, parse_context, proposal_context};
pub use limits::KvLimits;
pub use memory::MemoryKvBackend;
pub use sled_backend::{MAX_GROUP, SledKvBackend};
pub use sled_store::{MAX_UNACKED_ANSWERS, SledKvStore, StoreCopy, SystemWrite};
pub use types::{
    BatchDeleteRequest, BatchDeleteResponse, BatchGetRequest, BatchGetResponse, BatchPutRequest,
    BatchPutResponse, Compare, CompareAndPutRequest, CompareAndPutResponse, CompareOp,
    CompareTarget, DeleteRangeRequest, DeleteRangeResponse, Event, EventKind, KeyValue, LeaseGrant,
    LeaseTimeToLive, PutRequest, PutResponse, RangeRequest, RangeResponse, TxnOp, TxnOpResponse,
    TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};
pub use watch::WatchStream;

use crate::error::{Error, Result};

/// The smallest key greater than every key that starts with `prefix`: the `range_end`
/// that reads the prefix. An empty or all-`0xff` prefix yields `[0]` ("to the end").
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether `key` is in the span a `(start, range_end)` pair names, etcd style: an
/// empty `range_end` names `start` alone, `[0]` every key from `start` on, anything
/// else the half-open range.
pub fn key_in_span(key: &[u8], start: &[u8], range_end: &[u8]) -> bool {
    match range_end {
        [] => key == start,
        [0] => key >= start,
        end => key >= start && key < end,
    }
}

/// An etcd-like, revisioned, ordered KV store.
///
/// **Contract:** a method returns `Ok` only after its writes are as durable as the backend
/// promises (on disk for sled, committed by a quorum for raft). Requests over the
/// backend's [`KvLimits`] fail with [`Error::InvalidArgument`] naming the limit and change
/// nothing. A failed compare is `Ok` with `succeeded = false`.
#[async_trait]
pub trait KvBackend: Send + Sync {
    /// A short name for logs ("memory", "sled", "remote").
    fn name(&self) -> &'static str;

    /// Runs a transaction atomically: if every compare holds, the success ops, else the
    /// failure ops. The revision is bumped once if any op wrote.
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse>;

    /// Reads a key or a range.
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let response = self.txn(only(TxnOp::Range(req))).await?;
        match single(response)? {
            TxnOpResponse::Range(r) => Ok(r),
            other => Err(mismatch("range", &other)),
        }
    }

    /// Reads a key or a range from this member's own state, without a consensus round
    /// trip: fast and available on any member, but it may miss the newest writes
    /// (serializable, not linearizable). Backends that are always current serve it as
    /// [`KvBackend::range`].
    async fn range_serializable(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.range(req).await
    }

    /// Writes one key.
    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        let response = self.txn(only(TxnOp::Put(req))).await?;
        match single(response)? {
            TxnOpResponse::Put(r) => Ok(r),
            other => Err(mismatch("put", &other)),
        }
    }

    /// Deletes a key or a range.
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let response = self.txn(only(TxnOp::DeleteRange(req))).await?;
        match single(response)? {
            TxnOpResponse::DeleteRange(r) => Ok(r),
            other => Err(mismatch("delete_range", &other)),
        }
    }

    /// Reads several keys at one revision.
    async fn batch_get(&self, req: BatchGetRequest) -> Result<BatchGetResponse> {
        let ops = req
            .keys
            .into_iter()
            .map(|key| TxnOp::Range(RangeRequest::key(key)))
            .collect();
        let response = self.txn(unconditional(ops)).await?;
        let mut kvs = Vec::new();
        for op in response.responses {
            match op {
                TxnOpResponse::Range(r) => kvs.extend(r.kvs),
                other => return Err(mismatch("batch_get", &other)),
            }
        }
        Ok(BatchGetResponse {
            revision: response.revision,
            kvs,
        })
    }

    /// Writes several keys in one atomic write (one revision).
    async fn batch_put(&self, req: BatchPutRequest) -> Result<BatchPutResponse> {
        let prev_kv = req.prev_kv;
        let ops = req
            .kvs
            .into_iter()
            .map(|(key, value)| {
                TxnOp::Put(PutRequest {
                    key,
                    value,
                    prev_kv,
                    ..Default::default()
                })
            })
            .collect();
        let response = self.txn(unconditional(ops)).await?;
        let mut prev_kvs = Vec::new();
        for op in response.responses {
            match op {
                TxnOpResponse::Put(r) => prev_kvs.extend(r.prev_kv),
                other => return Err(mismatch("batch_put", &other)),
            }
        }
        Ok(BatchPutResponse {
            revision: response.revision,
            prev_kvs,
        })
    }

    /// Deletes several keys in one atomic write.
    async fn batch_delete(&self, req: BatchDeleteRequest) -> Result<BatchDeleteResponse> {
        let prev_kv = req.prev_kv;
        let ops = req
            .keys
            .into_iter()
            .map(|key| {
                TxnOp::DeleteRange(DeleteRangeRequest {
                    key,
                    range_end: Vec::new(),
                    prev_kv,
                })
            })
            .collect();
        let response = self.txn(unconditional(ops)).await?;
        let mut out = BatchDeleteResponse {
            revision: response.revision,
            ..Default::default()
        };
        for op in response.responses {
            match op {
                TxnOpResponse::DeleteRange(r) => {
                    out.deleted += r.deleted;
                    out.prev_kvs.extend(r.prev_kvs);
                }
                other => return Err(mismatch("batch_delete", &other)),
            }
        }
        Ok(out)
    }

    /// Writes `value` if the key holds `expect` (or is absent, for `expect = None`).
    async fn compare_and_put(&self, req: CompareAndPutRequest) -> Result<CompareAndPutResponse> {
        let target = match req.expect {
            None => (CompareOp::Equal, CompareTarget::CreateRevision(0)),
            Some(expect) => (CompareOp::Equal, CompareTarget::Value(expect)),
        };
        let txn = TxnRequest {
            compare: vec![Compare::new(req.key.clone(), target.0, target.1)],
            success: vec![TxnOp::Put(PutRequest {
                key: req.key.clone(),
                value: req.value,
                prev_kv: true,
                ..Default::default()
            })],
            failure: vec![TxnOp::Range(RangeRequest::key(req.key))],
        };
        let response = self.txn(txn).await?;
        let (revision, success) = (response.revision, response.succeeded);
        let prev_kv = match single(response)? {
            TxnOpResponse::Put(r) => r.prev_kv,
            TxnOpResponse::Range(r) => r.kvs.into_iter().next(),
            other => return Err(mismatch("compare_and_put", &other)),
        };
        Ok(CompareAndPutResponse {
            revision,
            success,
            prev_kv,
        })
    }

    /// Discards the history before `revision` (see [`Error::Compacted`]); returns the
    /// store revision after it. A revision above the current one is refused with
    /// [`Error::FutureRevision`], one at or below the compacted one with
    /// [`Error::Compacted`].
    async fn compact(&self, revision: i64) -> Result<i64> {
        let _ = revision;
        Err(Error::invalid_argument(format!(
            "the {} backend keeps no history to compact",
            self.name()
        )))
    }

    /// Starts a watcher: every change of the key or range from the start revision on,
    /// in revision order, each once, all changes of one revision in one response. A
    /// start revision below the compacted one is refused with [`Error::Compacted`]; a
    /// watcher whose history is compacted away while it lags ends with it.
    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        let _ = req;
        Err(Error::invalid_argument(format!(
            "the {} backend does not serve watches",
            self.name()
        )))
    }

    /// Grants a lease living `ttl` seconds without keep-alives (raised to the backend's
    /// minimum; negative or too large is refused), with id `id` (0: the backend picks).
    async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        let _ = (ttl, id);
        Err(self.no_leases())
    }

    /// Revokes a lease: its keys are deleted in one revision. [`Error::LeaseNotFound`]
    /// when it does not exist.
    async fn lease_revoke(&self, id: i64) -> Result<()> {
        let _ = id;
        Err(self.no_leases())
    }

    /// Renews a lease for another TTL; its TTL in seconds. [`Error::LeaseNotFound`] when
    /// it does not exist (revoked or expired).
    async fn lease_keep_alive(&self, id: i64) -> Result<i64> {
        let _ = id;
        Err(self.no_leases())
    }

    /// A lease's remaining TTL (`ttl` -1 when it does not exist), with its keys when
    /// asked.
    async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive> {
        let _ = (id, keys);
        Err(self.no_leases())
    }

    /// The ids of every lease.
    async fn leases(&self) -> Result<Vec<i64>> {
        Err(self.no_leases())
    }

    /// The refusal of the lease calls by a backend without leases.
    fn no_leases(&self) -> Error {
        Error::invalid_argument(format!("the {} backend has no leases", self.name()))
    }

    /// Reads one key's value, or `None` when absent.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        Ok(self
            .range(RangeRequest::key(key))
            .await?
            .kvs
            .into_iter()
            .next())
    }
}

fn only(op: TxnOp) -> TxnRequest {
    unconditional(vec![op])
}

fn unconditional(ops: Vec<TxnOp>) -> TxnRequest {
    TxnRequest {
        compare: Vec::new(),
        success: ops,
        failure: Vec::new(),
    }
}

fn single(response: TxnResponse) -> Result<TxnOpResponse> {
    let count = response.responses.len();
    let mut responses = response.responses.into_iter();
    match (responses.next(), count) {
        (Some(first), 1) => Ok(first),
        _ => Err(Error::Remote {
            code: "Internal".to_string(),
            message: format!("expected one txn op response, got {count}"),
        }),
    }
}

fn mismatch(call: &str, got: &TxnOpResponse) -> Error {
    Error::Remote {
        code: "Internal".to_string(),
        message: format!("{call} got a mismatched txn op response: {got:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_backend_passes_conformance() {
        conformance::run_all(&MemoryKvBackend::default()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_backend_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
        conformance::run_all(&backend).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_stops_the_sled_backend_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
            backend
                .put(PutRequest::new(b"acked".to_vec(), b"1".to_vec()))
                .await
                .unwrap();
            backend.fail_next_flush();
            let err = backend
                .put(PutRequest::new(b"unsure".to_vec(), b"2".to_vec()))
                .await
                .unwrap_err();
            assert!(err.is_outcome_unknown(), "{err}");
            // Poisoned: neither the unsure write nor anything else is served any more.
            for err in [
                backend.get(b"unsure").await.unwrap_err(),
                backend
                    .put(PutRequest::new(b"later".to_vec(), b"3".to_vec()))
                    .await
                    .unwrap_err(),
            ] {
                assert!(
                    err.to_string().contains("stopped after failing to persist"),
                    "{err}"
                );
                assert!(matches!(err, Error::Unavailable { .. }), "{err}");
            }
        }
        let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
        assert_eq!(
            backend.get(b"acked").await.unwrap().unwrap().value,
            b"1",
            "acknowledged writes survive"
        );
        assert!(backend.get(b"later").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_backend_keeps_data_and_revision_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let written = {
            let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
            for i in 0..50 {
                backend
                    .put(PutRequest::new(
                        format!("k{i:02}").into_bytes(),
                        vec![i as u8; 100],
                    ))
                    .await
                    .unwrap();
            }
            backend
                .delete_range(DeleteRangeRequest::key(b"k07".to_vec()))
                .await
                .unwrap()
                .revision
        };
        let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
        assert_eq!(backend.revision(), written);
        let all = backend
            .range(RangeRequest::prefix(b"k".to_vec()))
            .await
            .unwrap();
        assert_eq!(all.count, 49);
        assert_eq!(all.revision, written);
        let k3 = backend.get(b"k03").await.unwrap().unwrap();
        assert_eq!(
            (k3.value, k3.version, k3.create_revision),
            (vec![3; 100], 1, 4)
        );
        // The next write continues from the persisted revision.
        let next = backend
            .put(PutRequest::new(b"k99".to_vec(), b"x".to_vec()))
            .await
            .unwrap();
        assert_eq!(next.revision, written + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_each_get_their_own_revision() {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            std::sync::Arc::new(SledKvBackend::open(dir.path(), KvLimits::default()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..32 {
            let backend = backend.clone();
            tasks.push(tokio::spawn(async move {
                backend
                    .put(PutRequest::new(format!("c{i}").into_bytes(), b"v".to_vec()))
                    .await
                    .unwrap()
                    .revision
            }));
        }
        let mut revisions = Vec::new();
        for task in tasks {
            revisions.push(task.await.unwrap());
        }
        revisions.sort_unstable();
        assert_eq!(revisions, (1..=32).collect::<Vec<i64>>());
    }

    /// Read-modify-CAS increments from many tasks: grouped commits must let each txn see
    /// the writes committed before it, or increments would be lost or doubled.
    async fn concurrent_cas_increments_lose_nothing(backend: std::sync::Arc<dyn KvBackend>) {
        let tasks = 16;
        let per_task = 10;
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let backend = backend.clone();
            handles.push(tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..per_task {
                    loop {
                        let current = backend.get(b"counter").await.unwrap();
                        let (expect, next) = match current {
                            None => (None, 1u64),
                            Some(kv) => {
                                let n: u64 = String::from_utf8(kv.value.clone())
                                    .unwrap()
                                    .parse()
                                    .unwrap();
                                (Some(kv.value), n + 1)
                            }
                        };
                        let cas = CompareAndPutRequest {
                            key: b"counter".to_vec(),
                            expect,
                            value: next.to_string().into_bytes(),
                        };
                        if backend.compare_and_put(cas).await.unwrap().success {
                            break;
                        }
                        retries += 1;
                    }
                }
                retries
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        let kv = backend.get(b"counter").await.unwrap().unwrap();
        assert_eq!(
            kv.value,
            (tasks * per_task).to_string().into_bytes(),
            "[{}]",
            backend.name()
        );
        assert_eq!(kv.version, (tasks * per_task) as i64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_cas_increments_lose_nothing() {
        concurrent_cas_increments_lose_nothing(std::sync::Arc::new(MemoryKvBackend::default()))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_cas_increments_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledKvBackend::open(dir.path(), KvLimits::default()).unwrap();
        concurrent_cas_increments_lose_nothing(std::sync::Arc::new(backend)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_write_in_a_group_does_not_affect_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            std::sync::Arc::new(SledKvBackend::open(dir.path(), KvLimits::default()).unwrap());
        let mut handles = Vec::new();
        for i in 0..20 {
            let backend = backend.clone();
            handles.push(tokio::spawn(async move {
                // Every fourth write has an empty key and must be refused on its own.
                let key = if i % 4 == 0 {
                    Vec::new()
                } else {
                    format!("g{i}").into_bytes()
                };
                backend.put(PutRequest::new(key, b"v".to_vec())).await
            }));
        }
        let mut refused = 0;
        for handle in handles {
            match handle.await.unwrap() {
                Ok(_) => {}
                Err(Error::InvalidArgument { .. }) => refused += 1,
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!(refused, 5);
        let all = backend
            .range(RangeRequest::prefix(b"g".to_vec()))
            .await
            .unwrap();
        assert_eq!(all.count, 15);
        assert_eq!(all.revision, 15, "one revision per accepted write");
    }

    #[test]
    fn prefix_end_cases() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"abc", b"abd"),
            (b"a\xff", b"b"),
            (b"\xff\xff", b"\0"),
            (b"", b"\0"),
            (b"__node/", b"__node0"),
        ];
        for (prefix, want) in cases {
            assert_eq!(prefix_end(prefix), *want, "prefix {prefix:?}");
        }
    }
}
