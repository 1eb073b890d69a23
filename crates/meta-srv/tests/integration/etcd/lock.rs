//! etcd's Lock and Election services (what etcd's client libraries call), through a
//! follower of three members: mutual exclusion with a waiter woken by the unlock, a
//! waiter that gives up leaving no key behind, and an election's whole life.

use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use meta_proto::etcd::v3electionpb as el;
use meta_proto::etcd::v3electionpb::election_client::ElectionClient;
use meta_proto::etcd::v3lockpb as lk;
use meta_proto::etcd::v3lockpb::lock_client::LockClient;

use super::{kv, prefix};
use crate::in_process::{leader_of, start_three};
use crate::support::{check, wait_until};

async fn lease(addr: &str) -> i64 {
    LeaseClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .lease_grant(epb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id
}

/// Waits until `count` contenders' keys exist under `p`.
async fn contenders(addr: &str, p: &str, count: i64) {
    wait_until(Duration::from_secs(10), || async {
        let found = kv(addr)
            .await
            .range(prefix(p))
            .await
            .unwrap()
            .into_inner()
            .count;
        check(found == count, || {
            format!("{found} contenders, want {count}")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_elections_through_a_follower() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let addr = members[(leader + 1) % 3].grpc.clone();
    let (a, b) = (lease(&addr).await, lease(&addr).await);
    let mut locks = LockClient::connect(format!("http://{addr}")).await.unwrap();

    let held = locks
        .lock(lk::LockRequest {
            name: b"lk".to_vec(),
            lease: a,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.key, format!("lk/{a:x}").into_bytes());
    let mut second = locks.clone();
    let waiter = tokio::spawn(async move {
        second
            .lock(lk::LockRequest {
                name: b"lk".to_vec(),
                lease: b,
            })
            .await
    });
    contenders(&addr, "lk/", 2).await;
    assert!(!waiter.is_finished(), "the lock is held: the second waits");
    locks
        .unlock(lk::UnlockRequest { key: held.key })
        .await
        .unwrap();
    let taken = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the lock once it is released")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(taken.key, format!("lk/{b:x}").into_bytes());

    // A waiter that gives up leaves no key behind.
    let mut third = locks.clone();
    let c = lease(&addr).await;
    let abandoned = tokio::spawn(async move {
        third
            .lock(lk::LockRequest {
                name: b"lk".to_vec(),
                lease: c,
            })
            .await
    });
    contenders(&addr, "lk/", 2).await;
    abandoned.abort();
    contenders(&addr, "lk/", 1).await;

    let mut elections = ElectionClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let none = elections
        .leader(el::LeaderRequest {
            name: b"el".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (none.code(), none.message()),
        (tonic::Code::Unknown, "election: no leader")
    );
    let won = elections
        .campaign(el::CampaignRequest {
            name: b"el".to_vec(),
            lease: a,
            value: b"a".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .leader
        .unwrap();
    let mut observed = elections
        .observe(el::LeaderRequest {
            name: b"el".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut next_value = async || {
        let answer = tokio::time::timeout(Duration::from_secs(10), observed.message())
            .await
            .expect("an observation within 10 s")
            .unwrap()
            .unwrap();
        answer.kv.unwrap().value
    };
    assert_eq!(next_value().await, b"a");
    elections
        .proclaim(el::ProclaimRequest {
            leader: Some(won.clone()),
            value: b"a2".to_vec(),
        })
        .await
        .unwrap();
    assert_eq!(next_value().await, b"a2");
    let mut rival = elections.clone();
    let campaign = tokio::spawn(async move {
        rival
            .campaign(el::CampaignRequest {
                name: b"el".to_vec(),
                lease: b,
                value: b"b".to_vec(),
            })
            .await
    });
    contenders(&addr, "el/", 2).await;
    assert!(!campaign.is_finished(), "a leads: b waits");
    elections
        .resign(el::ResignRequest {
            leader: Some(won.clone()),
        })
        .await
        .unwrap();
    let b_won = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("b is elected once a resigns")
        .unwrap()
        .unwrap()
        .into_inner()
        .leader
        .unwrap();
    assert!(b_won.rev > won.rev, "terms only grow");
    assert_eq!(next_value().await, b"b");
    let stale = elections
        .proclaim(el::ProclaimRequest {
            leader: Some(won),
            value: b"late".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (stale.code(), stale.message()),
        (tonic::Code::Unknown, "election: not leader")
    );
    for m in members {
        m.shutdown().await;
    }
}
