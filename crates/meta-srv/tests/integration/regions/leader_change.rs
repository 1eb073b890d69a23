//! The meta leader is stopped in the middle of a migration (three members): the next
//! leader resumes it at its last saved step, the region ends led by exactly one node,
//! and no two nodes ever held its leader lease at once (the new leader fences what a
//! deposed leader may have granted).

use super::*;
use crate::in_process::{leader_of, start_three};

/// Where the leader is stopped: while the candidate is being opened (only the
/// submission saved), or once the route marks the old leader downgrading.
#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    Open,
    Marked,
}

async fn stop_leader_mid_migration(at: At) {
    let mut members = start_three(|c| {
        c.failure_detector.acceptable_pause_ms = 500;
        c.metadata.region_timeout_ms = 5_000;
        c.failover.backoff_ms = 200;
    })
    .await;
    let endpoints: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    leader_of(&members).await;
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("moving", 3), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    let (region, from) = leaders(&client, &[id]).await.into_iter().next().unwrap();
    let to = sim.node_ids().into_iter().find(|n| *n != from).unwrap();
    sim.delay_regions(to, Duration::from_millis(1_500));
    let answer = client
        .migrate_regions(&[region], to, Duration::from_secs(60), Duration::ZERO)
        .await
        .unwrap();
    wait_until(WAIT, || async {
        let view = client.region(region).await.map_err(|e| e.to_string())?;
        let ready = match at {
            At::Open => view.moving_procedure == answer.procedure_id,
            At::Marked => view.leader_state == "downgrading",
        };
        check(ready, || format!("not at {at:?} yet: {view:?}"))
    })
    .await;
    let leader = leader_of(&members).await;
    tracing::info!(
        leader = leader + 1,
        ?at,
        "--- stopping the leader mid-migration"
    );
    members.remove(leader).shutdown().await;
    sim.delay_regions(to, Duration::ZERO);
    wait_until(Duration::from_secs(60), || async {
        let info = client
            .procedure(&answer.procedure_id)
            .await
            .map_err(|e| e.to_string())?;
        check(info.state == "done", || format!("{info:?}"))
    })
    .await;
    let view = client.region(region).await.unwrap();
    assert_eq!((view.leader, view.leader_state.as_str()), (to, "serving"));
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_stopped_while_opening_finishes_on_the_next_leader() {
    stop_leader_mid_migration(At::Open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_stopped_after_marking_finishes_on_the_next_leader() {
    stop_leader_mid_migration(At::Marked).await;
}
