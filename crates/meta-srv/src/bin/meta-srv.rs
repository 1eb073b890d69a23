//! `meta-srv`: runs a Metasrv member.
//!
//! `meta-srv start` with no flags runs the embedded default: one member on
//! `./meta-data`, gRPC on 127.0.0.1:3002, HTTP on 127.0.0.1:4002. Once both ports are
//! bound it prints `meta-srv listening grpc=ADDR http=ADDR` on standard output (tests
//! and scripts wait for that line); logs go to standard error.
//!
//! `meta-srv restore --from FILE` fills a new data directory from a backup (see
//! `meta_srv::backup`) and prints one line saying what it restored.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use meta_srv::backup::{self, RestoreTarget};
use meta_srv::cli::{EXIT_FAILURE, EXIT_USAGE, parse_or_exit};
use meta_srv::config::{LogFormat, LoggingConfig, Overrides};
use meta_srv::{Config, MetaSrv};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "meta-srv",
    version,
    about = "Metasrv: raft-replicated metadata service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a member (flags win over METASRV_* env vars, which win over the file).
    Start(Box<StartArgs>),
    /// Fill a new data directory from a backup (`etcdctl snapshot save`), for a new
    /// cluster with the same data; run it for every member with the same file and
    /// --initial-cluster, then start each with the same flags.
    Restore(RestoreArgs),
}

#[derive(Args)]
struct RestoreArgs {
    /// The backup file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// TOML config file the member will start with (its cluster_token, node_id,
    /// initial_cluster and data_dir are used).
    #[arg(long, env = "METASRV_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The new data directory; must not exist or be empty [default: ./meta-data].
    #[arg(long, env = "METASRV_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// This member's id in the new cluster [default: 1].
    #[arg(long, env = "METASRV_NODE_ID", value_name = "ID")]
    node_id: Option<u64>,
    /// Members of the new cluster: ID=HOST:PORT,... [default: this node alone].
    #[arg(long, env = "METASRV_INITIAL_CLUSTER", value_name = "ID=HOST:PORT,...")]
    initial_cluster: Option<String>,
}

#[derive(Args)]
struct StartArgs {
    /// TOML config file (see config/meta-srv.example.toml).
    #[arg(long, env = "METASRV_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: ./meta-data].
    #[arg(long, env = "METASRV_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC address for clients [default: 127.0.0.1:3002].
    #[arg(long, env = "METASRV_LISTEN_ADDR", value_name = "HOST:PORT")]
    listen_addr: Option<SocketAddr>,
    /// HTTP admin address [default: 127.0.0.1:4002].
    #[arg(long, env = "METASRV_HTTP_ADDR", value_name = "HOST:PORT")]
    http_addr: Option<SocketAddr>,
    /// This member's id [default: 1].
    #[arg(long, env = "METASRV_NODE_ID", value_name = "ID")]
    node_id: Option<u64>,
    /// Members of a new cluster: ID=HOST:PORT,... [default: this node alone].
    #[arg(long, env = "METASRV_INITIAL_CLUSTER", value_name = "ID=HOST:PORT,...")]
    initial_cluster: Option<String>,
    /// Join a running cluster through these members (after `metactl member add`).
    #[arg(long, env = "METASRV_JOIN", value_name = "HOST:PORT,...")]
    join: Option<String>,
    /// Secret that join tokens are made with; nodes then need one to register. Prefer
    /// the environment variable or the file: flags show in process listings.
    #[arg(
        long,
        env = "METASRV_CLUSTER_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// Log lines as `text` or `json` (one object per line) [default: text].
    #[arg(long, env = "METASRV_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log level, or per-module filters (`info,meta_srv::raft=debug`) [default: info].
    /// RUST_LOG, when set, wins.
    #[arg(long, env = "METASRV_LOG_LEVEL", value_name = "FILTER")]
    log_level: Option<String>,
    /// TLS on the gRPC port: this member's PEM certificate (with --tls-key).
    #[arg(long, env = "METASRV_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "METASRV_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA the other members' certificates are verified with.
    #[arg(long, env = "METASRV_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: clients and members must present a certificate of this PEM CA.
    #[arg(long, env = "METASRV_TLS_CLIENT_CA", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match parse_or_exit::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Start(args) => start(*args),
        Command::Restore(args) => restore(args),
    }
}

fn restore(args: RestoreArgs) -> ExitCode {
    let overrides = Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        initial_cluster: args.initial_cluster,
        ..Overrides::default()
    };
    let target = Config::load(args.config.as_deref(), overrides).and_then(|config| {
        Ok(RestoreTarget {
            cluster: config.cluster()?,
            data_dir: config.data_dir,
            node_id: config.node_id,
            cluster_token: config.cluster_token,
        })
    });
    let target = match target {
        Ok(target) => target,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match backup::restore(&args.from, &target) {
        Ok(restored) => {
            println!(
                "restored revision {} ({} keys, from cluster {:016x}) into {}: member {} of new cluster {:016x}",
                restored.backup.revision,
                restored.keys,
                restored.backup.source_cluster,
                target.data_dir.display(),
                target.node_id,
                restored.cluster_id,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn start(args: StartArgs) -> ExitCode {
    let overrides = Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        listen_addr: args.listen_addr,
        http_addr: args.http_addr,
        initial_cluster: args.initial_cluster,
        join: args.join,
        cluster_secret: args.cluster_secret,
        log_format: args.log_format,
        log_level: args.log_level,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_ca: args.tls_ca,
        tls_client_ca: args.tls_client_ca,
    };
    let config = match Config::load(args.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = init_logging(&config.logging) {
        eprintln!("error: {e:#}");
        return ExitCode::from(EXIT_USAGE);
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the async runtime")
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// How long `serve` has to stop by itself after a failure before the process exits.
const FAIL_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn run(config: Config) -> anyhow::Result<()> {
    let server = MetaSrv::bind(config).await?;
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "meta-srv listening grpc={} http={}",
        server.grpc_addr(),
        server.http_addr()
    )?;
    stdout.flush()?;
    // Fail-stop, whatever state the runtime is in: a member whose storage failed may
    // have tokio workers stuck behind it, so a plain thread makes sure the process ends
    // shortly after the failure even if `serve` cannot return.
    let failure = server.failure();
    std::thread::Builder::new()
        .name("fail-stop".to_string())
        .spawn(move || {
            loop {
                // A periodic look at a flag on its own thread, not a synchronisation.
                std::thread::sleep(std::time::Duration::from_millis(200));
                if let Some(reason) = failure.borrow().clone() {
                    std::thread::sleep(FAIL_STOP_GRACE);
                    eprintln!("error: the member failed and stops: {reason}");
                    std::process::exit(i32::from(EXIT_FAILURE));
                }
            }
        })
        .context("starting the fail-stop thread")?;
    match server.serve(shutdown_signal()).await {
        Err(e @ meta_srv::Error::Failed { .. }) => {
            // Fail-stop: exit now. Dropping the runtime and the database would wait on
            // blocked storage work, and flush a store that can no longer be trusted.
            eprintln!("error: {e}");
            std::process::exit(i32::from(EXIT_FAILURE));
        }
        other => other?,
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

fn init_logging(logging: &LoggingConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) => EnvFilter::try_new(&from_env)
            .with_context(|| format!("invalid RUST_LOG {from_env:?}"))?,
        Err(_) => EnvFilter::try_new(&logging.level)
            .with_context(|| format!("invalid logging.level {:?}", logging.level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match logging.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("initialising logging: {e}"))
}
