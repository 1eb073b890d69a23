//! `SledKvStore` against its contract: replay, snapshots, limits, exactly-once sessions.

use super::*;
use crate::kv::command::SessionRef;
use crate::kv::types::{DeleteRangeRequest, PutRequest, TxnOp};

fn write(txn: TxnRequest) -> Command {
    Command::Txn { txn, session: None }
}

fn txn_answer(answer: &Option<Result<Applied>>) -> TxnResponse {
    match answer {
        Some(Ok(Applied::Txn(response))) => response.clone(),
        other => panic!("not a txn answer: {other:?}"),
    }
}

fn in_session(txn: TxnRequest, id: u64, seq: u64, acked: u64) -> Command {
    Command::Txn {
        txn,
        session: Some(SessionRef { id, seq, acked }),
    }
}

/// Creates `k` only if it does not exist: a retry that applied again would fail.
fn create(key: &str) -> TxnRequest {
    TxnRequest {
        compare: vec![crate::kv::Compare::new(
            key.as_bytes().to_vec(),
            crate::kv::CompareOp::Equal,
            crate::kv::CompareTarget::Version(0),
        )],
        ..put(key)
    }
}

#[test]
fn a_retried_session_write_gets_its_first_answer_and_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let opened = store
            .apply(vec![(
                1,
                Command::OpenSession {
                    ttl_ms: 5_000,
                    owner: String::new(),
                },
            )])
            .unwrap();
        assert_eq!(
            opened[0].as_ref().unwrap().as_ref().unwrap(),
            &Applied::SessionOpened {
                id: 1,
                ttl_ms: 5_000
            }
        );
        assert_eq!(store.sessions().unwrap(), [(1, 5_000)]);
        let first = store
            .apply(vec![(2, in_session(create("k"), 1, 1, 1))])
            .unwrap();
        let first = txn_answer(&first[0]);
        assert!(first.succeeded);
        // The reply was lost; the client sends the same write again.
        let again = store
            .apply(vec![(3, in_session(create("k"), 1, 1, 1))])
            .unwrap();
        assert_eq!(
            txn_answer(&again[0]),
            first,
            "the first answer, not a failed compare"
        );
        assert_eq!(store.revision(), 1, "applied once");
        // The next write acknowledges the first, whose answer is then forgotten.
        let second = store
            .apply(vec![(4, in_session(put("j"), 1, 2, 2))])
            .unwrap();
        assert_eq!(txn_answer(&second[0]).revision, 2);
        let stale = store
            .apply(vec![(5, in_session(create("k"), 1, 1, 1))])
            .unwrap();
        let err = stale[0].as_ref().unwrap().as_ref().unwrap_err();
        assert!(
            err.to_string().contains("below the acknowledged mark 2"),
            "{err}"
        );
        store.flush().unwrap();
    }
    // Kept answers survive a restart: they are in the same batches as the data.
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    let again = store
        .apply(vec![(6, in_session(put("j"), 1, 2, 2))])
        .unwrap();
    assert_eq!(txn_answer(&again[0]).revision, 2);
    assert_eq!(store.revision(), 2);
    // A closed session refuses writes, which then change nothing.
    let closed = store
        .apply(vec![
            (7, Command::CloseSessions { ids: vec![1] }),
            (8, in_session(put("x"), 1, 3, 3)),
            (9, in_session(put("x"), 0, 1, 1)),
        ])
        .unwrap();
    assert!(
        matches!(closed[1], Some(Err(Error::SessionExpired { id: 1 }))),
        "{closed:?}"
    );
    assert!(matches!(
        closed[2],
        Some(Err(Error::InvalidArgument { .. }))
    ));
    assert_eq!(store.revision(), 2);
    assert!(store.sessions().unwrap().is_empty());
    // Sessions need the replicated store: a local commit cannot open one.
    assert!(
        store
            .write_group(
                vec![(
                    0,
                    Command::OpenSession {
                        ttl_ms: 1,
                        owner: String::new()
                    }
                )],
                Vec::new(),
                None
            )
            .unwrap()[0]
            .is_err()
    );
}

