//! Leases from the client side: the calls of `meta.v1.Lease`, and [`LeaseKeeper`], the
//! task that keeps one lease alive (a keep-alive every third of its TTL on one stream to
//! the leader, reopened on the next member when it breaks).
//!
//! A grant that names no id gets one chosen here, so a retry after an unknown outcome
//! names the same lease: finding it granted (ALREADY_EXISTS after an attempt that may
//! have applied) is success. A revoke retried after an unknown outcome that finds the
//! lease gone is success for the same reason.

use std::time::{Duration, Instant};

use common_meta::kv::lease::Lessor;
use common_meta::kv::{LeaseGrant, LeaseTimeToLive};
use common_meta::{Error, Result};
use meta_proto::v1 as pb;
use meta_proto::v1::lease_client::LeaseClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{MetaClient, Retry, jittered};

impl MetaClient {
    pub(crate) async fn remote_lease_grant(&self, ttl: i64, id: i64) -> Result<LeaseGrant> {
        Lessor::check_id(id)?;
        let id = if id == 0 { Lessor::new_id()? } else { id };
        let request = pb::LeaseGrantRequest { ttl, id };
        match self
            .with_retry(Retry::Transient, |channel| async move {
                LeaseClient::new(channel).lease_grant(request).await
            })
            .await
        {
            Ok(granted) => Ok(LeaseGrant {
                id: granted.id,
                ttl: granted.ttl,
            }),
            Err(failure) => match failure.error {
                // An earlier attempt of this grant went through.
                Error::AlreadyExists { .. } if failure.maybe_applied => {
                    let ttl = self.remote_lease_time_to_live(id, false).await?;
                    Ok(LeaseGrant {
                        id,
                        ttl: ttl.granted_ttl,
                    })
                }
                error => Err(error),
            },
        }
    }

    pub(crate) async fn remote_lease_revoke(&self, id: i64) -> Result<()> {
        let request = pb::LeaseRevokeRequest { id };
        match self
            .with_retry(Retry::Transient, |channel| async move {
                LeaseClient::new(channel).lease_revoke(request).await
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(failure) => match failure.error {
                Error::LeaseNotFound { .. } if failure.maybe_applied => Ok(()),
                error => Err(error),
            },
        }
    }

    /// One keep-alive on a stream of its own.
    pub(crate) async fn remote_lease_keep_alive(&self, id: i64) -> Result<i64> {
        let response = self
            .with_channel(|channel| async move {
                let (requests, outbound) = mpsc::channel(1);
                let _ = requests.send(pb::LeaseKeepAliveRequest { id }).await;
                drop(requests);
                let mut responses = LeaseClient::new(channel)
                    .lease_keep_alive(ReceiverStream::new(outbound))
                    .await?
                    .into_inner();
                match responses.message().await? {
                    Some(response) => Ok(tonic::Response::new(response)),
                    None => Err(tonic::Status::unavailable(
                        "the keep-alive stream ended without an answer",
                    )),
                }
            })
            .await?;
        if response.ttl <= 0 {
            return Err(Error::LeaseNotFound { id });
        }
        Ok(response.ttl)
    }

    pub(crate) async fn remote_lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLive> {
        let request = pb::LeaseTimeToLiveRequest { id, keys };
        let response = self
            .with_channel(|channel| async move {
                LeaseClient::new(channel).lease_time_to_live(request).await
            })
            .await?;
        Ok(LeaseTimeToLive {
            id: response.id,
            ttl: response.ttl,
            granted_ttl: response.granted_ttl,
            keys: response.keys,
        })
    }

    pub(crate) async fn remote_leases(&self) -> Result<Vec<i64>> {
        let response = self
            .with_channel(|channel| async move {
                LeaseClient::new(channel)
                    .lease_leases(pb::LeaseLeasesRequest {})
                    .await
            })
            .await?;
        Ok(response.leases.into_iter().map(|l| l.id).collect())
    }

    /// Starts keeping lease `id` (granted with `ttl` seconds) alive; see [`LeaseKeeper`].
    pub fn keep_lease_alive(&self, id: i64, ttl: i64) -> LeaseKeeper {
        let (state, observed) = watch::channel(LeaseState::Alive {
            ttl,
            renewed: Instant::now(),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_alive_loop(
            self.clone(),
            id,
            Duration::from_secs(ttl.max(1).unsigned_abs()),
            state,
            stopped,
        ));
        LeaseKeeper {
            id,
            state: observed,
            stop,
            task,
        }
    }
}

/// What a [`LeaseKeeper`] knows of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed at `renewed` for `ttl` seconds.
    Alive {
        /// The TTL the last renewal gave.
        ttl: i64,
        /// When that renewal was asked for (the lease lives at least `ttl` from then).
        renewed: Instant,
    },
    /// The lease is gone (revoked, or expired before a renewal reached the leader):
    /// whatever it guarded is lost.
    Lost,
}

/// Keeps one lease alive until dropped or [`LeaseKeeper::stop`]ped: a keep-alive every
/// third of the TTL, so two may be lost before the lease is at risk. Its state tells
/// when the lease was lost.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    state: watch::Receiver<LeaseState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// The lease kept.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The lease's state as last learned; changes are observable with
    /// [`LeaseKeeper::watch_state`].
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A receiver of state changes (it sees [`LeaseState::Lost`] when the lease ends).
    pub fn watch_state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Stops renewing (the lease then expires after its TTL unless revoked).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Holds the client: renewals go on after the caller drops its handle, until the
/// keeper is dropped or stopped.
async fn keep_alive_loop(
    client: MetaClient,
    id: i64,
    ttl: Duration,
    state: watch::Sender<LeaseState>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut every = ttl / 3;
    let mut backoff = Duration::from_millis(50);
    loop {
        let (index, _, channel) = client.current_endpoint();
        let (requests, outbound) = mpsc::channel(1);
        let opened = match client.ensure_token(&channel).await {
            Ok(()) => {
                LeaseClient::new(channel)
                    .lease_keep_alive(ReceiverStream::new(outbound))
                    .await
            }
            Err(status) => Err(status),
        };
        let mut responses = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                client.note_refusal(&status);
                client.skip_endpoint(index);
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(every.max(Duration::from_millis(100)));
                continue;
            }
        };
        loop {
            let asked = Instant::now();
            if requests
                .send(pb::LeaseKeepAliveRequest { id })
                .await
                .is_err()
            {
                break;
            }
            let answer = tokio::select! {
                answer = responses.message() => answer,
                _ = stopped.wait_for(|s| *s) => return,
            };
            match answer {
                Ok(Some(response)) if response.ttl > 0 => {
                    backoff = Duration::from_millis(50);
                    every = Duration::from_secs(response.ttl.unsigned_abs()) / 3;
                    let _ = state.send(LeaseState::Alive {
                        ttl: response.ttl,
                        renewed: asked,
                    });
                }
                Ok(Some(_)) => {
                    let _ = state.send(LeaseState::Lost);
                    return;
                }
                // The stream broke (the member stopped, or stopped leading): the next
                // member, now.
                Ok(None) | Err(_) => {
                    client.skip_endpoint(index);
                    break;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(every.max(Duration::from_millis(100)));
    }
}
