//! One write group as it executes: each command sees the writes of those before it, and
//! the exactly-once decisions of client sessions (see the parent module's doc).

use std::collections::BTreeMap;

use meta_proto::v1 as pb;
use prost::Message as _;

use super::{MAX_UNACKED_ANSWERS, SledKvStore, TREE};
use crate::auth::AuthState;
use crate::error::{Error, Result};
use crate::kv::command::{Applied, Command, SessionRef};
use crate::kv::engine::{self, Entry, Layered, ReadView, ScanItem};
use crate::kv::limits::KvLimits;
use crate::kv::types::TxnRequest;

pub(super) fn decode_session(id: u64, bytes: &[u8]) -> Result<pb::SessionRecord> {
    pb::SessionRecord::decode(bytes).map_err(|e| Error::Corrupted {
        location: format!("tree {TREE} session {id}"),
        reason: e.to_string(),
    })
}

/// One write's changes (`None`: deleted) at its revision.
pub(super) type Written = (i64, BTreeMap<Vec<u8>, Option<Entry>>);

/// The changes of one write group as they accumulate: each command sees those before it.
pub(super) struct Group<'a> {
    pub(super) store: &'a SledKvStore,
    pub(super) limits: KvLimits,
    /// The store's revision when the group began.
    pub(super) start: i64,
    pub(super) revision: i64,
    pub(super) changes: BTreeMap<Vec<u8>, Option<Entry>>,
    /// Each write's own changes, by revision: the history the group adds.
    pub(super) history: Vec<Written>,
    /// A compaction the group decided.
    pub(super) compact: Option<i64>,
    /// Lease records written (`None`: revoked) by the group.
    pub(super) leases: BTreeMap<i64, Option<pb::LeaseRecord>>,
    /// Session records written (`None`: removed) by the group.
    pub(super) sessions: BTreeMap<u64, Option<pb::SessionRecord>>,
    /// The auth state, once a command of the group changed it.
    pub(super) auth: Option<AuthState>,
}

