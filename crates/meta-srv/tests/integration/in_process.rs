//! A server started in-process: the KV conformance suite through meta-client, HTTP
//! health, request-size limits on the wire, and graceful shutdown.

use std::time::Duration;

use common_meta::kv::conformance;
use common_meta::kv::{KvBackend, KvLimits, PutRequest};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;
use meta_srv::{Config, MetaSrv};
use tokio::sync::oneshot;

pub struct Running {
    pub grpc: String,
    pub http: String,
    pub plane: std::sync::Arc<meta_srv::cluster_plane::heartbeat_chain::ClusterPlane>,
    pub snapshots: std::sync::Arc<meta_srv::raft::snapshot::SnapshotFiles>,
    /// The member's raft driver (fault injection).
    pub driver: meta_srv::raft::driver::DriverHandle,
    /// The member's timestamp oracle (its clock can be stepped).
    pub tso: std::sync::Arc<meta_srv::tso::Oracle>,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<meta_srv::Result<()>>,
    _dir: tempfile::TempDir,
}

pub async fn start() -> Running {
    start_with(|_| {}).await
}

/// Starts a server on ephemeral ports after `adjust` changed its configuration.
pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().join("data"),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    adjust(&mut config);
    let server = MetaSrv::bind(config).await.unwrap();
    let plane = server.cluster_plane();
    let snapshots = server.snapshot_files();
    let driver = server.raft_driver();
    let tso = server.tso();
    let (grpc, http) = (
        server.grpc_addr().to_string(),
        server.http_addr().to_string(),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Running {
        grpc,
        http,
        plane,
        snapshots,
        driver,
        tso,
        stop,
        served,
        _dir: dir,
    }
}

/// Three in-process members on loopback ports (heartbeat interval 100 ms), each
/// configured further by `adjust`.
pub async fn start_three(adjust: impl Fn(&mut Config) + Clone + Send + 'static) -> Vec<Running> {
    let ports = crate::cluster_process::free_ports();
    let initial = initial_cluster(&ports);
    let mut members = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (initial, adjust) = (initial.clone(), adjust.clone());
        members.push(
            start_with(move |c| {
                c.node_id = i as u64 + 1;
                c.listen_addr = format!("127.0.0.1:{port}").parse().unwrap();
                c.initial_cluster = initial;
                c.heartbeat_interval_ms = 100;
                adjust(c);
            })
            .await,
        );
    }
    members
}

/// The `--initial-cluster` of members 1, 2, ... on loopback `ports`.
pub fn initial_cluster(ports: &[u16]) -> String {
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// The index of the member all of `members` agree leads.
pub async fn leader_of(members: &[Running]) -> usize {
    crate::support::wait_until(Duration::from_secs(30), || async {
        let mut seen = std::collections::BTreeSet::new();
        for m in members {
            let client = MetaClient::new(&[&m.grpc], MetaClientOptions::default()).unwrap();
            seen.insert(client.status().await.map_or(0, |s| s.leader_id));
        }
        match seen.iter().copied().collect::<Vec<_>>()[..] {
            [leader] if leader != 0 => Ok(leader as usize - 1),
            _ => Err(format!("no agreed leader: {seen:?}")),
        }
    })
    .await
}

impl Running {
    pub async fn shutdown(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.served)
            .await
            .expect("server stops within 20s")
            .unwrap()
            .unwrap();
    }
}

/// Starts a server, writes once, makes its driver suffer `fault`, and returns how
/// `serve` ended.
async fn serve_until_fault(fault: meta_srv::raft::driver::Fault) -> meta_srv::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let server = MetaSrv::bind(config).await.unwrap();
    let driver = server.raft_driver();
    let grpc = server.grpc_addr().to_string();
    let served = tokio::spawn(server.serve(std::future::pending()));
    let client = MetaClient::new(&[&grpc], MetaClientOptions::default()).unwrap();
    client
        .put(PutRequest::new(b"before".to_vec(), b"1".to_vec()))
        .await
        .unwrap();
    driver
        .send(meta_srv::raft::driver::Command::InjectFault(fault))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), served)
        .await
        .expect("a failed member stops serving by itself")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_failure_or_a_panic_stops_the_server_with_its_reason() {
    use meta_srv::raft::driver::Fault;
    for (fault, reason) in [
        (Fault::StorageError, "injected storage failure"),
        (Fault::Panic, "panicked: injected panic"),
    ] {
        let err = serve_until_fault(fault).await.unwrap_err();
        assert!(matches!(err, meta_srv::Error::Failed { .. }), "{err}");
        assert!(err.to_string().contains(reason), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_backend_passes_conformance() {
    let server = start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    conformance::run_all(&client).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_skips_dead_endpoints() {
    let server = start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = MetaClient::new(
        &[dead.to_string(), server.grpc.clone()],
        MetaClientOptions::default(),
    )
    .unwrap();
    let put = client.put(PutRequest::new("k", "v")).await.unwrap();
    assert_eq!(put.revision, 1);
    assert_eq!(client.get(b"k").await.unwrap().unwrap().value, b"v");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_wire_request_is_invalid_argument_naming_the_limit() {
    let server = start().await;
    let mut raw = pb::store_client::StoreClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    // Many keys within every per-item limit, adding up to more than max_request_bytes.
    let limits = KvLimits::default();
    let value = vec![7u8; 64 * 1024];
    let kvs = (0..(limits.max_request_bytes / value.len() + 1))
        .map(|i| pb::KeyValuePair {
            key: format!("big/{i}").into_bytes(),
            value: value.clone(),
        })
        .collect();
    let status = raw
        .batch_put(pb::BatchPutRequest {
            kvs,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("max_request_bytes"),
        "{}",
        status.message()
    );

    let malformed = raw
        .txn(pb::TxnRequest {
            success: vec![pb::TxnOp { op: None }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), tonic::Code::InvalidArgument);
    assert!(
        malformed.message().contains("txn op has no operation"),
        "{}",
        malformed.message()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_with_json() {
    let server = start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    client.put(PutRequest::new("h", "1")).await.unwrap();
    let body = http_get(&server.http, "/health").await;
    let (head, json) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["status"], "ok");
    assert_eq!(json["member_id"], 1);
    assert_eq!(json["revision"], 1);

    let body = http_get(&server.http, "/status").await;
    let (head, json) = body.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["role"], "leader");
    assert_eq!(json["members"][0]["id"], 1);
    assert_eq!(json["members"][0]["role"], "voter");
    assert_eq!(json["revision"], 1);
    server.shutdown().await;
}

/// A plain-text GET that tolerates a port that does not speak HTTP: whatever came
/// back before the connection closed (empty when nothing did).
pub async fn http_raw(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// A minimal HTTP/1.1 GET, so the tests need no HTTP client crate.
pub async fn http_get(addr: &str, path: &str) -> String {
    http_request(addr, "GET", path, None).await
}

/// A minimal HTTP/1.1 request with an optional JSON body; the whole response.
pub async fn http_request(addr: &str, method: &str, path: &str, json: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json.unwrap_or("");
    let kind = if json.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response within 10s")
    .unwrap();
    response
}
