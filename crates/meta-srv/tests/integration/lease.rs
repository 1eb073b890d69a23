//! Leases on a three-member cluster: expiry deletes the keys once, within its bounds;
//! leader changes during a lease's life cannot keep it alive for ever (checkpoints);
//! the client's keeper follows the leader.

use std::time::{Duration, Instant};

use common_meta::kv::{EventKind, KvBackend, PutRequest, WatchRequest};
use meta_client::{LeaseState, MetaClient, MetaClientOptions};

use crate::in_process::{leader_of, start_three};
use crate::support::wait_until;

/// The members' election timeout in these tests (the default raft timing).
const ELECTION: Duration = Duration::from_secs(1);

fn client_of(members: &[crate::in_process::Running]) -> MetaClient {
    let all: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    MetaClient::new(&all, MetaClientOptions::default()).unwrap()
}

/// Waits for the delete of `key` after `from`; when it was seen and how many deletes.
async fn deletion_of(
    client: &MetaClient,
    key: &str,
    from: i64,
    within: Duration,
) -> (Instant, usize) {
    let started = Instant::now();
    let mut stream = client
        .watch(WatchRequest::key(key).from_revision(from))
        .await
        .unwrap();
    let mut deletes = 0;
    let mut took = None;
    let deadline = started + within;
    while took.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(common_meta::kv::WatchResponse::Events { events, .. }))) => {
                for event in events {
                    if event.kind == EventKind::Delete {
                        deletes += 1;
                        took.get_or_insert(Instant::now());
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no delete of {key} within {within:?}: {other:?}"),
        }
    }
    // Nothing more comes for the key: it was deleted once.
    if let Ok(Some(Ok(common_meta::kv::WatchResponse::Events { events, .. }))) =
        tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        deletes += events
            .iter()
            .filter(|e| e.kind == EventKind::Delete)
            .count();
    }
    (took.unwrap_or(started), deletes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_within_its_bounds_and_deletes_its_keys_once() {
    let members = start_three(|_| {}).await;
    leader_of(&members).await;
    let client = client_of(&members);
    let granted = client.lease_grant(3, 0).await.unwrap();
    let since = Instant::now();
    let put = client
        .put(PutRequest::new("exp/a", "1").with_lease(granted.id))
        .await
        .unwrap();
    client
        .put(PutRequest::new("exp/b", "1").with_lease(granted.id))
        .await
        .unwrap();
    let (seen, deletes) =
        deletion_of(&client, "exp/a", put.revision + 1, Duration::from_secs(20)).await;
    let took = seen.duration_since(since);
    let ttl = Duration::from_secs(3);
    assert!(took >= ttl, "expired after {took:?}, before its TTL");
    // One election timeout, plus the expiry check's period and the commit.
    assert!(
        took <= ttl + ELECTION + Duration::from_millis(500),
        "expired after {took:?}"
    );
    assert_eq!(deletes, 1, "deleted once");
    assert!(client.get(b"exp/b").await.unwrap().is_none());
    assert_eq!(
        client
            .lease_time_to_live(granted.id, false)
            .await
            .unwrap()
            .ttl,
        -1
    );
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_changes_during_a_lease_cannot_keep_it_alive() {
    let members = start_three(|c| c.lease.checkpoint_ms = 300).await;
    let client = client_of(&members);
    let ttl = 4;
    let granted = client.lease_grant(ttl, 0).await.unwrap();
    let since = Instant::now();
    let put = client
        .put(PutRequest::new("moving/k", "v").with_lease(granted.id))
        .await
        .unwrap();
    // Hand leadership on every 1.5 s: without checkpoints each new leader would give
    // the lease its whole TTL again, and it would never expire.
    let mover = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                next = next % 3 + 1;
                let _ = client.transfer_leader(next).await;
            }
        })
    };
    let (seen, deletes) = deletion_of(
        &client,
        "moving/k",
        put.revision + 1,
        Duration::from_secs(30),
    )
    .await;
    mover.abort();
    let took = seen.duration_since(since);
    assert!(
        took >= Duration::from_secs(4),
        "expired after {took:?}, before its TTL"
    );
    assert_eq!(deletes, 1);
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_outlives_its_ttl_and_a_leader_change_then_ends_when_revoked() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let client = client_of(&members);
    let granted = client.lease_grant(2, 0).await.unwrap();
    client
        .put(PutRequest::new("kept/k", "v").with_lease(granted.id))
        .await
        .unwrap();
    let keeper = client.keep_lease_alive(granted.id, granted.ttl);
    let other = (leader as u64 + 1) % 3 + 1;
    client.transfer_leader(other).await.unwrap();
    // Three TTLs and a leader change later, the key is still there.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert!(
            client.get(b"kept/k").await.unwrap().is_some(),
            "the kept lease expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(keeper.state(), LeaseState::Alive { .. }));
    client.lease_revoke(granted.id).await.unwrap();
    let mut state = keeper.watch_state();
    wait_until(Duration::from_secs(10), || {
        let lost = *state.borrow_and_update() == LeaseState::Lost;
        async move {
            if lost {
                Ok(())
            } else {
                Err("keeper still alive".to_string())
            }
        }
    })
    .await;
    assert!(client.get(b"kept/k").await.unwrap().is_none());
    for m in members {
        m.shutdown().await;
    }
}
