//! etcd's v3 client API on the client port, beside `meta.v1`: a thin adapter over the
//! same KV, watch and lease core, so etcd's tools and client libraries work against a
//! Metasrv cluster. No semantic is implemented twice: requests are checked as etcd
//! checks them ([`check`]), translated (`common_meta::rpc::etcd`), run by the member's
//! [`RaftKvBackend`], and answered with etcd's header and error texts ([`status`]).
//!
//! etcd clients never follow a leader hint: a member that does not lead sends what
//! needs the leader (writes, linearizable reads) on to it itself ([`forward`]).

pub mod auth;
pub mod check;
pub mod cluster;
pub mod forward;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod status;
pub mod watch;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::KvLimits;
use common_meta::rpc::etcd::Responder;
use meta_proto::etcd::etcdserverpb as epb;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Router;

use crate::raft::backend::RaftKvBackend;
use crate::raft::driver::{DriverHandle, RaftView};
use crate::raft::members::Members;

/// A server stream of one of etcd's services.
pub type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

/// What every etcd service of a member shares.
pub struct Etcd {
    /// The member's KV backend.
    pub backend: RaftKvBackend,
    /// The member's raft driver (status, membership, leadership).
    pub driver: DriverHandle,
    /// Member ids and addresses.
    pub members: Arc<Members>,
    /// The version `Status` reports (`[etcd] version`).
    pub version: String,
    /// The leader and term this member knows.
    pub view: Arc<RaftView>,
    /// The cluster's id (etcd's header names it).
    pub cluster_id: u64,
    /// This member.
    pub member_id: u64,
    /// The request limits (etcd's `--max-txn-ops`, `--max-request-bytes`).
    pub limits: KvLimits,
    /// Sends requests that need the leader on to it.
    pub forward: forward::Forward,
    /// How long a stream whose client asked for a leader (`hasleader`) goes on while
    /// this member knows none: three election timeouts, as etcd checks.
    pub leaderless_grace: Duration,
    /// How long a token from `Authenticate` is valid.
    pub token_ttl: Duration,
}

impl Etcd {
    /// The shared state of the etcd services of member `member_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: RaftKvBackend,
        driver: DriverHandle,
        view: Arc<RaftView>,
        members: Arc<Members>,
        cluster_id: u64,
        member_id: u64,
        limits: KvLimits,
        version: String,
        election_timeout: Duration,
        tls: Arc<crate::tls::PeerTls>,
        token_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Etcd {
            forward: forward::Forward::new(view.clone(), members.clone(), member_id, tls),
            backend,
            driver,
            members,
            version,
            view,
            cluster_id,
            member_id,
            limits,
            leaderless_grace: election_timeout * 3,
            token_ttl,
        })
    }

    /// `stream`, ended with etcd's "no leader" once this member has known no leader
    /// for [`Etcd::leaderless_grace`], when the client asked for that (`hasleader`
    /// metadata, as etcd's `WithRequireLeader` sends); as it is otherwise.
    pub fn require_leader<T: Send + 'static>(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        stream: Streamed<T>,
    ) -> Streamed<T> {
        if !metadata.contains_key(forward::HAS_LEADER) {
            return stream;
        }
        let (view, grace) = (self.view.clone(), self.leaderless_grace);
        let (out, relayed) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut stream = stream;
            let lost = view.leaderless_for(grace);
            tokio::pin!(lost);
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(item) => {
                            if out.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    () = &mut lost => {
                        let _ = out.send(Err(status::NO_LEADER.status())).await;
                        return;
                    }
                    () = out.closed() => return,
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(relayed))
    }

    /// Who answers, for etcd's response header.
    pub fn responder(&self) -> Responder {
        Responder {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            raft_term: self.view.term(),
        }
    }

    /// `router` serving etcd's services too; `stop` ends their streams when the member
    /// stops. Requests may be up to four times the size limit on the wire, so that an
    /// oversized one gets etcd's "request is too large" rather than a transport error.
    pub fn serve_on<L>(
        self: &Arc<Self>,
        router: Router<L>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Router<L> {
        let decodable = self.limits.max_request_bytes.saturating_mul(4);
        router
            .add_service(
                epb::kv_server::KvServer::new(kv::KvService::new(self.clone()))
                    .max_decoding_message_size(decodable),
            )
            .add_service(epb::watch_server::WatchServer::new(
                watch::WatchService::new(self.clone(), stop.clone()),
            ))
            .add_service(epb::lease_server::LeaseServer::new(
                lease::LeaseService::new(self.clone(), stop.clone()),
            ))
            .add_service(epb::maintenance_server::MaintenanceServer::new(
                maintenance::MaintenanceService::new(self.clone()),
            ))
            .add_service(epb::cluster_server::ClusterServer::new(
                cluster::ClusterService::new(self.clone()),
            ))
            .add_service(epb::auth_server::AuthServer::new(auth::AuthService::new(
                self.clone(),
                self.token_ttl,
            )))
            .add_service(meta_proto::etcd::v3lockpb::lock_server::LockServer::new(
                lock::LockService::new(self.clone(), stop.clone()),
            ))
            .add_service(
                meta_proto::etcd::v3electionpb::election_server::ElectionServer::new(
                    lock::ElectionService::new(self.clone(), stop.clone()),
                ),
            )
    }
}
