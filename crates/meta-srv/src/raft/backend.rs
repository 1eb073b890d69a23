//! `RaftKvBackend`: the [`KvBackend`] of a raft member. Writes are proposed and answered
//! once applied; reads are linearizable through a batched ReadIndex, then served from
//! the local state machine. Client sessions (exactly-once writes) are opened, used and
//! closed here too; the leader's `SessionKeeper` decides when they expire.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common_meta::Error;
use common_meta::kv::lease::{self, LeaseWriter, Lessor};
use common_meta::kv::{
    Applied, KvBackend, RangeRequest, RangeResponse, SessionRef, SledKvStore, TxnOp, TxnOpResponse,
    TxnRequest, TxnResponse, WatchRequest, WatchStream,
};
use common_meta::kv::{LeaseGrant, LeaseTimeToLive};
use tokio::sync::{oneshot, watch};

use crate::data_dir::FORMAT_VERSION;
use crate::raft::driver::{Command, DriverHandle};
use crate::raft::members::Members;
use crate::raft::versions::PeerVersions;

/// A member's KV backend over its raft driver and state machine.
#[derive(Clone)]
pub struct RaftKvBackend {
    driver: DriverHandle,
    store: Arc<SledKvStore>,
    timeout: Duration,
    /// Lease deadlines, kept while this member leads (see `lease_keeper.rs`).
    lessor: Arc<Lessor>,
    /// `Some(term)` while this member leads.
    leadership: watch::Receiver<Option<u64>>,
    /// Which replicated features every member can apply; `None`: all of them (every
    /// member runs this binary).
    gate: Option<FeatureGate>,
}

/// The lowest data format the members run, which decides what may be proposed: an
/// entry a member cannot read the same way would make the replicas differ.
#[derive(Clone)]
pub struct FeatureGate {
    members: Arc<Members>,
    versions: Arc<PeerVersions>,
    me: u64,
}

impl FeatureGate {
    /// The gate of member `me`, over the cluster's `members` and the `versions` their
    /// raft batches announced.
    pub fn new(members: Arc<Members>, versions: Arc<PeerVersions>, me: u64) -> Self {
        FeatureGate {
            members,
            versions,
            me,
        }
    }

    /// The lowest data format among the members (a member not heard from yet counts
    /// as the oldest format).
    pub fn lowest_format(&self) -> u32 {
        self.members
            .all()
            .keys()
            .map(|&id| {
                if id == self.me {
                    FORMAT_VERSION
                } else {
                    self.versions.of(id)
                }
            })
            .min()
            .unwrap_or(FORMAT_VERSION)
    }
}

/// The data format from which transactions may use etcd's extensions.
const TXN_EXTENSIONS: u32 = 5;

/// The data format from which members apply auth changes.
const AUTH_CHANGES: u32 = 6;

/// Whether a request can have changed anything, which decides what a lost answer means.
#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
}

impl RaftKvBackend {
    /// A backend over the driver behind `driver` and its state machine `store`;
    /// requests not answered within `timeout` fail (reads as unavailable, writes as
    /// outcome unknown).
    ///
    /// Leases: `leadership` says when this member leads (only then does it time leases
    /// and answer keep-alives); TTLs are raised to `min_lease_ttl_secs`.
    pub fn new(
        driver: DriverHandle,
        store: Arc<SledKvStore>,
        timeout: Duration,
        leadership: watch::Receiver<Option<u64>>,
        min_lease_ttl_secs: i64,
    ) -> Self {
        RaftKvBackend {
            driver,
            store,
            timeout,
            lessor: Arc::new(Lessor::new(min_lease_ttl_secs)),
            leadership,
            gate: None,
        }
    }

