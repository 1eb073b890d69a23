//! What the driver can be asked and what it answers: settings, commands, faults,
//! membership changes, status, and the handle that queues commands.

use super::*;

/// Settings of one member's raft node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// This member's id (at least 1).
    pub id: u64,
    /// The voters of a new cluster; ignored when the log already holds a configuration.
    /// Empty for a member that joins an existing cluster (it learns the configuration
    /// from the leader after `member add`).
    pub initial_voters: Vec<u64>,
    /// Length of one raft tick.
    pub tick: Duration,
    /// Ticks without a leader before a follower campaigns (randomised up to twice that).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Compact the log once this many applied entries are in it beyond `keep_entries`.
    pub compact_after: u64,
    /// Applied entries kept in the log after compaction, so a briefly lagging member
    /// catches up from the log rather than a snapshot.
    pub keep_entries: u64,
    /// Storage work (an fsync, a batch) that has not returned after this long is taken
    /// for a broken disk and fails the member: sled can wait forever on a full one
    /// instead of failing.
    pub storage_stall: Duration,
    /// Where snapshots are built and received as files (`None`: every snapshot is
    /// inline, built on the driver thread; see `snapshot.rs`).
    pub snapshot_files: Option<Arc<crate::raft::snapshot::SnapshotFiles>>,
    /// What the raft threads count (registered by the server; unregistered handles
    /// count for nobody).
    pub metrics: crate::metrics::RaftMetrics,
}

impl RaftSettings {
    /// Defaults for member `id` of a cluster of `initial_voters`: 100 ms ticks, election
    /// after 1-2 s, heartbeats every 200 ms (etcd's defaults are 100 ms / 1 s).
    pub fn new(id: u64, initial_voters: Vec<u64>) -> Self {
        RaftSettings {
            id,
            initial_voters,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after: 10_000,
            keep_entries: 1_000,
            storage_stall: Duration::from_secs(20),
            snapshot_files: None,
            metrics: crate::metrics::RaftMetrics::default(),
        }
    }
}

/// What the driver can be asked.
pub enum Command {
    /// Replicate and apply a change of the state machine.
    Propose {
        /// The change.
        command: kv::Command,
        /// Answered with the applied result.
        reply: Reply<Applied>,
    },
    /// Wait until a linearizable read may be served locally.
    ReadIndex {
        /// Answered with the read index once it is applied.
        reply: Reply<u64>,
    },
    /// A raft message from another member.
    Step(Box<Message>),
    /// Report this member's raft status.
    Status {
        /// The answer.
        reply: oneshot::Sender<RaftStatus>,
    },
    /// Ask the leader to hand leadership to `to`.
    TransferLeader {
        /// The member to become leader.
        to: u64,
    },
    /// Change the configuration by one member (leader only).
    ChangeMembership {
        /// The change.
        change: MembershipChange,
        /// Answered with the configuration once the change is applied.
        reply: Reply<Membership>,
    },
    /// The log writer made every Ready up to `number` durable.
    Persisted {
        /// The highest Ready number persisted.
        number: u64,
    },
    /// The log writer could not make the log durable.
    PersistFailed {
        /// What failed.
        reason: String,
    },
    /// The apply thread applied every entry up to `index`.
    Applied {
        /// The applied index.
        index: u64,
    },
    /// The apply thread could not write the state machine.
    ApplyFailed {
        /// What failed.
        reason: String,
    },
    /// The transport lost its connection to `peer` (raft probes it from now on).
    Unreachable {
        /// The member.
        peer: u64,
    },
    /// A snapshot sent to `peer` arrived (`delivered`) or was lost.
    SnapshotSent {
        /// The member.
        peer: u64,
        /// Whether the peer received it.
        delivered: bool,
    },
    /// A snapshot to `peer` is still being streamed (it is not lost).
    SnapshotMoving {
        /// The member.
        peer: u64,
    },
    /// Make the driver fail as a broken disk or a bug would (fault-injection tests).
    InjectFault(Fault),
    /// Stop the driver (pending requests fail as unavailable).
    Stop,
}

/// A failure the driver can be made to suffer, to test that a member fails stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The log store's next write fails (as on a full or broken disk).
    StorageError,
    /// The driver thread panics (as a raft-rs `fatal!` or a bug would).
    Panic,
    /// The next storage work blocks this long (as on a disk that stopped answering).
    Stall(Duration),
}

/// One configuration change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a non-voting member that receives the log.
    AddLearner {
        /// The new member's id.
        id: u64,
        /// Its gRPC address.
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner.
        id: u64,
    },
    /// Remove a member.
    Remove {
        /// The member.
        id: u64,
    },
}

/// A configuration: who votes and who only learns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
}

impl From<&ConfState> for Membership {
    fn from(conf: &ConfState) -> Self {
        let sorted = |ids: &[u64]| {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids
        };
        Membership {
            voters: sorted(&conf.voters),
            learners: sorted(&conf.learners),
        }
    }
}

/// A cloneable handle that queues commands for a driver.
#[derive(Clone)]
pub struct DriverHandle {
    pub(super) queue: mpsc::Sender<Command>,
    /// Client requests queued and not yet taken by the driver.
    pub(super) backlog: Arc<std::sync::atomic::AtomicUsize>,
    /// The leader and term the driver last published.
    pub(super) view: Arc<RaftView>,
}

