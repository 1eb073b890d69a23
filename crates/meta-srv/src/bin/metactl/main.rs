//! `metactl`: the operator's CLI for a Metasrv cluster.
//!
//! Exit codes: 0 success; 1 failure (unreachable cluster, refused request, key not
//! found); 2 usage error. Errors are one line on standard error.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use common_meta::kv::KeyValue;
use common_meta::model::join_token::JoinTokenSigner;
use meta_client::{MetaClient, MetaClientOptions};
use meta_srv::cli::{EXIT_FAILURE, parse_or_exit};
use serde_json::json;

mod auth;
mod kv;
mod lease;
mod regions;
mod routes;
mod snapshot;
mod tables;
mod tso;

use kv::{KvCommand, kv};
use lease::{LeaseCommand, lease};

#[derive(Parser)]
#[command(
    name = "metactl",
    version,
    about = "Inspect and steer a Metasrv cluster"
)]
struct Cli {
    /// Comma-separated member addresses.
    #[arg(
        long,
        global = true,
        env = "METACTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:3002"
    )]
    endpoints: Vec<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// TLS: the PEM CA the members' certificates are checked with.
    #[arg(long, global = true, env = "METACTL_CACERT", value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's PEM certificate (with --key).
    #[arg(
        long = "cert",
        id = "tls_cert",
        global = true,
        env = "METACTL_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// Mutual TLS: the PEM key of --cert.
    #[arg(
        long = "key",
        id = "tls_key",
        global = true,
        env = "METACTL_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Act as this user when the cluster has auth enabled: NAME or NAME:PASSWORD.
    #[arg(
        long,
        global = true,
        env = "METACTL_USER",
        value_name = "NAME[:PASSWORD]"
    )]
    user: Option<String>,
    /// The password of --user (when not given as NAME:PASSWORD).
    #[arg(long, global = true, env = "METACTL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Plain text for people.
    Text,
    /// One JSON document for scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Read and write keys (UTF-8 text).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Leases: keys that live as long as their lease is kept alive.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// This member's raft view: role, leader, term, indexes, members.
    Status,
    /// List and change the members of the cluster.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Procedures run by the leader.
    #[command(subcommand)]
    Procedure(ProcedureCommand),
    /// Registered nodes: id, role, address, state, liveness, phi, last heartbeat, regions.
    Nodes,
    /// Change a node's topology state.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Join tokens (when the cluster has a cluster_secret).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Databases (schemas): create, drop, list.
    #[command(subcommand)]
    Db(tables::DbCommand),
    /// Tables: create, drop, show, list, alter, truncate, rename, route (where its
    /// regions are).
    #[command(subcommand)]
    Table(tables::TableCommand),
    /// The range route catalog: list, show KEY, split KEY, merge ID, move ID.
    #[command(subcommand)]
    Route(routes::RouteCommand),
    /// Regions: move one, show one.
    #[command(subcommand)]
    Region(regions::RegionCommand),
    /// Users: add, delete, list, get, passwd, grant-role, revoke-role.
    #[command(subcommand)]
    User(auth::UserCommand),
    /// Roles and their permissions on key ranges.
    #[command(subcommand)]
    Role(auth::RoleCommand),
    /// Turn auth on or off, or show whether it is on.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Maintenance mode: pause (on) or resume (off) automatic failover and balancing.
    #[command(subcommand)]
    Maintenance(regions::SwitchCommand),
    /// The balancer of leader regions across datanodes.
    #[command(subcommand)]
    Balance(regions::SwitchCommand),
    /// Backups of a member's store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Timestamps from the leader's oracle: timestamp, physical time (UTC), logical.
    Tso {
        /// How many consecutive timestamps (1 to 10000).
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Save a backup of the first endpoint's store (consistent at one revision,
    /// checksummed) to FILE; `meta-srv restore --from FILE` starts a new cluster from
    /// it.
    Save { file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a one-use token node ID joins with (its handshake's join_token), register
    /// it with the cluster, and print it. Needs the cluster secret.
    Create {
        /// The node the token admits.
        #[arg(long)]
        node: u64,
        /// How long the token can be used to join: 500ms, 30s, 10m, 2h, 7d.
        #[arg(long, default_value = "10m", value_parser = meta_srv::cli::parse_duration)]
        ttl: Duration,
        /// The cluster secret the members have. Prefer the environment variable: flags
        /// show in process listings.
        #[arg(
            long,
            env = "METASRV_CLUSTER_SECRET",
            hide_env_values = true,
            value_name = "SECRET"
        )]
        cluster_secret: String,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Joining -> Active (or cancel a drain).
    Activate { id: u64 },
    /// Active -> Draining: no new regions; its leader regions move away (then
    /// decommission it).
    Drain { id: u64 },
    /// Draining -> Decommissioned.
    Decommission { id: u64 },
    /// Remove a decommissioned node.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum ProcedureCommand {
    /// List procedures (id, type, state, step).
    List,
    /// Show one procedure: type, state, step, error, timestamps.
    Show { id: String },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// List members (id, address, voter or learner).
    List,
    /// Add member ID at ADDR as a learner; start it afterwards with --join.
    Add { id: u64, addr: String },
    /// Make learner ID a voter.
    Promote { id: u64 },
    /// Remove member ID.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum LeaderCommand {
    /// Hand leadership to voter ID.
    Transfer { id: u64 },
}

/// A failure already phrased for the operator.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match parse_or_exit::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: building the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("{message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let tls = match (&cli.cacert, &cli.tls_cert, &cli.tls_key) {
        (None, None, None) => None,
        (None, _, _) => {
            return Err(Failure(
                "error: --cert and --key need --cacert (the CA the members are checked with)"
                    .to_string(),
            ));
        }
        (Some(ca), cert, key) => Some(
            meta_client::ClientTls::from_files(ca, cert.as_deref().zip(key.as_deref()))
                .map_err(|e| Failure(format!("error: {e}")))?,
        ),
    };
    let credentials = match (&cli.user, &cli.password) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(Failure("error: --password needs --user".to_string()));
        }
        (Some(user), password) => {
            let (name, inline) = match user.split_once(':') {
                Some((name, password)) => (name, Some(password.to_string())),
                None => (user.as_str(), None),
            };
            let Some(password) = password.clone().or(inline) else {
                return Err(Failure(format!(
                    "error: --user {name} needs a password: --user {name}:PASSWORD, --password or METACTL_PASSWORD"
                )));
            };
            Some(meta_client::Credentials {
                user: name.to_string(),
                password,
            })
        }
    };
    let options = MetaClientOptions {
        deadline: Duration::from_secs(5),
        tls,
        credentials,
        ..MetaClientOptions::default()
    };
    let client =
        MetaClient::new(&cli.endpoints, options).map_err(|e| Failure(format!("error: {e}")))?;
    let result = match cli.command {
        Command::Kv(command) => kv(&client, command, cli.output).await,
        Command::Lease(command) => lease(&client, command, cli.output).await,
        Command::Status => status(&client, cli.output).await,
        Command::Tso { count } => tso::tso(&client, count, cli.output).await,
        Command::Snapshot(SnapshotCommand::Save { file }) => {
            snapshot::save(&client, &cli.endpoints, &file, cli.output).await
        }
        Command::Member(command) => member(&client, command, cli.output).await,
        Command::Procedure(command) => procedures(&client, command, cli.output).await,
        Command::Nodes => nodes(&client, cli.output).await,
        Command::Node(command) => node(&client, command, cli.output).await,
        Command::Db(command) => tables::db(&client, command, cli.output).await,
        Command::Table(command) => tables::table(&client, command, cli.output).await,
        Command::Route(command) => routes::route(&client, command, cli.output).await,
        Command::Region(command) => regions::region(&client, command, cli.output).await,
        Command::User(command) => auth::user(&client, command, cli.output).await,
        Command::Role(command) => auth::role(&client, command, cli.output).await,
        Command::Auth(command) => auth::auth(&client, command, cli.output).await,
        Command::Maintenance(command) => regions::maintenance(&client, command, cli.output).await,
        Command::Balance(command) => regions::balance(&client, command, cli.output).await,
        Command::Token(TokenCommand::Create {
            node,
            ttl,
            cluster_secret,
        }) => {
            let signer = JoinTokenSigner::new(cluster_secret.as_bytes())?;
            let expires = common_meta::time::unix_ms().saturating_add(ttl.as_millis() as u64);
            let token = signer.mint(node, expires)?;
            let (_, expires_at_ms) = client.register_join_token(&token).await?;
            print(
                cli.output,
                token.clone(),
                json!({ "node_id": node, "token": token, "expires_at_ms": expires_at_ms }),
            );
            Ok(())
        }
        Command::Leader(LeaderCommand::Transfer { id }) => {
            client.transfer_leader(id).await?;
            print(
                cli.output,
                format!("member {id} is the leader"),
                json!({ "leader_id": id }),
            );
            Ok(())
        }
    };
    result.map_err(|Failure(m)| {
        Failure(if m.starts_with("not found") || m.starts_with("error: ") {
            m
        } else {
            format!("error: {m}")
        })
    })
}

