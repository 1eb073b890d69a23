//! meta-srv's integration tests: one test binary, one module per area.

// Integration tests are tests throughout: a panic is how they report.
#![allow(clippy::unwrap_used)]

mod admin;
mod auth;
mod bad_input;
mod cluster_process;
mod concurrency;
mod ddl;
mod durability;
mod etcd;
mod exactly_once;
mod fault;
mod front;
mod heartbeat;
mod in_process;
mod lease;
mod linearizability;
mod metactl;

mod raft_cluster;
mod raft_faults;
mod regions;
mod routes;
mod snapshot_stream;
mod support;
mod tls;
mod tso;
mod watch;
