//! etcd's v3 API, through a client generated from our declarations of etcd's protos:
//! what each RPC answers on one member and on three (a follower forwards what needs the
//! leader), and etcd's exact error texts for bad input.

use std::time::Duration;

use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::kv_client::KvClient;
use tonic::transport::Channel;

use crate::in_process::{leader_of, start, start_three};
use crate::support::wait_until;

mod cluster;
mod lease;
mod lock;
mod snapshot;
mod watch;

async fn kv(addr: &str) -> KvClient<Channel> {
    KvClient::connect(format!("http://{addr}")).await.unwrap()
}

fn put(key: &str, value: &str) -> epb::PutRequest {
    epb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn get(key: &str) -> epb::RangeRequest {
    epb::RangeRequest {
        key: key.into(),
        ..Default::default()
    }
}

fn prefix(p: &str) -> epb::RangeRequest {
    epb::RangeRequest {
        key: p.into(),
        range_end: common_meta::kv::prefix_end(p.as_bytes()),
        ..Default::default()
    }
}

fn keys(r: &epb::RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

/// What a refused call was answered: code and text.
type Refusal = (tonic::Code, String);

/// The code and text of a refused call.
fn refusal<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Refusal {
    let status = result.expect_err("the call should have been refused");
    (status.code(), status.message().to_string())
}

#[tokio::test]
async fn kv_answers_as_etcd_does_on_one_member() {
    let server = start().await;
    let mut kv = kv(&server.grpc).await;

    let first = kv.put(put("e/a", "1")).await.unwrap().into_inner();
    let header = first.header.unwrap();
    assert!(
        header.cluster_id != 0 && header.member_id == 1 && header.raft_term >= 1,
        "{header:?}"
    );
    let r1 = header.revision;
    let second = kv
        .put(epb::PutRequest {
            prev_kv: true,
            ..put("e/a", "2")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.prev_kv.unwrap().value, b"1");
    kv.put(put("e/b", "9")).await.unwrap();
    kv.put(put("e/c", "5")).await.unwrap();

    let got = kv.range(get("e/a")).await.unwrap().into_inner();
    let a = &got.kvs[0];
    assert_eq!(
        (a.value.as_slice(), a.version, a.create_revision),
        (&b"2"[..], 2, r1)
    );
    // Sorted by value, descending, limited: `more` and the whole range's count.
    let sorted = kv
        .range(epb::RangeRequest {
            sort_order: epb::range_request::SortOrder::Descend.into(),
            sort_target: epb::range_request::SortTarget::Value.into(),
            limit: 2,
            ..prefix("e/")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (keys(&sorted), sorted.more, sorted.count),
        (vec!["e/b".into(), "e/c".into()], true, 3)
    );
    // A revision filter, and a read as of the first put.
    let recent = kv
        .range(epb::RangeRequest {
            min_mod_revision: r1 + 2,
            ..prefix("e/")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&recent), vec!["e/b", "e/c"]);
    let then = kv
        .range(epb::RangeRequest {
            revision: r1,
            ..prefix("e/")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(then.kvs[0].value, b"1");

    // A transaction: the compare fails, the failure branch runs a nested one.
    let txn = kv
        .txn(epb::TxnRequest {
            compare: vec![epb::Compare {
                key: b"e/a".to_vec(),
                target: epb::compare::CompareTarget::Value.into(),
                result: epb::compare::CompareResult::Equal.into(),
                target_union: Some(epb::compare::TargetUnion::Value(b"1".to_vec())),
                ..Default::default()
            }],
            success: vec![],
            failure: vec![epb::RequestOp {
                request: Some(epb::request_op::Request::RequestTxn(epb::TxnRequest {
                    success: vec![epb::RequestOp {
                        request: Some(epb::request_op::Request::RequestPut(put("e/d", "nested"))),
                    }],
                    ..Default::default()
                })),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!txn.succeeded);
    let d = kv.range(get("e/d")).await.unwrap().into_inner();
    assert_eq!(d.kvs[0].value, b"nested");

    let deleted = kv
        .delete_range(epb::DeleteRangeRequest {
            prev_kv: true,
            ..epb::DeleteRangeRequest {
                key: b"e/b".to_vec(),
                range_end: b"e/d".to_vec(),
                ..Default::default()
            }
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((deleted.deleted, deleted.prev_kvs.len()), (2, 2));

    let compacted_at = deleted.header.unwrap().revision;
    kv.compact(epb::CompactionRequest {
        revision: compacted_at,
        physical: true,
    })
    .await
    .unwrap();
    assert_eq!(
        refusal(
            kv.range(epb::RangeRequest {
                revision: r1,
                ..get("e/a")
            })
            .await
        ),
        (
            tonic::Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_etcds_errors() {
    let server = start().await;
    let mut kv = kv(&server.grpc).await;
    kv.put(put("bad/a", "1")).await.unwrap();
    let put_op = |key: &str| epb::RequestOp {
        request: Some(epb::request_op::Request::RequestPut(put(key, "v"))),
    };
    let invalid = tonic::Code::InvalidArgument;
    let cases: Vec<(&str, Refusal, (tonic::Code, &str))> = vec![
        (
            "an empty key",
            refusal(kv.put(put("", "v")).await),
            (invalid, "etcdserver: key is not provided"),
        ),
        (
            "a future revision",
            refusal(
                kv.range(epb::RangeRequest {
                    revision: 1_000_000,
                    ..get("bad/a")
                })
                .await,
            ),
            (
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
        ),
        (
            "a key put twice in one transaction",
            refusal(
                kv.txn(epb::TxnRequest {
                    success: vec![put_op("bad/x"), put_op("bad/x")],
                    ..Default::default()
                })
                .await,
            ),
            (invalid, "etcdserver: duplicate key given in txn request"),
        ),
        (
            "too many operations",
            refusal(
                kv.txn(epb::TxnRequest {
                    success: (0..=128).map(|i| put_op(&format!("bad/{i}"))).collect(),
                    ..Default::default()
                })
                .await,
            ),
            (invalid, "etcdserver: too many operations in txn request"),
        ),
        (
            "keeping the value of a missing key",
            refusal(
                kv.put(epb::PutRequest {
                    ignore_value: true,
                    ..put("bad/missing", "")
                })
                .await,
            ),
            (invalid, "etcdserver: key not found"),
        ),
        (
            "keeping the value while giving one",
            refusal(
                kv.put(epb::PutRequest {
                    ignore_value: true,
                    ..put("bad/a", "given")
                })
                .await,
            ),
            (invalid, "etcdserver: value is provided"),
        ),
        (
            "an unknown lease",
            refusal(
                kv.put(epb::PutRequest {
                    lease: 424242,
                    ..put("bad/a", "v")
                })
                .await,
            ),
            (
                tonic::Code::NotFound,
                "etcdserver: requested lease not found",
            ),
        ),
        (
            "a request over the size limit",
            refusal(kv.put(put("bad/big", &"x".repeat(2 * 1024 * 1024))).await),
            (invalid, "etcdserver: request is too large"),
        ),
    ];
    for (what, got, (code, text)) in cases {
        assert_eq!(got, (code, text.to_string()), "{what}");
    }
    // Nothing refused was written.
    let all = kv.range(prefix("bad/")).await.unwrap().into_inner();
    assert_eq!(keys(&all), vec!["bad/a"]);
    assert_eq!(all.kvs[0].value, b"1");
    server.shutdown().await;
}

#[tokio::test]
async fn a_follower_forwards_writes_and_linearizable_reads_to_the_leader() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = &members[(leader + 1) % 3];
    let mut kv = kv(&follower.grpc).await;
    let written = kv.put(put("fw/a", "1")).await.unwrap().into_inner();
    let revision = written.header.unwrap().revision;
    // Linearizable: the leader answers, so the write is there at once.
    let got = kv.range(get("fw/a")).await.unwrap().into_inner();
    assert_eq!(got.kvs[0].value, b"1");
    assert!(got.header.unwrap().revision >= revision);
    // Serializable: the follower's own state, which catches up.
    wait_until(Duration::from_secs(10), || {
        let mut kv = kv.clone();
        async move {
            let local = kv
                .range(epb::RangeRequest {
                    serializable: true,
                    ..get("fw/a")
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            crate::support::check(local.kvs.len() == 1, || "not applied yet".into())?;
            Ok(local.header.unwrap().member_id)
        }
    })
    .await;
    let txn = kv
        .txn(epb::TxnRequest {
            success: vec![epb::RequestOp {
                request: Some(epb::request_op::Request::RequestPut(put("fw/b", "2"))),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(txn.succeeded);
    let deleted = kv
        .delete_range(epb::DeleteRangeRequest {
            key: b"fw/a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    for m in members {
        m.shutdown().await;
    }
}
