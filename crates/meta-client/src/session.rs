//! Exactly-once writes: the client's session (the raft dissertation's §6.3).
//!
//! A [`MetaClient`] opens one session at its first write and keeps it alive in the
//! background (every third of its TTL). Each write takes the next `seq` and carries
//! `(session, seq, acked)`, where `acked` is the lowest seq still waiting for its answer:
//! the server keeps the answers from there on and answers a retry with the first one.
//! So every write, compare-and-put and txn included, is retried across leader changes,
//! lost replies and deadlines without being applied twice.
//!
//! When the session has expired (the client was cut off for longer than its TTL), a
//! write that was never possibly applied goes again in a new session; one whose earlier
//! attempt may have been applied is reported as an unknown outcome, because the
//! answers of the old session are gone.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::auth::Conn;
use common_meta::{Error, Result};
use meta_proto::v1 as pb;
use meta_proto::v1::store_client::StoreClient;
use tonic::{Response, Status};

use crate::client::{Failure, MetaClient, Retry};

/// The session a client holds (or will open), shared by its clones.
#[derive(Debug, Default)]
pub(crate) struct SessionSlot {
    /// Serialises opening so concurrent first writes share one session.
    current: tokio::sync::Mutex<Option<Arc<Session>>>,
}

/// One open session.
#[derive(Debug)]
pub(crate) struct Session {
    id: u64,
    ttl: Duration,
    numbers: Mutex<Numbers>,
}

#[derive(Debug, Default)]
struct Numbers {
    /// The last seq handed out.
    last: u64,
    /// Seqs sent and not yet answered.
    in_flight: BTreeSet<u64>,
}

impl Session {
    fn numbers(&self) -> std::sync::MutexGuard<'_, Numbers> {
        // Only integer bookkeeping happens under the lock: a poisoned one is whole.
        self.numbers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the next seq and counts it in flight.
    fn begin(&self) -> u64 {
        let mut numbers = self.numbers();
        numbers.last += 1;
        let seq = numbers.last;
        numbers.in_flight.insert(seq);
        seq
    }

    /// The reference an attempt of write `seq` carries: `acked` is the lowest seq still
    /// in flight (at most `seq`, which is in flight itself).
    fn reference(&self, seq: u64) -> pb::SessionRef {
        let acked = self.numbers().in_flight.first().copied().unwrap_or(seq);
        pb::SessionRef {
            id: self.id,
            seq,
            acked,
        }
    }

    fn end(&self, seq: u64) {
        self.numbers().in_flight.remove(&seq);
    }
}

impl MetaClient {
    /// The session id this client currently writes in, if one is open.
    pub async fn session_id(&self) -> Option<u64> {
        self.inner_session()
            .current
            .lock()
            .await
            .as_ref()
            .map(|s| s.id)
    }

    /// Runs a write through the Store service: exactly-once in this client's session
    /// when sessions are on (see the module doc), else sent again only when the server
    /// said nothing was applied. `call` gets the session reference to put in the request.
    pub(crate) async fn write<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(StoreClient<Conn>, Option<pb::SessionRef>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        if self.options().session_ttl.is_none() {
            return self
                .with_retry(Retry::NotApplied, |channel| call(store(channel), None))
                .await
                .map_err(|failure| failure.error);
        }
        let mut renewed = false;
        loop {
            let session = self.session().await?;
            let seq = session.begin();
            let result = self
                .with_retry(Retry::Transient, |channel| {
                    call(store(channel), Some(session.reference(seq)))
                })
                .await;
            session.end(seq);
            let Failure {
                error,
                maybe_applied,
            } = match result {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            match error {
                Error::SessionExpired { .. } => {
                    self.forget_session(&session).await;
                    if maybe_applied {
                        return Err(Error::outcome_unknown(format!(
                            "session {} expired while write {seq} was being retried; it may or may not have been applied",
                            session.id
                        )));
                    }
                    if renewed {
                        return Err(error);
                    }
                    // Never applied: it goes again, in a new session.
                    renewed = true;
                }
                Error::Unavailable { message } if maybe_applied => {
                    return Err(Error::outcome_unknown(format!(
                        "{message}; an earlier attempt may have been applied (retrying it in session {} is safe)",
                        session.id
                    )));
                }
                error => return Err(error),
            }
        }
    }

    fn inner_session(&self) -> &SessionSlot {
        &self.inner_ref().session
    }

    /// The open session, opening one (and its keep-alive task) if there is none.
    async fn session(&self) -> Result<Arc<Session>> {
        let mut current = self.inner_session().current.lock().await;
        if let Some(session) = current.as_ref() {
            return Ok(session.clone());
        }
        let ttl = self
            .options()
            .session_ttl
            .unwrap_or(Duration::from_secs(60));
        let request = pb::OpenSessionRequest {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        };
        // Opening twice (a lost reply) leaves an unused session that expires by itself.
        let opened = self
            .with_channel(|channel| async move { store(channel).open_session(request).await })
            .await?;
        let session = Arc::new(Session {
            id: opened.id,
            ttl: Duration::from_millis(opened.ttl_ms),
            numbers: Mutex::default(),
        });
        tracing::debug!(session = session.id, ttl = ?session.ttl, "opened a client session");
        *current = Some(session.clone());
        tokio::spawn(keep_alive(self.downgrade(), session.clone()));
        Ok(session)
    }

    /// Drops `session` if it is still the current one (the next write opens another).
    async fn forget_session(&self, session: &Arc<Session>) {
        let mut current = self.inner_session().current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
        }
    }

    /// Closes the session, if one is open: its kept answers are dropped at once instead
    /// of at its expiry. Later writes open a new one.
    pub async fn close_session(&self) -> Result<()> {
        let Some(session) = self.inner_session().current.lock().await.take() else {
            return Ok(());
        };
        let request = pb::CloseSessionRequest { id: session.id };
        self.with_channel(|channel| async move { store(channel).close_session(request).await })
            .await
            .map(drop)
    }
}

fn store(channel: Conn) -> StoreClient<Conn> {
    StoreClient::new(channel).max_decoding_message_size(crate::client::MAX_RESPONSE_BYTES)
}

/// Keeps `session` alive while the client lives and the session is its current one.
async fn keep_alive(client: std::sync::Weak<crate::client::Inner>, session: Arc<Session>) {
    let every = session.ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        let Some(client) = MetaClient::upgrade(&client) else {
            return;
        };
        {
            let current = client.inner_session().current.lock().await;
            if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &session)) {
                return;
            }
        }
        let request = pb::KeepAliveSessionRequest { id: session.id };
        match client
            .with_channel(|channel| async move { store(channel).keep_alive_session(request).await })
            .await
        {
            Ok(_) => {}
            Err(Error::SessionExpired { .. }) => {
                tracing::warn!(
                    session = session.id,
                    "client session expired; the next write opens a new one"
                );
                client.forget_session(&session).await;
                return;
            }
            // Unreachable for now: try again at the next beat, well within the TTL.
            Err(e) => {
                tracing::debug!(session = session.id, error = %e, "session keep-alive failed")
            }
        }
    }
}
