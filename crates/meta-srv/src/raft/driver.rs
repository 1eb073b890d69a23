//! The raft driver: one thread owns the `RawNode`; two more make its work durable and
//! apply it, so the three overlap (raft-rs asynchronous ready):
//!
//! - the **driver** (this thread) steps messages, proposes, ticks, and turns each
//!   `Ready` into work: a leader's messages are sent at once; committed entries go to
//!   the apply thread (`apply.rs`); new entries and the hard state are written into
//!   sled (visible to raft-rs at once) and the Ready's number goes to the log writer;
//! - the **log writer** (`persist.rs`) fsyncs once for every Ready queued meanwhile
//!   (group commit) and reports the highest number persisted; only then does the driver
//!   tell raft-rs (`on_persist_ready`) and send the messages that promise durability
//!   (votes, append acknowledgements);
//! - the **apply thread** applies committed entries in batches, answers their
//!   proposers and reports the applied index, which the driver gives raft-rs
//!   (`advance_apply_to`) and reads wait for.
//!
//! Every loop turn waits for a command or the next tick, drains every command already
//! queued (proposals, inbound messages, read requests, reports of the two threads),
//! ticks when due, and handles the Readies. The threads do blocking sled work on
//! purpose: none is a tokio worker.
//!
//! Proposals are answered from the state machine when their entry is applied, matched by
//! the proposal id in the entry's context (ids start from the clock at start-up, so an
//! entry proposed before a restart never answers a new proposal). Linearizable reads are
//! batched per turn into one ReadIndex and answered once the state machine has applied
//! up to the read index.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::{self, Applied, SledKvStore, parse_context, proposal_context};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message,
};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use crate::raft::apply::{Applier, ApplyJob, apply_jobs};
use crate::raft::log_store::LogStore;
use crate::raft::members::Members;
use crate::raft::persist::{Persister, Written};
use crate::raft::slog_bridge;
use crate::raft::transport::Transport;

mod api;
mod node;
mod reads;
mod ready;
mod watchdog;

pub use api::{
    Command, DriverHandle, Fault, Membership, MembershipChange, RaftSettings, RaftStatus, RaftView,
};
pub use node::RaftNode;
pub(crate) use watchdog::StorageWatch;
use watchdog::{publish_failure, spawn_watchdog};

/// Where the answer to a command goes.
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Most commands drained into one loop turn.
const MAX_DRAIN: usize = 4096;

/// Most client requests (proposals, reads) queued for the driver; beyond it a request
/// is refused at once as unavailable (nothing proposed) instead of growing the queue.
pub const MAX_BACKLOG: usize = 16_384;

/// Bytes of proposed, uncommitted entries a leader holds before it refuses proposals
/// (raft-rs `max_uncommitted_size`): back-pressure when followers or the disk lag.
const MAX_UNCOMMITTED_BYTES: u64 = 64 * 1024 * 1024;

/// Most entries the log keeps beyond `keep_entries` for a follower being sent a
/// snapshot (see `maybe_compact`).
const MAX_KEPT_FOR_SNAPSHOT: u64 = 1_000_000;

fn raft_error(e: raft::Error) -> Error {
    Error::Unavailable {
        message: format!("raft: {e}"),
    }
}

fn stopped() -> Error {
    Error::Unavailable {
        message: "the raft driver has stopped".to_string(),
    }
}

/// A Ready written into sled and waiting for the log writer's fsync.
struct Pending {
    number: u64,
    /// Messages that promise what this Ready wrote is durable.
    messages: Vec<Message>,
    /// The index of a snapshot this Ready installed.
    snapshot: Option<u64>,
}

