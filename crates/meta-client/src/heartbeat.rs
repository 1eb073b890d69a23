//! `HeartbeatTask`: keeps a node's heartbeat stream to the leader alive, so that a
//! datanode author never writes reconnect logic.
//!
//! The task asks any endpoint who leads (`AskLeader`), opens the stream there, sends
//! the handshake, then the node's stats at the interval the leader answers. On any
//! error it backs off (with jitter) and starts over; a not-leader answer names the
//! leader, which it goes to directly.
//!
//! Stats: the provider always gives everything the node holds; the task sends it in
//! full as a stream's first stats, then only the regions that changed (and those that
//! went away) since the previous stats on that stream, so the leader's work per
//! heartbeat follows what changed.
//!
//! Instructions run concurrently with the heartbeats (a slow region open does not
//! silence the node); each reply goes back on the stream the instruction came on, or
//! is dropped if that stream ended (the leader that asked has already failed the wait).
//!
//! Region leases: every request carries the node's send instant; the leases of each
//! answer renew the task's [`RegionLeaseKeeper`] (see `region_lease`), role changes
//! and expiries go to [`InstructionHandler::roles_changed`] (expiries also while no
//! leader can be reached), and regions the leader calls closeable are closed through
//! the handler. A downgrade revokes the region's leadership before the handler runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meta_proto::LEADER_HINT;
use meta_proto::v1 as pb;
use meta_proto::v1::heartbeat_client::HeartbeatClient;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{MetaClient, jittered};
use crate::region_lease::{RegionLeaseKeeper, RoleChange};

/// Who the node is, as its handshake says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Node id (at least 1).
    pub id: u64,
    /// Its role.
    pub role: pb::NodeRole,
    /// Where other components reach it.
    pub addr: String,
    /// Its software version.
    pub version: String,
    /// Free-form labels (zone...).
    pub labels: HashMap<String, String>,
    /// When it started, ms since the Unix epoch.
    pub start_time_ms: u64,
    /// The join token, when the cluster requires one (`metactl token create`).
    pub join_token: String,
}

/// Supplies the node's current stats for each heartbeat.
#[async_trait]
pub trait StatsProvider: Send + Sync {
    /// Every region the node holds now (the task sends only what changed).
    async fn stats(&self) -> Vec<pb::RegionStat>;

    /// The data-plane groups the node hosts, with the load of their routes since the
    /// previous call (range-sharded data planes; sent whole with every stats). The
    /// default hosts none.
    async fn groups(&self) -> Vec<pb::GroupStat> {
        Vec::new()
    }
}

/// Carries out the leader's instructions on the node.
#[async_trait]
pub trait InstructionHandler: Send + Sync {
    /// Does what `instruction` asks. A region instruction (create, drop, alter,
    /// truncate regions) answers one outcome per region it names; others answer none.
    /// The error text of a failure of the whole instruction is sent back to the leader.
    async fn handle(&self, instruction: pb::Instruction) -> Result<Vec<pb::RegionOutcome>, String>;

    /// Does what a route instruction (one step of a route move) asks of a group this
    /// node leads, answering the entry the action names (FENCE: the last entry written
    /// in the range; CATCH_UP: the entry the range is held up to; others: 0). An action
    /// already carried out is answered as done again. The default hosts no groups.
    async fn route(&self, instruction: pb::RouteInstruction) -> Result<u64, String> {
        Err(format!(
            "this node hosts no groups (route {} not handled)",
            instruction.route_id
        ))
    }

    /// Region leases changed roles: granted, changed, or ended (`None`: the region is
    /// read-only now). The default does nothing: a node that asks
    /// [`RegionLeaseKeeper::writable`] before each write needs nothing more.
    async fn roles_changed(&self, changes: Vec<RoleChange>) {
        let _ = changes;
    }
}

/// Called with the round-trip time of each answered heartbeat.
pub type RttObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// What the task has achieved so far, for the node's own health reporting and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatState {
    /// The member the stream is open to, while it is.
    pub connected_to: Option<String>,
    /// Heartbeats the leader has answered since the task started.
    pub answered: u64,
    /// Region stats sent since the task started (full reports count every region).
    pub regions_sent: u64,
    /// The last refusal the leader gave (for example a bad join token), if any.
    pub last_error: Option<String>,
    /// Streams the leader has answered on since the task started: a new number is a
    /// new stream (pushes sent while the node had none were missed).
    pub streams: u64,
}

