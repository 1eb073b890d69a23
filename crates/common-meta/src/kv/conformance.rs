//! The `KvBackend` conformance suite: one set of checks every implementation must pass
//! (memory, sled, remote through `meta-client`, and later raft).
//!
//! Call [`run_all`] with a fresh backend using default [`KvLimits`]. Each check works
//! under its own key prefix and compares revisions relative to what it observed, so the
//! checks can share one store. Failures panic with the backend's name and the check.

#![allow(clippy::unwrap_used)]

pub mod history;
pub mod lease;
pub mod txn;

use crate::error::Error;
use crate::kv::{
    BatchDeleteRequest, BatchGetRequest, BatchPutRequest, Compare, CompareAndPutRequest, CompareOp,
    CompareTarget, DeleteRangeRequest, KeyValue, KvBackend, KvLimits, PutRequest, RangeRequest,
    TxnOp, TxnOpResponse, TxnRequest, prefix_end,
};

/// Runs every check against `backend`.
pub async fn run_all(backend: &dyn KvBackend) {
    revisions_and_versions(backend).await;
    range_end_forms(backend).await;
    range_limits_and_projections(backend).await;
    delete_range(backend).await;
    txn_branches(backend).await;
    txn_compare_targets(backend).await;
    batches(backend).await;
    compare_and_put(backend).await;
    limits(backend).await;
    txn::puts_that_keep_value_or_lease(backend).await;
    txn::lease_and_range_compares(backend).await;
    txn::nested_transactions(backend).await;
    history::history_reads(backend).await;
    history::watch_basics(backend).await;
    history::watch_sees_every_write_once(backend).await;
    lease::lease_lifecycle(backend).await;
    // Expiry within one election timeout plus the expiry check's period.
    lease::lease_expiry(backend, std::time::Duration::from_millis(2_500)).await;
    // Last: it compacts the whole store.
    history::compaction(backend).await;
}

async fn current_revision(backend: &dyn KvBackend) -> i64 {
    backend
        .range(RangeRequest::key(b"\x7fprobe".to_vec()))
        .await
        .unwrap()
        .revision
}

