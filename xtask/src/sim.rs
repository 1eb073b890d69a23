//! `cargo xtask sim`: simulated datanodes against a running cluster, for manual runs and
//! demos: they register, report region stats, answer instructions, and the simulator
//! prints what they see every few seconds.

use std::time::{Duration, Instant};

use common_meta::model::join_token::JoinTokenSigner;
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{MetaClient, MetaClientOptions};

use crate::bench_heartbeat::measure;

/// Settings of `sim`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimArgs {
    /// Members to reach, HOST:PORT separated by commas.
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    /// Simulated datanodes.
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Regions each datanode holds.
    #[arg(long, default_value_t = 10)]
    pub regions_per_node: usize,
    /// The first node id (the others follow).
    #[arg(long, default_value_t = 1)]
    pub first_node_id: u64,
    /// Fraction of regions whose stats change per beat.
    #[arg(long, default_value_t = 0.01)]
    pub churn: f64,
    /// Seconds to run; 0 runs until interrupted.
    #[arg(long, default_value_t = 0)]
    pub duration: u64,
    /// Seconds over which the node starts are spread.
    #[arg(long, default_value_t = 0)]
    pub ramp: u64,
    /// The cluster secret, when the cluster requires join tokens: each node gets a
    /// token made with it (and registered) before it starts.
    #[arg(
        long,
        env = "METASRV_CLUSTER_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub cluster_secret: Option<String>,
    /// Leave the nodes joining instead of activating them (only active datanodes
    /// get new regions).
    #[arg(long)]
    pub no_activate: bool,
    /// Each node writes the regions it may write (its leader leases) this often, in
    /// ms; 0 writes nothing.
    #[arg(long, default_value_t = 200)]
    pub write_every_ms: u64,
}

/// Runs the simulator until the duration ends or Ctrl-C.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let options = SimOptions {
        nodes: args.nodes,
        first_node_id: args.first_node_id,
        regions_per_node: args.regions_per_node,
        churn: args.churn,
        ramp: Duration::from_secs(args.ramp),
        write_every: Duration::from_millis(args.write_every_ms),
        ..SimOptions::default()
    };
    let mut tokens = std::collections::HashMap::new();
    if let Some(secret) = &args.cluster_secret {
        let signer = JoinTokenSigner::new(secret.as_bytes())?;
        let client = MetaClient::new(&args.endpoints, MetaClientOptions::default())?;
        let expires = common_meta::time::unix_ms() + 600_000;
        for i in 0..args.nodes as u64 {
            let id = args.first_node_id + i;
            let token = signer.mint(id, expires)?;
            client.register_join_token(&token).await?;
            tokens.insert(id, token);
        }
    }
    let sim = Simulator::start_with_tokens(&args.endpoints, &options, |id| {
        tokens.get(&id).cloned().unwrap_or_default()
    })
    .await?;
    if !args.no_activate {
        // As an operator would with `metactl node activate`: the nodes then take the
        // regions of new tables.
        let client = MetaClient::new(&args.endpoints, MetaClientOptions::default())?;
        sim.activate(&client, Duration::from_secs(30)).await?;
        println!("{} simulated datanodes active", args.nodes);
    }
    let started = Instant::now();
    let report = async {
        loop {
            let window = measure(&sim, Duration::from_secs(5)).await;
            println!(
                "{:>5.0}s connected {}/{} | {:.0} heartbeats/s | {:.0} region stats/s | RTT p50 {:.2} ms p99 {:.2} ms | instructions handled {}",
                started.elapsed().as_secs_f64(),
                sim.connected(),
                args.nodes,
                window.beats_per_sec,
                window.regions_per_sec,
                window.rtt_ms(0.5),
                window.rtt_ms(0.99),
                sim.instructions_handled()
            );
            let refused: Vec<_> = sim
                .states()
                .into_iter()
                .filter_map(|(id, s)| Some((id, s.last_error?)))
                .take(3)
                .collect();
            for (id, error) in refused {
                println!("      node {id} refused: {error}");
            }
        }
    };
    let until = async {
        if args.duration == 0 {
            std::future::pending::<()>().await;
        } else {
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
        }
    };
    tokio::select! {
        () = report => {}
        () = until => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
