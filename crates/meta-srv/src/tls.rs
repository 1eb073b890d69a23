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

use std::path::Path;
use std::sync::Arc;

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
        Ok(Tls {
            server: Some(server),
            peers: Arc::new(PeerTls {
                client: Some(client),
            }),
        })
    }
}
