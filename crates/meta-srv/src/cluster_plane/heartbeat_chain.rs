//! The heartbeat handler chain: an ordered list of named handlers run on every request
//! of a heartbeat stream. Each handler's decision is a plain function of the stream's
//! state and the request (tested below without a network); the handler only carries it
//! out. The order, and why (see also meta-srv's AGENTS.md):
//!
//! 1. `check_leader`: only the leader's view counts, and a follower must send the node
//!    to the leader at once. A stream is bound to the term of its first request and
//!    ends when that term does.
//! 2. `validate`: refuse malformed requests before touching any state (no handshake,
//!    missing node id, unknown role, stats before the handshake, a delta before full
//!    stats). A refusal closes this stream only.
//! 3. `register_node` (handshakes only): check the join token if the cluster has a
//!    secret, then register the node through raft. This is the only durable write,
//!    once per stream, never per heartbeat.
//! 4. `deliver_replies`: hand instruction replies to whoever waits in the mailbox.
//! 5. `feed_detector`: the heartbeat renews the node's liveness (its lease).
//! 6. `collect_stats`: apply the region stats (full or delta) in leader memory.
//! 7. `grant_leases` (stats only, datanodes): the region leases of the answer, from the
//!    routes and the migrations in flight (see `region_lease`). Last, so that the
//!    regions leased are the ones just reported. A failure here is no refusal: the
//!    answer carries no leases, and the node's run out if it keeps happening.
//!
//! Instructions do not wait for a heartbeat: the stream pushes them as soon as the
//! mailbox has them (see `service/heartbeat.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use common_meta::model::join_token::JoinTokens;
use common_meta::model::node::{NodeInfo, NodeManager, NodeRole, NodeState};
use meta_proto::v1 as pb;

use crate::cluster_plane::live_nodes::{LiveNodes, Stale};
use crate::cluster_plane::node_mailbox::NodeMailbox;
use crate::cluster_plane::region_lease::LeaseLedger;

/// What a heartbeat stream has established so far.
#[derive(Debug, Default)]
pub struct StreamState {
    /// This stream's number: later streams have larger ones, and a node's newest
    /// stream is the one that counts.
    pub stream: u64,
    /// The node id from the handshake, once registered.
    pub node_id: Option<u64>,
    /// The leadership term the stream is bound to (from its first request).
    pub term: Option<u64>,
    /// Full stats were received, so deltas have a base.
    pub has_full_stats: bool,
    /// Instructions for the node, once it is registered and attached.
    pub inbox: Option<tokio::sync::mpsc::Receiver<pb::MailboxMessage>>,
    /// The node's role, from its handshake.
    pub role: Option<NodeRole>,
    /// The region leases for the answer to the request being handled.
    pub leases: Option<pb::RegionLeases>,
}

/// The leader-side state every stream's chain works on.
pub struct ClusterPlane {
    /// Durable node registrations.
    pub nodes: Arc<NodeManager>,
    /// Detectors and stats in leader memory.
    pub live: Arc<LiveNodes>,
    /// Instructions to nodes and their replies.
    pub outbox: Arc<NodeMailbox>,
    /// Join tokens, when the cluster has a secret.
    pub tokens: Option<JoinTokens>,
    /// Region leases granted, and migrations in flight.
    pub leases: Arc<LeaseLedger>,
    /// The number of the last stream opened.
    pub streams: std::sync::atomic::AtomicU64,
    /// The term this member leads in, if it leads.
    pub leadership: tokio::sync::watch::Receiver<Option<u64>>,
    /// The last term this member led in (what a loss of leadership ends).
    pub last_term: std::sync::atomic::AtomicU64,
    /// Route load reported in the current hotspot window.
    pub loads: Arc<crate::cluster_plane::hotspot::RouteLoads>,
    /// Heartbeats, streams, region stats and mailbox sends counted.
    pub metrics: crate::metrics::PlaneMetrics,
}

impl ClusterPlane {
    /// The state of a stream opened now.
    pub fn open_stream(&self) -> StreamState {
        StreamState {
            stream: self
                .streams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1,
            ..StreamState::default()
        }
    }

