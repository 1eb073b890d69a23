//! Without the `etcd` feature there is no etcd client.

use super::*;

pub async fn connect(_endpoints: &[String]) -> anyhow::Result<Arc<dyn Target>> {
    bail!("built without the `etcd` feature; run `cargo xtask bench kv --vs-etcd`")
}

pub async fn start(_members: usize) -> anyhow::Result<(Processes, Vec<String>)> {
    bail!("built without the `etcd` feature; run `cargo xtask bench kv --vs-etcd`")
}

pub async fn watch_run(
    _args: &crate::bench_watch::WatchArgs,
) -> anyhow::Result<crate::bench_watch::Outcome> {
    bail!("built without the `etcd` feature; run `cargo xtask bench watch --vs-etcd`")
}
