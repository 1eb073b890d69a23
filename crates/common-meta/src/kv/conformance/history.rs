//! Conformance checks of the revision history, compaction and watch.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::error::Error;
use crate::kv::{
    DeleteRangeRequest, Event, EventKind, KvBackend, PutRequest, RangeRequest, TxnOp,
    TxnOpResponse, TxnRequest, WatchRequest, WatchResponse, WatchStream,
};

use super::{current_revision, keys, put};

/// How long a check waits for a watch response before it fails.
const WAIT: Duration = Duration::from_secs(20);

/// The next events a watcher delivers (progress notices skipped); panics on an error,
/// an end or a wait over [`WAIT`].
pub async fn next_events(name: &str, stream: &mut WatchStream) -> Vec<Event> {
    loop {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(WatchResponse::Events { events, .. }))) => return events,
            Ok(Some(Ok(WatchResponse::Progress { .. }))) => continue,
            Ok(Some(Err(e))) => panic!("[{name}] watch failed: {e}"),
            Ok(None) => panic!("[{name}] watch ended"),
            Err(_) => panic!("[{name}] no watch response within {WAIT:?}"),
        }
    }
}

/// Collects events until `count` have arrived; checks that revisions never go back and
/// that no revision is split across two responses.
pub async fn collect_events(name: &str, stream: &mut WatchStream, count: usize) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    while out.len() < count {
        let batch = next_events(name, stream).await;
        let mut last = out.last().map(|e| e.kv.mod_revision);
        if let (Some(previous), Some(first)) = (last, batch.first()) {
            assert!(
                first.kv.mod_revision > previous,
                "[{name}] revision {previous} split across responses, or went back"
            );
        }
        for event in batch {
            if let Some(last) = last {
                assert!(
                    event.kv.mod_revision >= last,
                    "[{name}] events out of revision order: {} after {last}",
                    event.kv.mod_revision
                );
            }
            last = Some(event.kv.mod_revision);
            out.push(event);
        }
    }
    out
}

fn range_at(prefix: &str, revision: i64) -> RangeRequest {
    RangeRequest::prefix(prefix.as_bytes()).at_revision(revision)
}

/// A range at a past revision sees the store as it was then, with the same rules for
/// count, limit and projections; a future revision is refused.
pub async fn history_reads(backend: &dyn KvBackend) {
    let name = backend.name();
    let r1 = put(backend, "hist/a", "1").await;
    let r2 = put(backend, "hist/a", "2").await;
    let r3 = put(backend, "hist/b", "1").await;
    let r4 = backend
        .delete_range(DeleteRangeRequest::key(b"hist/a".to_vec()))
        .await
        .unwrap()
        .revision;

    let at = |revision| backend.range(range_at("hist/", revision));
    let then = at(r1).await.unwrap();
    assert_eq!(keys(&then.kvs), ["hist/a"], "[{name}] at r1");
    assert_eq!(then.kvs[0].value, b"1", "[{name}] value at r1");
    let then = at(r2).await.unwrap();
    let a = &then.kvs[0];
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"2"[..], r1, r2, 2),
        "[{name}] metadata at r2"
    );
    let then = at(r3).await.unwrap();
    assert_eq!(keys(&then.kvs), ["hist/a", "hist/b"], "[{name}] at r3");
    assert_eq!(then.count, 2, "[{name}] count at r3");
    let then = at(r4).await.unwrap();
    assert_eq!(
        keys(&then.kvs),
        ["hist/b"],
        "[{name}] the delete shows at r4"
    );
    assert!(
        then.revision >= r4,
        "[{name}] the header revision is the store's"
    );

    let limited = backend
        .range(range_at("hist/", r3).with_limit(1))
        .await
        .unwrap();
    assert_eq!(
        (keys(&limited.kvs), limited.more, limited.count),
        (vec!["hist/a".to_string()], true, 2),
        "[{name}] limit at a past revision"
    );
    let counted = backend
        .range(RangeRequest {
            count_only: true,
            ..range_at("hist/", r3)
        })
        .await
        .unwrap();
    assert_eq!(
        (counted.count, counted.kvs.len()),
        (2, 0),
        "[{name}] count_only"
    );
    let single = backend
        .range(RangeRequest::key(b"hist/a".to_vec()).at_revision(r1))
        .await
        .unwrap();
    assert_eq!(single.kvs[0].value, b"1", "[{name}] one key at r1");
    let gone = backend
        .range(RangeRequest::key(b"hist/a".to_vec()).at_revision(r4))
        .await
        .unwrap();
    assert!(gone.kvs.is_empty(), "[{name}] one key after its delete");

    // In a transaction too, beside a write.
    let txn = TxnRequest {
        success: vec![
            TxnOp::Put(PutRequest::new(b"hist/c".to_vec(), b"x".to_vec())),
            TxnOp::Range(range_at("hist/", r2)),
        ],
        ..Default::default()
    };
    let response = backend.txn(txn).await.unwrap();
    match &response.responses[1] {
        TxnOpResponse::Range(r) => assert_eq!(keys(&r.kvs), ["hist/a"], "[{name}] txn at r2"),
        other => panic!("[{name}] {other:?}"),
    }

    let current = current_revision(backend).await;
    let err = at(current + 5).await.unwrap_err();
    assert!(
        matches!(err, Error::FutureRevision { requested, current: c } if requested == current + 5 && c == current),
        "[{name}] a future revision: {err}"
    );
}

