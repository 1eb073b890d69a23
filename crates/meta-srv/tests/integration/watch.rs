//! Watches through `meta-client` while members stop: the stream moves to another member
//! and resumes from the next revision, checked by a watch checker (itself tested on
//! broken histories below).

use std::collections::BTreeMap;
use std::time::Duration;

use common_meta::kv::{Event, EventKind, KvBackend, PutRequest, WatchRequest, WatchResponse};
use meta_client::{MetaClient, MetaClientOptions};

use crate::in_process::{leader_of, start_three};

/// A write the client saw acknowledged: key, value, revision.
type Acked = (Vec<u8>, Vec<u8>, i64);

/// Checks a recorded watch stream against the acknowledged puts of the watched prefix
/// (each key written with distinct values, no deletes): events in revision order, no
/// revision twice, every acknowledged write present with its value, no event that is
/// not a write (an unacknowledged write may appear, once), and `prev_kv` the key's
/// previous event.
pub fn check_stream(acked: &[Acked], events: &[Event]) -> Result<(), String> {
    let mut last = 0;
    let mut seen = BTreeMap::new();
    let mut previous: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for event in events {
        let revision = event.kv.mod_revision;
        if revision <= last {
            return Err(format!(
                "revision {revision} after {last}: out of order or twice"
            ));
        }
        last = revision;
        if event.kind != EventKind::Put {
            return Err(format!("unexpected {:?} at {revision}", event.kind));
        }
        let expected_prev = previous.get(&event.kv.key);
        let prev = event.prev_kv.as_ref().map(|p| &p.value);
        if prev != expected_prev {
            return Err(format!(
                "prev_kv at {revision} is {prev:?}, the key's previous value was {expected_prev:?}"
            ));
        }
        previous.insert(event.kv.key.clone(), event.kv.value.clone());
        seen.insert(revision, (event.kv.key.clone(), event.kv.value.clone()));
    }
    for (key, value, revision) in acked {
        match seen.get(revision) {
            Some((k, v)) if k == key && v == value => {}
            Some(other) => {
                return Err(format!(
                    "revision {revision} delivered {other:?}, acknowledged as {:?}",
                    (key, value)
                ));
            }
            None => return Err(format!("acknowledged write at {revision} never delivered")),
        }
    }
    Ok(())
}

fn put_event(key: &str, value: &str, revision: i64, prev: Option<&str>) -> Event {
    let kv = |value: &str, revision| common_meta::kv::KeyValue {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        mod_revision: revision,
        ..Default::default()
    };
    Event {
        kind: EventKind::Put,
        kv: kv(value, revision),
        prev_kv: prev.map(|p| kv(p, revision - 1)),
    }
}

#[test]
fn the_watch_checker_catches_broken_streams() {
    let acked: Vec<Acked> = vec![
        (b"a".to_vec(), b"1".to_vec(), 1),
        (b"a".to_vec(), b"2".to_vec(), 2),
        (b"b".to_vec(), b"1".to_vec(), 3),
    ];
    let good = vec![
        put_event("a", "1", 1, None),
        put_event("a", "2", 2, Some("1")),
        put_event("b", "1", 3, None),
    ];
    assert_eq!(check_stream(&acked, &good), Ok(()));
    let broken: Vec<(&str, Vec<Event>)> = vec![
        ("missing", vec![good[0].clone(), good[2].clone()]),
        (
            "duplicate",
            vec![
                good[0].clone(),
                good[1].clone(),
                good[1].clone(),
                good[2].clone(),
            ],
        ),
        (
            "reordered",
            vec![good[1].clone(), good[0].clone(), good[2].clone()],
        ),
        (
            "wrong prev",
            vec![
                good[0].clone(),
                put_event("a", "2", 2, None),
                good[2].clone(),
            ],
        ),
        (
            "wrong value",
            vec![
                good[0].clone(),
                put_event("a", "x", 2, Some("1")),
                good[2].clone(),
            ],
        ),
    ];
    for (what, events) in broken {
        assert!(
            check_stream(&acked, &events).is_err(),
            "{what} passed the checker"
        );
    }
}