impl Group<'_> {
    /// Runs one command. The outer `Err` is a storage failure (the whole group fails);
    /// the inner one is the command's own refusal, decided alike on every member.
    pub(super) fn run(&mut self, index: u64, command: Command) -> Result<Result<Applied>> {
        match command {
            Command::Noop => Ok(Ok(Applied::Done)),
            Command::Txn { txn, session: None } => self.txn(txn),
            Command::Txn {
                txn,
                session: Some(session),
            } => self.session_txn(txn, session),
            Command::OpenSession { ttl_ms, owner } => {
                if index == 0 {
                    return Ok(Err(Error::invalid_argument(
                        "sessions exist only in a replicated store",
                    )));
                }
                let record = pb::SessionRecord {
                    ttl_ms,
                    owner,
                    ..Default::default()
                };
                self.sessions.insert(index, Some(record));
                Ok(Ok(Applied::SessionOpened { id: index, ttl_ms }))
            }
            Command::CloseSessions { ids } => {
                for id in ids {
                    self.sessions.insert(id, None);
                }
                Ok(Ok(Applied::Done))
            }
            Command::Compact { revision } => Ok(self.compact(revision).map(|()| Applied::Done)),
            Command::LeaseGrant { id, ttl_secs } => {
                if id <= 0 || ttl_secs <= 0 {
                    return Ok(Err(Error::invalid_argument(format!(
                        "lease id {id} and TTL {ttl_secs} must both be positive"
                    ))));
                }
                if self.lease(id)?.is_some() {
                    return Ok(Err(Error::AlreadyExists {
                        what: format!("lease {id}"),
                    }));
                }
                let record = pb::LeaseRecord {
                    ttl_secs,
                    remaining_ms: 0,
                };
                self.leases.insert(id, Some(record));
                Ok(Ok(Applied::LeaseGranted { id, ttl_secs }))
            }
            Command::LeaseRevoke { id } => self.revoke(id),
            Command::Auth { change } => {
                let mut state = self
                    .auth
                    .take()
                    .unwrap_or_else(|| AuthState::clone(&self.store.auth()));
                // A refused change leaves the state as it was (see `AuthState::apply`).
                let answer = state.apply(change);
                self.auth = Some(state);
                Ok(answer.map(|_| Applied::Done).map_err(Error::from))
            }
            Command::LeaseCheckpoint { leases } => {
                for (id, remaining_ms) in leases {
                    if let Some(mut record) = self.lease(id)? {
                        record.remaining_ms = remaining_ms.max(0);
                        self.leases.insert(id, Some(record));
                    }
                }
                Ok(Ok(Applied::Done))
            }
        }
    }

    /// Lease `id` as the group sees it.
    fn lease(&self, id: i64) -> Result<Option<pb::LeaseRecord>> {
        match self.leases.get(&id) {
            Some(record) => Ok(*record),
            None => self.store.lease(id),
        }
    }

    /// Revokes a lease: deletes its keys (as the group sees them) in one transaction.
    fn revoke(&mut self, id: i64) -> Result<Result<Applied>> {
        if self.lease(id)?.is_none() {
            return Ok(Err(Error::LeaseNotFound { id }));
        }
        let mut keys: std::collections::BTreeSet<Vec<u8>> =
            self.store.lease_keys(id)?.into_iter().collect();
        for (key, entry) in &self.changes {
            match entry {
                Some(entry) if entry.lease == id => {
                    keys.insert(key.clone());
                }
                _ => {
                    keys.remove(key);
                }
            }
        }
        self.leases.insert(id, None);
        if keys.is_empty() {
            return Ok(Ok(Applied::Done));
        }
        let delete = TxnRequest {
            success: keys
                .into_iter()
                .map(|key| crate::kv::TxnOp::DeleteRange(crate::kv::DeleteRangeRequest::key(key)))
                .collect(),
            ..Default::default()
        };
        // Unlimited: a lease may hold more keys than one client transaction could name.
        let limits = std::mem::replace(&mut self.limits, KvLimits::unlimited());
        let answer = self.txn(delete);
        self.limits = limits;
        Ok(answer?.map(|_| Applied::Done))
    }

    fn compacted(&self) -> i64 {
        self.compact.unwrap_or_else(|| self.store.compacted())
    }

    /// Decides a compaction at `revision`: not beyond the current revision, and past
    /// the compacted one.
    fn compact(&mut self, revision: i64) -> Result<()> {
        let compacted = self.compacted();
        if revision > self.revision {
            return Err(Error::FutureRevision {
                requested: revision,
                current: self.revision,
            });
        }
        if revision <= compacted {
            return Err(Error::Compacted {
                requested: revision,
                compacted,
            });
        }
        self.compact = Some(revision);
        Ok(())
    }

    fn txn(&mut self, txn: TxnRequest) -> Result<Result<Applied>> {
        let view = GroupView {
            store: self.store,
            leases: &self.leases,
            changes: &self.changes,
            history: &self.history,
            start: self.start,
            revision: self.revision,
            compacted: self.compacted(),
        };
        match engine::execute(&view, self.revision, &self.limits, txn) {
            Ok((response, write)) => {
                if let Some(write) = write {
                    self.revision = write.revision;
                    self.changes
                        .extend(write.changes.iter().map(|(k, e)| (k.clone(), e.clone())));
                    self.history.push((write.revision, write.changes));
                }
                Ok(Ok(Applied::Txn(response)))
            }
            Err(e) if e.is_refusal() => Ok(Err(e)),
            // A read failure is this member's problem, not the request's: never let it
            // turn into a different outcome on one replica.
            Err(e) => Err(e),
        }
    }

    fn session_txn(&mut self, txn: TxnRequest, session: SessionRef) -> Result<Result<Applied>> {
        if let Err(e) = session.validate() {
            return Ok(Err(e));
        }
        let record = match self.sessions.get(&session.id) {
            Some(record) => record.clone(),
            None => self.store.load_session(session.id)?,
        };
        let Some(mut record) = record else {
            return Ok(Err(Error::SessionExpired { id: session.id }));
        };
        // Forget what the client says it holds, whatever this command's fate.
        record.acked = record.acked.max(session.acked);
        let acked = record.acked;
        record.answers.retain(|a| a.seq >= acked);
        let answer = if let Some(kept) = record.answers.iter().find(|a| a.seq == session.seq) {
            kept_answer(kept)
        } else if session.seq < record.acked {
            Err(Error::invalid_argument(format!(
                "write {} of session {} is below the acknowledged mark {}: its answer was already received and forgotten",
                session.seq, session.id, record.acked
            )))
        } else if record.answers.len() >= MAX_UNACKED_ANSWERS {
            Err(Error::invalid_argument(format!(
                "session {} holds {MAX_UNACKED_ANSWERS} unacknowledged answers; acknowledge answered writes (SessionRef.acked) before sending more",
                session.id
            )))
        } else {
            let answer = self.txn(txn)?;
            let outcome = match &answer {
                Ok(Applied::Txn(response)) => pb::session_answer::Outcome::Response(
                    crate::rpc::txn_response_to_pb(response.clone(), 0),
                ),
                Ok(other) => {
                    return Err(Error::Remote {
                        code: "Internal".to_string(),
                        message: format!("a transaction was answered {other:?}"),
                    });
                }
                Err(e) => pb::session_answer::Outcome::Refused(e.to_string()),
            };
            record.answers.push(pb::SessionAnswer {
                seq: session.seq,
                outcome: Some(outcome),
            });
            answer
        };
        self.sessions.insert(session.id, Some(record));
        Ok(answer)
    }
}

