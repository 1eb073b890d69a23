//! Compiles the meta.v1 and etcd v3 protos with protox (pure Rust), so no system `protoc` is needed.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "proto/meta/v1/common.proto",
    "proto/meta/v1/store.proto",
    "proto/meta/v1/cluster.proto",
    "proto/meta/v1/procedure.proto",
    "proto/meta/v1/heartbeat.proto",
    "proto/meta/v1/ddl.proto",
    "proto/meta/v1/region.proto",
    "proto/meta/v1/raft_log.proto",
    "proto/meta/v1/watch.proto",
    "proto/meta/v1/lease.proto",
    "proto/meta/v1/tso.proto",
    "proto/meta/v1/route.proto",
    // etcd's v3 client API (packages etcdserverpb, mvccpb, authpb, v3lockpb,
    // v3electionpb).
    "proto/etcd/mvccpb/kv.proto",
    "proto/etcd/authpb/auth.proto",
    "proto/etcd/etcdserverpb/rpc.proto",
    "proto/etcd/v3lockpb/v3lock.proto",
    "proto/etcd/v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    // compile_fds emits no rerun-if-changed lines of its own.
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
