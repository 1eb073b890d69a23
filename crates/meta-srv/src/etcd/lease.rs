//! etcd's `Lease` service: grant, revoke, keep-alive, time-to-live and the list, all at
//! the leader (whose clock times leases): a member that does not lead forwards each
//! call, and relays a keep-alive stream to the leader as a whole.

use std::pin::Pin;
use std::sync::Arc;

use common_meta::kv::KvBackend;
use common_meta::kv::lease::MAX_TTL_SECS;
use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::Etcd;
use super::forward::{Route, onward};
use super::status::{LEASE_TTL_TOO_LARGE, NOT_LEADER, STOPPED, status};

/// etcd's Lease service of one member.
pub struct LeaseService {
    etcd: Arc<Etcd>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl LeaseService {
    /// The service over the member's shared etcd state; `stop` ends keep-alive streams.
    pub fn new(etcd: Arc<Etcd>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        LeaseService { etcd, stop }
    }

    fn header(&self) -> Option<epb::ResponseHeader> {
        self.etcd
            .responder()
            .header(self.etcd.backend.local_revision())
    }
}

#[tonic::async_trait]
impl epb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<epb::LeaseGrantRequest>,
    ) -> Result<Response<epb::LeaseGrantResponse>, Status> {
        if request.get_ref().ttl > MAX_TTL_SECS {
            return Err(LEASE_TTL_TOO_LARGE.status());
        }
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return LeaseClient::new(channel).lease_grant(onward(request)).await;
        }
        let req = request.into_inner();
        // etcd raises a TTL below the minimum to it, zero and negative ones too.
        let granted = self
            .etcd
            .backend
            .lease_grant(req.ttl.max(0), req.id)
            .await
            .map_err(status)?;
        Ok(Response::new(epb::LeaseGrantResponse {
            header: self.header(),
            id: granted.id,
            ttl: granted.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<epb::LeaseRevokeRequest>,
    ) -> Result<Response<epb::LeaseRevokeResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return LeaseClient::new(channel)
                .lease_revoke(onward(request))
                .await;
        }
        crate::auth::Checked::new(&self.etcd.backend, crate::auth::Caller::of(&request))
            .lease_revoke(request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(epb::LeaseRevokeResponse {
            header: self.header(),
        }))
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<epb::LeaseKeepAliveResponse, Status>> + Send>>;

    /// One answer per request, in order; an unknown lease is answered with TTL 0 and
    /// the stream goes on. At a member that does not lead, the whole stream is relayed
    /// to the leader; when leadership moves the stream ends and the client opens it
    /// again.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<epb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return relay(channel, request).await;
        }
        let metadata = request.metadata().clone();
        let mut requests = request.into_inner();
        let (out, responses) = mpsc::channel(16);
        let etcd = self.etcd.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let stopping = || STOPPED.status();
            while let Some(request) =
                crate::service::next_request(&mut requests, &mut stop, &out, stopping).await
            {
                let answer = match etcd.backend.lease_keep_alive(request.id).await {
                    Ok(ttl) => Ok(ttl),
                    Err(common_meta::Error::LeaseNotFound { .. }) => Ok(0),
                    // Leadership moved: the client opens the stream again, elsewhere.
                    Err(common_meta::Error::NotLeader { .. }) => Err(NOT_LEADER.status()),
                    Err(e) => Err(status(e)),
                };
                let message = answer.map(|ttl| epb::LeaseKeepAliveResponse {
                    header: etcd.responder().header(etcd.backend.local_revision()),
                    id: request.id,
                    ttl,
                });
                let failed = message.is_err();
                if out.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        let responses = Box::pin(ReceiverStream::new(responses));
        Ok(Response::new(
            self.etcd.require_leader(&metadata, responses),
        ))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<epb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<epb::LeaseTimeToLiveResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return LeaseClient::new(channel)
                .lease_time_to_live(onward(request))
                .await;
        }
        let caller = crate::auth::Caller::of(&request);
        let req = request.into_inner();
        match crate::auth::Checked::new(&self.etcd.backend, caller)
            .lease_time_to_live(req.id, req.keys)
            .await
        {
            Ok(ttl) => Ok(Response::new(epb::LeaseTimeToLiveResponse {
                header: self.header(),
                id: ttl.id,
                ttl: ttl.ttl,
                granted_ttl: ttl.granted_ttl,
                keys: ttl.keys,
            })),
            // etcd answers an unknown lease with TTL -1, not an error.
            Err(common_meta::Error::LeaseNotFound { .. }) => {
                Ok(Response::new(epb::LeaseTimeToLiveResponse {
                    header: self.header(),
                    id: req.id,
                    ttl: -1,
                    ..Default::default()
                }))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn lease_leases(
        &self,
        request: Request<epb::LeaseLeasesRequest>,
    ) -> Result<Response<epb::LeaseLeasesResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return LeaseClient::new(channel)
                .lease_leases(onward(request))
                .await;
        }
        let ids = self.etcd.backend.leases().await.map_err(status)?;
        Ok(Response::new(epb::LeaseLeasesResponse {
            header: self.header(),
            leases: ids.into_iter().map(|id| epb::LeaseStatus { id }).collect(),
        }))
    }
}

/// Relays a keep-alive stream to the leader: the client's requests go on as they come,
/// the leader's answers come back.
async fn relay(
    channel: Channel,
    request: Request<Streaming<epb::LeaseKeepAliveRequest>>,
) -> Result<Response<<LeaseService as epb::lease_server::Lease>::LeaseKeepAliveStream>, Status> {
    // A broken client side simply ends the requests the leader sees.
    let request = onward(request).map(|requests| requests.map_while(Result::ok));
    let answers = LeaseClient::new(channel)
        .lease_keep_alive(request)
        .await?
        .into_inner();
    Ok(Response::new(Box::pin(answers)))
}
