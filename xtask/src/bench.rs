//! `cargo xtask bench kv`: throughput and latency of release `meta-srv` clusters driven
//! through `meta-client`, and with `--vs-etcd` an etcd cluster of the same size driven by
//! the same load generator through `etcd-client`, side by side with ratios.
//!
//! `launch` builds `meta-srv` and this crate in release mode (with feature `etcd` when
//! asked) and re-runs itself as `target/release/xtask bench-run ...`, so the load
//! generator is optimised too.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use clap::{Args, Subcommand};
use common_meta::kv::{BatchPutRequest, KvBackend, PutRequest, RangeRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::{root, run as run_command};

/// The benchmarks.
#[derive(Subcommand, Clone, Debug)]
pub enum BenchTask {
    /// KV put and get against a cluster (and etcd with --vs-etcd).
    Kv(KvArgs),
    /// Procedures of three persisted steps on the sled and raft backends.
    Procedure(ProcedureArgs),
    /// Heartbeats of simulated datanodes to one leader.
    Heartbeat(crate::bench_heartbeat::HeartbeatArgs),
    /// Tables created and dropped through DDL procedures, with simulated datanodes.
    Ddl(crate::bench_ddl::DdlArgs),
    /// Regions moved off a drained and then a killed datanode.
    Failover(crate::bench_failover::FailoverArgs),
    /// Many watchers over one prefix while one writer puts (and etcd with --vs-etcd).
    Watch(crate::bench_watch::WatchArgs),
    /// Many leases kept alive: what the leader spends.
    Lease(crate::bench_lease::LeaseArgs),
    /// Timestamps from the oracle through meta-client's TsoClient.
    Tso(crate::bench_tso::TsoArgs),
    /// The range route catalog: 100,000 routes, lookups, split propagation to clients.
    Routes(crate::bench_routes::RoutesArgs),
}

/// Settings of `bench procedure`.
#[derive(Args, Clone, Debug)]
pub struct ProcedureArgs {
    /// Procedures in flight at once; one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

impl ProcedureArgs {
    fn to_args(&self) -> Vec<String> {
        let concurrency: Vec<String> = self.concurrency.iter().map(ToString::to_string).collect();
        vec![
            "procedure".into(),
            format!("--concurrency={}", concurrency.join(",")),
            format!("--seconds={}", self.seconds),
        ]
    }
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
    /// Cluster size: 1 or 3 members.
    #[arg(long, default_value_t = 1)]
    members: usize,
    /// Also run a same-size etcd cluster (Debian's etcd-server) with the same load.
    #[arg(long)]
    vs_etcd: bool,
    /// Write without client sessions (not exactly-once), to measure what they cost.
    #[arg(long)]
    no_sessions: bool,
    /// Run only the put workload (profiling the write path).
    #[arg(long)]
    puts_only: bool,
    /// Run meta-srv twice in one invocation, with auth on (every client a root user
    /// with its token) and off, and print the ratio: what auth costs a request.
    #[arg(long, conflicts_with = "vs_etcd")]
    auth: bool,
    /// The API meta-srv is driven through: `native` (meta-client) or `etcd` (the same
    /// etcd-client that drives etcd, so a ratio compares the servers only).
    #[arg(long, value_enum, default_value_t = Api::Native)]
    api: Api,
}

/// The API a benchmark drives meta-srv through.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// meta.v1 through meta-client.
    Native,
    /// etcd's v3 API through etcd-client.
    Etcd,
}

impl KvArgs {
    fn to_args(&self) -> Vec<String> {
        let clients: Vec<String> = self.clients.iter().map(ToString::to_string).collect();
        let mut args = vec![
            "kv".into(),
            format!("--clients={}", clients.join(",")),
            format!("--seconds={}", self.seconds),
            format!("--value-size={}", self.value_size),
            format!("--keys={}", self.keys),
            format!("--members={}", self.members),
        ];
        if self.vs_etcd {
            args.push("--vs-etcd".into());
        }
        if self.no_sessions {
            args.push("--no-sessions".into());
        }
        if self.puts_only {
            args.push("--puts-only".into());
        }
        if self.auth {
            args.push("--auth".into());
        }
        if self.api == Api::Etcd {
            args.push("--api=etcd".into());
        }
        args
    }
}

/// Builds release binaries and runs the load generator from the release build.
pub fn launch(task: &BenchTask) -> anyhow::Result<()> {
    // (arguments for bench-run, whether a release meta-srv is needed, the etcd side)
    let (args, server, etcd) = match task {
        BenchTask::Kv(args) => (args.to_args(), true, args.vs_etcd || args.api == Api::Etcd),
        BenchTask::Heartbeat(args) => (args.to_args(), true, false),
        BenchTask::Ddl(args) => (args.to_args(), true, false),
        BenchTask::Failover(args) => (args.to_args(), true, false),
        BenchTask::Watch(args) => (args.to_args(), true, args.vs_etcd),
        BenchTask::Lease(args) => (args.to_args(), true, false),
        BenchTask::Tso(args) => (args.to_args(), true, false),
        BenchTask::Routes(args) => (args.to_args(), true, false),
        BenchTask::Procedure(args) => (args.to_args(), false, false),
    };
    if etcd && !matches!(task, BenchTask::Kv(KvArgs { vs_etcd: false, .. })) {
        which("etcd").context(
            "etcd is not installed: `apt-get install etcd-server` (Debian's package) and retry",
        )?;
    }
    if etcd {
        which("protoc").context(
            "the etcd client needs protoc to build: `apt-get install protobuf-compiler` and retry",
        )?;
    }
    let mut build = Command::new("cargo");
    build.args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--bin",
        "xtask",
    ]);
    if server {
        build.args(["-p", "meta-srv", "--bin", "meta-srv"]);
    }
    if etcd {
        build.args(["--features", "xtask/etcd"]);
    }
    run_command(&mut build)?;
    run_command(
        Command::new(root().join("target/release/xtask"))
            .arg("bench-run")
            .args(args),
    )
}

