//! The `meta.v1.Heartbeat` service: one bidirectional stream per node, answered by the
//! leader only; `AskLeader` on any member; `ListNodes`, topology changes and join
//! token registration on the leader.
//!
//! Every request of a stream runs through the handler chain of
//! `cluster_plane::heartbeat_chain` (check leader -> validate -> register node ->
//! deliver replies -> feed detector -> collect stats), then is answered with the
//! interval and the request's `seq`. Mailbox instructions are pushed between answers as
//! soon as they are sent.

use std::sync::Arc;

use common_meta::model::node::NodeState;
use common_meta::time::unix_ms;
use meta_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster_plane::heartbeat_chain::{
    self, ClusterPlane, HeartbeatHandler, Refusal, StreamState,
};
use crate::error::{to_status, to_status_with_hint};
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// Answers and pushes queued per stream.
const RESPONSE_QUEUE: usize = 16;
/// Longest wait for room in a stream's answer queue before the stream ends.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves heartbeats for one member; built with a struct literal (every part is a
/// shared handle of the running server) and served as a [`HeartbeatApi`].
pub struct HeartbeatService {
    /// This member.
    pub member_id: u64,
    /// The raft driver, for status and leader hints.
    pub driver: DriverHandle,
    /// Member ids to addresses.
    pub members: Arc<Members>,
    /// The term this member leads in, if it leads.
    pub leadership: watch::Receiver<Option<u64>>,
    /// Registrations, liveness, stats, the mailbox to nodes and join tokens.
    pub plane: Arc<ClusterPlane>,
    /// The handler chain every request runs through.
    pub chain: Vec<Box<dyn HeartbeatHandler>>,
    /// The interval nodes are told to beat at.
    pub interval_ms: u64,
    /// Becomes true when the server shuts down: open streams end.
    pub stop: watch::Receiver<bool>,
}

impl HeartbeatService {
    async fn require_leader(&self) -> Result<(), Status> {
        let leading = self.leadership.borrow().is_some();
        if leading {
            Ok(())
        } else {
            Err(self.not_leader().await)
        }
    }

    fn view(&self, info: common_meta::model::node::NodeInfo, now: u64) -> pb::NodeView {
        let view = self.plane.view(info.id, now);
        pb::NodeView {
            node_id: info.id,
            role: pb::NodeRole::from(info.role).into(),
            addr: info.addr,
            state: pb::NodeState::from(info.state).into(),
            liveness: view.liveness.into(),
            phi: view.phi,
            last_heartbeat_age_ms: view.last_heartbeat_age_ms,
            region_count: view.regions as u64,
            labels: info.labels.into_iter().collect(),
            version: info.version,
        }
    }

    async fn not_leader(&self) -> Status {
        crate::error::not_leader(&self.driver, &self.members, self.member_id).await
    }

    fn answer(
        &self,
        seq: u64,
        mailbox: Vec<pb::MailboxMessage>,
        leases: Option<pb::RegionLeases>,
    ) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            interval_ms: self.interval_ms,
            mailbox,
            seq,
            leases,
        }
    }

    /// Queues `response` for the node, waiting at most [`ANSWER_WAIT`] for room: a
    /// node that does not read its answers (hung, or a half-open connection) loses its
    /// stream instead of pinning this task past a term change or shutdown.
    async fn push(
        &self,
        out: &mpsc::Sender<Result<pb::HeartbeatResponse, Status>>,
        response: Result<pb::HeartbeatResponse, Status>,
        node: Option<u64>,
    ) -> bool {
        match tokio::time::timeout(ANSWER_WAIT, out.send(response)).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    ?node,
                    "a node read no heartbeat answers for {ANSWER_WAIT:?}: ending its stream"
                );
                false
            }
        }
    }

    /// Serves one stream until it ends.
    async fn serve(
        &self,
        state: &mut StreamState,
        requests: &mut Streaming<pb::HeartbeatRequest>,
        out: &mpsc::Sender<Result<pb::HeartbeatResponse, Status>>,
    ) {
        let mut leadership = self.leadership.clone();
        let mut stop = self.stop.clone();
        loop {
            enum Next {
                Request(pb::HeartbeatRequest),
                Instructions(Vec<pb::MailboxMessage>),
                Detached,
                Closed,
                TermEnded,
                Stopping,
            }
            let term = state.term;
            // Instructions are taken only while the answer queue has room, so a slow
            // reader pushes back on the senders (whose deadlines cover queueing).
            let room = out.capacity() > 0;
            let next = tokio::select! {
                message = requests.message() => match message {
                    Ok(Some(request)) => Next::Request(request),
                    Ok(None) | Err(_) => Next::Closed,
                },
                changed = leadership.wait_for(|now| *now != term), if term.is_some() => {
                    drop(changed);
                    Next::TermEnded
                }
                stopping = stop.wait_for(|stopping| *stopping) => {
                    drop(stopping);
                    Next::Stopping
                }
                message = async {
                    match state.inbox.as_mut() {
                        Some(inbox) => inbox.recv().await,
                        None => std::future::pending().await,
                    }
                }, if room => match message {
                    Some(first) => {
                        // Everything already queued goes in the same push.
                        let mut batch = vec![first];
                        if let Some(inbox) = state.inbox.as_mut() {
                            while let Ok(more) = inbox.try_recv() {
                                batch.push(more);
                            }
                        }
                        Next::Instructions(batch)
                    }
                    None => Next::Detached,
                },
            };
            let request = match next {
                Next::Request(request) => {
                    self.plane.metrics.heartbeats.inc();
                    request
                }
                Next::Instructions(batch) => {
                    if !self
                        .push(out, Ok(self.answer(0, batch, None)), state.node_id)
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Next::Detached => {
                    // The mailbox let go of this stream: the term ended (say so, with
                    // the leader), or a newer stream of the node took over.
                    let status = if *leadership.borrow() != state.term {
                        self.not_leader().await
                    } else {
                        replaced(state.node_id.unwrap_or_default())
                    };
                    self.push(out, Err(status), state.node_id).await;
                    return;
                }
                Next::Closed => return,
                Next::TermEnded => {
                    self.push(out, Err(self.not_leader().await), state.node_id)
                        .await;
                    return;
                }
                Next::Stopping => {
                    let status = Status::unavailable("the server is shutting down");
                    self.push(out, Err(status), state.node_id).await;
                    return;
                }
            };
            let leader_term = *leadership.borrow();
            let input = heartbeat_chain::Request {
                body: &request,
                now_ms: unix_ms(),
                leader_term,
            };
            if let Err((handler, refusal)) =
                heartbeat_chain::run(&self.chain, &self.plane, state, &input).await
            {
                tracing::debug!(handler, ?refusal, node = ?state.node_id, "heartbeat refused");
                let status = match refusal {
                    Refusal::NotLeader => self.not_leader().await,
                    Refusal::Invalid(message) => Status::invalid_argument(message),
                    Refusal::Meta(e) => to_status_with_hint(e, &self.members),
                    Refusal::Replaced(node) => replaced(node),
                    Refusal::Removed(node) => Status::failed_precondition(format!(
                        "node {node} was removed from the cluster while its stream was open"
                    )),
                };
                self.push(out, Err(status), state.node_id).await;
                return;
            }
            // The chain awaited (a raft write): answer only while still leading in the
            // stream's term.
            if *leadership.borrow() != state.term {
                self.push(out, Err(self.not_leader().await), state.node_id)
                    .await;
                return;
            }
            if !self
                .push(
                    out,
                    Ok(self.answer(request.seq, Vec::new(), state.leases.take())),
                    state.node_id,
                )
                .await
            {
                return;
            }
        }
    }
}

