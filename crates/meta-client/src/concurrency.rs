//! Locks and leader elections for the clients of Metasrv, in the style of etcd's
//! `concurrency` package, built only on leases, transactions and watch.
//!
//! A [`Session`] is a lease kept alive by a [`LeaseKeeper`]. A contender for a lock or
//! an election writes one key `{prefix}{lease id in hex}` attached to its session's
//! lease, created in a transaction that leaves an existing key alone. The contender
//! whose key has the lowest create revision holds the lock (or leads); the others each
//! watch the key just ahead of theirs and look again when it is deleted (released,
//! resigned, or gone with its lease), so a release wakes one contender, not all.
//!
//! The holder's key create revision is a **fencing token**: it only grows. A write that
//! must only happen while the lock is held compares it
//! ([`Mutex::is_owner`]-style compare: `create_revision(key) == token`) in the same
//! transaction, so a holder whose lease expired (a partition, a pause) cannot write.

use std::time::Duration;

pub use common_meta::concurrency::Held;
use common_meta::concurrency::{contender_key, first_in_line, leave, queue_and_wait};
use common_meta::kv::{KeyValue, KvBackend, RangeRequest, WatchRequest};
use common_meta::{Error, Result};
use tokio::sync::mpsc;

use crate::client::MetaClient;
use crate::lease::{LeaseKeeper, LeaseState};

/// A lease kept alive for as long as the session lives; what its locks and
/// candidacies are attached to. Dropping it stops the keep-alives (the lease then
/// expires); [`Session::close`] revokes it at once.
#[derive(Debug)]
pub struct Session {
    client: MetaClient,
    keeper: LeaseKeeper,
    ttl: i64,
}

impl Session {
    /// Grants a lease of `ttl` seconds and keeps it alive.
    pub async fn new(client: &MetaClient, ttl: i64) -> Result<Session> {
        let granted = client.lease_grant(ttl, 0).await?;
        Ok(Session {
            client: client.clone(),
            keeper: client.keep_lease_alive(granted.id, granted.ttl),
            ttl: granted.ttl,
        })
    }

    /// The session's lease.
    pub fn lease(&self) -> i64 {
        self.keeper.id()
    }

    /// The TTL granted.
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// Whether the lease is still known alive (false once the keeper learned it ended).
    pub fn is_alive(&self) -> bool {
        matches!(self.keeper.state(), LeaseState::Alive { .. })
    }

    /// Revokes the lease: every lock and candidacy of the session ends now.
    pub async fn close(self) -> Result<()> {
        self.keeper.stop();
        match self.client.lease_revoke(self.keeper.id()).await {
            Ok(()) | Err(Error::LeaseNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn key_under(&self, prefix: &str) -> Vec<u8> {
        contender_key(prefix.as_bytes(), self.lease())
    }
}

/// A distributed lock under a key prefix.
#[derive(Debug)]
pub struct Mutex {
    client: MetaClient,
    prefix: String,
    held: Option<Held>,
}

impl Mutex {
    /// The lock named `name` (its keys live under `name/`).
    pub fn new(client: &MetaClient, name: &str) -> Mutex {
        Mutex {
            client: client.clone(),
            prefix: format!("{}/", name.trim_end_matches('/')),
            held: None,
        }
    }

    /// Waits until the lock is held by `session`; the fencing token.
    pub async fn lock(&mut self, session: &Session) -> Result<Held> {
        let held = queue_and_wait(
            &self.client,
            session.key_under(&self.prefix),
            session.lease(),
            self.prefix.as_bytes(),
            b"",
        )
        .await?;
        self.held = Some(held.clone());
        Ok(held)
    }

    /// Releases the lock (a no-op when not held).
    pub async fn unlock(&mut self) -> Result<()> {
        match self.held.take() {
            Some(held) => leave(&self.client, &held).await,
            None => Ok(()),
        }
    }
}

/// A leader election under a key prefix: the first contender leads; its value is the
/// election's value until it proclaims another, resigns or its session ends.
#[derive(Debug)]
pub struct Election {
    client: MetaClient,
    prefix: String,
    held: Option<Held>,
}

/// Who leads an election now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The leader's key (its create revision is its term's fencing token).
    pub kv: KeyValue,
}

impl Election {
    /// The election named `name` (its keys live under `name/`).
    pub fn new(client: &MetaClient, name: &str) -> Election {
        Election {
            client: client.clone(),
            prefix: format!("{}/", name.trim_end_matches('/')),
            held: None,
        }
    }

    /// Stands with `value` and waits until elected; the fencing token.
    pub async fn campaign(&mut self, session: &Session, value: &[u8]) -> Result<Held> {
        let held = queue_and_wait(
            &self.client,
            session.key_under(&self.prefix),
            session.lease(),
            self.prefix.as_bytes(),
            value,
        )
        .await?;
        self.held = Some(held.clone());
        Ok(held)
    }

    /// Changes the leader's value; refused when this contender does not lead any more.
    pub async fn proclaim(&self, session: &Session, value: &[u8]) -> Result<()> {
        let held = self
            .held
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition {
                message: "not elected: campaign first".to_string(),
            })?;
        if common_meta::concurrency::proclaim(&self.client, held, session.lease(), value).await? {
            Ok(())
        } else {
            Err(Error::FailedPrecondition {
                message: "no longer the leader (resigned, or the session's lease ended)"
                    .to_string(),
            })
        }
    }

    /// Steps down (a no-op when not leading).
    pub async fn resign(&mut self) -> Result<()> {
        match self.held.take() {
            Some(held) => leave(&self.client, &held).await,
            None => Ok(()),
        }
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let (first, _) = first_in_line(&self.client, self.prefix.as_bytes()).await?;
        Ok(first.map(|kv| Leader { kv }))
    }

    /// Every change of leader or of the leader's value, as it happens (the current one
    /// first). The stream ends when the receiver is dropped.
    pub fn observe(&self) -> mpsc::Receiver<Result<Option<Leader>>> {
        let (out, observed) = mpsc::channel(16);
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        tokio::spawn(async move {
            let election = Election {
                client: client.clone(),
                prefix: prefix.clone(),
                held: None,
            };
            let mut last: Option<Option<Leader>> = None;
            let first = match client.range(RangeRequest::prefix(prefix.as_str())).await {
                Ok(r) => r.revision,
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            };
            let mut stream = match client
                .watch(WatchRequest::prefix(prefix.as_str()).from_revision(first + 1))
                .await
            {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = out.send(Err(e)).await;
                    return;
                }
            };
            loop {
                let now = election.leader().await;
                let changed = match (&now, &last) {
                    (Ok(now), Some(before)) => now != before,
                    _ => true,
                };
                if changed {
                    if let Ok(now) = &now {
                        last = Some(now.clone());
                    }
                    if out.send(now).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    response = stream.next() => match response {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let _ = out.send(Err(e)).await;
                            return;
                        }
                        None => return,
                    },
                    () = out.closed() => return,
                    // Progress of a quiet election costs nothing; this only bounds how
                    // long a missed wake-up could hide a change.
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        });
        observed
    }
}
