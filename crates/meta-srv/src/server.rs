//! Assembles a running meta-srv: data directory, raft member, gRPC and HTTP listeners.
//!
//! [`MetaSrv::bind`] does everything that can fail at start-up (lock the directory,
//! check its cluster identity, open the database, bind both ports, start the raft
//! driver) so that errors surface before anything is served; [`MetaSrv::serve`] runs
//! until the injected `shutdown` future completes. A single member is a one-voter raft
//! group: the same code path as a cluster.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::{KvLimits, SledKvStore};
use common_meta::model::node::NodeManager;
use meta_proto::v1::cluster_server::ClusterServer;
use meta_proto::v1::heartbeat_server::HeartbeatServer;
use meta_proto::v1::procedure_server::ProcedureServer;
use meta_proto::v1::store_server::StoreServer;
use meta_proto::v1::watch_server::WatchServer;
use procedure::ManagerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tonic::transport::server::TcpIncoming;

use crate::coalesce::Coalesced;

use crate::cluster_plane::heartbeat_chain::{self, ClusterPlane};
use crate::cluster_plane::live_nodes::LiveNodes;
use crate::cluster_plane::node_mailbox::NodeMailbox;
use crate::cluster_plane::region_lease::{LeaseConfig, LeaseLedger};
use crate::cluster_plane::selector::Selector;
use crate::cluster_plane::supervisor::Supervisor;
use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::http::{self, HttpState};
use crate::identity::check_identity;
use crate::procedure_host::ProcedureHost;
use crate::procedures::ddl::context::DdlContext;
use crate::raft::backend::{FeatureGate, RaftKvBackend};
use crate::raft::driver::{RaftNode, RaftSettings};
use crate::raft::grpc_transport::GrpcTransport;
use crate::raft::members::Members;
use crate::raft::snapshot::{STREAMED_SNAPSHOTS, SnapshotFiles};
use crate::raft::versions::PeerVersions;
use crate::service::cluster::ClusterService;
use crate::service::ddl::DdlService;
use crate::service::heartbeat::{HeartbeatApi, HeartbeatService};
use crate::service::procedure::ProcedureService;
use crate::service::region::RegionService;
use crate::service::store::StoreService;
use crate::session_keeper::SessionKeeper;
use common_meta::manager::{CatalogManager, TableMetadataManager};
use common_meta::model::join_token::JoinTokens;
use common_meta::model::sequence::Sequences;
use common_meta::time::unix_ms;
use meta_proto::v1::ddl_server::DdlServer;
use meta_proto::v1::region_server::RegionServer;
use meta_proto::v1::route_catalog_server::RouteCatalogServer;

use crate::procedures::route::RouteContext;
use crate::service::route::RouteService;
use common_meta::manager::route::RouteCatalogManager;

/// Largest raft batch a member accepts from a peer: a snapshot travels in one message.
const MAX_RAFT_BATCH_BYTES: usize = 1024 * 1024 * 1024;

/// A meta-srv whose resources are acquired, whose ports are bound and whose raft member
/// is running.
pub struct MetaSrv {
    config: Config,
    data_dir: DataDir,
    cluster_id: u64,
    members: Arc<Members>,
    store: Arc<SledKvStore>,
    /// Peers' data format versions, from their raft batches.
    versions: Arc<PeerVersions>,
    snapshots: Arc<SnapshotFiles>,
    node: RaftNode,
    backend: RaftKvBackend,
    procedures: Arc<ProcedureHost>,
    plane: Arc<ClusterPlane>,
    ddl: Arc<DdlContext>,
    supervisor: Arc<Supervisor>,
    tso: Arc<crate::tso::Oracle>,
    routes: Arc<RouteContext>,
    metrics: Arc<crate::metrics::Metrics>,
    tls: crate::tls::Tls,
    grpc: TcpListener,
    http: TcpListener,
}

fn sled_error(context: &'static str) -> impl FnOnce(sled::Error) -> Error {
    move |source| {
        Error::Meta(common_meta::Error::Storage {
            context: context.to_string(),
            source,
        })
    }
}

