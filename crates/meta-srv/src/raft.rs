//! The replicated core: one raft group (raft-rs `RawNode`) replicating the KV state
//! machine (`common_meta::kv::SledKvStore`), log and state in one sled database.
//!
//! | module | what |
//! | --- | --- |
//! | `log_store` | raft-rs `Storage` on sled; contract in its doc |
//! | `driver` | the thread that owns the `RawNode`: `on_ready` order, proposals, reads, fail-stop |
//! | `persist` | the log writer thread: group-commit fsync of the driver's writes (async ready) |
//! | `apply` | the apply thread: committed entries applied in batches, proposers answered |
//! | `backend` | `RaftKvBackend`: propose writes, ReadIndex reads |
//! | `transport` | the `Transport` seam and the fault-injecting `LocalRouter` |
//! | `grpc_transport` | `GrpcTransport`: per-peer batching streams with reconnect |
//! | `members` | member ids -> addresses, replicated with conf changes, persisted |
//! | `snapshot` | snapshots as files: exports built off the driver thread, streamed in chunks, resumed after a break |
//! | `slog_bridge` | raft-rs's slog records into tracing |
//! | `versions` | peers' data format versions and the cluster version |
//!
//! A single member is a one-voter group on the same code path.

pub mod apply;
pub mod backend;
pub mod driver;
pub mod grpc_transport;
pub mod log_store;
pub mod members;
pub mod persist;
pub mod slog_bridge;
pub mod snapshot;
pub mod transport;
pub mod versions;
