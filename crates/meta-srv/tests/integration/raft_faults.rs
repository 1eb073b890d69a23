//! Members that fail, on the in-process `LocalRouter` cluster: an injected storage
//! error, a storage that hangs, a panicking driver (each member stops, the others go
//! on), and restarts on either side of an apply that changes the configuration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::{KvBackend, KvLimits, SledKvStore};
use meta_srv::raft::driver::{Command, Fault, RaftNode, RaftSettings};
use meta_srv::raft::members::Members;
use meta_srv::raft::transport::LocalRouter;

use crate::raft_cluster::{Cluster, ELECTION_BOUND, put};
use crate::support::{check, wait_until};

/// A log of one member (id 1) of three: the three initial voters, then member 3 removed
/// and added back as a learner at a new address (entries 4 and 5), all committed. The
/// state machine has applied up to 3 (a crash before the apply of 4 and 5) or, when
/// `applied_all`, up to 5 (a crash just after it).
fn crashed_around_a_conf_change(dir: &std::path::Path, applied_all: bool) {
    use meta_srv::raft::log_store::LogStore;
    use protobuf::Message as _;
    use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState};

    let db = sled::open(dir).unwrap();
    let store = Arc::new(SledKvStore::open_in(db.clone(), KvLimits::default()).unwrap());
    let addrs: BTreeMap<u64, String> = (1..=3).map(|i| (i, format!("a:{i}"))).collect();
    let members = Arc::new(Members::open(&store, &db, &addrs).unwrap());
    let log = LogStore::open(db.clone(), store.clone(), members).unwrap();
    let change = |index: u64, kind: ConfChangeType, node: u64, addr: &str| {
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = node;
        cc.context = addr.as_bytes().to_vec().into();
        let mut entry = Entry {
            term: 1,
            index,
            data: cc.write_to_bytes().unwrap().into(),
            ..Default::default()
        };
        entry.set_entry_type(EntryType::EntryConfChange);
        entry
    };
    let mut entries: Vec<Entry> = (1..=3)
        .map(|i| change(i, ConfChangeType::AddNode, i, &format!("a:{i}")))
        .collect();
    entries.push(change(4, ConfChangeType::RemoveNode, 3, ""));
    entries.push(change(5, ConfChangeType::AddLearnerNode, 3, "a:3bis"));
    log.append(&entries).unwrap();
    log.set_hard_state(&HardState {
        term: 1,
        commit: 5,
        ..Default::default()
    })
    .unwrap();
    let before = ConfState::from((vec![1, 2, 3], Vec::<u64>::new()));
    let noops = |range: std::ops::RangeInclusive<u64>| {
        range
            .map(|i| (i, common_meta::kv::Command::Noop))
            .collect::<Vec<_>>()
    };
    store
        .apply_with(
            noops(1..=3),
            vec![LogStore::conf_state_write(&before).unwrap()],
        )
        .unwrap();
    if applied_all {
        // What the driver writes for entries 4 and 5: one batch.
        let after = ConfState::from((vec![1, 2], vec![3]));
        store
            .apply_with(
                noops(4..=5),
                vec![
                    LogStore::conf_state_write(&after).unwrap(),
                    Members::writes_for(3, Some("a:3bis")),
                ],
            )
            .unwrap();
    }
    log.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_around_a_conf_change_apply_restarts_and_converges() {
    for applied_all in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        crashed_around_a_conf_change(dir.path(), applied_all);
        tracing::info!(applied_all, "--- the member restarts on that state");
        let db = sled::open(dir.path()).unwrap();
        let store = Arc::new(SledKvStore::open_in(db.clone(), KvLimits::default()).unwrap());
        let members = Arc::new(Members::open(&store, &db, &BTreeMap::new()).unwrap());
        let node = RaftNode::start(
            RaftSettings::new(1, Vec::new()),
            db,
            store,
            members.clone(),
            Arc::new(LocalRouter::default()),
        )
        .unwrap();
        let status = wait_until(ELECTION_BOUND, || async {
            let status = node.status().await.map_err(|e| e.to_string())?;
            check(status.applied_index >= 5, || {
                format!("replaying: {status:?}")
            })?;
            Ok(status)
        })
        .await;
        assert_eq!(
            (status.voters, status.learners),
            (vec![1, 2], vec![3]),
            "each change applied once (applied_all: {applied_all})"
        );
        assert_eq!(members.addr(3).as_deref(), Some("a:3bis"));
        assert_eq!(*node.failure().borrow(), None, "no crash loop");
    }
}

/// Waits until member `id`'s driver has published its failure; returns the reason.
async fn failed(cluster: &Cluster, id: u64) -> String {
    let mut failure = cluster.members[&id].node.failure();
    tokio::time::timeout(ELECTION_BOUND, failure.wait_for(Option::is_some))
        .await
        .expect("the member fails within the bound")
        .expect("a failed driver publishes its failure")
        .clone()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_storage_fails_stops_and_the_others_go_on() {
    let mut cluster = Cluster::new(3);
    let old = cluster.leader().await;
    put(cluster.backend(old), "f/0", "x").await.unwrap();

    tracing::info!("--- the leader's storage fails");
    cluster.members[&old]
        .node
        .driver()
        .send(Command::InjectFault(Fault::StorageError))
        .unwrap();
    let reason = failed(&cluster, old).await;
    assert!(reason.contains("injected storage failure"), "{reason}");
    assert_eq!(
        *cluster.members[&old].node.leadership().borrow(),
        None,
        "a failed member never claims to lead"
    );
    let err = put(cluster.backend(old), "f/1", "y").await.unwrap_err();
    assert!(
        err.is_retryable(),
        "nothing is proposed by a failed member: {err}"
    );
    assert!(
        cluster.members[&old].node.status().await.is_err(),
        "it answers nothing"
    );

    tracing::info!("--- the others elect a leader and take writes");
    cluster.kill(old);
    let new = cluster.leader().await;
    assert_ne!(new, old);
    put(cluster.backend(new), "f/2", "z").await.unwrap();
    assert_eq!(
        cluster
            .backend(new)
            .get(b"f/0")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_storage_hangs_is_failed_by_its_watchdog() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader().await;
    let stuck = (1..=3).find(|id| *id != leader).unwrap();
    tracing::info!("--- a follower's disk stops answering for longer than the stall bound");
    // Member settings use a 5 s bound (see Cluster::start_with).
    cluster.members[&stuck]
        .node
        .driver()
        .send(Command::InjectFault(Fault::Stall(Duration::from_secs(7))))
        .unwrap();
    let reason = failed(&cluster, stuck).await;
    assert!(
        reason.contains("storage has not completed a write for 5s"),
        "{reason}"
    );
    put(cluster.backend(leader), "s/after", "ok").await.unwrap();
    // Its driver, back from the stall, stops instead of going on.
    cluster.kill(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_driver_panics_stops_and_the_others_go_on() {
    let cluster = Cluster::new(3);
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.members[&follower]
        .node
        .driver()
        .send(Command::InjectFault(Fault::Panic))
        .unwrap();
    let reason = failed(&cluster, follower).await;
    assert!(reason.contains("panicked: injected panic"), "{reason}");
    // Two of three remain: a quorum.
    put(cluster.backend(leader), "p/after", "ok").await.unwrap();
}
