//! Auth at the gRPC edge: who a request comes from, and what each method needs.
//!
//! [`AuthLayer`] sits in front of every gRPC service of the member. While auth is off
//! it lets everything through. While it is on, it reads the request's token (the
//! `token` metadata etcd's clients send, or `authorization`), verifies it against the
//! member's auth state, refuses a method the user may not call at all, and hands the
//! [`Caller`] to the handler in the request's extensions; handlers that touch keys
//! then check the keys ([`Caller::check_txn`], [`Caller::check`]).
//!
//! What each method needs ([`policy`]):
//! - nothing: raft traffic between members (authenticated by the cluster id in every
//!   message and, with mutual TLS, by certificate: the cluster id is no secret, so
//!   only mutual TLS keeps a client that speaks raft out), `Authenticate`,
//!   `AuthStatus`, finding the leader, etcd's member list and status;
//! - root: membership changes, maintenance, compaction, snapshots, user and role
//!   management, DDL, node and route administration;
//! - any user: everything else, with key checks where keys are named.
//!
//! Permission changes take effect on each member as it applies them: a member a little
//! behind checks against its slightly older copy for that long.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use common_meta::auth::{Access, AuthError, AuthState};
use common_meta::kv::{
    KvBackend, LeaseGrant, LeaseTimeToLive, RangeRequest, RangeResponse, SledKvStore, TxnRequest,
    TxnResponse, WatchRequest, WatchStream,
};
use tonic::Status;

/// gRPC metadata keys a token may come in: etcd's clients send `token`; `authorization`
/// is what generic gRPC tools send.
pub const TOKEN_KEYS: [&str; 2] = ["token", "authorization"];

/// Who a request comes from, as the edge decided.
#[derive(Clone, Debug, Default)]
pub enum Caller {
    /// Auth is off, or the method needs no user: nothing is checked.
    #[default]
    Anyone,
    /// An authenticated user, checked against the state the token was verified with.
    User {
        /// The user's name.
        name: String,
        /// The auth state as of the request.
        state: Arc<AuthState>,
    },
}

impl Caller {
    /// The caller of `request` (anyone when no layer decided: auth is not in play).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }

    /// The user's name, if a user called.
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::User { name, .. } => Some(name),
        }
    }

    /// Whether the caller may do anything (auth off, or a root user).
    pub fn is_root(&self) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::User { name, state } => state.is_root(name),
        }
    }

    /// Refuses unless the caller may do `access` on `[key, range_end)`.
    pub fn check(&self, key: &[u8], range_end: &[u8], access: Access) -> Result<(), AuthError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User { name, state } => state
                .permits(name, key, range_end, access)
                .then_some(())
                .ok_or(AuthError::PermissionDenied),
        }
    }

    /// Refuses unless the caller may run `txn` (every op and compare of both branches).
    pub fn check_txn(&self, txn: &TxnRequest) -> Result<(), AuthError> {
        match self {
            Caller::Anyone => Ok(()),
            Caller::User { name, state } => state
                .permits_txn(name, txn)
                .then_some(())
                .ok_or(AuthError::PermissionDenied),
        }
    }

    /// Refuses unless the caller is root.
    pub fn check_root(&self) -> Result<(), AuthError> {
        self.is_root()
            .then_some(())
            .ok_or(AuthError::PermissionDenied)
    }
}

/// A backend whose every read and write is checked against a caller's permissions
/// first: the KV calls of the services run through it, so one check covers ranges,
/// puts, deletes, batches, compare-and-put and transactions alike (each is a
/// transaction underneath).
pub struct Checked<'a, B: ?Sized> {
    inner: &'a B,
    caller: Caller,
}

impl<'a, B: KvBackend + ?Sized> Checked<'a, B> {
    /// `inner` as `caller` may use it.
    pub fn new(inner: &'a B, caller: Caller) -> Self {
        Checked { inner, caller }
    }
}

fn denied(err: AuthError) -> common_meta::Error {
    common_meta::Error::Auth(err)
}

