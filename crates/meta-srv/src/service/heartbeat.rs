//! The `meta.v1.Heartbeat` service: one bidirectional stream per node, answered by the
//! leader only; `AskLeader` on any member; `ListNodes`, topology changes and join
//! tokens on the leader.
//!
//! Every request of a stream runs through the handler chain of
//! `cluster_plane::heartbeat_chain` (check leader -> validate -> register node ->
//! deliver replies -> feed detector -> collect stats), then is answered with the
//! interval and the request's `seq`. Mailbox instructions are pushed between answers as
//! soon as they are sent.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common_meta::model::node::{NodeRole, NodeState};
use meta_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster_plane::heartbeat_chain::{
    self, ClusterPlane, HeartbeatHandler, Refusal, StreamState,
};
use crate::error::to_status_with_hint;
use crate::raft::driver::Mailbox;
use crate::raft::members::Members;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serves heartbeats for one member; built with a struct literal (every part is a
/// shared handle of the running server).
pub struct HeartbeatService {
    /// This member.
    pub member_id: u64,
    /// The raft driver, for status and leader hints.
    pub mailbox: Mailbox,
    /// Member ids to addresses.
    pub members: Arc<Members>,
    /// The term this member leads in, if it leads.
    pub leadership: watch::Receiver<Option<u64>>,
    /// Registrations, liveness, stats, the mailbox to nodes and join tokens.
    pub plane: Arc<ClusterPlane>,
    /// The handler chain every request runs through.
    pub chain: Arc<Vec<Box<dyn HeartbeatHandler>>>,
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
            Err(self.shared().not_leader().await)
        }
    }

    fn view(&self, info: common_meta::model::node::NodeInfo, now: u64) -> pb::NodeView {
        let view = self.plane.live.view(info.id, now);
        pb::NodeView {
            node_id: info.id,
            role: role_name(info.role).to_string(),
            addr: info.addr,
            state: state_name(info.state).to_string(),
            liveness: view.liveness.to_string(),
            phi: view.phi,
            last_heartbeat_age_ms: view.last_heartbeat_age_ms,
            region_count: view.regions as u64,
            labels: info.labels.into_iter().collect(),
            version: info.version,
        }
    }

    fn shared(&self) -> Stream {
        Stream {
            me: self.member_id,
            mailbox: self.mailbox.clone(),
            members: self.members.clone(),
            leadership: self.leadership.clone(),
            stop: self.stop.clone(),
            plane: self.plane.clone(),
            chain: self.chain.clone(),
            interval_ms: self.interval_ms,
        }
    }
}

/// What one stream's task holds.
struct Stream {
    me: u64,
    mailbox: Mailbox,
    members: Arc<Members>,
    leadership: watch::Receiver<Option<u64>>,
    stop: watch::Receiver<bool>,
    plane: Arc<ClusterPlane>,
    chain: Arc<Vec<Box<dyn HeartbeatHandler>>>,
    interval_ms: u64,
}

impl Stream {
    async fn not_leader(&self) -> Status {
        let leader = self
            .mailbox
            .status()
            .await
            .ok()
            .map(|s| s.leader_id)
            .filter(|l| *l != 0 && *l != self.me);
        to_status_with_hint(common_meta::Error::NotLeader { leader }, &self.members)
    }