    /// Follows leadership: a new term starts empty, a lost one fails what is pending.
    pub fn leadership_changed(&self, term: Option<u64>, now_ms: u64) {
        use std::sync::atomic::Ordering;
        match term {
            Some(term) => {
                self.last_term.fetch_max(term, Ordering::Relaxed);
                self.live.advance(term, now_ms);
                self.leases.advance(term, self.leases.now_ms());
                self.outbox.advance(term);
            }
            None => self.outbox.clear(self.last_term.load(Ordering::Relaxed)),
        }
    }

    /// Node `id` as this leader sees it at `now_ms` (never from an older term's view,
    /// even before the leadership task has run).
    pub fn view(&self, id: u64, now_ms: u64) -> crate::cluster_plane::live_nodes::LiveView {
        let term = *self.leadership.borrow();
        if let Some(term) = term {
            self.live.advance(term, now_ms);
        }
        self.live.view(id, now_ms)
    }

    /// Sends `instruction` to node `node_id` and waits up to `deadline` for its reply,
    /// refusing at once a node the failure detector calls failed (its stream may still
    /// be open, but nothing would answer).
    pub async fn send(
        &self,
        node_id: u64,
        instruction: pb::Instruction,
        deadline: std::time::Duration,
    ) -> common_meta::Result<pb::InstructionReply> {
        let view = self.view(node_id, common_meta::time::unix_ms());
        if view.liveness == pb::Liveness::Failed {
            return Err(common_meta::Error::Unavailable {
                message: format!(
                    "node {node_id} is failed (phi {:.1}, last heartbeat {} ms ago)",
                    view.phi,
                    view.last_heartbeat_age_ms
                        .map_or_else(|| "never".to_string(), |ms| ms.to_string())
                ),
            });
        }
        self.metrics.mailbox_sends.inc();
        let sent = std::time::Instant::now();
        let reply = self.outbox.send(node_id, instruction, deadline).await;
        if reply.is_err() && sent.elapsed() >= deadline {
            self.metrics.mailbox_timeouts.inc();
        }
        reply
    }
}

/// One request passing through the chain.
pub struct Request<'a> {
    /// The request.
    pub body: &'a pb::HeartbeatRequest,
    /// When it arrived, ms since the Unix epoch.
    pub now_ms: u64,
    /// The term this member leads in now, if it leads.
    pub leader_term: Option<u64>,
}

/// Why the chain refused a request; the stream ends with it.
#[derive(Debug)]
pub enum Refusal {
    /// This member does not lead (or no longer leads in the stream's term).
    NotLeader,
    /// The request is malformed (InvalidArgument).
    Invalid(String),
    /// Registering failed (bad token, decommissioned node, raft unavailable...).
    Meta(common_meta::Error),
    /// A newer stream of the same node took over (Aborted: the node reconnects).
    Replaced(u64),
    /// The node was removed while its stream was open (FailedPrecondition).
    Removed(u64),
}

impl From<(Stale, u64)> for Refusal {
    fn from((stale, node): (Stale, u64)) -> Self {
        match stale {
            Stale::Term => Refusal::NotLeader,
            Stale::Replaced => Refusal::Replaced(node),
            Stale::Removed => Refusal::Removed(node),
        }
    }
}

/// One named step of the chain.
#[async_trait]
pub trait HeartbeatHandler: Send + Sync {
    /// The handler's name, for logs and docs.
    fn name(&self) -> &'static str;
    /// Carries out the handler's decision for `request` on a stream in `stream`.
    async fn handle(
        &self,
        plane: &ClusterPlane,
        stream: &mut StreamState,
        request: &Request<'_>,
    ) -> Result<(), Refusal>;
}

/// The chain, in the order it runs (see the module doc for why).
pub fn chain() -> Vec<Box<dyn HeartbeatHandler>> {
    vec![
        Box::new(CheckLeader),
        Box::new(Validate),
        Box::new(RegisterNode),
        Box::new(DeliverReplies),
        Box::new(FeedDetector),
        Box::new(CollectStats),
        Box::new(GrantLeases),
    ]
}