async fn node(client: &MetaClient, command: NodeCommand, output: Output) -> Result<(), Failure> {
    use meta_proto::v1::NodeState;
    let (id, state) = match command {
        NodeCommand::Activate { id } => (id, NodeState::Active),
        NodeCommand::Drain { id } => {
            let left = client.drain_node(id).await?;
            print(
                output,
                format!("node {id} is draining; {left} leader regions to move"),
                json!({ "id": id, "state": "draining", "leader_regions": left }),
            );
            return Ok(());
        }
        NodeCommand::Decommission { id } => (id, NodeState::Decommissioned),
        NodeCommand::Remove { id } => {
            client.remove_node(id).await?;
            print(
                output,
                format!("node {id} removed"),
                json!({ "removed": id }),
            );
            return Ok(());
        }
    };
    let node = client.set_node_state(id, state).await?;
    print(
        output,
        format!("node {} is {}", node.node_id, state_name(node.state)),
        json!({ "id": node.node_id, "state": state_name(node.state) }),
    );
    Ok(())
}

/// How people read a wire enum: its proto name without the enum's prefix, lower case
/// (`NODE_STATE_ACTIVE` -> `active`); an unknown number shows as it is.
fn wire_name(name: Option<&str>, prefix: &str, raw: i32) -> String {
    name.map_or_else(
        || raw.to_string(),
        |n| n.strip_prefix(prefix).unwrap_or(n).to_ascii_lowercase(),
    )
}

