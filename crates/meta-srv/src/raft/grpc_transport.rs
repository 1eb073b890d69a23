//! `GrpcTransport`: raft messages to peers over the `meta.v1.Cluster/Raft` stream.
//!
//! One task per peer owns a bounded queue. It connects lazily (on the first message),
//! keeps one client stream open, and packs every message already queued into one
//! `RaftBatch`. On any error it drops what it holds (raft retransmits) and reconnects
//! with exponential backoff. `send` never blocks the driver: a full queue drops.
//!
//! A dead peer is found, not waited for: HTTP/2 keepalives end a half-open connection
//! within seconds, and a stream that accepts nothing for [`STALL`] is dropped. Each
//! failed connection or stream is reported to the driver (`report_unreachable`: raft
//! then probes that peer instead of streaming to it). A snapshot travels on a call of
//! its own whose end is its outcome, reported to the driver (`report_snapshot`), so the
//! leader retries a lost snapshot at once instead of after a timeout. A snapshot file
//! (see `snapshot.rs`) is streamed in chunks from where the peer's copy of it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use meta_proto::v1 as pb;
use meta_proto::v1::cluster_client::ClusterClient;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::raft::driver::{Command, DriverHandle};
use crate::raft::members::Members;
use crate::raft::snapshot::FileRef;
use crate::raft::transport::Transport;

/// A stream that accepts no batch for this long is taken for dead and reopened.
pub const STALL: Duration = Duration::from_secs(5);
/// Longest a snapshot may take to reach a peer.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(300);
/// Bytes of a snapshot file per chunk.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

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
    /// The driver, told of unreachable peers and snapshot outcomes once attached.
    reports: Arc<OnceLock<DriverHandle>>,
    /// Plain text or TLS to the other members.
    tls: Arc<crate::tls::PeerTls>,
}

impl GrpcTransport {
    /// The same transport, reaching the other members as `tls` says.
    pub fn with_tls(mut self, tls: Arc<crate::tls::PeerTls>) -> Self {
        self.tls = tls;
        self
    }

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
            reports: Arc::default(),
            tls: crate::tls::PeerTls::plain(),
        }
    }

    /// Reports peer failures and snapshot outcomes to the driver behind `driver` (set
    /// once the driver has started; reports before that are dropped).
    pub fn report_to(&self, driver: DriverHandle) {
        let _ = self.reports.set(driver);
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
            Peer {
                cluster_id: self.cluster_id,
                me: self.me,
                id: peer,
                addr: addr.clone(),
                reports: self.reports.clone(),
                tls: self.tls.clone(),
            },
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
        version: crate::data_dir::FORMAT_VERSION,
        messages: messages
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect(),
    }
}

/// Who a peer task sends to, and where it reports.
struct Peer {
    cluster_id: u64,
    me: u64,
    id: u64,
    addr: String,
    reports: Arc<OnceLock<DriverHandle>>,
    tls: Arc<crate::tls::PeerTls>,
}

impl Peer {
    fn report(&self, command: Command) {
        if let Some(driver) = self.reports.get() {
            let _ = driver.send(command);
        }
    }

    fn unreachable(&self) {
        self.report(Command::Unreachable { peer: self.id });
    }

    /// Sends one snapshot on a call of its own (inline) or a stream of chunks (a file);
    /// its end is the outcome.
    async fn send_snapshot(&self, channel: tonic::transport::Channel, snapshot: Message) {
        let sent = match FileRef::decode(snapshot.get_snapshot().get_data()) {
            Some(file) => tokio::time::timeout(
                SNAPSHOT_DEADLINE,
                self.stream_snapshot(channel, snapshot, file),
            )
            .await
            .map_err(|_| format!("not delivered within {SNAPSHOT_DEADLINE:?}"))
            .and_then(|sent| sent),
            None => {
                let batch = batch(self.cluster_id, self.me, vec![snapshot]);
                let mut client = ClusterClient::new(channel);
                match tokio::time::timeout(
                    SNAPSHOT_DEADLINE,
                    client.raft(tokio_stream::iter([batch])),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(status.message().to_string()),
                    Err(_) => Err(format!("not delivered within {SNAPSHOT_DEADLINE:?}")),
                }
            }
        };
        let delivered = sent.is_ok();
        if let Err(e) = sent {
            tracing::warn!(peer = self.id, addr = %self.addr, error = %e, "a snapshot did not reach the peer; the leader sends it again");
        }
        self.report(Command::SnapshotSent {
            peer: self.id,
            delivered,
        });
    }
}