/// A running heartbeat task; stopped when dropped.
pub struct HeartbeatTask {
    task: JoinHandle<()>,
    expiries: JoinHandle<()>,
    state: watch::Receiver<HeartbeatState>,
    leases: Arc<RegionLeaseKeeper>,
}

struct Node {
    identity: NodeIdentity,
    stats: Arc<dyn StatsProvider>,
    handler: Arc<dyn InstructionHandler>,
    on_rtt: Option<RttObserver>,
    leases: Arc<RegionLeaseKeeper>,
    /// Woken when leases were renewed (the next expiry may have moved).
    renewed: Arc<tokio::sync::Notify>,
}

impl HeartbeatTask {
    /// Starts heartbeating for `identity` through `client`'s endpoints.
    pub fn start(
        client: MetaClient,
        identity: NodeIdentity,
        stats: Arc<dyn StatsProvider>,
        handler: Arc<dyn InstructionHandler>,
    ) -> Self {
        Self::start_observed(client, identity, stats, handler, None)
    }

    /// Like [`HeartbeatTask::start`], also reporting every heartbeat's round trip.
    pub fn start_observed(
        client: MetaClient,
        identity: NodeIdentity,
        stats: Arc<dyn StatsProvider>,
        handler: Arc<dyn InstructionHandler>,
        on_rtt: Option<RttObserver>,
    ) -> Self {
        let (state_tx, state) = watch::channel(HeartbeatState::default());
        let leases = Arc::new(RegionLeaseKeeper::default());
        let renewed = Arc::new(tokio::sync::Notify::new());
        let expiries = tokio::spawn(expire_leases(
            leases.clone(),
            renewed.clone(),
            handler.clone(),
        ));
        let node = Node {
            identity,
            stats,
            handler,
            on_rtt,
            leases: leases.clone(),
            renewed,
        };
        let task = tokio::spawn(run(client, node, state_tx));
        HeartbeatTask {
            task,
            expiries,
            state,
            leases,
        }
    }

    /// Follows the task's progress.
    pub fn state(&self) -> watch::Receiver<HeartbeatState> {
        self.state.clone()
    }

    /// The node's region leases: ask [`RegionLeaseKeeper::writable`] before a write.
    pub fn leases(&self) -> Arc<RegionLeaseKeeper> {
        self.leases.clone()
    }
}

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        self.task.abort();
        self.expiries.abort();
    }
}

/// Ends leases when they run out, connected or not, and tells the handler.
async fn expire_leases(
    leases: Arc<RegionLeaseKeeper>,
    renewed: Arc<tokio::sync::Notify>,
    handler: Arc<dyn InstructionHandler>,
) {
    loop {
        let next = leases.next_expiry().map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            Into::into,
        );
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = renewed.notified() => continue,
        }
        let over = leases.expire(Instant::now());
        if !over.is_empty() {
            tracing::info!(
                regions = over.len(),
                "region leases ended: read-only until renewed"
            );
            handler
                .roles_changed(over.into_iter().map(|r| (r, None)).collect())
                .await;
        }
    }
}

/// What the node does at once on receiving `instruction`, before its handler runs:
/// a downgrade stops writes now; a closed or dropped region holds no lease.
fn on_receipt(leases: &RegionLeaseKeeper, instruction: Option<&pb::Instruction>) {
    use pb::instruction::Kind;
    match instruction.and_then(|i| i.kind.as_ref()) {
        Some(Kind::DowngradeRegion(r)) => {
            leases.revoke(r.region_id);
        }
        Some(Kind::CloseRegion(r)) => leases.forget(r.region_id),
        Some(Kind::DropRegions(d)) => d.region_ids.iter().for_each(|r| leases.forget(*r)),
        _ => {}
    }
}

