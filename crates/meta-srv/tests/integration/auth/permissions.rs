//! Permissions on key ranges on every path (KV, txn, watch, compaction), the internal
//! keyspace kept for root, and sessions kept for their user.

use super::*;

#[tokio::test]
async fn permissions_cover_key_ranges_on_every_path_and_refusals_change_nothing() {
    let server = start().await;
    let mut auth = auth_client(&server.grpc).await;
    let root = enable(&mut auth).await;
    user_with(
        &mut auth,
        &root,
        "alice",
        "app/",
        authpb::permission::Type::Readwrite,
    )
    .await;
    user_with(
        &mut auth,
        &root,
        "reader",
        "app/",
        authpb::permission::Type::Read,
    )
    .await;
    user_with(
        &mut auth,
        &root,
        "ops",
        "",
        authpb::permission::Type::Readwrite,
    )
    .await;
    let alice = token(&mut auth, "alice", "pw").await;
    let reader = token(&mut auth, "reader", "pw").await;
    let ops = token(&mut auth, "ops", "pw").await;
    let mut kv = KvClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let denied = (
        Code::PermissionDenied,
        "etcdserver: permission denied".to_string(),
    );

    kv.put(as_user(put("app/a"), &alice)).await.unwrap();
    assert_eq!(refused(kv.put(as_user(put("other"), &alice)).await), denied);
    assert_eq!(
        refused(kv.put(as_user(put("app/b"), &reader)).await),
        denied
    );
    let read = kv
        .range(as_user(
            epb::RangeRequest {
                key: "app/".into(),
                range_end: "app0".into(),
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.kvs.len(), 1);
    // A range wider than the grant is refused whole, not trimmed.
    assert_eq!(
        refused(
            kv.range(as_user(
                epb::RangeRequest {
                    key: "app/".into(),
                    range_end: "b".into(),
                    ..Default::default()
                },
                &reader
            ))
            .await
        ),
        denied
    );
    // A txn whose failure branch writes outside the grant is refused before it runs.
    let txn = epb::TxnRequest {
        compare: vec![epb::Compare {
            key: "app/a".into(),
            target: epb::compare::CompareTarget::Version.into(),
            result: epb::compare::CompareResult::Equal.into(),
            target_union: Some(epb::compare::TargetUnion::Version(1)),
            ..Default::default()
        }],
        success: vec![epb::RequestOp {
            request: Some(epb::request_op::Request::RequestPut(put("app/t"))),
        }],
        failure: vec![epb::RequestOp {
            request: Some(epb::request_op::Request::RequestPut(put("other"))),
        }],
    };
    assert_eq!(refused(kv.txn(as_user(txn, &alice)).await), denied);
    // The internal keyspace: root's only, even for a user granted every key.
    kv.put(as_user(put("anything"), &ops)).await.unwrap();
    assert_eq!(
        refused(kv.put(as_user(put("__node/9"), &ops)).await),
        denied
    );
    assert_eq!(
        refused(
            kv.delete_range(as_user(
                epb::DeleteRangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    ..Default::default()
                },
                &ops
            ))
            .await
        ),
        denied
    );
    kv.put(as_user(put("__x"), &root)).await.unwrap();
    // Compaction is root's.
    assert_eq!(
        refused(
            kv.compact(as_user(
                epb::CompactionRequest {
                    revision: 1,
                    ..Default::default()
                },
                &ops
            ))
            .await
        ),
        denied
    );
    // The refusals are counted, and the metrics say auth is on with its four users.
    let metrics = crate::in_process::http_get(&server.http, "/metrics").await;
    for line in [
        "metasrv_auth_enabled 1",
        "metasrv_auth_users 4",
        "metasrv_grpc_errors_total{code=\"PermissionDenied\",method=\"Put\",service=\"etcdserverpb.KV\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    // Nothing refused was written.
    let all = kv
        .range(as_user(
            epb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut keys: Vec<String> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    keys.retain(|k| !k.starts_with("__") || k == "__x");
    assert_eq!(keys, ["__x", "anything", "app/a"]);

    // A watch outside the grant is created and canceled at once, with etcd's reason.
    let mut watch = meta_proto::etcd::etcdserverpb::watch_client::WatchClient::connect(format!(
        "http://{}",
        server.grpc
    ))
    .await
    .unwrap();
    let (requests, queued) = mpsc::channel(4);
    let mut responses = watch
        .watch(as_user(ReceiverStream::new(queued), &reader))
        .await
        .unwrap()
        .into_inner();
    requests
        .send(epb::WatchRequest {
            request_union: Some(epb::watch_request::RequestUnion::CreateRequest(
                epb::WatchCreateRequest {
                    key: "other".into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(answer.canceled, "{answer:?}");
    assert_eq!(answer.cancel_reason, "etcdserver: permission denied");

    // A password change outdates the tokens made before it.
    auth.user_change_password(as_user(
        epb::AuthUserChangePasswordRequest {
            name: "alice".into(),
            password: "new".into(),
            ..Default::default()
        },
        &root,
    ))
    .await
    .unwrap();
    assert_eq!(
        refused(kv.put(as_user(put("app/c"), &alice)).await).0,
        Code::Unauthenticated
    );
    let alice = token(&mut auth, "alice", "new").await;
    kv.put(as_user(put("app/c"), &alice)).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_used_by_the_user_that_opened_it_only() {
    use meta_proto::v1 as pb;
    let server = start().await;
    let mut auth = auth_client(&server.grpc).await;
    let root = enable(&mut auth).await;
    for name in ["alice", "bob"] {
        user_with(
            &mut auth,
            &root,
            name,
            "s/",
            authpb::permission::Type::Readwrite,
        )
        .await;
    }
    let alice = token(&mut auth, "alice", "pw").await;
    let bob = token(&mut auth, "bob", "pw").await;
    let mut store = pb::store_client::StoreClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let opened = store
        .open_session(as_user(pb::OpenSessionRequest { ttl_ms: 60_000 }, &alice))
        .await
        .unwrap()
        .into_inner();
    let put = |value: &str| pb::PutRequest {
        key: b"s/k".to_vec(),
        value: value.into(),
        session: Some(pb::SessionRef {
            id: opened.id,
            seq: 1,
            acked: 1,
        }),
        ..Default::default()
    };
    store.put(as_user(put("alice's"), &alice)).await.unwrap();
    // Bob may write s/k, but not in Alice's session: not to read her kept answer, not
    // to spend her seq, not to keep it alive or close it.
    for refused in [
        store.put(as_user(put("bob's"), &bob)).await.map(drop),
        store
            .keep_alive_session(as_user(pb::KeepAliveSessionRequest { id: opened.id }, &bob))
            .await
            .map(drop),
        store
            .close_session(as_user(pb::CloseSessionRequest { id: opened.id }, &bob))
            .await
            .map(drop),
    ] {
        let status = refused.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // Her session is still open and hers.
    store
        .keep_alive_session(as_user(
            pb::KeepAliveSessionRequest { id: opened.id },
            &alice,
        ))
        .await
        .unwrap();
    let got = store
        .range(as_user(
            pb::RangeRequest {
                key: b"s/k".to_vec(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"alice's");
    server.shutdown().await;
}
