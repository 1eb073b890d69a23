//! `metactl lease`: grant, revoke, keep alive and inspect leases (ids in decimal).

use clap::Subcommand;
use common_meta::kv::KvBackend;
use meta_client::{LeaseState, MetaClient};
use serde_json::json;

use super::{Failure, Output, print, text};

#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease living TTL seconds without keep-alives; prints its id.
    Grant {
        #[arg(allow_negative_numbers = true)]
        ttl: i64,
        /// Use this id instead of a random one.
        #[arg(long, default_value_t = 0)]
        id: i64,
    },
    /// Revoke lease ID: its keys are deleted at once.
    Revoke { id: i64 },
    /// Keep lease ID alive, printing each renewal, until interrupted (or the lease ends:
    /// exit 1).
    KeepAlive {
        id: i64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Seconds lease ID has left (and its keys, with --keys).
    Ttl {
        id: i64,
        #[arg(long)]
        keys: bool,
    },
    /// Every lease's id.
    List,
}

pub async fn lease(
    client: &MetaClient,
    command: LeaseCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        LeaseCommand::Grant { ttl, id } => {
            let granted = client.lease_grant(ttl, id).await?;
            print(
                output,
                granted.id.to_string(),
                json!({ "id": granted.id, "ttl": granted.ttl }),
            );
        }
        LeaseCommand::Revoke { id } => {
            client.lease_revoke(id).await?;
            print(output, format!("lease {id} revoked"), json!({ "id": id }));
        }
        LeaseCommand::KeepAlive { id, once: true } => {
            let ttl = client.lease_keep_alive(id).await?;
            print(
                output,
                format!("lease {id} kept alive with TTL {ttl}"),
                json!({ "id": id, "ttl": ttl }),
            );
        }
        LeaseCommand::KeepAlive { id, once: false } => {
            // The first renewal says whether the lease exists at all.
            let ttl = client.lease_keep_alive(id).await?;
            let keeper = client.keep_lease_alive(id, ttl);
            let mut state = keeper.watch_state();
            let mut last = None;
            loop {
                let now = *state.borrow_and_update();
                match now {
                    LeaseState::Alive { ttl, renewed } if last != Some(renewed) => {
                        last = Some(renewed);
                        print(
                            output,
                            format!("lease {id} kept alive with TTL {ttl}"),
                            json!({ "id": id, "ttl": ttl }),
                        );
                    }
                    LeaseState::Alive { .. } => {}
                    LeaseState::Lost => {
                        return Err(Failure(format!("error: lease {id} expired or was revoked")));
                    }
                }
                if state.changed().await.is_err() {
                    return Err(Failure(format!("error: keeping lease {id} alive stopped")));
                }
            }
        }
        LeaseCommand::Ttl { id, keys } => {
            let ttl = client.lease_time_to_live(id, keys).await?;
            if ttl.ttl < 0 {
                return Err(Failure(format!("not found: lease {id}")));
            }
            let mut line = format!(
                "lease {id} has {} s left of its {} s TTL",
                ttl.ttl, ttl.granted_ttl
            );
            if keys {
                let names: Vec<String> = ttl.keys.iter().map(|k| text(k)).collect();
                line.push_str(&format!("; keys: [{}]", names.join(", ")));
            }
            print(
                output,
                line,
                json!({
                    "id": id,
                    "ttl": ttl.ttl,
                    "granted_ttl": ttl.granted_ttl,
                    "keys": ttl.keys.iter().map(|k| text(k)).collect::<Vec<_>>(),
                }),
            );
        }
        LeaseCommand::List => {
            let ids = client.leases().await?;
            let lines: Vec<String> = ids.iter().map(i64::to_string).collect();
            print(output, lines.join("\n"), json!({ "leases": ids }));
        }
    }
    Ok(())
}