impl DriverHandle {
    /// Queues `command`; fails when the driver has stopped, or (for a proposal or a
    /// read) when [`MAX_BACKLOG`] client requests already wait.
    pub fn send(&self, command: Command) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        let client = matches!(command, Command::Propose { .. } | Command::ReadIndex { .. });
        if client {
            let queued = self.backlog.fetch_add(1, Ordering::AcqRel);
            if queued >= MAX_BACKLOG {
                self.backlog.fetch_sub(1, Ordering::AcqRel);
                return Err(Error::Unavailable {
                    message: format!(
                        "the member is overloaded ({queued} requests queued); retry later"
                    ),
                });
            }
        }
        self.queue.send(command).map_err(|_| {
            if client {
                self.backlog.fetch_sub(1, Ordering::AcqRel);
            }
            Error::Unavailable {
                message: "the raft driver has stopped".to_string(),
            }
        })
    }

    /// Asks for the driver's current status.
    pub async fn status(&self) -> Result<RaftStatus, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status { reply })?;
        answer.await.map_err(|_| stopped())
    }

    /// Changes the configuration by one member (leader only) and answers the new one
    /// once applied; unavailable if that takes longer than `patience` (it may still
    /// apply).
    pub async fn change_membership(
        &self,
        change: MembershipChange,
        patience: Duration,
    ) -> Result<Membership, Error> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ChangeMembership { change, reply })?;
        match tokio::time::timeout(patience, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(Error::Unavailable {
                message: format!(
                    "the change was not applied within {patience:?} (no quorum?); it may still apply"
                ),
            }),
        }
    }

    /// Hands leadership to voter `to` (this member must lead) and waits, up to
    /// `patience`, until this member sees it lead.
    pub async fn transfer_leader(&self, to: u64, patience: Duration) -> Result<(), Error> {
        let status = self.status().await?;
        if status.role != "leader" {
            let leader = (status.leader_id != 0).then_some(status.leader_id);
            return Err(Error::NotLeader { leader });
        }
        if !status.voters.contains(&to) {
            return Err(Error::invalid_argument(format!(
                "member {to} is not a voter"
            )));
        }
        self.send(Command::TransferLeader { to })?;
        if self.view.until_leader(to, patience).await {
            return Ok(());
        }
        Err(Error::Unavailable {
            message: format!(
                "member {to} did not take over within {patience:?} (is it caught up?)"
            ),
        })
    }

    /// Delivers a raft message (dropped if the driver has stopped, like a lost packet).
    pub fn step(&self, message: Message) {
        let _ = self.queue.send(Command::Step(Box::new(message)));
    }
}

/// The leader and term this member knows, kept current by the driver every turn, for
/// request paths that need them on every answer (etcd's response header, forwarding to
/// the leader) without a round trip to the driver.
#[derive(Debug, Default)]
pub struct RaftView {
    leader: std::sync::atomic::AtomicU64,
    term: std::sync::atomic::AtomicU64,
    /// Woken when the leader changes.
    changed: tokio::sync::Notify,
}

impl RaftView {
    /// The leader this member knows of; 0 for none (or once the driver stopped).
    pub fn leader(&self) -> u64 {
        self.leader.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The leader, waiting up to `patience` for one while there is none (an election
    /// under way); 0 if none came.
    pub async fn leader_within(&self, patience: Duration) -> u64 {
        self.wait_for(|leader| leader != 0, patience).await
    }

    /// Whether member `to` leads within `patience` (as this member sees it).
    pub async fn until_leader(&self, to: u64, patience: Duration) -> bool {
        self.wait_for(|leader| leader == to, patience).await == to
    }

    /// The leader once `wanted` holds for it, or when `patience` ran out.
    async fn wait_for(&self, wanted: impl Fn(u64) -> bool, patience: Duration) -> u64 {
        let until = tokio::time::Instant::now() + patience;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change in between still wakes it.
            changed.as_mut().enable();
            let leader = self.leader();
            if wanted(leader) {
                return leader;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return self.leader();
            }
        }
    }

    /// Completes once this member has known no leader for `grace` in a row (or its
    /// driver stopped): etcd ends a stream whose client asked for a leader then.
    pub async fn leaderless_for(&self, grace: Duration) {
        loop {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                // Registered before the check, so a change in between still wakes it.
                changed.as_mut().enable();
                if self.leader() == 0 {
                    break;
                }
                changed.await;
            }
            if self.leader_within(grace).await == 0 {
                return;
            }
        }
    }

    /// The current term as this member knows it.
    pub fn term(&self) -> u64 {
        self.term.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(in crate::raft) fn set(&self, leader: u64, term: u64) {
        self.term.store(term, std::sync::atomic::Ordering::Release);
        let was = self
            .leader
            .swap(leader, std::sync::atomic::Ordering::AcqRel);
        if was != leader {
            self.changed.notify_waiters();
        }
    }
}

/// A member's raft role and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member.
    pub id: u64,
    /// `leader`, `candidate`, `pre-candidate` or `follower`.
    pub role: &'static str,
    /// The leader this member knows of (0 for none).
    pub leader_id: u64,
    /// Current term.
    pub term: u64,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied to the state machine.
    pub applied_index: u64,
    /// Index of the first entry still in this member's log (after compaction or an
    /// installed snapshot, greater than 1).
    pub first_index: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
}
