//! The `meta.v1.Cluster` service: inbound raft streams from peers, and status.

use std::sync::Arc;

use meta_proto::v1 as pb;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tonic::{Request, Response, Status, Streaming};

use crate::raft::members::Members;
use crate::raft::snapshot::{FileRef, SnapshotFiles};
use crate::raft::versions::PeerVersions;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::to_status_with_hint;
use crate::raft::driver::{DriverHandle, Membership, MembershipChange};

/// How long a membership change or leader transfer may take before it fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves peers, status queries and membership changes for one member.
pub struct ClusterService {
    cluster_id: u64,
    member_id: u64,
    driver: DriverHandle,
    members: Arc<Members>,
    /// Peers' data format versions, from their batches.
    versions: Arc<PeerVersions>,
    /// Becomes true at shutdown: inbound raft streams end.
    stop: watch::Receiver<bool>,
    /// Where streamed snapshots are received (`None`: this member takes only inline
    /// snapshots).
    snapshots: Option<Arc<SnapshotFiles>>,
}

impl ClusterService {
    /// A service for member `member_id` of cluster `cluster_id`, stepping inbound raft
    /// messages into `driver`; `members` maps ids to addresses; `stop` ends streams.
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        driver: DriverHandle,
        members: Arc<Members>,
        versions: Arc<PeerVersions>,
        stop: watch::Receiver<bool>,
        snapshots: Option<Arc<SnapshotFiles>>,
    ) -> Self {
        ClusterService {
            snapshots,
            versions,
            cluster_id,
            member_id,
            driver,
            members,
            stop,
        }
    }
}

impl ClusterService {
    fn check_cluster(&self, cluster_id: u64, from: u64) -> Result<(), Status> {
        if cluster_id == self.cluster_id {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "member {from} is in cluster {cluster_id:016x}, but this is cluster {:016x}",
            self.cluster_id
        )))
    }

    fn snapshot_files(&self) -> Result<&SnapshotFiles, Status> {
        self.snapshots
            .as_deref()
            .ok_or_else(|| Status::unimplemented("this member takes only inline snapshots"))
    }

    fn view(&self, membership: &Membership) -> Vec<pb::Member> {
        let member = |id: &u64, role: &str| pb::Member {
            id: *id,
            addr: self.members.addr(*id).unwrap_or_default(),
            role: role.to_string(),
        };
        membership
            .voters
            .iter()
            .map(|id| member(id, "voter"))
            .chain(membership.learners.iter().map(|id| member(id, "learner")))
            .collect()
    }

    async fn change(
        &self,
        change: MembershipChange,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let membership = self
            .driver
            .change_membership(change, CHANGE_TIMEOUT)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::MembershipResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            members: self.view(&membership),
        }))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("member ids start at 1"));
        }
        if req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
            return Err(Status::invalid_argument(format!(
                "address {:?} is not HOST:PORT",
                req.addr
            )));
        }
        self.change(MembershipChange::AddLearner {
            id: req.id,
            addr: req.addr,
        })
        .await
    }

    async fn promote_member(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = request.into_inner().id;
        self.change(MembershipChange::Promote { id }).await
    }

    async fn remove_member(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = request.into_inner().id;
        self.change(MembershipChange::Remove { id }).await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let to = request.into_inner().to;
        self.driver
            .transfer_leader(to, CHANGE_TIMEOUT)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::TransferLeaderResponse {
            header: common_meta::rpc::header(self.member_id, 0),
        }))
    }

    async fn raft(
        &self,
        request: Request<Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut stop = self.stop.clone();
        loop {
            // A peer's stream never ends by itself: end it at shutdown, or the server's
            // graceful stop would wait for it forever.
            let batch = tokio::select! {
                batch = stream.message() => match batch? {
                    Some(batch) => batch,
                    None => break,
                },
                stopping = stop.wait_for(|stopping| *stopping) => {
                    drop(stopping);
                    return Err(Status::unavailable("the member is shutting down"));
                }
            };
            self.check_cluster(batch.cluster_id, batch.from)?;
            self.versions.record(batch.from, batch.version);
            for bytes in batch.messages {
                let message = Message::parse_from_bytes(&bytes).map_err(|e| {
                    Status::invalid_argument(format!(
                        "undecodable raft message from member {}: {e}",
                        batch.from
                    ))
                })?;
                if message.to != self.member_id {
                    return Err(Status::failed_precondition(format!(
                        "a raft message for member {} reached member {}: stale address?",
                        message.to, self.member_id
                    )));
                }
                if message.get_msg_type() == MessageType::MsgSnapshot
                    && FileRef::decode(message.get_snapshot().get_data()).is_some()
                {
                    // A member reads only snapshot files it wrote (see snapshot.rs).
                    tracing::warn!(
                        from = batch.from,
                        "dropped a snapshot naming a file from the network"
                    );
                    continue;
                }
                self.driver.step(message);
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn snapshot_offset(
        &self,
        request: Request<pb::SnapshotOffsetRequest>,
    ) -> Result<Response<pb::SnapshotOffsetResponse>, Status> {
        let request = request.into_inner();
        self.check_cluster(request.cluster_id, request.from)?;
        let offset = self.snapshot_files()?.offset(&request).await?;
        Ok(Response::new(pb::SnapshotOffsetResponse { offset }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotAck>, Status> {
        let message = self
            .snapshot_files()?
            .receive(
                |cluster_id, from| self.check_cluster(cluster_id, from),
                self.member_id,
                request.into_inner(),
            )
            .await?;
        self.driver.step(message);
        Ok(Response::new(pb::SnapshotAck {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self
            .driver
            .status()
            .await
            .map_err(crate::error::to_status)?;
        let members = self.view(&Membership {
            voters: status.voters.clone(),
            learners: status.learners.clone(),
        });
        Ok(Response::new(pb::StatusResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            role: status.role.to_string(),
            leader_id: status.leader_id,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            first_index: status.first_index,
            version: crate::data_dir::FORMAT_VERSION,
            cluster_version: self
                .versions
                .cluster_version(self.member_id, &status.voters),
            leader_addr: self.members.addr(status.leader_id).unwrap_or_default(),
            members,
        }))
    }
}
