//! `cargo xtask bench routes`: the range route catalog at scale, against a release
//! cluster. It builds a catalog of `--routes` routes (saves of up to 120 new routes
//! each, as the catalog manager writes them), then measures:
//! - loading the whole catalog into a `RouteTable`;
//! - lookups of random keys in the `RouteTable` (in memory, O(log n)), against asking
//!   the server for each key (`GetRoute`, the peer in the same run: what a client
//!   without a table would pay);
//! - splits through `SplitRoute` while `--clients` clients each follow the catalog in
//!   a `RouteTable`: the split's latency (asked to answered), and how long after it
//!   was asked each client's table holds the new version (the save, then the watch:
//!   a table usually has it before the client that asked has its answer, which waits
//!   for the procedure to be recorded done).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common_meta::manager::route::{RouteCatalogManager, SaveOutcome};
use common_meta::model::route::{RouteCatalog, RouteDescriptor, RouteState};
use common_meta::route_table::RouteTable;
use meta_client::{MetaClient, MetaClientOptions};

use crate::bench::start_meta_with;

/// Settings of `bench routes`.
#[derive(clap::Args, Clone, Debug)]
pub struct RoutesArgs {
    /// Cluster size: 1 or 3 members.
    #[arg(long, default_value_t = 3)]
    pub members: usize,
    /// Routes in the catalog.
    #[arg(long, default_value_t = 100_000)]
    pub routes: usize,
    /// Clients following the catalog.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Splits whose propagation is measured.
    #[arg(long, default_value_t = 20)]
    pub splits: usize,
    /// Seconds of lookups per shape.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
}

impl RoutesArgs {
    /// The same settings as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "routes".into(),
            format!("--members={}", self.members),
            format!("--routes={}", self.routes),
            format!("--clients={}", self.clients),
            format!("--splits={}", self.splits),
            format!("--seconds={}", self.seconds),
        ]
    }
}

/// New routes per save (a save of k routes is k puts, a delete, the version and the
/// next id: within the default 128 operations of a transaction).
const PER_SAVE: usize = 120;

fn key(i: usize) -> Vec<u8> {
    format!("r{i:09}").into_bytes()
}

/// Saves catalogs until it holds `routes` routes: each save cuts the last route (which
/// runs to +inf) into up to [`PER_SAVE`] routes.
async fn build(manager: &RouteCatalogManager, routes: usize) -> anyhow::Result<RouteCatalog> {
    let (mut base, _) = manager.load().await?;
    let mut made = base.routes.len();
    while made < routes {
        let mut next = base.clone();
        let last = next.routes.pop().context("no route")?;
        let count = (routes - made + 1).min(PER_SAVE);
        let mut id = next.next_id.max(1);
        for i in 0..count {
            let start = if i == 0 {
                last.start.clone()
            } else {
                key(made + i)
            };
            let end = (i + 1 < count).then(|| key(made + i + 1));
            next.routes.push(RouteDescriptor {
                route_id: id,
                start,
                end,
                group_id: last.group_id,
                state: RouteState::Active,
                parent_route_id: Some(last.route_id),
            });
            id += 1;
        }
        next.next_id = id;
        made += count - 1;
        match manager.save(&base, next.clone()).await? {
            SaveOutcome::Saved(version) => {
                next.version = version;
                base = next;
            }
            SaveOutcome::Conflict { current } => bail!("another writer saved version {current}"),
        }
    }
    Ok(base)
}

/// A cheap deterministic generator of lookup keys.
struct Keys(u64, usize);