impl MetaSrv {
    /// Locks the data directory, checks it belongs to this cluster and member, opens the
    /// database, binds both listeners and starts the raft member.
    pub async fn bind(config: Config) -> Result<MetaSrv> {
        let data_dir = DataDir::open(&config.data_dir)?;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let grpc = bind("gRPC", config.listen_addr).await?;
        let http = bind("HTTP", config.http_addr).await?;
        let grpc_addr = local_addr(&grpc, config.listen_addr);

        let db_path = data_dir.db_path();
        let db = tokio::task::spawn_blocking(move || DataDir::open_database(&db_path))
            .await
            .map_err(|e| Error::Serve {
                what: "store",
                message: e.to_string(),
            })??;
        let node_id = config.node_id;
        let identity = crate::identity::resolve(&config, &db, grpc_addr).await?;
        let (cluster_id, initial, voters) = identity;

        let limits = KvLimits::from(config.limits);
        let dir = data_dir.path().to_path_buf();
        let db_for_store = db.clone();
        let db_dir = data_dir.db_path();
        // Reading and writing the identity and opening the trees touch disk.
        let (store, members) = tokio::task::spawn_blocking(move || -> Result<_> {
            let db = db_for_store;
            check_identity(&db, &dir, cluster_id, node_id)?;
            let store = SledKvStore::open_in(db.clone(), limits)?;
            store.sync_filesystem_of(&db_dir)?;
            let members = Members::open(&store, &db, &initial)?;
            // A joiner must not come back knowing its identity but not its peers.
            db.flush().map_err(sled_error("flushing the member map"))?;
            Ok((Arc::new(store), Arc::new(members)))
        })
        .await
        .map_err(|e| Error::Serve {
            what: "store",
            message: e.to_string(),
        })??;

        let tls = crate::tls::Tls::load(&config.tls)?;
        let transport = Arc::new(
            GrpcTransport::new(
                cluster_id,
                node_id,
                members.clone(),
                tokio::runtime::Handle::current(),
            )
            .with_tls(tls.peers.clone()),
        );
        let versions = Arc::new(PeerVersions::default());
        let snapshots = {
            let (dir, store, versions) =
                (data_dir.snapshot_path(), store.clone(), versions.clone());
            let streams_to = move |to| versions.of(to) >= STREAMED_SNAPSHOTS;
            Arc::new(
                tokio::task::spawn_blocking(move || SnapshotFiles::open(&dir, store, streams_to))
                    .await
                    .map_err(|e| Error::Serve {
                        what: "snapshots",
                        message: e.to_string(),
                    })??,
            )
        };
        let raft = config.raft;
        let raft_metrics = crate::metrics::RaftMetrics::default();
        let settings = RaftSettings {
            metrics: raft_metrics.clone(),
            snapshot_files: Some(snapshots.clone()),
            tick: Duration::from_millis(raft.tick_ms),
            election_ticks: raft.election_ticks,
            heartbeat_ticks: raft.heartbeat_ticks,
            compact_after: raft.compact_after,
            keep_entries: raft.keep_entries,
            ..RaftSettings::new(node_id, voters)
        };
        let node = RaftNode::start(
            settings,
            db,
            store.clone(),
            members.clone(),
            transport.clone(),
        )?;
        transport.report_to(node.driver());
        // Opening the log migrated an older format and started the node flushed it:
        // only now may the directory say it holds the current format.
        data_dir.record_format()?;
        let backend = RaftKvBackend::new(
            node.driver(),
            store.clone(),
            Duration::from_millis(raft.request_timeout_ms),
            node.leadership(),
            config.min_lease_ttl_secs(),
        )
        .with_gate(FeatureGate::new(members.clone(), versions.clone(), node_id));
        let tokens = match config.cluster_secret.as_str() {
            "" => None,
            secret => Some(JoinTokens::new(
                secret.as_bytes(),
                Arc::new(backend.clone()),
            )?),
        };
        let nodes = Arc::new(NodeManager::new(Arc::new(backend.clone())));
        let plane = Arc::new(ClusterPlane {
            nodes: nodes.clone(),
            live: Arc::new(LiveNodes::new(config.failure_detector.into(), unix_ms())),
            outbox: Arc::new(NodeMailbox::default()),
            tokens,
            leases: Arc::new(LeaseLedger::new(
                LeaseConfig {
                    lease_ms: config.region_lease_ms(),
                    deposed_leader_ms: config.deposed_leader_ms(),
                    confirm_ms: config.raft.election_ticks as u64 * config.raft.tick_ms,
                },
                Arc::new(backend.clone()),
            )),
            streams: Default::default(),
            leadership: node.leadership(),
            last_term: Default::default(),
            loads: Default::default(),
            metrics: Default::default(),
        });
        let metrics = Arc::new(crate::metrics::Metrics::new(
            raft_metrics,
            plane.metrics.clone(),
        ));
        let kv: Arc<dyn common_meta::kv::KvBackend> = Arc::new(backend.clone());
        let ddl = Arc::new(DdlContext {
            tables: TableMetadataManager::new(kv.clone(), limits.max_txn_ops),
            catalogs: CatalogManager::new(kv.clone()),
            nodes,
            plane: plane.clone(),
            ids: Arc::new(Sequences::new(kv.clone(), config.metadata.id_batch)),
            ids_term: Default::default(),
            selector: Selector::new(config.metadata.selector),
            config: config.metadata,
            step_retries: ManagerConfig::default().max_retries,
            limits,
        });
        let routes = Arc::new(RouteContext::new(
            RouteCatalogManager::new(kv.clone()).with_initial_group(config.routes.initial_group),
            plane.clone(),
            Duration::from_millis(config.metadata.region_timeout_ms),
            Duration::from_millis(config.failover.migration_timeout_ms),
        ));
        // The leader's manager runs the DDL, region and route procedures, and recovers
        // unfinished ones.
        let registry = {
            let (ddl, routes) = (ddl.clone(), routes.clone());
            Arc::new(move |manager: &procedure::ProcedureManager| {
                crate::procedures::ddl::register(manager, &ddl)?;
                crate::procedures::region::register(manager, &ddl)?;
                crate::procedures::route::register(manager, &routes)
            })
        };
        let procedures = Arc::new(ProcedureHost::start(
            node.leadership(),
            kv.clone(),
            limits,
            ManagerConfig::default(),
            registry,
        ));
        // Ticks a few times per heartbeat interval, at most every second.
        let tick = Duration::from_millis((config.heartbeat_interval_ms / 2).clamp(50, 1_000));
        let supervisor = Arc::new(Supervisor::new(
            ddl.clone(),
            procedures.clone(),
            kv,
            (config.failover, config.balancer),
            tick,
        ));
        let tso = Arc::new(crate::tso::Oracle::new(
            backend.clone(),
            Arc::new(crate::tso::SystemClock),
            config.tso.save_interval_ms,
        ));
        Ok(MetaSrv {
            tso,
            routes,
            metrics,
            tls,
            config,
            data_dir,
            cluster_id,
            members,
            store,
            versions,
            snapshots,
            node,
            backend,
            procedures,
            plane,
            ddl,
            supervisor,
            grpc,
            http,
        })
    }

