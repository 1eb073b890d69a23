//! `meta-client`: the typed async client of Metasrv, for datanodes, frontends and tools.
//!
//! [`MetaClient`] holds a list of endpoints, retries unavailable ones with backoff within
//! a deadline, and implements `common_meta::kv::KvBackend`, so code written against the
//! KV abstraction runs unchanged against a live server.
//!
//! ```no_run
//! use common_meta::kv::{KvBackend, PutRequest};
//! use meta_client::{MetaClient, MetaClientOptions};
//! # async fn demo() -> Result<(), common_meta::Error> {
//! let client = MetaClient::new(&["127.0.0.1:3002"], MetaClientOptions::default())?;
//! client.put(PutRequest::new(b"greeting".to_vec(), b"hello".to_vec())).await?;
//! let kv = client.get(b"greeting").await?.expect("just written");
//! assert_eq!(kv.value, b"hello");
//! # Ok(()) }
//! ```
//!
//! Errors are `common_meta::Error`: the `KvBackend` seam fixes the type, and a second
//! enum would only be converted back into it.
//!
//! **Invariant:** `meta-client` never depends on `meta-srv`.

pub mod auth;
mod client;
pub mod concurrency;
mod ddl;
mod heartbeat;
mod kv;
mod lease;
mod region;
pub mod region_lease;
mod route;
mod session;
pub mod sim;
mod status;
pub mod table_cache;
pub mod tso;
mod watch;

pub use auth::{Conn, Credentials};
pub use client::{ClientTls, MetaClient, MetaClientOptions};
pub use ddl::DdlAnswer;
pub use heartbeat::{
    HeartbeatState, HeartbeatTask, InstructionHandler, NodeIdentity, RttObserver, StatsProvider,
    stats_delta,
};
pub use lease::{LeaseKeeper, LeaseState};
pub use region_lease::{LeaseEvent, LeaseObserver, LeaseRole, RegionLeaseKeeper, RoleChange};
pub use route::RouteChangeAnswer;
pub use tso::TsoClient;
