//! `RaftKvBackend`: the [`KvBackend`] of a raft member. Writes are proposed and answered
//! once applied; reads are linearizable through a batched ReadIndex, then served from
//! the local state machine.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common_meta::Error;
use common_meta::kv::{
    KvBackend, RangeRequest, RangeResponse, SledKvStore, TxnOp, TxnOpResponse, TxnRequest,
    TxnResponse,
};
use tokio::sync::oneshot;

use crate::raft::driver::{Command, Mailbox};

/// A member's KV backend over its raft driver and state machine.
#[derive(Clone)]
pub struct RaftKvBackend {
    mailbox: Mailbox,
    store: Arc<SledKvStore>,
    timeout: Duration,
}

impl RaftKvBackend {
    /// A backend over the driver behind `mailbox` and its state machine `store`;
    /// requests not answered within `timeout` fail as unavailable.
    pub fn new(mailbox: Mailbox, store: Arc<SledKvStore>, timeout: Duration) -> Self {
        RaftKvBackend {
            mailbox,
            store,
            timeout,
        }
    }

    /// The local state machine's revision (possibly behind the leader's).
    pub fn local_revision(&self) -> i64 {
        self.store.revision()
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.mailbox.send(command(reply))?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Unavailable {
                message: "the raft driver stopped before answering".to_string(),
            }),
            Err(_) => Err(Error::Unavailable {
                message: format!(
                    "no answer within {:?} (no quorum?); a write may or may not have been applied",
                    self.timeout
                ),
            }),
        }
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

#[async_trait]
impl KvBackend for RaftKvBackend {
    fn name(&self) -> &'static str {
        "raft"
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        if req.is_read_only() {
            // Linearizable: confirm leadership and wait until the read index is applied.
            self.ask(|reply| Command::ReadIndex { reply }).await?;
            return self.read_local(req).await;
        }
        // Limits are checked once, here, before the entry exists: apply does not check
        // them, so every member applies it the same way.
        self.store.check(&req)?;
        self.ask(|reply| Command::Propose { txn: req, reply }).await
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
