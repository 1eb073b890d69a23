//! `cargo xtask bench tso`: timestamps per second and latency through one `TsoClient`
//! with 1, 16 and 256 concurrent callers, and through 4 clients of 64 callers each,
//! against a release cluster. Each caller asks for one timestamp at a time, so the
//! figure is what a client library's batching reaches. No peer runs beside it (PD is
//! not packaged here); the ratio printed is against the goal of 1,000,000/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meta_client::{MetaClient, MetaClientOptions, TsoClient};

use crate::bench::start_meta_with;

/// Settings of `bench tso`.
#[derive(clap::Args, Clone, Debug)]
pub struct TsoArgs {
    /// Cluster size: 1 or 3 members.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

impl TsoArgs {
    /// The same settings as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "tso".into(),
            format!("--members={}", self.members),
            format!("--seconds={}", self.seconds),
        ]
    }
}

/// The goal: timestamps per second on this machine.
const GOAL: f64 = 1_000_000.0;

/// Runs the benchmark (release build).
pub async fn run(args: TsoArgs) -> anyhow::Result<()> {
    let (procs, endpoints) = start_meta_with(args.members, None).await?;
    println!(
        "bench tso: {} member(s), release build, {} cores, {} s per run, one timestamp per call",
        args.members,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.seconds
    );
    println!(
        "{:<24} | {:>12} {:>8} {:>8} | {:>9}",
        "shape", "ts/s", "p50 ms", "p99 ms", "vs 1M/s"
    );
    for (clients, callers) in [(1, 1), (1, 16), (1, 256), (4, 64)] {
        let (count, mut latencies, elapsed) = drive(
            &endpoints,
            clients,
            callers,
            Duration::from_secs(args.seconds),
        )
        .await?;
        latencies.sort_unstable();
        let at = |p: f64| {
            latencies
                .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let rate = count as f64 / elapsed.as_secs_f64();
        println!(
            "{:<24} | {:>12.0} {:>8.3} {:>8.3} | {:>8.2}x",
            format!("{clients} client(s) x {callers}"),
            rate,
            at(0.5),
            at(0.99),
            rate / GOAL
        );
    }
    drop(procs);
    Ok(())
}

/// `clients` TsoClients with `callers` callers each for `length`: timestamps answered,
/// every call's latency, and the time it took.
async fn drive(
    endpoints: &[String],
    clients: usize,
    callers: usize,
    length: Duration,
) -> anyhow::Result<(u64, Vec<Duration>, Duration)> {
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    let mut tsos = Vec::new();
    for _ in 0..clients {
        let client = MetaClient::new(endpoints, MetaClientOptions::default())?;
        let tso = Arc::new(TsoClient::new(&client));
        // The first answer opens the stream at the leader.
        tso.timestamp().await?;
        tsos.push(tso);
    }
    let started = Instant::now();
    for tso in &tsos {
        for _ in 0..callers {
            let (tso, running) = (tso.clone(), running.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while running.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    tso.timestamp().await?;
                    latencies.push(asked.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
    }
    tokio::time::sleep(length).await;
    running.store(false, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    Ok((latencies.len() as u64, latencies, elapsed))
}
