//! Conformance checks of leases: grant, attach, keep-alive, time-to-live, revoke (one
//! revision for all the lease's keys) and expiry (not before the TTL).

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::kv::{
    EventKind, KvBackend, PutRequest, RangeRequest, WatchRequest, lease::MAX_TTL_SECS,
};

use super::history::collect_events;
use super::keys;

/// Grant, attach, renew, inspect and revoke.
pub async fn lease_lifecycle(backend: &dyn KvBackend) {
    let name = backend.name();
    let granted = backend.lease_grant(60, 0).await.unwrap();
    assert!(granted.id > 0, "[{name}] a chosen id is positive");
    assert_eq!(granted.ttl, 60, "[{name}] granted TTL");
    let chosen = backend.lease_grant(30, 4242).await.unwrap();
    assert_eq!(chosen.id, 4242, "[{name}] the id asked for");
    let err = backend.lease_grant(30, 4242).await.unwrap_err();
    assert!(
        matches!(err, Error::AlreadyExists { .. }),
        "[{name}] a taken id: {err}"
    );
    let id = granted.id;

    let mut watch = backend.watch(WatchRequest::prefix("lease/")).await.unwrap();
    for key in ["lease/a", "lease/b", "lease/c"] {
        backend
            .put(PutRequest::new(key, "v").with_lease(id))
            .await
            .unwrap();
    }
    // A put without a lease detaches the key.
    backend
        .put(PutRequest::new("lease/c", "free"))
        .await
        .unwrap();
    let a = backend.get(b"lease/a").await.unwrap().unwrap();
    assert_eq!(a.lease, id, "[{name}] the key shows its lease");
    assert_eq!(
        backend.get(b"lease/c").await.unwrap().unwrap().lease,
        0,
        "[{name}] detached"
    );

    let ttl = backend.lease_time_to_live(id, true).await.unwrap();
    assert_eq!(
        (ttl.granted_ttl, keys_of(&ttl.keys)),
        (60, vec!["lease/a".to_string(), "lease/b".to_string()]),
        "[{name}] time to live with keys"
    );
    assert!(ttl.ttl > 0 && ttl.ttl <= 60, "[{name}] ttl {}", ttl.ttl);
    assert!(
        backend.leases().await.unwrap().contains(&id),
        "[{name}] listed"
    );
    assert_eq!(
        backend.lease_keep_alive(id).await.unwrap(),
        60,
        "[{name}] renewed"
    );

    // A put naming an unknown lease changes nothing.
    let before = backend
        .range(RangeRequest::key("lease/x"))
        .await
        .unwrap()
        .revision;
    let err = backend
        .put(PutRequest::new("lease/x", "v").with_lease(987_654_321))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LeaseNotFound { id: 987_654_321 }),
        "[{name}] unknown lease: {err}"
    );
    let after = backend.range(RangeRequest::key("lease/x")).await.unwrap();
    assert_eq!(
        (after.revision, after.count),
        (before, 0),
        "[{name}] nothing written"
    );

    backend.lease_revoke(id).await.unwrap();
    let events = collect_events(name, &mut watch, 6).await;
    let deletes: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Delete)
        .collect();
    assert_eq!(deletes.len(), 2, "[{name}] the two attached keys deleted");
    assert_eq!(
        deletes[0].kv.mod_revision, deletes[1].kv.mod_revision,
        "[{name}] in one revision"
    );
    let left = backend.range(RangeRequest::prefix("lease/")).await.unwrap();
    assert_eq!(
        keys(&left.kvs),
        ["lease/c"],
        "[{name}] the detached key stays"
    );
    assert_eq!(
        backend.lease_time_to_live(id, false).await.unwrap().ttl,
        -1,
        "[{name}] gone"
    );
    for err in [
        backend.lease_revoke(id).await.unwrap_err(),
        backend.lease_keep_alive(id).await.unwrap_err(),
        backend
            .put(PutRequest::new("lease/a", "v").with_lease(id))
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, Error::LeaseNotFound { .. }),
            "[{name}] a revoked lease: {err}"
        );
    }
    backend.lease_revoke(4242).await.unwrap();

    for bad in [-1, MAX_TTL_SECS + 1] {
        let err = backend.lease_grant(bad, 0).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "[{name}] TTL {bad}: {err}"
        );
    }
    let err = backend.lease_grant(10, -5).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { .. }),
        "[{name}] {err}"
    );
    let smallest = backend.lease_grant(0, 0).await.unwrap();
    assert!(smallest.ttl >= 1, "[{name}] TTL 0 is raised to the minimum");
    backend.lease_revoke(smallest.id).await.unwrap();
}

/// A lease that is not kept alive expires, deleting its keys, no sooner than its TTL
/// and within `late` after it.
pub async fn lease_expiry(backend: &dyn KvBackend, late: Duration) {
    let name = backend.name();
    let granted = backend.lease_grant(1, 0).await.unwrap();
    let since = Instant::now();
    backend
        .put(PutRequest::new("expire/k", "v").with_lease(granted.id))
        .await
        .unwrap();
    let start = backend
        .get(b"expire/k")
        .await
        .unwrap()
        .unwrap()
        .mod_revision;
    let mut watch = backend
        .watch(WatchRequest::key("expire/k").from_revision(start + 1))
        .await
        .unwrap();
    let events = collect_events(name, &mut watch, 1).await;
    let elapsed = since.elapsed();
    assert_eq!(events[0].kind, EventKind::Delete, "[{name}] expiry deletes");
    let ttl = Duration::from_secs(granted.ttl.unsigned_abs());
    assert!(
        elapsed >= ttl,
        "[{name}] expired after {elapsed:?}, before its TTL {ttl:?}"
    );
    assert!(
        elapsed <= ttl + late,
        "[{name}] expired after {elapsed:?}, later than {ttl:?} + {late:?}"
    );
    assert_eq!(
        backend
            .lease_time_to_live(granted.id, false)
            .await
            .unwrap()
            .ttl,
        -1,
        "[{name}] the expired lease is gone"
    );
}

fn keys_of(keys: &[Vec<u8>]) -> Vec<String> {
    keys.iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}
