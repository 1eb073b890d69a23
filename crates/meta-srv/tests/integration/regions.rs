//! Regions end to end against simulated datanodes that write while their leases let
//! them: leases granted, renewed and expired; migration; failover of a killed node;
//! maintenance mode; drain; the balancer; bad input. Every test ends by checking the
//! recorded history: never two leaseholders of one region, no write outside a lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meta_client::MetaClient;
use meta_client::sim::history::check as check_history;
use meta_client::sim::{SimOptions, Simulator};
use meta_proto::v1 as pb;

use crate::ddl::{client, table};
use crate::in_process::{Running, start_with};
use crate::support::{check, wait_until};

mod chaos;
mod leader_change;
mod supervision;

const WAIT: Duration = Duration::from_secs(30);

/// A server with fast heartbeats (leases of 1.3 s), quick failure detection and a
/// quick supervisor.
pub async fn server(adjust: impl FnOnce(&mut meta_srv::config::Config)) -> Running {
    start_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.failure_detector.acceptable_pause_ms = 500;
        c.metadata.region_timeout_ms = 2_000;
        c.failover.backoff_ms = 200;
        adjust(c);
    })
    .await
}

/// `nodes` active, alive simulated datanodes writing every 20 ms.
pub async fn writers(endpoints: &[String], nodes: usize) -> Simulator {
    let options = SimOptions {
        nodes,
        regions_per_node: 0,
        write_every: Duration::from_millis(20),
        record: true,
        ..SimOptions::default()
    };
    let sim = Simulator::start(endpoints, &options).await.unwrap();
    let client = client(endpoints);
    sim.activate(&client, WAIT).await.unwrap();
    wait_until(WAIT, || async {
        let views = client.nodes().await.map_err(|e| e.to_string())?;
        let alive = views
            .iter()
            .filter(|v| v.liveness == pb::Liveness::Alive as i32)
            .count();
        check(alive == nodes, || format!("{alive} of {nodes} alive"))
    })
    .await;
    sim
}

/// Region -> leader, from the routes of `tables`.
pub async fn leaders(client: &MetaClient, tables: &[u32]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for table in tables {
        let route = client.table_route(*table).await.unwrap();
        for entry in route.regions {
            out.insert(entry.region.as_u64(), entry.leader.map_or(0, |p| p.id));
        }
    }
    out
}

/// Every region of `tables` is writable on its route's leader and on no other
/// running node.
pub async fn led_once(client: &MetaClient, sim: &Simulator, tables: &[u32]) {
    wait_until(WAIT, || async {
        let leaders = leaders(client, tables).await;
        for (region, leader) in &leaders {
            for node in sim.node_ids() {
                let Some(keeper) = sim.leases(node) else {
                    continue;
                };
                let writable = keeper.writable(*region);
                check(writable == (node == *leader), || {
                    format!("region {region}: node {node} writable {writable}, leader {leader}")
                })?;
            }
        }
        Ok(())
    })
    .await;
}

/// The history of `sim` passes the checker, with writes in it.
pub fn history_clean(sim: &Simulator) {
    let report = check_history(&sim.history().events());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(report.writes > 0 && report.leases > 0, "{report:?}");
}

#[tokio::test]
async fn leases_follow_routes_and_run_out_when_not_renewed() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("leased", 6), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    // Renewed: a region's deadline moves forward.
    let (region, leader) = leaders(&client, &[id]).await.into_iter().next().unwrap();
    let keeper = sim.leases(leader).unwrap();
    let first = keeper.deadline(region).unwrap();
    wait_until(WAIT, || async {
        let now = keeper.deadline(region).unwrap();
        check(now > first, || "the lease was not renewed".to_string())
    })
    .await;
    // Cut off (a stall longer than a lease): the node stops writing when its lease
    // ends, counted from its own send time, whatever the leader does.
    sim.pause(leader, Duration::from_secs(3));
    let last = keeper.deadline(region).unwrap();
    wait_until(WAIT, || async {
        check(!keeper.writable(region), || "still writable".to_string())
    })
    .await;
    assert!(
        std::time::Instant::now() >= last,
        "read-only only once the lease ended"
    );
    assert!(last <= std::time::Instant::now() + Duration::from_millis(1_300));
    // Back: leased again.
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

