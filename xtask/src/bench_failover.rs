//! `cargo xtask bench failover`: how long regions go unled when a datanode dies, on a
//! release cluster (three members by default) with simulated datanodes that write
//! while their leases let them.
//!
//! One invocation runs two phases on the same cluster and regions:
//! - the peer, **drain**: an operator moves every leader region off a live datanode
//!   (the old leader confirms each downgrade, so no lease is waited out);
//! - **failover**: another datanode is killed; the leader must first call it failed
//!   (phi-accrual), then fence its leases, then move its regions.
//!
//! For each region of the node, the time from the drain or kill to the first leader
//! lease its new node received (p50, p99, max), the meta leader's CPU over the phase,
//! and the ratio failover / drain: what detection and fencing cost over a planned
//! move. The goal (defaults): every region led elsewhere within 2 x lease + detection
//! window, p99 under 20 s. The lease history checker runs over the whole run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use meta_client::sim::history::{Event, check};
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{LeaseEvent, MetaClient, MetaClientOptions};

use crate::bench::start_meta_with;

/// Settings of `bench failover`.
#[derive(Args, Clone, Debug)]
pub struct FailoverArgs {
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Simulated datanodes.
    #[arg(long, default_value_t = 20)]
    pub datanodes: usize,
    /// Regions in all (spread over the datanodes by the selector).
    #[arg(long, default_value_t = 10_000)]
    pub regions: u32,
    /// Regions per table.
    #[arg(long, default_value_t = 100)]
    pub regions_per_table: u32,
    /// Heartbeat interval in ms (the server's default is 3000).
    #[arg(long, default_value_t = 3_000)]
    pub interval_ms: u64,
}

impl FailoverArgs {
    /// The same settings as `bench-run` arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "failover".into(),
            format!("--members={}", self.members),
            format!("--datanodes={}", self.datanodes),
            format!("--regions={}", self.regions),
            format!("--regions-per-table={}", self.regions_per_table),
            format!("--interval-ms={}", self.interval_ms),
        ]
    }
}

/// Figures of one phase.
struct Phase {
    regions: usize,
    p50_s: f64,
    p99_s: f64,
    max_s: f64,
    cpu_percent: f64,
}

/// The leader's CPU time so far (user + system), from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Ok(ticks / 100.0)
}

/// Region -> leader, from every table's route.
async fn leaders(client: &MetaClient, tables: &[u32]) -> anyhow::Result<BTreeMap<u64, u64>> {
    let mut out = BTreeMap::new();
    for table in tables {
        for entry in client.table_route(*table).await?.regions {
            out.insert(entry.region.as_u64(), entry.leader.map_or(0, |p| p.id));
        }
    }
    Ok(out)
}

/// Waits until no region of `tables` is led by `node` and each of `regions` holds a
/// leader lease on its new leader; then the per-region times from `since`, from the
/// history's first leader lease on another node.
async fn moved(
    client: &MetaClient,
    sim: &Simulator,
    tables: &[u32],
    node: u64,
    regions: &BTreeSet<u64>,
    since: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let leads = leaders(client, tables).await?;
        let left = leads.values().filter(|l| **l == node).count();
        let leased = regions
            .iter()
            .filter(|r| sim.leases(leads[r]).is_some_and(|k| k.writable(**r)))
            .count();
        if left == 0 && leased == regions.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("after 300 s: {left} regions still on node {node}, {leased} leased elsewhere");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut first: BTreeMap<u64, Instant> = BTreeMap::new();
    for event in sim.history().events() {
        if let Event::Lease {
            node: holder,
            event: LeaseEvent::Leader { region, from, .. },
        } = event
            && holder != node
            && from >= since
            && regions.contains(&region)
        {
            first.entry(region).or_insert(from);
        }
    }
    Ok(first.values().map(|at| *at - since).collect())
}

fn phase(mut times: Vec<Duration>, cpu: f64, wall: Duration) -> Phase {
    times.sort_unstable();
    let at = |q: f64| {
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1;
        times[i].as_secs_f64()
    };
    Phase {
        regions: times.len(),
        p50_s: at(0.5),
        p99_s: at(0.99),
        max_s: times.last().map_or(0.0, Duration::as_secs_f64),
        cpu_percent: 100.0 * cpu / wall.as_secs_f64(),
    }
}

/// Runs the benchmark (in the release build).
pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let config = format!("heartbeat_interval_ms = {}\n", args.interval_ms);
    let (procs, endpoints) = start_meta_with(args.members, Some(&config)).await?;
    let options = SimOptions {
        nodes: args.datanodes,
        regions_per_node: 0,
        write_every: Duration::from_millis(500),
        record: true,
        ..SimOptions::default()
    };
    let mut sim = Simulator::start(&endpoints, &options).await?;
    let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
    sim.activate(&client, Duration::from_secs(120)).await?;
    let mut tables = Vec::new();
    let count = args.regions.div_ceil(args.regions_per_table);
    let started = Instant::now();
    for t in 0..count {
        let info = meta_client::sim::sample_table(&format!("f{t}"), args.regions_per_table);
        // The first creates wait until the leader hears the datanodes alive.
        loop {
            match client.create_table(&info, true).await {
                Ok(id) => break tables.push(id),
                Err(_) if started.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let all: BTreeSet<u64> = leaders(&client, &tables).await?.keys().copied().collect();
    println!(
        "{} members, {} datanodes, {} regions in {} tables, heartbeat {} ms (lease {} ms by default derivation)",
        args.members,
        args.datanodes,
        all.len(),
        tables.len(),
        args.interval_ms,
        3 * args.interval_ms + 1_000
    );
    let status = client.status().await?;
    let pid = procs.pid(status.leader_id as usize - 1);
    let nodes = sim.node_ids();
    let mut results = Vec::new();
    for (name, node) in [("drain (peer)", nodes[0]), ("failover", nodes[1])] {
        let leads = leaders(&client, &tables).await?;
        let theirs: BTreeSet<u64> = leads
            .iter()
            .filter(|(_, l)| **l == node)
            .map(|(r, _)| *r)
            .collect();
        let cpu_before = cpu_seconds(pid)?;
        let since = Instant::now();
        if name == "failover" {
            sim.kill(node);
        } else {
            client.drain_node(node).await?;
        }
        let times = moved(&client, &sim, &tables, node, &theirs, since).await?;
        let wall = since.elapsed();
        let cpu = cpu_seconds(pid)? - cpu_before;
        results.push((name, phase(times, cpu, wall)));
    }
    let report = check(&sim.history().events());
    println!();
    println!("| phase | regions moved | p50 s | p99 s | max s | meta leader CPU % |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, p) in &results {
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            p.regions, p.p50_s, p.p99_s, p.max_s, p.cpu_percent
        );
    }
    let (drain, failover) = (&results[0].1, &results[1].1);
    println!(
        "\nfailover / drain: p50 {:.1}x, p99 {:.1}x",
        failover.p50_s / drain.p50_s.max(1e-9),
        failover.p99_s / drain.p99_s.max(1e-9)
    );
    let lease_s = (3 * args.interval_ms + 1_000) as f64 / 1e3;
    println!(
        "goal: p99 under 20 s (got {:.2}); max within 2 x lease + detection window",
        failover.p99_s
    );
    println!(
        "checker: {} leader leases, {} writes, {} violations (lease {lease_s} s)",
        report.leases,
        report.writes,
        report.violations.len()
    );
    if !report.violations.is_empty() {
        bail!(
            "the checker found violations: {:?}",
            &report.violations[..report.violations.len().min(5)]
        );
    }
    Ok(())
}