    /// The bound gRPC address (the real port when the config asked for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.grpc, self.config.listen_addr)
    }

    /// This member's timestamp oracle (tests step its clock).
    pub fn tso(&self) -> Arc<crate::tso::Oracle> {
        self.tso.clone()
    }

    /// This member's snapshot files: what it has received, for status and tests.
    pub fn snapshot_files(&self) -> Arc<SnapshotFiles> {
        self.snapshots.clone()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        local_addr(&self.http, self.config.http_addr)
    }

    /// This cluster's id.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// What this member knows of heartbeating nodes, and the mailbox to them (it
    /// answers while this member leads).
    pub fn cluster_plane(&self) -> Arc<ClusterPlane> {
        self.plane.clone()
    }

    /// `Some(reason)` once this member has failed (see `RaftNode::failure`).
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.node.failure()
    }

    /// The queue of this member's raft driver (status, and fault injection in tests).
    pub fn raft_driver(&self) -> crate::raft::driver::DriverHandle {
        self.node.driver()
    }

    /// The leader-only procedure manager of this member.
    pub fn procedures(&self) -> Arc<ProcedureHost> {
        self.procedures.clone()
    }

    /// Serves gRPC and HTTP until `shutdown` completes, then drains both, stops the raft
    /// member and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let on_shutdown = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = on_shutdown.send(true);
        });
        // Fail-stop: a driver that failed (storage, panic) stops the whole server, which
        // then returns the failure (the binary exits non-zero).
        let mut failure = self.node.failure();
        let on_failure = stop_tx.clone();
        tokio::spawn(async move {
            if failure.wait_for(Option::is_some).await.is_ok() {
                let _ = on_failure.send(true);
            }
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let limits = KvLimits::from(self.config.limits);
        let member_id = self.config.node_id;
        let sessions = Arc::new(SessionKeeper::new(
            self.backend.clone(),
            self.node.leadership(),
        ));
        {
            let sessions = sessions.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move { sessions.run(stop).await });
        }
        {
            let keeper = crate::lease_keeper::LeaseKeeper::new(
                self.backend.clone(),
                self.config.election_timeout(),
                Duration::from_millis(self.config.lease.checkpoint_ms),
            )
            .counting(self.metrics.plane.leases_expired.clone());
            tokio::spawn(keeper.run(stop_rx.clone()));
        }
        // Validated with the rest of the configuration before the server starts.
        if let Ok(Some(retention)) = self.config.compaction.retention() {
            let compactor = crate::compactor::Compactor::new(
                self.backend.clone(),
                self.node.leadership(),
                retention,
            );
            tokio::spawn(compactor.run(stop_rx.clone()));
        }
        tokio::spawn(self.tso.clone().run(stop_rx.clone()));
        tokio::spawn(crate::cluster_plane::hotspot::run(
            self.routes.clone(),
            (self.procedures.clone(), self.supervisor.clone()),
            self.config.routes,
            self.node.leadership(),
            stop_rx.clone(),
        ));
        let tso = meta_proto::v1::tso_server::TsoServer::new(crate::service::tso::TsoService::new(
            self.tso.clone(),
            self.node.driver(),
            member_id,
            self.members.clone(),
            stop_rx.clone(),
        ));
        let store = StoreService::new(
            self.backend.clone(),
            sessions,
            self.node.driver(),
            member_id,
            limits,
            self.members.clone(),
        );
        // Let oversized requests through decoding (up to 4x the limit) so that the
        // service can refuse them with InvalidArgument naming max_request_bytes.
        let store = StoreServer::new(store)
            .max_decoding_message_size(limits.max_request_bytes.saturating_mul(4));
        let leases = meta_proto::v1::lease_server::LeaseServer::new(
            crate::service::lease::LeaseService::new(
                self.backend.clone(),
                self.node.driver(),
                member_id,
                self.members.clone(),
                stop_rx.clone(),
            ),
        );
        let watch = WatchServer::new(crate::service::watch::WatchService::new(
            self.backend.clone(),
            member_id,
            stop_rx.clone(),
        ));
        // Raft batches can carry a whole state-machine snapshot.
        let cluster = ClusterServer::new(ClusterService::new(
            self.cluster_id,
            member_id,
            self.node.driver(),
            self.members.clone(),
            self.versions.clone(),
            stop_rx.clone(),
            Some(self.snapshots.clone()),
        ))
        .max_decoding_message_size(MAX_RAFT_BATCH_BYTES);
        let procedures = ProcedureServer::new(ProcedureService::new(
            member_id,
            self.procedures.clone(),
            self.node.driver(),
            self.members.clone(),
        ));
        // A new term starts from the next heartbeats, never from an old leader's view,
        // and its sequences start above everything reserved before.
        let mut leadership = self.node.leadership();
        let plane = self.plane.clone();
        let ddl = self.ddl.clone();
        tokio::spawn(async move {
            while leadership.changed().await.is_ok() {
                let term = *leadership.borrow_and_update();
                plane.leadership_changed(term, unix_ms());
                ddl.ids.reset();
            }
        });
        let ddl = DdlServer::new(DdlService {
            member_id,
            host: self.procedures.clone(),
            driver: self.node.driver(),
            members: self.members.clone(),
            ctx: self.ddl.clone(),
            limits,
        });
        // etcd's v3 API over the same backend (see `etcd.rs`).
        let etcd = crate::etcd::Etcd::new(
            self.backend.clone(),
            self.node.driver(),
            self.node.view(),
            self.members.clone(),
            self.cluster_id,
            member_id,
            limits,
            self.config.etcd.version.clone(),
            Duration::from_millis(
                self.config.raft.tick_ms * self.config.raft.election_ticks as u64,
            ),
            self.tls.peers.clone(),
            Duration::from_secs(self.config.auth.token_ttl_secs),
        );
        let supervising = self.supervisor.clone().start(self.node.leadership());
        let regions = RegionServer::new(RegionService {
            member_id,
            host: self.procedures.clone(),
            driver: self.node.driver(),
            members: self.members.clone(),
            ctx: self.ddl.clone(),
            supervisor: self.supervisor.clone(),
            migration_timeout: Duration::from_millis(self.config.failover.migration_timeout_ms),
        });
        let routes = RouteCatalogServer::new(RouteService {
            member_id,
            host: self.procedures.clone(),
            driver: self.node.driver(),
            members: self.members.clone(),
            ctx: self.routes.clone(),
        });
        let heartbeats = HeartbeatServer::new(HeartbeatApi::from(HeartbeatService {
            member_id,
            driver: self.node.driver(),
            members: self.members.clone(),
            leadership: self.node.leadership(),
            plane: self.plane.clone(),
            chain: heartbeat_chain::chain(),
            interval_ms: self.config.heartbeat_interval_ms,
            stop: stop_rx.clone(),
        }));
        // Keepalives find half-open connections (a node's machine gone without a FIN),
        // so their streams end instead of lingering attached.
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls.server.clone() {
            builder = builder.tls_config(tls).map_err(|e| Error::Serve {
                what: "gRPC",
                message: format!("TLS: {e}"),
            })?;
        }
        let grpc = builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .layer(crate::metrics::GrpcLayer(self.metrics.grpc.clone()))
            .layer(crate::auth::AuthLayer::new(self.store.clone()))
            .add_service(store)
            .add_service(watch)
            .add_service(leases)
            .add_service(tso)
            .add_service(cluster)
            .add_service(procedures)
            .add_service(heartbeats)
            .add_service(ddl)
            .add_service(regions)
            .add_service(routes);
        let grpc = etcd
            .serve_on(grpc, stop_rx.clone())
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.grpc)
                    .with_nodelay(Some(true))
                    .map(|conn| conn.map(Coalesced::new)),
                stopped(stop_rx.clone()),
            );
        let router = http::router(Arc::new(HttpState {
            failure: self.node.failure(),
            member_id,
            cluster_id: self.cluster_id,
            store: self.store.clone(),
            driver: self.node.driver(),
            members: self.members.clone(),
            plane: self.plane.clone(),
            leadership: self.node.leadership(),
            tables: self.ddl.tables.clone(),
            supervisor: self.supervisor.clone(),
            routes: self.routes.clone(),
            metrics: self.metrics.clone(),
            procedures: self.procedures.clone(),
            config: Arc::new(self.config.clone()),
        }));
        let http: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
            match self.tls.http.clone() {
                Some(config) => {
                    let listener =
                        crate::tls::HttpsListener::new(self.http, config).map_err(|e| {
                            Error::Serve {
                                what: "HTTPS",
                                message: e.to_string(),
                            }
                        })?;
                    Box::pin(
                        axum::serve(listener, router)
                            .with_graceful_shutdown(stopped(stop_rx))
                            .into_future(),
                    )
                }
                None => Box::pin(
                    axum::serve(self.http, router)
                        .with_graceful_shutdown(stopped(stop_rx))
                        .into_future(),
                ),
            };

        if self.store.auth().enabled && self.config.tls.client_ca_file.as_os_str().is_empty() {
            tracing::warn!(
                "auth is enabled without mutual TLS: clients need a user, but raft traffic is authenticated only by the cluster id, which is no secret; set [tls] client_ca_file on an untrusted network"
            );
        }
        tracing::info!(
            member_id,
            cluster_id = format!("{:016x}", self.cluster_id),
            members = ?self.members.all(),
            data_dir = %self.data_dir.path().display(),
            revision = self.store.revision(),
            "meta-srv serving"
        );
        let (grpc, http) = tokio::join!(grpc, http);
        supervising.abort();
        let failed = self.node.failure().borrow().clone();
        if let Some(reason) = failed {
            // Leave the storage as it is: sled flushes when its last handle drops, and a
            // flush on a full or broken disk waits forever. The caller exits.
            std::mem::forget((
                self.node,
                self.store,
                self.backend,
                self.plane,
                self.procedures,
                self.members,
                self.ddl,
                self.supervisor,
            ));
            return Err(Error::Failed { reason });
        }
        drop(self.procedures);
        // Stop the driver (it joins its thread) off the reactor.
        let node = self.node;
        let _ = tokio::task::spawn_blocking(move || drop(node)).await;
        grpc.map_err(|e| Error::Serve {
            what: "gRPC",
            message: e.to_string(),
        })?;
        http.map_err(|e| Error::Serve {
            what: "HTTP",
            message: e.to_string(),
        })?;
        tracing::info!("meta-srv stopped");
        Ok(())
    }
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    // local_addr only fails on an unbound socket, which a bound listener never is.
    listener.local_addr().unwrap_or(configured)
}
