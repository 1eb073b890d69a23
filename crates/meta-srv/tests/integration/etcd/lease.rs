//! etcd's Lease through a client of our etcd protos, on one member and through a
//! follower (which forwards calls and relays keep-alive streams to the leader).

use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{get, kv, put, refusal};
use crate::in_process::{leader_of, start, start_three};

async fn leases(addr: &str) -> LeaseClient<Channel> {
    LeaseClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Grants, attaches, renews over a stream, inspects and revokes through `addr`.
async fn lifecycle(addr: &str) {
    let mut leases = leases(addr).await;
    let mut kv = kv(addr).await;
    let granted = leases
        .lease_grant(epb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(granted.id > 0 && granted.ttl == 60, "{granted:?}");
    let id = granted.id;
    kv.put(epb::PutRequest {
        lease: id,
        ..put("l/a", "1")
    })
    .await
    .unwrap();

    let (requests, queued) = mpsc::channel(4);
    let mut answers = leases
        .lease_keep_alive(ReceiverStream::new(queued))
        .await
        .unwrap()
        .into_inner();
    for (asked, ttl) in [(id, 60), (987_654_321, 0), (id, 60)] {
        requests
            .send(epb::LeaseKeepAliveRequest { id: asked })
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("a keep-alive answer within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(
            (answer.id, answer.ttl),
            (asked, ttl),
            "keep-alive of {asked}"
        );
    }
    drop(requests);

    let ttl = leases
        .lease_time_to_live(epb::LeaseTimeToLiveRequest { id, keys: true })
        .await
        .unwrap()
        .into_inner();
    assert!(ttl.ttl > 0 && ttl.granted_ttl == 60, "{ttl:?}");
    assert_eq!(ttl.keys, vec![b"l/a".to_vec()]);
    let listed = leases
        .lease_leases(epb::LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.leases.iter().any(|l| l.id == id));

    leases
        .lease_revoke(epb::LeaseRevokeRequest { id })
        .await
        .unwrap();
    let gone = kv.range(get("l/a")).await.unwrap().into_inner();
    assert!(gone.kvs.is_empty(), "the revoke deleted the attached key");
    let after = leases
        .lease_time_to_live(epb::LeaseTimeToLiveRequest { id, keys: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.ttl, -1, "etcd answers a revoked lease with TTL -1");
}

#[tokio::test]
async fn leases_behave_as_etcds_on_one_member() {
    let server = start().await;
    lifecycle(&server.grpc).await;
    let mut leases = leases(&server.grpc).await;
    leases
        .lease_grant(epb::LeaseGrantRequest { ttl: 30, id: 4242 })
        .await
        .unwrap();
    assert_eq!(
        refusal(
            leases
                .lease_grant(epb::LeaseGrantRequest { ttl: 30, id: 4242 })
                .await
        ),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: lease already exists".to_string()
        )
    );
    assert_eq!(
        refusal(
            leases
                .lease_grant(epb::LeaseGrantRequest {
                    ttl: 9_000_000_001,
                    id: 0
                })
                .await
        ),
        (
            tonic::Code::OutOfRange,
            "etcdserver: too large lease TTL".to_string()
        )
    );
    assert_eq!(
        refusal(
            leases
                .lease_revoke(epb::LeaseRevokeRequest { id: 31337 })
                .await
        ),
        (
            tonic::Code::NotFound,
            "etcdserver: requested lease not found".to_string()
        )
    );
    // A TTL below the minimum is raised to it, zero included.
    let small = leases
        .lease_grant(epb::LeaseGrantRequest { ttl: 0, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(small.ttl > 0, "{small:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_follower_forwards_lease_calls_and_relays_keep_alives() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    lifecycle(&members[(leader + 1) % 3].grpc).await;
    for m in members {
        m.shutdown().await;
    }
}
