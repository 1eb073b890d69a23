//! Split, merge and move on one server, through meta-client and metactl: each change
//! moves the catalog version by one per save, a move tells both groups what to do in
//! order, and every bad request is refused clearly with nothing changed.

use std::time::Duration;

use common_meta::model::route::RouteState;
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1::RouteAction;

use super::writers_fenced;
use crate::in_process::start_with;
use crate::metactl::metactl_async;
use crate::support::{check, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// Two simulated nodes of a range-sharded data plane: node 1 leads group 1, node 2
/// leads group 2.
pub async fn two_groups(endpoints: &[String]) -> Simulator {
    let sim = Simulator::start(
        endpoints,
        &SimOptions {
            nodes: 2,
            regions_per_node: 0,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    sim.groups(1).unwrap().host(1, true);
    sim.groups(2).unwrap().host(2, true);
    sim
}

/// Moves `route` to `group` once the leader has heard of the group (a move to a group
/// nobody reports is refused until then).
pub async fn move_when_known(
    client: &MetaClient,
    route: u64,
    group: u64,
) -> common_meta::Result<meta_client::RouteChangeAnswer> {
    wait_until(WAIT, || async {
        match client
            .move_route(route, group, Duration::from_secs(60))
            .await
        {
            Err(e) if e.to_string().contains("unknown group") => Err(e.to_string()),
            other => Ok(other),
        }
    })
    .await
}

/// The route actions node `node` of `sim` received, in order.
pub fn actions(sim: &Simulator, node: u64) -> Vec<RouteAction> {
    sim.groups(node)
        .unwrap()
        .actions()
        .into_iter()
        .map(|(action, _)| action)
        .collect()
}

fn client(endpoint: &str) -> MetaClient {
    MetaClient::new(&[endpoint], MetaClientOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_merges_and_a_move_change_the_catalog_one_version_at_a_time() {
    let server = start_with(|_| {}).await;
    let client = client(&server.grpc);
    let table = client.route_table(1).await.unwrap();

    let split = client
        .split_route(b"m", WAIT)
        .await
        .unwrap()
        .change
        .unwrap();
    assert_eq!(split.version, 2);
    let ids: Vec<(u64, &[u8], Option<u64>)> = split
        .routes
        .iter()
        .map(|r| (r.route_id, r.start.as_slice(), r.parent_route_id))
        .collect();
    assert_eq!(ids, [(2, &b""[..], Some(1)), (3, &b"m"[..], Some(1))]);
    let split = client
        .split_route(b"t", WAIT)
        .await
        .unwrap()
        .change
        .unwrap();
    assert_eq!(split.version, 3);
    let merged = client.merge_route(4, WAIT).await.unwrap().change.unwrap();
    assert_eq!(merged.version, 4);
    assert_eq!(merged.routes.len(), 1);
    let merged = &merged.routes[0];
    assert_eq!(
        (
            merged.route_id,
            merged.start.as_slice(),
            merged.end.as_deref(),
            merged.parent_route_id
        ),
        (6, &b"m"[..], None, Some(4))
    );
    let (owner, version) = client.route_of(b"q").await.unwrap();
    assert_eq!((owner.route_id, version), (6, 4));

    let sim = two_groups(std::slice::from_ref(&server.grpc)).await;
    let moved = move_when_known(&client, 6, 2)
        .await
        .unwrap()
        .change
        .unwrap();
    // Marked, fenced, cut over, unfenced: four saves.
    assert_eq!(moved.version, 8);
    let route = &moved.routes[0];
    assert_eq!(
        (route.route_id, route.group_id, route.state),
        (6, 2, RouteState::Active)
    );
    let actions = |node| actions(&sim, node);
    assert_eq!(actions(2), [RouteAction::Prepare, RouteAction::CatchUp]);
    assert_eq!(actions(1), [RouteAction::Fence, RouteAction::Release]);
    assert!(table.wait_for(8, WAIT).await);
    writers_fenced(&table, &[b"", b"a", b"m", b"q", b"zzz"]).unwrap();

    // Routes of different groups do not merge.
    let err = client.merge_route(2, WAIT).await.unwrap_err().to_string();
    assert!(err.contains("only routes of one group merge"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_route_changes_are_refused_and_change_nothing() {
    let server = start_with(|_| {}).await;
    let client = client(&server.grpc);
    let cases: Vec<(common_meta::Result<meta_client::RouteChangeAnswer>, &str)> = vec![
        (
            client.split_route(b"", WAIT).await,
            "is the start of route 1",
        ),
        (
            client.merge_route(1, WAIT).await,
            "has no adjacent route to its right",
        ),
        (client.merge_route(99, WAIT).await, "no route 99"),
        (
            client.move_route(1, 7, WAIT).await,
            "unknown group 7: no node reports hosting it",
        ),
        (
            client.move_route(1, 1, WAIT).await,
            "route 1 is on group 1 already",
        ),
        (client.move_route(99, 2, WAIT).await, "route 99 not found"),
    ];
    for (answer, want) in cases {
        let err = answer.unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(
            matches!(
                err,
                common_meta::Error::InvalidArgument { .. } | common_meta::Error::NotFound { .. }
            ),
            "{want}: {err:?}"
        );
    }
    let catalog = client.routes().await.unwrap();
    assert_eq!(
        (catalog.version, catalog.routes.len()),
        (1, 1),
        "nothing changed"
    );

    // The CLI: one line and a non-zero exit.
    let (code, _, err) = metactl_async(&server.grpc, &["route", "split", ""]).await;
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is the start of route 1"), "{err}");
    let (code, _, err) = metactl_async(&server.grpc, &["route", "show", "--hex", "zz"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("is not hex"), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metactl_lists_shows_splits_merges_and_moves_routes() {
    let server = start_with(|_| {}).await;
    let ep = server.grpc.clone();
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "{err}");
        out
    };
    let out = ok(metactl_async(&ep, &["route", "list"]).await);
    assert_eq!(
        out,
        "catalog version 1, 1 route(s)\n1 [\"\", +inf) group 1 Active\n"
    );
    let out = ok(metactl_async(&ep, &["route", "split", "m"]).await);
    assert!(out.starts_with("split: catalog version 2"), "{out}");
    assert!(
        out.contains("\n3 [\"m\", +inf) group 1 Active (from 1)"),
        "{out}"
    );
    let out = ok(metactl_async(&ep, &["--output", "json", "route", "show", "q"]).await);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (json["version"].as_u64(), json["route"]["route_id"].as_u64()),
        (Some(2), Some(3))
    );
    let out = ok(metactl_async(&ep, &["--output", "json", "route", "merge", "2"]).await);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["done"], true);
    assert_eq!(json["routes"][0]["route_id"], 4);
    let out = ok(metactl_async(&ep, &["--output", "json", "route", "list"]).await);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["version"], 3);
    assert_eq!(json["routes"].as_array().unwrap().len(), 1);

    let sim = two_groups(std::slice::from_ref(&ep)).await;
    wait_until(WAIT, || async {
        let (code, out, err) = metactl_async(
            &ep,
            &["--output", "json", "route", "move", "4", "--to-group", "2"],
        )
        .await;
        check(code == Some(0), || err.clone())?;
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        check(json["routes"][0]["group_id"] == 2, || out.clone())
    })
    .await;
    drop(sim);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_the_target_refuses_rolls_back() {
    let server = start_with(|_| {}).await;
    let client = client(&server.grpc);
    let table = client.route_table(1).await.unwrap();
    let sim = two_groups(std::slice::from_ref(&server.grpc)).await;
    sim.groups(2).unwrap().refuse(true);
    let err = move_when_known(&client, 1, 2)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused"), "{err}");
    let catalog = client.routes().await.unwrap();
    let route = &catalog.routes[0];
    assert_eq!((route.group_id, route.state), (1, RouteState::Active));
    // Marked, then unmarked.
    assert_eq!(catalog.version, 3);
    let actions = |node| actions(&sim, node);
    assert_eq!(actions(2), [RouteAction::Prepare, RouteAction::Abort]);
    assert_eq!(actions(1), [RouteAction::Unfence]);
    assert!(table.wait_for(3, WAIT).await);
    writers_fenced(&table, &[b"", b"k"]).unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_retried_with_its_request_id_answers_the_first_outcome() {
    use meta_proto::v1 as pb;
    use meta_proto::v1::route_catalog_client::RouteCatalogClient;
    let server = start_with(|_| {}).await;
    crate::in_process::leader_of(std::slice::from_ref(&server)).await;
    let mut raw = RouteCatalogClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let split = |request_id: &str| pb::SplitRouteRequest {
        key: b"m".to_vec(),
        wait_ms: 10_000,
        request_id: request_id.to_string(),
    };
    // The first answer may come before the member's procedures run (not leader yet).
    let first = wait_until(WAIT, || {
        let mut raw = raw.clone();
        async move {
            raw.split_route(split("retry-1"))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let again = raw
        .split_route(split("retry-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.done && again.done);
    assert_eq!(first.procedure_id, "route-retry-1");
    assert_eq!(
        (first.version, first.routes.clone()),
        (again.version, again.routes),
        "the retry answers the first split, and splits nothing"
    );
    let other = raw.split_route(split("retry-2")).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::InvalidArgument);
    assert!(
        other.message().contains("is the start of route 3"),
        "{other:?}"
    );
    let bad = raw.split_route(split("no spaces")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("request_id must be"), "{bad:?}");
    assert_eq!(client(&server.grpc).routes().await.unwrap().version, 2);
    server.shutdown().await;
}