fn put(key: &str) -> TxnRequest {
    TxnRequest {
        success: vec![TxnOp::Put(PutRequest::new(key.as_bytes(), b"v".to_vec()))],
        ..Default::default()
    }
}

#[test]
fn replayed_entries_are_skipped_and_the_applied_index_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let answers = store
            .apply(vec![
                (1, write(put("a"))),
                (2, Command::Noop),
                (3, write(put("b"))),
            ])
            .unwrap();
        assert!(answers.iter().all(|a| matches!(a, Some(Ok(_)))));
        assert_eq!((store.applied_index(), store.revision()), (3, 2));
        store.flush().unwrap();
    }
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    assert_eq!((store.applied_index(), store.revision()), (3, 2));
    // A crash before the driver learned of the apply replays 2..=4: only 4 is new.
    let answers = store
        .apply(vec![
            (2, Command::Noop),
            (3, write(put("b"))),
            (4, write(put("c"))),
        ])
        .unwrap();
    assert!(answers[0].is_none() && answers[1].is_none());
    assert_eq!(txn_answer(&answers[2]).revision, 3);
    let b = engine::execute(
        &store,
        store.revision(),
        &KvLimits::default(),
        TxnRequest {
            success: vec![TxnOp::Range(crate::kv::RangeRequest::key(b"b".to_vec()))],
            ..Default::default()
        },
    )
    .unwrap()
    .0;
    match &b.responses[0] {
        crate::kv::TxnOpResponse::Range(r) => assert_eq!(r.kvs[0].version, 1, "b applied once"),
        other => panic!("{other:?}"),
    }
}

/// A copy of the whole store in the stream format, and the applied index it holds.
fn copied(store: &SledKvStore) -> (Vec<u8>, u64) {
    let copy = store.copy().unwrap();
    let mut bytes = Vec::new();
    copy.write_to(&mut bytes).unwrap();
    (bytes, copy.applied())
}

#[test]
fn snapshot_restores_data_revision_and_applied_index_exactly() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = SledKvStore::open(source_dir.path(), KvLimits::default()).unwrap();
    source
        .apply(vec![
            (1, write(put("a"))),
            (2, write(put("b"))),
            (3, Command::Noop),
        ])
        .unwrap();
    let (blob, applied) = copied(&source);
    assert_eq!(applied, 3);

    let target_dir = tempfile::tempdir().unwrap();
    let target = SledKvStore::open(target_dir.path(), KvLimits::default()).unwrap();
    target.commit(vec![put("stale")]).unwrap();
    target.restore(&blob).unwrap();
    assert_eq!((target.revision(), target.applied_index()), (2, 3));
    let keys: Vec<Vec<u8>> = target
        .scan(b"\0", None)
        .map(|item| item.unwrap().0)
        .collect();
    assert_eq!(keys, [b"a".to_vec(), b"b".to_vec()], "stale keys are gone");
    assert_eq!(copied(&target).0, blob);

    let err = target.restore(&blob[..blob.len() - 1]).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(target.revision(), 2, "a bad snapshot changes nothing");
}

