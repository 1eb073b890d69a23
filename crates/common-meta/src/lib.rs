//! `common-meta`: what every Metasrv component shares: the etcd-like [`kv::KvBackend`]
//! abstraction with its memory and sled backends, typed metadata [`key`]s, and the one
//! set of conversions between wire and domain types ([`rpc`]).
//!
//! A short tour: open a backend, write, read back with per-key metadata.
//!
//! ```
//! use common_meta::kv::{KvBackend, MemoryKvBackend, PutRequest, RangeRequest};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let kv = MemoryKvBackend::default();
//! let put = kv.put(PutRequest::new(b"__node/1".to_vec(), b"{}".to_vec())).await?;
//! assert_eq!(put.revision, 1);
//! let got = kv.range(RangeRequest::prefix(b"__node/".to_vec())).await?;
//! assert_eq!(got.kvs[0].version, 1);
//! # Ok::<(), common_meta::Error>(())
//! # }).unwrap();
//! ```
//!
//! **Invariant:** `common-meta` does no network IO; it depends on no server or client crate.

pub mod auth;
pub mod concurrency;
pub mod error;
pub mod hex;
pub mod key;
pub mod kv;
pub mod manager;
pub mod model;
pub mod route_table;
pub mod rpc;
mod signed;
pub mod state_store;
pub mod time;

pub use error::{Error, Result};