#[async_trait::async_trait]
impl<B: KvBackend + ?Sized> KvBackend for Checked<'_, B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn txn(&self, req: TxnRequest) -> common_meta::Result<TxnResponse> {
        self.caller.check_txn(&req).map_err(denied)?;
        self.inner.txn(req).await
    }

    async fn range_serializable(&self, req: RangeRequest) -> common_meta::Result<RangeResponse> {
        self.caller
            .check(&req.key, &req.range_end, Access::Read)
            .map_err(denied)?;
        self.inner.range_serializable(req).await
    }

    async fn compact(&self, revision: i64) -> common_meta::Result<i64> {
        self.caller.check_root().map_err(denied)?;
        self.inner.compact(revision).await
    }

    async fn watch(&self, req: WatchRequest) -> common_meta::Result<WatchStream> {
        self.caller
            .check(&req.key, &req.range_end, Access::Read)
            .map_err(denied)?;
        self.inner.watch(req).await
    }

    async fn lease_grant(&self, ttl: i64, id: i64) -> common_meta::Result<LeaseGrant> {
        self.inner.lease_grant(ttl, id).await
    }

    /// Revoking deletes the lease's keys: the caller must be allowed to write each.
    async fn lease_revoke(&self, id: i64) -> common_meta::Result<()> {
        if let Caller::User { .. } = self.caller {
            for key in self.inner.lease_time_to_live(id, true).await?.keys {
                self.caller
                    .check(&key, &[], Access::Write)
                    .map_err(denied)?;
            }
        }
        self.inner.lease_revoke(id).await
    }

    async fn lease_keep_alive(&self, id: i64) -> common_meta::Result<i64> {
        self.inner.lease_keep_alive(id).await
    }

    /// The keys of a lease are shown only to a caller who may read each (etcd's rule).
    async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> common_meta::Result<LeaseTimeToLive> {
        let answer = self.inner.lease_time_to_live(id, keys).await?;
        for key in &answer.keys {
            self.caller.check(key, &[], Access::Read).map_err(denied)?;
        }
        Ok(answer)
    }

    async fn leases(&self) -> common_meta::Result<Vec<i64>> {
        self.inner.leases().await
    }
}

/// What a gRPC method needs of its caller while auth is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// No user.
    Open,
    /// Any authenticated user (the handler may check keys).
    User,
    /// A user with the root role.
    Root,
}

/// What method `path` (`/package.Service/Method`) needs; see the module doc.
pub fn policy(path: &str) -> Policy {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    match (service, method) {
        ("meta.v1.Cluster", "Raft" | "SnapshotOffset" | "InstallSnapshot")
        | ("meta.v1.Heartbeat", "AskLeader")
        | ("etcdserverpb.Auth", "Authenticate" | "AuthStatus")
        | ("etcdserverpb.Maintenance", "Status")
        | ("etcdserverpb.Cluster", "MemberList")
        | ("grpc.health.v1.Health", _) => Policy::Open,
        // A user may read itself and its roles (checked by the handler).
        ("etcdserverpb.Auth", "UserGet" | "RoleGet") => Policy::User,
        ("etcdserverpb.Auth", _)
        | ("etcdserverpb.KV", "Compact")
        | ("etcdserverpb.Cluster", _)
        | (
            "etcdserverpb.Maintenance",
            "Defragment" | "Hash" | "HashKV" | "Snapshot" | "MoveLeader" | "Downgrade",
        )
        | ("meta.v1.Cluster", "AddLearner" | "PromoteMember" | "RemoveMember" | "TransferLeader")
        | ("meta.v1.Ddl", "Submit")
        | ("meta.v1.Store", "Compact")
        | ("meta.v1.Heartbeat", "RegisterJoinToken" | "SetNodeState" | "RemoveNode")
        | ("meta.v1.Region", "Migrate" | "SetMaintenance" | "SetBalancer" | "DrainNode")
        | ("meta.v1.RouteCatalog", "SplitRoute" | "MergeRoute" | "MoveRoute") => Policy::Root,
        _ => Policy::User,
    }
}

