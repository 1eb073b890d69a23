//! Authentication: the user a client acts as, and the token it sends.
//!
//! With [`Credentials`] in its options, a client authenticates (etcd's
//! `Auth/Authenticate`, which every member serves) before its first request and again
//! whenever a member refuses its token (expired, or its password changed), then sends
//! the request again: a request refused as unauthenticated was never applied. Every
//! request goes out through a [`Conn`], which adds the current token as the `token`
//! metadata etcd's clients use.

use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use meta_proto::etcd::etcdserverpb as epb;
use tonic::transport::Channel;

/// A user and its password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user's name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What a client knows of its login.
#[derive(Debug, Default, Clone)]
enum Login {
    /// Nothing yet (or the last token was refused): log in before the next request.
    #[default]
    Unknown,
    /// The cluster has auth off: requests go without a token until one is refused.
    NotNeeded,
    /// The token requests carry (marked sensitive: never printed).
    Token(http::HeaderValue),
}

/// The token a client's requests carry, shared by its connections.
#[derive(Debug, Default)]
pub(crate) struct TokenSlot(RwLock<Login>);

impl TokenSlot {
    fn get(&self) -> Option<http::HeaderValue> {
        // Only ever replaced whole: a poisoned slot still holds a whole value.
        match &*self.0.read().unwrap_or_else(PoisonError::into_inner) {
            Login::Token(token) => Some(token.clone()),
            Login::Unknown | Login::NotNeeded => None,
        }
    }

    fn set(&self, login: Login) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = login;
    }

    /// Whether the client knows what to send (a token, or that none is needed).
    pub(crate) fn is_set(&self) -> bool {
        !matches!(
            *self.0.read().unwrap_or_else(PoisonError::into_inner),
            Login::Unknown
        )
    }
}

/// A connection to a member that adds the client's token to every request.
#[derive(Clone, Debug)]
pub struct Conn {
    inner: Channel,
    token: Arc<TokenSlot>,
}

impl Conn {
    pub(crate) fn new(inner: Channel, token: Arc<TokenSlot>) -> Self {
        Conn { inner, token }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(token) = self.token.get() {
            request.headers_mut().insert("token", token);
        }
        self.inner.call(request)
    }
}

/// etcd's answer to a login while auth is off.
const NOT_ENABLED: &str = "etcdserver: authentication is not enabled";

/// Authenticates `credentials` over `conn` and keeps the token in `slot`. A cluster
/// with auth off needs no token: that is remembered until a request is refused. A
/// failure is the server's status, its text prefixed with who logged in.
pub(crate) async fn authenticate(
    conn: Conn,
    credentials: &Credentials,
    slot: &TokenSlot,
) -> std::result::Result<(), tonic::Status> {
    let answer = epb::auth_client::AuthClient::new(conn)
        .authenticate(epb::AuthenticateRequest {
            name: credentials.user.clone(),
            password: credentials.password.clone(),
        })
        .await;
    let answer = match answer {
        Ok(answer) => answer.into_inner(),
        Err(status) if status.message() == NOT_ENABLED => {
            slot.set(Login::NotNeeded);
            return Ok(());
        }
        Err(status) => {
            return Err(tonic::Status::with_metadata(
                status.code(),
                format!(
                    "authenticating as {:?}: {}",
                    credentials.user,
                    status.message()
                ),
                status.metadata().clone(),
            ));
        }
    };
    let mut token = http::HeaderValue::from_str(&answer.token).map_err(|_| {
        tonic::Status::internal("the server answered a token that is not valid metadata")
    })?;
    token.set_sensitive(true);
    slot.set(Login::Token(token));
    Ok(())
}

/// Forgets the token (the server refused it, or refused a request without one).
pub(crate) fn forget(slot: &TokenSlot) {
    slot.set(Login::Unknown);
}
