//! Exactly-once writes through meta-client: a reply lost after the write committed is
//! retried by the client, and the retry gets the first answer instead of applying
//! again. The reply is lost by a `Front` proxy between client and server that swallows
//! the server's bytes on demand and then breaks the connection.

use std::time::Duration;

use crate::front::Front;
use crate::in_process::start;
use crate::support::{check, wait_until};
use common_meta::kv::{
    Compare, CompareAndPutRequest, CompareOp, CompareTarget, KvBackend, PutRequest, TxnOp,
    TxnRequest,
};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;

fn client(endpoint: &str, session_ttl: Option<Duration>) -> MetaClient {
    let options = MetaClientOptions {
        session_ttl,
        deadline: Duration::from_secs(20),
        request_timeout: Duration::from_secs(20),
        ..MetaClientOptions::default()
    };
    MetaClient::new(&[endpoint], options).unwrap()
}

/// Waits until `key` holds `value`, read directly from the server.
async fn committed(direct: &MetaClient, key: &str, value: &str) -> i64 {
    wait_until(Duration::from_secs(10), || async {
        let got = direct
            .get(key.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let kv = got.ok_or("not written yet")?;
        check(kv.value == value.as_bytes(), || "another value".into())?;
        Ok(kv.mod_revision)
    })
    .await
}

/// A server, a proxy in front of it, a client straight to the server and one through
/// the proxy (with sessions at `session_ttl`), whose connection (and session) is open
/// before any reply is lost.
async fn lossy_setup(
    session_ttl: Option<Duration>,
) -> (crate::in_process::Running, Front, MetaClient, MetaClient) {
    let server = start().await;
    let proxy = Front::start();
    proxy.point_to(Some(server.grpc.clone()));
    let direct = client(&server.grpc, None);
    let through = client(&proxy.addr, session_ttl);
    through
        .put(PutRequest::new(b"warm".to_vec(), b"up".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        through.session_id().await.is_some(),
        session_ttl.is_some(),
        "a session exactly when asked for"
    );
    (server, proxy, direct, through)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_whose_reply_was_lost_succeeds_once() {
    let (server, proxy, direct, through) = lossy_setup(Some(Duration::from_secs(30))).await;

    tracing::info!("--- the CAS commits, its reply is lost, the client retries");
    proxy.swallow_replies();
    let cas = {
        let through = through.clone();
        tokio::spawn(async move {
            through
                .compare_and_put(CompareAndPutRequest {
                    key: b"cas".to_vec(),
                    expect: None,
                    value: b"mine".to_vec(),
                })
                .await
        })
    };
    let revision = committed(&direct, "cas", "mine").await;
    proxy.cut_and_heal();
    let answer = tokio::time::timeout(Duration::from_secs(30), cas)
        .await
        .expect("the client's retry is answered")
        .unwrap()
        .expect("the retried CAS succeeds");
    assert!(
        answer.success,
        "the first answer, not its own write's failed compare"
    );
    let now = direct.get(b"cas").await.unwrap().unwrap();
    assert_eq!(
        (now.mod_revision, now.version),
        (revision, 1),
        "applied once"
    );
    let store_revision = direct
        .range(common_meta::kv::RangeRequest::key(b"none".to_vec()))
        .await
        .unwrap()
        .revision;
    assert_eq!(store_revision, revision, "the revision moved once");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_without_compares_whose_reply_was_lost_applies_once() {
    let (server, proxy, direct, through) = lossy_setup(Some(Duration::from_secs(30))).await;

    proxy.swallow_replies();
    let txn = TxnRequest {
        success: vec![
            TxnOp::Put(PutRequest::new(b"t/a".to_vec(), b"1".to_vec())),
            TxnOp::Put(PutRequest::new(b"t/b".to_vec(), b"1".to_vec())),
        ],
        ..Default::default()
    };
    let sent = {
        let through = through.clone();
        tokio::spawn(async move { through.txn(txn).await })
    };
    let revision = committed(&direct, "t/b", "1").await;
    proxy.cut_and_heal();
    let answer = tokio::time::timeout(Duration::from_secs(30), sent)
        .await
        .expect("answered")
        .unwrap()
        .unwrap();
    assert_eq!(answer.revision, revision, "the first answer's revision");
    let now = direct.get(b"t/a").await.unwrap().unwrap();
    assert_eq!((now.mod_revision, now.version), (revision, 1));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_session_a_lost_reply_is_reported_as_unknown_not_retried() {
    let (server, proxy, direct, through) = lossy_setup(None).await;

    proxy.swallow_replies();
    let txn = TxnRequest {
        compare: vec![Compare::new(
            b"plain".to_vec(),
            CompareOp::Equal,
            CompareTarget::Version(0),
        )],
        success: vec![TxnOp::Put(PutRequest::new(
            b"plain".to_vec(),
            b"1".to_vec(),
        ))],
        ..Default::default()
    };
    let sent = {
        let through = through.clone();
        tokio::spawn(async move { through.txn(txn).await })
    };
    committed(&direct, "plain", "1").await;
    proxy.cut_and_heal();
    let err = tokio::time::timeout(Duration::from_secs(30), sent)
        .await
        .expect("answered")
        .unwrap()
        .unwrap_err();
    assert!(err.is_outcome_unknown(), "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_refuse_bad_references_and_expire_when_closed() {
    let server = start().await;
    let mut raw = pb::store_client::StoreClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    // A raw client does not retry: wait until the member leads.
    let opened = wait_until(Duration::from_secs(10), || {
        let mut raw = raw.clone();
        async move {
            raw.open_session(pb::OpenSessionRequest { ttl_ms: 1 })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.message().to_string())
        }
    })
    .await;
    assert_eq!(opened.ttl_ms, 5_000, "clamped to the shortest TTL");
    let put = |seq, acked| pb::PutRequest {
        key: b"s".to_vec(),
        value: b"v".to_vec(),
        session: Some(pb::SessionRef {
            id: opened.id,
            seq,
            acked,
        }),
        ..Default::default()
    };
    let status = raw.put(put(0, 0)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("invalid session reference"));
    let first = raw.put(put(1, 1)).await.unwrap().into_inner();
    let again = raw.put(put(1, 1)).await.unwrap().into_inner();
    assert_eq!(
        first.header, again.header,
        "the retry is answered as the first"
    );

    raw.keep_alive_session(pb::KeepAliveSessionRequest { id: opened.id })
        .await
        .unwrap();
    raw.close_session(pb::CloseSessionRequest { id: opened.id })
        .await
        .unwrap();
    let status = raw.put(put(2, 2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.metadata().get(meta_proto::OUTCOME).unwrap(),
        meta_proto::OUTCOME_SESSION_EXPIRED
    );
    let status = raw
        .keep_alive_session(pb::KeepAliveSessionRequest { id: opened.id })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    server.shutdown().await;
}
