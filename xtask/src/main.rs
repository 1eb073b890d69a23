//! `cargo xtask`: development automation for the Metasrv workspace.
//!
//! - `ci`: runs `.ci/run`, exactly what CI runs.
//! - `codegen`: regenerates `docs/config.md` from `config/meta-srv.example.toml`.
//! - `check`: fails when a generated file is stale.
//! - `bench kv`: a load run against a release `meta-srv`.
//! - `bench procedure`: procedures per second on the sled and raft backends.
//! - `bench heartbeat`: heartbeats of simulated datanodes to one release leader.
//! - `bench ddl`: tables created and dropped per second through DDL procedures.
//! - `bench watch`: watch event latency and server cost, 10,000 watchers (vs etcd).
//! - `bench lease`: what keeping 100,000 leases alive costs the leader.
//! - `bench failover`: time to lead elsewhere every region of a drained, then a killed,
//!   datanode.
//! - `sim`: simulated datanodes against a running cluster.
//! - `fault --seeds N`: the randomized fault runs with N seeds, in release mode.
//! - `regions-chaos --seeds N`: seeded chaos against region failover (killed, stalled
//!   and cut-off datanodes, skewed clocks, a stopped meta leader), checked for two
//!   leaseholders of a region and writes outside a lease, in release mode.
//! - `compat etcd`: stock `etcdctl` against a `meta-srv`, answers checked against
//!   etcd's (and against a real etcd in the same run when one is installed).
//! - `fuzz TARGET --seconds N`: a fuzz target of `fuzz/` (or `all`), N seconds each.

mod bench;
mod bench_ddl;
mod bench_failover;
mod bench_heartbeat;
mod bench_lease;
mod bench_procedure;
mod bench_routes;
mod bench_tso;
mod bench_watch;
mod codegen;
mod compat;
mod fuzz;
mod sim;
mod ui_test;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Metasrv development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run exactly what CI runs (.ci/run).
    Ci,
    /// Regenerate the generated files (docs/config.md).
    Codegen,
    /// Fail when a generated file is stale.
    Check,
    /// Benchmarks against a release build.
    #[command(subcommand)]
    Bench(bench::BenchTask),
    /// Randomized fault runs (kill, restart, partition, delay) checked for
    /// linearizability, in release mode.
    Fault {
        /// How many seeds to run.
        #[arg(long, default_value_t = 200)]
        seeds: u64,
        /// The first seed (a failure prints the seed to rerun).
        #[arg(long, default_value_t = 1)]
        base_seed: u64,
    },
    /// Seeded chaos against region failover, checked by the lease history checker, in
    /// release mode.
    RegionsChaos {
        /// How many seeds to run.
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        /// The first seed (a failure prints the seed to rerun).
        #[arg(long, default_value_t = 1)]
        base_seed: u64,
    },
    /// Run stock client tools against meta-srv and compare with the real system:
    /// `etcd` (etcdctl from Debian's etcd-client, and etcd itself when installed).
    Compat {
        /// The system whose tools to run: etcd.
        target: String,
    },
    /// Run a fuzz target (or `all`) with cargo-fuzz on the nightly toolchain.
    Fuzz {
        /// typed_keys, raft_entry, procedure_record, txn_differential, or all.
        target: String,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Simulated datanodes heartbeating to a running cluster, answering instructions.
    Sim(sim::SimArgs),
    /// The dashboard in headless Chromium, against a server with simulated nodes.
    UiTest(ui_test::UiArgs),
    /// (internal) The load generator, run by `bench` from a release build of xtask.
    #[command(hide = true, subcommand)]
    BenchRun(bench::BenchTask),
}

/// The workspace root.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Ci => run(Command::new("bash").arg(root().join(".ci/run"))),
        Task::Codegen => codegen::write_all(),
        Task::Check => codegen::check_all(),
        Task::Bench(task) => bench::launch(&task),
        Task::Fault { seeds, base_seed } => {
            seeded_release_tests("fault::", "FAULT", seeds, base_seed)
        }
        Task::RegionsChaos { seeds, base_seed } => {
            seeded_release_tests("regions::chaos::", "CHAOS", seeds, base_seed)
        }
        Task::BenchRun(task) => bench::run(task),
        Task::Fuzz { target, seconds } => fuzz::run(&target, seconds),
        Task::Compat { target } => compat::run(&target),
        Task::UiTest(args) => ui_test::run(args),
        Task::Sim(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(sim::run(args)),
    }
}

/// Runs meta-srv's integration tests matching `filter` in release mode with
/// `METASRV_{kind}_SEEDS` and `METASRV_{kind}_BASE_SEED` set.
fn seeded_release_tests(
    filter: &str,
    kind: &str,
    seeds: u64,
    base_seed: u64,
) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "meta-srv",
            "--test",
            "integration",
            filter,
        ])
        .args(["--", "--nocapture"])
        .env(format!("METASRV_{kind}_SEEDS"), seeds.to_string())
        .env(format!("METASRV_{kind}_BASE_SEED"), base_seed.to_string()))
}

/// Runs a command in the workspace root and fails unless it succeeds.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command
        .current_dir(root())
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}
