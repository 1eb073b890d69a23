//! etcd's `Maintenance` service: the answering member's status, alarms (none are ever
//! raised), defragmentation (sled needs none), history hashes, snapshots (a backup file
//! of this member's store, see `crate::backup`) and moving leadership. `Downgrade` is
//! not served.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Etcd;
use super::forward::{Route, onward};
use super::status::{BAD_LEADER_TRANSFEREE, status};
use crate::backup;

/// Bytes of a backup per snapshot message (etcd sends 32 KiB).
const SNAPSHOT_CHUNK: usize = 32 * 1024;

/// Snapshot messages built ahead of a slow reader.
const SNAPSHOT_AHEAD: usize = 4;

/// How long a leadership move may take.
const MOVE_PATIENCE: Duration = Duration::from_secs(10);

/// etcd's Maintenance service of one member.
pub struct MaintenanceService {
    etcd: Arc<Etcd>,
}

impl MaintenanceService {
    /// The service over the member's shared etcd state.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        MaintenanceService { etcd }
    }

    fn header(&self) -> Option<epb::ResponseHeader> {
        self.etcd
            .responder()
            .header(self.etcd.backend.local_revision())
    }
}

#[tonic::async_trait]
impl epb::maintenance_server::Maintenance for MaintenanceService {
    /// No alarm is ever raised: a member that cannot write stops (fail-stop) instead
    /// of running out of space in place.
    async fn alarm(
        &self,
        _request: Request<epb::AlarmRequest>,
    ) -> Result<Response<epb::AlarmResponse>, Status> {
        Ok(Response::new(epb::AlarmResponse {
            header: self.header(),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<epb::StatusRequest>,
    ) -> Result<Response<epb::StatusResponse>, Status> {
        let raft = self.etcd.driver.status().await.map_err(status)?;
        let store = self.etcd.backend.store();
        let db_size = store
            .db()
            .size_on_disk()
            .map(|bytes| i64::try_from(bytes).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Response::new(epb::StatusResponse {
            header: self.header(),
            version: self.etcd.version.clone(),
            db_size,
            leader: raft.leader_id,
            raft_index: raft.commit_index,
            raft_term: raft.term,
            raft_applied_index: raft.applied_index,
            errors: Vec::new(),
            db_size_in_use: db_size,
            is_learner: raft.learners.contains(&self.etcd.member_id),
            ..Default::default()
        }))
    }

    /// sled reclaims space as it goes: there is nothing to defragment.
    async fn defragment(
        &self,
        _request: Request<epb::DefragmentRequest>,
    ) -> Result<Response<epb::DefragmentResponse>, Status> {
        Ok(Response::new(epb::DefragmentResponse {
            header: self.header(),
        }))
    }

    /// The hash of the history up to now: etcd hashes its whole backend file, which
    /// has no meaning here; members that applied the same log agree on this one.
    async fn hash(
        &self,
        _request: Request<epb::HashRequest>,
    ) -> Result<Response<epb::HashResponse>, Status> {
        let (hash, _, revision) = self.etcd.backend.store().hash_history(0).map_err(status)?;
        Ok(Response::new(epb::HashResponse {
            header: self.etcd.responder().header(revision),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<epb::HashKvRequest>,
    ) -> Result<Response<epb::HashKvResponse>, Status> {
        let (hash, compact_revision, hash_revision) = self
            .etcd
            .backend
            .store()
            .hash_history(request.into_inner().revision)
            .map_err(status)?;
        Ok(Response::new(epb::HashKvResponse {
            header: self.header(),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = Pin<Box<dyn Stream<Item = Result<epb::SnapshotResponse, Status>> + Send>>;

    /// A backup of this member's store as of its applied state, in chunks: taken on a
    /// blocking thread (writers wait only while its entries are gathered) and sent as
    /// it is written, so neither side holds the whole file.
    async fn snapshot(
        &self,
        _request: Request<epb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_AHEAD);
        let store = self.etcd.backend.store().clone();
        let (cluster_id, header, version) = (
            self.etcd.cluster_id,
            self.header(),
            self.etcd.version.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let copy = match store.copy() {
                Ok(copy) => copy.portable(),
                Err(e) => {
                    let _ = tx.blocking_send(Err(status(e)));
                    return;
                }
            };
            let mut chunks = Chunks {
                tx,
                buf: Vec::with_capacity(SNAPSHOT_CHUNK),
                remaining: backup::file_len(copy.encoded_len()),
                header,
                version: Some(version),
            };
            let written = backup::write(&copy, cluster_id, &mut chunks).and_then(|_| {
                chunks.flush().map_err(|source| crate::Error::Io {
                    context: "sending a snapshot".to_string(),
                    source,
                })
            });
            if let Err(e) = written {
                // A reader that went away is not a failure of this member.
                if !chunks.tx.is_closed() {
                    tracing::warn!(error = %e, "sending a snapshot failed");
                    let _ = chunks
                        .tx
                        .blocking_send(Err(Status::internal(format!("etcdserver: {e}"))));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// Asked of the leader: a member that does not lead forwards it there.
    async fn move_leader(
        &self,
        request: Request<epb::MoveLeaderRequest>,
    ) -> Result<Response<epb::MoveLeaderResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return MaintenanceClient::new(channel)
                .move_leader(onward(request))
                .await;
        }
        let to = request.into_inner().target_id;
        match self.etcd.driver.transfer_leader(to, MOVE_PATIENCE).await {
            Ok(()) => Ok(Response::new(epb::MoveLeaderResponse {
                header: self.header(),
            })),
            Err(common_meta::Error::InvalidArgument { .. }) => Err(BAD_LEADER_TRANSFEREE.status()),
            Err(e) => Err(status(e)),
        }
    }

    async fn downgrade(
        &self,
        _request: Request<epb::DowngradeRequest>,
    ) -> Result<Response<epb::DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "etcdserver: downgrades are not served by Metasrv",
        ))
    }
}

/// A writer that sends what it is given as snapshot messages of [`SNAPSHOT_CHUNK`]
/// bytes, each saying how many bytes follow it.
struct Chunks {
    tx: tokio::sync::mpsc::Sender<Result<epb::SnapshotResponse, Status>>,
    buf: Vec<u8>,
    /// Bytes of the file not sent yet.
    remaining: u64,
    header: Option<epb::ResponseHeader>,
    /// The server version, on the first message only.
    version: Option<String>,
}

impl Chunks {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(SNAPSHOT_CHUNK));
        self.remaining = self.remaining.saturating_sub(blob.len() as u64);
        let message = epb::SnapshotResponse {
            header: self.header,
            remaining_bytes: self.remaining,
            blob,
            version: self.version.take().unwrap_or_default(),
        };
        self.tx
            .blocking_send(Ok(message))
            .map_err(|_| std::io::ErrorKind::BrokenPipe.into())
    }
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(SNAPSHOT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == SNAPSHOT_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}
