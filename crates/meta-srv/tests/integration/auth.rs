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

pub(crate) const ROOT_PASSWORD: &str = "r00t-pw";

pub(crate) fn as_user<T>(message: T, token: &str) -> Request<T> {
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

pub(crate) async fn auth_client(addr: &str) -> AuthClient<Channel> {
    AuthClient::connect(format!("http://{addr}")).await.unwrap()
}

pub(crate) async fn token(auth: &mut AuthClient<Channel>, name: &str, password: &str) -> String {
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
pub(crate) async fn enable(auth: &mut AuthClient<Channel>) -> String {
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
pub(crate) async fn user_with(
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

mod clients;
mod permissions;
mod rules;
mod tokens;