#[test]
fn a_copy_stands_still_while_the_store_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    store
        .write_system(vec![
            (b"conf".to_vec(), Some(b"c1".to_vec())),
            (b"member/1".to_vec(), Some(b"a:1".to_vec())),
            (b"member/2".to_vec(), Some(b"b:2".to_vec())),
        ])
        .unwrap();
    store.apply(vec![(1, write(put("a")))]).unwrap();
    let copy = store.copy().unwrap();
    store
        .apply_with(
            vec![(2, write(put("b")))],
            vec![(b"conf".to_vec(), Some(b"c2".to_vec()))],
        )
        .unwrap();

    assert_eq!(copy.applied(), 1);
    assert_eq!(copy.system(b"conf"), Some(&b"c1"[..]), "as of the copy");
    assert_eq!(copy.system(b"missing"), None);
    let members: Vec<(&[u8], &[u8])> = copy.system_scan(b"member/").collect();
    assert_eq!(
        members,
        [
            (&b"member/1"[..], &b"a:1"[..]),
            (&b"member/2"[..], &b"b:2"[..])
        ]
    );
    let mut bytes = Vec::new();
    let written = copy.write_to(&mut bytes).unwrap();
    assert_eq!(written, bytes.len() as u64);

    let target_dir = tempfile::tempdir().unwrap();
    let target = SledKvStore::open(target_dir.path(), KvLimits::default()).unwrap();
    target.restore_from(&mut &bytes[..]).unwrap();
    assert_eq!(target.applied_index(), 1);
    assert_eq!(target.system(b"conf").unwrap(), Some(b"c1".to_vec()));
    assert!(
        target.get(b"b").unwrap().is_none(),
        "written after the copy"
    );
    assert!(target.get(b"a").unwrap().is_some());
}

#[test]
fn a_portable_copy_keeps_data_history_and_revision_but_nothing_of_replication() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    store
        .write_system(vec![(b"conf".to_vec(), Some(b"c1".to_vec()))])
        .unwrap();
    store
        .apply(vec![
            (
                1,
                Command::OpenSession {
                    ttl_ms: 5_000,
                    owner: String::new(),
                },
            ),
            (2, write(put("a"))),
            (3, in_session(put("b"), 1, 1, 0)),
            (4, write(put("a"))),
        ])
        .unwrap();
    assert_eq!(store.sessions().unwrap().len(), 1);
    let copy = store.copy().unwrap().portable();
    assert_eq!((copy.applied(), copy.revision()), (0, 3));
    assert_eq!(copy.system(b"conf"), None, "system values stay behind");
    let mut bytes = Vec::new();
    assert_eq!(copy.write_to(&mut bytes).unwrap(), copy.encoded_len());
    assert_eq!(bytes.len() as u64, copy.encoded_len());

    let target_dir = tempfile::tempdir().unwrap();
    let target = SledKvStore::open(target_dir.path(), KvLimits::default()).unwrap();
    target.restore_from(&mut &bytes[..]).unwrap();
    assert_eq!((target.revision(), target.applied_index()), (3, 0));
    assert!(
        target.sessions().unwrap().is_empty(),
        "sessions stay behind"
    );
    assert_eq!(target.system(b"conf").unwrap(), None);
    let first = target
        .read(TxnRequest {
            success: vec![TxnOp::Range(crate::kv::RangeRequest {
                key: b"a".to_vec(),
                revision: 1,
                ..Default::default()
            })],
            ..Default::default()
        })
        .unwrap();
    let crate::kv::TxnOpResponse::Range(range) = &first.responses[0] else {
        panic!("a range answer: {first:?}");
    };
    assert_eq!(range.kvs[0].mod_revision, 1, "history came along");
}

#[test]
fn replicated_entries_apply_whatever_the_local_limits() {
    let dir = tempfile::tempdir().unwrap();
    let small = KvLimits {
        max_key_bytes: 4,
        ..KvLimits::default()
    };
    let store = SledKvStore::open(dir.path(), small).unwrap();
    let long = put("longer-than-four");
    assert!(store.check(&long).is_err(), "the proposer refuses it");
    let answers = store.commit(vec![long.clone()]).unwrap();
    assert!(answers[0].is_err(), "a single-node commit refuses it too");
    // A member with larger limits proposed it and it committed: it must apply here.
    let applied = store.apply(vec![(1, write(long))]).unwrap();
    assert!(matches!(applied[0], Some(Ok(_))), "{applied:?}");
    assert_eq!(store.revision(), 1);
}

#[test]
fn a_refused_transaction_in_a_group_is_answered_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    let answers = store.commit(vec![put("a"), put(""), put("b")]).unwrap();
    assert!(answers[0].is_ok() && answers[2].is_ok());
    assert!(matches!(answers[1], Err(Error::InvalidArgument { .. })));
    assert_eq!(store.revision(), 2);
    let err = store.read(put("x")).unwrap_err();
    assert!(
        err.to_string()
            .contains("read was given a transaction that writes")
    );
}

