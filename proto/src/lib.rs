//! The `meta.v1` wire of Metasrv: messages and gRPC services generated from the
//! `.proto` files under `proto/meta/v1/` at build time (no system `protoc` needed).
//!
//! Wire formats are forever: never renumber or reuse a field. Conversions between
//! these types and the domain types live in `common-meta` (`common_meta::rpc`), once.
//!
//! ```
//! use meta_proto::v1::{KeyValue, PutRequest};
//! let put = PutRequest { key: b"a".to_vec(), value: b"1".to_vec(), ..Default::default() };
//! assert_eq!(put.key, b"a");
//! let _ = KeyValue::default();
//! ```

/// gRPC metadata key under which a member that is not the leader names the leader's
/// address (`host:port`) in an `UNAVAILABLE` answer; clients go there directly.
pub const LEADER_HINT: &str = "x-metasrv-leader";

/// gRPC metadata key by which a server says what became of a failed request's write:
/// [`OUTCOME_NOT_APPLIED`], [`OUTCOME_UNKNOWN`] or [`OUTCOME_SESSION_EXPIRED`].
pub const OUTCOME: &str = "x-metasrv-outcome";

/// Nothing was proposed (not the leader, or the member cannot serve): send it again.
pub const OUTCOME_NOT_APPLIED: &str = "not-applied";

/// The write was proposed and may or may not be applied: send it again only with the
/// same session and seq.
pub const OUTCOME_UNKNOWN: &str = "unknown";

/// The write named a session that is not open; it was not applied.
pub const OUTCOME_SESSION_EXPIRED: &str = "session-expired";

/// Generated messages and services of package `meta.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("meta.v1");
}

/// etcd's v3 client API as etcd's tools and client libraries speak it, generated from
/// our declarations of its wire under `proto/etcd/` (the release they match is in
/// this crate's AGENTS.md). `meta-srv` serves it beside `meta.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod etcd {
    /// Package `mvccpb`: `KeyValue` and the watch `Event`.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// Package `authpb`: users, roles, permissions.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    /// Package `etcdserverpb`: the KV, Watch, Lease, Cluster, Maintenance and Auth
    /// services and their messages.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// Package `v3lockpb`: the Lock service (locks held by a lease).
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    /// Package `v3electionpb`: the Election service.
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
