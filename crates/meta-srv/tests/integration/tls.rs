//! TLS on the gRPC port (tests make their certificates with rcgen): a TLS member
//! serves clients that trust its CA and no others; with mutual TLS a client without a
//! certificate of the cluster's CA is refused; three members replicate over mutual
//! TLS, and a member whose certificate comes from another CA cannot join them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{ClientTls, MetaClient, MetaClientOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use crate::in_process::{Running, start_three, start_with};
use crate::support::{check, wait_until};

/// A test CA that signs leaf certificates into files.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes `{name}.crt`, `{name}.key` (for 127.0.0.1 and localhost, server and
    /// client use) and `{name}-ca.crt` into `dir`; their paths.
    fn leaf(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        self.leaf_with(dir, name, |_| {})
    }

    /// [`Ca::leaf`] for a certificate that expired in 2001.
    fn expired(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        self.leaf_with(dir, name, |params| {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
    }

    fn leaf_with(
        &self,
        dir: &Path,
        name: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        adjust(&mut params);
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let paths = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}-ca.crt")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        std::fs::write(&paths.2, &self.pem).unwrap();
        paths
    }
}

fn client(endpoints: &[String], tls: Option<ClientTls>) -> MetaClient {
    let options = MetaClientOptions {
        deadline: Duration::from_secs(3),
        tls,
        ..MetaClientOptions::default()
    };
    MetaClient::new(endpoints, options).unwrap()
}

/// A put and its read back through `client`.
async fn round_trip(client: &MetaClient, key: &str) -> Result<(), String> {
    client
        .put(PutRequest::new(key, "v"))
        .await
        .map_err(|e| e.to_string())?;
    let read = client
        .range(RangeRequest::key(key))
        .await
        .map_err(|e| e.to_string())?;
    check(read.kvs.len() == 1, || format!("{key} not read back"))
}

