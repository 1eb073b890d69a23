//! Heartbeat streams against an in-process server: registration, stats, listing,
//! restart of a node, and bad streams that close only themselves.

use std::collections::HashMap;
use std::time::Duration;

use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;
use meta_proto::v1::heartbeat_client::HeartbeatClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::in_process::start;

fn handshake(node_id: u64, role: pb::NodeRole, addr: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
            node_id,
            role: role.into(),
            addr: addr.to_string(),
            version: "0.1.0".to_string(),
            labels: HashMap::from([("zone".to_string(), "a".to_string())]),
            start_time_ms: 1,
        })),
        replies: Vec::new(),
    }
}

fn stats(regions: usize) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Stats(pb::NodeStats {
            regions: (0..regions as u64)
                .map(|id| pb::RegionStat {
                    region_id: id,
                    role: "leader".into(),
                    ..Default::default()
                })
                .collect(),
        })),
        replies: Vec::new(),
    }
}

/// Opens a heartbeat stream: a sender of requests and the stream of answers.
async fn open(
    grpc: &str,
) -> (
    mpsc::Sender<pb::HeartbeatRequest>,
    Streaming<pb::HeartbeatResponse>,
) {
    let mut client = HeartbeatClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let answers = client
        .heartbeat(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

/// Opens a stream and registers with `first`, retrying (as a node would) while the
/// fresh server has not yet published its leadership.
async fn register(
    grpc: &str,
    first: pb::HeartbeatRequest,
) -> (
    mpsc::Sender<pb::HeartbeatRequest>,
    Streaming<pb::HeartbeatResponse>,
    pb::HeartbeatResponse,
) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (tx, mut answers) = open(grpc).await;
        tx.send(first.clone()).await.unwrap();
        match answer(&mut answers).await {
            Ok(response) => return (tx, answers, response),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < until,
                    "never became leader: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("registration refused: {status:?}"),
        }
    }
}

