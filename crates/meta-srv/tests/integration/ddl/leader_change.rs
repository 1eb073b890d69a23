//! The leader is stopped in the middle of a create and of a drop (three members): the
//! next leader recovers the procedure at its last persisted step and finishes it; the
//! client, retrying with the same request id, gets the one outcome; every effect
//! happens once and no region or key is orphaned.

use super::*;
use crate::in_process::{leader_of, start_three};

/// Three members with fast heartbeats and a simulated datanode per member.
async fn cluster() -> (Vec<Running>, Vec<String>, Simulator) {
    let members = start_three(|c| {
        c.metadata.region_attempts = 5;
        c.metadata.region_timeout_ms = 5_000;
    })
    .await;
    let endpoints: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    leader_of(&members).await;
    let sim = datanodes(&endpoints, 3).await;
    (members, endpoints, sim)
}

/// Runs `op` with every datanode slow at region instructions, stops the leader once
/// the first datanode got one (the procedure is past its persisted prepare step), and
/// returns what `op` answered.
async fn stop_leader_during<T: Send + 'static>(
    members: &mut Vec<Running>,
    sim: &Simulator,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let nodes = sim.node_ids();
    let before: u64 = nodes.iter().map(|n| sim.region_requests(*n)).sum();
    for node in &nodes {
        sim.delay_regions(*node, Duration::from_millis(1_500));
    }
    let running = tokio::spawn(op);
    wait_until(Duration::from_secs(20), || async {
        let now: u64 = nodes.iter().map(|n| sim.region_requests(*n)).sum();
        check(now > before, || "no region instruction yet".into())
    })
    .await;
    let leader = leader_of(members).await;
    tracing::info!(leader = leader + 1, "--- stopping the leader mid-procedure");
    members.remove(leader).shutdown().await;
    for node in &nodes {
        sim.delay_regions(*node, Duration::ZERO);
    }
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the procedure finishes on the next leader")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_interrupted_by_a_leader_change_finishes_once() {
    let (mut members, endpoints, sim) = cluster().await;
    let client = client(&endpoints);
    let creating = {
        let client = client.clone();
        async move { client.create_table(&table("survives", 3), false).await }
    };
    let id = stop_leader_during(&mut members, &sim, creating)
        .await
        .unwrap();
    let (info, route) = client
        .table("greptime", "public", "survives")
        .await
        .unwrap();
    assert_eq!((info.id, route.regions.len()), (id, 3));
    check_consistent(&client, &sim).await.unwrap();
    let held: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(held, 3, "each region exists once");
    // The recovered procedure is done on the new leader, not running twice.
    let procedures = client.procedures().await.unwrap();
    let creates: Vec<_> = procedures
        .iter()
        .filter(|p| p.type_name == "metasrv.CreateTable")
        .collect();
    assert_eq!(creates.len(), 1, "{procedures:?}");
    assert_eq!(creates[0].state, "done");
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_interrupted_by_a_leader_change_finishes_once() {
    let (mut members, endpoints, sim) = cluster().await;
    let client = client(&endpoints);
    client
        .create_table(&table("doomed", 3), false)
        .await
        .unwrap();
    client.create_table(&table("kept", 2), false).await.unwrap();
    let dropping = {
        let client = client.clone();
        async move {
            client
                .drop_table("greptime", "public", "doomed", false)
                .await
        }
    };
    stop_leader_during(&mut members, &sim, dropping)
        .await
        .unwrap();
    assert!(matches!(
        client
            .table("greptime", "public", "doomed")
            .await
            .unwrap_err(),
        common_meta::Error::NotFound { .. }
    ));
    client.table("greptime", "public", "kept").await.unwrap();
    check_consistent(&client, &sim).await.unwrap();
    let held: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(held, 2, "only the kept table's regions remain");
    for member in members {
        member.shutdown().await;
    }
}
