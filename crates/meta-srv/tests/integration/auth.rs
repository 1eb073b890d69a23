//! Users, roles and permissions: etcd's Auth API with etcd's rules and texts, tokens
//! that expire and that a password change outdates, key-range checks on every path
//! (KV, txn, watch), the internal keyspace kept for root, and the same through
//! meta-client and metactl.

use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{Credentials, MetaClient, MetaClientOptions};
use meta_proto::etcd::authpb;
use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::etcdserverpb::auth_client::AuthClient;
use meta_proto::etcd::etcdserverpb::kv_client::KvClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::in_process::{leader_of, start, start_three, start_with};
use crate::metactl::metactl_async;
use crate::support::{check, wait_until};

const ROOT_PASSWORD: &str = "r00t-pw";

fn as_user<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("token", token.parse().unwrap());
    request
}

fn put(key: &str) -> epb::PutRequest {
    epb::PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
) -> (Code, String) {
    let status = result.expect_err("the call should have been refused");
    (status.code(), status.message().to_string())
}

async fn auth_client(addr: &str) -> AuthClient<Channel> {
    AuthClient::connect(format!("http://{addr}")).await.unwrap()
}

async fn token(auth: &mut AuthClient<Channel>, name: &str, password: &str) -> String {
    auth.authenticate(epb::AuthenticateRequest {
        name: name.into(),
        password: password.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

/// Adds `root` (with the root role) and enables auth; root's token.
async fn enable(auth: &mut AuthClient<Channel>) -> String {
    auth.user_add(epb::AuthUserAddRequest {
        name: "root".into(),
        password: ROOT_PASSWORD.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    auth.user_grant_role(epb::AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(epb::AuthEnableRequest {}).await.unwrap();
    token(auth, "root", ROOT_PASSWORD).await
}

/// As root: user `name` (password `pw`) holding a new role of the same name with
/// `access` on the prefix `prefix`.
async fn user_with(
    auth: &mut AuthClient<Channel>,
    root: &str,
    name: &str,
    prefix: &str,
    access: authpb::permission::Type,
) {
    auth.user_add(as_user(
        epb::AuthUserAddRequest {
            name: name.into(),
            password: "pw".into(),
            ..Default::default()
        },
        root,
    ))
    .await
    .unwrap();
    auth.role_add(as_user(epb::AuthRoleAddRequest { name: name.into() }, root))
        .await
        .unwrap();
    let end = common_meta::kv::prefix_end(prefix.as_bytes());
    auth.role_grant_permission(as_user(
        epb::AuthRoleGrantPermissionRequest {
            name: name.into(),
            perm: Some(authpb::Permission {
                perm_type: access as i32,
                key: prefix.into(),
                range_end: if prefix.is_empty() { vec![0] } else { end },
            }),
        },
        root,
    ))
    .await
    .unwrap();
    auth.user_grant_role(as_user(
        epb::AuthUserGrantRoleRequest {
            user: name.into(),
            role: name.into(),
        },
        root,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn enabling_auth_follows_etcds_rules_and_texts() {
    let server = start().await;
    let mut auth = auth_client(&server.grpc).await;
    let status = auth.auth_status(epb::AuthStatusRequest {}).await.unwrap();
    assert!(!status.into_inner().enabled);
    assert_eq!(
        refused(auth.auth_enable(epb::AuthEnableRequest {}).await),
        (
            Code::FailedPrecondition,
            "etcdserver: root user does not exist".into()
        )
    );
    assert_eq!(
        refused(
            auth.authenticate(epb::AuthenticateRequest {
                name: "root".into(),
                password: "x".into(),
            })
            .await
        ),
        (
            Code::FailedPrecondition,
            "etcdserver: authentication is not enabled".into()
        )
    );
    auth.user_add(epb::AuthUserAddRequest {
        name: "root".into(),
        password: ROOT_PASSWORD.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        refused(auth.auth_enable(epb::AuthEnableRequest {}).await).1,
        "etcdserver: root user does not have root role"
    );
    assert_eq!(
        refused(
            auth.user_add(epb::AuthUserAddRequest {
                name: "root".into(),
                password: "again".into(),
                ..Default::default()
            })
            .await
        )
        .1,
        "etcdserver: user name already exists"
    );
    assert_eq!(
        refused(
            auth.user_grant_role(epb::AuthUserGrantRoleRequest {
                user: "root".into(),
                role: "nope".into(),
            })
            .await
        )
        .1,
        "etcdserver: role name not found"
    );
    auth.user_grant_role(epb::AuthUserGrantRoleRequest {
        user: "root".into(),
        role: "root".into(),
    })
    .await
    .unwrap();
    auth.auth_enable(epb::AuthEnableRequest {}).await.unwrap();
    let root = token(&mut auth, "root", ROOT_PASSWORD).await;
    let status = auth
        .auth_status(epb::AuthStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.enabled && status.auth_revision >= 3, "{status:?}");

    // No token, a forged one, a wrong password: each refused with etcd's text.
    let mut kv = KvClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    assert_eq!(
        refused(kv.put(put("k")).await),
        (
            Code::InvalidArgument,
            "etcdserver: user name is empty".into()
        )
    );
    assert_eq!(
        refused(kv.put(as_user(put("k"), "mat1.forged.0.0.00.00")).await),
        (
            Code::Unauthenticated,
            "etcdserver: invalid auth token".into()
        )
    );
    assert_eq!(
        refused(
            auth.authenticate(epb::AuthenticateRequest {
                name: "root".into(),
                password: "wrong".into(),
            })
            .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password".into()
        )
    );
    kv.put(as_user(put("k"), &root)).await.unwrap();

    // Root cannot be locked out while auth is on.
    assert_eq!(
        refused(
            auth.user_delete(as_user(
                epb::AuthUserDeleteRequest {
                    name: "root".into()
                },
                &root
            ))
            .await
        ),
        (
            Code::InvalidArgument,
            "etcdserver: invalid auth management".into()
        )
    );
    // Management needs root.
    user_with(
        &mut auth,
        &root,
        "alice",
        "app/",
        authpb::permission::Type::Readwrite,
    )
    .await;
    let alice = token(&mut auth, "alice", "pw").await;
    assert_eq!(
        refused(
            auth.user_add(as_user(
                epb::AuthUserAddRequest {
                    name: "mallory".into(),
                    password: "pw".into(),
                    ..Default::default()
                },
                &alice
            ))
            .await
        ),
        (
            Code::PermissionDenied,
            "etcdserver: permission denied".into()
        )
    );
    // A user reads itself, not others.
    let own = auth
        .user_get(as_user(
            epb::AuthUserGetRequest {
                name: "alice".into(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.roles, ["alice"]);
    assert!(
        auth.user_get(as_user(
            epb::AuthUserGetRequest {
                name: "root".into()
            },
            &alice
        ))
        .await
        .is_err()
    );
    // Disabling is root's; after it, requests need no token.
    assert!(
        auth.auth_disable(as_user(epb::AuthDisableRequest {}, &alice))
            .await
            .is_err()
    );
    auth.auth_disable(as_user(epb::AuthDisableRequest {}, &root))
        .await
        .unwrap();
    kv.put(put("after")).await.unwrap();
    server.shutdown().await;
}

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
async fn metactl_manages_users_and_roles_and_acts_as_a_user() {
    let server = start().await;
    let ep = server.grpc.clone();
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "stdout {out} stderr {err}");
        out
    };
    let root_with_password = format!("root:{ROOT_PASSWORD}");
    ok(metactl_async(&ep, &["user", "add", &root_with_password]).await);
    ok(metactl_async(&ep, &["user", "grant-role", "root", "root"]).await);
    ok(metactl_async(&ep, &["user", "add", "dev", "--new-password", "pw"]).await);
    ok(metactl_async(&ep, &["role", "add", "dev"]).await);
    ok(metactl_async(
        &ep,
        &[
            "role",
            "grant-permission",
            "dev",
            "readwrite",
            "dev/",
            "--prefix",
        ],
    )
    .await);
    ok(metactl_async(&ep, &["user", "grant-role", "dev", "dev"]).await);
    ok(metactl_async(&ep, &["auth", "enable"]).await);
    let status = ok(metactl_async(&ep, &["auth", "status", "--user", "dev:pw"]).await);
    assert!(status.starts_with("auth enabled"), "{status}");

    // Without a user, with a wrong password, outside the grant: one line, exit 1.
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "dev/a", "1"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("authenticate") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) =
        metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev:bad"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("authentication failed"), "{err}");
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "x", "1", "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("permission denied"), "{err}");
    let (code, _, err) = metactl_async(&ep, &["user", "list", "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1), "listing users is root's: {err}");
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("needs a password"), "{err}");

    ok(metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev:pw"]).await);
    let got = ok(metactl_async(&ep, &["kv", "get", "dev/a", "--user", "dev:pw"]).await);
    assert!(got.contains('1'), "{got}");
    let root = format!("root:{ROOT_PASSWORD}");
    // A snapshot is root's.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    let file = file.to_str().unwrap();
    let (code, _, err) = metactl_async(&ep, &["snapshot", "save", file, "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("permission denied"), "{err}");
    ok(metactl_async(&ep, &["snapshot", "save", file, "--user", &root]).await);
    assert!(std::fs::metadata(file).unwrap().len() > 0);
    let users = ok(metactl_async(&ep, &["user", "list", "--user", &root]).await);
    assert_eq!(users.lines().collect::<Vec<_>>(), ["dev", "root"]);
    let perms = ok(metactl_async(&ep, &["role", "get", "dev", "--user", "dev:pw"]).await);
    assert!(perms.contains("readwrite [dev/, dev0)"), "{perms}");
    ok(metactl_async(&ep, &["auth", "disable", "--user", &root]).await);
    ok(metactl_async(&ep, &["kv", "put", "x", "1"]).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_replicated_and_tokens_verify_on_every_member() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = (leader + 1) % 3;
    // Changes sent to a follower run at the leader.
    let mut at_follower = auth_client(&members[follower].grpc).await;
    let root = enable(&mut at_follower).await;
    user_with(
        &mut at_follower,
        &root,
        "app",
        "app/",
        authpb::permission::Type::Readwrite,
    )
    .await;
    // A token from one member verifies on every other (one secret, replicated).
    let mut at_leader = auth_client(&members[leader].grpc).await;
    let app = token(&mut at_leader, "app", "pw").await;
    for m in &members {
        let mut kv = KvClient::connect(format!("http://{}", m.grpc))
            .await
            .unwrap();
        let key = format!("app/{}", m.grpc);
        kv.put(as_user(put(&key), &app)).await.unwrap();
        let (code, _) = refused(kv.put(as_user(put("elsewhere"), &app)).await);
        assert_eq!(code, Code::PermissionDenied);
    }
    for m in members {
        m.shutdown().await;
    }
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
