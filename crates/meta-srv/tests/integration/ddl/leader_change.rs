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

/// Where a procedure is stopped: while datanodes work on its region instructions
/// (after its first saved state), or while they take its cache invalidation (after a
/// step that is not saved: the create's commit, the drop's tombstones).
#[derive(Clone, Copy, Debug)]
enum At {
    Regions,
    Invalidation,
}

/// Runs `op` with every datanode slow at what `at` names, stops the leader once the
/// first datanode got one, and returns what `op` answered.
async fn stop_leader_during<T: Send + 'static>(
    members: &mut Vec<Running>,
    sim: &Simulator,
    at: At,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let nodes = sim.node_ids();
    let seen = |sim: &Simulator| -> u64 {
        nodes
            .iter()
            .map(|n| match at {
                At::Regions => sim.region_requests(*n),
                At::Invalidation => sim.invalidations(*n),
            })
            .sum()
    };
    let slow = |sim: &Simulator, delay: Duration| {
        for node in &nodes {
            match at {
                At::Regions => sim.delay_regions(*node, delay),
                At::Invalidation => sim.delay_invalidations(*node, delay),
            };
        }
    };
    let before = seen(sim);
    slow(sim, Duration::from_millis(1_500));
    let running = tokio::spawn(op);
    wait_until(Duration::from_secs(20), || async {
        check(seen(sim) > before, || format!("no {at:?} instruction yet"))
    })
    .await;
    let leader = leader_of(members).await;
    tracing::info!(
        leader = leader + 1,
        ?at,
        "--- stopping the leader mid-procedure"
    );
    members.remove(leader).shutdown().await;
    slow(sim, Duration::ZERO);
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
    let id = stop_leader_during(&mut members, &sim, At::Regions, creating)
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
    stop_leader_during(&mut members, &sim, At::Regions, dropping)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_that_are_not_saved_are_repeated_harmlessly_after_a_leader_change() {
    let (mut members, endpoints, sim) = cluster().await;
    let client = client(&endpoints);

    // Stopped after the create's commit (not saved): the next leader repeats the
    // region creates and the commit, which find their own work done.
    let creating = {
        let client = client.clone();
        async move { client.create_table(&table("committed", 3), false).await }
    };
    let id = stop_leader_during(&mut members, &sim, At::Invalidation, creating)
        .await
        .unwrap();
    assert_eq!(client.table_route(id).await.unwrap().regions.len(), 3);
    check_consistent(&client, &sim).await.unwrap();
    let held: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(held, 3);

    // The leader that stopped was the only one this cluster can lose: restart a
    // three-member cluster for the drop.
    for member in members {
        member.shutdown().await;
    }
    drop(sim);
    let (mut members, endpoints, sim) = cluster().await;
    let client = super::client(&endpoints);
    client
        .create_table(&table("tombstoned", 3), false)
        .await
        .unwrap();
    // Stopped after the drop moved its keys to tombstones (not saved): the next
    // leader moves them again (nothing left to move) and finishes.
    let dropping = {
        let client = client.clone();
        async move {
            client
                .drop_table("greptime", "public", "tombstoned", false)
                .await
        }
    };
    stop_leader_during(&mut members, &sim, At::Invalidation, dropping)
        .await
        .unwrap();
    assert!(matches!(
        client
            .table("greptime", "public", "tombstoned")
            .await
            .unwrap_err(),
        common_meta::Error::NotFound { .. }
    ));
    check_consistent(&client, &sim).await.unwrap();
    let held: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(held, 0);
    for member in members {
        member.shutdown().await;
    }
}