/// The store as a write of the group sees it: the store plus the group's earlier
/// writes, and past revisions from the store's history or the group's own.
struct GroupView<'a> {
    store: &'a SledKvStore,
    leases: &'a BTreeMap<i64, Option<pb::LeaseRecord>>,
    changes: &'a BTreeMap<Vec<u8>, Option<Entry>>,
    history: &'a [Written],
    start: i64,
    revision: i64,
    compacted: i64,
}

impl ReadView for GroupView<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        match self.leases.get(&id) {
            Some(record) => Ok(record.is_some()),
            None => ReadView::lease_exists(self.store, id),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        layered_get(self.store, self.changes, key)
    }

    fn scan<'s>(
        &'s self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 's> {
        layered_scan(self.store, self.changes, start, end)
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        super::check_readable(revision, self.revision, self.compacted)?;
        if revision <= self.start {
            return self.store.at_revision(revision);
        }
        // A revision written earlier in this group: the store plus the group's writes
        // up to it.
        let mut changes = BTreeMap::new();
        for (_, write) in self.history.iter().take_while(|(r, _)| *r <= revision) {
            changes.extend(write.iter().map(|(k, e)| (k.clone(), e.clone())));
        }
        Ok(Box::new(Pending {
            store: self.store,
            changes,
        }))
    }
}

/// The store with some of a group's writes over it, owned.
struct Pending<'a> {
    store: &'a SledKvStore,
    changes: BTreeMap<Vec<u8>, Option<Entry>>,
}

impl ReadView for Pending<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool> {
        ReadView::lease_exists(self.store, id)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>> {
        layered_get(self.store, &self.changes, key)
    }

    fn scan<'s>(
        &'s self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = ScanItem> + 's> {
        layered_scan(self.store, &self.changes, start, end)
    }

    fn at_revision(&self, revision: i64) -> Result<Box<dyn ReadView + '_>> {
        self.store.at_revision(revision)
    }
}

/// A key as the store with `changes` over it holds it.
fn layered_get(
    store: &SledKvStore,
    changes: &BTreeMap<Vec<u8>, Option<Entry>>,
    key: &[u8],
) -> Result<Option<Entry>> {
    match changes.get(key) {
        Some(entry) => Ok(entry.clone()),
        None => ReadView::get(store, key),
    }
}

/// A scan of the store with `changes` over it.
fn layered_scan<'s>(
    store: &'s SledKvStore,
    changes: &'s BTreeMap<Vec<u8>, Option<Entry>>,
    start: &[u8],
    end: Option<&[u8]>,
) -> Box<dyn Iterator<Item = ScanItem> + 's> {
    let view = Layered {
        base: store,
        changes,
    };
    // Collected: the scan borrows the view, which would otherwise have to outlive
    // itself. A group's reads are small (the limits bound a transaction's ranges).
    let items: Vec<ScanItem> = view.scan(start, end).collect();
    Box::new(items.into_iter())
}

/// The answer a session kept for a write, as it was first given.
fn kept_answer(kept: &pb::SessionAnswer) -> Result<Applied> {
    match &kept.outcome {
        Some(pb::session_answer::Outcome::Response(response)) => {
            Ok(Applied::Txn(response.clone().try_into()?))
        }
        Some(pb::session_answer::Outcome::Refused(message)) => Err(Error::InvalidArgument {
            message: message
                .strip_prefix("invalid argument: ")
                .unwrap_or(message)
                .to_string(),
        }),
        None => Err(Error::Corrupted {
            location: format!("a session answer for write {}", kept.seq),
            reason: "no outcome".to_string(),
        }),
    }
}
