//! Hotspot splits: a route whose reported load stays over the threshold is split at
//! the middle of its load within a few windows; a cold cluster, or a hot one with
//! splitting turned off, is never split.

use std::time::Duration;

use meta_client::{MetaClient, MetaClientOptions};

use super::changes::two_groups;
use crate::in_process::{Running, start_with};
use crate::support::{check, wait_until};

const WINDOW_MS: u64 = 200;

async fn server(split: bool) -> Running {
    start_with(|c| {
        c.heartbeat_interval_ms = 50;
        c.routes.hotspot_split = split;
        c.routes.hotspot_window_ms = WINDOW_MS;
        c.routes.hotspot_threshold = 1_000;
        c.routes.hotspot_windows = 3;
        c.routes.hotspot_cooldown_ms = 60_000;
    })
    .await
}

/// Reports load on route 1 of group 1 from node 1 for `windows` windows: `per_window`
/// writes each window, added in quarters (so a window never misses its share), with
/// one sample on each of the keys "k00".."k99".
async fn report(sim: &meta_client::sim::Simulator, per_window: u64, windows: u64) {
    let groups = sim.groups(1).unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:02}")).collect();
    let samples: Vec<(&[u8], u64)> = keys.iter().map(|k| (k.as_bytes(), 1)).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(WINDOW_MS / 4));
    for _ in 0..windows * 4 {
        tick.tick().await;
        groups.add_load(1, 1, 0, per_window / 4, &samples);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_route_is_split_at_its_load_median_and_a_cold_one_never() {
    let server = server(true).await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let sim = two_groups(std::slice::from_ref(&server.grpc)).await;
    // Cold: 20 writes a window of 200 ms score 20 x 4 / 0.2 s = 400 per second, under
    // the threshold of 1,000.
    report(&sim, 20, 15).await;
    let catalog = client.routes().await.unwrap();
    assert_eq!(
        (catalog.version, catalog.routes.len()),
        (1, 1),
        "a cold route stays whole"
    );

    // Hot: 100 writes a window, 2,000 per second.
    let reporting = report(&sim, 100, 30);
    let watching = wait_until(Duration::from_secs(30), || async {
        let catalog = client.routes().await.map_err(|e| e.to_string())?;
        check(catalog.routes.len() == 2, || {
            format!("not split yet: {catalog:?}")
        })?;
        Ok(catalog)
    });
    let ((), catalog) = tokio::join!(reporting, watching);
    assert_eq!(catalog.version, 2);
    // Equal weights on k00..k99: half the load is at or below k49.
    assert_eq!(
        catalog.routes[1].start, b"k49",
        "split at the median of the load"
    );
    // The halves cool down: hot as they are, no further split.
    let catalog = client.routes().await.unwrap();
    assert_eq!(catalog.routes.len(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotspot_splitting_turned_off_splits_nothing() {
    let server = server(false).await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let sim = two_groups(std::slice::from_ref(&server.grpc)).await;
    report(&sim, 100, 15).await;
    let catalog = client.routes().await.unwrap();
    assert_eq!((catalog.version, catalog.routes.len()), (1, 1));
    server.shutdown().await;
}