impl Keys {
    fn next(&mut self) -> Vec<u8> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let mut k = key(self.0 as usize % self.1.max(1));
        k.push(b'x');
        k
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p) as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Runs the benchmark (release build).
pub async fn run(args: RoutesArgs) -> anyhow::Result<()> {
    let (procs, endpoints) = start_meta_with(args.members, None).await?;
    let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
    println!(
        "bench routes: {} member(s), release build, {} cores, {} routes, {} following clients",
        args.members,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.routes,
        args.clients
    );
    let manager = RouteCatalogManager::new(Arc::new(client.clone()));
    let started = Instant::now();
    let built = build(&manager, args.routes).await?;
    println!(
        "built: {} routes at catalog version {} in {:.1} s",
        built.routes.len(),
        built.version,
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let table = client.route_table(1).await?;
    println!(
        "load: {} routes into a RouteTable in {:.0} ms",
        table.len(),
        started.elapsed().as_secs_f64() * 1e3
    );

    // Lookups: the table in memory against one GetRoute per key.
    let length = Duration::from_secs(args.seconds);
    let mut keys = Keys(0x9e37_79b9_7f4a_7c15, args.routes);
    let (mut local, started) = (0u64, Instant::now());
    while started.elapsed() < length {
        for _ in 0..1_000 {
            std::hint::black_box(table.owner_of(&keys.next()));
        }
        local += 1_000;
    }
    let local_rate = local as f64 / started.elapsed().as_secs_f64();
    let (mut remote, started) = (0u64, Instant::now());
    while started.elapsed() < length {
        client.route_of(&keys.next()).await?;
        remote += 1;
    }
    let remote_rate = remote as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:<36} | {:>12} | {:>9}",
        "lookup (one thread)", "lookups/s", "vs peer"
    );
    println!(
        "{:<36} | {:>12.0} | {:>8.0}x",
        "RouteTable::owner_of",
        local_rate,
        local_rate / remote_rate
    );
    println!(
        "{:<36} | {:>12.0} | {:>8.2}x",
        "peer: GetRoute per key", remote_rate, 1.0
    );

    // Followers: each its own connection and table.
    let started = Instant::now();
    let mut loads = Vec::new();
    for _ in 0..args.clients {
        let endpoints = endpoints.clone();
        loads.push(tokio::spawn(async move {
            let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
            let table = client.route_table(1).await?;
            Ok::<_, anyhow::Error>((client, table))
        }));
    }
    let mut followers = Vec::new();
    for load in loads {
        followers.push(load.await??);
    }
    println!(
        "{} clients loaded the catalog in {:.1} s",
        followers.len(),
        started.elapsed().as_secs_f64()
    );
    let followers: Arc<Vec<(MetaClient, RouteTable)>> = Arc::new(followers);
    let mut split_latencies = Vec::new();
    let mut propagation = Vec::new();
    let mut last_seen = Vec::new();
    for s in 0..args.splits {
        // Split a different route each time, in the middle of its range; every client
        // waits for the version the split will save from before it is asked.
        let mut at = key((s * 7_919) % args.routes.max(1));
        at.push(b'm');
        let version = followers[0].1.version() + 1;
        let mut waits = Vec::new();
        for i in 0..followers.len() {
            let followers = followers.clone();
            waits.push(tokio::spawn(async move {
                let seen = followers[i]
                    .1
                    .wait_for(version, Duration::from_secs(30))
                    .await;
                (seen, Instant::now())
            }));
        }
        let asked = Instant::now();
        let answer = client.split_route(&at, Duration::from_secs(30)).await?;
        let change = answer.change.context("the split did not finish")?;
        if change.version != version {
            bail!("the split saved version {}, not {version}", change.version);
        }
        split_latencies.push(asked.elapsed());
        let mut slowest = Duration::ZERO;
        for wait in waits {
            let (seen, at) = wait.await?;
            if !seen {
                bail!("a client did not see version {version} within 30 s");
            }
            let lag = at.saturating_duration_since(asked);
            slowest = slowest.max(lag);
            propagation.push(lag);
        }
        last_seen.push(slowest);
    }
    split_latencies.sort_unstable();
    propagation.sort_unstable();
    last_seen.sort_unstable();
    println!(
        "{:<36} | {:>8} {:>8} {:>8}",
        "split (ms)", "p50", "p99", "max"
    );
    for (name, samples) in [
        ("split, asked to answered", &split_latencies),
        ("asked to a client's table", &propagation),
        ("asked to the last of all clients", &last_seen),
    ] {
        println!(
            "{:<36} | {:>8.2} {:>8.2} {:>8.2}",
            name,
            percentile(samples, 0.5),
            percentile(samples, 0.99),
            percentile(samples, 1.0)
        );
    }
    drop(followers);
    drop(procs);
    Ok(())
}
