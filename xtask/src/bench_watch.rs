//! `cargo xtask bench watch`: many watchers over one prefix of a three-member cluster
//! while one writer puts at a steady rate (open loop: it does not wait for one put to
//! send the next): how long an event takes from the put to each
//! watcher (p50/p99), what fraction arrived, and the servers' CPU and memory; with
//! `--vs-etcd` the same against an etcd cluster through etcd-client, with ratios.
//!
//! Each put's value is the moment it was sent (nanoseconds since the run began), so
//! every watcher measures the delay of every event; a sample of the watchers records
//! them. Watchers are spread over `--connections` client connections; the writer has
//! its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common_meta::kv::{KvBackend, PutRequest, WatchRequest, WatchResponse};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use meta_client::{MetaClient, MetaClientOptions};

use crate::bench::{Processes, start_meta_with};
use crate::bench_heartbeat::{percentile_ms, ticks_per_sec, usage};

/// Puts the writer has outstanding at most; at the offered rate the servers answer
/// long before this is reached.
const MAX_PUTS_IN_FLIGHT: usize = 1_000;

/// Settings of `bench watch`.
#[derive(clap::Args, Clone, Debug)]
pub struct WatchArgs {
    /// Watchers over the prefix.
    #[arg(long, default_value_t = 10_000)]
    pub watchers: usize,
    /// Client connections the watchers share.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Puts per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Every this-many-th watcher records its latencies.
    #[arg(long, default_value_t = 100)]
    pub sample_every: usize,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Also run etcd (Debian's etcd-server) with the same load through etcd-client.
    #[arg(long)]
    pub vs_etcd: bool,
}

impl WatchArgs {
    /// The same settings as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "watch".into(),
            format!("--watchers={}", self.watchers),
            format!("--connections={}", self.connections),
            format!("--rate={}", self.rate),
            format!("--seconds={}", self.seconds),
            format!("--sample-every={}", self.sample_every),
            format!("--members={}", self.members),
        ];
        if self.vs_etcd {
            args.push("--vs-etcd".into());
        }
        args
    }
}

/// What the watchers saw, shared by their tasks.
pub(crate) struct Seen {
    started: Instant,
    delivered: AtomicU64,
    /// Messages that carried events (a server may put several events in one).
    responses: AtomicU64,
    samples: std::sync::Mutex<Vec<Duration>>,
}

impl Seen {
    fn event(&self, value: &[u8], record: bool) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if !record {
            return;
        }
        let sent = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_nanos);
        if let Some(sent) = sent {
            let delay = self.started.elapsed().saturating_sub(sent);
            self.samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(delay);
        }
    }
}

/// One system's run.
pub(crate) struct Outcome {
    p50_ms: f64,
    p99_ms: f64,
    delivered: f64,
    /// Puts per second the writer offered (it falls short only when the bound on puts
    /// in flight is reached).
    put_rate: f64,
    events_per_response: f64,
    cpu: f64,
    rss_mb: f64,
}

/// Runs the benchmark (release build).
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    println!(
        "bench watch: {} watchers over {} connections, {} puts/s for {} s, {} members",
        args.watchers, args.connections, args.rate, args.seconds, args.members
    );
    let meta = run_meta(&args).await?;
    print("metasrv", &meta);
    if args.vs_etcd {
        let etcd = crate::bench::etcd::watch_run(&args).await?;
        print("etcd", &etcd);
        println!(
            "ratio metasrv/etcd: p50 {:.2}, p99 {:.2}, CPU {:.2}, RSS {:.2}",
            meta.p50_ms / etcd.p50_ms,
            meta.p99_ms / etcd.p99_ms,
            meta.cpu / etcd.cpu,
            meta.rss_mb / etcd.rss_mb
        );
    }
    Ok(())
}

fn print(name: &str, o: &Outcome) {
    println!(
        "{name:>8}: {:.0} puts/s; latency p50 {:.2} ms, p99 {:.2} ms; delivered {:.1}% ({:.1} events per message); server CPU {:.0}% (of one core, members summed); RSS {:.0} MiB",
        o.put_rate,
        o.p50_ms,
        o.p99_ms,
        o.delivered * 100.0,
        o.events_per_response,
        o.cpu * 100.0,
        o.rss_mb
    );
}