    /// Proposes only what every member can apply, as `gate` says.
    pub fn with_gate(mut self, gate: FeatureGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The lease deadlines this member keeps while it leads.
    pub fn lessor(&self) -> &Arc<Lessor> {
        &self.lessor
    }

    /// `Some(term)` while this member leads.
    pub fn leadership(&self) -> watch::Receiver<Option<u64>> {
        self.leadership.clone()
    }

    /// Refuses a lease call a follower cannot answer (its clock decides nothing).
    fn leading(&self) -> Result<(), Error> {
        match *self.leadership.borrow() {
            Some(_) => Ok(()),
            None => Err(Error::NotLeader { leader: None }),
        }
    }

    /// The local state machine's revision (possibly behind the leader's).
    pub fn local_revision(&self) -> i64 {
        self.store.revision()
    }

    /// The local state machine.
    pub fn store(&self) -> &Arc<SledKvStore> {
        &self.store
    }

    async fn ask<T>(
        &self,
        kind: Kind,
        command: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        // A refused send proposed nothing: the driver has stopped.
        self.driver.send(command(reply))?;
        let lost = |why: String| match kind {
            Kind::Read => Error::Unavailable { message: why },
            Kind::Write => {
                Error::outcome_unknown(format!("{why}; the write may or may not have been applied"))
            }
        };
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(lost("the raft driver stopped before answering".to_string())),
            // Dropping `answer` here tells the driver, which then no longer proposes the
            // write if it is still queued.
            Err(_) => Err(lost(format!(
                "no answer within {:?} (no quorum?)",
                self.timeout
            ))),
        }
    }

    /// Replicates `command` and returns what applying it answered.
    async fn propose(&self, command: common_meta::kv::Command) -> Result<Applied, Error> {
        self.ask(Kind::Write, |reply| Command::Propose { command, reply })
            .await
    }

    /// Runs a write transaction as write `session.seq` of a client session: a retry of a
    /// write already applied gets its first answer and changes nothing.
    pub async fn txn_in_session(
        &self,
        req: TxnRequest,
        session: Option<SessionRef>,
    ) -> Result<TxnResponse, Error> {
        if req.is_read_only() {
            return self.txn(req).await;
        }
        if let Some(session) = &session {
            session.validate()?;
        }
        // Limits are checked once, here, before the entry exists: apply does not check
        // them, so every member applies it the same way.
        self.store.check(&req)?;
        if req.uses_extensions() {
            self.needs_format(TXN_EXTENSIONS, "this transaction")?;
        }
        match self
            .propose(common_meta::kv::Command::Txn { txn: req, session })
            .await?
        {
            Applied::Txn(response) => Ok(response),
            other => Err(unexpected("a transaction", &other)),
        }
    }

    /// Refuses what not every member can apply yet: `what` needs data format `format`.
    fn needs_format(&self, format: u32, what: &str) -> Result<(), Error> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        let lowest = gate.lowest_format();
        if lowest < format {
            return Err(Error::FailedPrecondition {
                message: format!(
                    "{what} needs every member at data format {format} or later, and one runs {lowest}; upgrade the cluster first"
                ),
            });
        }
        Ok(())
    }

    /// Replicates a change of users, roles or whether auth is on; a refusal (etcd's
    /// rules, see `common_meta::auth`) is `Error::Auth` and changed nothing.
    pub async fn auth_change(&self, change: common_meta::auth::AuthChange) -> Result<(), Error> {
        self.needs_format(AUTH_CHANGES, "an auth change")?;
        self.propose(common_meta::kv::Command::Auth { change })
            .await
            .map(drop)
    }

    /// Opens a client session living `ttl_ms` without keep-alives; returns its id.
    pub async fn open_session(&self, ttl_ms: u64, owner: String) -> Result<u64, Error> {
        match self
            .propose(common_meta::kv::Command::OpenSession { ttl_ms, owner })
            .await?
        {
            Applied::SessionOpened { id, .. } => Ok(id),
            other => Err(unexpected("opening a session", &other)),
        }
    }

    /// Ends sessions (their answers are forgotten; later writes in them are refused).
    pub async fn close_sessions(&self, ids: Vec<u64>) -> Result<(), Error> {
        self.propose(common_meta::kv::Command::CloseSessions { ids })
            .await
            .map(drop)
    }

    /// Waits until a linearizable read may be served from the local state machine.
    pub async fn read_barrier(&self) -> Result<(), Error> {
        self.ask(Kind::Read, |reply| Command::ReadIndex { reply })
            .await
            .map(drop)
    }

    /// Serves a read from the local state machine without a consensus round trip: it may
    /// miss the newest writes (serializable, not linearizable).
    ///
    /// It runs inline on the calling task: a read never fsyncs, and sled serves it from
    /// its in-memory page cache, so handing it to the blocking pool would cost more (a
    /// third of read throughput, measured) than the rare cold-page read it avoids.
    pub async fn read_local(&self, txn: TxnRequest) -> Result<TxnResponse, Error> {
        self.store.read(txn)
    }
}

