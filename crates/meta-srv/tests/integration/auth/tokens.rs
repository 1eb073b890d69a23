//! Tokens that expire, clients that log in again, and open streams that follow auth
//! being switched on.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expire_and_meta_client_authenticates_again() {
    let server = start_with(|c| c.auth.token_ttl_secs = 1).await;
    let mut auth = auth_client(&server.grpc).await;
    // Set up while auth is off (tokens of one second would not outlast the set-up).
    user_with(
        &mut auth,
        "",
        "app",
        "app/",
        authpb::permission::Type::Readwrite,
    )
    .await;
    enable(&mut auth).await;
    let options = |credentials| MetaClientOptions {
        deadline: Duration::from_secs(5),
        credentials,
        ..MetaClientOptions::default()
    };
    let client = MetaClient::new(
        &[&server.grpc],
        options(Some(Credentials {
            user: "app".into(),
            password: "pw".into(),
        })),
    )
    .unwrap();
    client.put(PutRequest::new("app/1", "v")).await.unwrap();
    // meta.v1 refusals: our texts, etcd's codes.
    let err = client
        .put(PutRequest::new("__node/1", "v"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    let anonymous = MetaClient::new(&[&server.grpc], options(None)).unwrap();
    let err = anonymous
        .range(RangeRequest::key("app/1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, common_meta::Error::Unauthenticated { message } if message.contains("authenticate")),
        "{err}"
    );
    let wrong = MetaClient::new(
        &[&server.grpc],
        options(Some(Credentials {
            user: "app".into(),
            password: "nope".into(),
        })),
    )
    .unwrap();
    let err = wrong.range(RangeRequest::key("app/1")).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");

    // The token expires (its TTL is one second): the server refuses it...
    let kv = KvClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let expired = token(&mut auth, "app", "pw").await;
    wait_until(Duration::from_secs(10), || {
        let mut kv = kv.clone();
        let expired = expired.clone();
        async move {
            let answer = kv.put(as_user(put("app/2"), &expired)).await;
            check(
                matches!(&answer, Err(s) if s.code() == Code::Unauthenticated && s.message() == "etcdserver: invalid auth token"),
                || format!("the token still verifies: {answer:?}"),
            )
        }
    })
    .await;
    // ...and meta-client, whose token expired alike, authenticates again by itself.
    client.put(PutRequest::new("app/3", "v")).await.unwrap();
    let read = client.range(RangeRequest::prefix("app/")).await.unwrap();
    let keys: Vec<_> = read.kvs.iter().map(|kv| kv.key.clone()).collect();
    // app/2 was written while the token still verified.
    assert_eq!(
        keys,
        [b"app/1".to_vec(), b"app/2".to_vec(), b"app/3".to_vec()]
    );
    assert!(
        client
            .get(b"__node/1")
            .await
            .unwrap_err()
            .to_string()
            .contains("permission denied"),
        "app may not even read the internal keyspace without a grant"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_work_before_auth_is_on_and_open_streams_follow_the_switch() {
    let server = start().await;
    // A client configured with a user before auth is enabled works as any client.
    let client = MetaClient::new(
        &[&server.grpc],
        MetaClientOptions {
            deadline: Duration::from_secs(5),
            credentials: Some(Credentials {
                user: "app".into(),
                password: "pw".into(),
            }),
            ..MetaClientOptions::default()
        },
    )
    .unwrap();
    client.put(PutRequest::new("early", "v")).await.unwrap();

    // A watch stream opened while auth is off, without a token.
    let mut watch = meta_proto::etcd::etcdserverpb::watch_client::WatchClient::connect(format!(
        "http://{}",
        server.grpc
    ))
    .await
    .unwrap();
    let (requests, queued) = mpsc::channel(4);
    let mut responses = watch
        .watch(ReceiverStream::new(queued))
        .await
        .unwrap()
        .into_inner();
    let create = |key: &str| epb::WatchRequest {
        request_union: Some(epb::watch_request::RequestUnion::CreateRequest(
            epb::WatchCreateRequest {
                key: key.into(),
                ..Default::default()
            },
        )),
    };
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    requests.send(create("a")).await.unwrap();
    let first = next().await;
    assert!(first.created && !first.canceled, "{first:?}");

    let mut auth = auth_client(&server.grpc).await;
    enable(&mut auth).await;
    // The same stream may no longer create watchers without a user.
    requests.send(create("b")).await.unwrap();
    let second = next().await;
    assert!(second.canceled, "{second:?}");
    assert_eq!(second.cancel_reason, "etcdserver: user name is empty");
    // The client's user does not exist: its requests are refused, saying why.
    let err = client.put(PutRequest::new("late", "v")).await.unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    server.shutdown().await;
}
