//! etcd's `Auth` service: users, roles, permissions and tokens, over the state
//! machine's auth state (`common_meta::auth`).
//!
//! Changes run at the leader (forwarded like writes); a password is hashed there, off
//! the async threads, and only its hash enters the log. `Authenticate` runs at the
//! leader too, so a user added a moment ago can log in through any member; it checks
//! the password off the async threads and hands out a signed token valid for
//! `[auth] token_ttl_secs`, which every member verifies. Who may call what is decided at the edge
//! (`crate::auth`): everything but `Authenticate`, `AuthStatus`, `UserGet` of oneself
//! and `RoleGet` of one's own roles needs root once auth is on.

use std::sync::Arc;
use std::time::Duration;

use common_meta::auth::{Access, AuthChange, AuthError, Permission, ROOT};
use meta_proto::etcd::authpb;
use meta_proto::etcd::etcdserverpb as epb;
use tonic::{Request, Response, Status};

use super::Etcd;
use super::forward::{Route, onward};
use super::status::{auth_status, status};
use crate::auth::Caller;

type AuthClient = epb::auth_client::AuthClient<tonic::transport::Channel>;

/// etcd's Auth service of one member.
pub struct AuthService {
    etcd: Arc<Etcd>,
    token_ttl: Duration,
    /// Bounds the argon2 work (about 19 MiB and tens of ms each) running at once:
    /// a flood of logins waits here instead of exhausting the member's memory.
    argon: Arc<tokio::sync::Semaphore>,
}

/// Most argon2 hashes or checks computed at once by one member.
const ARGON_AT_ONCE: usize = 4;

impl AuthService {
    /// The service over the member's shared etcd state; tokens live `token_ttl`.
    pub fn new(etcd: Arc<Etcd>, token_ttl: Duration) -> Self {
        AuthService {
            etcd,
            token_ttl,
            argon: Arc::new(tokio::sync::Semaphore::new(ARGON_AT_ONCE)),
        }
    }

    fn header(&self) -> Option<epb::ResponseHeader> {
        self.etcd
            .responder()
            .header(self.etcd.backend.local_revision())
    }

    /// Replicates `change` (this member leads) and answers the header.
    async fn change(&self, change: AuthChange) -> Result<Option<epb::ResponseHeader>, Status> {
        self.etcd
            .backend
            .auth_change(change)
            .await
            .map_err(status)?;
        Ok(self.header())
    }
}

/// Runs `$method` at the leader when this member does not lead.
macro_rules! at_leader {
    ($self:ident, $request:ident, $method:ident) => {
        if let Route::Leader(channel) = $self.etcd.forward.route(&$request).await? {
            return AuthClient::new(channel).$method(onward($request)).await;
        }
    };
}

/// Runs argon2 work `f` off the async threads, at most [`ARGON_AT_ONCE`] at a time.
async fn argon<T: Send + 'static>(
    gate: &tokio::sync::Semaphore,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let _permit = gate
        .acquire()
        .await
        .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("etcdserver: password work failed: {e}")))
}

/// The argon2 hash of a password sent in a request, made off the async threads.
async fn hash(
    gate: &tokio::sync::Semaphore,
    password: String,
    hashed: &str,
) -> Result<String, Status> {
    if !hashed.is_empty() {
        return Err(Status::invalid_argument(
            "etcdserver: pre-hashed passwords are not accepted (Metasrv keeps argon2 hashes); send the password itself",
        ));
    }
    argon(gate, move || common_meta::auth::hash_password(&password))
        .await?
        .map_err(|e| auth_status(&e))
}

fn access_of(perm_type: i32) -> Result<Access, Status> {
    match authpb::permission::Type::try_from(perm_type) {
        Ok(authpb::permission::Type::Read) => Ok(Access::Read),
        Ok(authpb::permission::Type::Write) => Ok(Access::Write),
        Ok(authpb::permission::Type::Readwrite) => Ok(Access::ReadWrite),
        Err(_) => Err(Status::invalid_argument(format!(
            "etcdserver: unknown permission type {perm_type}"
        ))),
    }
}

