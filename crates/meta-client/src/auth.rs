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

use common_meta::{Error, Result};
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

/// The token a client's requests carry, shared by its connections.
#[derive(Debug, Default)]
pub(crate) struct TokenSlot(RwLock<Option<http::HeaderValue>>);

impl TokenSlot {
    fn get(&self) -> Option<http::HeaderValue> {
        // Only ever replaced whole: a poisoned slot still holds a whole value.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, token: Option<http::HeaderValue>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// Whether a token is held.
    pub(crate) fn is_set(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
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

/// Authenticates `credentials` over `conn` and keeps the token in `slot`.
pub(crate) async fn authenticate(
    conn: Conn,
    credentials: &Credentials,
    slot: &TokenSlot,
) -> Result<()> {
    let answer = epb::auth_client::AuthClient::new(conn)
        .authenticate(epb::AuthenticateRequest {
            name: credentials.user.clone(),
            password: credentials.password.clone(),
        })
        .await
        .map_err(|status| Error::Unauthenticated {
            message: format!(
                "authenticating as {:?}: {}",
                credentials.user,
                status.message()
            ),
        })?
        .into_inner();
    let token = http::HeaderValue::from_str(&answer.token).map_err(|_| Error::Remote {
        code: "Internal".to_string(),
        message: "the server answered a token that is not valid metadata".to_string(),
    })?;
    slot.set(Some(token));
    Ok(())
}

/// Forgets the token (the server refused it).
pub(crate) fn forget(slot: &TokenSlot) {
    slot.set(None);
}
