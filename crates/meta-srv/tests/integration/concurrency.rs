//! `meta_client::concurrency` on a three-member cluster: five contenders for one lock
//! and one election while the raft leader is stopped; mutual exclusion is checked from
//! the store's own history (at each guarded write's revision, its writer held the
//! lowest create revision under the lock's prefix), by a checker that is itself tested.

use std::collections::BTreeMap;
use std::time::Duration;

use common_meta::kv::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, KvBackend, PutRequest, RangeRequest,
    TxnOp, TxnRequest, WatchRequest, WatchResponse,
};
use meta_client::concurrency::{Election, Mutex, Session};
use meta_client::{MetaClient, MetaClientOptions};

use crate::in_process::{leader_of, start_three};

const LOCK: &str = "locks/one";
const COUNTER: &[u8] = b"locks/counter";

/// One guarded write: the counter value it wrote, its revision, and the writer's key.
#[derive(Debug, Clone)]
struct Guarded {
    count: u64,
    revision: i64,
    holder: Vec<u8>,
}

/// Checks guarded writes against what the lock's prefix held at each one's revision
/// (`line_at(revision)`: the contenders' keys then): counts go up by one, and each
/// writer was first in line (lowest create revision) when it wrote.
fn check_exclusion(
    writes: &[Guarded],
    line_at: &BTreeMap<i64, Vec<KeyValue>>,
) -> Result<(), String> {
    for (i, write) in writes.iter().enumerate() {
        if write.count != i as u64 + 1 {
            return Err(format!(
                "count {} at position {i}: lost or doubled",
                write.count
            ));
        }
        let line = line_at
            .get(&write.revision)
            .ok_or_else(|| format!("no view of the line at {}", write.revision))?;
        let first = line.iter().min_by_key(|kv| kv.create_revision);
        if first.map(|kv| &kv.key) != Some(&write.holder) {
            return Err(format!(
                "write {} at {} by {:?} while {:?} held the lock",
                write.count,
                write.revision,
                String::from_utf8_lossy(&write.holder),
                first.map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            ));
        }
    }
    Ok(())
}

/// The guarded writes among the counter's events (`"{count} {holder key}"` values).
fn guarded(events: Vec<common_meta::kv::Event>) -> Vec<Guarded> {
    events
        .into_iter()
        .filter(|e| e.kind == EventKind::Put)
        .map(|e| {
            let text = String::from_utf8_lossy(&e.kv.value).into_owned();
            let (count, holder) = text.split_once(' ').unwrap();
            Guarded {
                count: count.parse().unwrap(),
                revision: e.kv.mod_revision,
                holder: holder.as_bytes().to_vec(),
            }
        })
        .collect()
}

fn kv(key: &str, create: i64) -> KeyValue {
    KeyValue {
        key: key.as_bytes().to_vec(),
        create_revision: create,
        ..Default::default()
    }
}

#[test]
fn the_exclusion_checker_catches_two_holders_and_lost_counts() {
    let line: BTreeMap<i64, Vec<KeyValue>> =
        [(10, vec![kv("a", 5), kv("b", 7)]), (12, vec![kv("b", 7)])].into();
    let good = vec![
        Guarded {
            count: 1,
            revision: 10,
            holder: b"a".to_vec(),
        },
        Guarded {
            count: 2,
            revision: 12,
            holder: b"b".to_vec(),
        },
    ];
    assert_eq!(check_exclusion(&good, &line), Ok(()));
    let two_holders = vec![Guarded {
        count: 1,
        revision: 10,
        holder: b"b".to_vec(),
    }];
    assert!(check_exclusion(&two_holders, &line).is_err());
    let lost = vec![
        Guarded {
            count: 1,
            revision: 10,
            holder: b"a".to_vec(),
        },
        Guarded {
            count: 3,
            revision: 12,
            holder: b"b".to_vec(),
        },
    ];
    assert!(check_exclusion(&lost, &line).is_err());
}

