//! [`MetaClient`]: endpoints, channels and the retry loop.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use common_meta::{Error, Result};
use meta_proto::LEADER_HINT;
use meta_proto::v1 as pb;
use meta_proto::v1::cluster_client::ClusterClient;
use meta_proto::v1::heartbeat_client::HeartbeatClient;
use meta_proto::v1::procedure_client::ProcedureClient;
use meta_proto::v1::store_client::StoreClient;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{Conn, Credentials, TokenSlot};
use tonic::{Response, Status};

use crate::status::{Outcome, from_status, outcome_of};

/// Which failures a request is sent again after, by what they may have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// A read, or a write named by a client session (whose retry cannot apply it
    /// twice): every transient failure is retried.
    Transient,
    /// A write without a session: retried only when the server said nothing was
    /// applied; any other failure is reported as an unknown outcome.
    NotApplied,
}

/// A request that failed for good, and whether any attempt of it may have applied.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) maybe_applied: bool,
}

/// How a [`MetaClient`] connects and retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaClientOptions {
    /// Timeout of one TCP connect.
    pub connect_timeout: Duration,
    /// Timeout of one attempt of a request.
    pub request_timeout: Duration,
    /// Total time a request may take across retries before it fails as unavailable.
    pub deadline: Duration,
    /// First pause between attempts; doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
    /// TTL of the client session that makes writes exactly-once (opened at the first
    /// write, kept alive every third of it). `None`: writes run without a session, and
    /// one whose outcome is unknown is reported so instead of being sent again.
    pub session_ttl: Option<Duration>,
    /// How long a DDL call (create table, ...) waits for its procedure in all before it
    /// reports the procedure as still running.
    pub ddl_timeout: Duration,
    /// TLS to the members (`None`: plain text).
    pub tls: Option<ClientTls>,
    /// The user to act as when the cluster has auth enabled (`None`: none; requests
    /// are then refused as unauthenticated where auth is on).
    pub credentials: Option<Credentials>,
}

/// TLS to the members: the CA their certificates are checked with, and this client's
/// own certificate when they ask for one (mutual TLS). PEM bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientTls {
    /// The CA (None: the members' certificates are not checked against a CA of ours,
    /// which rustls then refuses: give one).
    pub ca: Option<Vec<u8>>,
    /// This client's certificate and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the members' certificates must carry (default: the endpoint's host).
    pub domain: Option<String>,
}

impl ClientTls {
    /// Reads PEM files: the CA, and optionally a certificate and its key.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<ClientTls> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Error::invalid_argument(format!("reading {}: {e}", path.display())))
        };
        Ok(ClientTls {
            ca: Some(read(ca)?),
            identity: match identity {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
            domain: None,
        })
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

impl Default for MetaClientOptions {
    fn default() -> Self {
        MetaClientOptions {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            session_ttl: Some(Duration::from_secs(60)),
            ddl_timeout: Duration::from_secs(60),
            tls: None,
            credentials: None,
        }
    }
}

/// Largest response the client accepts (a range of many large values can be big).
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// A client of a Metasrv cluster, cheap to clone.
#[derive(Clone, Debug)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The endpoints given, plus leaders learned from hints; never shrinks.
    endpoints: RwLock<Vec<(String, Conn)>>,
    /// Index of the endpoint that answered last; requests start there.
    current: AtomicUsize,
    options: MetaClientOptions,
    /// The client session of exactly-once writes, once opened.
    pub(crate) session: crate::session::SessionSlot,
    /// The stream that carries this client's watchers, while any run.
    pub(crate) watch_mux: crate::watch::MuxSlot,
    /// The token requests carry, once authenticated.
    token: Arc<TokenSlot>,
}