/// Whether `path` belongs to etcd's API, whose clients match etcd's error texts.
fn is_etcd(path: &str) -> bool {
    ["/etcdserverpb.", "/v3lockpb.", "/v3electionpb."]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// The meta.v1 status of an auth refusal (etcd's API answers with etcd's texts,
/// `etcd::status::auth_status`).
pub fn status(err: &AuthError) -> Status {
    let message = err.to_string();
    match err {
        AuthError::InvalidToken(_) => Status::unauthenticated(format!(
            "{message}; authenticate again (metactl --user NAME)"
        )),
        AuthError::UserEmpty => Status::unauthenticated(
            "auth is enabled and the request carries no token: authenticate first (metactl --user NAME)",
        ),
        AuthError::Failed => Status::unauthenticated(message),
        AuthError::PermissionDenied => Status::permission_denied(message),
        AuthError::RoleEmpty | AuthError::Invalid(_) | AuthError::InvalidManagement(_) => {
            Status::invalid_argument(message)
        }
        AuthError::RootUserMissing
        | AuthError::RootRoleMissing
        | AuthError::UserExists(_)
        | AuthError::UserNotFound(_)
        | AuthError::RoleExists(_)
        | AuthError::RoleNotFound(_)
        | AuthError::RoleNotGranted { .. }
        | AuthError::PermissionNotGranted(_)
        | AuthError::NotEnabled => Status::failed_precondition(message),
    }
}

/// The status of a refusal on `path`: etcd's text on etcd's API, ours elsewhere.
fn refusal(path: &str, err: &AuthError) -> Status {
    if is_etcd(path) {
        crate::etcd::status::auth_status(err)
    } else {
        status(err)
    }
}

/// The token a request carries, if any (`Bearer ` is dropped from `authorization`).
fn token_of(headers: &http::HeaderMap) -> Option<&str> {
    TOKEN_KEYS
        .iter()
        .find_map(|key| headers.get(*key))
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
        .filter(|value| !value.is_empty())
}

/// Decides the caller of a request to `path` with `headers` (see the module doc).
pub fn decide(
    state: Arc<AuthState>,
    path: &str,
    headers: &http::HeaderMap,
    now_ms: u64,
) -> Result<Caller, AuthError> {
    if !state.enabled {
        return Ok(Caller::Anyone);
    }
    let needs = policy(path);
    if needs == Policy::Open {
        return Ok(Caller::Anyone);
    }
    let token = token_of(headers).ok_or(AuthError::UserEmpty)?;
    let name = state.verify_token(token, now_ms)?;
    if needs == Policy::Root && !state.is_root(&name) {
        return Err(AuthError::PermissionDenied);
    }
    Ok(Caller::User { name, state })
}

/// A tower layer over the gRPC server that decides every request's [`Caller`].
#[derive(Clone)]
pub struct AuthLayer {
    store: Arc<SledKvStore>,
}

impl AuthLayer {
    /// The layer of the member whose state machine is `store`.
    pub fn new(store: Arc<SledKvStore>) -> Self {
        AuthLayer { store }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authed {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The gRPC server's service behind [`AuthLayer`].
#[derive(Clone)]
pub struct Authed<S> {
    inner: S,
    store: Arc<SledKvStore>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        match decide(
            self.store.auth(),
            path,
            request.headers(),
            common_meta::time::unix_ms(),
        ) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(err) => {
                let answer = refusal(path, &err).into_http();
                Box::pin(std::future::ready(Ok(answer)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common_meta::auth::{AuthChange, ROOT};

    fn state() -> Arc<AuthState> {
        let mut state = AuthState::default();
        for name in [ROOT, "alice"] {
            state
                .apply(AuthChange::UserAdd {
                    name: name.into(),
                    password: None,
                })
                .unwrap();
        }
        state
            .apply(AuthChange::UserGrant {
                name: ROOT.into(),
                role: ROOT.into(),
            })
            .unwrap();
        state
            .apply(AuthChange::Enable {
                secret: vec![3; 32],
            })
            .unwrap();
        Arc::new(state)
    }

    fn with_token(key: &str, token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::HeaderName::from_bytes(key.as_bytes()).unwrap(),
            token.parse().unwrap(),
        );
        headers
    }

    #[test]
    fn methods_need_what_their_policy_says() {
        let state = state();
        let alice = state.mint_token("alice", u64::MAX).unwrap();
        let root = state.mint_token(ROOT, u64::MAX).unwrap();
        let none = http::HeaderMap::new();
        let put = "/etcdserverpb.KV/Put";
        let members = "/etcdserverpb.Cluster/MemberAdd";
        assert!(matches!(
            decide(state.clone(), "/meta.v1.Cluster/Raft", &none, 0),
            Ok(Caller::Anyone)
        ));
        assert_eq!(
            decide(state.clone(), put, &none, 0).unwrap_err(),
            AuthError::UserEmpty
        );
        let caller = decide(state.clone(), put, &with_token("token", &alice), 0).unwrap();
        assert_eq!(caller.name(), Some("alice"));
        let bearer = format!("Bearer {alice}");
        assert!(decide(state.clone(), put, &with_token("authorization", &bearer), 0).is_ok());
        assert_eq!(
            decide(state.clone(), members, &with_token("token", &alice), 0).unwrap_err(),
            AuthError::PermissionDenied
        );
        assert!(decide(state.clone(), members, &with_token("token", &root), 0).is_ok());
        assert!(matches!(
            decide(state.clone(), put, &with_token("token", "forged"), 0),
            Err(AuthError::InvalidToken(_))
        ));
        // Auth off: anyone, token or not.
        let off = Arc::new(AuthState::default());
        assert!(matches!(decide(off, members, &none, 0), Ok(Caller::Anyone)));
    }

    #[test]
    fn refusals_speak_etcd_on_etcds_api_only() {
        let etcd = refusal("/etcdserverpb.KV/Put", &AuthError::UserEmpty);
        assert_eq!(etcd.message(), "etcdserver: user name is empty");
        let ours = refusal("/meta.v1.Store/Put", &AuthError::UserEmpty);
        assert_eq!(ours.code(), tonic::Code::Unauthenticated);
        assert!(
            ours.message().contains("authenticate"),
            "{}",
            ours.message()
        );
    }
}
