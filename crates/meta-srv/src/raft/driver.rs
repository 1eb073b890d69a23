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

use crate::raft::apply::{Applier, ApplyJob};
use crate::raft::log_store::LogStore;
use crate::raft::members::Members;
use crate::raft::persist::{Persister, Written};
use crate::raft::slog_bridge;
use crate::raft::transport::Transport;

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

/// When a thread entered its storage work, for the watchdog (0: not in it).
pub(crate) struct StorageWatch {
    origin: Instant,
    busy_since_ms: std::sync::atomic::AtomicU64,
    /// Set when the driver thread ends: the watchdog ends too.
    done: std::sync::atomic::AtomicBool,
}

impl Default for StorageWatch {
    fn default() -> Self {
        StorageWatch {
            origin: Instant::now(),
            busy_since_ms: Default::default(),
            done: Default::default(),
        }
    }
}

impl StorageWatch {
    /// Marks the start of storage work.
    pub(crate) fn enter(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.busy_since_ms
            .store(now.max(1), std::sync::atomic::Ordering::Release);
    }

    /// Marks its end.
    pub(crate) fn leave(&self) {
        self.busy_since_ms
            .store(0, std::sync::atomic::Ordering::Release);
    }

    /// How long the current storage work has lasted, if any.
    fn busy_for(&self) -> Option<Duration> {
        match self
            .busy_since_ms
            .load(std::sync::atomic::Ordering::Acquire)
        {
            0 => None,
            since => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since)),
            ),
        }
    }
}

