//! The driver's side of each `Ready`: the `on_ready` order, what the log writer and
//! the apply thread report back, compaction and snapshot bookkeeping, and the inline
//! apply of configuration changes.

use super::*;

impl Driver {
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
    /// 6. raft-rs is told the Ready was handed off (`advance_append_async`); when no
    ///    earlier Ready was waiting for the log writer, this one was not handed to it
    ///    but is made durable here, now, and `persisted` at once.
    ///
    /// The state machine may run ahead of the durable commit index (never of the
    /// durable log): a restart then starts raft at `min(applied, commit)` and the store
    /// skips what it already applied.
    pub(super) fn on_ready(&mut self) -> Result<(), Error> {
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
        let must_sync = ready.must_sync() || snapshot.is_some();
        // With nothing written before it still waiting, this Ready is made durable here:
        // under a light load the log writer's two hand-offs cost more than the fsync.
        let inline = self.written.is_empty();
        self.written.push_back(Pending {
            number,
            messages: ready.take_persisted_messages(),
            snapshot,
        });
        if !inline {
            self.persister()?.persist(Written { number, must_sync })?;
        }

        // 6.
        self.node.advance_append_async(ready);
        if inline {
            if must_sync {
                let timer = self.metrics.fsync_seconds.start_timer();
                self.log.flush().map_err(raft_error)?;
                timer.observe_duration();
            }
            self.persisted(number);
        }
        self.answer_reads();
        self.maybe_compact()?;
        Ok(())
    }

    /// The log writer reported every Ready up to `number` durable: tell raft-rs, send
    /// what waited for it.
    pub(super) fn persisted(&mut self, number: u64) {
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
    pub(super) fn advance_applied(&mut self, index: u64) {
        // The store may be ahead of what raft-rs knows committed and persisted (after a
        // restart it skips entries it already holds): raft-rs refuses (panics on) an
        // applied index past either, so it learns only what it can take.
        let log = &self.node.raft.raft_log;
        let index = index.min(log.committed).min(log.persisted);
        if index > log.applied {
            self.node.advance_apply_to(index);
        }
        self.answer_reads();
    }

    /// Hands committed entries to the apply thread with the replies of the ones this
    /// member proposed; a batch that changes the configuration is applied here, after
    /// the apply thread has caught up.
    pub(super) fn hand_to_apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
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
        let job = ApplyJob { entries, replies };
        let applier = self.applier()?;
        // Not while a snapshot export gathers the store: the apply would wait for it
        // here, on the thread that ticks and sends heartbeats.
        if applier.idle() && !self.store.copying() {
            // Nothing queued before it: applying here spares a hand-off and the order
            // stays the log's.
            let applied = apply_jobs(&self.store, vec![job], &self.metrics.apply_seconds)?;
            self.advance_applied(applied);
            return Ok(());
        }
        applier.apply(job)
    }

    pub(super) fn applier(&self) -> Result<&Applier, Error> {
        self.applier.as_ref().ok_or_else(stopped)
    }

    pub(super) fn persister(&self) -> Result<&Persister, Error> {
        self.persister.as_ref().ok_or_else(stopped)
    }

    /// Compacts the log once enough applied entries have piled up in it.
    pub(super) fn maybe_compact(&mut self) -> Result<(), Error> {
        // Never past what raft and the persisted hard state know to be committed.
        let applied = self
            .store
            .applied_index()
            .min(self.node.raft.raft_log.applied)
            .min(self.log.commit());
        let first = self.log.first_index_now();
        if applied >= first + self.compact_after + self.keep_entries {
            let mut to = applied - self.keep_entries;
            // A follower installing a snapshot goes on from the entries after it: keep
            // them while it is sent, unless it takes so long that the log would grow
            // without bound (it then gets a newer snapshot).
            let sending = self
                .node
                .raft
                .prs()
                .iter()
                .filter(|(_, pr)| pr.state == raft::ProgressState::Snapshot)
                .map(|(_, pr)| pr.pending_snapshot)
                .chain(self.log.snapshot_in_use())
                .min();
            if let Some(index) = sending {
                let bound = applied.saturating_sub(MAX_KEPT_FOR_SNAPSHOT);
                to = to.min(index.max(bound));
            }
            if to < first {
                return Ok(());
            }
            self.log.compact(to).map_err(raft_error)?;
            tracing::debug!(member = self.id, to, "compacted the raft log");
        }
        Ok(())
    }

    /// A snapshot can be lost on the way (transports drop on error). Raft waits for its
    /// outcome before sending anything else to that member, so report a failure when
    /// the member is still waiting long after it was sent; the leader then retries.
    pub(super) fn check_snapshots(&mut self) {
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
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
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
}