/// Reads a stream until every acknowledged revision up to `through` has arrived.
async fn read_through(
    stream: &mut common_meta::kv::WatchStream,
    through: i64,
    into: &mut Vec<Event>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while into.last().map_or(0, |e| e.kv.mod_revision) < through {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(WatchResponse::Events { events, .. }))) => into.extend(events),
            Ok(Some(Ok(WatchResponse::Progress { .. }))) => {}
            Ok(Some(Err(e))) => panic!("the watch failed: {e}"),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!(
                "revision {through} not delivered within 60 s; last {:?}",
                into.last().map(|e| e.kv.mod_revision)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_watch_moves_on_when_its_member_stops_without_gap_or_repeat() {
    let mut members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let all: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    // The watcher starts on the leader, which is then stopped: the stream must move.
    let mut order = vec![members[leader].grpc.clone()];
    order.extend(all.iter().filter(|a| **a != members[leader].grpc).cloned());
    let watcher = MetaClient::new(&order, MetaClientOptions::default()).unwrap();
    let mut stream = watcher
        .watch(WatchRequest {
            prev_kv: true,
            ..WatchRequest::prefix("ww/")
        })
        .await
        .unwrap();
    let writer = MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    let mut acked = Vec::new();
    let mut events = Vec::new();
    let write = |round: usize| {
        let writer = writer.clone();
        async move {
            let mut done = Vec::new();
            for i in 0..20 {
                let key = format!("ww/{:02}", i % 7).into_bytes();
                let value = format!("{round}-{i}").into_bytes();
                match writer
                    .put(PutRequest::new(key.clone(), value.clone()))
                    .await
                {
                    Ok(r) => done.push((key, value, r.revision)),
                    // Not acknowledged: the checker allows it to appear (once) or not.
                    Err(e) => assert!(e.is_outcome_unknown(), "{e}"),
                }
            }
            done
        }
    };
    acked.extend(write(0).await);
    read_through(&mut stream, acked.last().unwrap().2, &mut events).await;

    let stopped = members.remove(leader);
    stopped.shutdown().await;
    acked.extend(write(1).await);
    read_through(&mut stream, acked.last().unwrap().2, &mut events).await;
    check_stream(&acked, &events).unwrap();

    // A watch from a past revision replays from the history of whichever member serves.
    let mut replay = watcher
        .watch(WatchRequest {
            prev_kv: true,
            ..WatchRequest::prefix("ww/").from_revision(acked[0].2)
        })
        .await
        .unwrap();
    let mut replayed = Vec::new();
    read_through(&mut replay, acked.last().unwrap().2, &mut replayed).await;
    check_stream(&acked, &replayed).unwrap();
    for member in members {
        member.shutdown().await;
    }
}

/// One client's watchers share its stream: watchers that come and go (the last one
/// dropped just as the next is added) are each created and see their own writes, and a
/// long-lived watcher beside them sees every write once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_come_and_go_on_one_clients_shared_stream() {
    let members = start_three(|_| {}).await;
    let all: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    let client = MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    let writer = MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    let mut acked = Vec::new();
    let mut long_lived = Vec::new();
    for round in 0..30 {
        let key = format!("cg/{round:02}");
        let mut stream = client.watch(WatchRequest::key(key.clone())).await.unwrap();
        let put = writer.put(PutRequest::new(key.clone(), "v")).await.unwrap();
        acked.push((key.into_bytes(), b"v".to_vec(), put.revision));
        let mut events = Vec::new();
        read_through(&mut stream, put.revision, &mut events).await;
        assert_eq!(
            events.iter().map(|e| e.kv.mod_revision).collect::<Vec<_>>(),
            vec![put.revision],
            "round {round}: its own write, once"
        );
        // Every tenth round a long-lived watcher is opened beside the short ones; the
        // short one is dropped at once, often while the next is being added.
        if round % 10 == 0 {
            long_lived.push((
                put.revision,
                client
                    .watch(WatchRequest::prefix("cg/").from_revision(put.revision))
                    .await
                    .unwrap(),
            ));
        }
    }
    let last = acked.last().unwrap().2;
    for (from, mut stream) in long_lived {
        let mut events = Vec::new();
        read_through(&mut stream, last, &mut events).await;
        let expected: Vec<_> = acked
            .iter()
            .filter(|(_, _, r)| *r >= from)
            .cloned()
            .collect();
        check_stream(&expected, &events).unwrap();
    }
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_the_history_it_was_told_to_keep() {
    let server = crate::in_process::start_with(|c| {
        c.compaction.mode = "periodic".to_string();
        c.compaction.retention = "1s".to_string();
    })
    .await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let first = client
        .put(PutRequest::new(b"old".to_vec(), b"1".to_vec()))
        .await
        .unwrap()
        .revision;
    client
        .put(PutRequest::new(b"old".to_vec(), b"2".to_vec()))
        .await
        .unwrap();
    // About a second later the first revision is compacted away; the current value stays.
    crate::support::wait_until(Duration::from_secs(30), || async {
        match client
            .range(common_meta::kv::RangeRequest::key(b"old".to_vec()).at_revision(first))
            .await
        {
            Err(common_meta::Error::Compacted { compacted, .. }) if compacted > first => Ok(()),
            other => Err(format!("revision {first} still readable: {other:?}")),
        }
    })
    .await;
    assert_eq!(client.get(b"old").await.unwrap().unwrap().value, b"2");
    server.shutdown().await;
}

async fn next_of(
    responses: &mut tonic::Streaming<meta_proto::v1::WatchResponse>,
) -> meta_proto::v1::WatchResponse {
    tokio::time::timeout(Duration::from_secs(20), responses.message())
        .await
        .expect("a watch response within 20 s")
        .unwrap()
        .expect("the stream goes on")
}

/// The wire contract of `meta.v1.Watch` and of the keep-alive stream, through raw gRPC
/// clients as another language's client would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_and_keep_alive_streams_answer_bad_requests_in_band() {
    use meta_proto::v1 as pb;
    use pb::watch_request::Request as R;
    let server = crate::in_process::start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let first = client
        .put(PutRequest::new("raw/a", "1"))
        .await
        .unwrap()
        .revision;
    let second = client
        .put(PutRequest::new("raw/a", "2"))
        .await
        .unwrap()
        .revision;
    client.compact(second).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (requests, outbound) = tokio::sync::mpsc::channel(8);
    let mut responses = pb::watch_client::WatchClient::new(channel.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    let send = |r: R| {
        let requests = requests.clone();
        async move {
            requests
                .send(pb::WatchRequest { request: Some(r) })
                .await
                .unwrap()
        }
    };
    let create = |key: &str, end: &str, start: i64, id: i64| {
        R::Create(pb::WatchCreateRequest {
            key: key.into(),
            range_end: end.into(),
            start_revision: start,
            watch_id: id,
            ..Default::default()
        })
    };

    // An inverted range: created and cancelled at once, in band; the stream lives on.
    send(create("raw/b", "raw/a", 0, 0)).await;
    let refused = next_of(&mut responses).await;
    assert!(refused.created && refused.canceled, "{refused:?}");
    assert!(
        refused.cancel_reason.contains("not after its key"),
        "{refused:?}"
    );
    // A compacted start: cancelled with the compacted revision.
    send(create("raw/a", "", first, 0)).await;
    let compacted = next_of(&mut responses).await;
    assert!(compacted.created && compacted.canceled);
    assert_eq!(compacted.compact_revision, second);
    // A good watcher: created first, then its events; ids chosen by the server start
    // at 0 (as etcd's), or the client names one.
    send(create("raw/", "raw0", second, 7)).await;
    let created = next_of(&mut responses).await;
    assert!(created.created && !created.canceled, "{created:?}");
    let id = created.watch_id;
    assert_eq!(id, 7);
    let events = next_of(&mut responses).await;
    assert_eq!((events.watch_id, events.events.len()), (id, 1));
    assert_eq!(events.events[0].kv.as_ref().unwrap().mod_revision, second);
    // An id in use is refused; an unknown cancel is ignored.
    send(create("raw/x", "", 0, id)).await;
    let in_use = next_of(&mut responses).await;
    assert!(
        in_use.canceled && in_use.cancel_reason.contains("in use"),
        "{in_use:?}"
    );
    send(R::Cancel(pb::WatchCancelRequest { watch_id: 999 })).await;
    // A progress request: answered with watch_id -1 once the watcher caught up.
    send(R::Progress(pb::WatchProgressRequest {})).await;
    let progress = next_of(&mut responses).await;
    assert_eq!(progress.watch_id, -1, "{progress:?}");
    assert!(progress.header.unwrap().revision >= second);
    // Cancelling the real one answers `canceled`.
    send(R::Cancel(pb::WatchCancelRequest { watch_id: id })).await;
    let cancelled = next_of(&mut responses).await;
    assert!(
        cancelled.canceled && cancelled.watch_id == id,
        "{cancelled:?}"
    );

    // Keep-alive of a revoked lease: TTL 0, and the stream goes on.
    let lease = client.lease_grant(30, 0).await.unwrap().id;
    let gone = client.lease_grant(30, 0).await.unwrap().id;
    client.lease_revoke(gone).await.unwrap();
    let (keep, outbound) = tokio::sync::mpsc::channel(4);
    let mut answers = pb::lease_client::LeaseClient::new(channel)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    for (id, alive) in [(gone, false), (lease, true)] {
        keep.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!(answer.id, id);
        assert_eq!(answer.ttl > 0, alive, "{answer:?}");
    }
    server.shutdown().await;
}