#[tokio::test]
async fn a_migration_moves_leadership_with_no_overlap() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("moved", 4), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    let before = leaders(&client, &[id]).await;
    let (region, from) = before.iter().next().map(|(r, l)| (*r, *l)).unwrap();
    let to = sim.node_ids().into_iter().find(|n| *n != from).unwrap();
    let written = sim.last_entry(region);
    let answer = client
        .migrate_regions(&[region], to, Duration::ZERO, WAIT)
        .await
        .unwrap();
    assert!(answer.done, "{answer:?}");
    let after = leaders(&client, &[id]).await;
    assert_eq!(after[&region], to);
    // The other regions did not move.
    for (r, l) in &before {
        if *r != region {
            assert_eq!(after[r], *l);
        }
    }
    led_once(&client, &sim, &[id]).await;
    // The new leader writes on from where the old one stopped.
    wait_until(WAIT, || async {
        check(sim.last_entry(region) > written + 5, || {
            "no new writes".to_string()
        })
    })
    .await;
    // The old copy is closed.
    wait_until(WAIT, || async {
        check(!sim.regions(from).contains(&region), || {
            "still on the old node".to_string()
        })
    })
    .await;
    let view = client.region(region).await.unwrap();
    assert_eq!((view.leader, view.leader_state.as_str()), (to, "serving"));
    assert!(view.moving_procedure.is_empty());
    history_clean(&sim);
}

#[tokio::test]
async fn failover_moves_every_region_of_a_killed_node_once() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let mut sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let mut tables = Vec::new();
    for t in 0..4 {
        tables.push(
            client
                .create_table(&table(&format!("f{t}"), 75), false)
                .await
                .unwrap(),
        );
    }
    led_once(&client, &sim, &tables).await;
    let before = leaders(&client, &tables).await;
    let victim = *before.values().next().unwrap();
    let theirs: BTreeSet<u64> = before
        .iter()
        .filter(|(_, l)| **l == victim)
        .map(|(r, _)| *r)
        .collect();
    // Round robin over three nodes: a third of 300.
    assert_eq!(theirs.len(), 100, "regions on the victim");
    sim.kill(victim);
    wait_until(Duration::from_secs(60), || async {
        let now = leaders(&client, &tables).await;
        let left = now.values().filter(|l| **l == victim).count();
        check(left == 0, || {
            format!("{left} regions still led by {victim}")
        })
    })
    .await;
    led_once(&client, &sim, &tables).await;
    // The node comes back: it is told to close what moved away.
    assert!(sim.restart(victim).unwrap());
    wait_until(WAIT, || async {
        let held: BTreeSet<u64> = sim.regions(victim).into_iter().collect();
        let kept = held.intersection(&theirs).count();
        check(kept == 0, || {
            format!("{kept} moved regions still open on {victim}")
        })
    })
    .await;
    history_clean(&sim);
}

#[tokio::test]
async fn bad_migrations_are_refused_clearly() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client.create_table(&table("bad", 3), false).await.unwrap();
    let leads = leaders(&client, &[id]).await;
    let (region, from) = leads.iter().next().map(|(r, l)| (*r, *l)).unwrap();
    let other = sim.node_ids().into_iter().find(|n| *n != from).unwrap();
    let err = |e: common_meta::Error| e.to_string();
    let cases: Vec<(Vec<u64>, u64, &str)> = vec![
        (vec![region], from, "already led by datanode"),
        (vec![region], 999, "datanode 999"),
        (vec![(u64::from(id) << 32) | 77], other, "not found"),
        (vec![(9999u64 << 32) | 1], other, "not found"),
        (vec![], other, "at least one region"),
    ];
    for (regions, to, want) in cases {
        let got = client
            .migrate_regions(&regions, to, Duration::ZERO, Duration::ZERO)
            .await
            .map(|a| a.procedure_id)
            .map_err(err);
        match got {
            Err(e) => assert!(e.contains(want), "{regions:?} -> {to}: {e} lacks {want:?}"),
            Ok(id) => panic!("{regions:?} -> {to} was accepted as {id}"),
        }
    }
    // A draining node takes no regions.
    client.drain_node(other).await.unwrap();
    let e = client
        .migrate_regions(&[region], other, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("draining"), "{e}");
    // A second move of a region already moving names the first.
    let third = sim
        .node_ids()
        .into_iter()
        .find(|n| *n != from && *n != other)
        .unwrap();
    sim.delay_regions(third, Duration::from_millis(1_500));
    let first = client
        .migrate_regions(&[region], third, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap();
    let e = client
        .migrate_regions(&[region], third, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&first.procedure_id), "{e}");
}