fn role_name(raw: i32) -> String {
    let name = meta_proto::v1::NodeRole::try_from(raw).ok();
    wire_name(name.as_ref().map(|n| n.as_str_name()), "NODE_ROLE_", raw)
}

fn state_name(raw: i32) -> String {
    let name = meta_proto::v1::NodeState::try_from(raw).ok();
    wire_name(name.as_ref().map(|n| n.as_str_name()), "NODE_STATE_", raw)
}

fn liveness_name(raw: i32) -> String {
    meta_proto::v1::Liveness::try_from(raw).map_or_else(
        |_| raw.to_string(),
        |l| meta_srv::cluster_plane::live_nodes::liveness_name(l).to_string(),
    )
}

async fn nodes(client: &MetaClient, output: Output) -> Result<(), Failure> {
    let nodes = client.nodes().await?;
    let age = |n: &meta_proto::v1::NodeView| {
        n.last_heartbeat_age_ms
            .map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
    };
    let mut lines = vec![format!(
        "{:<6} {:<9} {:<22} {:<15} {:<8} {:>6} {:>7} {:>7}",
        "id", "role", "address", "state", "liveness", "phi", "last", "regions"
    )];
    lines.extend(nodes.iter().map(|n| {
        format!(
            "{:<6} {:<9} {:<22} {:<15} {:<8} {:>6.2} {:>7} {:>7}",
            n.node_id,
            role_name(n.role),
            n.addr,
            state_name(n.state),
            liveness_name(n.liveness),
            n.phi,
            age(n),
            n.region_count
        )
    }));
    let json: Vec<serde_json::Value> = nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.node_id, "role": role_name(n.role), "addr": n.addr,
                "state": state_name(n.state), "liveness": liveness_name(n.liveness), "phi": n.phi,
                "last_heartbeat_age_ms": n.last_heartbeat_age_ms,
                "region_count": n.region_count, "labels": n.labels, "version": n.version,
            })
        })
        .collect();
    print(output, lines.join("\n"), json!({ "nodes": json }));
    Ok(())
}