async fn tls_member(dir: &Path, ca: &Ca, mutual: bool) -> Running {
    let (cert, key, ca_file) = ca.leaf(dir, "member");
    start_with(move |c| {
        c.tls.cert_file = cert;
        c.tls.key_file = key;
        if mutual {
            c.tls.client_ca_file = ca_file;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_member_serves_clients_that_trust_its_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let server = tls_member(dir.path(), &ca, false).await;
    let endpoints = vec![server.grpc.clone()];
    let (_, _, ca_file) = ca.leaf(dir.path(), "reader");
    let trusted = client(
        &endpoints,
        Some(ClientTls::from_files(&ca_file, None).unwrap()),
    );
    wait_until(Duration::from_secs(20), || round_trip(&trusted, "k1")).await;

    // Plain text to a TLS port, and TLS with another CA: refused, nothing written.
    let plain = client(&endpoints, None);
    assert!(plain.put(PutRequest::new("k2", "v")).await.is_err());
    let other = Ca::new("another CA");
    let (_, _, other_ca) = other.leaf(dir.path(), "stranger");
    let stranger = client(
        &endpoints,
        Some(ClientTls::from_files(&other_ca, None).unwrap()),
    );
    assert!(stranger.put(PutRequest::new("k3", "v")).await.is_err());
    let all = trusted.range(RangeRequest::prefix("k")).await.unwrap();
    assert_eq!(all.kvs.len(), 1, "only the trusted client wrote");

    // metactl with the CA; without it, one line and a non-zero exit.
    let ca_arg = ca_file.to_str().unwrap();
    let (code, out, err) =
        crate::metactl::metactl_async(&server.grpc, &["--cacert", ca_arg, "kv", "get", "k1"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains('v'), "{out}");
    let (code, _, err) = crate::metactl::metactl_async(&server.grpc, &["kv", "get", "k1"]).await;
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let server = tls_member(dir.path(), &ca, true).await;
    let endpoints = vec![server.grpc.clone()];
    let (cert, key, ca_file) = ca.leaf(dir.path(), "app");
    let with_cert = client(
        &endpoints,
        Some(ClientTls::from_files(&ca_file, Some((&cert, &key))).unwrap()),
    );
    wait_until(Duration::from_secs(20), || round_trip(&with_cert, "m1")).await;

    let without = client(
        &endpoints,
        Some(ClientTls::from_files(&ca_file, None).unwrap()),
    );
    assert!(without.put(PutRequest::new("m2", "v")).await.is_err());
    let other = Ca::new("another CA");
    let (cert, key, _) = other.leaf(dir.path(), "intruder");
    let intruder = client(
        &endpoints,
        Some(ClientTls::from_files(&ca_file, Some((&cert, &key))).unwrap()),
    );
    assert!(intruder.put(PutRequest::new("m3", "v")).await.is_err());
    let all = with_cert.range(RangeRequest::prefix("m")).await.unwrap();
    assert_eq!(all.kvs.len(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replicate_over_mutual_tls_and_one_of_another_ca_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let other = Ca::new("another CA");
    // Member 3's certificate is from another CA; it trusts the cluster's CA.
    let files: Vec<(PathBuf, PathBuf, PathBuf)> = (1..=3)
        .map(|id| {
            let signer = if id == 3 { &other } else { &ca };
            let (cert, key, _) = signer.leaf(dir.path(), &format!("member{id}"));
            let (_, _, ca_file) = ca.leaf(dir.path(), &format!("trust{id}"));
            (cert, key, ca_file)
        })
        .collect();
    let members = start_three(move |c| {
        let (cert, key, ca_file) = files[c.node_id as usize - 1].clone();
        c.tls.cert_file = cert;
        c.tls.key_file = key;
        c.tls.ca_file = ca_file.clone();
        c.tls.client_ca_file = ca_file;
        // Read member 3's status over plain HTTP below.
        c.tls.plain_http = true;
    })
    .await;
    let (cert, key, ca_file) = ca.leaf(dir.path(), "app");
    let tls = ClientTls::from_files(&ca_file, Some((&cert, &key))).unwrap();
    let good: Vec<String> = members[..2].iter().map(|m| m.grpc.clone()).collect();
    let writer = client(&good, Some(tls.clone()));
    wait_until(Duration::from_secs(30), || round_trip(&writer, "r1")).await;
    for i in 2..20 {
        writer
            .put(PutRequest::new(format!("r{i}"), "v"))
            .await
            .unwrap();
    }
    // Both members of the cluster's CA hold every write; member 3 holds none.
    for member in &members[..2] {
        let one = client(std::slice::from_ref(&member.grpc), Some(tls.clone()));
        wait_until(Duration::from_secs(10), || async {
            let status = one.status().await.map_err(|e| e.to_string())?;
            check(status.applied_index >= 20, || format!("{status:?}"))
        })
        .await;
    }
    let stranger_client = client(std::slice::from_ref(&members[2].grpc), Some(tls.clone()));
    let seen = stranger_client.status().await;
    assert!(
        seen.is_err(),
        "member 3's certificate is not of the cluster's CA, so this client refuses it too"
    );
    let http = crate::in_process::http_get(&members[2].http, "/status").await;
    let body: serde_json::Value =
        serde_json::from_str(http.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert!(
        body["applied_index"].as_u64().unwrap() < 20,
        "member 3 received the log: {body}"
    );
    for member in members {
        member.shutdown().await;
    }
}

/// A GET over HTTPS trusting `ca` (and presenting `identity`); the whole response, or
/// why there is none.
async fn https_get(
    addr: &str,
    path: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut response))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| format!("reading: {e}"))?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_serves_https_with_the_members_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let server = tls_member(dir.path(), &ca, false).await;
    let (_, _, ca_file) = ca.leaf(dir.path(), "scraper");
    let health = https_get(&server.http, "/health", &ca_file, None)
        .await
        .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = https_get(&server.http, "/metrics", &ca_file, None)
        .await
        .unwrap();
    assert!(metrics.contains("metasrv_raft_term"), "{metrics}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = tokio::time::timeout(
        Duration::from_secs(15),
        crate::in_process::http_raw(&server.http, "/health"),
    )
    .await
    .expect("the port closes a plain-text connection");
    assert!(!plain.starts_with("HTTP/1.1 200"), "{plain}");
    // A client trusting another CA does not get through the handshake.
    let other = Ca::new("another CA");
    let (_, _, other_ca) = other.leaf(dir.path(), "stranger");
    let err = https_get(&server.http, "/health", &other_ca, None)
        .await
        .unwrap_err();
    assert!(err.contains("handshake"), "{err}");
    server.shutdown().await;

    // `plain_http` keeps the port plain text beside a TLS gRPC port.
    let (cert, key, _) = ca.leaf(dir.path(), "member2");
    let plain_member = start_with(move |c| {
        c.tls.cert_file = cert;
        c.tls.key_file = key;
        c.tls.plain_http = true;
    })
    .await;
    let health = crate::in_process::http_get(&plain_member.http, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    plain_member.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_are_refused_on_both_ports() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let server = tls_member(dir.path(), &ca, true).await;
    let (cert, key, ca_file) = ca.leaf(dir.path(), "app");
    let (old_cert, old_key, _) = ca.expired(dir.path(), "old");
    // gRPC: a client presenting an expired certificate of the right CA is refused.
    let current = client(
        std::slice::from_ref(&server.grpc),
        Some(ClientTls::from_files(&ca_file, Some((&cert, &key))).unwrap()),
    );
    wait_until(Duration::from_secs(20), || round_trip(&current, "e1")).await;
    let expired = client(
        std::slice::from_ref(&server.grpc),
        Some(ClientTls::from_files(&ca_file, Some((&old_cert, &old_key))).unwrap()),
    );
    assert!(expired.put(PutRequest::new("e2", "v")).await.is_err());
    let all = current.range(RangeRequest::prefix("e")).await.unwrap();
    assert_eq!(all.kvs.len(), 1, "the expired client wrote nothing");
    // HTTPS under mutual TLS: the current certificate gets in, the expired one and
    // none do not.
    let ok = https_get(&server.http, "/health", &ca_file, Some((&cert, &key)))
        .await
        .unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    for identity in [Some((old_cert.as_path(), old_key.as_path())), None] {
        let answer = https_get(&server.http, "/health", &ca_file, identity).await;
        assert!(
            !answer
                .as_deref()
                .is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
            "{answer:?}"
        );
    }
    server.shutdown().await;

    // A member serving an expired certificate: clients refuse it.
    let (old_cert, old_key, ca_file) = ca.expired(dir.path(), "stale-member");
    let stale = start_with(move |c| {
        c.tls.cert_file = old_cert;
        c.tls.key_file = old_key;
    })
    .await;
    let careful = client(
        std::slice::from_ref(&stale.grpc),
        Some(ClientTls::from_files(&ca_file, None).unwrap()),
    );
    let err = careful.put(PutRequest::new("s", "v")).await.unwrap_err();
    assert!(!err.to_string().is_empty());
    stale.shutdown().await;
}