    fn answer(&self, seq: u64, mailbox: Vec<pb::MailboxMessage>) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            header: common_meta::rpc::header(self.me, 0),
            interval_ms: self.interval_ms,
            mailbox,
            seq,
        }
    }

    /// Serves one stream until it ends; returns the mailbox attachment to undo.
    async fn serve(
        &mut self,
        requests: &mut Streaming<pb::HeartbeatRequest>,
        out: &mpsc::Sender<Result<pb::HeartbeatResponse, Status>>,
    ) -> Option<(u64, u64)> {
        let mut state = StreamState::default();
        let mut inbox: Option<(u64, u64, mpsc::Receiver<pb::MailboxMessage>)> = None;
        let mut leadership = self.leadership.clone();
        let mut stop = self.stop.clone();
        loop {
            enum Next {
                Request(pb::HeartbeatRequest),
                Instruction(pb::MailboxMessage),
                Closed,
                TermEnded,
                Stopping,
            }
            let term = state.term;
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
                Some(message) = async {
                    match inbox.as_mut() {
                        Some((_, _, inbox)) => inbox.recv().await,
                        None => std::future::pending().await,
                    }
                } => Next::Instruction(message),
            };
            let attached = inbox
                .as_ref()
                .map(|(node, attachment, _)| (*node, *attachment));
            let request = match next {
                Next::Request(request) => request,
                Next::Instruction(message) => {
                    if out.send(Ok(self.answer(0, vec![message]))).await.is_err() {
                        return attached;
                    }
                    continue;
                }
                Next::Closed => return attached,
                Next::TermEnded => {
                    let _ = out.send(Err(self.not_leader().await)).await;
                    return attached;
                }
                Next::Stopping => {
                    let _ = out
                        .send(Err(Status::unavailable("the server is shutting down")))
                        .await;
                    return attached;
                }
            };
            let leader_term = *leadership.borrow();
            let input = heartbeat_chain::Request {
                body: &request,
                now_ms: now_ms(),
                leader_term,
            };
            if let Err((handler, refusal)) =
                heartbeat_chain::run(&self.chain, &self.plane, &mut state, &input).await
            {
                tracing::debug!(handler, ?refusal, node = ?state.node_id, "heartbeat refused");
                let status = match refusal {
                    Refusal::NotLeader => self.not_leader().await,
                    Refusal::Invalid(message) => Status::invalid_argument(message),
                    Refusal::Meta(e) => to_status_with_hint(e, &self.members),
                };
                let _ = out.send(Err(status)).await;
                return attached;
            }
            if let (Some(node), None) = (state.node_id, &inbox) {
                let (attachment, receiver) = self.plane.outbox.attach(node);
                inbox = Some((node, attachment, receiver));
            }
            if out
                .send(Ok(self.answer(request.seq, Vec::new())))
                .await
                .is_err()
            {
                return inbox
                    .as_ref()
                    .map(|(node, attachment, _)| (*node, *attachment));
            }
        }
    }
}

fn role_name(role: NodeRole) -> &'static str {
    match role {
        NodeRole::Datanode => "datanode",
        NodeRole::Frontend => "frontend",
        NodeRole::Flownode => "flownode",
    }
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Joining => "joining",
        NodeState::Active => "active",
        NodeState::Draining => "draining",
        NodeState::Decommissioned => "decommissioned",
    }
}

#[tonic::async_trait]
impl pb::heartbeat_server::Heartbeat for HeartbeatService {
    type HeartbeatStream = ReceiverStream<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut requests = request.into_inner();
        let (out, responses) = mpsc::channel(4);
        let mut stream = self.shared();
        tokio::spawn(async move {
            if let Some((node, attachment)) = stream.serve(&mut requests, &out).await {
                stream.plane.outbox.detach(node, attachment);
            }
        });
        Ok(Response::new(ReceiverStream::new(responses)))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        self.require_leader().await?;
        let Some(tokens) = &self.plane.tokens else {
            return Err(Status::failed_precondition(
                "join tokens are off: this cluster has no cluster_secret configured",
            ));
        };
        let request = request.into_inner();
        let (token, expires_at_ms) = tokens
            .create(request.node_id, request.ttl_ms, now_ms())
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            token,
            expires_at_ms,
        }))
    }

    async fn ask_leader(
        &self,
        _request: Request<pb::AskLeaderRequest>,
    ) -> Result<Response<pb::AskLeaderResponse>, Status> {
        let status = self
            .mailbox
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
        let to = match request.state.as_str() {
            "active" => NodeState::Active,
            "draining" => NodeState::Draining,
            "decommissioned" => NodeState::Decommissioned,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown node state {other:?} (active, draining or decommissioned)"
                )));
            }
        };
        let info = self
            .plane
            .nodes
            .set_state(request.node_id, to)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::SetNodeStateResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            node: Some(self.view(info, now_ms())),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        self.require_leader().await?;
        self.plane
            .nodes
            .remove(request.into_inner().node_id)
            .await
            .map_err(|e| to_status_with_hint(e, &self.members))?;
        Ok(Response::new(pb::RemoveNodeResponse {
            header: common_meta::rpc::header(self.member_id, 0),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.require_leader().await?;
        let now = now_ms();
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
