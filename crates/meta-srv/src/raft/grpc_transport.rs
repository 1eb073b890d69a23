//! `GrpcTransport`: raft messages to peers over the `meta.v1.Cluster/Raft` stream.
//!
//! One task per peer owns a bounded queue. It connects lazily (on the first message),
//! keeps one client stream open, and packs every message already queued into one
//! `RaftBatch`. On any error it drops what it holds (raft retransmits) and reconnects
//! with exponential backoff. `send` never blocks the driver: a full queue drops.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use meta_proto::v1 as pb;
use meta_proto::v1::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::raft::transport::Transport;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages packed into one batch.
const MAX_BATCH: usize = 256;

/// Sends raft messages to peers over gRPC streams.
pub struct GrpcTransport {
    peers: HashMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts one sender task per peer in `members` other than `me`, on `runtime`.
    pub fn start(
        cluster_id: u64,
        me: u64,
        members: &BTreeMap<u64, String>,
        runtime: &tokio::runtime::Handle,
    ) -> GrpcTransport {
        let mut peers = HashMap::new();
        for (&id, addr) in members {
            if id == me {
                continue;
            }
            let (queue, messages) = mpsc::channel(PEER_QUEUE);
            runtime.spawn(peer_loop(cluster_id, me, id, addr.clone(), messages));
            peers.insert(id, queue);
        }
        GrpcTransport { peers }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for message in messages {
            if let Some(queue) = self.peers.get(&message.to) {
                // Full or closed: drop, as a lossy network would; raft resends.
                let _ = queue.try_send(message);
            }
        }
    }
}

fn batch(cluster_id: u64, from: u64, messages: Vec<Message>) -> pb::RaftBatch {
    pb::RaftBatch {
        cluster_id,
        from,
        messages: messages
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect(),
    }
}

async fn peer_loop(
    cluster_id: u64,
    me: u64,
    peer: u64,
    addr: String,
    mut messages: mpsc::Receiver<Message>,
) {
    let Ok(endpoint) = Endpoint::from_shared(format!("http://{addr}")) else {
        tracing::error!(peer, %addr, "invalid peer address; messages to it are dropped");
        return;
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let mut backoff = Duration::from_millis(50);
    // The first message of a connection is taken before connecting: no idle
    // connections to peers nobody talks to.
    while let Some(first) = messages.recv().await {
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => {
                tracing::debug!(peer, %addr, error = %e, "cannot reach peer");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (stream, batches) = mpsc::channel(64);
        let mut client = ClusterClient::new(channel);
        let call = tokio::spawn(async move { client.raft(ReceiverStream::new(batches)).await });
        let mut pending = vec![first];
        loop {
            while pending.len() < MAX_BATCH {
                match messages.try_recv() {
                    Ok(message) => pending.push(message),
                    Err(_) => break,
                }
            }
            let outgoing = batch(cluster_id, me, std::mem::take(&mut pending));
            if stream.send(outgoing).await.is_err() {
                break;
            }
            match messages.recv().await {
                Some(message) => pending.push(message),
                None => return,
            }
        }
        match call.await {
            Ok(Err(status)) => {
                tracing::debug!(peer, %addr, error = %status.message(), "raft stream closed")
            }
            Ok(Ok(_)) | Err(_) => {}
        }
    }
}
