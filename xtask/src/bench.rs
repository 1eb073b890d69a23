//! `cargo xtask bench kv`: put and get throughput and latency of one release `meta-srv`
//! driven through `meta-client`, at several client concurrencies.
//!
//! `launch` builds `meta-srv` and this crate in release mode and re-runs itself as
//! `target/release/xtask bench-run ...`, so the load generator is optimised too.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use common_meta::kv::{BatchPutRequest, KvBackend, PutRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::{root, run as run_command};

/// The benchmarks.
#[derive(Subcommand, Clone, Debug)]
pub enum BenchTask {
    /// KV put and get against a single server.
    Kv(KvArgs),
}

/// Settings of `bench kv`.
#[derive(Args, Clone, Debug)]
pub struct KvArgs {
    /// Concurrent clients, one connection each; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct 8-byte keys the load spreads over.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
}

impl KvArgs {
    fn to_args(&self) -> Vec<String> {
        let clients: Vec<String> = self.clients.iter().map(ToString::to_string).collect();
        vec![
            "kv".into(),
            format!("--clients={}", clients.join(",")),
            format!("--seconds={}", self.seconds),
            format!("--value-size={}", self.value_size),
            format!("--keys={}", self.keys),
        ]
    }
}

/// Builds release binaries and runs the load generator from the release build.
pub fn launch(task: &BenchTask) -> anyhow::Result<()> {
    run_command(Command::new("cargo").args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "meta-srv",
        "-p",
        "xtask",
        "--bin",
        "meta-srv",
        "--bin",
        "xtask",
    ]))?;
    let BenchTask::Kv(args) = task;
    run_command(
        Command::new(root().join("target/release/xtask"))
            .arg("bench-run")
            .args(args.to_args()),
    )
}

/// Runs a benchmark (called in the release build).
pub fn run(task: BenchTask) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let BenchTask::Kv(args) = task;
    runtime.block_on(kv(args))
}

/// A release `meta-srv` on a temp dir; killed on drop.
struct Server {
    child: Child,
    grpc: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let binary = root().join("target/release/meta-srv");
        let mut child = Command::new(&binary)
            .arg("start")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(grpc) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
        else {
            let _ = child.kill();
            bail!("meta-srv did not report its address: {line:?}");
        };
        Ok(Server {
            grpc: grpc.to_string(),
            child,
            _dir: dir,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Put,
    Get,
}

/// One run's latencies, merged over its clients.
struct Outcome {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("{i:08}").into_bytes()
}

async fn kv(args: KvArgs) -> anyhow::Result<()> {
    let server = Server::start()?;
    let endpoints = [server.grpc.clone()];
    let value = vec![b'v'; args.value_size];

    // Every key exists before the first get run.
    let loader = MetaClient::new(&endpoints, MetaClientOptions::default())?;
    let keys: Vec<usize> = (0..args.keys).collect();
    for chunk in keys.chunks(100) {
        let kvs = chunk.iter().map(|&i| (key(i), value.clone())).collect();
        loader
            .batch_put(BatchPutRequest {
                kvs,
                prev_kv: false,
            })
            .await?;
    }

    println!(
        "meta-srv kv benchmark: 1 member (sled, fsync before every ack), release build, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "8-byte keys over {} keys, {}-byte values, {} s per run, one connection per client",
        args.keys, args.value_size, args.seconds
    );
    println!(
        "{:>8} {:>4} {:>10} {:>9} {:>9}",
        "clients", "op", "ops/s", "p50 ms", "p99 ms"
    );
    for &clients in &args.clients {
        for op in [Op::Put, Op::Get] {
            let outcome = drive(&endpoints, clients, op, &args, &value).await?;
            println!(
                "{:>8} {:>4} {:>10.0} {:>9.3} {:>9.3}",
                clients,
                if op == Op::Put { "put" } else { "get" },
                outcome.ops as f64 / outcome.elapsed.as_secs_f64(),
                outcome.percentile(0.50).as_secs_f64() * 1e3,
                outcome.percentile(0.99).as_secs_f64() * 1e3,
            );
        }
    }
    Ok(())
}

async fn drive(
    endpoints: &[String],
    clients: usize,
    op: Op,
    args: &KvArgs,
    value: &[u8],
) -> anyhow::Result<Outcome> {
    let duration = Duration::from_secs(args.seconds);
    let value = Arc::new(value.to_vec());
    let started = Instant::now();
    let mut workers = Vec::with_capacity(clients);
    for worker in 0..clients {
        let client = MetaClient::new(endpoints, MetaClientOptions::default())?;
        let value = value.clone();
        let keys = args.keys;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = worker;
            while started.elapsed() < duration {
                // A stride coprime with typical key counts spreads clients over the keys.
                let k = key((i * 7919) % keys);
                i += clients;
                let t = Instant::now();
                match op {
                    Op::Put => {
                        client.put(PutRequest::new(k, value.as_slice())).await?;
                    }
                    Op::Get => {
                        client.get(&k).await?;
                    }
                }
                latencies.push(t.elapsed());
            }
            Ok::<_, common_meta::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Outcome {
        ops: latencies.len(),
        elapsed,
        latencies,
    })
}