fn replaced(node: u64) -> Status {
    Status::aborted(format!(
        "node {node}: a newer heartbeat stream of this node replaced this one"
    ))
}

/// The gRPC face of a [`HeartbeatService`]: streams run as tasks that share it.
pub struct HeartbeatApi(Arc<HeartbeatService>);

impl From<HeartbeatService> for HeartbeatApi {
    fn from(service: HeartbeatService) -> Self {
        HeartbeatApi(Arc::new(service))
    }
}

impl std::ops::Deref for HeartbeatApi {
    type Target = HeartbeatService;

    fn deref(&self) -> &HeartbeatService {
        &self.0
    }
}

#[tonic::async_trait]
impl pb::heartbeat_server::Heartbeat for HeartbeatApi {
    type HeartbeatStream = ReceiverStream<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut requests = request.into_inner();
        // A node that reads nothing fills this queue and loses its stream (see
        // `HeartbeatService::push`).
        let (out, responses) = mpsc::channel(RESPONSE_QUEUE);
        let stream = self.0.clone();
        tokio::spawn(async move {
            let mut state = stream.plane.open_stream();
            let streams = stream.plane.metrics.streams.clone();
            streams.inc();
            stream.serve(&mut state, &mut requests, &out).await;
            streams.dec();
            if let Some(node) = state.node_id {
                stream.plane.outbox.detach(node, state.stream);
            }
        });
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn register_join_token(
        &self,
        request: Request<pb::RegisterJoinTokenRequest>,
    ) -> Result<Response<pb::RegisterJoinTokenResponse>, Status> {
        self.require_leader().await?;
        let Some(tokens) = &self.plane.tokens else {
            return Err(Status::failed_precondition(
                "join tokens are off: this cluster has no cluster_secret configured",
            ));
        };
        let verified = tokens
            .register(&request.into_inner().token, unix_ms())
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::RegisterJoinTokenResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            node_id: verified.node_id,
            expires_at_ms: verified.expires_at_ms,
        }))
    }

    async fn ask_leader(
        &self,
        _request: Request<pb::AskLeaderRequest>,
    ) -> Result<Response<pb::AskLeaderResponse>, Status> {
        let status = self
            .driver
            .status()
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::AskLeaderResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            leader_id: status.leader_id,
            leader_addr: self.members.addr(status.leader_id).unwrap_or_default(),
        }))
    }

    async fn set_node_state(
        &self,
        request: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        self.require_leader().await?;
        let request = request.into_inner();
        let to = NodeState::try_from(request.state).map_err(to_status)?;
        if to == NodeState::Joining {
            return Err(Status::invalid_argument(
                "a node cannot be moved back to joining (active, draining or decommissioned)",
            ));
        }
        let info = self
            .plane
            .nodes
            .set_state(request.node_id, to)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        tracing::info!(node = request.node_id, state = ?to, "node state changed");
        Ok(Response::new(pb::SetNodeStateResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            node: Some(self.view(info, unix_ms())),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        self.require_leader().await?;
        let id = request.into_inner().node_id;
        self.plane
            .nodes
            .remove(id)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        self.plane.live.forget(id);
        Ok(Response::new(pb::RemoveNodeResponse {
            header: common_meta::rpc::header(self.member_id, 0),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.require_leader().await?;
        let now = unix_ms();
        let nodes = self
            .plane
            .nodes
            .list()
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?
            .into_iter()
            .map(|info| self.view(info, now))
            .collect();
        Ok(Response::new(pb::ListNodesResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            nodes,
        }))
    }
}
