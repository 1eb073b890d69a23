//! etcd's `Lock` and `Election` services, which etcd's client libraries call (etcdctl
//! does the same over KV). Both run at the leader (a member that does not lead forwards
//! them) on the one lock and election algorithm of `common_meta::concurrency`: a
//! contender's key `name/{lease in hex}` attached to its lease, the lowest create
//! revision first.

use super::status::auth_status;
use crate::auth::Caller;
use common_meta::auth::Access;
use std::pin::Pin;
use std::sync::Arc;

use common_meta::concurrency::{self, Held, contender_key, first_in_line, queue_and_wait};
use common_meta::kv::{DeleteRangeRequest, KvBackend, WatchRequest, WatchResponse};
use meta_proto::etcd::v3electionpb as el;
use meta_proto::etcd::v3lockpb as lk;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Etcd;
use super::forward::{Route, onward};
use super::status::{STOPPED, status};
use crate::raft::backend::RaftKvBackend;

/// etcd's Election service answers these as plain errors (gRPC code UNKNOWN).
const NOT_LEADER: &str = "election: not leader";
const NO_LEADER: &str = "election: no leader";

/// The key prefix of a lock or election: its name, then `/`.
fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// Refuses a caller that may not do each of `accesses` on the keys of lock or
/// election `name` (its contenders' keys are under `name/`).
fn may_use<T>(request: &Request<T>, name: &[u8], accesses: &[Access]) -> Result<(), Status> {
    let caller = Caller::of(request);
    let prefix = prefix_of(name);
    let end = common_meta::kv::prefix_end(&prefix);
    for access in accesses {
        caller
            .check(&prefix, &end, *access)
            .map_err(|e| auth_status(&e))?;
    }
    Ok(())
}

/// Refuses a caller that may not write `key` (a held lock or leadership).
fn may_write<T>(request: &Request<T>, key: &[u8]) -> Result<(), Status> {
    Caller::of(request)
        .check(key, &[], Access::Write)
        .map_err(|e| auth_status(&e))
}

/// A contender's key while its request waits: deleted if the request is dropped
/// (the client gave up) before the wait ended, as etcd unlocks a cancelled waiter.
struct Waiting {
    kv: RaftKvBackend,
    key: Option<Vec<u8>>,
}

impl Waiting {
    fn done(mut self) {
        self.key = None;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let kv = self.kv.clone();
            tokio::spawn(async move {
                if let Err(e) = kv.delete_range(DeleteRangeRequest::key(key)).await {
                    tracing::warn!(error = %e, "removing an abandoned contender's key failed");
                }
            });
        }
    }
}

/// Completes when the member stops (a graceful stop waits for open requests and
/// streams: waiters end with etcd's "server stopped").
async fn stopped(mut stop: Stop) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The member's stop signal.
type Stop = tokio::sync::watch::Receiver<bool>;

/// Queues `lease`'s contender under `name` and waits for its turn, or until the member
/// stops.
async fn contend(
    etcd: &Etcd,
    stop: &Stop,
    name: &[u8],
    lease: i64,
    value: &[u8],
) -> Result<Held, Status> {
    if name.is_empty() {
        return Err(super::status::EMPTY_KEY.status());
    }
    let prefix = prefix_of(name);
    let key = contender_key(&prefix, lease);
    let waiting = Waiting {
        kv: etcd.backend.clone(),
        key: Some(key.clone()),
    };
    let held = tokio::select! {
        held = queue_and_wait(&etcd.backend, key, lease, &prefix, value) => held.map_err(status)?,
        () = stopped(stop.clone()) => return Err(STOPPED.status()),
    };
    waiting.done();
    Ok(held)
}

/// etcd's Lock service of one member.
pub struct LockService {
    etcd: Arc<Etcd>,
    stop: Stop,
}

impl LockService {
    /// The service over the member's shared etcd state; `stop` ends waiting requests.
    pub fn new(etcd: Arc<Etcd>, stop: Stop) -> Self {
        LockService { etcd, stop }
    }
}

#[tonic::async_trait]
impl lk::lock_server::Lock for LockService {
    async fn lock(
        &self,
        request: Request<lk::LockRequest>,
    ) -> Result<Response<lk::LockResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return lk::lock_client::LockClient::new(channel)
                .lock(onward(request))
                .await;
        }
        may_use(
            &request,
            &request.get_ref().name,
            &[Access::Read, Access::Write],
        )?;
        let r = request.into_inner();
        let held = contend(&self.etcd, &self.stop, &r.name, r.lease, b"").await?;
        Ok(Response::new(lk::LockResponse {
            header: self.etcd.responder().header(held.token),
            key: held.key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<lk::UnlockRequest>,
    ) -> Result<Response<lk::UnlockResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return lk::lock_client::LockClient::new(channel)
                .unlock(onward(request))
                .await;
        }
        may_write(&request, &request.get_ref().key)?;
        let answer = self
            .etcd
            .backend
            .delete_range(DeleteRangeRequest::key(request.into_inner().key))
            .await
            .map_err(status)?;
        Ok(Response::new(lk::UnlockResponse {
            header: self.etcd.responder().header(answer.revision),
        }))
    }
}

/// etcd's Election service of one member.
pub struct ElectionService {
    etcd: Arc<Etcd>,
    stop: Stop,
}

impl ElectionService {
    /// The service over the member's shared etcd state; `stop` ends waiting campaigns
    /// and observations.
    pub fn new(etcd: Arc<Etcd>, stop: Stop) -> Self {
        ElectionService { etcd, stop }
    }

