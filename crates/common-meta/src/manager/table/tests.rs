use std::collections::BTreeMap;

use super::*;
use crate::key::TOMBSTONE_PREFIX;
use crate::kv::{KvLimits, MemoryKvBackend};
use crate::model::table::{ColumnSchema, Peer, RegionId, RegionRoute, SemanticType};

fn info(id: u32, name: &str, regions: u32) -> TableInfo {
    TableInfo {
        id,
        catalog: "greptime".into(),
        schema: "public".into(),
        name: name.into(),
        engine: "mito".into(),
        columns: vec![ColumnSchema {
            name: "ts".into(),
            data_type: "timestamp".into(),
            nullable: false,
            default: None,
            semantic_type: SemanticType::Timestamp,
        }],
        primary_key: vec![],
        time_index: Some("ts".into()),
        options: BTreeMap::new(),
        partition: Default::default(),
        regions,
        version: 0,
        created_ms: 1,
        updated_ms: 1,
    }
}

/// Region i led by node `1 + i % nodes`.
fn route(info: &TableInfo, nodes: u64) -> TableRoute {
    TableRoute {
        regions: info
            .region_ids()
            .map(|region| RegionRoute {
                region,
                leader: Some(Peer {
                    id: 1 + u64::from(region.region_number()) % nodes,
                    addr: String::new(),
                }),
                followers: vec![],
                leader_state: Default::default(),
                leader_down_since: None,
            })
            .collect(),
        version: 0,
    }
}

fn manager(max_txn_ops: usize) -> (Arc<MemoryKvBackend>, TableMetadataManager) {
    let limits = KvLimits {
        max_txn_ops,
        ..KvLimits::default()
    };
    let kv = Arc::new(MemoryKvBackend::with_limits(limits));
    (kv.clone(), TableMetadataManager::new(kv, max_txn_ops))
}

async fn all_keys(kv: &MemoryKvBackend) -> Vec<String> {
    kv.range(RangeRequest::prefix(Vec::new()))
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect()
}

