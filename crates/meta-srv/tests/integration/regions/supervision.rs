//! The supervisor's edges: a region a live datanode lost moves alone; maintenance
//! turned on in the middle of a failover lets the moves in flight finish and starts no
//! new ones; maintenance over HTTP; a move to a failed datanode is refused.

use super::*;
use crate::in_process::http_request;

#[tokio::test]
async fn a_region_missing_from_a_live_leader_moves_alone() {
    let server = server(|c| c.failover.region_missing_ms = 500).await;
    let endpoints = vec![server.grpc.clone()];
    let sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let id = client.create_table(&table("lost", 6), false).await.unwrap();
    led_once(&client, &sim, &[id]).await;
    let before = leaders(&client, &[id]).await;
    let (region, holder) = before.iter().next().map(|(r, l)| (*r, *l)).unwrap();
    assert!(sim.lose_region(holder, region));
    wait_until(WAIT, || async {
        let now = leaders(&client, &[id]).await;
        check(now[&region] != holder, || {
            format!("region {region} still on {holder}")
        })
    })
    .await;
    let after = leaders(&client, &[id]).await;
    for (r, l) in &before {
        if *r != region {
            assert_eq!(after[r], *l, "region {r} moved too");
        }
    }
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

#[tokio::test]
async fn maintenance_during_a_failover_finishes_moves_in_flight_and_starts_none() {
    // One migration at a time, each slow: the failover is a queue.
    let server = server(|c| c.failover.max_concurrent_migrations = 1).await;
    let endpoints = vec![server.grpc.clone()];
    let mut sim = writers(&endpoints, 4).await;
    let client = client(&endpoints);
    let id = client
        .create_table(&table("queued", 12), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    let before = leaders(&client, &[id]).await;
    let victim = *before.values().next().unwrap();
    for node in sim.node_ids() {
        sim.delay_regions(node, Duration::from_millis(800));
    }
    sim.kill(victim);
    // The first move is running: turn maintenance on.
    wait_until(WAIT, || async {
        let status = client.maintenance().await.map_err(|e| e.to_string())?;
        check(status.running_migrations == 1, || format!("{status:?}"))
    })
    .await;
    client.set_maintenance(true).await.unwrap();
    let running: Vec<String> = client
        .procedures()
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.type_name == "metasrv.MigrateRegions")
        .map(|p| p.id)
        .collect();
    assert!(!running.is_empty());
    // It finishes; nothing else starts; the rest waits.
    wait_until(WAIT, || async {
        let status = client.maintenance().await.map_err(|e| e.to_string())?;
        check(
            status.running_migrations == 0 && status.pending_failovers > 0,
            || format!("{status:?}"),
        )
    })
    .await;
    let procedures = client.procedures().await.unwrap();
    let migrations: Vec<_> = procedures
        .iter()
        .filter(|p| p.type_name == "metasrv.MigrateRegions")
        .collect();
    assert!(
        migrations
            .iter()
            .all(|p| running.contains(&p.id) && p.state == "done"),
        "{migrations:?}"
    );
    let stuck = leaders(&client, &[id])
        .await
        .values()
        .filter(|l| **l == victim)
        .count();
    assert!(stuck > 0, "every region moved during maintenance");
    client.set_maintenance(false).await.unwrap();
    for node in sim.node_ids() {
        sim.delay_regions(node, Duration::ZERO);
    }
    wait_until(Duration::from_secs(60), || async {
        let left = leaders(&client, &[id])
            .await
            .values()
            .filter(|l| **l == victim)
            .count();
        check(left == 0, || format!("{left} regions still on {victim}"))
    })
    .await;
    led_once(&client, &sim, &[id]).await;
    history_clean(&sim);
}

#[tokio::test]
async fn maintenance_over_http_and_a_move_to_a_failed_node() {
    let server = server(|_| {}).await;
    let endpoints = vec![server.grpc.clone()];
    let mut sim = writers(&endpoints, 3).await;
    let client = client(&endpoints);
    let on = http_request(
        &server.http,
        "POST",
        "/maintenance",
        Some(r#"{"enabled":true}"#),
    )
    .await;
    assert!(on.starts_with("HTTP/1.1 200"), "{on}");
    assert!(on.contains(r#""maintenance":true"#), "{on}");
    assert!(client.maintenance().await.unwrap().maintenance);
    let bad = http_request(&server.http, "POST", "/maintenance", Some(r#"{"on":1}"#)).await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    assert!(
        bad.contains("expected {\\\"enabled\\\": true|false}"),
        "{bad}"
    );
    let got = http_request(&server.http, "GET", "/maintenance", None).await;
    assert!(
        got.contains(r#""maintenance":true"#) && got.contains(r#""failover":true"#),
        "{got}"
    );
    http_request(
        &server.http,
        "POST",
        "/maintenance",
        Some(r#"{"enabled":false}"#),
    )
    .await;
    assert!(!client.maintenance().await.unwrap().maintenance);

    let id = client
        .create_table(&table("dead_end", 3), false)
        .await
        .unwrap();
    led_once(&client, &sim, &[id]).await;
    let (region, from) = leaders(&client, &[id]).await.into_iter().next().unwrap();
    let dead = sim.node_ids().into_iter().find(|n| *n != from).unwrap();
    sim.kill(dead);
    wait_until(WAIT, || async {
        let views = client.nodes().await.map_err(|e| e.to_string())?;
        let failed = views
            .iter()
            .any(|v| v.node_id == dead && v.liveness == pb::Liveness::Failed as i32);
        check(failed, || format!("node {dead} not failed yet"))
    })
    .await;
    let e = client
        .migrate_regions(&[region], dead, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("datanode {dead} is not alive (failed)")),
        "{e}"
    );
}
