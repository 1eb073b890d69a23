//! The meta leader is stopped in the middle of a route change (three members): the next
//! leader finishes it from its last saved step, the catalog ends as one change would
//! leave it, and no catalog version a watcher saw let two groups write a key without a
//! fence between them.

use std::time::Duration;

use common_meta::model::route::{RouteChange, RouteState};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1::RouteAction;

use super::changes::{move_when_known, two_groups};
use super::writers_fenced;
use crate::in_process::{leader_of, start_three};
use crate::support::{check, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// Waits for procedure `id` to be done (on whichever leader runs it); what it made.
async fn done(client: &MetaClient, id: &str) -> RouteChange {
    let output = wait_until(WAIT, || async {
        let info = client.procedure(id).await.map_err(|e| e.to_string())?;
        check(info.state == "done", || format!("{info:?}"))?;
        Ok(info.output)
    })
    .await;
    serde_json::from_str(&output).unwrap()
}

/// Moves route 1 to group 2 and stops the leader once the group answering `at` got it
/// (its answer held back meanwhile).
async fn stop_leader_mid_move(at: RouteAction) {
    let mut members = start_three(|c| c.metadata.region_timeout_ms = 5_000).await;
    let endpoints: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    leader_of(&members).await;
    let client = MetaClient::new(&endpoints, MetaClientOptions::default()).unwrap();
    let table = client.route_table(1).await.unwrap();
    let sim = two_groups(&endpoints).await;
    let node = match at {
        RouteAction::Prepare | RouteAction::CatchUp => 2,
        _ => 1,
    };
    let groups = sim.groups(node).unwrap();
    groups.delay(Duration::from_millis(1_500));
    let moving = {
        let client = client.clone();
        tokio::spawn(async move { move_when_known(&client, 1, 2).await })
    };
    wait_until(WAIT, || async {
        let seen = groups.actions();
        check(seen.iter().any(|(a, _)| *a == at), || {
            format!("no {at:?} yet: {seen:?}")
        })
    })
    .await;
    let leader = leader_of(&members).await;
    tracing::info!(leader = leader + 1, ?at, "--- stopping the leader mid-move");
    members.remove(leader).shutdown().await;
    groups.delay(Duration::ZERO);

    let answer = tokio::time::timeout(WAIT, moving)
        .await
        .expect("the move finishes on the next leader")
        .unwrap()
        .unwrap();
    let change = match answer.change {
        Some(change) => change,
        None => done(&client, &answer.procedure_id).await,
    };
    let catalog = client.routes().await.unwrap();
    assert_eq!(catalog.routes.len(), 1);
    let route = &catalog.routes[0];
    assert_eq!(
        (route.route_id, route.group_id, route.state),
        (1, 2, RouteState::Active)
    );
    // Four saves, each once, whoever made them.
    assert_eq!((change.version, catalog.version), (5, 5));
    assert!(
        table.wait_for(5, WAIT).await,
        "the watcher saw every version"
    );
    writers_fenced(&table, &[b"", b"k", b"zz"]).unwrap();
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_while_the_target_prepares_finishes_on_the_next_leader() {
    stop_leader_mid_move(RouteAction::Prepare).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_while_the_source_fences_finishes_on_the_next_leader() {
    stop_leader_mid_move(RouteAction::Fence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_while_the_target_catches_up_finishes_on_the_next_leader() {
    stop_leader_mid_move(RouteAction::CatchUp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_stopped_after_its_cut_over_finishes_on_the_next_leader() {
    stop_leader_mid_move(RouteAction::Release).await;
}

/// A split and a merge whose leader stops as soon as they are submitted: each is made
/// exactly once, by whichever leader gets to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_and_a_merge_interrupted_by_a_leader_change_happen_once() {
    let mut members = start_three(|_| {}).await;
    let endpoints: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    leader_of(&members).await;
    let client = MetaClient::new(&endpoints, MetaClientOptions::default()).unwrap();
    let split = client.split_route(b"m", Duration::ZERO).await.unwrap();
    let leader = leader_of(&members).await;
    members.remove(leader).shutdown().await;
    done(&client, &split.procedure_id).await;
    let catalog = client.routes().await.unwrap();
    let ids: Vec<u64> = catalog.routes.iter().map(|r| r.route_id).collect();
    assert_eq!((catalog.version, ids), (2, vec![2, 3]));

    let merge = client.merge_route(2, Duration::ZERO).await.unwrap();
    // Two members left: stopping one more would stop the cluster, so the merge's
    // leader hands its leadership over instead.
    let stopped = leader as u64 + 1;
    let leading = client.status().await.unwrap().leader_id;
    let other = (1..=3).find(|id| *id != stopped && *id != leading).unwrap();
    client.transfer_leader(other).await.unwrap();
    done(&client, &merge.procedure_id).await;
    let catalog = client.routes().await.unwrap();
    assert_eq!(catalog.version, 3);
    assert_eq!(catalog.routes.len(), 1);
    assert_eq!(catalog.routes[0].parent_route_id, Some(2));
    for member in members {
        member.shutdown().await;
    }
}
