//! The range route catalog on a server: a new cluster's built-in first catalog (nothing
//! written), `GET /routes`, and a `RouteTable` following the catalog through
//! meta-client's watch; split, merge and move (`changes`), the meta leader stopped in
//! the middle of them (`leader_change`), hotspot splits (`hotspot`).

mod changes;
mod hotspot;
mod leader_change;

use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::KvBackend;
use common_meta::manager::route::RouteCatalogManager;
use common_meta::route_table::{OwnerAt, RouteTable};
use meta_client::{MetaClient, MetaClientOptions};

use crate::in_process::{http_get, start_with};
use crate::support::{check, wait_until};

/// Checks that at every catalog version `table` kept, each of `keys` is owned by one
/// route, and that the group allowed to write a key never changes from one version to
/// the next without a version in between where nobody may write it (the fence).
/// Also checks the versions kept have no gap. Returns the first violation.
pub fn writers_fenced(table: &RouteTable, keys: &[&[u8]]) -> Result<(), String> {
    let kept = table.kept();
    if kept.windows(2).any(|w| w[1] != w[0] + 1) {
        return Err(format!("a version gap: {kept:?}"));
    }
    let writers = |key: &[u8]| -> Result<Vec<(u64, Option<u64>)>, String> {
        kept.iter()
            .map(|v| match table.owner_at(key, *v) {
                OwnerAt::Owner(Some(route)) => Ok((*v, route.writer())),
                other => Err(format!("key {key:?} at version {v}: {other:?}")),
            })
            .collect()
    };
    for key in keys {
        check_writers(&writers(key)?).map_err(|e| format!("key {key:?}: {e}"))?;
    }
    Ok(())
}

/// The rule of [`writers_fenced`] on one key's writers by version.
pub fn check_writers(writers: &[(u64, Option<u64>)]) -> Result<(), String> {
    for pair in writers.windows(2) {
        if let ((v1, Some(a)), (v2, Some(b))) = (pair[0], pair[1])
            && a != b
        {
            return Err(format!(
                "group {a} wrote at version {v1} and group {b} at version {v2}, with no fence between"
            ));
        }
    }
    Ok(())
}

#[test]
fn the_writer_check_catches_a_move_without_a_fence() {
    assert!(check_writers(&[(1, Some(1)), (2, Some(1)), (3, None), (4, Some(2))]).is_ok());
    let broken = check_writers(&[(1, Some(1)), (2, Some(2))]).unwrap_err();
    assert!(broken.contains("no fence"), "{broken}");
}

/// `GET /routes` as JSON, once it answers 200.
async fn routes(http: &str) -> serde_json::Value {
    wait_until(Duration::from_secs(10), || async {
        let body = http_get(http, "/routes").await;
        let (head, json) = body.split_once("\r\n\r\n").unwrap();
        check(head.starts_with("HTTP/1.1 200"), || head.to_string())?;
        let json: serde_json::Value = serde_json::from_str(json).unwrap();
        check(json["version"].as_u64() > Some(0), || {
            format!("no catalog yet: {json}")
        })?;
        Ok(json)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_has_one_route_and_a_table_follows_every_change() {
    let server = start_with(|c| c.routes.initial_group = 5).await;
    let first = routes(&server.http).await;
    assert_eq!(first["version"], 1);
    let only = &first["routes"][0];
    assert_eq!(
        (
            only["route_id"].as_u64(),
            only["group_id"].as_u64(),
            only["state"].as_str()
        ),
        (Some(1), Some(5), Some("Active"))
    );
    assert_eq!(
        (only["start"].as_str(), only["end"].is_null()),
        (Some(""), true)
    );
    let health = http_get(&server.http, "/health").await;
    let health: serde_json::Value =
        serde_json::from_str(health.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(
        health["revision"], 0,
        "a new cluster writes nothing for its catalog"
    );

    let client: Arc<dyn KvBackend> =
        Arc::new(MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap());
    let table = RouteTable::follow_with(client.clone(), 5).await.unwrap();
    assert_eq!(table.version(), 1);
    let manager = RouteCatalogManager::new(client).with_initial_group(5);
    let split = manager.update(|c| c.split_at(b"m")).await.unwrap();
    assert_eq!(split.version, 2);
    let merged = manager
        .update(|c| c.merge_right(c.owner(b"a").unwrap().route_id))
        .await
        .unwrap();
    assert!(
        table
            .wait_for(merged.version, Duration::from_secs(10))
            .await
    );
    assert_eq!(table.kept(), [1, 2, 3]);
    let owner = |version| match table.owner_at(b"q", version) {
        OwnerAt::Owner(Some(route)) => route.route_id,
        other => panic!("{other:?}"),
    };
    assert_eq!((owner(1), owner(2), owner(3)), (1, 3, 4));

    let now = routes(&server.http).await;
    assert_eq!(now["version"], 3);
    assert_eq!(now["routes"][0]["route_id"], 4);
    assert_eq!(now["routes"][0]["parent_route_id"], 2);
    server.shutdown().await;
}