struct Driver {
    id: u64,
    node: RawNode<LogStore>,
    log: LogStore,
    store: Arc<SledKvStore>,
    members: Arc<Members>,
    transport: Arc<dyn Transport>,
    inbox: mpsc::Receiver<Command>,
    /// Client requests queued in `inbox` (see `DriverHandle::send`).
    backlog: Arc<std::sync::atomic::AtomicUsize>,
    /// The log writer (always `Some` while running; taken to stop it).
    persister: Option<Persister>,
    /// The apply thread (always `Some` while running; taken to stop it).
    applier: Option<Applier>,
    /// Readies written and not yet reported durable, oldest first.
    written: std::collections::VecDeque<Pending>,
    /// Set when the log writer or the apply thread failed: the member stops.
    fatal: Option<String>,
    tick: Duration,
    compact_after: u64,
    keep_entries: u64,
    /// Snapshots sent to followers, to report a failure if one never arrives.
    snapshots_sent: HashMap<u64, Instant>,
    next_proposal: u64,
    /// Writes that arrived this turn: proposed together (`propose_all`).
    propose_batch: Vec<(u64, Entry, Reply<Applied>)>,
    proposals: HashMap<u64, Reply<Applied>>,
    conf_proposals: HashMap<u64, Reply<Membership>>,
    next_read: u64,
    /// Reads that arrived this turn; they share one ReadIndex.
    read_batch: Vec<Reply<u64>>,
    /// Reads waiting for raft to confirm their read index, with when they were issued.
    reads_by_ctx: HashMap<u64, (Instant, Vec<Reply<u64>>)>,
    /// Reads waiting for the state machine to apply their index.
    reads_by_index: Vec<(u64, Reply<u64>)>,
    /// Publishes the term this member leads in, if it leads.
    leader_tx: Arc<tokio::sync::watch::Sender<Option<u64>>>,
    /// The leader and term this member knows, for request paths.
    view: Arc<RaftView>,
    /// What the driver counts (proposals, leader changes, snapshot sends).
    metrics: crate::metrics::RaftMetrics,
    /// A fault to suffer at the next chance (fault-injection tests).
    injected: Option<Fault>,
    /// Marks the storage work of each turn for the watchdog.
    storage: Arc<StorageWatch>,
    /// The member's failure, as published (by the watchdog, while this thread was stuck).
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Driver {
    /// Runs until stopped (`None`) or until this member cannot go on (`Some(reason)`).
    fn run(mut self) -> Option<String> {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inbox.recv_timeout(wait) {
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(command) => self.handle(command),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Everything already queued joins this turn's Ready (one fsync for all).
            let mut stop = false;
            for _ in 0..MAX_DRAIN {
                match self.inbox.try_recv() {
                    Ok(Command::Stop) => stop = true,
                    Ok(command) => self.handle(command),
                    Err(_) => break,
                }
            }
            if stop {
                break;
            }
            if Instant::now() >= next_tick {
                self.node.tick();
                next_tick = Instant::now() + self.tick;
            }
            self.propose_all();
            self.start_reads();
            self.check_snapshots();
            // Advancing can produce more work (messages after a conf change, entries
            // committed by the light ready): handle it in this turn, not the next tick.
            let mut failed = None;
            self.storage.enter();
            if let Some(Fault::Stall(blocked)) = self.injected {
                self.injected = None;
                std::thread::sleep(blocked);
            }
            for _ in 0..8 {
                if !self.node.has_ready() {
                    break;
                }
                if let Err(e) = self.on_ready() {
                    failed = Some(e);
                    break;
                }
            }
            self.storage.leave();
            let watchdog = self.failure.borrow().clone();
            if let Some(reason) = watchdog {
                // The watchdog gave up on this member while its storage was stuck.
                self.leader_tx.send_replace(None);
                self.abandon_threads();
                return Some(reason);
            }
            if self.injected == Some(Fault::StorageError) {
                failed = Some(Error::Unavailable {
                    message: "injected storage failure".to_string(),
                });
            }
            if let Some(reason) = self.fatal.take() {
                failed = Some(Error::Unavailable { message: reason });
            }
            if let Some(e) = failed {
                // Storage failed: what is on disk is unknown, so this member cannot go
                // on safely. Stop answering; the server exits on the published failure.
                self.leader_tx.send_replace(None);
                self.fail_everything(
                    || Error::outcome_unknown("the member failed to persist after the write was queued; it may or may not have been applied"),
                    || Error::Unavailable {
                        message: "the member failed to persist and stopped".to_string(),
                    },
                );
                self.abandon_threads();
                return Some(format!("storage failed: {e}"));
            }
            self.fail_if_not_leader();
            // Leading means: leader, and the term has a committed entry (before that a
            // new leader cannot serve reads, so leader-only work would stall).
            let leading = (self.is_leader() && self.node.raft.commit_to_current_term())
                .then_some(self.node.raft.term);
            self.leader_tx.send_if_modified(|was| {
                let changed = *was != leading;
                *was = leading;
                changed
            });
            if self.view.leader() != self.node.raft.leader_id {
                self.metrics.leader_changes.inc();
                tracing::info!(
                    member = self.id,
                    leader = self.node.raft.leader_id,
                    term = self.node.raft.term,
                    "leader changed"
                );
            }
            self.view.set(self.node.raft.leader_id, self.node.raft.term);
        }
        self.leader_tx.send_replace(None);
        self.view.set(0, self.node.raft.term);
        self.fail_everything(
            || Error::outcome_unknown("the raft driver stopped after the write was queued; it may or may not have been applied"),
            stopped,
        );
        // A clean stop: the writer syncs and the apply thread applies what they hold.
        drop(self.persister.take());
        drop(self.applier.take());
        None
    }

    /// After a storage failure: the writer and the apply thread may be stuck in sled,
    /// so they are not waited for (the process is about to exit).
    fn abandon_threads(&mut self) {
        std::mem::forget(self.persister.take());
        std::mem::forget(self.applier.take());
    }

    fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> Error {
        let leader = self.node.raft.leader_id;
        Error::NotLeader {
            leader: (leader != 0 && leader != self.id).then_some(leader),
        }
    }

    fn handle(&mut self, command: Command) {
        if matches!(command, Command::Propose { .. } | Command::ReadIndex { .. }) {
            self.backlog
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        match command {
            Command::Persisted { number } => self.persisted(number),
            Command::Applied { index } => self.advance_applied(index),
            Command::PersistFailed { reason } | Command::ApplyFailed { reason } => {
                self.fatal.get_or_insert(reason);
            }
            Command::Step(message) => {
                // Messages from removed or unknown members are refused by raft: drop them.
                if let Err(e) = self.node.step(*message) {
                    tracing::debug!(member = self.id, error = %e, "dropped a raft message");
                }
            }
            Command::Propose { command, reply } => {
                if reply.is_closed() {
                    // The caller gave up (its deadline passed while this waited in the
                    // queue): proposing now would apply a write reported as failed.
                    return;
                }
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let id = self.next_proposal;
                self.next_proposal = self.next_proposal.wrapping_add(1);
                let entry = Entry {
                    data: command.encode().into(),
                    context: proposal_context(self.id, id).into(),
                    ..Default::default()
                };
                self.propose_batch.push((id, entry, reply));
            }
            Command::ReadIndex { reply } => {
                if self.is_leader() {
                    self.read_batch.push(reply);
                } else {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
            Command::Status { reply } => {
                let raft = &self.node.raft;
                let conf = Membership::from(&self.log.conf_state());
                let _ = reply.send(RaftStatus {
                    id: self.id,
                    role: match raft.state {
                        StateRole::Leader => "leader",
                        StateRole::Candidate => "candidate",
                        StateRole::PreCandidate => "pre-candidate",
                        StateRole::Follower => "follower",
                    },
                    leader_id: raft.leader_id,
                    term: raft.term,
                    commit_index: raft.raft_log.committed,
                    applied_index: self.store.applied_index(),
                    first_index: self.log.first_index_now(),
                    voters: conf.voters,
                    learners: conf.learners,
                });
            }
            Command::TransferLeader { to } => {
                if self.is_leader() {
                    self.node.transfer_leader(to);
                }
            }
            Command::ChangeMembership { change, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                match self.propose_membership(change) {
                    Ok(id) => {
                        self.conf_proposals.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Unreachable { peer } => self.node.report_unreachable(peer),
            Command::SnapshotSent { peer, delivered } => {
                self.snapshots_sent.remove(&peer);
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                let outcome = if delivered { "ok" } else { "failed" };
                self.metrics
                    .snapshot_sends
                    .with_label_values(&[outcome])
                    .inc();
                self.node.report_snapshot(peer, status);
            }
            Command::SnapshotMoving { peer } => {
                if let Some(sent) = self.snapshots_sent.get_mut(&peer) {
                    *sent = Instant::now();
                }
            }
            Command::InjectFault(Fault::Panic) => panic!("injected panic"),
            Command::InjectFault(fault) => self.injected = Some(fault),
            // Handled by the loop before dispatch.
            Command::Stop => {}
        }
    }

    /// Validates a membership change against the current configuration and proposes it;
    /// returns the proposal id.
    /// Proposes every write that arrived this turn as one raft proposal: one append,
    /// and one message per follower, instead of one of each per write.
    fn propose_all(&mut self) {
        if self.propose_batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.propose_batch);
        self.metrics.proposals.inc_by(batch.len() as u64);
        if !self.is_leader() {
            self.metrics.proposal_failures.inc_by(batch.len() as u64);
            // Stepped down this turn: a follower would forward them to the leader.
            for (_, _, reply) in batch {
                let _ = reply.send(Err(self.not_leader()));
            }
            return;
        }
        let mut message = Message::default();
        message.set_msg_type(raft::prelude::MessageType::MsgPropose);
        message.from = self.id;
        let mut entries = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (id, entry, reply) in batch {
            entries.push(entry);
            replies.push((id, reply));
        }
        message.set_entries(entries.into());
        // What `RawNode::propose` does for one entry, for all of them.
        match self.node.raft.step(message) {
            Ok(()) => self.proposals.extend(replies),
            Err(raft::Error::ProposalDropped) if self.is_leader() => {
                // Too much is proposed and not yet committed (followers or the disk
                // lag): back-pressure, nothing was proposed.
                self.metrics.proposal_failures.inc_by(replies.len() as u64);
                for (_, reply) in replies {
                    let _ = reply.send(Err(Error::Unavailable {
                        message: "too many writes are waiting to commit; retry later".to_string(),
                    }));
                }
            }
            Err(_) => {
                self.metrics.proposal_failures.inc_by(replies.len() as u64);
                for (_, reply) in replies {
                    let _ = reply.send(Err(self.not_leader()));
                }
            }
        }
    }

    fn propose_membership(&mut self, change: MembershipChange) -> Result<u64, Error> {
        use common_meta::error::MembershipRefusal as Refusal;
        let raft = &self.node.raft;
        if raft.pending_conf_index > raft.raft_log.applied {
            return Err(Error::membership(
                Refusal::Busy,
                "another membership change is still being applied; retry when it is done",
            ));
        }
        let conf = self.log.conf_state();
        let known = |id: &u64| conf.voters.contains(id) || conf.learners.contains(id);
        let mut cc = ConfChange::default();
        match &change {
            MembershipChange::AddLearner { id, addr } => {
                if *id == 0 || known(id) {
                    return Err(Error::membership(
                        Refusal::Exists,
                        format!("member {id} already exists or is not a valid id"),
                    ));
                }
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = *id;
                cc.context = addr.clone().into_bytes().into();
            }
            MembershipChange::Promote { id } => {
                if !conf.learners.contains(id) {
                    return Err(Error::membership(
                        Refusal::NotLearner,
                        format!("member {id} is not a learner (add it with member add first)"),
                    ));
                }
                // A voter that cannot keep up would count towards the quorum without
                // helping it (etcd's rule: within 90% of the leader's log).
                let matched = raft.prs().get(*id).map_or(0, |p| p.matched);
                let last = raft.raft_log.last_index();
                if u128::from(matched) * 10 < u128::from(last) * 9 {
                    return Err(Error::membership(
                        Refusal::LearnerBehind,
                        format!(
                            "learner {id} has {matched} of the leader's {last} log entries; promote it once it has caught up"
                        ),
                    ));
                }
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = *id;
            }
            MembershipChange::Remove { id } => {
                if !known(id) {
                    return Err(Error::membership(
                        Refusal::Unknown,
                        format!("unknown member {id}"),
                    ));
                }
                if *id == self.id {
                    return Err(Error::membership(
                        Refusal::Leader,
                        format!(
                            "member {id} is the leader; transfer leadership first (metactl leader transfer)"
                        ),
                    ));
                }
                if conf.voters == [*id] {
                    return Err(Error::membership(
                        Refusal::LastVoter,
                        format!("member {id} is the last voter; removing it would end the cluster"),
                    ));
                }
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
            }
        }
        let id = self.next_proposal;
        self.next_proposal = self.next_proposal.wrapping_add(1);
        self.node
            .propose_conf_change(proposal_context(self.id, id), cc)
            .map_err(|e| Error::Unavailable {
                message: format!("membership change not accepted: {e}"),
            })?;
        Ok(id)
    }

    /// Sends messages, remembering the snapshots among them.
    fn send(&mut self, messages: Vec<Message>) {
        for message in &messages {
            if message.get_msg_type() == raft::prelude::MessageType::MsgSnapshot {
                self.snapshots_sent.insert(message.to, Instant::now());
            }
        }
        self.transport.send(messages);
    }

    /// A member that is no longer leader fails what it was waiting for at once:
    /// proposals may or may not commit under the next leader (outcome unknown); reads,
    /// including those queued before this term's first commit, were never served and
    /// go to the leader (not leader, with its id).
    fn fail_if_not_leader(&mut self) {
        if self.is_leader()
            || (self.proposals.is_empty()
                && self.conf_proposals.is_empty()
                && self.read_batch.is_empty()
                && self.reads_by_ctx.is_empty()
                && self.reads_by_index.is_empty())
        {
            return;
        }
        let leader = self.node.raft.leader_id;
        let me = self.id;
        let moved = if leader != 0 && leader != me {
            format!(" to member {leader}")
        } else {
            String::new()
        };
        self.fail_everything(
            || {
                Error::outcome_unknown(format!(
                    "leadership moved{moved} after the write was proposed; it may or may not have been applied"
                ))
            },
            || Error::NotLeader {
                leader: (leader != 0 && leader != me).then_some(leader),
            },
        );
    }

    /// Fails every waiter: writes with `write_error`, reads with `read_error`.
    fn fail_everything(&mut self, write_error: impl Fn() -> Error, read_error: impl Fn() -> Error) {
        for (_, reply) in self.proposals.drain() {
            let _ = reply.send(Err(write_error()));
        }
        for (_, reply) in self.conf_proposals.drain() {
            let _ = reply.send(Err(write_error()));
        }
        for (_, (_, replies)) in self.reads_by_ctx.drain() {
            for reply in replies {
                let _ = reply.send(Err(read_error()));
            }
        }
        for (_, reply) in self.reads_by_index.drain(..) {
            let _ = reply.send(Err(read_error()));
        }
        for reply in self.read_batch.drain(..) {
            let _ = reply.send(Err(read_error()));
        }
    }
}
