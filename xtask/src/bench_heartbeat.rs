//! `cargo xtask bench heartbeat`: how many heartbeats and region stats one release
//! leader sustains, with the round trip the nodes see and the leader's CPU and memory.
//!
//! One `meta-srv` (a one-member cluster: the leader) runs as its own process, told to
//! have nodes beat at `--interval-ms`; the simulator (`meta_client::sim`) runs `--nodes`
//! datanodes of `--regions-per-node` regions in this process, their starts spread over
//! one interval. Each `--churn` value is one run: the fraction of a node's regions whose
//! stats change between two beats. Comparing runs shows the cost following what
//! changed (churn) rather than what nodes hold (regions).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{MetaClient, MetaClientOptions};

use crate::bench::start_meta_with;

/// Settings of `bench heartbeat`.
#[derive(clap::Args, Clone, Debug)]
pub struct HeartbeatArgs {
    /// Simulated datanodes.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: usize,
    /// Regions each datanode holds.
    #[arg(long, default_value_t = 100)]
    pub regions_per_node: usize,
    /// The heartbeat interval the leader gives, ms.
    #[arg(long, default_value_t = 10_000)]
    pub interval_ms: u64,
    /// Seconds measured per run (after every node has reported once).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Fraction of regions whose stats change per beat; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "0.01,1")]
    pub churn: Vec<f64>,
}

impl HeartbeatArgs {
    /// The same settings as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        let churn: Vec<String> = self.churn.iter().map(ToString::to_string).collect();
        vec![
            "heartbeat".into(),
            format!("--nodes={}", self.nodes),
            format!("--regions-per-node={}", self.regions_per_node),
            format!("--interval-ms={}", self.interval_ms),
            format!("--seconds={}", self.seconds),
            format!("--churn={}", churn.join(",")),
        ]
    }
}

/// CPU seconds (user + system) and resident bytes of process `pid`, from /proc.
pub(crate) fn usage(pid: u32, ticks_per_sec: f64) -> anyhow::Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((ticks / ticks_per_sec, rss_kb * 1024))
}

pub(crate) fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

/// One measured stretch of a simulator's life.
pub struct Window {
    /// Heartbeats answered per second.
    pub beats_per_sec: f64,
    /// Region stats sent per second.
    pub regions_per_sec: f64,
    /// Round trips, sorted.
    pub rtts: Vec<Duration>,
}

impl Window {
    /// Round-trip percentile `p` (0..1), ms.
    pub fn rtt_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.rtts, p)
    }
}

/// Measures `sim` for `length`.
pub async fn measure(sim: &Simulator, length: Duration) -> Window {
    sim.take_rtts();
    let (beats, regions) = sim.totals();
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (beats_after, regions_after) = sim.totals();
    let mut rtts = sim.take_rtts();
    rtts.sort_unstable();
    Window {
        beats_per_sec: (beats_after - beats) as f64 / elapsed,
        regions_per_sec: (regions_after - regions) as f64 / elapsed,
        rtts,
    }
}

/// Waits until every node of `sim` has an answered stream and the leader lists all
/// their regions.
pub async fn wait_reported(
    sim: &Simulator,
    client: &MetaClient,
    nodes: usize,
    regions: u64,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let listed = client.nodes().await.unwrap_or_default();
        let held: u64 = listed.iter().map(|n| n.region_count).sum();
        if sim.connected() == nodes && listed.len() == nodes && held == regions {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "after {deadline:?}: {} of {nodes} nodes connected, {} listed, {held} of {regions} regions known",
                sim.connected(),
                listed.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs the benchmark (in the release build).
pub async fn run(args: HeartbeatArgs) -> anyhow::Result<()> {
    let ticks = ticks_per_sec();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "heartbeat benchmark: one release meta-srv leader, {} simulated datanodes x {} regions \
         ({} regions), interval {} ms, {} s measured per run, same machine, {cores} cores",
        args.nodes,
        args.regions_per_node,
        args.nodes * args.regions_per_node,
        args.interval_ms,
        args.seconds
    );
    println!(
        "| churn | heartbeats/s | region stats/s | RTT p50 | RTT p99 | leader CPU | leader RSS |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for churn in &args.churn {
        let config = format!("heartbeat_interval_ms = {}\n", args.interval_ms);
        let (procs, endpoints) = start_meta_with(1, Some(&config)).await?;
        let pid = procs.pid(0);
        let options = SimOptions {
            nodes: args.nodes,
            first_node_id: 1,
            regions_per_node: args.regions_per_node,
            churn: *churn,
            nodes_per_connection: 100,
            ramp: Duration::from_millis(args.interval_ms),
            write_every: Duration::ZERO,
            record: false,
        };
        let sim = Simulator::start(&endpoints, &options).await?;
        let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
        let regions = (args.nodes * args.regions_per_node) as u64;
        wait_reported(&sim, &client, args.nodes, regions, Duration::from_secs(120)).await?;
        let (cpu_before, _) = usage(pid, ticks)?;
        let started = Instant::now();
        let window = measure(&sim, Duration::from_secs(args.seconds)).await;
        let (cpu_after, rss) = usage(pid, ticks)?;
        let cpu = (cpu_after - cpu_before) / started.elapsed().as_secs_f64();
        println!(
            "| {churn} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.0}% of a core | {:.0} MiB |",
            window.beats_per_sec,
            window.regions_per_sec,
            window.rtt_ms(0.5),
            window.rtt_ms(0.99),
            cpu * 100.0,
            rss as f64 / (1024.0 * 1024.0)
        );
        drop(sim);
        drop(procs);
    }
    Ok(())
}