fn put_txn(key: &str, value: &str) -> TxnRequest {
    TxnRequest {
        success: vec![TxnOp::Put(PutRequest::new(
            key.as_bytes().to_vec(),
            value.as_bytes().to_vec(),
        ))],
        ..Default::default()
    }
}

fn read_at(store: &SledKvStore, key: &str, revision: i64) -> Result<Option<Vec<u8>>> {
    let txn = TxnRequest {
        success: vec![TxnOp::Range(
            crate::kv::RangeRequest::key(key.as_bytes().to_vec()).at_revision(revision),
        )],
        ..Default::default()
    };
    Ok(match store.read(txn)?.responses.remove(0) {
        crate::kv::TxnOpResponse::Range(r) => r.kvs.into_iter().next().map(|kv| kv.value),
        other => panic!("{other:?}"),
    })
}

/// Opens the store again right after the last handle was dropped: sled releases its
/// file lock from a background thread a moment later, after many deletes (a sweep).
fn reopen(dir: &std::path::Path) -> SledKvStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledKvStore::open(dir, KvLimits::default()) {
            Ok(store) => return store,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("acquire lock") =>
            {
                std::thread::yield_now();
            }
            Err(e) => panic!("reopening: {e}"),
        }
    }
}

#[test]
fn compaction_reclaims_history_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let kept_at;
    {
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        for round in 0..50 {
            for key in ["a", "b", "c"] {
                store
                    .commit(vec![put_txn(key, &round.to_string())])
                    .unwrap();
            }
        }
        let mut delete = DeleteRangeRequest::key(b"c".to_vec());
        delete.prev_kv = false;
        store
            .commit(vec![TxnRequest {
                success: vec![TxnOp::DeleteRange(delete)],
                ..Default::default()
            }])
            .unwrap();
        assert_eq!(store.history_len(), 151);
        kept_at = store.revision();
        store.commit(vec![put_txn("a", "after")]).unwrap();
        let answers = store
            .commit_commands(vec![Command::Compact { revision: kept_at }])
            .unwrap();
        assert!(answers[0].is_ok(), "{answers:?}");
        // Left: a and b at the compacted revision (puts), the delete of c at it, and
        // the later put of a.
        assert_eq!(store.history_len(), 4);
        store.flush().unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(store.compacted(), kept_at);
    assert_eq!(read_at(&store, "a", kept_at).unwrap(), Some(b"49".to_vec()));
    assert_eq!(read_at(&store, "c", kept_at).unwrap(), None);
    assert!(matches!(
        read_at(&store, "a", kept_at - 1),
        Err(Error::Compacted { .. })
    ));
    // The next compaction sweeps the delete kept at the last one.
    store.commit(vec![put_txn("d", "1")]).unwrap();
    let now = store.revision();
    store
        .commit_commands(vec![Command::Compact { revision: now }])
        .unwrap();
    assert_eq!(store.history_len(), 3, "a, b and d remain");
}

#[test]
fn a_group_reads_its_own_earlier_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    store.commit(vec![put_txn("k", "0")]).unwrap();
    let base = store.revision();
    let read = |revision| TxnRequest {
        success: vec![
            TxnOp::Put(PutRequest::new(b"other".to_vec(), b"x".to_vec())),
            TxnOp::Range(crate::kv::RangeRequest::key(b"k".to_vec()).at_revision(revision)),
        ],
        ..Default::default()
    };
    // One group: two writes of k, then reads at each revision the group passed.
    let answers = store
        .commit(vec![
            put_txn("k", "1"),
            put_txn("k", "2"),
            read(base),
            read(base + 1),
            read(base + 2),
        ])
        .unwrap();
    let value = |answer: &Result<TxnResponse>| match &answer.as_ref().unwrap().responses[1] {
        crate::kv::TxnOpResponse::Range(r) => r.kvs[0].value.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(value(&answers[2]), b"0");
    assert_eq!(value(&answers[3]), b"1");
    assert_eq!(value(&answers[4]), b"2");
}

