use super::*;
use crate::kv::conformance::history::collect_events;
use crate::kv::{KvBackend, MemoryKvBackend, PutRequest};

async fn put_many(backend: &MemoryKvBackend, prefix: &str, count: usize) -> Vec<i64> {
    let mut revisions = Vec::new();
    for i in 0..count {
        let key = format!("{prefix}{i:05}");
        revisions.push(
            backend
                .put(PutRequest::new(key.into_bytes(), b"v".to_vec()))
                .await
                .unwrap()
                .revision,
        );
    }
    revisions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_falls_behind_and_catches_up_exactly() {
    let backend = MemoryKvBackend::default();
    let mut stream = backend.watch(WatchRequest::prefix("s/")).await.unwrap();
    // Far more batches than both queues hold: the writer must mark it unsynced
    // rather than wait, and it must later read the rest from the history.
    let written = put_many(&backend, "s/", 2000).await;
    assert!(
        !backend
            .store()
            .hub()
            .lock()
            .subscribers
            .values()
            .all(|s| s.synced.load(Ordering::Acquire)),
        "the unread watcher was marked unsynced"
    );
    let events = collect_events("memory", &mut stream, written.len()).await;
    let seen: Vec<i64> = events.iter().map(|e| e.kv.mod_revision).collect();
    assert_eq!(seen, written, "every write once, in order");
    // And it is live again afterwards.
    let more = put_many(&backend, "s/more", 3).await;
    let events = collect_events("memory", &mut stream, 3).await;
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        more
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watcher_whose_history_is_compacted_ends_with_the_compacted_revision() {
    let backend = MemoryKvBackend::default();
    let mut stream = backend.watch(WatchRequest::prefix("c/")).await.unwrap();
    let written = put_many(&backend, "c/", 2000).await;
    let last = *written.last().unwrap();
    backend.compact(last).await.unwrap();
    let mut delivered = 0;
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
            Ok(Some(Ok(WatchResponse::Events { events, .. }))) => delivered += events.len(),
            Ok(Some(Ok(WatchResponse::Progress { .. }))) => {}
            Ok(Some(Err(e))) => break e,
            Ok(None) => panic!("ended without saying why"),
            Err(_) => panic!("no answer"),
        }
    };
    assert!(delivered < written.len(), "it had fallen behind");
    assert!(
        matches!(error, Error::Compacted { compacted, .. } if compacted == last),
        "{error}"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap()
            .is_none(),
        "the watcher ends after the error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_is_cancelled_and_unregistered() {
    let backend = MemoryKvBackend::default();
    backend
        .store()
        .hub()
        .configure(Duration::from_millis(200), DEFAULT_PROGRESS_INTERVAL);
    let stream = backend.watch(WatchRequest::prefix("n/")).await.unwrap();
    put_many(&backend, "n/", 500).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while backend.store().hub().watchers() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled watcher is still registered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_never_claims_a_revision_ahead_of_undelivered_events() {
    let backend = MemoryKvBackend::default();
    let mut stream = backend.watch(WatchRequest::prefix("p/")).await.unwrap();
    let written = put_many(&backend, "p/", 300).await;
    stream.progress().await.unwrap();
    let mut seen = Vec::new();
    let claimed = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
            Ok(Some(Ok(WatchResponse::Events { events, .. }))) => {
                seen.extend(events.iter().map(|e| e.kv.mod_revision));
            }
            Ok(Some(Ok(WatchResponse::Progress {
                revision,
                requested: true,
            }))) => {
                break revision;
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(claimed >= *written.last().unwrap(), "{claimed}");
    assert_eq!(
        seen, written,
        "every event at or below the claim came first"
    );
    // Later events are all above the claim.
    let later = put_many(&backend, "p/later", 2).await;
    let events = collect_events("memory", &mut stream, 2).await;
    assert!(events.iter().all(|e| e.kv.mod_revision > claimed));
    assert_eq!(
        events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
        later
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_load_reclaims_space_and_breaks_no_watcher_ahead_of_it() {
    let backend = std::sync::Arc::new(MemoryKvBackend::default());
    let mut stream = backend.watch(WatchRequest::prefix("l/")).await.unwrap();
    // 3000 writes over 100 keys: most versions become garbage.
    let writer = {
        let backend = backend.clone();
        tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..3000 {
                let key = format!("l/{:03}", i % 100);
                let put = PutRequest::new(key.into_bytes(), b"v".to_vec());
                revisions.push(backend.put(put).await.unwrap().revision);
            }
            revisions
        })
    };
    // Compact behind the watcher (at most at what it delivered), again and again,
    // while the writer runs ahead.
    let mut seen: Vec<i64> = Vec::new();
    let mut compactions = 0;
    while seen.len() < 3000 {
        let target = seen.last().copied().unwrap_or(0);
        if target > backend.store().compacted() {
            backend.compact(target).await.unwrap();
            compactions += 1;
        }
        match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
            Ok(Some(Ok(WatchResponse::Events { events, .. }))) => {
                seen.extend(events.iter().map(|e| e.kv.mod_revision));
            }
            other => panic!("the watcher broke: {other:?}"),
        }
    }
    let written = writer.await.unwrap();
    assert_eq!(
        seen, written,
        "every write once, in order, despite compactions"
    );
    assert!(compactions >= 2, "{compactions}");
    let last = *written.last().unwrap();
    backend.compact(last).await.unwrap();
    assert_eq!(
        backend.store().history_len(),
        100,
        "space reclaimed: one version per key kept"
    );
}

#[tokio::test]
async fn dropping_the_stream_unregisters_the_watcher() {
    let backend = MemoryKvBackend::default();
    let stream = backend.watch(WatchRequest::key("d")).await.unwrap();
    assert_eq!(backend.store().hub().watchers(), 1);
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while backend.store().hub().watchers() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
}