/// Runs every handler of `chain` in order; stops at the first refusal, naming it.
pub async fn run(
    chain: &[Box<dyn HeartbeatHandler>],
    plane: &ClusterPlane,
    stream: &mut StreamState,
    request: &Request<'_>,
) -> Result<(), (&'static str, Refusal)> {
    for handler in chain {
        handler
            .handle(plane, stream, request)
            .await
            .map_err(|refusal| (handler.name(), refusal))?;
    }
    Ok(())
}

/// The term a stream serves after a request: the member must lead, in the stream's
/// term if it already has one.
pub fn check_leader(stream_term: Option<u64>, leader_term: Option<u64>) -> Result<u64, Refusal> {
    match (stream_term, leader_term) {
        (_, None) => Err(Refusal::NotLeader),
        (Some(bound), Some(now)) if bound != now => Err(Refusal::NotLeader),
        (_, Some(now)) => Ok(now),
    }
}

fn role(role: i32) -> Option<NodeRole> {
    match pb::NodeRole::try_from(role) {
        Ok(pb::NodeRole::Datanode) => Some(NodeRole::Datanode),
        Ok(pb::NodeRole::Frontend) => Some(NodeRole::Frontend),
        Ok(pb::NodeRole::Flownode) => Some(NodeRole::Flownode),
        _ => None,
    }
}