async fn run(client: MetaClient, node: Node, state: watch::Sender<HeartbeatState>) {
    // Instruction handlers in flight: owned here, so they stop with the task.
    let mut handlers = JoinSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut hint: Option<String> = None;
    loop {
        let target = match hint.take() {
            Some(leader) => Some(leader),
            None => client.ask_leader().await.ok().flatten(),
        };
        let answered_before = state.borrow().answered;
        let outcome = match &target {
            Some(leader) => session(&client, leader, &node, &state, &mut handlers).await,
            None => Err(None),
        };
        state.send_modify(|s| s.connected_to = None);
        if state.borrow().answered > answered_before {
            // The stream worked for a while: this is a fresh failure, not a streak.
            backoff = Duration::from_millis(100);
        }
        match outcome {
            // The stream ended naming who leads now: go there at once.
            Err(Some(leader)) if Some(&leader) != target.as_ref() => hint = Some(leader),
            _ => {
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The stats to send: everything on a stream's first stats, then what changed since
/// `sent` (which is updated to `now`).
pub fn stats_delta(
    sent: &mut Option<HashMap<u64, pb::RegionStat>>,
    now: Vec<pb::RegionStat>,
) -> pb::NodeStats {
    match sent {
        None => {
            *sent = Some(now.iter().map(|r| (r.region_id, *r)).collect());
            pb::NodeStats {
                regions: now,
                full: true,
                removed_regions: Vec::new(),
                groups: Vec::new(),
            }
        }
        Some(previous) => {
            let mut changed = Vec::new();
            let mut current = HashMap::with_capacity(now.len());
            for region in now {
                if previous.get(&region.region_id) != Some(&region) {
                    changed.push(region);
                }
                current.insert(region.region_id, region);
            }
            let mut removed: Vec<u64> = previous
                .keys()
                .filter(|id| !current.contains_key(id))
                .copied()
                .collect();
            removed.sort_unstable();
            *previous = current;
            pb::NodeStats {
                regions: changed,
                full: false,
                removed_regions: removed,
                groups: Vec::new(),
            }
        }
    }
}

/// One stream to `leader`: handshake, then stats at the interval, and replies to
/// instructions as soon as they are handled. Ends with the leader hint of the error
/// that closed it, if any.
async fn session(
    client: &MetaClient,
    leader: &str,
    node: &Node,
    state: &watch::Sender<HeartbeatState>,
    handlers: &mut JoinSet<()>,
) -> Result<(), Option<String>> {
    let channel = client.channel_for(leader).ok_or(None)?;
    if let Err(status) = client.ensure_token(&channel).await {
        tracing::warn!(error = %status.message(), "heartbeat cannot authenticate");
        return Err(None);
    }
    let identity = &node.identity;
    let (requests, outgoing) = mpsc::channel(4);
    let mut seq = 1u64;
    // Requests awaiting their answer, oldest first (answers come in order).
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::new();
    let handshake = pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
            node_id: identity.id,
            role: identity.role.into(),
            addr: identity.addr.clone(),
            version: identity.version.clone(),
            labels: identity.labels.clone(),
            start_time_ms: identity.start_time_ms,
            join_token: identity.join_token.clone(),
        })),
        replies: Vec::new(),
        seq,
        send_instant_ms: node.leases.now_ms(),
    };
    in_flight.push_back((seq, Instant::now()));
    requests.send(handshake).await.map_err(|_| None)?;
    let hint_of = |status: &tonic::Status| {
        status
            .metadata()
            .get(LEADER_HINT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut answers = HeartbeatClient::new(channel)
        .heartbeat(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| {
            client.note_refusal(&status);
            hint_of(&status)
        })?
        .into_inner();
    let mut interval = Duration::from_secs(1);
    let next_beat = tokio::time::sleep(Duration::MAX);
    tokio::pin!(next_beat);
    let mut greeted = false;
    let mut sent: Option<HashMap<u64, pb::RegionStat>> = None;
    let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<pb::InstructionReply>();
    loop {
        let replies = tokio::select! {
            answer = answers.message() => {
                let answer = match answer {
                    Ok(Some(answer)) => answer,
                    Ok(None) => return Err(None),
                    Err(status) => {
                        tracing::debug!(node = identity.id, error = %status.message(), "heartbeat stream closed");
                        if status.code() != tonic::Code::Unavailable {
                            state.send_modify(|s| s.last_error = Some(status.message().to_string()));
                        }
                        return Err(hint_of(&status));
                    }
                };
                if answer.seq != 0 {
                    while let Some((sent_seq, at)) = in_flight.pop_front() {
                        if sent_seq == answer.seq {
                            if let Some(observe) = &node.on_rtt {
                                observe(at.elapsed());
                            }
                            break;
                        }
                    }
                    state.send_modify(|s| {
                        s.connected_to = Some(leader.to_string());
                        s.answered += 1;
                        s.last_error = None;
                    });
                }
                if answer.interval_ms > 0 {
                    interval = Duration::from_millis(answer.interval_ms.max(10));
                }
                if !greeted {
                    greeted = true;
                    state.send_modify(|s| s.streams += 1);
                    // The first stats go at once: the leader learns the regions now.
                    next_beat.as_mut().reset(tokio::time::Instant::now());
                }
                while handlers.try_join_next().is_some() {}
                if let Some(leases) = &answer.leases {
                    let renewal = node.leases.renew(leases, Instant::now());
                    node.renewed.notify_one();
                    let handler = node.handler.clone();
                    if !renewal.changes.is_empty() {
                        let changes = renewal.changes;
                        let handler = handler.clone();
                        handlers.spawn(async move { handler.roles_changed(changes).await });
                    }
                    for region in renewal.close {
                        let handler = handler.clone();
                        let close = pb::Instruction {
                            kind: Some(pb::instruction::Kind::CloseRegion(pb::RegionInstruction {
                                region_id: region,
                                ..Default::default()
                            })),
                        };
                        handlers.spawn(async move {
                            if let Err(e) = handler.handle(close).await {
                                tracing::warn!(region, error = %e, "closing a region the leader calls closeable failed");
                            }
                        });
                    }
                }
                for message in answer.mailbox {
                    on_receipt(&node.leases, message.instruction.as_ref());
                    let (handler, replies) = (node.handler.clone(), reply_tx.clone());
                    handlers.spawn(async move {
                        let outcome = match message.instruction {
                            Some(pb::Instruction {
                                kind: Some(pb::instruction::Kind::Route(route)),
                            }) => handler.route(route).await.map(|last| (Vec::new(), last)),
                            Some(instruction) => handler.handle(instruction).await.map(|r| (r, 0)),
                            None => Err("an empty instruction".to_string()),
                        };
                        // The session may have ended: the reply is then dropped.
                        let reply = match outcome {
                            Ok((regions, last_entry_id)) => pb::InstructionReply {
                                id: message.id,
                                ok: true,
                                error: String::new(),
                                regions,
                                last_entry_id,
                            },
                            Err(error) => pb::InstructionReply {
                                id: message.id,
                                ok: false,
                                error,
                                ..Default::default()
                            },
                        };
                        let _ = replies.send(reply);
                    });
                }
                continue;
            }
            Some(reply) = reply_rx.recv() => {
                let mut replies = vec![reply];
                while let Ok(more) = reply_rx.try_recv() {
                    replies.push(more);
                }
                replies
            }
            () = &mut next_beat => {
                next_beat.as_mut().reset(tokio::time::Instant::now() + interval);
                Vec::new()
            }
        };
        let mut stats = stats_delta(&mut sent, node.stats.stats().await);
        stats.groups = node.stats.groups().await;
        let count = (stats.regions.len() + stats.removed_regions.len()) as u64;
        seq += 1;
        let request = pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Stats(stats)),
            replies,
            seq,
            send_instant_ms: node.leases.now_ms(),
        };
        in_flight.push_back((seq, Instant::now()));
        requests.send(request).await.map_err(|_| None)?;
        state.send_modify(|s| s.regions_sent += count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, bytes: u64) -> pb::RegionStat {
        pb::RegionStat {
            region_id: id,
            approximate_bytes: bytes,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_carry_only_changes() {
        let mut sent = None;
        let first = stats_delta(&mut sent, vec![region(1, 1), region(2, 2), region(3, 3)]);
        assert!(first.full);
        assert_eq!(first.regions.len(), 3);
        let same = stats_delta(&mut sent, vec![region(1, 1), region(2, 2), region(3, 3)]);
        assert!(!same.full && same.regions.is_empty() && same.removed_regions.is_empty());
        let changed = stats_delta(&mut sent, vec![region(1, 1), region(2, 5), region(4, 4)]);
        assert_eq!(
            (changed.regions, changed.removed_regions),
            (vec![region(2, 5), region(4, 4)], vec![3])
        );
    }
}
