//! `LogStore` against raft-rs's `Storage` contract, crash points and the entry cache.

use std::collections::BTreeMap;

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("e{index}t{term}").into_bytes().into(),
        ..Default::default()
    }
}

/// Applies entries `indexes` to the log's state machine (as if committed).
fn apply_noops(log: &LogStore, indexes: std::ops::RangeInclusive<u64>) {
    log.inner
        .store
        .apply(
            indexes
                .map(|i| (i, common_meta::kv::Command::Noop))
                .collect(),
        )
        .unwrap();
}

fn open(dir: &std::path::Path) -> LogStore {
    let db = sled::open(dir).unwrap();
    let store = Arc::new(SledKvStore::open_in(db.clone(), Default::default()).unwrap());
    let members = Arc::new(Members::in_memory(BTreeMap::new()));
    LogStore::open(db, store, members).unwrap()
}

#[test]
fn append_truncates_a_conflicting_suffix_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        assert!(log.is_empty());
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (1, 0)
        );
        log.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        // A new leader of term 2 overwrites from index 4.
        log.append(&[entry(4, 2)]).unwrap();
        assert_eq!(log.last_index().unwrap(), 4);
        assert_eq!(log.term(4).unwrap(), 2);
        assert_eq!(log.term(3).unwrap(), 1);
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 3,
            ..Default::default()
        };
        log.set_hard_state(&hs).unwrap();
        log.set_conf_state(&ConfState::from((vec![1, 2, 3], vec![])))
            .unwrap();
        log.flush().unwrap();
    }
    let log = open(dir.path());
    assert!(!log.is_empty());
    assert_eq!(log.last_index().unwrap(), 4);
    let state = log.initial_state().unwrap();
    assert_eq!(
        (
            state.hard_state.term,
            state.hard_state.vote,
            state.hard_state.commit
        ),
        (2, 3, 3)
    );
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    let got = log
        .entries(2, 5, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
        [(2, 1), (3, 1), (4, 2)]
    );
}

