//! `metactl route`: the range route catalog (list, show the owner of a key, split,
//! merge, move).

use std::time::Duration;

use clap::Subcommand;
use common_meta::model::route::RouteCatalog;
use meta_client::{MetaClient, RouteChangeAnswer};
use meta_srv::routes::{CatalogView, RouteView};
use serde_json::json;

use super::{Failure, Output, print};

#[derive(Subcommand)]
pub enum RouteCommand {
    /// Every route: id, [start, end), group, state, parent.
    List,
    /// The route owning KEY.
    Show {
        key: String,
        /// KEY is hex.
        #[arg(long)]
        hex: bool,
    },
    /// Split the route owning KEY at KEY (KEY must not be its start).
    Split {
        key: String,
        /// KEY is hex.
        #[arg(long)]
        hex: bool,
        /// How long to wait for the split: 30s, 2m.
        #[arg(long, default_value = "30s", value_parser = meta_srv::cli::parse_duration)]
        wait: Duration,
    },
    /// Merge route ROUTE_ID with the route to its right (same group, both Active).
    Merge {
        route_id: u64,
        #[arg(long, default_value = "30s", value_parser = meta_srv::cli::parse_duration)]
        wait: Duration,
    },
    /// Move route ROUTE_ID to group G (a group some node reports hosting).
    Move {
        route_id: u64,
        #[arg(long = "to-group", value_name = "G")]
        to_group: u64,
        #[arg(long, default_value = "2m", value_parser = meta_srv::cli::parse_duration)]
        wait: Duration,
    },
}

fn key_bytes(key: &str, hex: bool) -> Result<Vec<u8>, Failure> {
    if !hex {
        return Ok(key.as_bytes().to_vec());
    }
    let bad = || Failure(format!("error: key {key:?} is not hex"));
    if !key.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(key.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

fn print_change(output: Output, what: &str, answer: RouteChangeAnswer) {
    match answer.change {
        Some(change) => {
            let views: Vec<RouteView> = change.routes.iter().map(RouteView::from).collect();
            let mut lines = vec![format!(
                "{what}: catalog version {} (procedure {})",
                change.version, answer.procedure_id
            )];
            lines.extend(views.iter().map(RouteView::line));
            print(
                output,
                lines.join("\n"),
                json!({ "done": true, "procedure_id": answer.procedure_id, "version": change.version, "routes": views }),
            );
        }
        None => print(
            output,
            format!(
                "{what}: still running as procedure {} (metactl procedure show {})",
                answer.procedure_id, answer.procedure_id
            ),
            json!({ "done": false, "procedure_id": answer.procedure_id }),
        ),
    }
}

/// Runs one `metactl route` command.
pub async fn route(
    client: &MetaClient,
    command: RouteCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        RouteCommand::List => {
            let catalog: RouteCatalog = client.routes().await?;
            let view = CatalogView::from(&catalog);
            let mut lines = vec![format!(
                "catalog version {}, {} route(s)",
                view.version,
                view.routes.len()
            )];
            lines.extend(view.routes.iter().map(RouteView::line));
            print(output, lines.join("\n"), json!(view));
        }
        RouteCommand::Show { key, hex } => {
            let (route, version) = client.route_of(&key_bytes(&key, hex)?).await?;
            let view = RouteView::from(&route);
            print(
                output,
                format!("{} (catalog version {version})", view.line()),
                json!({ "version": version, "route": view }),
            );
        }
        RouteCommand::Split { key, hex, wait } => {
            let answer = client.split_route(&key_bytes(&key, hex)?, wait).await?;
            print_change(output, "split", answer);
        }
        RouteCommand::Merge { route_id, wait } => {
            let answer = client.merge_route(route_id, wait).await?;
            print_change(output, "merged", answer);
        }
        RouteCommand::Move {
            route_id,
            to_group,
            wait,
        } => {
            let answer = client.move_route(route_id, to_group, wait).await?;
            print_change(output, "moved", answer);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_text_or_hex() {
        assert_eq!(key_bytes("m", false).ok().unwrap(), b"m");
        assert_eq!(key_bytes("00ff", true).ok().unwrap(), [0, 255]);
        for bad in ["0", "zz", "é0"] {
            assert!(key_bytes(bad, true).is_err(), "{bad}");
        }
    }
}