/// Regions led by each node, from the routes of `tables`.
async fn led_count(client: &MetaClient, tables: &[u32]) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for leader in leaders(client, tables).await.into_values() {
        *out.entry(leader).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn maintenance_pauses_failover_until_turned_off() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let mut sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("paused", 6), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    assert!(client.set_maintenance(true).await.unwrap().maintenance);
    let before = leaders(&client, &[id]).await;
    let victim = *before.values().next().unwrap();
    let theirs = before.values().filter(|l| **l == victim).count();
    sim.kill(victim);
    // The supervisor sees the regions waiting and moves none of them.
    wait_until(WAIT, || async {
        let status = client.maintenance().await.map_err(|e| e.to_string())?;
        check(status.pending_failovers as usize == theirs, || {
            format!("{status:?}, {theirs} expected pending")
        })
    })
    .await;
    let procedures = client.procedures().await.unwrap();
    assert!(
        !procedures
            .iter()
            .any(|p| p.type_name == "metasrv.MigrateRegions"),
        "{procedures:?}"
    );
    assert_eq!(leaders(&client, &[id]).await, before);
    assert!(!client.set_maintenance(false).await.unwrap().maintenance);
    wait_until(WAIT, || async {
        let left = led_count(&client, &[id])
            .await
            .get(&victim)
            .copied()
            .unwrap_or(0);
        check(left == 0, || format!("{left} regions still on {victim}"))
    })
    .await;
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

#[tokio::test]
async fn a_drained_node_gives_up_its_regions_and_gets_no_new_ones() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("drained", 9), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    let drained = sim.node_ids()[0];
    let left = client.drain_node(drained).await.unwrap();
    assert_eq!(left, 3, "round robin gave it a third");
    wait_until(WAIT, || async {
        let left = led_count(&client, &[id])
            .await
            .get(&drained)
            .copied()
            .unwrap_or(0);
        check(left == 0, || format!("{left} regions still on {drained}"))
    })
    .await;
    led_once(&client, &sim, &[id]).await;
    let fresh = client
        .create_table(&table("fresh", 6), false)
        .await
        .unwrap();
    assert_eq!(led_count(&client, &[fresh]).await.get(&drained), None);
    // Its old copies were closed.
    wait_until(WAIT, || async {
        let held = sim.regions(drained).len();
        check(held == 0, || {
            format!("{held} regions still open on {drained}")
        })
    })
    .await;
    history_clean(&sim);
}

