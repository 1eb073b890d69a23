//! Assembles a running meta-srv: data directory, store, gRPC and HTTP listeners.
//!
//! [`MetaSrv::bind`] does everything that can fail at start-up (lock the directory, open
//! the store, bind both ports) so that errors surface before anything is served;
//! [`MetaSrv::serve`] runs until the injected `shutdown` future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use common_meta::kv::{KvLimits, SledKvBackend};
use meta_proto::v1::store_server::StoreServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::http::{self, HttpState};
use crate::service::store::StoreService;

/// A meta-srv whose resources are acquired and whose ports are bound.
pub struct MetaSrv {
    config: Config,
    data_dir: DataDir,
    backend: Arc<SledKvBackend>,
    grpc: TcpListener,
    http: TcpListener,
}

impl MetaSrv {
    /// Locks the data directory, opens the store and binds both listeners.
    pub async fn bind(config: Config) -> Result<MetaSrv> {
        let data_dir = DataDir::open(&config.data_dir)?;
        let kv_path = data_dir.kv_path();
        let limits = KvLimits::from(config.limits);
        // Opening sled reads its files: keep it off the reactor.
        let backend = tokio::task::spawn_blocking(move || SledKvBackend::open(kv_path, limits))
            .await
            .map_err(|e| Error::Serve {
                what: "store",
                message: e.to_string(),
            })??;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let grpc = bind("gRPC", config.listen_addr).await?;
        let http = bind("HTTP", config.http_addr).await?;
        Ok(MetaSrv {
            config,
            data_dir,
            backend: Arc::new(backend),
            grpc,
            http,
        })
    }

    /// The bound gRPC address (the real port when the config asked for port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        local_addr(&self.grpc, self.config.listen_addr)
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        local_addr(&self.http, self.config.http_addr)
    }

    /// Serves gRPC and HTTP until `shutdown` completes, then drains both and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let limits = KvLimits::from(self.config.limits);
        let member_id = self.config.node_id;
        let store = StoreService::new(self.backend.clone(), member_id, limits);
        // Let oversized requests through decoding (up to 4x the limit) so that the
        // service can refuse them with InvalidArgument naming max_request_bytes.
        let store = StoreServer::new(store)
            .max_decoding_message_size(limits.max_request_bytes.saturating_mul(4));
        let grpc = tonic::transport::Server::builder()
            .add_service(store)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(self.grpc).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            );
        let router = http::router(Arc::new(HttpState {
            member_id,
            backend: self.backend.clone(),
        }));
        let http = axum::serve(self.http, router).with_graceful_shutdown(stopped(stop_rx));

        tracing::info!(
            member_id,
            data_dir = %self.data_dir.path().display(),
            revision = self.backend.revision(),
            "meta-srv serving"
        );
        let (grpc, http) = tokio::join!(grpc, http);
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
