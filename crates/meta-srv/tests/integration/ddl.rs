//! DDL end to end against simulated datanodes: tables created and dropped through
//! procedures, routes as the selector says, datanodes holding exactly the regions
//! their `__datanode_table` keys list, concurrent creates, failures that leave nothing
//! behind, cache invalidation, and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::{KvBackend, RangeRequest};
use common_meta::manager::TableMetadataManager;
use common_meta::model::table::TableInfo;
use meta_client::sim::{SimOptions, Simulator};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;

use crate::in_process::{Running, start_with};
use crate::support::{check, wait_until};

mod faults;
mod leader_change;

/// A table of `regions` regions in the default schema (host tag, ts, usage).
pub fn table(name: &str, regions: u32) -> TableInfo {
    meta_client::sim::sample_table(name, regions)
}

/// A server with fast heartbeats, quick failure detection and few region attempts.
pub async fn server() -> Running {
    start_with(|c| {
        c.heartbeat_interval_ms = 100;
        c.failure_detector.acceptable_pause_ms = 500;
        c.metadata.region_attempts = 3;
        c.metadata.region_timeout_ms = 2_000;
    })
    .await
}

pub fn client(endpoints: &[String]) -> MetaClient {
    MetaClient::new(endpoints, MetaClientOptions::default()).unwrap()
}

/// `nodes` simulated datanodes with no regions, active and heard by the leader.
pub async fn datanodes(endpoints: &[String], nodes: usize) -> Simulator {
    let options = SimOptions {
        nodes,
        regions_per_node: 0,
        ..SimOptions::default()
    };
    let sim = Simulator::start(endpoints, &options).await.unwrap();
    let client = client(endpoints);
    sim.activate(&client, Duration::from_secs(20))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), || async {
        let views = client.nodes().await.map_err(|e| e.to_string())?;
        let alive = views
            .iter()
            .filter(|v| v.state == pb::NodeState::Active as i32)
            .filter(|v| v.liveness == pb::Liveness::Alive as i32)
            .count();
        check(alive == nodes, || {
            format!("{alive} of {nodes} active and alive")
        })
    })
    .await;
    sim
}

