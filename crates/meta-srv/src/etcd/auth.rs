//! etcd's `Auth` service: authentication is not enabled (Metasrv has no users and
//! roles yet), which `AuthStatus` says and every other call answers with etcd's
//! "authentication is not enabled".

use std::sync::Arc;

use meta_proto::etcd::etcdserverpb as epb;
use tonic::{Request, Response, Status};

use super::Etcd;
use super::status::AUTH_NOT_ENABLED;

/// etcd's Auth service of one member.
pub struct AuthService {
    etcd: Arc<Etcd>,
}

impl AuthService {
    /// The service over the member's shared etcd state.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        AuthService { etcd }
    }
}

#[tonic::async_trait]
impl epb::auth_server::Auth for AuthService {
    async fn auth_status(
        &self,
        _request: Request<epb::AuthStatusRequest>,
    ) -> Result<Response<epb::AuthStatusResponse>, Status> {
        Ok(Response::new(epb::AuthStatusResponse {
            header: self
                .etcd
                .responder()
                .header(self.etcd.backend.local_revision()),
            enabled: false,
            auth_revision: 0,
        }))
    }

    /// Enabling needs users and roles, which Metasrv does not have yet.
    async fn auth_enable(
        &self,
        _request: Request<epb::AuthEnableRequest>,
    ) -> Result<Response<epb::AuthEnableResponse>, Status> {
        Err(Status::failed_precondition(
            "etcdserver: authentication cannot be enabled: Metasrv has no users and roles yet",
        ))
    }

    async fn auth_disable(
        &self,
        _request: Request<epb::AuthDisableRequest>,
    ) -> Result<Response<epb::AuthDisableResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn authenticate(
        &self,
        _request: Request<epb::AuthenticateRequest>,
    ) -> Result<Response<epb::AuthenticateResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_add(
        &self,
        _request: Request<epb::AuthUserAddRequest>,
    ) -> Result<Response<epb::AuthUserAddResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_get(
        &self,
        _request: Request<epb::AuthUserGetRequest>,
    ) -> Result<Response<epb::AuthUserGetResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_list(
        &self,
        _request: Request<epb::AuthUserListRequest>,
    ) -> Result<Response<epb::AuthUserListResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_delete(
        &self,
        _request: Request<epb::AuthUserDeleteRequest>,
    ) -> Result<Response<epb::AuthUserDeleteResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_change_password(
        &self,
        _request: Request<epb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<epb::AuthUserChangePasswordResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_grant_role(
        &self,
        _request: Request<epb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<epb::AuthUserGrantRoleResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn user_revoke_role(
        &self,
        _request: Request<epb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<epb::AuthUserRevokeRoleResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_add(
        &self,
        _request: Request<epb::AuthRoleAddRequest>,
    ) -> Result<Response<epb::AuthRoleAddResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_get(
        &self,
        _request: Request<epb::AuthRoleGetRequest>,
    ) -> Result<Response<epb::AuthRoleGetResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_list(
        &self,
        _request: Request<epb::AuthRoleListRequest>,
    ) -> Result<Response<epb::AuthRoleListResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_delete(
        &self,
        _request: Request<epb::AuthRoleDeleteRequest>,
    ) -> Result<Response<epb::AuthRoleDeleteResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_grant_permission(
        &self,
        _request: Request<epb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<epb::AuthRoleGrantPermissionResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }

    async fn role_revoke_permission(
        &self,
        _request: Request<epb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<epb::AuthRoleRevokePermissionResponse>, Status> {
        Err(AUTH_NOT_ENABLED.status())
    }
}
