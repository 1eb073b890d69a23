//! TLS on the gRPC port, which clients and the other members share (`[tls]`,
//! `--tls-cert`, `--tls-key`, `--tls-ca`, `--tls-client-ca`). Off by default: the
//! embedded single-member start stays plain text.
//!
//! - The member serves its certificate and key.
//! - With `client_ca_file`, every connection must present a certificate signed by that
//!   CA (mutual TLS): clients and the other members alike.
//! - As a client of the other members (raft messages, snapshots, forwarded etcd
//!   requests) it verifies them with `ca_file` (or the client CA when only that is
//!   set) and presents its own certificate, so a member whose certificate comes from
//!   another CA cannot join.
//! - The HTTP port (admin API, metrics, dashboard) serves HTTPS with the same
//!   certificate, asking for a client certificate when `client_ca_file` is set,
//!   unless `plain_http` keeps it plain text ([`HttpsListener`]).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::TlsConfig;
use crate::error::{Error, Result};

/// How this member connects to the other members.
#[derive(Debug, Clone, Default)]
pub struct PeerTls {
    client: Option<ClientTlsConfig>,
}

impl PeerTls {
    /// Plain text to peers.
    pub fn plain() -> Arc<PeerTls> {
        Arc::new(PeerTls::default())
    }

    /// An endpoint for member address `addr` (`HOST:PORT`), over TLS when on.
    pub fn endpoint(&self, addr: &str) -> std::result::Result<Endpoint, String> {
        let scheme = if self.client.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("member address {addr:?}: {e}"))?;
        match &self.client {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("TLS to {addr}: {e}")),
            None => Ok(endpoint),
        }
    }
}

/// The member's TLS, loaded from its files.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// What the gRPC port serves with (None: plain text).
    pub server: Option<ServerTlsConfig>,
    /// How it reaches the other members.
    pub peers: Arc<PeerTls>,
    /// What the HTTP port serves with (None: plain text).
    pub http: Option<Arc<rustls::ServerConfig>>,
}

fn invalid(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        context: format!("reading the TLS {what} {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// The HTTP port's rustls configuration: the member's certificate and key, and, with
/// a client CA, a client certificate of that CA required.
fn http_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| invalid("certificate", &config.cert_file, e))?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| invalid("key", &config.key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("certificate", &config.cert_file, e))?;
    let builder = if config.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&config.client_ca_file)
            .map_err(|e| invalid("client CA", &config.client_ca_file, e))?
        {
            let ca = ca.map_err(|e| invalid("client CA", &config.client_ca_file, e))?;
            roots
                .add(ca)
                .map_err(|e| invalid("client CA", &config.client_ca_file, e))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("client CA", &config.client_ca_file, e))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("certificate and key", &config.cert_file, e))?;
    // Browsers and scrapers speak HTTP/1.1; the admin API needs nothing more.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// How long a client may take over its TLS handshake on the HTTP port.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The HTTP port's listener under TLS: connections are accepted and their handshakes
/// run on their own tasks, so a slow or failing client holds up no other; the server
/// gets only the connections whose handshake succeeded.
pub struct HttpsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

impl HttpsListener {
    /// Serves TLS with `config` on `listener`.
    pub fn new(
        listener: tokio::net::TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (done, ready) = tokio::sync::mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => drop(done.send((tls, peer)).await),
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(HttpsListener {
            ready,
            local,
            accepting,
        })
    }
}

impl Drop for HttpsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task holds a sender until it is aborted with this
            // listener: no connection comes any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        context: format!("reading the TLS {what} {}", path.display()),
        source,
    })
}

impl Tls {
    /// Reads the files `config` names (nothing when TLS is off).
    pub fn load(config: &TlsConfig) -> Result<Tls> {
        if !config.enabled() {
            return Ok(Tls::default());
        }
        let cert = read(&config.cert_file, "certificate")?;
        let key = read(&config.key_file, "key")?;
        let identity = Identity::from_pem(&cert, &key);
        let mut server = ServerTlsConfig::new().identity(identity.clone());
        let client_ca = match config.client_ca_file.as_os_str().is_empty() {
            true => None,
            false => Some(read(&config.client_ca_file, "client CA")?),
        };
        if let Some(ca) = &client_ca {
            server = server.client_ca_root(Certificate::from_pem(ca));
        }
        let peer_ca = match config.ca_file.as_os_str().is_empty() {
            true => client_ca,
            false => Some(read(&config.ca_file, "CA")?),
        };
        let mut client = ClientTlsConfig::new().identity(identity);
        if let Some(ca) = peer_ca {
            client = client.ca_certificate(Certificate::from_pem(ca));
        }
        let http = match config.plain_http {
            true => None,
            false => Some(http_config(config)?),
        };
        Ok(Tls {
            server: Some(server),
            peers: Arc::new(PeerTls {
                client: Some(client),
            }),
            http,
        })
    }
}
