//! The `meta.v1.Tso` service: one stream per client, each request answered with the
//! highest of the timestamps it asked for. Only the leader serves it: another member
//! refuses the stream (UNAVAILABLE with the leader's address), and a leader that stops
//! leading ends its streams the same way, so the client reopens at the new leader.

use std::sync::Arc;

use common_meta::rpc;
use meta_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{not_leader, refusal};
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;
use crate::tso::Oracle;

/// Serves timestamps of one member.
#[derive(Clone)]
pub struct TsoService {
    oracle: Arc<Oracle>,
    driver: DriverHandle,
    member_id: u64,
    members: Arc<Members>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl TsoService {
    /// Timestamps of `oracle`, answering as `member_id` (`members` gives the leader's
    /// address for hints); `stop` ends the streams when the member stops.
    pub fn new(
        oracle: Arc<Oracle>,
        driver: DriverHandle,
        member_id: u64,
        members: Arc<Members>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        TsoService {
            oracle,
            driver,
            member_id,
            members,
            stop,
        }
    }
}

#[tonic::async_trait]
impl pb::tso_server::Tso for TsoService {
    type TsoStream = ReceiverStream<Result<pb::TsoResponse, Status>>;

    async fn tso(
        &self,
        request: Request<Streaming<pb::TsoRequest>>,
    ) -> Result<Response<Self::TsoStream>, Status> {
        // Refused at once where it cannot be served: the client goes to the leader.
        if !self.oracle.leads() {
            return Err(not_leader(&self.driver, &self.members, self.member_id).await);
        }
        let mut requests = request.into_inner();
        let (out, responses) = mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            let mut stop = service.stop.clone();
            let stopping = || Status::unavailable("the member is stopping");
            while let Some(request) =
                super::next_request(&mut requests, &mut stop, &out, stopping).await
            {
                let answer = match service.oracle.get(request.count).await {
                    Ok(timestamp) => Ok(pb::TsoResponse {
                        header: rpc::header(service.member_id, 0),
                        timestamp,
                        count: request.count,
                    }),
                    Err(e) => {
                        Err(refusal(e, &service.driver, &service.members, service.member_id).await)
                    }
                };
                let failed = answer.is_err();
                if out.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}