async fn answer(
    answers: &mut Streaming<pb::HeartbeatResponse>,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("answered in time")
        .map(|m| m.expect("the stream is open"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_report_stats_and_restart() {
    let server = start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();

    let (tx, mut answers, first) = register(
        &server.grpc,
        handshake(7, pb::NodeRole::Datanode, "10.0.0.7:4001"),
    )
    .await;
    assert_eq!(first.interval_ms, 3_000);
    tx.send(stats(3)).await.unwrap();
    answer(&mut answers).await.unwrap();

    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(
        (node.node_id, node.role.as_str(), node.addr.as_str()),
        (7, "datanode", "10.0.0.7:4001")
    );
    assert_eq!(
        (
            node.state.as_str(),
            node.liveness.as_str(),
            node.region_count
        ),
        ("joining", "alive", 3)
    );
    assert_eq!(node.labels["zone"], "a");
    assert!(node.last_heartbeat_age_ms.is_some());

    let body = crate::in_process::http_get(&server.http, "/nodes").await;
    let (head, json) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json[0]["id"], 7);
    assert_eq!(json[0]["role"], "datanode");
    assert_eq!(json[0]["liveness"], "alive");
    assert_eq!(json[0]["region_count"], 3);

    // The node restarts elsewhere and opens a new stream: same record, new address.
    drop(tx);
    let (_tx, _answers, _) = register(
        &server.grpc,
        handshake(7, pb::NodeRole::Datanode, "10.0.0.8:4001"),
    )
    .await;
    let nodes = client.nodes().await.unwrap();
    assert_eq!((nodes.len(), nodes[0].addr.as_str()), (1, "10.0.0.8:4001"));

    // Topology: joining -> active -> draining -> decommissioned -> removed.
    for state in ["active", "draining", "decommissioned"] {
        assert_eq!(client.set_node_state(7, state).await.unwrap().state, state);
    }
    let err = client.set_node_state(7, "active").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot go from Decommissioned to Active"),
        "{err}"
    );
    let err = client.set_node_state(7, "sleeping").await.unwrap_err();
    assert!(err.to_string().contains("unknown node state"), "{err}");
    client.remove_node(7).await.unwrap();
    assert!(client.nodes().await.unwrap().is_empty());
    let err = client.remove_node(7).await.unwrap_err();
    assert!(err.to_string().contains("unknown node 7"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_are_refused_and_others_go_on() {
    let server = start().await;
    let (good, mut good_answers, _) =
        register(&server.grpc, handshake(1, pb::NodeRole::Frontend, "h:1")).await;

    // Each case: the first message of a new stream and what the refusal says.
    let cases = [
        (stats(1), "must be a handshake"),
        (handshake(0, pb::NodeRole::Datanode, "h:2"), "no node_id"),
        (
            handshake(2, pb::NodeRole::Unspecified, "h:2"),
            "unknown role",
        ),
        (handshake(2, pb::NodeRole::Datanode, ""), "no addr"),
        (
            handshake(1, pb::NodeRole::Datanode, "h:1"),
            "registered as Frontend",
        ),
    ];
    for (first, want) in cases {
        let (tx, mut answers) = open(&server.grpc).await;
        tx.send(first).await.unwrap();
        let status = answer(&mut answers).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{want}: {status:?}"
        );
        assert!(
            status.message().contains(want),
            "{:?} lacks {want:?}",
            status.message()
        );
    }

    good.send(stats(2)).await.unwrap();
    answer(&mut good_answers)
        .await
        .expect("the good stream is undisturbed");
    server.shutdown().await;
}

/// Records instructions; refuses region 13 and is slow for region 99.
#[derive(Default)]
pub struct Recorder {
    seen: std::sync::Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl meta_client::InstructionHandler for Recorder {
    async fn handle(&self, instruction: pb::Instruction) -> Result<(), String> {
        let region = match instruction.kind {
            Some(pb::instruction::Kind::OpenRegion(r)) => r.region_id,
            other => return Err(format!("unexpected {other:?}")),
        };
        self.seen.lock().unwrap().push(region);
        match region {
            13 => Err("region 13 is corrupt".to_string()),
            99 => {
                // A handler slower than the sender's deadline.
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

struct NoStats;

#[async_trait::async_trait]
impl meta_client::StatsProvider for NoStats {
    async fn stats(&self) -> pb::NodeStats {
        pb::NodeStats::default()
    }
}

fn open_region(region_id: u64) -> pb::Instruction {
    pb::Instruction {
        kind: Some(pb::instruction::Kind::OpenRegion(pb::RegionInstruction {
            region_id,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_round_trip_refusal_timeout_and_unknown_node() {
    let server = start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let recorder = std::sync::Arc::new(Recorder::default());
    let identity = meta_client::NodeIdentity {
        id: 42,
        role: pb::NodeRole::Datanode,
        addr: "10.0.0.42:4001".to_string(),
        version: "0.1.0".to_string(),
        labels: HashMap::new(),
        start_time_ms: 1,
    };
    let task = meta_client::HeartbeatTask::start(
        client,
        identity,
        std::sync::Arc::new(NoStats),
        recorder.clone(),
    );
    let mut state = task.state();
    tokio::time::timeout(Duration::from_secs(20), state.wait_for(|s| s.answered >= 1))
        .await
        .expect("the node connects")
        .unwrap();

    let reply = server
        .outbox
        .send(42, open_region(7), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    let reply = server
        .outbox
        .send(42, open_region(13), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (reply.ok, reply.error.as_str()),
        (false, "region 13 is corrupt")
    );
    let err = server
        .outbox
        .send(42, open_region(99), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("node 42 did not reply within"),
        "{err}"
    );
    let err = server
        .outbox
        .send(5, open_region(1), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("node 5 has no heartbeat stream"),
        "{err}"
    );
    assert_eq!(*recorder.seen.lock().unwrap(), [7, 13, 99]);
    drop(task);
    server.shutdown().await;
}
