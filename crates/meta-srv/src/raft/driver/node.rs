//! `RaftNode`: starts the driver, the log writer, the apply thread and the watchdog,
//! and stops them; `bootstrap` writes a new cluster's first entries.

use super::*;

/// A running driver thread; dropping it stops the driver and waits for the thread.
pub struct RaftNode {
    handle: DriverHandle,
    thread: Option<JoinHandle<()>>,
    leadership: tokio::sync::watch::Receiver<Option<u64>>,
    view: Arc<RaftView>,
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
        if let Some(files) = &settings.snapshot_files {
            log.use_snapshot_files(files.clone());
        }
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
        let view = Arc::new(RaftView::default());
        let handle = DriverHandle {
            queue,
            backlog: Arc::default(),
            view: view.clone(),
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
            settings.metrics.fsync_seconds.clone(),
        )?;
        let apply_storage = Arc::new(StorageWatch::default());
        let applier = Applier::start(
            settings.id,
            store.clone(),
            handle.clone(),
            apply_storage.clone(),
            settings.metrics.apply_seconds.clone(),
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
            propose_batch: Vec::new(),
            proposals: HashMap::new(),
            conf_proposals: HashMap::new(),
            next_read: first_id,
            read_batch: Vec::new(),
            reads_by_ctx: HashMap::new(),
            reads_by_index: Vec::new(),
            leader_tx: leader_tx.clone(),
            view: view.clone(),
            injected: None,
            storage: storage.clone(),
            failure: failure_tx.clone(),
            metrics: settings.metrics.clone(),
        };
        spawn_watchdog(
            settings.id,
            settings.storage_stall,
            vec![storage.clone(), writer_storage, apply_storage],
            leader_tx.clone(),
            failure_tx.clone(),
        )?;
        let stopped_view = view.clone();
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
                stopped_view.set(0, stopped_view.term());
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
            view,
            failure,
        })
    }

    /// The leader and term this member knows, kept current by the driver.
    pub fn view(&self) -> Arc<RaftView> {
        self.view.clone()
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
