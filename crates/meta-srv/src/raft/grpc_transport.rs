//! `GrpcTransport`: raft messages to peers over the `meta.v1.Cluster/Raft` stream.
//!
//! One task per peer owns a bounded queue. It connects lazily (on the first message),
//! keeps one client stream open, and packs every message already queued into one
//! `RaftBatch`. On any error it drops what it holds (raft retransmits) and reconnects
//! with exponential backoff. `send` never blocks the driver: a full queue drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meta_proto::v1 as pb;
use meta_proto::v1::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::raft::members::Members;
use crate::raft::transport::Transport;

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages packed into one batch.
const MAX_BATCH: usize = 256;

/// Sends raft messages to peers over gRPC streams.
pub struct GrpcTransport {
    cluster_id: u64,
    me: u64,
    members: Arc<Members>,
    runtime: tokio::runtime::Handle,
    /// One queue per peer and the address its task sends to.
    peers: Mutex<HashMap<u64, (String, mpsc::Sender<Message>)>>,
}

impl GrpcTransport {
    /// A transport for member `me`; a sender task per peer starts on `runtime` with the
    /// first message to it, at the address `members` gives.
    pub fn new(
        cluster_id: u64,
        me: u64,
        members: Arc<Members>,
        runtime: tokio::runtime::Handle,
    ) -> GrpcTransport {
        GrpcTransport {
            cluster_id,
            me,
            members,
            runtime,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The queue to `peer`, (re)starting its task when the peer is new or moved.
    fn queue(
        &self,
        peers: &mut HashMap<u64, (String, mpsc::Sender<Message>)>,
        peer: u64,
    ) -> Option<mpsc::Sender<Message>> {
        let addr = self.members.addr(peer)?;
        if let Some((known, queue)) = peers.get(&peer)
            && *known == addr
            && !queue.is_closed()
        {
            return Some(queue.clone());
        }
        let (queue, messages) = mpsc::channel(PEER_QUEUE);
        self.runtime.spawn(peer_loop(
            self.cluster_id,
            self.me,
            peer,
            addr.clone(),
            messages,
        ));
        peers.insert(peer, (addr, queue.clone()));
        Some(queue)
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        // Each critical section only looks up or replaces a queue: never torn.
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget removed members: dropping their queue ends their task.
        peers.retain(|id, _| self.members.addr(*id).is_some());
        for message in messages {
            if let Some(queue) = self.queue(&mut peers, message.to) {
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
        if let Ok(Err(status)) = call.await {
            tracing::debug!(peer, %addr, error = %status.message(), "raft stream closed");
        }
    }
}