#[tokio::test]
async fn the_balancer_evens_out_leaders_within_its_limits() {
    let server = server(|c| {
        c.failover.max_concurrent_migrations = 2;
        c.balancer.tolerance = 1;
        c.balancer.cooldown_ms = 600_000;
    })
    .await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let ids = sim.node_ids();
    // Skewed: every region on the first node (the others drained, then back).
    for node in &ids[1..] {
        client.drain_node(*node).await.unwrap();
    }
    let id = client
        .create_table(&table("skewed", 12), false)
        .await
        .unwrap();
    assert_eq!(led_count(&client, &[id]).await.get(&ids[0]), Some(&12));
    for node in &ids[1..] {
        client
            .set_node_state(*node, pb::NodeState::Active)
            .await
            .unwrap();
    }
    assert!(client.set_balancer(true).await.unwrap().balancer);
    let most_running = std::sync::atomic::AtomicU64::new(0);
    wait_until(Duration::from_secs(60), || async {
        let status = client.maintenance().await.map_err(|e| e.to_string())?;
        most_running.fetch_max(
            status.running_migrations,
            std::sync::atomic::Ordering::Relaxed,
        );
        let counts = led_count(&client, &[id]).await;
        let (max, min) = (
            ids.iter()
                .map(|n| counts.get(n).copied().unwrap_or(0))
                .max()
                .unwrap(),
            ids.iter()
                .map(|n| counts.get(n).copied().unwrap_or(0))
                .min()
                .unwrap(),
        );
        check(max - min <= 1, || format!("{counts:?}"))
    })
    .await;
    assert!(
        most_running.into_inner() <= 2,
        "more than the limit ran at once"
    );
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

/// The first region of a new 3-region table, its leader and another node.
async fn one_region(client: &MetaClient, sim: &Simulator, name: &str) -> (u32, u64, u64, u64) {
    let id = client.create_table(&table(name, 3), false).await.unwrap();
    led_once(client, sim, &[id]).await;
    let (region, from) = leaders(client, &[id]).await.into_iter().next().unwrap();
    let to = sim.node_ids().into_iter().find(|n| *n != from).unwrap();
    (id, region, from, to)
}

#[tokio::test]
async fn a_failed_migration_rolls_back_and_the_old_leader_serves_again() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    // The target refuses to open the candidate.
    let (id, region, from, to) = one_region(&client, &sim, "refused").await;
    sim.refuse_regions(to, true);
    let e = client
        .migrate_regions(&[region], to, Duration::ZERO, WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused"), "{e}");
    sim.refuse_regions(to, false);
    let view = client.region(region).await.unwrap();
    assert_eq!((view.leader, view.leader_state.as_str()), (from, "serving"));
    assert!(
        !sim.regions(to).contains(&region),
        "the candidate was closed"
    );
    led_once(&client, &sim, &[id]).await;
    // The target is too slow for the migration's timeout: rolled back after the
    // route was marked, the old leader is leased again.
    let (id, region, from, to) = one_region(&client, &sim, "slow").await;
    sim.delay_regions(to, Duration::from_millis(1_500));
    let e = client
        .migrate_regions(&[region], to, Duration::from_millis(1_000), WAIT)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not finish in time"), "{e}");
    sim.delay_regions(to, Duration::ZERO);
    let view = client.region(region).await.unwrap();
    assert_eq!((view.leader, view.leader_state.as_str()), (from, "serving"));
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

#[tokio::test]
async fn an_unconfirmed_downgrade_waits_out_the_old_lease() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let (id, region, from, to) = one_region(&client, &sim, "fenced").await;
    // The old leader keeps heartbeating but will not confirm the downgrade: the
    // migration must wait until its lease has surely ended.
    sim.refuse_regions(from, true);
    let started = std::time::Instant::now();
    let answer = client
        .migrate_regions(&[region], to, Duration::ZERO, WAIT)
        .await
        .unwrap();
    assert!(answer.done, "{answer:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1_300),
        "upgraded before a lease length passed: {:?}",
        started.elapsed()
    );
    sim.refuse_regions(from, false);
    assert_eq!(leaders(&client, &[id]).await[&region], to);
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

/// Moves a region off a leader that stalls (a GC-like pause longer than its lease,
/// which also keeps it from confirming the downgrade); the checker's report.
async fn move_off_a_stalled_leader(break_fence: bool) -> meta_client::sim::history::Report {
    // The downgrade gives up well within a lease, so only the fence keeps the two
    // leaders apart.
    let server = server(|c| c.metadata.region_timeout_ms = 300).await;
    if break_fence {
        server.plane.leases.break_fence_for_tests();
    }
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let (id, region, from, to) = one_region(&client, &sim, "stalled").await;
    sim.pause(from, Duration::from_secs(3));
    wait_until(WAIT, || async {
        check(sim.stalled(from), || "not stalled yet".into())
    })
    .await;
    let answer = client
        .migrate_regions(&[region], to, Duration::ZERO, WAIT)
        .await
        .unwrap();
    assert!(answer.done, "{answer:?}");
    led_once(&client, &sim, &[id]).await;
    check_history(&sim.history().events())
}

#[tokio::test]
async fn a_stalled_leader_is_fenced_and_the_checker_catches_a_broken_fence() {
    let report = move_off_a_stalled_leader(false).await;
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    // The same move with the fence broken: the new leader is leased while the
    // stalled one still holds its lease, and the checker says so.
    let report = move_off_a_stalled_leader(true).await;
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, meta_client::sim::history::Violation::TwoLeaders { .. })),
        "the checker missed a broken fence: {report:?}"
    );
}
