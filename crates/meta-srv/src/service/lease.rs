//! The `meta.v1.Lease` service over the member's [`RaftKvBackend`]: grants and revokes
//! go through the log; keep-alives, time-to-live and the expiry they feed are the
//! leader's (a follower answers UNAVAILABLE with the leader's address).

use std::sync::Arc;

use common_meta::kv::KvBackend;
use common_meta::rpc;
use meta_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::refusal;
use crate::raft::backend::RaftKvBackend;
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// Serves leases of one member.
#[derive(Clone)]
pub struct LeaseService {
    backend: RaftKvBackend,
    driver: DriverHandle,
    member_id: u64,
    members: Arc<Members>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl LeaseService {
    /// Leases of `backend` (whose driver is behind `driver`), answering as `member_id`;
    /// `members` maps ids to addresses for leader hints; `stop` ends keep-alive
    /// streams (UNAVAILABLE) when the member stops.
    pub fn new(
        backend: RaftKvBackend,
        driver: DriverHandle,
        member_id: u64,
        members: Arc<Members>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        LeaseService {
            backend,
            driver,
            member_id,
            members,
            stop,
        }
    }

    async fn status(&self, err: common_meta::Error) -> Status {
        refusal(err, &self.driver, &self.members, self.member_id).await
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        rpc::header(self.member_id, self.backend.local_revision())
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let req = request.into_inner();
        match self.backend.lease_grant(req.ttl, req.id).await {
            Ok(granted) => Ok(Response::new(pb::LeaseGrantResponse {
                header: self.header(),
                id: granted.id,
                ttl: granted.ttl,
            })),
            Err(e) => Err(self.status(e).await),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let backend = crate::auth::Checked::new(&self.backend, crate::auth::Caller::of(&request));
        match backend.lease_revoke(request.into_inner().id).await {
            Ok(()) => Ok(Response::new(pb::LeaseRevokeResponse {
                header: self.header(),
            })),
            Err(e) => Err(self.status(e).await),
        }
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<pb::LeaseKeepAliveResponse, Status>>;

    /// One answer per request, in order; an unknown lease is answered with TTL 0 and the
    /// stream goes on. When this member stops leading the stream ends with the
    /// not-leader status, so the client reconnects to the leader.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let (out, responses) = mpsc::channel(16);
        let service = self.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let stopping = || Status::unavailable("the member is stopping");
            while let Some(request) =
                super::next_request(&mut requests, &mut stop, &out, stopping).await
            {
                let answer = match service.backend.lease_keep_alive(request.id).await {
                    Ok(ttl) => Ok(ttl),
                    Err(common_meta::Error::LeaseNotFound { .. }) => Ok(0),
                    Err(e) => Err(service.status(e).await),
                };
                let message = answer.map(|ttl| pb::LeaseKeepAliveResponse {
                    header: service.header(),
                    id: request.id,
                    ttl,
                });
                let failed = message.is_err();
                if out.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let caller = crate::auth::Caller::of(&request);
        let req = request.into_inner();
        match crate::auth::Checked::new(&self.backend, caller)
            .lease_time_to_live(req.id, req.keys)
            .await
        {
            Ok(ttl) => Ok(Response::new(pb::LeaseTimeToLiveResponse {
                header: self.header(),
                id: ttl.id,
                ttl: ttl.ttl,
                granted_ttl: ttl.granted_ttl,
                keys: ttl.keys,
            })),
            Err(e) => Err(self.status(e).await),
        }
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        match self.backend.leases().await {
            Ok(ids) => Ok(Response::new(pb::LeaseLeasesResponse {
                header: self.header(),
                leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
            })),
            Err(e) => Err(self.status(e).await),
        }
    }
}