/// Watchers see each change once, in order, whole revisions together, with prev_kv and
/// filters honoured, from a past revision too.
pub async fn watch_basics(backend: &dyn KvBackend) {
    let name = backend.name();
    let mut prefix = backend.watch(WatchRequest::prefix("wb/")).await.unwrap();
    let mut single = backend
        .watch(WatchRequest {
            prev_kv: true,
            ..WatchRequest::key("wb/a")
        })
        .await
        .unwrap();
    let mut no_put = backend
        .watch(WatchRequest {
            no_put: true,
            ..WatchRequest::prefix("wb/")
        })
        .await
        .unwrap();

    let r1 = put(backend, "wb/a", "1").await;
    let both = TxnRequest {
        success: vec![
            TxnOp::Put(PutRequest::new(b"wb/a".to_vec(), b"2".to_vec())),
            TxnOp::Put(PutRequest::new(b"wb/b".to_vec(), b"1".to_vec())),
        ],
        ..Default::default()
    };
    let r2 = backend.txn(both).await.unwrap().revision;
    put(backend, "elsewhere", "x").await;
    let r3 = backend
        .delete_range(DeleteRangeRequest::key(b"wb/a".to_vec()))
        .await
        .unwrap()
        .revision;

    let events = collect_events(name, &mut prefix, 4).await;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.kv.mod_revision))
            .collect::<Vec<_>>(),
        vec![
            (EventKind::Put, b"wb/a".to_vec(), r1),
            (EventKind::Put, b"wb/a".to_vec(), r2),
            (EventKind::Put, b"wb/b".to_vec(), r2),
            (EventKind::Delete, b"wb/a".to_vec(), r3),
        ],
        "[{name}] the prefix's changes, nothing from outside it"
    );
    let delete = &events[3];
    assert_eq!(
        (
            delete.kv.version,
            delete.kv.create_revision,
            delete.kv.value.len()
        ),
        (0, 0, 0),
        "[{name}] a delete event carries only the key and its revision"
    );

    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(next_events(name, &mut single).await);
    }
    assert!(
        seen.iter().all(|e| e.kv.key == b"wb/a"),
        "[{name}] one key only"
    );
    assert_eq!(seen[0].prev_kv, None, "[{name}] a created key has no prev");
    let prev = seen[1].prev_kv.as_ref().expect("the second put has a prev");
    assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"1"[..], r1));
    let prev = seen[2].prev_kv.as_ref().expect("the delete has a prev");
    assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"2"[..], r2));

    let filtered = next_events(name, &mut no_put).await;
    assert_eq!(
        filtered
            .iter()
            .map(|e| (e.kind, e.kv.mod_revision))
            .collect::<Vec<_>>(),
        vec![(EventKind::Delete, r3)],
        "[{name}] no_put leaves only the delete"
    );

    // From a past revision: the history first, then live changes.
    let mut replay = backend
        .watch(WatchRequest::prefix("wb/").from_revision(r2))
        .await
        .unwrap();
    let r4 = put(backend, "wb/c", "1").await;
    let events = collect_events(name, &mut replay, 4).await;
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        vec![r2, r2, r3, r4],
        "[{name}] replay from r2, then live"
    );

    // A start revision in the future waits for it.
    let now = current_revision(backend).await;
    let mut future = backend
        .watch(WatchRequest::prefix("wb/").from_revision(now + 2))
        .await
        .unwrap();
    put(backend, "wb/skipped", "1").await;
    let r6 = put(backend, "wb/seen", "1").await;
    let events = next_events(name, &mut future).await;
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        vec![r6],
        "[{name}] a future start revision"
    );

    // Bad requests.
    for bad in [
        WatchRequest {
            key: b"b".to_vec(),
            range_end: b"a".to_vec(),
            ..Default::default()
        },
        WatchRequest::default(),
    ] {
        let err = backend.watch(bad.clone()).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "[{name}] {bad:?}: {err}"
        );
    }
}

