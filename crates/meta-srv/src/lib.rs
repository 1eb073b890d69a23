//! `meta-srv`: the Metasrv server. The binary `meta-srv` starts it; `metactl` steers it.
//!
//! The library exists so tests (and embedders) can run a server in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), meta_srv::Error> {
//! use meta_srv::{Config, MetaSrv};
//! let config = Config { data_dir: "/tmp/meta".into(), ..Config::default() };
//! let server = MetaSrv::bind(config).await?;
//! println!("gRPC on {}", server.grpc_addr());
//! server.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```
//!
//! **Invariant:** requests reach storage only through `common_meta::kv::KvBackend`.

pub mod auth;
pub mod backup;
pub mod cli;
pub mod cluster_plane;
pub mod coalesce;
pub mod compactor;
pub mod config;
pub mod data_dir;
pub mod error;
pub mod etcd;
pub mod http;
pub mod identity;
pub mod lease_keeper;
pub mod metrics;
pub mod procedure_host;
pub mod procedures;
pub mod raft;
pub mod routes;
pub mod server;
pub mod service;
pub mod session_keeper;
pub mod tls;
pub mod tso;

pub use config::Config;
pub use error::{Error, Result};
pub use server::MetaSrv;
