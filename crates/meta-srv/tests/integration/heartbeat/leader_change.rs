//! Three in-process members: a follower sends nodes to the leader, and a leader change
//! fails the instructions still pending while the next leader's go through.

use super::*;

async fn start_three() -> Vec<crate::in_process::Running> {
    crate::in_process::start_three(|_| {}).await
}

use crate::in_process::leader_of;

/// Opens region 77 only when released; everything else at once.
struct Gated {
    started: tokio::sync::mpsc::UnboundedSender<u64>,
    release: tokio::sync::Semaphore,
}

#[async_trait::async_trait]
impl meta_client::InstructionHandler for Gated {
    async fn handle(&self, instruction: pb::Instruction) -> Result<Vec<pb::RegionOutcome>, String> {
        let Some(pb::instruction::Kind::OpenRegion(r)) = instruction.kind else {
            return Err("unexpected".to_string());
        };
        let _ = self.started.send(r.region_id);
        if r.region_id == 77 {
            let _permit = self.release.acquire().await.map_err(|e| e.to_string())?;
        }
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_nodes_to_the_leader_and_a_leader_change_fails_pending_instructions() {
    let members = start_three().await;
    let first = leader_of(&members).await;
    let follower = (0..3).find(|&i| i != first).unwrap();

    tracing::info!("--- a follower refuses a stream, naming the leader");
    let (tx, mut answers) = open(&members[follower].grpc).await;
    tx.send(handshake(42, pb::NodeRole::Datanode, "h:42"))
        .await
        .unwrap();
    let status = answer(&mut answers).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not leader"), "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get(meta_proto::LEADER_HINT)
            .unwrap()
            .to_str()
            .unwrap(),
        members[first].grpc
    );

    tracing::info!("--- a task that knows only the follower beats to the leader");
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let handler = std::sync::Arc::new(Gated {
        started: started_tx,
        release: tokio::sync::Semaphore::new(0),
    });
    let client = MetaClient::new(&[&members[follower].grpc], MetaClientOptions::default()).unwrap();
    let identity = meta_client::NodeIdentity {
        id: 42,
        role: pb::NodeRole::Datanode,
        addr: "h:42".to_string(),
        ..Default::default()
    };
    let task = meta_client::HeartbeatTask::start(
        client,
        identity,
        std::sync::Arc::new(NoStats),
        handler.clone(),
    );
    let mut state = task.state();
    let leader_addr = members[first].grpc.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(|s| {
            s.connected_to.as_deref() == Some(leader_addr.as_str()) && s.answered >= 2
        }),
    )
    .await
    .expect("beating to the leader")
    .unwrap();

    tracing::info!("--- an instruction is pending on the node when leadership moves");
    let pending = {
        let outbox = members[first].plane.clone();
        tokio::spawn(async move {
            outbox
                .send(42, open_region(77), Duration::from_secs(30))
                .await
        })
    };
    assert_eq!(started.recv().await, Some(77));
    let admin = MetaClient::new(&[&members[first].grpc], MetaClientOptions::default()).unwrap();
    admin.transfer_leader(follower as u64 + 1).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the pending send ends")
        .unwrap()
        .unwrap_err();
    // Whichever comes first: the mailbox reset, or the end of the node's stream
    // (which the term change also causes).
    let err = err.to_string();
    assert!(
        err.contains("leadership changed before node 42 replied")
            || err.contains("node 42's heartbeat stream ended before it replied"),
        "{err}"
    );

    tracing::info!("--- the node follows the new leader, which does not call it failed");
    let second = leader_of(&members).await;
    assert_eq!(second, follower);
    let second_addr = members[second].grpc.clone();
    let before = state.borrow().answered;
    tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(|s| {
            s.connected_to.as_deref() == Some(second_addr.as_str()) && s.answered >= before + 2
        }),
    )
    .await
    .expect("beating to the new leader")
    .unwrap();
    let new_leader = MetaClient::new(&[&second_addr], MetaClientOptions::default()).unwrap();
    let nodes = new_leader.nodes().await.unwrap();
    assert_eq!(
        (nodes[0].node_id, nodes[0].liveness()),
        (42, pb::Liveness::Alive)
    );

    // The old instruction finishes now; its reply belongs to the old stream and is
    // dropped. The new leader's own instruction round-trips.
    handler.release.add_permits(1);
    let reply = members[second]
        .plane
        .send(42, open_region(78), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    assert!(reply.id >> 32 > 0, "ids carry the term: {}", reply.id);
    drop(task);
    for member in members {
        member.shutdown().await;
    }
}