#[test]
fn a_store_written_before_history_existed_gets_one_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let written = {
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        store.commit(vec![put_txn("a", "1")]).unwrap();
        store.commit(vec![put_txn("a", "2")]).unwrap();
        store.commit(vec![put_txn("b", "1")]).unwrap();
        // Take the store back to how an older version left it: no history at all.
        for prefix in [history::CHANGE_PREFIX, history::VERSION_PREFIX] {
            for key in store.tree.scan_prefix([prefix]).keys() {
                store.tree.remove(key.unwrap()).unwrap();
            }
        }
        for key in [
            b"\x00history".as_slice(),
            history::COMPACTED_KEY,
            history::SWEPT_KEY,
        ] {
            store.tree.remove(key).unwrap();
        }
        store.flush().unwrap();
        store.revision()
    };
    let store = reopen(dir.path());
    assert_eq!(store.compacted(), written, "nothing before now was kept");
    assert_eq!(store.history_len(), 2, "each key's current version");
    assert_eq!(read_at(&store, "a", written).unwrap(), Some(b"2".to_vec()));
    assert!(matches!(
        read_at(&store, "a", written - 1),
        Err(Error::Compacted { .. })
    ));
    store.commit(vec![put_txn("a", "3")]).unwrap();
    assert_eq!(read_at(&store, "a", written).unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        read_at(&store, "b", written + 1).unwrap(),
        Some(b"1".to_vec())
    );
}

#[test]
fn a_value_is_stored_once_while_current_and_kept_in_the_history_once_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    let big = "x".repeat(10_000);
    store.commit(vec![put_txn("k", &big)]).unwrap();
    let first = store.revision();
    let record = |revision| {
        store
            .tree
            .get(history::change_key(revision, b"k"))
            .unwrap()
            .unwrap()
            .len()
    };
    assert_eq!(record(first), 1, "the current version points at the data");
    store.commit(vec![put_txn("k", "small")]).unwrap();
    assert!(
        record(first) > 10_000,
        "superseded: the history holds the value"
    );
    assert_eq!(read_at(&store, "k", first).unwrap(), Some(big.into_bytes()));
    assert_eq!(
        read_at(&store, "k", first + 1).unwrap(),
        Some(b"small".to_vec())
    );
}

#[test]
fn auth_changes_apply_without_a_revision_and_survive_reopen_and_snapshots() {
    use crate::auth::{AuthChange, AuthError};
    let add = |name: &str| Command::Auth {
        change: AuthChange::UserAdd {
            name: name.to_string(),
            password: None,
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let blob = {
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let answers = store
            .apply(vec![
                (1, add("alice")),
                (2, add("alice")),
                (3, write(put("k"))),
            ])
            .unwrap();
        assert!(matches!(answers[0], Some(Ok(Applied::Done))));
        assert!(matches!(
            &answers[1],
            Some(Err(Error::Auth(AuthError::UserExists(name)))) if name == "alice"
        ));
        assert_eq!(store.revision(), 1, "only the put moved the revision");
        assert_eq!(store.auth().revision, 1, "the refused add changed nothing");
        assert!(store.auth().users.contains_key("alice"));
        copied(&store).0
    };
    let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
    assert!(
        store.auth().users.contains_key("alice"),
        "kept across reopen"
    );

    let other_dir = tempfile::tempdir().unwrap();
    let other = SledKvStore::open(other_dir.path(), KvLimits::default()).unwrap();
    other.apply(vec![(1, add("bob"))]).unwrap();
    other.restore(&blob).unwrap();
    let users: Vec<_> = other.auth().users.keys().cloned().collect();
    assert_eq!(users, ["alice"], "a snapshot replaces the auth state too");
}
