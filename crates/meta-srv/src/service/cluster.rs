//! The `meta.v1.Cluster` service: inbound raft streams from peers, and status.

use std::collections::BTreeMap;
use std::sync::Arc;

use meta_proto::v1 as pb;
use protobuf::Message as _;
use raft::prelude::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::raft::driver::Mailbox;

/// Serves peers and status queries for one member.
pub struct ClusterService {
    cluster_id: u64,
    member_id: u64,
    mailbox: Mailbox,
    members: Arc<BTreeMap<u64, String>>,
}

impl ClusterService {
    /// A service for member `member_id` of cluster `cluster_id`, stepping inbound raft
    /// messages into `mailbox`; `members` maps ids to addresses.
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        mailbox: Mailbox,
        members: Arc<BTreeMap<u64, String>>,
    ) -> Self {
        ClusterService {
            cluster_id,
            member_id,
            mailbox,
            members,
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn raft(
        &self,
        request: Request<Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            if batch.cluster_id != self.cluster_id {
                return Err(Status::failed_precondition(format!(
                    "member {} is in cluster {:016x}, but this is cluster {:016x}",
                    batch.from, batch.cluster_id, self.cluster_id
                )));
            }
            for bytes in batch.messages {
                let message = Message::parse_from_bytes(&bytes).map_err(|e| {
                    Status::invalid_argument(format!(
                        "undecodable raft message from member {}: {e}",
                        batch.from
                    ))
                })?;
                self.mailbox.step(message);
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self
            .mailbox
            .status()
            .await
            .map_err(crate::error::to_status)?;
        let role_of = |id: &u64| {
            if status.learners.contains(id) {
                "learner"
            } else {
                "voter"
            }
        };
        let members = status
            .voters
            .iter()
            .chain(&status.learners)
            .map(|id| pb::Member {
                id: *id,
                addr: self.members.get(id).cloned().unwrap_or_default(),
                role: role_of(id).to_string(),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            role: status.role.to_string(),
            leader_id: status.leader_id,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            leader_addr: self
                .members
                .get(&status.leader_id)
                .cloned()
                .unwrap_or_default(),
            members,
        }))
    }
}
