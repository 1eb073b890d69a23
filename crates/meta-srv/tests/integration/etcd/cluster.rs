//! etcd's Maintenance, Cluster and Auth services on three members: status, hashes
//! that agree, the member list, moving leadership and changing membership through a
//! follower.

use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::auth_client::AuthClient;
use meta_proto::etcd::etcdserverpb::cluster_client::ClusterClient;
use meta_proto::etcd::etcdserverpb::maintenance_client::MaintenanceClient;

use super::{kv, put, refusal};
use crate::in_process::{leader_of, start_three};
use crate::support::{check, wait_until};

#[tokio::test]
async fn maintenance_and_membership_answer_as_etcds() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = &members[(leader + 1) % 3];
    let mut kv = kv(&follower.grpc).await;
    let mut last = 0;
    for i in 0..5 {
        let written = kv
            .put(put(&format!("m/{i}"), "v"))
            .await
            .unwrap()
            .into_inner();
        last = written.header.unwrap().revision;
    }

    // Every member reports the same leader, etcd's version string, and the same hash
    // of the history at the same revision once it applied it.
    for m in &members {
        let mut maintenance = MaintenanceClient::connect(format!("http://{}", m.grpc))
            .await
            .unwrap();
        let status = maintenance
            .status(epb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.leader, leader as u64 + 1, "{status:?}");
        assert_eq!(status.version, "3.5.17");
        assert!(status.raft_term >= 1 && status.db_size > 0 && !status.is_learner);
        let alarms = maintenance
            .alarm(epb::AlarmRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(alarms.alarms.is_empty());
    }
    let mut hashes = Vec::new();
    for m in &members {
        let addr = format!("http://{}", m.grpc);
        let hash = wait_until(Duration::from_secs(10), || {
            let addr = addr.clone();
            async move {
                let mut maintenance = MaintenanceClient::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let answer = maintenance
                    .hash_kv(epb::HashKvRequest { revision: last })
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                Ok((answer.hash, answer.hash_revision))
            }
        })
        .await;
        hashes.push(hash);
    }
    assert!(
        hashes.iter().all(|h| *h == hashes[0]) && hashes[0].1 == last,
        "{hashes:?}"
    );

    // The member list: three voters with their URLs.
    let mut cluster = ClusterClient::connect(format!("http://{}", follower.grpc))
        .await
        .unwrap();
    let list = cluster
        .member_list(epb::MemberListRequest { linearizable: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.members.len(), 3);
    for member in &list.members {
        assert!(!member.is_learner && member.name == format!("member-{}", member.id));
        assert!(
            member.client_ur_ls[0].starts_with("http://127.0.0.1:"),
            "{member:?}"
        );
    }

    // A learner added and removed through a follower (it never starts).
    let added = cluster
        .member_add(epb::MemberAddRequest {
            peer_ur_ls: vec!["http://127.0.0.1:1".to_string()],
            is_learner: true,
        })
        .await
        .unwrap()
        .into_inner();
    let learner = added.member.unwrap();
    assert!(learner.is_learner && learner.id == 4, "{learner:?}");
    assert_eq!(added.members.len(), 4);
    assert_eq!(
        refusal(
            cluster
                .member_add(epb::MemberAddRequest {
                    peer_ur_ls: vec!["http://no-port".to_string()],
                    is_learner: true,
                })
                .await
        ),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: given member URLs are invalid".to_string()
        )
    );
    assert_eq!(
        refusal(
            cluster
                .member_promote(epb::MemberPromoteRequest { id: 4 })
                .await
        ),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: can only promote a learner member which is in sync with leader"
                .to_string()
        ),
        "a learner that never started has none of the log"
    );
    let removed = cluster
        .member_remove(epb::MemberRemoveRequest { id: 4 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.members.len(), 3);
    assert_eq!(
        refusal(
            cluster
                .member_promote(epb::MemberPromoteRequest {
                    id: follower_id(leader)
                })
                .await
        ),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: can only promote a learner member".to_string()
        )
    );

    // Leadership moved through a follower, to that follower.
    let target = follower_id(leader);
    let mut maintenance = MaintenanceClient::connect(format!("http://{}", follower.grpc))
        .await
        .unwrap();
    maintenance
        .move_leader(epb::MoveLeaderRequest { target_id: target })
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), || {
        let mut maintenance = maintenance.clone();
        async move {
            let status = maintenance
                .status(epb::StatusRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            check(status.leader == target, || {
                format!("leader is {}", status.leader)
            })
        }
    })
    .await;

    let mut auth = AuthClient::connect(format!("http://{}", follower.grpc))
        .await
        .unwrap();
    let auth_status = auth
        .auth_status(epb::AuthStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!auth_status.enabled);
    // Users can be managed before auth is on (no users yet); logging in cannot.
    let users = auth
        .user_list(epb::AuthUserListRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(users.users.is_empty(), "{users:?}");
    assert_eq!(
        refusal(
            auth.authenticate(epb::AuthenticateRequest {
                name: "root".into(),
                password: "pw".into(),
            })
            .await
        ),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: authentication is not enabled".to_string()
        )
    );
    for m in members {
        m.shutdown().await;
    }
}

/// The member id of the follower the test talks to.
fn follower_id(leader: usize) -> u64 {
    ((leader + 1) % 3) as u64 + 1
}
