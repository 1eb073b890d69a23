//! The `meta.v1.Heartbeat` service: one bidirectional stream per node, answered by the
//! leader only; `AskLeader` on any member; `ListNodes` on the leader.
//!
//! Per request, in this order (why): check leader (only the leader's view counts, and
//! a follower must send the node to the leader at once) -> `handshake::decide` (reject
//! malformed streams before touching state) -> on a handshake, register the node through
//! raft (the only durable write, once per stream, not per heartbeat) -> feed the failure
//! detector and keep the stats in memory -> answer with the interval.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common_meta::model::node::{NodeManager, NodeRole, NodeState};
use meta_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster_plane::handshake::{Decision, StreamState, decide};
use crate::cluster_plane::live_nodes::LiveNodes;
use crate::cluster_plane::node_mailbox::NodeMailbox;
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
    /// Durable node registrations.
    pub nodes: Arc<NodeManager>,
    /// The leader's in-memory detectors and stats.
    pub live: Arc<LiveNodes>,
    /// The interval nodes are told to beat at.
    pub interval_ms: u64,
    /// Becomes true when the server shuts down: open streams end.
    pub stop: watch::Receiver<bool>,
    /// Instructions to nodes, pushed over their streams.
    pub outbox: Arc<NodeMailbox>,
}

impl HeartbeatService {
    async fn require_leader(&self) -> Result<(), Status> {
        let leading = self.leadership.borrow().is_some();
        if leading {
            Ok(())
        } else {
            Err(Self::not_leader(&self.mailbox, &self.members, self.member_id).await)
        }
    }

    fn view(&self, info: common_meta::model::node::NodeInfo, now: u64) -> pb::NodeView {
        let view = self.live.view(info.id, now);
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

    async fn not_leader(mailbox: &Mailbox, members: &Members, me: u64) -> Status {
        let leader = mailbox
            .status()
            .await
            .ok()
            .map(|s| s.leader_id)
            .filter(|l| *l != 0 && *l != me);
        to_status_with_hint(common_meta::Error::NotLeader { leader }, members)
    }
}

/// Serves one heartbeat stream until it ends; see the module doc for the order.
#[allow(clippy::too_many_arguments)]
async fn stream_loop(
    state: &mut StreamState,
    inbox: &mut Option<(u64, mpsc::Receiver<pb::MailboxMessage>)>,
    requests: &mut Streaming<pb::HeartbeatRequest>,
    out: &mpsc::Sender<Result<pb::HeartbeatResponse, Status>>,
    mailbox: &Mailbox,
    members: &Members,
    leadership: &mut watch::Receiver<Option<u64>>,
    stop: &mut watch::Receiver<bool>,
    nodes: &NodeManager,
    live: &LiveNodes,
    outbox: &NodeMailbox,
    me: u64,
    interval_ms: u64,
) {
    // The term this stream serves, fixed by its first request: a stream opened
    // just before this member's leadership was published is not refused for it.
    let mut term: Option<u64> = None;
    loop {
        enum Next {
            Request(pb::HeartbeatRequest),
            Instruction(pb::MailboxMessage),
            Closed,
            TermEnded,
            Stopping,
        }
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
                    Some((_, inbox)) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            } => Next::Instruction(message),
        };
        let request = match next {
            Next::Request(request) => request,
            Next::Instruction(message) => {
                let push = pb::HeartbeatResponse {
                    header: common_meta::rpc::header(me, 0),
                    interval_ms,
                    mailbox: vec![message],
                };
                if out.send(Ok(push)).await.is_err() {
                    return;
                }
                continue;
            }
            Next::Closed => return,
            Next::TermEnded => {
                let _ = out
                    .send(Err(HeartbeatService::not_leader(mailbox, members, me).await))
                    .await;
                return;
            }
            Next::Stopping => {
                let _ = out
                    .send(Err(Status::unavailable("the server is shutting down")))
                    .await;
                return;
            }
        };
        let now_term = *leadership.borrow();
        if now_term.is_none() || (term.is_some() && term != now_term) {
            let _ = out
                .send(Err(HeartbeatService::not_leader(mailbox, members, me).await))
                .await;
            return;
        }
        term = now_term;
        if let Some(id) = state.node_id {
            for reply in &request.replies {
                outbox.deliver(id, reply.clone());
            }
        }
        let decision = match decide(state, &request) {
            Ok(decision) => decision,
            Err(message) => {
                let _ = out.send(Err(Status::invalid_argument(message))).await;
                return;
            }
        };
        match decision {
            Decision::Register(info) => {
                let id = info.id;
                if let Err(e) = nodes.register(info).await {
                    let _ = out.send(Err(to_status_with_hint(e, members))).await;
                    return;
                }
                state.node_id = Some(id);
                *inbox = Some(outbox.attach(id));
                live.beat(id, now_ms(), None);
            }
            Decision::Stats { node_id, regions } => live.beat(node_id, now_ms(), Some(regions)),
        }
        let response = pb::HeartbeatResponse {
            header: common_meta::rpc::header(me, 0),
            interval_ms,
            mailbox: Vec::new(),
        };
        if out.send(Ok(response)).await.is_err() {
            return;
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
        let (mailbox, members, mut leadership, mut stop) = (
            self.mailbox.clone(),
            self.members.clone(),
            self.leadership.clone(),
            self.stop.clone(),
        );
        let (nodes, live, me, interval_ms, outbox) = (
            self.nodes.clone(),
            self.live.clone(),
            self.member_id,
            self.interval_ms,
            self.outbox.clone(),
        );
        tokio::spawn(async move {
            let mut inbox: Option<(u64, mpsc::Receiver<pb::MailboxMessage>)> = None;
            let mut state = StreamState::default();
            stream_loop(
                &mut state,
                &mut inbox,
                &mut requests,
                &out,
                &mailbox,
                &members,
                &mut leadership,
                &mut stop,
                &nodes,
                &live,
                &outbox,
                me,
                interval_ms,
            )
            .await;
            if let (Some(id), Some((attachment, _))) = (state.node_id, &inbox) {
                outbox.detach(id, *attachment);
            }
        });
        Ok(Response::new(ReceiverStream::new(responses)))
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
        self.nodes
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