fn unexpected(what: &str, answer: &Applied) -> Error {
    Error::Remote {
        code: "Internal".to_string(),
        message: format!("{what} was answered {answer:?}"),
    }
}

#[async_trait]
impl KvBackend for RaftKvBackend {
    fn name(&self) -> &'static str {
        "raft"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        if req.is_read_only() {
            // Linearizable: confirm leadership and wait until the read index is applied.
            self.read_barrier().await?;
            return self.read_local(req).await;
        }
        self.txn_in_session(req, None).await
    }

    async fn compact(&self, revision: i64) -> Result<i64, Error> {
        // The state machine decides (compacted or future) alike on every member.
        self.propose(common_meta::kv::Command::Compact { revision })
            .await?;
        Ok(self.store.revision())
    }

    /// Served from this member's applied state: any member can serve a watch.
    async fn watch(&self, req: WatchRequest) -> Result<WatchStream, Error> {
        common_meta::kv::watch::watch(&self.store, req)
    }

    async fn lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant, Error> {
        self.leading()?;
        lease::grant(self, &self.lessor, ttl, id).await
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), Error> {
        lease::revoke(self, &self.lessor, id).await
    }

    /// Leader only: the leader's clock times leases.
    async fn lease_keep_alive(&self, id: i64) -> Result<i64, Error> {
        self.leading()?;
        lease::keep_alive(self, &self.lessor, id).await
    }

    /// Leader only, after a read barrier (so a lease revoked or granted is seen).
    async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLive, Error> {
        self.leading()?;
        self.read_barrier().await?;
        lease::time_to_live(&self.store, &self.lessor, id, keys)
    }

    async fn leases(&self) -> Result<Vec<i64>, Error> {
        self.read_barrier().await?;
        Ok(self.store.leases()?.into_iter().map(|(id, _)| id).collect())
    }

    async fn range_serializable(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        let txn = TxnRequest {
            success: vec![TxnOp::Range(req)],
            ..Default::default()
        };
        let response = self.read_local(txn).await?;
        match response.responses.into_iter().next() {
            Some(TxnOpResponse::Range(range)) => Ok(range),
            other => Err(Error::Remote {
                code: "Internal".to_string(),
                message: format!("a local range answered {other:?}"),
            }),
        }
    }
}

#[async_trait]
impl LeaseWriter for RaftKvBackend {
    fn store(&self) -> &SledKvStore {
        &self.store
    }

    async fn write(&self, command: common_meta::kv::Command) -> Result<Applied, Error> {
        self.propose(command).await
    }
}

/// The [`KvBackend`] of one client write: every transaction it runs is write
/// `session` of that client's session, so the provided methods (put, compare-and-put,
/// ...) all become exactly-once.
pub struct SessionWrite<'a> {
    /// The member's backend.
    pub backend: &'a RaftKvBackend,
    /// The session and seq, if the client named one.
    pub session: Option<SessionRef>,
}

#[async_trait]
impl KvBackend for SessionWrite<'_> {
    fn name(&self) -> &'static str {
        "raft-session"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        self.backend.txn_in_session(req, self.session).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::data_dir::OLDEST_FORMAT;

    #[test]
    fn the_gate_opens_once_every_member_runs_the_format() {
        let members = Arc::new(Members::in_memory(BTreeMap::from([
            (1, "a:1".to_string()),
            (2, "b:2".to_string()),
            (3, "c:3".to_string()),
        ])));
        let versions = Arc::new(PeerVersions::default());
        let gate = FeatureGate::new(members, versions.clone(), 1);
        assert_eq!(gate.lowest_format(), OLDEST_FORMAT, "peers not heard from");
        versions.record(2, FORMAT_VERSION);
        versions.record(3, TXN_EXTENSIONS - 1);
        assert_eq!(gate.lowest_format(), TXN_EXTENSIONS - 1);
        versions.record(3, FORMAT_VERSION);
        assert_eq!(gate.lowest_format(), FORMAT_VERSION);
    }
}