fn procedure_json(p: &meta_proto::v1::ProcedureInfo) -> serde_json::Value {
    json!({
        "id": p.id,
        "type": p.type_name,
        "state": p.state,
        "step": p.step,
        "error": p.error,
        "output": p.output,
        "parent_id": p.parent_id,
        "created_ms": p.created_ms,
        "updated_ms": p.updated_ms,
    })
}

async fn procedures(
    client: &MetaClient,
    command: ProcedureCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        ProcedureCommand::List => {
            let list = client.procedures().await?;
            let lines: Vec<String> = list
                .iter()
                .map(|p| format!("{} {} {} step {}", p.id, p.type_name, p.state, p.step))
                .collect();
            let json: Vec<serde_json::Value> = list.iter().map(procedure_json).collect();
            print(output, lines.join("\n"), json!({ "procedures": json }));
        }
        ProcedureCommand::Show { id } => {
            let p = client.procedure(&id).await.map_err(|e| match e {
                common_meta::Error::NotFound { .. } => {
                    Failure(format!("not found: procedure {id}"))
                }
                other => Failure(other.to_string()),
            })?;
            let text = [
                format!("id:       {}", p.id),
                format!("type:     {}", p.type_name),
                format!("state:    {}", p.state),
                format!("step:     {}", p.step),
                format!("error:    {}", p.error),
                format!("created:  {} ms", p.created_ms),
                format!("updated:  {} ms", p.updated_ms),
            ]
            .join("\n");
            print(output, text, procedure_json(&p));
        }
    }
    Ok(())
}

fn print_members(output: Output, members: &[meta_proto::v1::Member]) {
    let lines: Vec<String> = members
        .iter()
        .map(|m| format!("{} {} {}", m.id, m.addr, m.role))
        .collect();
    let json: Vec<serde_json::Value> = members
        .iter()
        .map(|m| json!({ "id": m.id, "addr": m.addr, "role": m.role }))
        .collect();
    print(output, lines.join("\n"), json!({ "members": json }));
}

async fn member(
    client: &MetaClient,
    command: MemberCommand,
    output: Output,
) -> Result<(), Failure> {
    let members = match command {
        MemberCommand::List => client.status().await?.members,
        MemberCommand::Add { id, addr } => client.add_learner(id, &addr).await?.members,
        MemberCommand::Promote { id } => client.promote_member(id).await?.members,
        MemberCommand::Remove { id } => client.remove_member(id).await?.members,
    };
    print_members(output, &members);
    Ok(())
}

async fn status(client: &MetaClient, output: Output) -> Result<(), Failure> {
    let s = client.status().await?;
    let members: Vec<serde_json::Value> = s
        .members
        .iter()
        .map(|m| json!({ "id": m.id, "addr": m.addr, "role": m.role }))
        .collect();
    let mut lines = vec![
        format!("cluster:  {:016x}", s.cluster_id),
        format!("member:   {} ({})", s.member_id, s.role),
        format!(
            "leader:   {}",
            if s.leader_id == 0 {
                "none".to_string()
            } else {
                format!("{} {}", s.leader_id, s.leader_addr)
            }
        ),
        format!("term:     {}", s.term),
        format!("commit:   {}", s.commit_index),
        format!("applied:  {}", s.applied_index),
        format!("first:    {}", s.first_index),
        format!(
            "format:   {} (cluster runs at {})",
            s.version, s.cluster_version
        ),
        "members:".to_string(),
    ];
    lines.extend(
        s.members
            .iter()
            .map(|m| format!("  {} {} {}", m.id, m.addr, m.role)),
    );
    print(
        output,
        lines.join("\n"),
        json!({
            "cluster_id": format!("{:016x}", s.cluster_id),
            "member_id": s.member_id,
            "role": s.role,
            "leader_id": s.leader_id,
            "leader_addr": s.leader_addr,
            "term": s.term,
            "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "first_index": s.first_index,
            "version": s.version,
            "cluster_version": s.cluster_version,
            "members": members,
        }),
    );
    Ok(())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    })
}

fn print(output: Output, text: String, json: serde_json::Value) {
    match output {
        Output::Text if text.is_empty() => {}
        Output::Text => println!("{text}"),
        Output::Json => println!("{json}"),
    }
}
