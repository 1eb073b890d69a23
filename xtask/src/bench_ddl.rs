//! `cargo xtask bench ddl`: tables created and dropped per second, and their latency,
//! through `meta.v1.Ddl` on a release cluster with simulated datanodes answering the
//! region instructions. The peer run in the same invocation is the floor: the same
//! tables' metadata written by `TableMetadataManager` in one transaction each (what a
//! create commits, without the procedure, the placement and the datanodes), so the
//! ratio says what the DDL machinery costs over the commit itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use common_meta::kv::KvBackend;
use common_meta::manager::TableMetadataManager;
use common_meta::model::table::{Peer, RegionRoute, TableInfo, TableRoute};
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{MetaClient, MetaClientOptions};

use crate::bench::start_meta_with;

/// Settings of `bench ddl`.
#[derive(Args, Clone, Debug)]
pub struct DdlArgs {
    /// DDL requests in flight at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Tables created (then dropped) per run.
    #[arg(long, default_value_t = 500)]
    pub tables: usize,
    /// Regions per table.
    #[arg(long, default_value_t = 4)]
    pub regions: u32,
    /// Cluster size: 1 or 3 members.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Simulated datanodes.
    #[arg(long, default_value_t = 3)]
    pub datanodes: usize,
}

impl DdlArgs {
    /// The same settings as `bench-run` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let concurrency: Vec<String> = self.concurrency.iter().map(ToString::to_string).collect();
        vec![
            "ddl".into(),
            format!("--concurrency={}", concurrency.join(",")),
            format!("--tables={}", self.tables),
            format!("--regions={}", self.regions),
            format!("--members={}", self.members),
            format!("--datanodes={}", self.datanodes),
        ]
    }
}

fn table(name: String, regions: u32) -> TableInfo {
    meta_client::sim::sample_table(&name, regions)
}

/// Rate and latency of one phase.
struct Phase {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn phase(mut latencies: Vec<Duration>, elapsed: Duration) -> Phase {
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    Phase {
        per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// Runs `op(i)` for i in 0..count with `concurrency` workers; the latencies and the
/// time it all took.
async fn drive<F, Fut>(count: usize, concurrency: usize, op: F) -> anyhow::Result<Phase>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok(latencies);
                    }
                    let began = Instant::now();
                    op(i).await?;
                    latencies.push(began.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(count);
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(phase(latencies, started.elapsed()))
}

/// Runs the benchmark (in the release build).
pub async fn run(args: DdlArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "DDL benchmark: {} release meta-srv member(s), {} simulated datanodes, {} tables of {} regions per run, same machine, {cores} cores",
        args.members, args.datanodes, args.tables, args.regions
    );
    println!(
        "| concurrency | creates/s | create p50 | create p99 | drops/s | drop p50 | drop p99 | floor commits/s | floor p50 | creates / floor |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &concurrency in &args.concurrency {
        let config = "heartbeat_interval_ms = 1000\n";
        let (procs, endpoints) = start_meta_with(args.members, Some(config)).await?;
        let options = SimOptions {
            nodes: args.datanodes,
            regions_per_node: 0,
            ..SimOptions::default()
        };
        let sim = Simulator::start(&endpoints, &options).await?;
        let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
        sim.activate(&client, Duration::from_secs(60)).await?;
        // The first create waits until the leader hears the nodes as alive.
        let warmup = Instant::now();
        loop {
            match client.create_table(&table("warmup".into(), 1), true).await {
                Ok(_) => break,
                // Not ready yet (no datanode heard alive): try again shortly.
                Err(_) if warmup.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("the cluster never took a table"),
            }
        }

        let regions = args.regions;
        let create = {
            let client = client.clone();
            drive(args.tables, concurrency, move |i| {
                let client = client.clone();
                async move {
                    client
                        .create_table(&table(format!("t{i:06}"), regions), false)
                        .await?;
                    Ok(())
                }
            })
            .await?
        };
        let drop = {
            let client = client.clone();
            drive(args.tables, concurrency, move |i| {
                let client = client.clone();
                async move {
                    client
                        .drop_table("greptime", "public", &format!("t{i:06}"), false)
                        .await?;
                    Ok(())
                }
            })
            .await?
        };
        // The floor: the same keys committed straight through the KV API.
        let kv: Arc<dyn KvBackend> = Arc::new(client.clone());
        let manager = TableMetadataManager::new(kv, 128);
        let datanodes = args.datanodes as u64;
        let floor = drive(args.tables, concurrency, move |i| {
            let manager = manager.clone();
            async move {
                let mut info = table(format!("floor{i:06}"), regions);
                info.id = 1_000_000 + i as u32;
                let route = TableRoute {
                    regions: info
                        .region_ids()
                        .map(|region| RegionRoute {
                            region,
                            leader: Some(Peer {
                                id: 1 + u64::from(region.region_number()) % datanodes,
                                addr: String::new(),
                            }),
                            followers: Vec::new(),
                            leader_state: Default::default(),
                            leader_down_since: None,
                        })
                        .collect(),
                    version: 0,
                };
                manager.create_table(&info, &route).await?;
                Ok(())
            }
        })
        .await?;
        println!(
            "| {concurrency} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2}x |",
            create.per_sec,
            create.p50_ms,
            create.p99_ms,
            drop.per_sec,
            drop.p50_ms,
            drop.p99_ms,
            floor.per_sec,
            floor.p50_ms,
            create.per_sec / floor.per_sec
        );
        std::mem::drop(sim);
        std::mem::drop(procs);
    }
    Ok(())
}