/// Locks, writes the counter guarded by the lock, unlocks; `rounds` times.
async fn contend(client: MetaClient, rounds: usize) -> usize {
    let mut done = 0;
    let mut attempts = 0;
    while done < rounds && attempts < rounds * 10 {
        attempts += 1;
        let Ok(session) = Session::new(&client, 2).await else {
            continue;
        };
        let mut mutex = Mutex::new(&client, LOCK);
        let Ok(held) = mutex.lock(&session).await else {
            continue;
        };
        let current = client.get(COUNTER).await.ok().flatten();
        let (count, version) = current.map_or((0, 0), |kv| {
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            (
                text.split(' ').next().unwrap().parse::<u64>().unwrap(),
                kv.mod_revision,
            )
        });
        let txn = TxnRequest {
            compare: vec![
                held.still_held(),
                Compare::new(
                    COUNTER,
                    CompareOp::Equal,
                    CompareTarget::ModRevision(version),
                ),
            ],
            success: vec![TxnOp::Put(PutRequest::new(
                COUNTER,
                format!("{} {}", count + 1, String::from_utf8_lossy(&held.key)),
            ))],
            failure: Vec::new(),
        };
        if let Ok(r) = client.txn(txn).await {
            // A guarded write that failed its compare lost the lock (or the counter
            // moved): only ever a lease that expired under a slow contender.
            if r.succeeded {
                done += 1;
            }
        }
        let _ = mutex.unlock().await;
        let _ = session.close().await;
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_contenders_hold_the_lock_one_at_a_time_while_the_leader_stops() {
    let mut members = start_three(|_| {}).await;
    let all: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    let client = || MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    let observer = client();
    let start = observer
        .range(RangeRequest::key(COUNTER))
        .await
        .unwrap()
        .revision
        + 1;
    let rounds = 4;
    let contenders: Vec<_> = (0..5)
        .map(|_| tokio::spawn(contend(client(), rounds)))
        .collect();
    // Stop the raft leader while the contenders work.
    let watcher = client();
    let mut stream = watcher
        .watch(WatchRequest::key(COUNTER).from_revision(start))
        .await
        .unwrap();
    let mut writes = Vec::new();
    let mut stopped = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut finished = 0;
    let mut pending = contenders;
    while !pending.is_empty() {
        if !stopped && writes.len() >= 3 {
            let leader = leader_of(&members).await;
            members.remove(leader).shutdown().await;
            stopped = true;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "contenders still running after 120 s");
        tokio::select! {
            response = stream.next() => {
                if let Some(Ok(WatchResponse::Events { events, .. })) = response {
                    writes.extend(guarded(events));
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                let mut still = Vec::new();
                for handle in pending {
                    if handle.is_finished() {
                        finished += handle.await.unwrap();
                    } else {
                        still.push(handle);
                    }
                }
                pending = still;
            }
        }
    }
    assert!(stopped, "the leader was stopped mid-run");
    // Collect the writes that arrived after the last poll.
    let last = observer.get(COUNTER).await.unwrap().unwrap();
    while writes.last().map(|w| w.revision) != Some(last.mod_revision) {
        if let Some(Ok(WatchResponse::Events { events, .. })) =
            tokio::time::timeout(Duration::from_secs(20), stream.next())
                .await
                .unwrap()
        {
            writes.extend(guarded(events));
        }
    }
    assert_eq!(
        writes.len(),
        finished,
        "every acknowledged guarded write is in the history"
    );
    assert!(finished >= 10, "only {finished} rounds completed");
    let mut line_at = BTreeMap::new();
    for write in &writes {
        let line = observer
            .range(RangeRequest::prefix(format!("{LOCK}/")).at_revision(write.revision))
            .await
            .unwrap();
        line_at.insert(write.revision, line.kvs);
    }
    check_exclusion(&writes, &line_at).unwrap();
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_has_one_leader_whose_session_end_hands_over() {
    let members = start_three(|_| {}).await;
    let all: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    let client = MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    let first = Session::new(&client, 2).await.unwrap();
    let second = Session::new(&client, 2).await.unwrap();
    let mut a = Election::new(&client, "elect/db");
    let mut b = Election::new(&client, "elect/db");
    let mut observed = a.observe();
    a.campaign(&first, b"node-a").await.unwrap();
    let b_wins = tokio::spawn(async move {
        let held = b.campaign(&second, b"node-b").await.unwrap();
        (b, second, held)
    });
    let leader = a.leader().await.unwrap().unwrap();
    assert_eq!(leader.kv.value, b"node-a");
    a.proclaim(&first, b"node-a v2").await.unwrap();
    // Dropping the session stops its keep-alives: the lease expires, b takes over.
    drop(first);
    let (b, second, held) = tokio::time::timeout(Duration::from_secs(20), b_wins)
        .await
        .expect("b elected after a's lease expired")
        .unwrap();
    assert_eq!(a.leader().await.unwrap().unwrap().kv.key, held.key);
    let err = a.proclaim(&second, b"stale").await.unwrap_err();
    assert!(err.to_string().contains("no longer the leader"), "{err}");
    // The observer saw a, a's new value, then b.
    let mut values = Vec::new();
    while values.last().map(Vec::as_slice) != Some(&b"node-b"[..]) {
        let next = tokio::time::timeout(Duration::from_secs(20), observed.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        values.push(next.map(|l| l.kv.value).unwrap_or_default());
    }
    assert!(values.contains(&b"node-a v2".to_vec()), "{values:?}");
    drop(b);
    second.close().await.unwrap();
    for m in members {
        m.shutdown().await;
    }
}