impl MetaClient {
    /// A client of the members at `endpoints` (`host:port`, or a full `http://` or
    /// `https://` URI; `host:port` is https when `options.tls` is set).
    /// Connections are made lazily, so this fails only on malformed endpoints.
    pub fn new(endpoints: &[impl AsRef<str>], options: MetaClientOptions) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::invalid_argument("no endpoints given"));
        }
        let token = Arc::new(TokenSlot::default());
        let mut channels = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let endpoint = endpoint.as_ref().trim();
            let conn = Conn::new(channel(endpoint, &options)?, token.clone());
            channels.push((endpoint.to_string(), conn));
        }
        Ok(MetaClient {
            inner: Arc::new(Inner {
                endpoints: RwLock::new(channels),
                current: AtomicUsize::new(0),
                options,
                session: Default::default(),
                watch_mux: Default::default(),
                token,
            }),
        })
    }

    /// How this client connects and retries.
    pub fn options(&self) -> &MetaClientOptions {
        &self.inner.options
    }

    /// The endpoints this client talks to: those it was given, then leaders it learned.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .read_endpoints()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Runs `call` on a Store client (see [`MetaClient::with_channel`]).
    pub(crate) async fn with_store<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(StoreClient<Conn>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.with_channel(|channel| {
            call(StoreClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
        })
        .await
    }

    /// Runs `call` on etcd's Auth service of the members (users, roles, enabling auth;
    /// changes are forwarded to the leader by the member), with the retry loop.
    pub async fn with_auth<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(meta_proto::etcd::etcdserverpb::auth_client::AuthClient<Conn>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.with_channel(|channel| {
            call(meta_proto::etcd::etcdserverpb::auth_client::AuthClient::new(channel))
        })
        .await
    }

    /// The raft status of the member this client currently talks to.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.with_channel(|channel| async move {
            ClusterClient::new(channel)
                .status(pb::StatusRequest {})
                .await
        })
        .await
    }

    /// Adds member `id` at `addr` as a learner (sent to the leader).
    pub async fn add_learner(&self, id: u64, addr: &str) -> Result<pb::MembershipResponse> {
        let req = pb::AddLearnerRequest {
            id,
            addr: addr.to_string(),
        };
        self.with_channel(|channel| {
            let req = req.clone();
            async move { ClusterClient::new(channel).add_learner(req).await }
        })
        .await
    }

    /// Makes learner `id` a voter (sent to the leader).
    pub async fn promote_member(&self, id: u64) -> Result<pb::MembershipResponse> {
        self.with_channel(|channel| async move {
            ClusterClient::new(channel)
                .promote_member(pb::MemberIdRequest { id })
                .await
        })
        .await
    }

    /// Removes member `id` (sent to the leader).
    pub async fn remove_member(&self, id: u64) -> Result<pb::MembershipResponse> {
        self.with_channel(|channel| async move {
            ClusterClient::new(channel)
                .remove_member(pb::MemberIdRequest { id })
                .await
        })
        .await
    }

    /// Hands leadership to voter `to`; returns once it leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        self.with_channel(|channel| async move {
            ClusterClient::new(channel)
                .transfer_leader(pb::TransferLeaderRequest { to })
                .await
        })
        .await
        .map(drop)
    }

    /// One procedure as the leader's manager knows it.
    pub async fn procedure(&self, id: &str) -> Result<pb::ProcedureInfo> {
        let req = pb::QueryProcedureRequest { id: id.to_string() };
        let resp = self
            .with_channel(|channel| {
                let req = req.clone();
                async move { ProcedureClient::new(channel).query(req).await }
            })
            .await?;
        resp.procedure.ok_or_else(|| Error::Remote {
            code: "Internal".to_string(),
            message: "a procedure query answered nothing".to_string(),
        })
    }

    /// Every procedure the leader's manager still records, oldest first.
    pub async fn procedures(&self) -> Result<Vec<pb::ProcedureInfo>> {
        let resp = self
            .with_channel(|channel| async move {
                ProcedureClient::new(channel)
                    .list(pb::ListProceduresRequest {})
                    .await
            })
            .await?;
        Ok(resp.procedures)
    }

    /// Registered nodes with their liveness, as the leader sees them.
    pub async fn nodes(&self) -> Result<Vec<pb::NodeView>> {
        let resp = self
            .with_channel(|channel| async move {
                HeartbeatClient::new(channel)
                    .list_nodes(pb::ListNodesRequest {})
                    .await
            })
            .await?;
        Ok(resp.nodes)
    }

    /// Moves node `id` to `state` (active, draining or decommissioned).
    pub async fn set_node_state(&self, id: u64, state: pb::NodeState) -> Result<pb::NodeView> {
        let req = pb::SetNodeStateRequest {
            node_id: id,
            state: state.into(),
        };
        let resp = self
            .with_channel(|channel| async move {
                HeartbeatClient::new(channel).set_node_state(req).await
            })
            .await?;
        resp.node.ok_or_else(|| Error::Remote {
            code: "Internal".to_string(),
            message: "a node state change answered no node".to_string(),
        })
    }

    /// Removes decommissioned node `id`.
    pub async fn remove_node(&self, id: u64) -> Result<()> {
        self.with_channel(|channel| async move {
            HeartbeatClient::new(channel)
                .remove_node(pb::RemoveNodeRequest { node_id: id })
                .await
        })
        .await
        .map(drop)
    }

    /// Records `token` (made with the cluster secret, see
    /// `common_meta::model::join_token::JoinTokenSigner`) so that its node may join
    /// with it; returns the node it admits and when it expires (ms since the epoch).
    pub async fn register_join_token(&self, token: &str) -> Result<(u64, u64)> {
        let req = pb::RegisterJoinTokenRequest {
            token: token.to_string(),
        };
        let resp = self
            .with_channel(|channel| {
                let req = req.clone();
                async move { HeartbeatClient::new(channel).register_join_token(req).await }
            })
            .await?;
        Ok((resp.node_id, resp.expires_at_ms))
    }

    /// Who leads, as any endpoint knows it: the leader's address (`None` while no
    /// leader is known).
    pub async fn ask_leader(&self) -> Result<Option<String>> {
        let resp = self
            .with_channel(|channel| async move {
                HeartbeatClient::new(channel)
                    .ask_leader(pb::AskLeaderRequest {})
                    .await
            })
            .await?;
        Ok((resp.leader_id != 0 && !resp.leader_addr.is_empty()).then_some(resp.leader_addr))
    }

    /// A channel to member `addr`, learning it as an endpoint if it is new.
    /// A channel to member `addr` with this client's settings (TLS included), for
    /// services this crate does not wrap (etcd's Maintenance, for one).
    pub fn channel_to(&self, addr: &str) -> Result<Conn> {
        Ok(Conn::new(
            channel(addr, &self.inner.options)?,
            self.inner.token.clone(),
        ))
    }

    pub(crate) fn channel_for(&self, addr: &str) -> Option<Conn> {
        let index = self.endpoint_index(addr)?;
        self.inner
            .read_endpoints()
            .get(index)
            .map(|(_, c)| c.clone())
    }

    /// The index of the endpoint named `addr`, adding it when a leader hint names a
    /// member this client was not given (so a client of some members finds them all).
    fn endpoint_index(&self, addr: &str) -> Option<usize> {
        if let Some(i) = self
            .inner
            .read_endpoints()
            .iter()
            .position(|(e, _)| e == addr)
        {
            return Some(i);
        }
        let channel = self.channel_to(addr).ok()?;
        let mut endpoints = self
            .inner
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = endpoints.iter().position(|(e, _)| e == addr) {
            return Some(i);
        }
        endpoints.push((addr.to_string(), channel));
        Some(endpoints.len() - 1)
    }

    /// Runs `call` against the current endpoint until it succeeds, fails otherwise, or
    /// the deadline passes, retrying every transient failure (see
    /// [`MetaClient::with_retry`]). For reads and requests whose retry is harmless.
    pub(crate) async fn with_channel<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.with_retry(Retry::Transient, call)
            .await
            .map_err(|failure| failure.error)
    }

    /// Runs `call` against the current endpoint until it succeeds, fails for good, or
    /// the deadline passes. A failure is sent again as `retry` allows (see [`Retry`]):
    /// on "not leader" it moves to the leader the answer names (`x-metasrv-leader`)
    /// when it knows that endpoint, else to the next endpoint, and backs off after each
    /// full round. The failure says whether any attempt may have applied a write: a
    /// deadline reached after such an attempt is an outcome unknown, not "unavailable".
    pub(crate) async fn with_retry<T, F, Fut>(
        &self,
        retry: Retry,
        call: F,
    ) -> std::result::Result<T, Failure>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let inner = &self.inner;
        let started = Instant::now();
        let mut backoff = inner.options.initial_backoff;
        let mut attempt = 0usize;
        let mut maybe_applied = false;
        // Hints can be stale during an election; follow only a few in a row.
        let mut hint_jumps = 0;
        // A refused token is replaced once per request.
        let mut reauthenticated = false;
        loop {
            let (index, endpoint, channel, count) = {
                let endpoints = inner.read_endpoints();
                let index = inner.current.load(Ordering::Relaxed) % endpoints.len();
                let (endpoint, channel) = endpoints[index].clone();
                (index, endpoint, channel, endpoints.len())
            };
            let status = match self.ensure_token(&channel).await {
                // The request was not sent: whatever the login met, nothing applied.
                Err(mut status) => {
                    status.metadata_mut().insert(
                        meta_proto::OUTCOME,
                        tonic::metadata::MetadataValue::from_static(
                            meta_proto::OUTCOME_NOT_APPLIED,
                        ),
                    );
                    status
                }
                Ok(()) => match call(channel.clone()).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) => status,
                },
            };
            // Refused before anything ran: authenticate again and send it again.
            if status.code() == tonic::Code::Unauthenticated
                && inner.options.credentials.is_some()
                && !reauthenticated
            {
                reauthenticated = true;
                crate::auth::forget(&inner.token);
                continue;
            }
            let outcome = outcome_of(&status);
            match outcome {
                Outcome::Final => {
                    return Err(Failure {
                        error: from_status(&status),
                        maybe_applied,
                    });
                }
                Outcome::Unknown if retry == Retry::NotApplied => {
                    return Err(Failure {
                        error: Error::outcome_unknown(format!(
                            "{endpoint} failed after the write was sent ({}); it may or may not have been applied",
                            status.message()
                        )),
                        maybe_applied: true,
                    });
                }
                Outcome::Unknown => maybe_applied = true,
                Outcome::NotApplied => {}
            }
            attempt += 1;
            tracing::debug!(%endpoint, attempt, error = %status.message(), "endpoint unavailable");
            let hinted = status
                .metadata()
                .get(LEADER_HINT)
                .and_then(|v| v.to_str().ok())
                .and_then(|addr| self.endpoint_index(addr))
                .filter(|&leader| leader != index);
            if let Some(leader) = hinted
                && hint_jumps < 3
            {
                // Straight to the leader, without counting it as a failed round.
                hint_jumps += 1;
                inner.current.store(leader, Ordering::Relaxed);
                attempt -= 1;
                continue;
            }
            hint_jumps = 0;
            // Move on to the next endpoint (unless another request already did).
            let _ = inner.current.compare_exchange(
                index,
                (index + 1) % count,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let elapsed = started.elapsed();
            if elapsed + backoff >= inner.options.deadline {
                let message = format!(
                    "no endpoint of [{}] answered within {:?} ({attempt} attempts); last error from {endpoint}: {}",
                    self.endpoints().join(", "),
                    inner.options.deadline,
                    status.message()
                );
                return Err(Failure {
                    error: Error::Unavailable { message },
                    maybe_applied,
                });
            }
            // Only pause once every endpoint has been tried in this round.
            if attempt.is_multiple_of(count) {
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(inner.options.max_backoff);
            }
        }
    }

    /// Authenticates over `conn` when the options name a user and no token is held.
    /// Requests through this client do it themselves; a stub built on
    /// [`MetaClient::channel_to`] calls it first.
    pub async fn ensure_token(&self, conn: &Conn) -> std::result::Result<(), Status> {
        let inner = &self.inner;
        match &inner.options.credentials {
            Some(credentials) if !inner.token.is_set() => {
                crate::auth::authenticate(conn.clone(), credentials, &inner.token).await
            }
            _ => Ok(()),
        }
    }

    /// Forgets the token when `status` refused it, so the next attempt authenticates
    /// again (for streams, which do not run through the retry loop).
    pub(crate) fn note_refusal(&self, status: &Status) {
        if status.code() == tonic::Code::Unauthenticated {
            crate::auth::forget(&self.inner.token);
        }
    }

    /// The endpoint requests start at: its index, address and channel.
    pub(crate) fn current_endpoint(&self) -> (usize, String, Conn) {
        let endpoints = self.inner.read_endpoints();
        let index = self.inner.current.load(Ordering::Relaxed) % endpoints.len();
        let (endpoint, channel) = endpoints[index].clone();
        (index, endpoint, channel)
    }

    /// Moves on from endpoint `index` after it failed (unless another request already
    /// did).
    pub(crate) fn skip_endpoint(&self, index: usize) {
        let count = self.inner.read_endpoints().len();
        let _ = self.inner.current.compare_exchange(
            index,
            (index + 1) % count,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The shared state of this client and its clones.
    pub(crate) fn inner_ref(&self) -> &Inner {
        &self.inner
    }

    /// A weak handle, for background tasks that must not keep the client alive.
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Inner> {
        Arc::downgrade(&self.inner)
    }

    /// The client behind a weak handle, while it lives.
    pub(crate) fn upgrade(inner: &std::sync::Weak<Inner>) -> Option<MetaClient> {
        inner.upgrade().map(|inner| MetaClient { inner })
    }
}

impl Inner {
    fn read_endpoints(&self) -> std::sync::RwLockReadGuard<'_, Vec<(String, Conn)>> {
        // Only ever pushed to, under the write lock: a poisoned list is still whole.
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A lazily connecting channel to `endpoint` (`host:port` or a full URI).
fn channel(endpoint: &str, options: &MetaClientOptions) -> Result<Channel> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("{scheme}://{endpoint}")
    };
    let mut built = Endpoint::from_shared(uri)
        .map_err(|e| Error::invalid_argument(format!("invalid endpoint {endpoint:?}: {e}")))?;
    if let Some(tls) = &options.tls {
        built = built
            .tls_config(tls.config())
            .map_err(|e| Error::invalid_argument(format!("TLS to {endpoint}: {e}")))?;
    }
    Ok(built
        .connect_timeout(options.connect_timeout)
        .timeout(options.request_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// `base` scaled by a factor in [0.5, 1.0), so that clients that failed together do not
/// retry together.
pub(crate) fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let factor = 0.5 + f64::from(nanos % 1000) / 2000.0;
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d < Duration::from_millis(100),
                "{d:?}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_or_missing_endpoints_are_refused() {
        let none: [&str; 0] = [];
        let err = MetaClient::new(&none, MetaClientOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no endpoints"), "{err}");
        let err = MetaClient::new(&["bad host:1"], MetaClientOptions::default()).unwrap_err();
        assert!(
            err.to_string().contains("invalid endpoint \"bad host:1\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_cluster_fails_as_unavailable_within_the_deadline() {
        // Bind and drop to find a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = MetaClientOptions {
            deadline: Duration::from_millis(400),
            ..MetaClientOptions::default()
        };
        let client = MetaClient::new(&[format!("127.0.0.1:{port}")], options).unwrap();
        let started = Instant::now();
        let err = common_meta::kv::KvBackend::get(&client, b"k")
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("answered within"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the deadline"
        );
    }
}