async fn put(backend: &dyn KvBackend, key: &str, value: &str) -> i64 {
    backend
        .put(PutRequest::new(key.as_bytes(), value.as_bytes()))
        .await
        .unwrap()
        .revision
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

/// Puts bump the store revision by one; per-key create/mod revisions and versions follow
/// etcd; deleting nothing leaves the revision alone; re-creating restarts the version.
pub async fn revisions_and_versions(backend: &dyn KvBackend) {
    let name = backend.name();
    let start = current_revision(backend).await;

    let r1 = put(backend, "rev/a", "1").await;
    assert_eq!(
        r1,
        start + 1,
        "[{name}] first put bumps the revision by one"
    );
    let kv = backend.get(b"rev/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, r1, 1),
        "[{name}] a new key"
    );
    assert_eq!(kv.value, b"1");

    let second = backend
        .put(PutRequest {
            key: b"rev/a".to_vec(),
            value: b"2".to_vec(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(second.revision, r1 + 1, "[{name}] second put");
    assert_eq!(
        second.prev_kv,
        Some(kv),
        "[{name}] prev_kv is the old key-value"
    );
    let kv = backend.get(b"rev/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (r1, second.revision, 2),
        "[{name}] an updated key"
    );

    let no_prev = backend
        .put(PutRequest::new(b"rev/b".to_vec(), b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(no_prev.prev_kv, None, "[{name}] prev_kv only when asked");

    let deleted = backend
        .delete_range(DeleteRangeRequest::key(b"rev/a".to_vec()))
        .await
        .unwrap();
    assert_eq!(deleted.deleted, 1);
    assert_eq!(
        deleted.revision,
        no_prev.revision + 1,
        "[{name}] delete bumps"
    );
    assert_eq!(backend.get(b"rev/a").await.unwrap(), None);

    let nothing = backend
        .delete_range(DeleteRangeRequest::key(b"rev/a".to_vec()))
        .await
        .unwrap();
    assert_eq!(nothing.deleted, 0);
    assert_eq!(
        nothing.revision, deleted.revision,
        "[{name}] deleting nothing does not bump the revision"
    );

    let again = put(backend, "rev/a", "3").await;
    let kv = backend.get(b"rev/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (again, again, 1),
        "[{name}] a re-created key starts over"
    );
    assert_eq!(
        current_revision(backend).await,
        again,
        "[{name}] reads do not bump"
    );
}

/// Empty `range_end` reads one key, `[0]` reads to the end, `[a, b)` is half-open, a
/// prefix end reads a prefix, and an end at or before the key reads nothing.
pub async fn range_end_forms(backend: &dyn KvBackend) {
    let name = backend.name();
    for key in ["span/a", "span/b", "span/c", "span/d", "spao"] {
        put(backend, key, key).await;
    }
    let check = |req: RangeRequest, want: &'static [&'static str]| async move {
        let got = backend.range(req.clone()).await.unwrap();
        assert_eq!(keys(&got.kvs), want, "[{name}] {req:?}");
        assert_eq!(got.count, want.len() as i64, "[{name}] count of {req:?}");
    };
    check(RangeRequest::key(b"span/b".to_vec()), &["span/b"]).await;
    check(RangeRequest::key(b"span/zz".to_vec()), &[]).await;
    check(
        RangeRequest {
            key: b"span/b".to_vec(),
            range_end: b"span/d".to_vec(),
            ..Default::default()
        },
        &["span/b", "span/c"],
    )
    .await;
    check(
        RangeRequest::prefix(b"span/".to_vec()),
        &["span/a", "span/b", "span/c", "span/d"],
    )
    .await;
    check(
        RangeRequest {
            key: b"span/c".to_vec(),
            range_end: b"spao\x00".to_vec(),
            ..Default::default()
        },
        &["span/c", "span/d", "spao"],
    )
    .await;
    check(
        RangeRequest {
            key: b"span/c".to_vec(),
            range_end: b"span/c".to_vec(),
            ..Default::default()
        },
        &[],
    )
    .await;
    check(
        RangeRequest {
            key: b"span/d".to_vec(),
            range_end: b"span/a".to_vec(),
            ..Default::default()
        },
        &[],
    )
    .await;

    // "\0" as range_end: every key from `key` on; with key "\0" too, the whole store.
    let to_end = backend
        .range(RangeRequest {
            key: b"span/c".to_vec(),
            range_end: vec![0],
            ..Default::default()
        })
        .await
        .unwrap();
    let got = keys(&to_end.kvs);
    assert!(
        got.starts_with(&["span/c".into(), "span/d".into(), "spao".into()]),
        "[{name}] from span/c to the end: {got:?}"
    );
    assert!(
        got.iter().all(|k| k.as_str() >= "span/c"),
        "[{name}] {got:?}"
    );
    let everything = backend
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        everything.count >= 5,
        "[{name}] whole store: {everything:?}"
    );
}

/// `limit` caps the keys and sets `more` while `count` counts all; `keys_only` and
/// `count_only` project; a negative limit is refused.
pub async fn range_limits_and_projections(backend: &dyn KvBackend) {
    let name = backend.name();
    for i in 0..5 {
        put(backend, &format!("lim/{i}"), "value").await;
    }
    let limited = backend
        .range(RangeRequest::prefix(b"lim/".to_vec()).with_limit(2))
        .await
        .unwrap();
    assert_eq!(keys(&limited.kvs), ["lim/0", "lim/1"], "[{name}] limit");
    assert!(limited.more, "[{name}] more is set when the limit cut");
    assert_eq!(limited.count, 5, "[{name}] count ignores the limit");

    let exact = backend
        .range(RangeRequest::prefix(b"lim/".to_vec()).with_limit(5))
        .await
        .unwrap();
    assert_eq!(exact.kvs.len(), 5);
    assert!(!exact.more, "[{name}] no more when all fit");

    let keys_only = backend
        .range(RangeRequest {
            keys_only: true,
            ..RangeRequest::prefix(b"lim/".to_vec())
        })
        .await
        .unwrap();
    assert_eq!(keys_only.kvs.len(), 5);
    assert!(
        keys_only
            .kvs
            .iter()
            .all(|kv| kv.value.is_empty() && kv.version == 1)
    );

    let count_only = backend
        .range(RangeRequest {
            count_only: true,
            ..RangeRequest::prefix(b"lim/".to_vec())
        })
        .await
        .unwrap();
    assert!(
        count_only.kvs.is_empty(),
        "[{name}] count_only returns no kvs"
    );
    assert_eq!(count_only.count, 5);

    let err = backend
        .range(RangeRequest::prefix(b"lim/".to_vec()).with_limit(-1))
        .await
        .unwrap_err();
    assert_invalid(name, &err, "limit must not be negative");
}

/// Range deletes remove exactly the span, return prev_kvs when asked, and bump once.
pub async fn delete_range(backend: &dyn KvBackend) {
    let name = backend.name();
    for key in ["del/a", "del/b", "del/c", "del/d"] {
        put(backend, key, key).await;
    }
    let before = current_revision(backend).await;
    let deleted = backend
        .delete_range(DeleteRangeRequest {
            key: b"del/b".to_vec(),
            range_end: b"del/d".to_vec(),
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(deleted.deleted, 2, "[{name}]");
    assert_eq!(keys(&deleted.prev_kvs), ["del/b", "del/c"]);
    assert_eq!(deleted.prev_kvs[0].value, b"del/b");
    assert_eq!(
        deleted.revision,
        before + 1,
        "[{name}] one bump for a range delete"
    );
    let left = backend
        .range(RangeRequest::prefix(b"del/".to_vec()))
        .await
        .unwrap();
    assert_eq!(keys(&left.kvs), ["del/a", "del/d"]);

    let silent = backend
        .delete_range(DeleteRangeRequest {
            key: b"del/".to_vec(),
            range_end: prefix_end(b"del/"),
            prev_kv: false,
        })
        .await
        .unwrap();
    assert_eq!(silent.deleted, 2);
    assert!(
        silent.prev_kvs.is_empty(),
        "[{name}] prev_kvs only when asked"
    );
}

/// A txn runs success or failure by its compares, bumps the revision once however many
/// ops wrote, lets later ops see earlier writes, and a read-only txn does not bump.
pub async fn txn_branches(backend: &dyn KvBackend) {
    let name = backend.name();
    let r = put(backend, "txn/flag", "on").await;
    let txn = |expect: &str| TxnRequest {
        compare: vec![Compare::new(
            b"txn/flag".to_vec(),
            CompareOp::Equal,
            CompareTarget::Value(expect.as_bytes().to_vec()),
        )],
        success: vec![
            TxnOp::Put(PutRequest::new(b"txn/x".to_vec(), b"1".to_vec())),
            TxnOp::Put(PutRequest::new(b"txn/y".to_vec(), b"2".to_vec())),
            TxnOp::Range(RangeRequest::prefix(b"txn/".to_vec())),
        ],
        failure: vec![TxnOp::Range(RangeRequest::key(b"txn/flag".to_vec()))],
    };

    let ok = backend.txn(txn("on")).await.unwrap();
    assert!(ok.succeeded, "[{name}] compare held");
    assert_eq!(ok.revision, r + 1, "[{name}] two puts, one revision");
    assert_eq!(ok.responses.len(), 3);
    match &ok.responses[2] {
        TxnOpResponse::Range(range) => {
            assert_eq!(
                keys(&range.kvs),
                ["txn/flag", "txn/x", "txn/y"],
                "[{name}] ops see earlier writes of the same txn"
            );
            assert_eq!(range.kvs[1].mod_revision, ok.revision);
        }
        other => panic!("[{name}] expected a range response, got {other:?}"),
    }

    let failed = backend.txn(txn("off")).await.unwrap();
    assert!(!failed.succeeded, "[{name}] compare failed");
    assert_eq!(
        failed.revision, ok.revision,
        "[{name}] read-only failure branch"
    );
    match &failed.responses[..] {
        [TxnOpResponse::Range(range)] => assert_eq!(range.kvs[0].value, b"on"),
        other => panic!("[{name}] expected one range response, got {other:?}"),
    }

    // A txn that puts and then deletes the same key leaves no trace of it but still writes.
    let transient = backend
        .txn(TxnRequest {
            success: vec![
                TxnOp::Put(PutRequest::new(b"txn/tmp".to_vec(), b"t".to_vec())),
                TxnOp::DeleteRange(DeleteRangeRequest::key(b"txn/tmp".to_vec())),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(transient.succeeded);
    match &transient.responses[1] {
        TxnOpResponse::DeleteRange(d) => assert_eq!(d.deleted, 1, "[{name}]"),
        other => panic!("[{name}] expected a delete response, got {other:?}"),
    }
    assert_eq!(backend.get(b"txn/tmp").await.unwrap(), None);
}

/// Compares on version, create and mod revision and value with each operator, and the
/// absent-key rules (attributes are 0, value compares fail).
pub async fn txn_compare_targets(backend: &dyn KvBackend) {
    let name = backend.name();
    put(backend, "cmp/k", "b").await;
    let kv = backend.get(b"cmp/k").await.unwrap().unwrap();
    let cases: Vec<(&str, CompareOp, CompareTarget, bool)> = vec![
        ("cmp/k", CompareOp::Equal, CompareTarget::Version(1), true),
        ("cmp/k", CompareOp::Greater, CompareTarget::Version(0), true),
        ("cmp/k", CompareOp::Less, CompareTarget::Version(1), false),
        (
            "cmp/k",
            CompareOp::NotEqual,
            CompareTarget::Version(1),
            false,
        ),
        (
            "cmp/k",
            CompareOp::Equal,
            CompareTarget::CreateRevision(kv.create_revision),
            true,
        ),
        (
            "cmp/k",
            CompareOp::Less,
            CompareTarget::ModRevision(kv.mod_revision + 1),
            true,
        ),
        (
            "cmp/k",
            CompareOp::Greater,
            CompareTarget::ModRevision(kv.mod_revision),
            false,
        ),
        (
            "cmp/k",
            CompareOp::Equal,
            CompareTarget::Value(b"b".to_vec()),
            true,
        ),
        (
            "cmp/k",
            CompareOp::Less,
            CompareTarget::Value(b"c".to_vec()),
            true,
        ),
        (
            "cmp/k",
            CompareOp::Greater,
            CompareTarget::Value(b"a".to_vec()),
            true,
        ),
        (
            "cmp/k",
            CompareOp::NotEqual,
            CompareTarget::Value(b"b".to_vec()),
            false,
        ),
        (
            "cmp/none",
            CompareOp::Equal,
            CompareTarget::Version(0),
            true,
        ),
        (
            "cmp/none",
            CompareOp::Equal,
            CompareTarget::CreateRevision(0),
            true,
        ),
        (
            "cmp/none",
            CompareOp::Equal,
            CompareTarget::ModRevision(0),
            true,
        ),
        (
            "cmp/none",
            CompareOp::Equal,
            CompareTarget::Value(Vec::new()),
            false,
        ),
        (
            "cmp/none",
            CompareOp::NotEqual,
            CompareTarget::Value(b"x".to_vec()),
            false,
        ),
    ];
    for (key, op, target, want) in cases {
        let compare = Compare::new(key.as_bytes().to_vec(), op, target);
        let got = backend
            .txn(TxnRequest {
                compare: vec![compare.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got.succeeded, want, "[{name}] {compare:?}");
    }
    // All compares must hold: one false compare among true ones fails the txn.
    let mixed = backend
        .txn(TxnRequest {
            compare: vec![
                Compare::new(
                    b"cmp/k".to_vec(),
                    CompareOp::Equal,
                    CompareTarget::Version(1),
                ),
                Compare::new(
                    b"cmp/k".to_vec(),
                    CompareOp::Equal,
                    CompareTarget::Version(2),
                ),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!mixed.succeeded, "[{name}] every compare must hold");
}

/// Batch put writes atomically at one revision, batch get skips absent keys and keeps
/// request order, batch delete counts and returns what it removed.
pub async fn batches(backend: &dyn KvBackend) {
    let name = backend.name();
    let before = current_revision(backend).await;
    let written = backend
        .batch_put(BatchPutRequest {
            kvs: vec![
                (b"bat/1".to_vec(), b"one".to_vec()),
                (b"bat/2".to_vec(), b"two".to_vec()),
                (b"bat/3".to_vec(), b"three".to_vec()),
            ],
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(
        written.revision,
        before + 1,
        "[{name}] one revision per batch"
    );
    assert!(written.prev_kvs.is_empty(), "[{name}] nothing existed");

    let overwritten = backend
        .batch_put(BatchPutRequest {
            kvs: vec![(b"bat/1".to_vec(), b"uno".to_vec())],
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(keys(&overwritten.prev_kvs), ["bat/1"]);
    assert_eq!(overwritten.prev_kvs[0].value, b"one");

    let got = backend
        .batch_get(BatchGetRequest {
            keys: vec![
                b"bat/3".to_vec(),
                b"bat/missing".to_vec(),
                b"bat/1".to_vec(),
            ],
        })
        .await
        .unwrap();
    assert_eq!(keys(&got.kvs), ["bat/3", "bat/1"], "[{name}] request order");
    assert_eq!(got.kvs[1].value, b"uno");
    assert_eq!(got.revision, overwritten.revision);

    let deleted = backend
        .batch_delete(BatchDeleteRequest {
            keys: vec![
                b"bat/1".to_vec(),
                b"bat/missing".to_vec(),
                b"bat/2".to_vec(),
            ],
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(deleted.deleted, 2, "[{name}]");
    assert_eq!(keys(&deleted.prev_kvs), ["bat/1", "bat/2"]);
    assert_eq!(deleted.revision, overwritten.revision + 1);
    let left = backend
        .range(RangeRequest::prefix(b"bat/".to_vec()))
        .await
        .unwrap();
    assert_eq!(keys(&left.kvs), ["bat/3"]);
}

/// Compare-and-put: create-if-absent, then swap only on the expected value; a failed
/// compare is a value carrying the current key-value, not an error.
pub async fn compare_and_put(backend: &dyn KvBackend) {
    let name = backend.name();
    let cas = |expect: Option<&str>, value: &str| CompareAndPutRequest {
        key: b"cas/k".to_vec(),
        expect: expect.map(|e| e.as_bytes().to_vec()),
        value: value.as_bytes().to_vec(),
    };
    let created = backend.compare_and_put(cas(None, "v1")).await.unwrap();
    assert!(created.success, "[{name}] create if absent");
    assert_eq!(created.prev_kv, None);

    let exists = backend.compare_and_put(cas(None, "v2")).await.unwrap();
    assert!(!exists.success, "[{name}] the key exists now");
    assert_eq!(
        exists.prev_kv.as_ref().map(|kv| kv.value.as_slice()),
        Some(&b"v1"[..])
    );
    assert_eq!(
        exists.revision, created.revision,
        "[{name}] a failed CAS writes nothing"
    );

    let wrong = backend
        .compare_and_put(cas(Some("nope"), "v2"))
        .await
        .unwrap();
    assert!(!wrong.success, "[{name}] wrong expectation");

    let swapped = backend
        .compare_and_put(cas(Some("v1"), "v2"))
        .await
        .unwrap();
    assert!(swapped.success, "[{name}] right expectation");
    assert_eq!(swapped.prev_kv.map(|kv| kv.value), Some(b"v1".to_vec()));
    assert_eq!(swapped.revision, created.revision + 1);
    let now = backend.get(b"cas/k").await.unwrap().unwrap();
    assert_eq!((now.value.as_slice(), now.version), (&b"v2"[..], 2));
}

fn assert_invalid(name: &str, err: &Error, needle: &str) {
    match err {
        Error::InvalidArgument { message } => assert!(
            message.contains(needle),
            "[{name}] error {message:?} should mention {needle:?}"
        ),
        other => panic!("[{name}] expected InvalidArgument mentioning {needle:?}, got {other:?}"),
    }
}

/// Every limit of the default [`KvLimits`] is enforced with an InvalidArgument naming it,
/// and a refused request changes nothing.
pub async fn limits(backend: &dyn KvBackend) {
    let name = backend.name();
    let limits = KvLimits::default();
    let before = current_revision(backend).await;

    let err = backend
        .put(PutRequest::new(Vec::new(), b"v".to_vec()))
        .await
        .unwrap_err();
    assert_invalid(name, &err, "key must not be empty");

    let err = backend
        .put(PutRequest::new(
            vec![b'k'; limits.max_key_bytes + 1],
            b"v".to_vec(),
        ))
        .await
        .unwrap_err();
    assert_invalid(name, &err, "max_key_bytes");
    // Exactly at the limit is fine.
    let at_limit = vec![b'k'; limits.max_key_bytes];
    backend
        .put(PutRequest::new(at_limit.clone(), b"v".to_vec()))
        .await
        .unwrap();
    backend
        .delete_range(DeleteRangeRequest::key(at_limit))
        .await
        .unwrap();
    let before = before + 2;

    let err = backend
        .put(PutRequest::new(
            b"big".to_vec(),
            vec![0; limits.max_value_bytes + 1],
        ))
        .await
        .unwrap_err();
    assert_invalid(name, &err, "max_value_bytes");

    let ops = (0..=limits.max_txn_ops)
        .map(|i| {
            TxnOp::Put(PutRequest::new(
                format!("ops/{i}").into_bytes(),
                b"v".to_vec(),
            ))
        })
        .collect();
    let err = backend
        .txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(name, &err, "max_txn_ops");

    let chunk = limits.max_value_bytes * 3 / 4;
    let err = backend
        .batch_put(BatchPutRequest {
            kvs: vec![
                (b"huge/1".to_vec(), vec![1; chunk]),
                (b"huge/2".to_vec(), vec![2; chunk]),
            ],
            prev_kv: false,
        })
        .await
        .unwrap_err();
    assert_invalid(name, &err, "max_request_bytes");

    assert_eq!(
        current_revision(backend).await,
        before,
        "[{name}] refused requests change nothing"
    );
    assert_eq!(backend.get(b"huge/1").await.unwrap(), None);
    assert_eq!(backend.get(b"ops/0").await.unwrap(), None);
}