/// Checks `request` against what the stream has established; the error is the
/// message of the InvalidArgument that ends this stream only.
pub fn validate(stream: &StreamState, request: &pb::HeartbeatRequest) -> Result<(), String> {
    use pb::heartbeat_request::Body;
    match (&request.body, stream.node_id) {
        (None, _) => Err("empty heartbeat request".to_string()),
        (Some(Body::Handshake(_)), Some(id)) => Err(format!(
            "node {id} already sent its handshake on this stream"
        )),
        (Some(Body::Handshake(h)), None) => {
            if h.node_id == 0 {
                Err("the handshake has no node_id (ids start at 1)".to_string())
            } else if role(h.role).is_none() {
                Err(format!("node {}: unknown role {}", h.node_id, h.role))
            } else if h.addr.is_empty() {
                Err(format!("node {}: the handshake has no addr", h.node_id))
            } else {
                Ok(())
            }
        }
        (Some(Body::Stats(_)), None) => {
            Err("the first message of a heartbeat stream must be a handshake".to_string())
        }
        (Some(Body::Stats(stats)), Some(id)) => {
            if stats.full && !stats.removed_regions.is_empty() {
                Err(format!("node {id}: full stats cannot remove regions"))
            } else if !stats.full && !stream.has_full_stats {
                Err(format!(
                    "node {id}: the first stats of a stream must be full (every region)"
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// The node a (validated) handshake describes, as it would be registered.
pub fn node_info(handshake: &pb::NodeHandshake) -> Result<NodeInfo, Refusal> {
    let role = role(handshake.role)
        .ok_or_else(|| Refusal::Invalid(format!("unknown role {}", handshake.role)))?;
    Ok(NodeInfo {
        id: handshake.node_id,
        role,
        addr: handshake.addr.clone(),
        labels: handshake
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        state: NodeState::Joining,
        version: handshake.version.clone(),
        start_time_ms: handshake.start_time_ms,
        join_token: None,
    })
}

/// Declares a handler: a unit struct, its name and its `handle` body.
macro_rules! handler {
    ($ty:ident, $name:literal, |$plane:ident, $stream:ident, $request:ident| $body:block) => {
        struct $ty;

        #[async_trait]
        impl HeartbeatHandler for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            async fn handle(
                &self,
                $plane: &ClusterPlane,
                $stream: &mut StreamState,
                $request: &Request<'_>,
            ) -> Result<(), Refusal> {
                $body
            }
        }
    };
}

handler!(CheckLeader, "check_leader", |_plane, stream, request| {
    stream.term = Some(check_leader(stream.term, request.leader_term)?);
    Ok(())
});

handler!(Validate, "validate", |_plane, stream, request| {
    validate(stream, request.body).map_err(Refusal::Invalid)
});

handler!(RegisterNode, "register_node", |plane, stream, request| {
    let Some(pb::heartbeat_request::Body::Handshake(handshake)) = &request.body.body else {
        return Ok(());
    };
    let info = node_info(handshake)?;
    let role = info.role;
    match &plane.tokens {
        Some(tokens) => {
            tokens
                .admit(&plane.nodes, &info, &handshake.join_token, request.now_ms)
                .await
        }
        None => plane.nodes.register(info).await,
    }
    .map_err(Refusal::Meta)?;
    // The term may have ended during the raft write: the view and the mailbox
    // refuse a stream of an older term.
    let (node, term) = (handshake.node_id, stream.term.unwrap_or(0));
    plane
        .live
        .claim(term, node, stream.stream, request.now_ms)
        .map_err(|stale| Refusal::from((stale, node)))?;
    stream.inbox = Some(
        plane
            .outbox
            .attach(term, node, stream.stream)
            .map_err(|stale| Refusal::from((stale, node)))?,
    );
    stream.node_id = Some(node);
    stream.role = Some(role);
    Ok(())
});

handler!(
    DeliverReplies,
    "deliver_replies",
    |plane, stream, request| {
        if let Some(id) = stream.node_id {
            for reply in &request.body.replies {
                plane.outbox.deliver(id, reply.clone());
            }
        }
        Ok(())
    }
);

handler!(FeedDetector, "feed_detector", |plane, stream, request| {
    if let Some(id) = stream.node_id {
        plane
            .live
            .beat(stream.term.unwrap_or(0), id, stream.stream, request.now_ms)
            .map_err(|stale| Refusal::from((stale, id)))?;
    }
    Ok(())
});

handler!(CollectStats, "collect_stats", |plane, stream, request| {
    if let (Some(id), Some(pb::heartbeat_request::Body::Stats(stats))) =
        (stream.node_id, &request.body.body)
    {
        plane
            .live
            .apply_stats(
                stream.term.unwrap_or(0),
                id,
                stream.stream,
                stats,
                request.now_ms,
            )
            .map_err(|stale| Refusal::from((stale, id)))?;
        stream.has_full_stats |= stats.full;
        plane.loads.record(stream.term.unwrap_or(0), &stats.groups);
        let reported = stats.regions.len() + stats.removed_regions.len();
        plane.metrics.region_stats.inc_by(reported as u64);
    }
    Ok(())
});

handler!(GrantLeases, "grant_leases", |plane, stream, request| {
    stream.leases = None;
    let (Some(id), Some(NodeRole::Datanode), Some(pb::heartbeat_request::Body::Stats(_))) =
        (stream.node_id, stream.role, &request.body.body)
    else {
        return Ok(());
    };
    // Taken before any route is read (see `region_lease`).
    let now = plane.leases.now_ms();
    let regions = plane.live.region_ids(id);
    match plane
        .leases
        .grant(
            stream.term.unwrap_or(0),
            id,
            &regions,
            request.body.send_instant_ms,
            now,
        )
        .await
    {
        Ok(leases) => stream.leases = Some(leases),
        Err(e) => tracing::debug!(node = id, error = %e, "no region leases in this answer"),
    }
    Ok(())
});

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(node_id: u64, role: i32, addr: &str) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
                node_id,
                role,
                addr: addr.to_string(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn stats(full: bool, removed: Vec<u64>) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Stats(pb::NodeStats {
                regions: vec![pb::RegionStat::default(); 2],
                full,
                removed_regions: removed,
                groups: Vec::new(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn the_chain_runs_in_the_documented_order() {
        let names: Vec<_> = chain().iter().map(|h| h.name()).collect();
        assert_eq!(
            names,
            [
                "check_leader",
                "validate",
                "register_node",
                "deliver_replies",
                "feed_detector",
                "collect_stats",
                "grant_leases"
            ]
        );
    }

    #[test]
    fn leadership_decisions() {
        // Each case: the stream's term, the member's term now, and the term kept.
        let cases = [
            (None, None, None),
            (None, Some(3), Some(3)),
            (Some(3), Some(3), Some(3)),
            (Some(3), Some(4), None),
            (Some(3), None, None),
        ];
        for (bound, now, want) in cases {
            assert_eq!(check_leader(bound, now).ok(), want, "{bound:?} {now:?}");
        }
    }

    #[test]
    fn validations() {
        let fresh = StreamState::default();
        let known = StreamState {
            node_id: Some(4),
            ..StreamState::default()
        };
        let based = StreamState {
            node_id: Some(4),
            has_full_stats: true,
            ..StreamState::default()
        };
        // Each case: stream state, request, and Ok or a fragment of the error.
        let cases: Vec<(&StreamState, pb::HeartbeatRequest, Result<(), &str>)> = vec![
            (&fresh, handshake(4, 1, "h:1"), Ok(())),
            (&fresh, stats(true, vec![]), Err("must be a handshake")),
            (&fresh, handshake(0, 1, "h:1"), Err("no node_id")),
            (&fresh, handshake(4, 0, "h:1"), Err("unknown role 0")),
            (&fresh, handshake(4, 9, "h:1"), Err("unknown role 9")),
            (&fresh, handshake(4, 1, ""), Err("no addr")),
            (&fresh, pb::HeartbeatRequest::default(), Err("empty")),
            (&known, stats(true, vec![]), Ok(())),
            (
                &known,
                stats(false, vec![]),
                Err("first stats of a stream must be full"),
            ),
            (&known, stats(true, vec![1]), Err("cannot remove")),
            (&based, stats(false, vec![1]), Ok(())),
            (
                &known,
                handshake(4, 1, "h:1"),
                Err("already sent its handshake"),
            ),
        ];
        for (state, request, want) in cases {
            let got = validate(state, &request);
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(g)) => assert!(g.contains(w), "{g:?} lacks {w:?}"),
                (w, g) => panic!("{request:?}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_failed_node_is_refused_before_its_stream_is_tried() {
        let kv: Arc<dyn common_meta::kv::KvBackend> =
            Arc::new(common_meta::kv::MemoryKvBackend::default());
        let plane = ClusterPlane {
            nodes: Arc::new(NodeManager::new(kv.clone())),
            live: Arc::new(LiveNodes::new(Default::default(), 0)),
            outbox: Arc::new(NodeMailbox::default()),
            tokens: None,
            leases: Arc::new(LeaseLedger::new(
                crate::cluster_plane::region_lease::LeaseConfig {
                    lease_ms: 10_000,
                    deposed_leader_ms: 0,
                    confirm_ms: 1_000,
                },
                kv.clone(),
            )),
            streams: Default::default(),
            leadership: tokio::sync::watch::channel(Some(1)).1,
            last_term: Default::default(),
            loads: Default::default(),
            metrics: Default::default(),
        };
        // Node 3 beat once, at the epoch: long silent. Its stream is still attached.
        plane.live.claim(1, 3, 1, 0).unwrap();
        plane.live.beat(1, 3, 1, 0).unwrap();
        let _inbox = plane.outbox.attach(1, 3, 1).unwrap();
        let err = plane
            .send(
                3,
                pb::Instruction::default(),
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("node 3 is failed"), "{err}");
    }

    #[test]
    fn a_handshake_describes_a_joining_node() {
        let mut request = handshake(4, 2, "h:1");
        if let Some(pb::heartbeat_request::Body::Handshake(h)) = &mut request.body {
            h.labels.insert("zone".to_string(), "b".to_string());
            h.version = "1.2".to_string();
        }
        let Some(pb::heartbeat_request::Body::Handshake(h)) = &request.body else {
            unreachable!("built above")
        };
        let info = node_info(h).unwrap();
        assert_eq!(
            (info.id, info.role, info.state, info.addr.as_str()),
            (4, NodeRole::Frontend, NodeState::Joining, "h:1")
        );
        assert_eq!(info.labels.get("zone").map(String::as_str), Some("b"));
    }
}