#[tokio::test]
async fn create_is_all_or_nothing_and_repeatable() {
    let (_, tables) = manager(128);
    let cpu = info(1024, "cpu", 4);
    let cpu_route = route(&cpu, 3);
    assert_eq!(
        tables.create_table(&cpu, &cpu_route).await.unwrap(),
        CreateOutcome::Created
    );
    // A recovered procedure runs its commit again: the same values succeed.
    assert_eq!(
        tables.create_table(&cpu, &cpu_route).await.unwrap(),
        CreateOutcome::Created
    );
    // Another table under the name is told who holds it, and nothing of it is written.
    let other = info(1025, "cpu", 1);
    assert_eq!(
        tables
            .create_table(&other, &route(&other, 1))
            .await
            .unwrap(),
        CreateOutcome::Exists(1024)
    );
    assert!(tables.table_info(1025).await.unwrap().is_none());
    assert!(!tables.datanode_tables(1).await.unwrap().contains_key(&1025));

    assert_eq!(
        tables.table_id("greptime", "public", "cpu").await.unwrap(),
        Some(1024)
    );
    assert_eq!(tables.table_info(1024).await.unwrap().unwrap().value, cpu);
    assert_eq!(
        tables.table_route(1024).await.unwrap().unwrap().value,
        cpu_route
    );
    // Regions 0 and 3 on node 1, 1 on node 2, 2 on node 3.
    assert_eq!(
        tables.datanode_tables(1).await.unwrap()[&1024].regions,
        [0, 3]
    );
    assert_eq!(tables.datanode_tables(2).await.unwrap()[&1024].regions, [1]);
    assert_eq!(
        tables.datanode_tables(3).await.unwrap()[&1024].engine,
        "mito"
    );
    let listed = tables.tables("greptime", Some("public")).await.unwrap();
    assert_eq!(listed, [cpu]);
    assert!(
        tables
            .tables("greptime", Some("other"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_table_wider_than_a_transaction_is_written_in_chunks_name_last() {
    // 3 ops per txn: name, info and route fill one; 5 node keys need two more.
    let (kv, tables) = manager(3);
    let wide = info(2000, "wide", 5);
    let wide_route = route(&wide, 5);
    assert_eq!(
        tables.create_table(&wide, &wide_route).await.unwrap(),
        CreateOutcome::Created
    );
    for node in 1..=5 {
        assert_eq!(
            tables.datanode_tables(node).await.unwrap()[&2000]
                .regions
                .len(),
            1
        );
    }
    // Dropped in chunks too, then restored, then purged: every step leaves the store
    // consistent, and nothing is left at the end.
    tables.tombstone_table(&wide, &wide_route).await.unwrap();
    assert!(
        tables
            .table_id("greptime", "public", "wide")
            .await
            .unwrap()
            .is_none()
    );
    assert!(tables.datanode_tables(4).await.unwrap().is_empty());
    let keys = all_keys(&kv).await;
    assert_eq!(keys.len(), 8, "{keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with(TOMBSTONE_PREFIX)),
        "{keys:?}"
    );
    // Idempotent: a second run finds nothing left to move.
    tables.tombstone_table(&wide, &wide_route).await.unwrap();
    tables.restore_table(&wide, &wide_route).await.unwrap();
    tables.restore_table(&wide, &wide_route).await.unwrap();
    assert_eq!(
        tables.table_id("greptime", "public", "wide").await.unwrap(),
        Some(2000)
    );
    assert!(
        all_keys(&kv)
            .await
            .iter()
            .all(|k| !k.starts_with(TOMBSTONE_PREFIX))
    );
    tables.tombstone_table(&wide, &wide_route).await.unwrap();
    tables.purge_table(&wide, &wide_route).await.unwrap();
    assert!(all_keys(&kv).await.is_empty());
}

#[tokio::test]
async fn rename_and_updates_compare_the_value_they_read() {
    let (_, tables) = manager(128);
    let cpu = info(1024, "cpu", 2);
    let cpu_route = route(&cpu, 2);
    tables.create_table(&cpu, &cpu_route).await.unwrap();
    let mem = info(1025, "mem", 1);
    tables.create_table(&mem, &route(&mem, 1)).await.unwrap();

    let read = tables.table_info(1024).await.unwrap().unwrap();
    assert!(
        !tables.rename_table(&read, "mem", 5).await.unwrap(),
        "name taken"
    );
    assert!(tables.rename_table(&read, "cpu2", 5).await.unwrap());
    assert!(
        !tables.rename_table(&read, "cpu3", 6).await.unwrap(),
        "stale read"
    );
    assert!(
        tables
            .table_id("greptime", "public", "cpu")
            .await
            .unwrap()
            .is_none()
    );
    let renamed = tables.table_info(1024).await.unwrap().unwrap();
    assert_eq!(
        (renamed.value.name.as_str(), renamed.value.version),
        ("cpu2", 1)
    );

    let mut altered = renamed.value.clone();
    altered.version += 1;
    assert!(tables.update_table_info(&renamed, &altered).await.unwrap());
    assert!(!tables.update_table_info(&renamed, &altered).await.unwrap());

    // Moving region 1 from node 2 to node 3 moves the per-node keys with it.
    let current = tables.table_route(1024).await.unwrap().unwrap();
    let mut moved = current.value.clone();
    moved.version += 1;
    moved.regions[1].leader = Some(Peer {
        id: 3,
        addr: String::new(),
    });
    let err = tables
        .update_table_route(&altered, &current, &current.value)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must have version 1"), "{err}");
    assert!(
        tables
            .update_table_route(&altered, &current, &moved)
            .await
            .unwrap()
    );
    assert!(
        !tables
            .update_table_route(&altered, &current, &moved)
            .await
            .unwrap()
    );
    assert!(tables.datanode_tables(2).await.unwrap().is_empty());
    assert_eq!(tables.datanode_tables(3).await.unwrap()[&1024].regions, [1]);
    assert_eq!(
        tables
            .table_route(1024)
            .await
            .unwrap()
            .unwrap()
            .value
            .regions[1]
            .region,
        RegionId::new(1024, 1)
    );
}

#[tokio::test]
async fn a_table_needs_its_schema_at_commit() {
    let (kv, tables) = manager(128);
    let mut app = info(1024, "cpu", 1);
    app.schema = "app".into();
    let err = tables
        .create_table(&app, &route(&app, 1))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("schema greptime.app not found"),
        "{err}"
    );
    assert!(all_keys(&kv).await.is_empty(), "nothing written");
    let catalogs = crate::manager::CatalogManager::new(kv.clone());
    catalogs
        .create_schema("greptime", "app", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        tables.create_table(&app, &route(&app, 1)).await.unwrap(),
        CreateOutcome::Created
    );
}

#[tokio::test]
async fn a_repeated_create_finds_its_table_even_renamed_and_a_lost_one_leaves_nothing() {
    let (kv, tables) = manager(3);
    let cpu = info(1024, "cpu", 4);
    let cpu_route = route(&cpu, 4);
    assert!(tables.fence_absent(1024).await.unwrap());
    tables.create_table(&cpu, &cpu_route).await.unwrap();
    assert!(
        !tables.fence_absent(1024).await.unwrap(),
        "created: not absent"
    );
    let read = tables.table_info(1024).await.unwrap().unwrap();
    assert!(tables.rename_table(&read, "cpu2", 9).await.unwrap());
    // The create runs again after a crash: its table is there, renamed.
    assert_eq!(
        tables.create_table(&cpu, &cpu_route).await.unwrap(),
        CreateOutcome::Created
    );
    // Another table under a taken name, wide enough to be written in chunks: told
    // who holds the name, and its per-node keys written ahead are gone again.
    let before = all_keys(&kv).await;
    let mut other = info(1025, "cpu2", 5);
    other.name = "cpu2".into();
    assert_eq!(
        tables
            .create_table(&other, &route(&other, 5))
            .await
            .unwrap(),
        CreateOutcome::Exists(1024)
    );
    assert_eq!(all_keys(&kv).await, before);
}

#[tokio::test]
async fn a_repeated_drop_never_takes_the_name_of_a_table_created_since() {
    let (_, tables) = manager(128);
    let old = info(1024, "t", 2);
    let old_route = route(&old, 2);
    tables.create_table(&old, &old_route).await.unwrap();
    tables.tombstone_table(&old, &old_route).await.unwrap();
    // A new table under the name, then the old drop's step runs again.
    let new = info(1025, "t", 1);
    tables.create_table(&new, &route(&new, 1)).await.unwrap();
    tables.tombstone_table(&old, &old_route).await.unwrap();
    assert_eq!(
        tables.table_id("greptime", "public", "t").await.unwrap(),
        Some(1025)
    );
    // Restoring the old one leaves the new one its name; purging takes only the old.
    tables.restore_table(&old, &old_route).await.unwrap();
    assert_eq!(
        tables.table_id("greptime", "public", "t").await.unwrap(),
        Some(1025)
    );
    tables.tombstone_table(&old, &old_route).await.unwrap();
    tables.purge_table(&old, &old_route).await.unwrap();
    assert_eq!(
        tables.table_id("greptime", "public", "t").await.unwrap(),
        Some(1025)
    );
    assert!(tables.table_info(1025).await.unwrap().is_some());
    assert!(tables.table_info(1024).await.unwrap().is_none());
}