    fn client(
        channel: tonic::transport::Channel,
    ) -> el::election_client::ElectionClient<tonic::transport::Channel> {
        el::election_client::ElectionClient::new(channel)
    }
}

fn held_of(leader: Option<el::LeaderKey>) -> Result<(Held, i64), Status> {
    let leader =
        leader.ok_or_else(|| Status::invalid_argument("etcdserver: no leader key given"))?;
    Ok((
        Held {
            key: leader.key,
            token: leader.rev,
        },
        leader.lease,
    ))
}

/// The stream of an Observe.
type Observed = Pin<Box<dyn Stream<Item = Result<el::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl el::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<el::CampaignRequest>,
    ) -> Result<Response<el::CampaignResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).campaign(onward(request)).await;
        }
        may_use(
            &request,
            &request.get_ref().name,
            &[Access::Read, Access::Write],
        )?;
        let r = request.into_inner();
        let held = contend(&self.etcd, &self.stop, &r.name, r.lease, &r.value).await?;
        Ok(Response::new(el::CampaignResponse {
            header: self.etcd.responder().header(held.token),
            leader: Some(el::LeaderKey {
                name: r.name,
                key: held.key,
                rev: held.token,
                lease: r.lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<el::ProclaimRequest>,
    ) -> Result<Response<el::ProclaimResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).proclaim(onward(request)).await;
        }
        if let Some(leader) = &request.get_ref().leader {
            may_write(&request, &leader.key)?;
        }
        let r = request.into_inner();
        let (held, lease) = held_of(r.leader)?;
        let kv = &self.etcd.backend;
        if !concurrency::proclaim(kv, &held, lease, &r.value)
            .await
            .map_err(status)?
        {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(Response::new(el::ProclaimResponse {
            header: self.etcd.responder().header(kv.local_revision()),
        }))
    }

    async fn leader(
        &self,
        request: Request<el::LeaderRequest>,
    ) -> Result<Response<el::LeaderResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).leader(onward(request)).await;
        }
        may_use(&request, &request.get_ref().name, &[Access::Read])?;
        let prefix = prefix_of(&request.into_inner().name);
        let (first, revision) = first_in_line(&self.etcd.backend, &prefix)
            .await
            .map_err(status)?;
        let kv = first.ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(el::LeaderResponse {
            header: self.etcd.responder().header(revision),
            kv: Some(kv.into()),
        }))
    }

    type ObserveStream = Observed;

    /// The leader now (once there is one) and at every change of leader or value,
    /// until the client goes.
    async fn observe(
        &self,
        request: Request<el::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let (out, observed) = tokio::sync::mpsc::channel(16);
        let stop = self.stop.clone();
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            let mut relayed = Self::client(channel)
                .observe(onward(request))
                .await?
                .into_inner();
            tokio::spawn(async move {
                loop {
                    let message = tokio::select! {
                        message = relayed.message() => message,
                        () = stopped(stop.clone()) => Err(STOPPED.status()),
                    };
                    let end = !matches!(message, Ok(Some(_)));
                    let Some(message) = message.transpose() else {
                        return;
                    };
                    if out.send(message).await.is_err() || end {
                        return;
                    }
                }
            });
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(observed),
            )));
        }
        may_use(&request, &request.get_ref().name, &[Access::Read])?;
        let metadata = request.metadata().clone();
        let prefix = prefix_of(&request.into_inner().name);
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            let kv = &etcd.backend;
            let fail = |e| Err(status(e));
            let (mut first, revision) = match first_in_line(kv, &prefix).await {
                Ok(found) => found,
                Err(e) => return drop(out.send(fail(e)).await),
            };
            let mut changes = match kv
                .watch(WatchRequest::prefix(prefix.clone()).from_revision(revision + 1))
                .await
            {
                Ok(stream) => stream,
                Err(e) => return drop(out.send(fail(e)).await),
            };
            let mut last: Option<(Vec<u8>, i64)> = None;
            loop {
                if let Some(leader) = first.take() {
                    let now = (leader.key.clone(), leader.mod_revision);
                    if last.as_ref() != Some(&now) {
                        last = Some(now);
                        let answer = el::LeaderResponse {
                            header: etcd.responder().header(leader.mod_revision),
                            kv: Some(leader.into()),
                        };
                        if out.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    change = changes.next() => match change {
                        Some(Ok(WatchResponse::Events { .. })) => {}
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return drop(out.send(fail(e)).await),
                        None => return,
                    },
                    () = out.closed() => return,
                    () = stopped(stop.clone()) => {
                        let _ = out.try_send(Err(STOPPED.status()));
                        return;
                    }
                }
                first = match first_in_line(kv, &prefix).await {
                    Ok((found, _)) => found,
                    Err(e) => return drop(out.send(fail(e)).await),
                };
            }
        });
        let observed = Box::pin(tokio_stream::wrappers::ReceiverStream::new(observed));
        Ok(Response::new(self.etcd.require_leader(&metadata, observed)))
    }

    async fn resign(
        &self,
        request: Request<el::ResignRequest>,
    ) -> Result<Response<el::ResignResponse>, Status> {
        if let Route::Leader(channel) = self.etcd.forward.route(&request).await? {
            return Self::client(channel).resign(onward(request)).await;
        }
        if let Some(leader) = &request.get_ref().leader {
            may_write(&request, &leader.key)?;
        }
        let (held, _) = held_of(request.into_inner().leader)?;
        let kv = &self.etcd.backend;
        concurrency::leave(kv, &held).await.map_err(status)?;
        Ok(Response::new(el::ResignResponse {
            header: self.etcd.responder().header(kv.local_revision()),
        }))
    }
}
