//! Conformance checks of what etcd's transactions have beyond the basics: puts that
//! keep a key's value or lease, lease and range compares, nested transactions.

use crate::error::Error;
use crate::kv::{
    Compare, CompareOp, CompareTarget, KvBackend, PutRequest, RangeRequest, TxnOp, TxnOpResponse,
    TxnRequest,
};

use super::put;

/// `ignore_value` keeps the value and `ignore_lease` the lease; both need the key.
pub async fn puts_that_keep_value_or_lease(backend: &dyn KvBackend) {
    let name = backend.name();
    let lease = backend.lease_grant(60, 0).await.unwrap().id;
    backend
        .put(PutRequest::new("keep/a", "one").with_lease(lease))
        .await
        .unwrap();
    // New value, same lease.
    backend
        .put(PutRequest {
            ignore_lease: true,
            ..PutRequest::new("keep/a", "two")
        })
        .await
        .unwrap();
    let kv = get(backend, "keep/a").await;
    assert_eq!(
        (kv.value.as_slice(), kv.lease),
        (&b"two"[..], lease),
        "[{name}] ignore_lease kept the lease"
    );
    // Same value, no lease.
    backend
        .put(PutRequest {
            ignore_value: true,
            ..PutRequest::new("keep/a", "")
        })
        .await
        .unwrap();
    let kv = get(backend, "keep/a").await;
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.version),
        (&b"two"[..], 0, 3),
        "[{name}] ignore_value kept the value, dropped the lease, counted a version"
    );
    for (what, req) in [
        (
            "ignore_value",
            PutRequest {
                ignore_value: true,
                ..PutRequest::new("keep/absent", "")
            },
        ),
        (
            "ignore_lease",
            PutRequest {
                ignore_lease: true,
                ..PutRequest::new("keep/absent", "v")
            },
        ),
    ] {
        let err = backend.put(req).await.unwrap_err();
        assert!(
            matches!(err, Error::NotFound { .. }),
            "[{name}] {what} on a missing key: {err}"
        );
    }
    let err = backend
        .put(PutRequest {
            ignore_value: true,
            ..PutRequest::new("keep/a", "given")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }),
        "[{name}] ignore_value with a value: {err}"
    );
    let err = backend
        .put(PutRequest {
            ignore_lease: true,
            ..PutRequest::new("keep/a", "v").with_lease(lease)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }),
        "[{name}] ignore_lease with a lease: {err}"
    );
    assert!(
        get_opt(backend, "keep/absent").await.is_none(),
        "[{name}] refused puts wrote nothing"
    );
    backend.lease_revoke(lease).await.unwrap();
}

/// A lease compare reads the key's lease (0 when absent); a compare with a range end
/// must hold for every key of the range, and an empty range is one absent key.
pub async fn lease_and_range_compares(backend: &dyn KvBackend) {
    let name = backend.name();
    let lease = backend.lease_grant(60, 0).await.unwrap().id;
    backend
        .put(PutRequest::new("cmp/a", "1").with_lease(lease))
        .await
        .unwrap();
    put(backend, "cmp/b", "1").await;
    put(backend, "cmp/b", "2").await;
    let single = |key: &str, op, target| Compare::new(key, op, target);
    let ranged = |op, target| Compare {
        range_end: b"cmp0".to_vec(),
        ..Compare::new("cmp/", op, target)
    };
    let empty = |op, target| Compare {
        range_end: b"cmq0".to_vec(),
        ..Compare::new("cmq/", op, target)
    };
    let cases = [
        (
            "lease of a leased key",
            single("cmp/a", CompareOp::Equal, CompareTarget::Lease(lease)),
            true,
        ),
        (
            "lease of a key without one",
            single("cmp/b", CompareOp::Equal, CompareTarget::Lease(0)),
            true,
        ),
        (
            "lease of a missing key",
            single("cmp/none", CompareOp::Equal, CompareTarget::Lease(0)),
            true,
        ),
        (
            "every key of the range has a version above 0",
            ranged(CompareOp::Greater, CompareTarget::Version(0)),
            true,
        ),
        (
            "not every key of the range has version 1",
            ranged(CompareOp::Equal, CompareTarget::Version(1)),
            false,
        ),
        (
            "an empty range compares as a missing key",
            empty(CompareOp::Equal, CompareTarget::CreateRevision(0)),
            true,
        ),
        (
            "a value compare on an empty range fails",
            empty(CompareOp::NotEqual, CompareTarget::Value(b"x".to_vec())),
            false,
        ),
    ];
    for (what, compare, expected) in cases {
        let response = backend
            .txn(TxnRequest {
                compare: vec![compare],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(response.succeeded, expected, "[{name}] {what}");
    }
    backend.lease_revoke(lease).await.unwrap();
}

/// A nested transaction sees the earlier ops' writes, and everything shares one
/// revision; a transaction whose nested ones only read is a read.
pub async fn nested_transactions(backend: &dyn KvBackend) {
    let name = backend.name();
    let before = put(backend, "nest/seed", "s").await;
    let inner = TxnRequest {
        compare: vec![Compare::new(
            "nest/a",
            CompareOp::Equal,
            CompareTarget::Version(1),
        )],
        success: vec![
            TxnOp::Put(PutRequest::new("nest/b", "from-inner")),
            TxnOp::Range(RangeRequest::key("nest/a")),
        ],
        failure: vec![TxnOp::Put(PutRequest::new("nest/b", "wrong-branch"))],
    };
    let response = backend
        .txn(TxnRequest {
            success: vec![
                TxnOp::Put(PutRequest::new("nest/a", "outer")),
                TxnOp::Txn(inner),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        response.revision,
        before + 1,
        "[{name}] one revision for all"
    );
    let Some(TxnOpResponse::Txn(nested)) = response.responses.get(1) else {
        panic!("[{name}] the nested answer: {:?}", response.responses);
    };
    assert!(
        nested.succeeded,
        "[{name}] the nested compare saw the outer put"
    );
    assert_eq!(nested.revision, before + 1, "[{name}] the nested revision");
    match nested.responses.get(1) {
        Some(TxnOpResponse::Range(range)) => {
            assert_eq!(range.kvs.len(), 1, "[{name}] the nested read saw the put");
            assert_eq!(range.revision, before + 1, "[{name}] nested read revision");
        }
        other => panic!("[{name}] the nested read: {other:?}"),
    }
    let b = get(backend, "nest/b").await;
    assert_eq!(
        (b.value.as_slice(), b.mod_revision),
        (&b"from-inner"[..], before + 1),
        "[{name}] the nested write"
    );
    let read = backend
        .txn(TxnRequest {
            success: vec![TxnOp::Txn(TxnRequest {
                success: vec![TxnOp::Range(RangeRequest::key("nest/a"))],
                ..Default::default()
            })],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        read.revision,
        before + 1,
        "[{name}] a nested read writes nothing"
    );
}

async fn get_opt(backend: &dyn KvBackend, key: &str) -> Option<crate::kv::KeyValue> {
    backend
        .range(RangeRequest::key(key))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .next()
}

async fn get(backend: &dyn KvBackend, key: &str) -> crate::kv::KeyValue {
    get_opt(backend, key)
        .await
        .unwrap_or_else(|| panic!("[{}] {key} is missing", backend.name()))
}