async fn run_meta(args: &WatchArgs) -> anyhow::Result<Outcome> {
    let (procs, endpoints) = start_meta_with(args.members, None).await?;
    let clients = (0..args.connections.max(1))
        .map(|_| MetaClient::new(&endpoints, MetaClientOptions::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let seen = seen();
    let mut tasks = Vec::new();
    for i in 0..args.watchers {
        let client = clients[i % clients.len()].clone();
        let mut stream = client.watch(WatchRequest::prefix("bw/")).await?;
        let (seen, sampled) = (seen.clone(), i % args.sample_every.max(1) == 0);
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(response)) = stream.next().await {
                if let WatchResponse::Events { events, .. } = response {
                    crate::bench_watch::responded(&seen);
                    for event in events {
                        crate::bench_watch::record(&seen, &event.kv.value, sampled);
                    }
                }
            }
        }));
    }
    let writer = MetaClient::new(&endpoints, MetaClientOptions::default())?;
    let outcome = measure(args, &procs, &seen, |key, value| {
        let writer = writer.clone();
        async move {
            writer.put(PutRequest::new(key, value)).await?;
            Ok(())
        }
    })
    .await;
    for task in tasks {
        task.abort();
    }
    outcome
}

/// Writes at the rate, then waits for the deliveries; measures the servers meanwhile.
pub(crate) async fn measure<F, Fut>(
    args: &WatchArgs,
    procs: &Processes,
    seen: &Arc<Seen>,
    put: F,
) -> anyhow::Result<Outcome>
where
    F: Fn(Vec<u8>, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let pids: Vec<u32> = (0..args.members).map(|i| procs.pid(i)).collect();
    let ticks = ticks_per_sec();
    let cpu_now = || -> anyhow::Result<(f64, u64)> {
        let mut cpu = 0.0;
        let mut rss = 0;
        for pid in &pids {
            let (c, r) = usage(*pid, ticks)?;
            cpu += c;
            rss += r;
        }
        Ok((cpu, rss))
    };
    let (cpu_before, _) = cpu_now()?;
    let began = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = args.rate * args.seconds;
    // Open loop: a put starts on every tick whether or not the earlier ones are done
    // (up to a bound), so both systems get the same offered rate; a writer waiting
    // for each put would offer less to whichever answers slower.
    let mut in_flight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < total || !in_flight.is_empty() {
        tokio::select! {
            _ = tick.tick(), if sent < total && in_flight.len() < MAX_PUTS_IN_FLIGHT => {
                let value = seen.started.elapsed().as_nanos().to_string().into_bytes();
                in_flight.push(put(format!("bw/{:04}", sent % 1000).into_bytes(), value));
                sent += 1;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                done.context("a put failed")?;
            }
        }
    }
    let put_rate = total as f64 / began.elapsed().as_secs_f64();
    let expected = total * args.watchers as u64;
    let until = Instant::now() + Duration::from_secs(30);
    while seen.delivered.load(Ordering::Relaxed) < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = began.elapsed().as_secs_f64();
    let (cpu_after, rss) = cpu_now()?;
    let mut samples = std::mem::take(
        &mut *seen
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    samples.sort_unstable();
    Ok(Outcome {
        p50_ms: percentile_ms(&samples, 0.50),
        p99_ms: percentile_ms(&samples, 0.99),
        delivered: seen.delivered.load(Ordering::Relaxed) as f64 / expected.max(1) as f64,
        put_rate,
        events_per_response: seen.delivered.load(Ordering::Relaxed) as f64
            / seen.responses.load(Ordering::Relaxed).max(1) as f64,
        cpu: (cpu_after - cpu_before) / wall,
        rss_mb: rss as f64 / (1024.0 * 1024.0),
    })
}

/// A fresh record of deliveries.
pub(crate) fn seen() -> Arc<Seen> {
    Arc::new(Seen {
        started: Instant::now(),
        delivered: AtomicU64::new(0),
        responses: AtomicU64::new(0),
        samples: std::sync::Mutex::new(Vec::new()),
    })
}

/// Records an event's value.
pub(crate) fn record(seen: &Seen, value: &[u8], sampled: bool) {
    seen.event(value, sampled);
}

/// Counts a message that carried events.
pub(crate) fn responded(seen: &Seen) {
    seen.responses.fetch_add(1, Ordering::Relaxed);
}