fn which(program: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        bail!("{program} not found on PATH")
    }
}

/// Runs a benchmark (called in the release build).
pub fn run(task: BenchTask) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match task {
        BenchTask::Kv(args) => runtime.block_on(kv(args)),
        BenchTask::Procedure(args) => {
            runtime.block_on(crate::bench_procedure::run(args.concurrency, args.seconds))
        }
        BenchTask::Heartbeat(args) => runtime.block_on(crate::bench_heartbeat::run(args)),
        BenchTask::Ddl(args) => runtime.block_on(crate::bench_ddl::run(args)),
        BenchTask::Failover(args) => runtime.block_on(crate::bench_failover::run(args)),
        BenchTask::Watch(args) => runtime.block_on(crate::bench_watch::run(args)),
        BenchTask::Lease(args) => runtime.block_on(crate::bench_lease::run(args)),
        BenchTask::Tso(args) => runtime.block_on(crate::bench_tso::run(args)),
        BenchTask::Routes(args) => runtime.block_on(crate::bench_routes::run(args)),
    }
}

/// Processes killed on drop.
pub struct Processes {
    children: Vec<Child>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Processes {
    /// The process id of the `i`th process.
    pub fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `n` loopback ports that were free a moment ago.
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

/// A release meta-srv cluster of `members`; returns its processes and client endpoints.
async fn start_meta(members: usize) -> anyhow::Result<(Processes, Vec<String>)> {
    start_meta_with(members, None).await
}

/// Like [`start_meta`], every member also reading the TOML `config`.
pub async fn start_meta_with(
    members: usize,
    config: Option<&str>,
) -> anyhow::Result<(Processes, Vec<String>)> {
    let binary = root().join("target/release/meta-srv");
    let addrs: Vec<String> = free_ports(members)?
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let initial: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let mut procs = Processes {
        children: Vec::new(),
        _dirs: Vec::new(),
    };
    for (i, addr) in addrs.iter().enumerate() {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(&binary);
        command
            .arg("start")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--node-id", &(i + 1).to_string()])
            .args(["--listen-addr", addr, "--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if members > 1 {
            command.args(["--initial-cluster", &initial.join(",")]);
        }
        if let Some(config) = config {
            let path = dir.path().join("bench.toml");
            std::fs::write(&path, config)?;
            command.arg("--config").arg(path);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        procs.children.push(child);
        procs._dirs.push(dir);
        if !line.starts_with("meta-srv listening") {
            bail!("meta-srv member {} did not start: {line:?}", i + 1);
        }
    }
    // Ready when a write commits.
    let client = MetaClient::new(&addrs, MetaClientOptions::default())?;
    client.put(PutRequest::new("ready", "1")).await?;
    Ok((procs, addrs))
}

/// A load generator's view of a system.
#[async_trait]
pub(crate) trait Target: Send + Sync {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()>;
    async fn get(&self, key: Vec<u8>, serializable: bool) -> anyhow::Result<()>;
}

struct MetaTarget(MetaClient);

#[async_trait]
impl Target for MetaTarget {
    async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
        self.0.put(PutRequest::new(key, value)).await?;
        Ok(())
    }

    async fn get(&self, key: Vec<u8>, serializable: bool) -> anyhow::Result<()> {
        let request = RangeRequest::key(key);
        if serializable {
            self.0.range_serializable(request).await?;
        } else {
            self.0.range(request).await?;
        }
        Ok(())
    }
}

/// Which system a run drives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Meta,
    /// meta-srv with auth on, every client logged in as root.
    MetaAuth,
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Etcd,
}

async fn connect(
    system: System,
    endpoints: &[String],
    args: &KvArgs,
) -> anyhow::Result<Arc<dyn Target>> {
    let options = MetaClientOptions {
        session_ttl: if args.no_sessions {
            None
        } else {
            MetaClientOptions::default().session_ttl
        },
        credentials: (system == System::MetaAuth).then(root_credentials),
        ..MetaClientOptions::default()
    };
    match (system, args.api) {
        (System::Meta | System::MetaAuth, Api::Native) => {
            Ok(Arc::new(MetaTarget(MetaClient::new(endpoints, options)?)))
        }
        (System::Meta | System::MetaAuth, Api::Etcd) | (System::Etcd, _) => {
            etcd::connect(endpoints).await
        }
    }
}

/// The user every client of an auth run logs in as.
fn root_credentials() -> meta_client::Credentials {
    meta_client::Credentials {
        user: "root".to_string(),
        password: "bench-root-password".to_string(),
    }
}

/// Adds user root with the root role and enables auth.
async fn enable_auth(endpoints: &[String]) -> anyhow::Result<()> {
    use meta_proto::etcd::etcdserverpb as epb;
    let client = MetaClient::new(endpoints, MetaClientOptions::default())?;
    let root = root_credentials();
    let add = epb::AuthUserAddRequest {
        name: root.user.clone(),
        password: root.password.clone(),
        ..Default::default()
    };
    client
        .with_auth(|mut c| {
            let add = add.clone();
            async move { c.user_add(add).await }
        })
        .await?;
    let grant = epb::AuthUserGrantRoleRequest {
        user: root.user.clone(),
        role: "root".to_string(),
    };
    client
        .with_auth(|mut c| {
            let grant = grant.clone();
            async move { c.user_grant_role(grant).await }
        })
        .await?;
    client
        .with_auth(|mut c| async move { c.auth_enable(epb::AuthEnableRequest {}).await })
        .await?;
    Ok(())
}

/// The etcd side (etcd processes, etcd-client); without the `etcd` feature, stubs that
/// say how to get it.
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
#[cfg(not(feature = "etcd"))]
#[path = "bench/no_etcd.rs"]
pub(crate) mod etcd;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Put,
    Get,
    SerializableGet,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Get => "get",
            Workload::SerializableGet => "get (serializable)",
        }
    }
}

