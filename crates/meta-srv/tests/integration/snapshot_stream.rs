//! A new member catches up through a streamed snapshot of over 200 MB while writes go
//! on, and the stream, broken once midway, resumes where it broke.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::front::Front;
use crate::in_process;
use crate::support::{check, wait_until};

const VALUES: usize = 400;
const VALUE_BYTES: usize = 512 * 1024;

fn value(i: usize) -> Vec<u8> {
    let mut value = vec![(i % 251) as u8; VALUE_BYTES];
    value[..8].copy_from_slice(&(i as u64).to_be_bytes());
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_catches_up_through_a_streamed_snapshot_resumed_after_a_break() {
    let leader = in_process::start_with(|config| {
        config.raft.compact_after = 200;
        config.raft.keep_entries = 20;
    })
    .await;
    let client = Arc::new(MetaClient::new(&[&leader.grpc], MetaClientOptions::default()).unwrap());

    // 400 values of 512 KiB: 200 MiB of KV, then enough small writes that the log no
    // longer holds the start (a new member must take a snapshot).
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            for i in (writer..VALUES).step_by(4) {
                client
                    .put(PutRequest::new(format!("big/{i:04}"), value(i)))
                    .await
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for i in 0..300 {
        client
            .put(PutRequest::new(format!("pad/{i}"), "x"))
            .await
            .unwrap();
    }

    // Member 2 joins behind a proxy, so its connections can be broken.
    let front = Front::start();
    client.add_learner(2, &front.addr).await.unwrap();
    let joiner = in_process::start_with(|config| {
        config.node_id = 2;
        config.join = leader.grpc.clone();
    })
    .await;
    front.point_to(Some(joiner.grpc.clone()));
    let files = joiner.snapshots.clone();

    // Writes go on while the snapshot travels.
    let writing = Arc::new(AtomicBool::new(true));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, writing, acked) = (client.clone(), writing.clone(), acked.clone());
        tokio::spawn(async move {
            while writing.load(Ordering::SeqCst) {
                let n = acked.load(Ordering::SeqCst);
                client
                    .put(PutRequest::new(format!("during/{n:06}"), "y"))
                    .await
                    .unwrap();
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let total = (VALUES * VALUE_BYTES) as u64;
    wait_until(Duration::from_secs(180), || async {
        let received = files.received_bytes();
        check(received > total / 4, || {
            format!("{received} snapshot bytes received so far")
        })
    })
    .await;
    let before_break = files.received_bytes();
    front.cut_and_heal();
    tracing::info!(before_break, "broke every connection to member 2");

    let joined = MetaClient::new(&[&joiner.grpc], MetaClientOptions::default()).unwrap();
    wait_until(Duration::from_secs(300), || async {
        let count = joined
            .range_serializable(RangeRequest {
                count_only: true,
                ..RangeRequest::prefix("big/")
            })
            .await
            .map(|r| r.count)
            .unwrap_or(0);
        check(count == VALUES as i64, || {
            format!("member 2 holds {count} of the {VALUES} values")
        })
    })
    .await;
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    let during = acked.load(Ordering::SeqCst);
    assert!(during > 0, "writes went on meanwhile");

    // Member 2 then follows the log: every write acknowledged meanwhile arrives.
    let commit = client.status().await.unwrap().commit_index;
    wait_until(Duration::from_secs(60), || async {
        let applied = joined.status().await.map(|s| s.applied_index).unwrap_or(0);
        check(applied >= commit, || {
            format!("member 2 applied {applied}, the leader committed {commit}")
        })
    })
    .await;
    let writes = joined
        .range_serializable(RangeRequest {
            count_only: true,
            ..RangeRequest::prefix("during/")
        })
        .await
        .unwrap();
    assert_eq!(writes.count, during as i64, "every acknowledged write");
    for i in [0, 137, VALUES - 1] {
        let got = joined
            .range_serializable(RangeRequest::key(format!("big/{i:04}")))
            .await
            .unwrap();
        assert_eq!(got.kvs[0].value, value(i), "value {i}");
    }

    // The break cost a resume, not a second full copy.
    assert!(files.resumed_streams() >= 1, "the stream resumed");
    let received = files.received_bytes();
    assert!(
        received < total + total / 2,
        "{received} bytes received for a snapshot of about {total}: resent from the start?"
    );

    joiner.shutdown().await;
    leader.shutdown().await;
}

/// The first chunk of a stream for member `to` of `cluster_id`.
fn chunk(
    cluster_id: u64,
    to: u64,
    offset: u64,
    data: &[u8],
    size: u64,
    crc32: u32,
) -> meta_proto::v1::SnapshotChunk {
    use protobuf::Message as _;
    let mut message = raft::prelude::Message::default();
    message.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
    message.to = to;
    message.from = 9;
    message.mut_snapshot().mut_metadata().index = 5;
    message.mut_snapshot().mut_metadata().term = 1;
    meta_proto::v1::SnapshotChunk {
        cluster_id,
        from: 9,
        message: message.write_to_bytes().unwrap(),
        size,
        crc32,
        offset,
        data: data.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_streams_are_refused_with_a_reason() {
    use meta_proto::v1 as pb;
    use meta_proto::v1::cluster_client::ClusterClient;
    let server = in_process::start().await;
    let mut client = ClusterClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let cluster_id = wait_until(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let status = client
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            check(status.role == "leader", || format!("{status:?}")).map(|()| status.cluster_id)
        }
    })
    .await;

    let foreign = client
        .snapshot_offset(pb::SnapshotOffsetRequest {
            cluster_id: cluster_id ^ 1,
            from: 9,
            index: 5,
            term: 1,
            size: 10,
            crc32: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::FailedPrecondition);
    assert!(
        foreign.message().contains("cluster"),
        "{}",
        foreign.message()
    );

    let data = b"0123456789";
    let crc = crc32fast::hash(data);
    // (first chunk: member, offset, announced size, CRC), the refusal and its reason.
    let refused = [
        (
            (1, 4, 14, crc),
            tonic::Code::FailedPrecondition,
            "starts at byte 4 but 0 bytes",
        ),
        (
            (7, 0, 10, crc),
            tonic::Code::InvalidArgument,
            "not a snapshot for member 1",
        ),
        ((1, 0, 10, crc ^ 1), tonic::Code::DataLoss, "CRC-32"),
        ((1, 0, 4, crc), tonic::Code::InvalidArgument, "longer"),
    ];
    for ((to, offset, size, crc32), code, reason) in refused {
        let status = client
            .install_snapshot(tokio_stream::iter([chunk(
                cluster_id, to, offset, data, size, crc32,
            )]))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{reason}: {}", status.message());
        assert!(status.message().contains(reason), "{}", status.message());
    }

    // None of it reached raft: the member still leads, alone, and serves.
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.role.as_str(), status.members.len()), ("leader", 1));
    server.shutdown().await;
}
