//! Heartbeat streams against an in-process server: registration, stats, listing,
//! restart of a node, and bad streams that close only themselves.

use std::collections::HashMap;
use std::time::Duration;

use common_meta::model::join_token::JoinTokenSigner;
use common_meta::time::unix_ms;
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;
use meta_proto::v1::heartbeat_client::HeartbeatClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::in_process::start;
use crate::support::{check, wait_until};

const SECRET: &str = "a cluster secret of enough bytes";

fn handshake(node_id: u64, role: pb::NodeRole, addr: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
            node_id,
            role: role.into(),
            addr: addr.to_string(),
            version: "0.1.0".to_string(),
            labels: HashMap::from([("zone".to_string(), "a".to_string())]),
            start_time_ms: 1,
            join_token: String::new(),
        })),
        replies: Vec::new(),
        seq: 1,
        send_instant_ms: 0,
    }
}

fn with_token(mut request: pb::HeartbeatRequest, token: &str) -> pb::HeartbeatRequest {
    if let Some(pb::heartbeat_request::Body::Handshake(h)) = &mut request.body {
        h.join_token = token.to_string();
    }
    request
}

fn region(id: u64) -> pb::RegionStat {
    pb::RegionStat {
        region_id: id,
        role: pb::RegionRole::Leader.into(),
        ..Default::default()
    }
}

/// Full stats of regions 0..regions.
fn stats(regions: usize) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Stats(pb::NodeStats {
            regions: (0..regions as u64).map(region).collect(),
            full: true,
            removed_regions: Vec::new(),
            groups: Vec::new(),
        })),
        replies: Vec::new(),
        seq: 0,
        send_instant_ms: 0,
    }
}

/// A delta: `changed` regions new or updated, `removed` gone.
fn delta(changed: &[u64], removed: &[u64], seq: u64) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Stats(pb::NodeStats {
            regions: changed.iter().copied().map(region).collect(),
            full: false,
            removed_regions: removed.to_vec(),
            groups: Vec::new(),
        })),
        replies: Vec::new(),
        seq,
        send_instant_ms: 0,
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
    wait_until(Duration::from_secs(20), || async {
        let (tx, mut answers) = open(grpc).await;
        tx.send(first.clone()).await.unwrap();
        match answer(&mut answers).await {
            Ok(response) => Ok((tx, answers, response)),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                Err(format!("never became leader: {status:?}"))
            }
            Err(status) => panic!("registration refused: {status:?}"),
        }
    })
    .await
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
        (node.node_id, node.role(), node.addr.as_str()),
        (7, pb::NodeRole::Datanode, "10.0.0.7:4001")
    );
    assert_eq!(
        (node.state(), node.liveness(), node.region_count),
        (pb::NodeState::Joining, pb::Liveness::Alive, 3)
    );
    assert_eq!(node.labels["zone"], "a");
    assert!(node.last_heartbeat_age_ms.is_some());

    // A delta touches only what it names, and the answer echoes the request's seq.
    tx.send(delta(&[3, 4], &[0], 17)).await.unwrap();
    assert_eq!(answer(&mut answers).await.unwrap().seq, 17);
    let nodes = client.nodes().await.unwrap();
    assert_eq!(nodes[0].region_count, 4, "0..3 - {{0}} + {{3, 4}}");

    let body = crate::in_process::http_get(&server.http, "/nodes").await;
    let (head, json) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json[0]["id"], 7);
    assert_eq!(json[0]["role"], "datanode");
    assert_eq!(json[0]["liveness"], "alive");
    assert_eq!(json[0]["region_count"], 4);

    // The node restarts elsewhere and opens a new stream: same record, new address.
    // The old stream (its process gone, its connection not yet) is ended as replaced.
    let (new_tx, mut new_answers, _) = register(
        &server.grpc,
        handshake(7, pb::NodeRole::Datanode, "10.0.0.8:4001"),
    )
    .await;
    let nodes = client.nodes().await.unwrap();
    assert_eq!((nodes.len(), nodes[0].addr.as_str()), (1, "10.0.0.8:4001"));
    let _ = tx.send(delta(&[9], &[], 18)).await;
    let status = answer(&mut answers).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("replaced"), "{status:?}");

    // Topology: joining -> active -> draining -> decommissioned -> removed.
    for state in [
        pb::NodeState::Active,
        pb::NodeState::Draining,
        pb::NodeState::Decommissioned,
    ] {
        assert_eq!(
            client.set_node_state(7, state).await.unwrap().state(),
            state
        );
    }
    let err = client
        .set_node_state(7, pb::NodeState::Active)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot go from Decommissioned to Active"),
        "{err}"
    );
    let err = client
        .set_node_state(7, pb::NodeState::Joining)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot be moved back to joining"),
        "{err}"
    );
    // A number no state has (a newer or broken client) is refused by name.
    let mut raw = pb::heartbeat_client::HeartbeatClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let status = raw
        .set_node_state(pb::SetNodeStateRequest {
            node_id: 7,
            state: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("unknown node state 99"),
        "{status:?}"
    );
    client.remove_node(7).await.unwrap();
    assert!(client.nodes().await.unwrap().is_empty());
    // Its stream was still open: the next heartbeat is told why it is refused.
    new_tx.send(stats(1)).await.unwrap();
    let status = answer(&mut new_answers).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("node 7 was removed"),
        "{status:?}"
    );
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
        (pb::HeartbeatRequest::default(), "empty heartbeat request"),
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

    // Stats that need a base the stream does not have, on a registered stream.
    let (tx, mut answers, _) =
        register(&server.grpc, handshake(3, pb::NodeRole::Datanode, "h:3")).await;
    tx.send(delta(&[1], &[], 2)).await.unwrap();
    let status = answer(&mut answers).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("first stats of a stream must be full"),
        "{status:?}"
    );

    // Tokens are off without a cluster secret.
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let signer = JoinTokenSigner::new(SECRET.as_bytes()).unwrap();
    let err = client
        .register_join_token(&signer.mint(5, u64::MAX).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("join tokens are off"), "{err}");

    good.send(stats(2)).await.unwrap();
    answer(&mut good_answers)
        .await
        .expect("the good stream is undisturbed");
    server.shutdown().await;
}