/// Publishes the member's failure once (the first reason wins) and that it leads no
/// more.
fn publish_failure(
    member: u64,
    reason: String,
    leader: &tokio::sync::watch::Sender<Option<u64>>,
    failure: &tokio::sync::watch::Sender<Option<String>>,
) {
    leader.send_replace(None);
    failure.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        tracing::error!(member, %reason, "raft member failed and stops");
        *current = Some(reason);
        true
    });
}

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
    queue: mpsc::Sender<Command>,
    /// Client requests queued and not yet taken by the driver.
    backlog: Arc<std::sync::atomic::AtomicUsize>,
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

    /// Delivers a raft message (dropped if the driver has stopped, like a lost packet).
    pub fn step(&self, message: Message) {
        let _ = self.queue.send(Command::Step(Box::new(message)));
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

/// A running driver thread; dropping it stops the driver and waits for the thread.
pub struct RaftNode {
    handle: DriverHandle,
    thread: Option<JoinHandle<()>>,
    leadership: tokio::sync::watch::Receiver<Option<u64>>,
    failure: tokio::sync::watch::Receiver<Option<String>>,
}

impl RaftNode {
    /// Opens the log in `db`, initialises it for a new cluster if empty, and starts the
    /// driver thread. `store` is the state machine (in the same `db`).
    pub fn start(
        settings: RaftSettings,
        db: sled::Db,
        store: Arc<SledKvStore>,
        members: Arc<Members>,
        transport: Arc<dyn Transport>,
    ) -> Result<RaftNode, Error> {
        let log = LogStore::open(db, store.clone(), members.clone()).map_err(raft_error)?;
        if log.is_empty() && !settings.initial_voters.is_empty() {
            bootstrap(&log, &settings.initial_voters, &members)?;
        }
        let commit = log.hard_state().commit;
        let config = raft::Config {
            id: settings.id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            // Never ask raft to re-deliver entries the state machine already holds (it
            // would skip them anyway), nor claim more than the log knows is committed.
            applied: store.applied_index().min(commit),
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_size: MAX_UNCOMMITTED_BYTES,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate().map_err(raft_error)?;
        let mut node = RawNode::new(&config, log.clone(), &slog_bridge::logger(settings.id))
            .map_err(raft_error)?;
        let voters = log.conf_state().voters;
        if voters == [settings.id] {
            // A one-voter group need not wait an election timeout to lead.
            node.campaign().map_err(raft_error)?;
        }
        let (queue, inbox) = mpsc::channel();
        let handle = DriverHandle {
            queue,
            backlog: Arc::default(),
        };
        let (leader_tx, leadership) = tokio::sync::watch::channel(None);
        let leader_tx = Arc::new(leader_tx);
        let (failure_tx, failure) = tokio::sync::watch::channel(None);
        let failure_tx = Arc::new(failure_tx);
        let storage = Arc::new(StorageWatch::default());
        let writer_storage = Arc::new(StorageWatch::default());
        let persister = Persister::start(
            settings.id,
            log.clone(),
            handle.clone(),
            writer_storage.clone(),
        )?;
        let apply_storage = Arc::new(StorageWatch::default());
        let applier = Applier::start(
            settings.id,
            store.clone(),
            handle.clone(),
            apply_storage.clone(),
        )?;
        // Ids of this run's proposals and reads: a random 16-bit incarnation and the boot
        // count (16 bits) in the high half, so no id repeats across restarts (whatever
        // the clock does), nor, but by a 1 in 65,536 chance, when a wiped data directory
        // rejoins under a reused member id and its boot count starts again.
        let mut incarnation = [0u8; 2];
        getrandom::fill(&mut incarnation).map_err(|e| Error::Io {
            context: "drawing the member's incarnation".to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let boot = log.next_boot().map_err(raft_error)?;
        let first_id = (u64::from(u16::from_be_bytes(incarnation)) << 48) | ((boot & 0xffff) << 32);
        let driver = Driver {
            id: settings.id,
            node,
            log,
            store,
            members,
            transport,
            inbox,
            backlog: handle.backlog.clone(),
            persister: Some(persister),
            applier: Some(applier),
            written: std::collections::VecDeque::new(),
            fatal: None,
            tick: settings.tick,
            compact_after: settings.compact_after,
            keep_entries: settings.keep_entries,
            snapshots_sent: HashMap::new(),
            next_proposal: first_id,
            proposals: HashMap::new(),
            conf_proposals: HashMap::new(),
            next_read: first_id,
            read_batch: Vec::new(),
            reads_by_ctx: HashMap::new(),
            reads_by_index: Vec::new(),
            leader_tx: leader_tx.clone(),
            injected: None,
            storage: storage.clone(),
            failure: failure_tx.clone(),
        };
        spawn_watchdog(
            settings.id,
            settings.storage_stall,
            vec![storage.clone(), writer_storage, apply_storage],
            leader_tx.clone(),
            failure_tx.clone(),
        )?;
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", settings.id))
            .spawn(move || {
                // Fail-stop: a storage error ends `run` with its reason, a panic (a bug,
                // or raft-rs's `fatal!`) unwinds to here. Either way this member must not
                // look alive: nobody leads here any more, and the failure is published
                // for the server to exit on. Waiters of a panicked driver see their
                // answer channels dropped (an unknown outcome for writes).
                let id = driver.id;
                let reason =
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run())) {
                        Ok(reason) => reason,
                        Err(panic) => Some(format!(
                            "the raft driver panicked: {}",
                            panic
                                .downcast_ref::<&str>()
                                .map(|s| (*s).to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "(no message)".to_string())
                        )),
                    };
                storage
                    .done
                    .store(true, std::sync::atomic::Ordering::Release);
                leader_tx.send_replace(None);
                if let Some(reason) = reason {
                    publish_failure(id, reason, &leader_tx, &failure_tx);
                }
            })
            .map_err(|source| Error::Io {
                context: "starting the raft driver thread".to_string(),
                source,
            })?;
        Ok(RaftNode {
            handle,
            thread: Some(thread),
            leadership,
            failure,
        })
    }

    /// A handle to queue commands.
    pub fn driver(&self) -> DriverHandle {
        self.handle.clone()
    }

    /// `Some(term)` while this member leads in `term`, `None` otherwise (and once the
    /// driver stops). Leader-only work (procedures, later heartbeats and leases) follows
    /// it; a change of term is a new leadership even without a `None` in between.
    pub fn leadership(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.leadership.clone()
    }

    /// Asks for the current status.
    pub async fn status(&self) -> Result<RaftStatus, Error> {
        self.handle.status().await
    }

    /// `Some(reason)` once the driver has failed (a storage error or a panic): the member
    /// cannot go on and its process must stop. Stays `None` through a clean stop.
    pub fn failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.failure.clone()
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        // Handle clones may live on (in a router): stop explicitly rather than waiting
        // for every sender to go. A driver that already stopped has nothing to join for.
        let _ = self.handle.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes the first entries of a new cluster: one committed `AddNode` per initial voter
/// at term 1 (with its address as context), identical on every initial member. A member
/// that joins later replays them from the leader and so learns the whole configuration.
fn bootstrap(log: &LogStore, voters: &[u64], members: &Members) -> Result<(), Error> {
    let mut entries = Vec::with_capacity(voters.len());
    for (i, id) in voters.iter().enumerate() {
        let mut change = ConfChange::default();
        change.set_change_type(ConfChangeType::AddNode);
        change.node_id = *id;
        change.context = members.addr(*id).unwrap_or_default().into_bytes().into();
        let data = change
            .write_to_bytes()
            .map_err(|e| Error::invalid_argument(format!("encoding a conf change: {e}")))?;
        let mut entry = Entry {
            term: 1,
            index: i as u64 + 1,
            data: data.into(),
            ..Default::default()
        };
        entry.set_entry_type(EntryType::EntryConfChange);
        entries.push(entry);
    }
    log.append(&entries).map_err(raft_error)?;
    log.set_conf_state(&ConfState::from((voters.to_vec(), Vec::<u64>::new())))
        .map_err(raft_error)?;
    let hard_state = raft::prelude::HardState {
        term: 1,
        commit: voters.len() as u64,
        ..Default::default()
    };
    log.set_hard_state(&hard_state).map_err(raft_error)?;
    log.flush().map_err(raft_error)
}

/// Watches the driver's storage work: one that has not returned after `stall` fails the
/// member (the driver thread is stuck and cannot).
fn spawn_watchdog(
    member: u64,
    stall: Duration,
    watched: Vec<Arc<StorageWatch>>,
    leader: Arc<tokio::sync::watch::Sender<Option<u64>>>,
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name(format!("raft-watchdog-{member}"))
        .spawn(move || {
            while !watched[0].done.load(std::sync::atomic::Ordering::Acquire) {
                // A periodic check on its own thread, not a synchronisation.
                std::thread::sleep(Duration::from_millis(250));
                if let Some(stuck) = watched.iter().filter_map(|w| w.busy_for()).max()
                    && stuck >= stall
                {
                    let reason = format!(
                        "storage has not completed a write for {}s (a full or broken disk?)",
                        stuck.as_secs()
                    );
                    publish_failure(member, reason, &leader, &failure);
                    return;
                }
            }
        })
        .map(drop)
        .map_err(|source| Error::Io {
            context: "starting the raft watchdog thread".to_string(),
            source,
        })
}

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
        }
        self.leader_tx.send_replace(None);
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
                let data = command.encode();
                match self.node.propose(proposal_context(self.id, id), data) {
                    Ok(()) => {
                        self.proposals.insert(id, reply);
                    }
                    Err(raft::Error::ProposalDropped) if self.is_leader() => {
                        // Too much is proposed and not yet committed (followers or the
                        // disk lag): back-pressure, nothing was proposed.
                        let _ = reply.send(Err(Error::Unavailable {
                            message: "too many writes are waiting to commit; retry later"
                                .to_string(),
                        }));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(self.not_leader()));
                    }
                }
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
                self.node.report_snapshot(peer, status);
            }
            Command::InjectFault(Fault::Panic) => panic!("injected panic"),
            Command::InjectFault(fault) => self.injected = Some(fault),
            // Handled by the loop before dispatch.
            Command::Stop => {}
        }
    }

    /// Validates a membership change against the current configuration and proposes it;
    /// returns the proposal id.
    fn propose_membership(&mut self, change: MembershipChange) -> Result<u64, Error> {
        let raft = &self.node.raft;
        if raft.pending_conf_index > raft.raft_log.applied {
            return Err(Error::invalid_argument(
                "another membership change is still being applied; retry when it is done",
            ));
        }
        let conf = self.log.conf_state();
        let known = |id: &u64| conf.voters.contains(id) || conf.learners.contains(id);
        let mut cc = ConfChange::default();
        match &change {
            MembershipChange::AddLearner { id, addr } => {
                if *id == 0 || known(id) {
                    return Err(Error::invalid_argument(format!(
                        "member {id} already exists or is not a valid id"
                    )));
                }
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = *id;
                cc.context = addr.clone().into_bytes().into();
            }
            MembershipChange::Promote { id } => {
                if !conf.learners.contains(id) {
                    return Err(Error::invalid_argument(format!(
                        "member {id} is not a learner (add it with member add first)"
                    )));
                }
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = *id;
            }
            MembershipChange::Remove { id } => {
                if !known(id) {
                    return Err(Error::invalid_argument(format!("unknown member {id}")));
                }
                if *id == self.id {
                    return Err(Error::invalid_argument(format!(
                        "member {id} is the leader; transfer leadership first (metactl leader transfer)"
                    )));
                }
                if conf.voters == [*id] {
                    return Err(Error::invalid_argument(format!(
                        "member {id} is the last voter; removing it would end the cluster"
                    )));
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

    /// Issues one ReadIndex for every read that arrived this turn.
    fn start_reads(&mut self) {
        // A new leader ignores ReadIndex until it has committed an entry of its own term
        // (raft-rs drops the request silently): keep the batch until then.
        if self.read_batch.is_empty() || !self.node.raft.commit_to_current_term() {
            self.expire_reads();
            return;
        }
        let ctx = self.next_read;
        self.next_read = self.next_read.wrapping_add(1);
        self.node.read_index(ctx.to_be_bytes().to_vec());
        let batch = std::mem::take(&mut self.read_batch);
        self.reads_by_ctx.insert(ctx, (Instant::now(), batch));
        self.expire_reads();
    }

    /// Fails read batches raft never confirmed (a lost heartbeat round): after a few
    /// election timeouts nobody waits for them any more, and their slots are freed.
    fn expire_reads(&mut self) {
        let limit = self.tick * 60;
        let expired: Vec<u64> = self
            .reads_by_ctx
            .iter()
            .filter(|(_, (since, _))| since.elapsed() > limit)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired {
            if let Some((_, replies)) = self.reads_by_ctx.remove(&ctx) {
                for reply in replies {
                    let _ = reply.send(Err(Error::Unavailable {
                        message: "the leader could not confirm its leadership for a read"
                            .to_string(),
                    }));
                }
            }
        }
    }

    /// Handles one `Ready`, in this order (raft-rs asynchronous ready):
    ///
    /// 1. a leader's messages go out at once: followers persist its appends while it
    ///    writes its own (raft thesis 10.2.1);
    /// 2. a snapshot replaces the state machine, the members and the log, after the
    ///    apply thread has applied everything handed to it before;
    /// 3. committed entries go to the apply thread (raft-rs hands out only entries this
    ///    member has persisted, and committed means durable on a quorum); entries that
    ///    change the configuration are applied here instead (see `apply.rs`);
    /// 4. reads whose index raft confirmed wait for the apply to reach it;
    /// 5. new entries and the hard state are written into sled, where raft-rs reads them
    ///    at once; the log writer makes them durable, and the messages that promise
    ///    durability (votes, append acknowledgements) wait for it (`persisted`);
    /// 6. raft-rs is told the Ready was handed off (`advance_append_async`).
    ///
    /// The state machine may run ahead of the durable commit index (never of the
    /// durable log): a restart then starts raft at `min(applied, commit)` and the store
    /// skips what it already applied.
    fn on_ready(&mut self) -> Result<(), Error> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();

        // 1.
        self.send(ready.take_messages());

        // 2.
        let mut snapshot = None;
        if !ready.snapshot().is_empty() {
            // Draining and rewriting the whole store may take long for a large snapshot:
            // that is work, not a stuck disk, so the watchdog does not time it.
            self.storage.leave();
            let installed = self.applier()?.drain().and_then(|()| {
                self.log
                    .apply_snapshot(ready.snapshot())
                    .map_err(raft_error)
            });
            self.storage.enter();
            installed?;
            let index = ready.snapshot().get_metadata().index;
            tracing::info!(
                member = self.id,
                index,
                "installed a snapshot from the leader"
            );
            snapshot = Some(index);
        }

        // 3.
        self.hand_to_apply(ready.take_committed_entries())?;

        // 4.
        for state in ready.take_read_states() {
            let ctx = state
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .ok();
            if let Some((_, replies)) = ctx.and_then(|ctx| self.reads_by_ctx.remove(&ctx)) {
                self.reads_by_index
                    .extend(replies.into_iter().map(|r| (state.index, r)));
            }
        }

        // 5.
        self.log.append(ready.entries()).map_err(raft_error)?;
        if let Some(hard_state) = ready.hs() {
            self.log.set_hard_state(hard_state).map_err(raft_error)?;
        }
        let number = ready.number();
        self.written.push_back(Pending {
            number,
            messages: ready.take_persisted_messages(),
            snapshot,
        });
        self.persister()?.persist(Written {
            number,
            must_sync: ready.must_sync() || snapshot.is_some(),
        })?;

        // 6.
        self.node.advance_append_async(ready);
        self.answer_reads();
        self.maybe_compact()?;
        Ok(())
    }

    /// The log writer reported every Ready up to `number` durable: tell raft-rs, send
    /// what waited for it.
    fn persisted(&mut self, number: u64) {
        self.node.on_persist_ready(number);
        while self.written.front().is_some_and(|p| p.number <= number) {
            let Some(pending) = self.written.pop_front() else {
                break;
            };
            self.send(pending.messages);
            if let Some(index) = pending.snapshot {
                self.advance_applied(index);
            }
        }
    }

    /// Gives raft-rs the applied index (never backwards: a late report of the apply
    /// thread can follow a snapshot) and answers the reads it serves.
    fn advance_applied(&mut self, index: u64) {
        if index > self.node.raft.raft_log.applied {
            self.node.advance_apply_to(index);
        }
        self.answer_reads();
    }

    /// Hands committed entries to the apply thread with the replies of the ones this
    /// member proposed; a batch that changes the configuration is applied here, after
    /// the apply thread has caught up.
    fn hand_to_apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        if entries
            .iter()
            .any(|e| e.get_entry_type() != EntryType::EntryNormal)
        {
            self.applier()?.drain()?;
            self.apply(entries)?;
            let applied = self.store.applied_index();
            self.advance_applied(applied);
            return Ok(());
        }
        let replies = entries
            .iter()
            .map(|entry| {
                parse_context(&entry.context)
                    .filter(|(member, _)| *member == self.id)
                    .and_then(|(_, proposal)| self.proposals.remove(&proposal))
            })
            .collect();
        self.applier()?.apply(ApplyJob { entries, replies })
    }

    fn applier(&self) -> Result<&Applier, Error> {
        self.applier.as_ref().ok_or_else(stopped)
    }

    fn persister(&self) -> Result<&Persister, Error> {
        self.persister.as_ref().ok_or_else(stopped)
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

    /// Compacts the log once enough applied entries have piled up in it.
    fn maybe_compact(&mut self) -> Result<(), Error> {
        // Never past what raft and the persisted hard state know to be committed.
        let applied = self
            .store
            .applied_index()
            .min(self.node.raft.raft_log.applied)
            .min(self.log.commit());
        let first = self.log.first_index_now();
        if applied >= first + self.compact_after + self.keep_entries {
            let to = applied - self.keep_entries;
            self.log.compact(to).map_err(raft_error)?;
            tracing::debug!(member = self.id, to, "compacted the raft log");
        }
        Ok(())
    }

    /// A snapshot can be lost on the way (transports drop on error). Raft waits for its
    /// outcome before sending anything else to that member, so report a failure when
    /// the member is still waiting long after it was sent; the leader then retries.
    fn check_snapshots(&mut self) {
        if self.snapshots_sent.is_empty() {
            return;
        }
        let waited = self.tick * 100;
        let mut failed = Vec::new();
        let prs = self.node.raft.prs();
        self.snapshots_sent.retain(|to, sent| {
            let waiting = prs
                .get(*to)
                .is_some_and(|pr| pr.state == raft::ProgressState::Snapshot);
            if waiting && sent.elapsed() > waited {
                failed.push(*to);
            }
            waiting && sent.elapsed() <= waited
        });
        for to in failed {
            tracing::warn!(
                member = self.id,
                to,
                "snapshot not acknowledged in time; resending"
            );
            self.node.report_snapshot(to, raft::SnapshotStatus::Failure);
        }
    }

    /// Applies committed entries to the state machine in one batch and answers the
    /// proposals this member made.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(entries.len());
        let mut owners = Vec::with_capacity(entries.len());
        // Configuration changes among the entries: written with them, cached after.
        let mut system = Vec::new();
        let mut new_conf = None;
        let mut member_changes = Vec::new();
        let mut conf_answers = Vec::new();
        for entry in entries {
            let owner = parse_context(&entry.context)
                .filter(|(member, _)| *member == self.id)
                .map(|(_, proposal)| proposal);
            match entry.get_entry_type() {
                EntryType::EntryNormal => match kv::Command::decode(&entry.data) {
                    Ok(command) => {
                        batch.push((entry.index, command));
                        owners.push(owner);
                    }
                    Err(e) => {
                        // Deterministic on every member: the entry changes nothing.
                        batch.push((entry.index, kv::Command::Noop));
                        owners.push(None);
                        if let Some(reply) = owner.and_then(|id| self.proposals.remove(&id)) {
                            let _ = reply.send(Err(e));
                        }
                    }
                },
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| Error::invalid_argument(format!("bad conf change: {e}")))?;
                    let conf = self.node.apply_conf_change(&change).map_err(raft_error)?;
                    let addr = match change.get_change_type() {
                        ConfChangeType::RemoveNode => Some(None),
                        _ if !change.context.is_empty() => {
                            Some(Some(String::from_utf8_lossy(&change.context).into_owned()))
                        }
                        _ => None,
                    };
                    if let Some(addr) = addr {
                        system.push(Members::writes_for(change.node_id, addr.as_deref()));
                        member_changes.push((change.node_id, addr));
                    }
                    tracing::info!(member = self.id, change = ?change.get_change_type(), node = change.node_id, voters = ?conf.voters, learners = ?conf.learners, "configuration changed");
                    if let Some(id) = owner {
                        conf_answers.push((id, Membership::from(&conf)));
                    }
                    new_conf = Some(conf);
                    batch.push((entry.index, kv::Command::Noop));
                    owners.push(None);
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| Error::invalid_argument(format!("bad conf change: {e}")))?;
                    new_conf = Some(self.node.apply_conf_change(&change).map_err(raft_error)?);
                    batch.push((entry.index, kv::Command::Noop));
                    owners.push(None);
                }
            }
        }
        // One atomic batch: the data, the sessions, the configuration, the member map
        // and the applied index move together (see log_store.rs).
        if let Some(conf) = &new_conf {
            system.push(LogStore::conf_state_write(conf).map_err(raft_error)?);
        }
        let answers = self.store.apply_with(batch, system)?;
        if let Some(conf) = new_conf {
            self.log.conf_state_changed(conf);
        }
        for (id, addr) in member_changes {
            self.members.changed(id, addr.as_deref());
        }
        for (id, membership) in conf_answers {
            if let Some(reply) = self.conf_proposals.remove(&id) {
                let _ = reply.send(Ok(membership));
            }
        }
        for (owner, answer) in owners.into_iter().zip(answers) {
            if let (Some(id), Some(answer)) = (owner, answer)
                && let Some(reply) = self.proposals.remove(&id)
            {
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    /// Answers the reads whose index the state machine has reached.
    fn answer_reads(&mut self) {
        let applied = self.store.applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_by_index)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_by_index = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
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