fn perm_of(permission: &Permission) -> authpb::Permission {
    let perm_type = match permission.access {
        Access::Read => authpb::permission::Type::Read,
        Access::Write => authpb::permission::Type::Write,
        Access::ReadWrite => authpb::permission::Type::Readwrite,
    };
    authpb::Permission {
        perm_type: perm_type as i32,
        key: permission.key.clone(),
        range_end: permission.range_end.clone(),
    }
}

#[tonic::async_trait]
impl epb::auth_server::Auth for AuthService {
    async fn auth_status(
        &self,
        _request: Request<epb::AuthStatusRequest>,
    ) -> Result<Response<epb::AuthStatusResponse>, Status> {
        let state = self.etcd.backend.store().auth();
        Ok(Response::new(epb::AuthStatusResponse {
            header: self.header(),
            enabled: state.enabled,
            auth_revision: state.revision,
        }))
    }

    async fn auth_enable(
        &self,
        request: Request<epb::AuthEnableRequest>,
    ) -> Result<Response<epb::AuthEnableResponse>, Status> {
        at_leader!(self, request, auth_enable);
        let mut secret = vec![0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| Status::internal(format!("etcdserver: drawing a secret failed: {e}")))?;
        let header = self.change(AuthChange::Enable { secret }).await?;
        tracing::info!("auth enabled");
        Ok(Response::new(epb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        request: Request<epb::AuthDisableRequest>,
    ) -> Result<Response<epb::AuthDisableResponse>, Status> {
        at_leader!(self, request, auth_disable);
        let header = self.change(AuthChange::Disable).await?;
        tracing::info!("auth disabled");
        Ok(Response::new(epb::AuthDisableResponse { header }))
    }

    async fn authenticate(
        &self,
        request: Request<epb::AuthenticateRequest>,
    ) -> Result<Response<epb::AuthenticateResponse>, Status> {
        // At the leader, whose state holds every user added so far.
        at_leader!(self, request, authenticate);
        let epb::AuthenticateRequest { name, password } = request.into_inner();
        let state = self.etcd.backend.store().auth();
        let expires_at_ms = common_meta::time::unix_ms() + self.token_ttl.as_millis() as u64;
        let token = argon(&self.argon, move || {
            state.authenticate(&name, &password)?;
            state.mint_token(&name, expires_at_ms)
        })
        .await?
        .map_err(|e| auth_status(&e))?;
        Ok(Response::new(epb::AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn user_add(
        &self,
        request: Request<epb::AuthUserAddRequest>,
    ) -> Result<Response<epb::AuthUserAddResponse>, Status> {
        at_leader!(self, request, user_add);
        let r = request.into_inner();
        let no_password = r.options.is_some_and(|o| o.no_password);
        let password = if no_password {
            None
        } else {
            Some(hash(&self.argon, r.password, &r.hashed_password).await?)
        };
        let header = self
            .change(AuthChange::UserAdd {
                name: r.name,
                password,
            })
            .await?;
        Ok(Response::new(epb::AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        request: Request<epb::AuthUserGetRequest>,
    ) -> Result<Response<epb::AuthUserGetResponse>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().name;
        if !caller.is_root() && caller.name() != Some(name.as_str()) {
            return Err(auth_status(&AuthError::PermissionDenied));
        }
        let state = self.etcd.backend.store().auth();
        let user = state.user(&name).map_err(|e| auth_status(&e))?;
        Ok(Response::new(epb::AuthUserGetResponse {
            header: self.header(),
            roles: user.roles.iter().cloned().collect(),
        }))
    }

    async fn user_list(
        &self,
        _request: Request<epb::AuthUserListRequest>,
    ) -> Result<Response<epb::AuthUserListResponse>, Status> {
        let state = self.etcd.backend.store().auth();
        Ok(Response::new(epb::AuthUserListResponse {
            header: self.header(),
            users: state.users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        request: Request<epb::AuthUserDeleteRequest>,
    ) -> Result<Response<epb::AuthUserDeleteResponse>, Status> {
        at_leader!(self, request, user_delete);
        let name = request.into_inner().name;
        let header = self.change(AuthChange::UserDelete { name }).await?;
        Ok(Response::new(epb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        request: Request<epb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<epb::AuthUserChangePasswordResponse>, Status> {
        at_leader!(self, request, user_change_password);
        let r = request.into_inner();
        // An unknown user is refused before the hash is paid for.
        self.etcd
            .backend
            .store()
            .auth()
            .user(&r.name)
            .map_err(|e| auth_status(&e))?;
        let password = hash(&self.argon, r.password, &r.hashed_password).await?;
        let header = self
            .change(AuthChange::UserPassword {
                name: r.name,
                password,
            })
            .await?;
        Ok(Response::new(epb::AuthUserChangePasswordResponse {
            header,
        }))
    }

    async fn user_grant_role(
        &self,
        request: Request<epb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<epb::AuthUserGrantRoleResponse>, Status> {
        at_leader!(self, request, user_grant_role);
        let r = request.into_inner();
        let header = self
            .change(AuthChange::UserGrant {
                name: r.user,
                role: r.role,
            })
            .await?;
        Ok(Response::new(epb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<epb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<epb::AuthUserRevokeRoleResponse>, Status> {
        at_leader!(self, request, user_revoke_role);
        let r = request.into_inner();
        let header = self
            .change(AuthChange::UserRevoke {
                name: r.name,
                role: r.role,
            })
            .await?;
        Ok(Response::new(epb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        request: Request<epb::AuthRoleAddRequest>,
    ) -> Result<Response<epb::AuthRoleAddResponse>, Status> {
        at_leader!(self, request, role_add);
        let name = request.into_inner().name;
        let header = self.change(AuthChange::RoleAdd { name }).await?;
        Ok(Response::new(epb::AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        request: Request<epb::AuthRoleGetRequest>,
    ) -> Result<Response<epb::AuthRoleGetResponse>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().role;
        let state = self.etcd.backend.store().auth();
        let holds = caller
            .name()
            .and_then(|user| state.users.get(user))
            .is_some_and(|user| user.roles.contains(&name));
        if !caller.is_root() && !holds {
            return Err(auth_status(&AuthError::PermissionDenied));
        }
        let role = state.role(&name).map_err(|e| auth_status(&e))?;
        // Root may do everything: shown as read-write on every key, as etcd shows it.
        let perm = if name == ROOT {
            vec![perm_of(&Permission {
                key: Vec::new(),
                range_end: vec![0],
                access: Access::ReadWrite,
            })]
        } else {
            role.permissions.iter().map(perm_of).collect()
        };
        Ok(Response::new(epb::AuthRoleGetResponse {
            header: self.header(),
            perm,
        }))
    }

    async fn role_list(
        &self,
        _request: Request<epb::AuthRoleListRequest>,
    ) -> Result<Response<epb::AuthRoleListResponse>, Status> {
        let state = self.etcd.backend.store().auth();
        Ok(Response::new(epb::AuthRoleListResponse {
            header: self.header(),
            roles: state.roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        request: Request<epb::AuthRoleDeleteRequest>,
    ) -> Result<Response<epb::AuthRoleDeleteResponse>, Status> {
        at_leader!(self, request, role_delete);
        let name = request.into_inner().role;
        let header = self.change(AuthChange::RoleDelete { name }).await?;
        Ok(Response::new(epb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<epb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<epb::AuthRoleGrantPermissionResponse>, Status> {
        at_leader!(self, request, role_grant_permission);
        let r = request.into_inner();
        let perm = r
            .perm
            .ok_or_else(|| Status::invalid_argument("etcdserver: permission not given"))?;
        let permission = Permission {
            access: access_of(perm.perm_type)?,
            key: perm.key,
            range_end: perm.range_end,
        };
        let header = self
            .change(AuthChange::RoleGrant {
                name: r.name,
                permission,
            })
            .await?;
        Ok(Response::new(epb::AuthRoleGrantPermissionResponse {
            header,
        }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<epb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<epb::AuthRoleRevokePermissionResponse>, Status> {
        at_leader!(self, request, role_revoke_permission);
        let r = request.into_inner();
        let header = self
            .change(AuthChange::RoleRevoke {
                name: r.role,
                key: r.key,
                range_end: r.range_end,
            })
            .await?;
        Ok(Response::new(epb::AuthRoleRevokePermissionResponse {
            header,
        }))
    }
}