/// Concurrent writers: a watcher sees every write exactly once, in revision order.
pub async fn watch_sees_every_write_once(backend: &dyn KvBackend) {
    let name = backend.name();
    let start = current_revision(backend).await + 1;
    let mut stream = backend
        .watch(WatchRequest::prefix("wall/").from_revision(start))
        .await
        .unwrap();
    let writers = 4;
    let per_writer = 50;
    let mut written = BTreeSet::new();
    let jobs = (0..writers).map(|w| async move {
        let mut revisions = Vec::new();
        for i in 0..per_writer {
            revisions.push(put(backend, &format!("wall/{w}/{i}"), "v").await);
        }
        revisions
    });
    for revisions in futures_util::future::join_all(jobs).await {
        written.extend(revisions);
    }
    let events = collect_events(name, &mut stream, writers * per_writer).await;
    let seen: Vec<i64> = events.iter().map(|e| e.kv.mod_revision).collect();
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "[{name}] an event delivered twice"
    );
    assert_eq!(unique, written, "[{name}] events and writes differ");
}

/// Compaction: reads and watches below the compacted revision fail naming it; at it
/// and after they work; a watcher already past it is not disturbed; a second
/// compaction at or below it and one in the future are refused.
pub async fn compaction(backend: &dyn KvBackend) {
    let name = backend.name();
    let mut live = backend
        .watch(WatchRequest::prefix("compact/"))
        .await
        .unwrap();
    let r1 = put(backend, "compact/x", "1").await;
    let r2 = put(backend, "compact/x", "2").await;
    let r3 = backend
        .delete_range(DeleteRangeRequest::key(b"compact/x".to_vec()))
        .await
        .unwrap()
        .revision;
    let r4 = put(backend, "compact/y", "1").await;
    backend.compact(r2).await.unwrap();

    let err = backend.range(range_at("compact/", r1)).await.unwrap_err();
    assert!(
        matches!(err, Error::Compacted { requested, compacted } if requested == r1 && compacted == r2),
        "[{name}] a read below the compacted revision: {err}"
    );
    let kept = backend.range(range_at("compact/", r2)).await.unwrap();
    assert_eq!(
        (keys(&kept.kvs), kept.kvs[0].value.as_slice()),
        (vec!["compact/x".to_string()], &b"2"[..]),
        "[{name}] a read at the compacted revision"
    );
    assert!(
        backend
            .range(range_at("compact/", r3))
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "[{name}] at r3"
    );

    let err = backend
        .watch(WatchRequest::prefix("compact/").from_revision(r1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Compacted { compacted, .. } if compacted == r2),
        "[{name}] a watch below the compacted revision: {err}"
    );
    let mut from_compacted = backend
        .watch(WatchRequest::prefix("compact/").from_revision(r2))
        .await
        .unwrap();
    let events = collect_events(name, &mut from_compacted, 3).await;
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        vec![r2, r3, r4],
        "[{name}] a watch from the compacted revision"
    );

    for (revision, what) in [(r2, "the compacted revision"), (r1, "below it")] {
        let err = backend.compact(revision).await.unwrap_err();
        assert!(
            matches!(err, Error::Compacted { .. }),
            "[{name}] compacting at {what}: {err}"
        );
    }
    let current = current_revision(backend).await;
    let err = backend.compact(current + 100).await.unwrap_err();
    assert!(
        matches!(err, Error::FutureRevision { .. }),
        "[{name}] compacting the future: {err}"
    );

    // The watcher that was live all along saw every change.
    let r5 = put(backend, "compact/z", "1").await;
    let events = collect_events(name, &mut live, 5).await;
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        vec![r1, r2, r3, r4, r5],
        "[{name}] a live watcher is not disturbed by compaction"
    );
}
