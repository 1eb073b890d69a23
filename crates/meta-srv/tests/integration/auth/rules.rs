//! Enabling auth and managing users and roles: etcd's rules, etcd's texts.

use super::*;

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
