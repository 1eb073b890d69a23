//! etcd's Watch through a client of our etcd protos: etcd's v3rpc behaviour.

use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::{kv, put};
use crate::in_process::start;

fn create(key: &str, end: &str, start_revision: i64) -> epb::WatchRequest {
    epb::WatchRequest {
        request_union: Some(epb::watch_request::RequestUnion::CreateRequest(
            epb::WatchCreateRequest {
                key: key.into(),
                range_end: end.into(),
                start_revision,
                prev_kv: true,
                ..Default::default()
            },
        )),
    }
}

async fn next(responses: &mut Streaming<epb::WatchResponse>) -> epb::WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a watch response within 10 s")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test]
async fn watch_streams_behave_as_etcds() {
    let server = start().await;
    let mut kv = kv(&server.grpc).await;
    let first = kv.put(put("w/a", "1")).await.unwrap().into_inner();
    let r1 = first.header.unwrap().revision;
    kv.put(put("w/a", "2")).await.unwrap();

    let (requests, queued) = mpsc::channel(16);
    let mut client = WatchClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let mut responses = client
        .watch(ReceiverStream::new(queued))
        .await
        .unwrap()
        .into_inner();

    // From the first put on: created first (server-chosen id 0), then the history.
    requests.send(create("w/", "w0", r1)).await.unwrap();
    let created = next(&mut responses).await;
    assert!(
        created.created && !created.canceled && created.watch_id == 0,
        "{created:?}"
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let response = next(&mut responses).await;
        assert_eq!(response.watch_id, 0);
        seen.extend(response.events);
    }
    assert_eq!(seen[0].kv.as_ref().unwrap().value, b"1");
    assert_eq!(seen[1].prev_kv.as_ref().unwrap().value, b"1", "prev_kv");

    // A second watcher gets the next id; a live put reaches both.
    requests.send(create("w/a", "", 0)).await.unwrap();
    let second = next(&mut responses).await;
    assert!(second.created && second.watch_id == 1, "{second:?}");
    kv.put(put("w/a", "3")).await.unwrap();
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let response = next(&mut responses).await;
        assert_eq!(response.events.len(), 1);
        ids.push(response.watch_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![0, 1]);

    // Cancelling an unknown id answers nothing; a progress request answers -1.
    let cancel = |watch_id| epb::WatchRequest {
        request_union: Some(epb::watch_request::RequestUnion::CancelRequest(
            epb::WatchCancelRequest { watch_id },
        )),
    };
    requests.send(cancel(77)).await.unwrap();
    requests
        .send(epb::WatchRequest {
            request_union: Some(epb::watch_request::RequestUnion::ProgressRequest(
                epb::WatchProgressRequest {},
            )),
        })
        .await
        .unwrap();
    let progress = next(&mut responses).await;
    assert!(
        progress.watch_id == -1 && progress.events.is_empty(),
        "{progress:?}"
    );
    requests.send(cancel(1)).await.unwrap();
    let canceled = next(&mut responses).await;
    assert!(canceled.canceled && canceled.watch_id == 1, "{canceled:?}");

    // A start below the compacted revision: created, then cancelled with the
    // compacted revision and no reason, as etcd does; the stream goes on.
    let now = kv.put(put("w/b", "x")).await.unwrap().into_inner();
    let compact_at = now.header.unwrap().revision;
    let _ = next(&mut responses).await; // watcher 0 sees w/b
    kv.compact(epb::CompactionRequest {
        revision: compact_at,
        physical: false,
    })
    .await
    .unwrap();
    requests.send(create("w/", "w0", r1)).await.unwrap();
    let created = next(&mut responses).await;
    assert!(created.created && !created.canceled, "{created:?}");
    let refused = next(&mut responses).await;
    assert!(
        refused.canceled
            && refused.watch_id == created.watch_id
            && refused.compact_revision == compact_at
            && refused.cancel_reason.is_empty(),
        "{refused:?}"
    );
    // An inverted range is refused in band with watch id -1.
    requests.send(create("w/z", "w/a", 0)).await.unwrap();
    let inverted = next(&mut responses).await;
    assert!(
        inverted.created && inverted.canceled && inverted.watch_id == -1,
        "{inverted:?}"
    );
    assert!(!inverted.cancel_reason.is_empty());
    kv.put(put("w/c", "y")).await.unwrap();
    let still = next(&mut responses).await;
    assert_eq!(
        (still.watch_id, still.events.len()),
        (0, 1),
        "watcher 0 goes on"
    );
    drop(requests);
    server.shutdown().await;
}

/// etcd's `WithRequireLeader`: a stream that asked for a leader (`hasleader`) ends with
/// "no leader" once its member has known none for three election timeouts; one that
/// did not ask goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_asking_for_a_leader_ends_when_its_member_has_none() {
    let mut members = crate::in_process::start_three(|_| {}).await;
    let leader = crate::in_process::leader_of(&members).await;
    let kept = members.remove((leader + 1) % 3);
    let open = |with_leader: bool| {
        let addr = kept.grpc.clone();
        async move {
            let (requests, queued) = mpsc::channel(16);
            let mut client = WatchClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let mut request = tonic::Request::new(ReceiverStream::new(queued));
            if with_leader {
                request
                    .metadata_mut()
                    .insert("hasleader", "true".parse().unwrap());
            }
            let mut responses = client.watch(request).await.unwrap().into_inner();
            requests.send(create("h/", "h0", 0)).await.unwrap();
            assert!(next(&mut responses).await.created);
            (requests, responses)
        }
    };
    let (_asked, mut asked_responses) = open(true).await;
    let (_plain, mut plain_responses) = open(false).await;
    for other in members {
        other.shutdown().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), asked_responses.message())
        .await
        .expect("the stream ends within 30 s of losing the leader")
        .unwrap_err();
    assert_eq!(
        (ended.code(), ended.message()),
        (tonic::Code::Unavailable, "etcdserver: no leader")
    );
    // The stream that did not ask is still open: nothing arrives, nothing ends it.
    let quiet = tokio::time::timeout(Duration::from_millis(200), plain_responses.message()).await;
    assert!(quiet.is_err(), "the plain stream stays open: {quiet:?}");
    kept.shutdown().await;
}