/// One run's merged latencies.
struct Outcome {
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Outcome {
    fn ops_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let rank = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)].as_secs_f64() * 1e3
    }
}

/// The floor of a durable write here: 4 KiB appended to a file in the temporary
/// directory (where the members' data directories are) and fsynced, 200 times; the p50
/// and p99 in milliseconds.
fn append_fsync_ms() -> anyhow::Result<(f64, f64)> {
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let mut file = std::fs::File::create(dir.path().join("probe"))?;
    let block = vec![0u8; 4096];
    let mut times = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[100], times[198]))
}

fn key(i: usize) -> Vec<u8> {
    format!("{i:08}").into_bytes()
}

async fn preload(target: &dyn Target, keys: usize, value: &[u8]) -> anyhow::Result<()> {
    for i in 0..keys {
        target.put(key(i), value.to_vec()).await?;
    }
    Ok(())
}

async fn kv(args: KvArgs) -> anyhow::Result<()> {
    if args.members != 1 && args.members != 3 {
        bail!("--members must be 1 or 3");
    }
    let value = vec![b'v'; args.value_size];
    let mut systems = vec![System::Meta];
    if args.vs_etcd {
        systems.push(System::Etcd);
    }
    if args.auth {
        systems = vec![System::MetaAuth, System::Meta];
    }
    let workloads = if args.puts_only {
        vec![Workload::Put]
    } else if args.members > 1 || args.vs_etcd {
        vec![Workload::Put, Workload::Get, Workload::SerializableGet]
    } else {
        vec![Workload::Put, Workload::Get]
    };

    // results[system][workload][clients]
    let mut results = Vec::new();
    for &system in &systems {
        let (procs, endpoints) = match system {
            System::Meta => start_meta(args.members).await?,
            System::MetaAuth => {
                let started = start_meta(args.members).await?;
                enable_auth(&started.1).await?;
                started
            }
            System::Etcd => etcd::start(args.members).await?,
        };
        // Every key exists before the first get run.
        let loader = connect(system, &endpoints, &args).await?;
        if system != System::Etcd {
            let client = MetaClient::new(
                &endpoints,
                MetaClientOptions {
                    credentials: (system == System::MetaAuth).then(root_credentials),
                    ..MetaClientOptions::default()
                },
            )?;
            for chunk in (0..args.keys).collect::<Vec<_>>().chunks(100) {
                let kvs = chunk.iter().map(|&i| (key(i), value.clone())).collect();
                client
                    .batch_put(BatchPutRequest {
                        kvs,
                        prev_kv: false,
                    })
                    .await?;
            }
        } else {
            preload(loader.as_ref(), args.keys, &value).await?;
        }
        let mut per_workload = Vec::new();
        for &workload in &workloads {
            let mut per_clients = Vec::new();
            for &clients in &args.clients {
                per_clients
                    .push(drive(system, &endpoints, clients, workload, &args, &value).await?);
            }
            per_workload.push(per_clients);
        }
        drop(procs);
        results.push(per_workload);
    }

    println!(
        "kv benchmark: {} member(s) per system on loopback, fsync on, release builds, {} cores",
        args.members,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let fsync = append_fsync_ms()?;
    println!(
        "disk: one 4 KiB append + fsync where the data directories live: p50 {:.3} ms, p99 {:.3} ms (200 runs)",
        fsync.0, fsync.1
    );
    println!(
        "8-byte keys over {} keys, {}-byte values, {} s per run, one connection per client; {}",
        args.keys,
        args.value_size,
        args.seconds,
        match (args.api, args.no_sessions) {
            (Api::Etcd, _) => "meta-srv driven through etcd's API by etcd-client",
            (Api::Native, true) => "meta-client writes without sessions",
            (Api::Native, false) => "meta-client writes in client sessions (exactly-once)",
        }
    );
    if args.auth {
        println!(
            "left: auth on (clients log in as root, every request verified); right: auth off; ratio = on / off"
        );
    }
    let mut header = format!(
        "{:<20} {:>7} | {:>9} {:>8} {:>8}",
        "workload", "clients", "ops/s", "p50 ms", "p99 ms"
    );
    if args.vs_etcd || args.auth {
        header.push_str(&format!(
            " | {:>9} {:>8} {:>8} | {:>6}",
            if args.auth { "no auth/s" } else { "etcd/s" },
            "p50 ms",
            "p99 ms",
            "ratio"
        ));
    }
    println!("{header}");
    for (w, workload) in workloads.iter().enumerate() {
        for (c, clients) in args.clients.iter().enumerate() {
            let ours = &results[0][w][c];
            let mut line = format!(
                "{:<20} {:>7} | {:>9.0} {:>8.3} {:>8.3}",
                workload.name(),
                clients,
                ours.ops_per_sec(),
                ours.percentile_ms(0.50),
                ours.percentile_ms(0.99)
            );
            if let Some(theirs) = results.get(1).map(|r| &r[w][c]) {
                line.push_str(&format!(
                    " | {:>9.0} {:>8.3} {:>8.3} | {:>5.2}x",
                    theirs.ops_per_sec(),
                    theirs.percentile_ms(0.50),
                    theirs.percentile_ms(0.99),
                    ours.ops_per_sec() / theirs.ops_per_sec().max(f64::MIN_POSITIVE)
                ));
            }
            println!("{line}");
        }
    }
    Ok(())
}

async fn drive(
    system: System,
    endpoints: &[String],
    clients: usize,
    workload: Workload,
    args: &KvArgs,
    value: &[u8],
) -> anyhow::Result<Outcome> {
    let duration = Duration::from_secs(args.seconds);
    let value = Arc::new(value.to_vec());
    let mut targets = Vec::with_capacity(clients);
    for _ in 0..clients {
        targets.push(connect(system, endpoints, args).await?);
    }
    let started = Instant::now();
    let mut workers = Vec::with_capacity(clients);
    for (worker, target) in targets.into_iter().enumerate() {
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
                match workload {
                    Workload::Put => target.put(k, value.to_vec()).await?,
                    Workload::Get => target.get(k, false).await?,
                    Workload::SerializableGet => target.get(k, true).await?,
                }
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Ok(Outcome { elapsed, latencies })
}