/// A task that ends when this is dropped (the call it serves ended or was cancelled).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Peer {
    /// Streams a snapshot file in chunks from where the peer's copy of it ends.
    async fn stream_snapshot(
        &self,
        channel: tonic::transport::Channel,
        mut snapshot: Message,
        file: FileRef,
    ) -> Result<(), String> {
        let mut client = ClusterClient::new(channel);
        let metadata = snapshot.get_snapshot().get_metadata();
        let offset = client
            .snapshot_offset(pb::SnapshotOffsetRequest {
                cluster_id: self.cluster_id,
                from: self.me,
                index: metadata.index,
                term: metadata.term,
                size: file.size,
                crc32: file.crc32,
            })
            .await
            .map_err(|status| status.message().to_string())?
            .into_inner()
            .offset;
        if offset > 0 {
            tracing::info!(
                peer = self.id,
                offset,
                size = file.size,
                "resuming a snapshot stream"
            );
        }
        let mut input = tokio::fs::File::open(&file.path)
            .await
            .map_err(|e| format!("opening {}: {e}", file.path.display()))?;
        input
            .seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| format!("reading {}: {e}", file.path.display()))?;
        snapshot.mut_snapshot().clear_data();
        let header = snapshot
            .write_to_bytes()
            .map_err(|e| format!("encoding the snapshot message: {e}"))?;
        let (chunks, outgoing) = mpsc::channel(4);
        let (cluster_id, me, size, crc32) = (self.cluster_id, self.me, file.size, file.crc32);
        // A snapshot still moving is not lost: keep the driver from resending it for as
        // long as the call lasts (chunks, the receiver's check, its queue).
        let _moving = {
            let (reports, peer) = (self.reports.clone(), self.id);
            AbortOnDrop(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    if let Some(driver) = reports.get() {
                        let _ = driver.send(Command::SnapshotMoving { peer });
                    }
                }
            }))
        };
        // Reads ahead while the call sends; ends when the call stops taking chunks.
        let reader = tokio::spawn(async move {
            let mut header = Some(header);
            let mut sent = offset;
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK];
                let n = match input.read(&mut data).await {
                    Ok(n) => n,
                    Err(e) => return Err(format!("reading the snapshot file: {e}")),
                };
                if n == 0 && header.is_none() {
                    return Ok(());
                }
                data.truncate(n);
                sent += n as u64;
                let chunk = pb::SnapshotChunk {
                    cluster_id,
                    from: me,
                    message: header.take().unwrap_or_default(),
                    size,
                    crc32,
                    offset,
                    data,
                };
                if chunks.send(chunk).await.is_err() {
                    return Ok(());
                }
                if n == 0 || sent >= size {
                    return Ok(());
                }
            }
        });
        let answer = client
            .install_snapshot(ReceiverStream::new(outgoing))
            .await
            .map_err(|status| status.message().to_string());
        let read = reader.await.map_err(|e| e.to_string())?;
        answer?;
        read
    }
}

async fn peer_loop(peer: Peer, mut messages: mpsc::Receiver<Message>) {
    let endpoint = match peer.tls.endpoint(&peer.addr) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::error!(peer = peer.id, error = %e, "messages to this peer are dropped");
            return;
        }
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(10)))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    let mut backoff = Duration::from_millis(50);
    // The first message of a connection is taken before connecting: no idle
    // connections to peers nobody talks to.
    while let Some(first) = messages.recv().await {
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => {
                tracing::debug!(peer = peer.id, addr = %peer.addr, error = %e, "cannot reach peer");
                peer.unreachable();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (stream, batches) = mpsc::channel(64);
        let mut client = ClusterClient::new(channel.clone());
        let call = tokio::spawn(async move { client.raft(ReceiverStream::new(batches)).await });
        let mut pending = vec![first];
        loop {
            while pending.len() < MAX_BATCH {
                match messages.try_recv() {
                    Ok(message) => pending.push(message),
                    Err(_) => break,
                }
            }
            let (snapshots, rest): (Vec<Message>, Vec<Message>) = std::mem::take(&mut pending)
                .into_iter()
                .partition(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            for snapshot in snapshots {
                peer.send_snapshot(channel.clone(), snapshot).await;
            }
            if !rest.is_empty() {
                let outgoing = batch(peer.cluster_id, peer.me, rest);
                match tokio::time::timeout(STALL, stream.send(outgoing)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::warn!(peer = peer.id, addr = %peer.addr, "raft stream to the peer stalled; reconnecting");
                        break;
                    }
                }
            }
            match messages.recv().await {
                Some(message) => pending.push(message),
                None => return,
            }
        }
        peer.unreachable();
        call.abort();
        if let Ok(Ok(Err(status))) = tokio::time::timeout(Duration::from_millis(100), call).await {
            tracing::debug!(peer = peer.id, addr = %peer.addr, error = %status.message(), "raft stream closed");
        }
    }
}
