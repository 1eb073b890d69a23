//! `metactl region`, `metactl maintenance` and `metactl balance`: moving regions and
//! the switches of the region supervisor. A region is `TABLE_ID.REGION_NUMBER`
//! (`1024.3`, as `route show` prints it) or the whole 64-bit id.

use std::time::Duration;

use clap::Subcommand;
use meta_client::MetaClient;
use meta_proto::v1 as pb;
use serde_json::json;

use super::{Failure, Output, print};

#[derive(Subcommand)]
pub enum RegionCommand {
    /// Move REGION's leadership to datanode --to (a migration procedure).
    Migrate {
        /// The region: TABLE_ID.REGION_NUMBER or its 64-bit id.
        region: String,
        /// The datanode to move it to.
        #[arg(long)]
        to: u64,
        /// How long the migration may take before it rolls back: 500ms, 30s, 10m.
        #[arg(long, default_value = "60s", value_parser = meta_srv::cli::parse_duration)]
        timeout: Duration,
        /// Print the procedure id at once instead of waiting for the move.
        #[arg(long)]
        no_wait: bool,
    },
    /// Where REGION is led, whether it is moving, and which nodes report it.
    Show {
        /// The region: TABLE_ID.REGION_NUMBER or its 64-bit id.
        region: String,
    },
}

#[derive(Subcommand)]
pub enum SwitchCommand {
    /// Turn it on.
    On,
    /// Turn it off.
    Off,
    /// Show the switches and the supervisor's work in progress.
    Status,
}

/// `TABLE_ID.REGION_NUMBER` or a whole id.
pub fn region_id(text: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure(format!(
            "error: {text:?} is not a region: give TABLE_ID.REGION_NUMBER (like 1024.0) or its 64-bit id"
        ))
    };
    match text.split_once('.') {
        Some((table, number)) => {
            let table: u32 = table.parse().map_err(|_| bad())?;
            let number: u32 = number.parse().map_err(|_| bad())?;
            Ok((u64::from(table) << 32) | u64::from(number))
        }
        None => text.parse().map_err(|_| bad()),
    }
}

fn shown(region: u64) -> String {
    common_meta::model::table::RegionId::from(region).to_string()
}

pub async fn region(
    client: &MetaClient,
    command: RegionCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        RegionCommand::Migrate {
            region,
            to,
            timeout,
            no_wait,
        } => {
            let id = region_id(&region)?;
            // Waits a little longer than the migration may take.
            let wait = if no_wait {
                Duration::ZERO
            } else {
                timeout + Duration::from_secs(5)
            };
            let answer = client.migrate_regions(&[id], to, timeout, wait).await?;
            let text = if answer.done {
                format!(
                    "region {} is led by datanode {to} ({})",
                    shown(id),
                    answer.procedure_id
                )
            } else {
                format!("migration {} submitted", answer.procedure_id)
            };
            print(
                output,
                text,
                json!({
                    "region": shown(id),
                    "to": to,
                    "procedure_id": answer.procedure_id,
                    "done": answer.done,
                    "output": answer.output,
                }),
            );
        }
        RegionCommand::Show { region } => {
            let id = region_id(&region)?;
            let view = client.region(id).await?;
            let mut reported: Vec<_> = view.reported.iter().collect();
            reported.sort();
            let reported_text: Vec<String> =
                reported.iter().map(|(n, r)| format!("{n}:{r}")).collect();
            let moving = if view.moving_procedure.is_empty() {
                "-".to_string()
            } else {
                format!("to {} by {}", view.moving_to, view.moving_procedure)
            };
            let text = format!(
                "region {}\nleader {} ({})\nfollowers {:?}\nroute version {}\nmoving {moving}\nreported by {}",
                shown(id),
                view.leader,
                view.leader_state,
                view.followers,
                view.route_version,
                if reported_text.is_empty() {
                    "-".to_string()
                } else {
                    reported_text.join(" ")
                },
            );
            print(
                output,
                text,
                json!({
                    "region": shown(id),
                    "leader": view.leader,
                    "leader_state": view.leader_state,
                    "followers": view.followers,
                    "route_version": view.route_version,
                    "moving_procedure": view.moving_procedure,
                    "moving_to": view.moving_to,
                    "reported": view.reported,
                }),
            );
        }
    }
    Ok(())
}

fn print_status(output: Output, status: &pb::MaintenanceStatus) {
    let on = |b: bool| if b { "on" } else { "off" };
    let text = format!(
        "maintenance {}\nfailover {}\nbalancer {}\nrunning migrations {}\npending failovers {}",
        on(status.maintenance),
        on(status.failover),
        on(status.balancer),
        status.running_migrations,
        status.pending_failovers
    );
    print(
        output,
        text,
        json!({
            "maintenance": status.maintenance,
            "failover": status.failover,
            "balancer": status.balancer,
            "running_migrations": status.running_migrations,
            "pending_failovers": status.pending_failovers,
        }),
    );
}

pub async fn maintenance(
    client: &MetaClient,
    command: SwitchCommand,
    output: Output,
) -> Result<(), Failure> {
    let status = match command {
        SwitchCommand::On => client.set_maintenance(true).await?,
        SwitchCommand::Off => client.set_maintenance(false).await?,
        SwitchCommand::Status => client.maintenance().await?,
    };
    print_status(output, &status);
    Ok(())
}

pub async fn balance(
    client: &MetaClient,
    command: SwitchCommand,
    output: Output,
) -> Result<(), Failure> {
    let status = match command {
        SwitchCommand::On => client.set_balancer(true).await?,
        SwitchCommand::Off => client.set_balancer(false).await?,
        SwitchCommand::Status => client.maintenance().await?,
    };
    print_status(output, &status);
    Ok(())
}