#[test]
fn compaction_moves_the_first_index_and_keeps_the_boundary_term() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(&(1..=5).map(|i| entry(i, i)).collect::<Vec<_>>())
        .unwrap();
    // Nothing is applied yet: compaction must refuse.
    assert!(log.compact(3).is_err());
    apply_noops(&log, 1..=5);
    log.compact(3).unwrap();
    assert_eq!(log.first_index().unwrap(), 4);
    assert_eq!(log.term(3).unwrap(), 3, "the boundary term is kept");
    assert!(matches!(
        log.term(2),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        log.entries(3, 5, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(
        log.entries(4, 6, None, GetEntriesContext::empty(false))
            .unwrap()
            .len(),
        2
    );
    let snapshot = log.snapshot(5, 2).unwrap();
    assert_eq!(
        (snapshot.get_metadata().index, snapshot.get_metadata().term),
        (5, 5)
    );

    // Another member installs it: its log restarts after index 5.
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    other.append(&[entry(1, 1)]).unwrap();
    other.apply_snapshot(&snapshot).unwrap();
    assert_eq!(
        (other.first_index().unwrap(), other.last_index().unwrap()),
        (6, 5)
    );
    assert_eq!(other.hard_state().commit, 5);
    assert_eq!(other.inner.store.applied_index(), 5);
}

#[test]
fn a_crash_inside_a_snapshot_install_leaves_a_log_that_opens() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let store = Arc::new(SledKvStore::open_in(db.clone(), Default::default()).unwrap());
    let members = Arc::new(Members::in_memory(BTreeMap::new()));
    {
        let log = LogStore::open(db.clone(), store.clone(), members.clone()).unwrap();
        log.append(&(1..=2).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        log.append(&(3..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        // The metadata of a snapshot at 3 is written, the crash comes before the
        // stale entries are removed.
        let metadata = SnapshotMetadata {
            index: 3,
            term: 1,
            ..Default::default()
        };
        log.inner
            .meta
            .insert(SNAPSHOT, encode("snapshot metadata", &metadata).unwrap())
            .unwrap();
    }
    let log = LogStore::open(db, store, members).unwrap();
    assert_eq!(
        (log.first_index().unwrap(), log.last_index().unwrap()),
        (4, 5)
    );
    assert_eq!(log.term(3).unwrap(), 1);
    assert!(!log.inner.runs.holds(2), "a run of dead entries is removed");
}

#[test]
fn recent_entries_answer_like_the_disk_through_truncation_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(&(1..=50).map(|i| entry(i, 1)).collect::<Vec<_>>())
        .unwrap();
    // A new leader overwrites from 40.
    log.append(&(40..=45).map(|i| entry(i, 2)).collect::<Vec<_>>())
        .unwrap();
    let fresh = open_again(&log);
    for (low, high) in [(1, 46), (30, 46), (44, 46), (45, 46)] {
        let cached = log
            .entries(low, high, None, GetEntriesContext::empty(false))
            .unwrap();
        let disk = fresh
            .entries(low, high, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(cached, disk, "[{low}, {high})");
    }
    for i in [1, 39, 40, 45] {
        assert_eq!(log.term(i).unwrap(), fresh.term(i).unwrap(), "term of {i}");
    }
    assert!(matches!(
        log.term(46),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    apply_noops(&log, 1..=45);
    log.compact(42).unwrap();
    assert!(matches!(
        log.entries(40, 46, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert_eq!(
        log.entries(43, 46, None, GetEntriesContext::empty(false))
            .unwrap()
            .len(),
        3
    );
}

/// A second store over the same database, with nothing cached: it reads the disk.
fn open_again(log: &LogStore) -> LogStore {
    LogStore::open(
        log.inner.store.db().clone(),
        log.inner.store.clone(),
        log.inner.members.clone(),
    )
    .unwrap()
}

#[test]
fn contract_errors() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(&(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>())
        .unwrap();
    assert!(matches!(
        log.entries(1, 5, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    assert!(matches!(
        log.term(4),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    assert_eq!(
        log.term(0).unwrap(),
        0,
        "the term before the first entry is known"
    );
    assert!(log.append(&[entry(6, 1)]).is_err(), "a gap is refused");
    // max_size keeps at least one entry.
    let one = log
        .entries(1, 4, Some(1), GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(one.len(), 1);
}

#[test]
fn snapshots_go_as_files_only_to_the_members_that_take_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(&dir.path().join("db"));
    log.append(&(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>())
        .unwrap();
    log.set_conf_state(&ConfState::from((vec![1, 2, 3], vec![])))
        .unwrap();
    apply_noops(&log, 1..=3);
    // Member 2 runs a format that streams snapshot files; member 3 does not.
    let files = Arc::new(
        SnapshotFiles::open(
            &dir.path().join("snapshots"),
            log.inner.store.clone(),
            |to| to == 2,
        )
        .unwrap(),
    );
    log.use_snapshot_files(files.clone());

    let inline = log.snapshot(0, 3).unwrap();
    assert!(FileRef::decode(inline.get_data()).is_none(), "inline for 3");
    assert_eq!(inline.get_metadata().index, 3);

    // For member 2 raft-rs gets an export (built here rather than on its own thread).
    files.build(&log);
    let streamed = log.snapshot(0, 2).unwrap();
    let file = FileRef::decode(streamed.get_data()).expect("a file for 2");
    assert_eq!(streamed.get_metadata().index, 3);
    assert_eq!(streamed.get_metadata().get_conf_state().voters, [1, 2, 3]);
    let bytes = std::fs::read(&file.path).unwrap();
    assert_eq!(bytes.len() as u64, file.size);
    assert_eq!(crc32fast::hash(&bytes), file.crc32);
    assert_eq!(
        bytes,
        inline.get_data().to_vec(),
        "the same envelope either way"
    );
}
