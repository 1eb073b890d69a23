//! `cargo xtask bench procedure`: three-step procedures, each step persisted, run by a
//! `ProcedureManager` over `KvStateStore` on two backends, in process: the standalone
//! sled backend (group commit, fsync per group) and a one-member raft group (fsync per
//! raft `Ready`). Prints procedures/s and completion latency p50/p99 per concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common_meta::kv::{KvBackend, KvLimits, SledKvBackend, SledKvStore};
use common_meta::state_store::KvStateStore;
use meta_srv::raft::backend::RaftKvBackend;
use meta_srv::raft::driver::{RaftNode, RaftSettings};
use meta_srv::raft::members::Members;
use meta_srv::raft::transport::LocalRouter;
use procedure::{Context, ManagerConfig, Procedure, ProcedureManager, ProcedureWithId, Status};

/// Three steps, persisting after each.
struct ThreeSteps(u32);

#[async_trait]
impl Procedure for ThreeSteps {
    fn type_name(&self) -> &str {
        "bench.ThreeSteps"
    }

    async fn execute(&mut self, _ctx: &Context) -> procedure::Result<Status> {
        self.0 += 1;
        Ok(if self.0 > 3 {
            Status::Done { output: None }
        } else {
            Status::Executing { persist: true }
        })
    }

    fn dump(&self) -> procedure::Result<String> {
        Ok(self.0.to_string())
    }
}

/// Runs the benchmark for every concurrency on both backends.
pub async fn run(concurrency: Vec<usize>, seconds: u64) -> anyhow::Result<()> {
    println!(
        "procedure benchmark: 3 steps persisted per procedure, release build, {} cores, {seconds} s per run",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<8} {:>11} | {:>12} {:>8} {:>8}",
        "backend", "concurrency", "procedures/s", "p50 ms", "p99 ms"
    );
    for backend in ["sled", "raft"] {
        let dir = tempfile::tempdir()?;
        let (kv, _node): (Arc<dyn KvBackend>, Option<RaftNode>) = match backend {
            "sled" => (
                Arc::new(SledKvBackend::open(dir.path(), KvLimits::default())?),
                None,
            ),
            _ => {
                let db = sled::open(dir.path())?;
                let store = Arc::new(SledKvStore::open_in(db.clone(), KvLimits::default())?);
                let node = RaftNode::start(
                    RaftSettings::new(1, vec![1]),
                    db,
                    store.clone(),
                    Arc::new(Members::in_memory(Default::default())),
                    Arc::new(LocalRouter::default()),
                )?;
                node.leadership().wait_for(Option::is_some).await?;
                let backend = RaftKvBackend::new(
                    node.driver(),
                    store,
                    Duration::from_secs(10),
                    node.leadership(),
                    2,
                );
                (Arc::new(backend), Some(node))
            }
        };
        let store = Arc::new(KvStateStore::new(kv, &KvLimits::default()));
        let manager = ProcedureManager::new(store, ManagerConfig::default());
        manager.start().await?;
        let ids = Arc::new(AtomicU64::new(0));
        for &c in &concurrency {
            let started = Instant::now();
            let duration = Duration::from_secs(seconds);
            let mut workers = Vec::new();
            for _ in 0..c {
                let (manager, ids) = (manager.clone(), ids.clone());
                workers.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while started.elapsed() < duration {
                        let id = format!("{backend}-{}", ids.fetch_add(1, Ordering::Relaxed));
                        let t = Instant::now();
                        let watcher = manager
                            .submit(ProcedureWithId {
                                id,
                                procedure: Box::new(ThreeSteps(0)),
                            })
                            .await?;
                        watcher.wait().await?;
                        latencies.push(t.elapsed());
                    }
                    Ok::<_, procedure::Error>(latencies)
                }));
            }
            let mut latencies = Vec::new();
            for worker in workers {
                latencies.extend(worker.await??);
            }
            let elapsed = started.elapsed();
            latencies.sort_unstable();
            let pct = |p: f64| {
                let rank = ((latencies.len() as f64 - 1.0) * p).round() as usize;
                latencies.get(rank).map_or(0.0, |d| d.as_secs_f64() * 1e3)
            };
            println!(
                "{:<8} {:>11} | {:>12.0} {:>8.2} {:>8.2}",
                backend,
                c,
                latencies.len() as f64 / elapsed.as_secs_f64(),
                pct(0.5),
                pct(0.99)
            );
        }
        manager.stop();
    }
    Ok(())
}