/// The consistency checker: every running simulated datanode holds exactly the regions
/// its `__datanode_table` keys list, every such key matches the table's route, and no
/// tombstone is left.
pub async fn check_consistent(client: &MetaClient, sim: &Simulator) -> Result<(), String> {
    let kv: Arc<dyn KvBackend> = Arc::new(client.clone());
    let tables = TableMetadataManager::new(kv.clone(), 128);
    let err = |e: common_meta::Error| e.to_string();
    let running: BTreeSet<u64> = sim.states().iter().map(|(id, _)| *id).collect();
    for node in sim.node_ids() {
        let listed = tables.datanode_tables(node).await.map_err(err)?;
        let mut expected = BTreeSet::new();
        for (table, entry) in &listed {
            let route = tables
                .table_route(*table)
                .await
                .map_err(err)?
                .ok_or(format!("table {table} on node {node} has no route"))?;
            let mut in_route: Vec<u32> = route
                .value
                .regions
                .iter()
                .filter(|r| r.leader.iter().chain(&r.followers).any(|p| p.id == node))
                .map(|r| r.region.region_number())
                .collect();
            in_route.sort_unstable();
            if in_route != entry.regions {
                return Err(format!(
                    "node {node} table {table}: key lists {:?}, route {in_route:?}",
                    entry.regions
                ));
            }
            for number in &entry.regions {
                expected.insert((u64::from(*table) << 32) | u64::from(*number));
            }
        }
        if running.contains(&node) {
            let held: BTreeSet<u64> = sim.regions(node).into_iter().collect();
            if held != expected {
                return Err(format!(
                    "node {node} holds {:?} but its keys list {:?}",
                    held.difference(&expected).collect::<Vec<_>>(),
                    expected.difference(&held).collect::<Vec<_>>()
                ));
            }
        }
    }
    let tombs = kv
        .range(RangeRequest::prefix(b"__tombstone/".to_vec()))
        .await
        .map_err(err)?;
    if !tombs.kvs.is_empty() {
        return Err(format!("{} tombstones left", tombs.kvs.len()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_tables_spread_round_robin_and_every_datanode_holds_its_keys() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let sim = datanodes(&endpoints, 3).await;
    let client = client(&endpoints);

    let mut ids = BTreeSet::new();
    for i in 0..100 {
        let id = client
            .create_table(&table(&format!("t{i:03}"), 3), false)
            .await
            .unwrap();
        assert!(id >= 1024, "user table ids start at 1024: {id}");
        assert!(ids.insert(id), "id {id} handed out twice");
    }
    // Round-robin over three nodes, three regions per table: one region per node each.
    let mut leaders: BTreeMap<u64, usize> = BTreeMap::new();
    for id in &ids {
        let route = client.table_route(*id).await.unwrap();
        assert_eq!(route.regions.len(), 3);
        let nodes: BTreeSet<u64> = route
            .regions
            .iter()
            .map(|r| r.leader.as_ref().unwrap().id)
            .collect();
        assert_eq!(nodes.len(), 3, "table {id} not spread: {route:?}");
        for node in nodes {
            *leaders.entry(node).or_default() += 1;
        }
    }
    assert_eq!(
        leaders.values().copied().collect::<Vec<_>>(),
        [100, 100, 100]
    );
    check_consistent(&client, &sim).await.unwrap();
    for node in sim.node_ids() {
        assert_eq!(sim.regions(node).len(), 100, "node {node}");
    }
    assert_eq!(
        client
            .list_tables("greptime", "public")
            .await
            .unwrap()
            .len(),
        100
    );

    // Dropping half leaves the other half, and every node's regions follow.
    for i in (0..100).step_by(2) {
        client
            .drop_table("greptime", "public", &format!("t{i:03}"), false)
            .await
            .unwrap();
    }
    check_consistent(&client, &sim).await.unwrap();
    assert_eq!(client.list_tables("greptime", "").await.unwrap().len(), 50);
    for node in sim.node_ids() {
        assert_eq!(sim.regions(node).len(), 50, "node {node}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_make_one_table() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let sim = datanodes(&endpoints, 3).await;
    let client = client(&endpoints);

    let creates = (0..8).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.create_table(&table("race", 2), false).await })
    });
    let mut won = Vec::new();
    for create in creates {
        match create.await.unwrap() {
            Ok(id) => won.push(id),
            Err(common_meta::Error::AlreadyExists { what }) => {
                assert!(what.contains("greptime.public.race"), "{what}")
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one create wins: {won:?}");
    // With if_not_exists, every racer gets the winner's id.
    let again = (0..4).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.create_table(&table("race", 2), true).await })
    });
    for create in again {
        assert_eq!(create.await.unwrap().unwrap(), won[0]);
    }
    check_consistent(&client, &sim).await.unwrap();

    // Create, drop, create: a new table under the old name, with a new id.
    client
        .drop_table("greptime", "public", "race", false)
        .await
        .unwrap();
    let second = client.create_table(&table("race", 2), false).await.unwrap();
    assert!(
        second > won[0],
        "ids are never reused: {second} after {}",
        won[0]
    );
    check_consistent(&client, &sim).await.unwrap();
    let total: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(total, 2, "only the second table's regions remain");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_alter_rename_truncate_and_ids() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let sim = datanodes(&endpoints, 2).await;
    let client = client(&endpoints);

    // The default catalog and schema exist from the start.
    let dbs = client.list_databases("").await.unwrap();
    assert!(
        dbs.iter()
            .any(|d| d.catalog == "greptime" && d.schema == "public")
    );
    client
        .create_database("", "app", [("ttl".to_string(), "7d".to_string())], false)
        .await
        .unwrap();
    let err = client
        .create_database("", "app", [], false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, common_meta::Error::AlreadyExists { .. }),
        "{err}"
    );
    client.create_database("", "app", [], true).await.unwrap();
    let app = client.list_databases("greptime").await.unwrap();
    let app = app.iter().find(|d| d.schema == "app").unwrap();
    assert_eq!(app.options["ttl"], "7d");

    let mut cpu = table("cpu", 2);
    cpu.schema = "app".into();
    let id = client.create_table(&cpu, false).await.unwrap();
    let mut mem = table("mem", 1);
    mem.schema = "app".into();
    client.create_table(&mem, false).await.unwrap();

    client
        .alter_table(pb::AlterTableTask {
            catalog: "greptime".into(),
            schema: "app".into(),
            table: "cpu".into(),
            add_columns_json: vec![
                r#"{"name":"region","data_type":"string","semantic_type":"field"}"#.into(),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
    let info = client.table_info(id).await.unwrap();
    assert_eq!((info.version, info.columns.len()), (1, 4));
    client
        .truncate_table("greptime", "app", "cpu")
        .await
        .unwrap();
    client
        .rename_table("greptime", "app", "cpu", "cpu2")
        .await
        .unwrap();
    let (renamed, _) = client.table("greptime", "app", "cpu2").await.unwrap();
    assert_eq!((renamed.id, renamed.version), (id, 2));
    let err = client.table("greptime", "app", "cpu").await.unwrap_err();
    assert!(matches!(err, common_meta::Error::NotFound { .. }), "{err}");
    check_consistent(&client, &sim).await.unwrap();

    // Dropping the database drops its tables and their regions.
    client.drop_database("", "app", false).await.unwrap();
    assert!(
        !client
            .list_databases("")
            .await
            .unwrap()
            .iter()
            .any(|d| d.schema == "app")
    );
    let total: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(total, 0);
    check_consistent(&client, &sim).await.unwrap();
    client.drop_database("", "app", true).await.unwrap();

    // Id sequences: increasing, never reused.
    let a = client.alloc_ids("job", 10).await.unwrap();
    let b = client.alloc_ids("job", 1).await.unwrap();
    assert_eq!(a.end - a.start, 10);
    assert!(b.start >= a.end, "{a:?} then {b:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_every_connected_node_and_keep_a_cache_current() {
    use meta_client::table_cache::{InvalidatingHandler, TableCache};
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let sim = datanodes(&endpoints, 3).await;
    let client = client(&endpoints);
    client
        .create_table(&table("cached", 1), false)
        .await
        .unwrap();

    // A frontend with a cache fed by its own heartbeat stream.
    let cache = TableCache::new(client.clone(), Duration::from_secs(3600));
    let identity = meta_client::NodeIdentity {
        id: 100,
        role: pb::NodeRole::Frontend,
        addr: "frontend:4000".into(),
        start_time_ms: 1,
        ..Default::default()
    };
    let handler = Arc::new(InvalidatingHandler::new(cache.clone(), Arc::new(Quiet)));
    let task =
        meta_client::HeartbeatTask::start(client.clone(), identity, Arc::new(Quiet), handler);
    let _follow = cache.clear_on_reconnect(task.state());
    wait_until(Duration::from_secs(10), || async {
        check(task.state().borrow().connected_to.is_some(), || {
            "frontend not connected".into()
        })
    })
    .await;

    let first = cache.table("greptime", "public", "cached").await.unwrap();
    assert_eq!(first.info.version, 0);
    cache.table("greptime", "public", "cached").await.unwrap();
    assert_eq!(
        cache.fetches(),
        1,
        "the second read is served from the cache"
    );

    let before: Vec<u64> = sim
        .node_ids()
        .iter()
        .map(|n| sim.invalidations(*n))
        .collect();
    client
        .alter_table(pb::AlterTableTask {
            table: "cached".into(),
            set_options: [("ttl".to_string(), "1d".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Every datanode got the push, and the frontend's cache reads the new version.
    wait_until(Duration::from_secs(10), || async {
        let after: Vec<u64> = sim
            .node_ids()
            .iter()
            .map(|n| sim.invalidations(*n))
            .collect();
        check(after.iter().zip(&before).all(|(a, b)| a > b), || {
            format!("invalidations before {before:?}, after {after:?}")
        })
    })
    .await;
    wait_until(Duration::from_secs(10), || async {
        let now = cache
            .table("greptime", "public", "cached")
            .await
            .map_err(|e| e.to_string())?;
        check(now.info.version == 1, || {
            format!("cache still at version {}", now.info.version)
        })
    })
    .await;
    assert_eq!(cache.fetches(), 2);

    // A node that opens a new stream may have missed pushes meanwhile: it re-reads.
    let (state, follow) = tokio::sync::watch::channel(meta_client::HeartbeatState {
        connected_to: Some(server.grpc.clone()),
        streams: 1,
        ..Default::default()
    });
    let _reconnects = cache.clear_on_reconnect(follow);
    cache.table("greptime", "public", "cached").await.unwrap();
    assert_eq!(cache.fetches(), 2, "still cached");
    // Gone and back at once: the watcher may see only the last state.
    state.send_modify(|s| s.connected_to = None);
    state.send_modify(|s| {
        s.connected_to = Some("elsewhere:3002".into());
        s.streams += 1;
    });
    wait_until(Duration::from_secs(10), || async {
        cache
            .table("greptime", "public", "cached")
            .await
            .map_err(|e| e.to_string())?;
        check(cache.fetches() >= 3, || {
            "the reconnect did not clear the cache".into()
        })
    })
    .await;
    drop(task);
    server.shutdown().await;
}

/// A node with no regions that does nothing with instructions.
struct Quiet;

#[async_trait::async_trait]
impl meta_client::StatsProvider for Quiet {
    async fn stats(&self) -> Vec<pb::RegionStat> {
        Vec::new()
    }
}

#[async_trait::async_trait]
impl meta_client::InstructionHandler for Quiet {
    async fn handle(&self, _: pb::Instruction) -> Result<Vec<pb::RegionOutcome>, String> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubmitted_request_id_answers_the_first_outcome() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let sim = datanodes(&endpoints, 2).await;
    let mut ddl = pb::ddl_client::DdlClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let create = |request_id: &str| pb::SubmitDdlRequest {
        task: Some(pb::DdlTask {
            kind: Some(pb::ddl_task::Kind::CreateTable(pb::CreateTableTask {
                table_info_json: serde_json::to_string(&table("once", 2)).unwrap(),
                if_not_exists: false,
            })),
        }),
        request_id: request_id.to_string(),
        timeout_ms: 10_000,
    };
    let first = ddl.submit(create("req-1")).await.unwrap().into_inner();
    assert!(first.done && first.table_id >= 1024, "{first:?}");
    assert_eq!(first.procedure_id, "ddl-req-1");
    // The same request again (its answer was lost, say): the first outcome, not
    // "already exists", and nothing created twice.
    let again = ddl.submit(create("req-1")).await.unwrap().into_inner();
    assert_eq!((again.done, again.table_id), (true, first.table_id));
    // A new request for the same table is a new create: it exists.
    let status = ddl.submit(create("req-2")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    let client = client(&endpoints);
    check_consistent(&client, &sim).await.unwrap();
    let total: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(total, 2);
    // A bad request id is refused as such.
    let status = ddl.submit(create("a/b")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    server.shutdown().await;
}
