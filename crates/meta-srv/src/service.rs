//! gRPC services of `meta.v1`, thin adapters from the wire to the backends.

pub mod cluster;
pub mod ddl;
pub mod heartbeat;
pub mod lease;
pub mod procedure;
pub mod region;
pub mod store;
pub mod tso;
pub mod watch;
