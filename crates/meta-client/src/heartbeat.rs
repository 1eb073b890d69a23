//! `HeartbeatTask`: keeps a node's heartbeat stream to the leader alive, so that a
//! datanode author never writes reconnect logic.
//!
//! The task asks any endpoint who leads (`AskLeader`), opens the stream there, sends
//! the handshake, then the node's stats at the interval the leader answers. On any
//! error it backs off (with jitter) and starts over; a not-leader answer names the
//! leader, which it goes to directly.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meta_proto::LEADER_HINT;
use meta_proto::v1 as pb;
use meta_proto::v1::heartbeat_client::HeartbeatClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::MetaClient;

/// Who the node is, as its handshake says.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub labels: std::collections::HashMap<String, String>,
    /// When it started, ms since the Unix epoch.
    pub start_time_ms: u64,
}

/// Supplies the node's current stats for each heartbeat.
#[async_trait]
pub trait StatsProvider: Send + Sync {
    /// The stats to send now.
    async fn stats(&self) -> pb::NodeStats;
}

/// Carries out the leader's instructions on the node.
#[async_trait]
pub trait InstructionHandler: Send + Sync {
    /// Does what `instruction` asks; the error text is sent back to the leader.
    async fn handle(&self, instruction: pb::Instruction) -> Result<(), String>;
}

/// What the task has achieved so far, for the node's own health reporting and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatState {
    /// The member the stream is open to, while it is.
    pub connected_to: Option<String>,
    /// Heartbeats the leader has answered since the task started.
    pub answered: u64,
}

/// A running heartbeat task; stopped when dropped.
pub struct HeartbeatTask {
    task: JoinHandle<()>,
    state: watch::Receiver<HeartbeatState>,
}

impl HeartbeatTask {
    /// Starts heartbeating for `identity` through `client`'s endpoints.
    pub fn start(
        client: MetaClient,
        identity: NodeIdentity,
        stats: Arc<dyn StatsProvider>,
        handler: Arc<dyn InstructionHandler>,
    ) -> Self {
        let (state_tx, state) = watch::channel(HeartbeatState::default());
        let task = tokio::spawn(run(client, identity, stats, handler, state_tx));
        HeartbeatTask { task, state }
    }

    /// Follows the task's progress.
    pub fn state(&self) -> watch::Receiver<HeartbeatState> {
        self.state.clone()
    }
}

impl Drop for HeartbeatTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

async fn run(
    client: MetaClient,
    identity: NodeIdentity,
    stats: Arc<dyn StatsProvider>,
    handler: Arc<dyn InstructionHandler>,
    state: watch::Sender<HeartbeatState>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut hint: Option<String> = None;
    loop {
        let target = match hint.take() {
            Some(leader) => Some(leader),
            None => client.ask_leader().await.ok().flatten(),
        };
        let answered_before = state.borrow().answered;
        let outcome = match &target {
            Some(leader) => {
                session(
                    &client,
                    leader,
                    &identity,
                    stats.as_ref(),
                    handler.as_ref(),
                    &state,
                )
                .await
            }
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
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
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
    identity: &NodeIdentity,
    stats: &dyn StatsProvider,
    handler: &dyn InstructionHandler,
    state: &watch::Sender<HeartbeatState>,
) -> Result<(), Option<String>> {
    let channel = client.channel_for(leader).ok_or(None)?;
    let (requests, outgoing) = mpsc::channel(2);
    let handshake = pb::HeartbeatRequest {
        body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
            node_id: identity.id,
            role: identity.role.into(),
            addr: identity.addr.clone(),
            version: identity.version.clone(),
            labels: identity.labels.clone(),
            start_time_ms: identity.start_time_ms,
        })),
        replies: Vec::new(),
    };
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
        .map_err(|status| hint_of(&status))?
        .into_inner();
    let mut interval = Duration::from_secs(1);
    let next_beat = tokio::time::sleep(Duration::MAX);
    tokio::pin!(next_beat);
    let mut greeted = false;
    loop {
        let replies = tokio::select! {
            answer = answers.message() => {
                let answer = match answer {
                    Ok(Some(answer)) => answer,
                    Ok(None) => return Err(None),
                    Err(status) => {
                        tracing::debug!(node = identity.id, error = %status.message(), "heartbeat stream closed");
                        return Err(hint_of(&status));
                    }
                };
                state.send_modify(|s| {
                    s.connected_to = Some(leader.to_string());
                    s.answered += 1;
                });
                if answer.interval_ms > 0 {
                    interval = Duration::from_millis(answer.interval_ms.max(10));
                }
                if !greeted {
                    greeted = true;
                    next_beat.as_mut().reset(tokio::time::Instant::now() + interval);
                }
                let mut replies = Vec::with_capacity(answer.mailbox.len());
                for message in answer.mailbox {
                    let outcome = match message.instruction {
                        Some(instruction) => handler.handle(instruction).await,
                        None => Err("an empty instruction".to_string()),
                    };
                    replies.push(pb::InstructionReply {
                        id: message.id,
                        ok: outcome.is_ok(),
                        error: outcome.err().unwrap_or_default(),
                    });
                }
                if replies.is_empty() {
                    continue;
                }
                replies
            }
            () = &mut next_beat => {
                next_beat.as_mut().reset(tokio::time::Instant::now() + interval);
                Vec::new()
            }
        };
        let request = pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Stats(stats.stats().await)),
            replies,
        };
        requests.send(request).await.map_err(|_| None)?;
    }
}