/// Records instructions; refuses region 13 and never answers for region 99.
#[derive(Default)]
pub struct Recorder {
    seen: std::sync::Mutex<Vec<u64>>,
}

#[async_trait::async_trait]
impl meta_client::InstructionHandler for Recorder {
    async fn handle(&self, instruction: pb::Instruction) -> Result<Vec<pb::RegionOutcome>, String> {
        let region = match instruction.kind {
            Some(pb::instruction::Kind::OpenRegion(r)) => r.region_id,
            other => return Err(format!("unexpected {other:?}")),
        };
        self.seen.lock().unwrap().push(region);
        match region {
            13 => Err("region 13 is corrupt".to_string()),
            // A handler that never finishes: the sender's deadline must end the wait
            // (the task aborts it when it stops).
            99 => std::future::pending().await,
            _ => Ok(Vec::new()),
        }
    }
}

struct NoStats;

#[async_trait::async_trait]
impl meta_client::StatsProvider for NoStats {
    async fn stats(&self) -> Vec<pb::RegionStat> {
        Vec::new()
    }
}

fn open_region(region_id: u64) -> pb::Instruction {
    pb::Instruction {
        kind: Some(pb::instruction::Kind::OpenRegion(pb::RegionInstruction {
            region_id,
            ..Default::default()
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
        join_token: String::new(),
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
        .plane
        .send(42, open_region(7), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    let reply = server
        .plane
        .send(42, open_region(13), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        (reply.ok, reply.error.as_str()),
        (false, "region 13 is corrupt")
    );
    let err = server
        .plane
        .send(42, open_region(99), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("node 42 did not reply within"),
        "{err}"
    );
    let err = server
        .plane
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

/// The first silence after a regular history (beats every `interval_ms`) at which the
/// detector of `config` calls a node failed: the bound a test may hold it to.
/// The silence after steady beats every `interval_ms` at which a node is first seen
/// as `liveness` (suspect or failed).
fn silence_until(
    config: meta_srv::config::FailureDetectorConfig,
    interval_ms: u64,
    liveness: meta_srv::cluster_plane::failure_detector::Liveness,
) -> Duration {
    use meta_srv::cluster_plane::failure_detector::PhiAccrualDetector;
    let mut detector = PhiAccrualDetector::new(config.into());
    for beat in 0..=100 {
        detector.heartbeat(beat * interval_ms);
    }
    let last = 100 * interval_ms;
    let silence = (0..)
        .map(|step| step * 10)
        .find(|silence| detector.liveness(last + silence) == liveness)
        .unwrap();
    Duration::from_millis(silence)
}

async fn liveness(client: &MetaClient, node: u64) -> Option<String> {
    let nodes = client.nodes().await.ok()?;
    nodes.into_iter().find(|n| n.node_id == node).map(|n| {
        let name = n.liveness().as_str_name();
        name.trim_start_matches("LIVENESS_").to_ascii_lowercase()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_within_the_bound_and_a_slow_one_is_only_suspect() {
    // Beats every 100 ms; a standard deviation floor of 2 s makes the suspect band
    // wide (phi 4..8 is about 7.5..11.3 s of silence), so scheduling noise on a loaded
    // machine cannot skip it or run past it. The slow node keeps silent for the
    // middle of the band: suspect, about 2 s short of failed.
    let detector = meta_srv::config::FailureDetectorConfig {
        threshold: 8.0,
        min_std_dev_ms: 2_000,
        acceptable_pause_ms: 0,
        first_heartbeat_estimate_ms: 100,
    };
    let server = crate::in_process::start_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.failure_detector = detector;
    })
    .await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let options = meta_client::sim::SimOptions {
        nodes: 3,
        regions_per_node: 20,
        ..Default::default()
    };
    let mut sim = meta_client::sim::Simulator::start(std::slice::from_ref(&server.grpc), &options)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), || async {
        let nodes = client.nodes().await.unwrap_or_default();
        let all_alive = nodes.len() == 3
            && nodes
                .iter()
                .all(|n| n.liveness() == pb::Liveness::Alive && n.region_count == 20);
        check(all_alive, || format!("nodes not alive: {nodes:?}"))
    })
    .await;
    // Let the detectors learn the rhythm.
    let beats = sim.totals().0;
    wait_until(Duration::from_secs(30), || async {
        check(sim.totals().0 >= beats + 60, || {
            "nodes stopped beating".to_string()
        })
    })
    .await;

    use meta_srv::cluster_plane::failure_detector::Liveness;
    let bound = silence_until(detector, 100, Liveness::Failed);
    let pause = (silence_until(detector, 100, Liveness::Suspect) + bound) / 2;
    let killed_at = std::time::Instant::now();
    assert!(sim.kill(1));
    assert!(sim.pause(2, pause));
    // Watch both until node 1 is failed and the slow node's pause is surely over.
    let slow_seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let killed_failed_after = std::cell::Cell::new(None);
    wait_until(bound + Duration::from_secs(5), || async {
        if let Some(l) = liveness(&client, 2).await {
            slow_seen.borrow_mut().insert(l);
        }
        if killed_failed_after.get().is_none()
            && liveness(&client, 1).await.as_deref() == Some("failed")
        {
            killed_failed_after.set(Some(killed_at.elapsed()));
        }
        let watched = killed_at.elapsed() >= pause + Duration::from_millis(500);
        check(killed_failed_after.get().is_some() && watched, || {
            format!(
                "node 1 not failed {:?} after its kill (bound {bound:?})",
                killed_at.elapsed()
            )
        })
    })
    .await;
    let slow_seen = slow_seen.into_inner();
    let failed_after = killed_failed_after.get().unwrap();
    assert!(
        failed_after <= bound + Duration::from_millis(1_500),
        "node 1 failed after {failed_after:?}, bound {bound:?}"
    );
    // The killed node is gone: an instruction to it fails at once, saying why.
    let err = server
        .plane
        .send(1, open_region(1), Duration::from_secs(30))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node 1 is failed") || err.contains("node 1 has no heartbeat stream"),
        "{err}"
    );
    assert!(
        slow_seen.contains("suspect"),
        "the slow node was seen {slow_seen:?}"
    );
    assert!(
        !slow_seen.contains("failed"),
        "the slow node was seen {slow_seen:?}"
    );
    wait_until(Duration::from_secs(10), || async {
        let now = liveness(&client, 2).await;
        check(now.as_deref() == Some("alive"), || {
            format!("the slow node did not recover: {now:?}")
        })
    })
    .await;
    assert_eq!(liveness(&client, 3).await.as_deref(), Some("alive"));
    drop(sim);
    server.shutdown().await;
}

mod join_tokens;
mod leader_change;
