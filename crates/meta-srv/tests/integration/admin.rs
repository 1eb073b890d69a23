//! The HTTP admin API: `GET /metrics` after a known workload (the counts match what
//! was done, errors are counted by code, a follower reports what it knows), and the
//! admin views on the leader and on a follower.

use common_meta::kv::{KvBackend, PutRequest};
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;
use meta_proto::v1::store_client::StoreClient;

use crate::in_process::{http_get, leader_of, start_three, start_with};

/// The body of `GET /metrics`.
async fn scrape(http: &str) -> String {
    let answer = http_get(http, "/metrics").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of the sample named exactly `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload() {
    let server = start_with(|_| {}).await;
    leader_of(std::slice::from_ref(&server)).await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    for i in 0..25 {
        client
            .put(PutRequest::new(format!("k{i:02}"), "v"))
            .await
            .unwrap();
    }
    // One bad request, straight on the wire: an empty key.
    let mut raw = StoreClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let refused = raw
        .put(pb::PutRequest {
            key: Vec::new(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // Two leases: one revoked, one left.
    let kept = client.lease_grant(60, 0).await.unwrap();
    let gone = client.lease_grant(60, 0).await.unwrap();
    client.lease_revoke(gone.id).await.unwrap();
    assert_ne!(kept.id, gone.id);

    let text = scrape(&server.http).await;
    let at =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(at("metasrv_kv_keys"), 25.0);
    assert_eq!(at("metasrv_kv_revision"), 25.0);
    assert_eq!(
        at(r#"metasrv_grpc_requests_total{method="Put",service="meta.v1.Store"}"#),
        26.0,
        "25 puts and the refused one"
    );
    assert_eq!(
        at(
            r#"metasrv_grpc_errors_total{code="InvalidArgument",method="Put",service="meta.v1.Store"}"#
        ),
        1.0
    );
    assert_eq!(
        at(r#"metasrv_grpc_request_seconds_count{method="Put",service="meta.v1.Store"}"#),
        26.0
    );
    // The puts, and the client's session opened for them, each proposed once.
    assert!(at("metasrv_raft_proposals_total") >= 26.0);
    assert_eq!(at("metasrv_raft_is_leader"), 1.0);
    assert!(at("metasrv_raft_applied_index") >= 26.0);
    assert!(at("metasrv_raft_fsync_seconds_count") >= 1.0);
    assert!(at("metasrv_raft_apply_seconds_count") >= 1.0);
    assert_eq!(at(r#"metasrv_raft_members{role="voter"}"#), 1.0);
    assert!(at("metasrv_kv_db_size_bytes") > 0.0);
    assert_eq!(at("metasrv_leases"), 1.0);
    assert_eq!(at("metasrv_leases_expired_total"), 0.0, "none ran out");
    assert_eq!(at("metasrv_auth_enabled"), 0.0);
    server.shutdown().await;
}

/// Status code and JSON body of `GET path`.
async fn get_json(http: &str, path: &str) -> (u16, serde_json::Value) {
    let answer = http_get(http, path).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reports_its_own_view() {
    let members = start_three(|c| c.cluster_secret = "a-secret-of-enough-bytes".to_string()).await;
    let leader = leader_of(&members).await;
    let follower = (leader + 1) % 3;
    let text = scrape(&members[follower].http).await;
    assert_eq!(sample(&text, "metasrv_raft_is_leader"), Some(0.0));
    assert!(sample(&text, "metasrv_raft_term").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, r#"metasrv_raft_members{role="voter"}"#),
        Some(3.0)
    );
    assert!(
        !text.contains("metasrv_nodes{"),
        "nodes are the leader's knowledge"
    );
    let text = scrape(&members[leader].http).await;
    assert_eq!(sample(&text, "metasrv_raft_is_leader"), Some(1.0));
    assert!(sample(&text, "metasrv_raft_leader_changes_total").unwrap() >= 1.0);

    // The admin views: the same leader from both, procedures only at the leader.
    let (lead, fol) = (&members[leader].http, &members[follower].http);
    for http in [lead, fol] {
        let (code, view) = get_json(http, "/leader").await;
        assert_eq!(code, 200);
        assert_eq!(view["leader_id"], leader as u64 + 1);
        assert_eq!(view["leading"], http == lead);
        let (code, all) = get_json(http, "/members").await;
        assert_eq!(code, 200);
        let all = all.as_array().unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().filter(|m| m["leader"] == true).count(), 1);
    }
    let (code, list) = get_json(lead, "/procedures").await;
    assert_eq!(code, 200);
    assert!(list.is_array(), "{list}");
    let (code, missing) = get_json(lead, "/procedures/no-such-id").await;
    assert_eq!(
        (code, missing["error"].as_str()),
        (404, Some("procedure no-such-id not found"))
    );
    let (code, refused) = get_json(fol, "/procedures").await;
    assert_eq!(code, 503);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains(&format!("member {}", leader + 1)),
        "{refused}"
    );
    let (code, config) = get_json(fol, "/config").await;
    assert_eq!(code, 200);
    assert_eq!(config["cluster_secret"], "<redacted>");
    assert_eq!(config["node_id"], follower as u64 + 1);
    assert!(!config.to_string().contains("a-secret-of-enough-bytes"));
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_are_paused_by_hand_and_posts_need_root_once_auth_is_on() {
    use base64::Engine as _;
    let server = crate::in_process::start().await;
    let http = &server.http;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    client
        .create_database("greptime", "paused", Vec::new(), false)
        .await
        .unwrap();
    let (_, list) = get_json(http, "/procedures").await;
    let done = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["state"] == "done")
        .expect("the create-database procedure is on record")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        crate::in_process::http_request(http, "POST", "/procedures/nope/pause", None)
            .await
            .split(' ')
            .nth(1),
        Some("404")
    );
    let finished =
        crate::in_process::http_request(http, "POST", &format!("/procedures/{done}/pause"), None)
            .await;
    assert!(
        finished.starts_with("HTTP/1.1 409") && finished.contains("already finished"),
        "{finished}"
    );

    // Auth on: a POST needs a root user (Basic or Bearer), GETs stay open.
    let mut auth = crate::auth::auth_client(&server.grpc).await;
    let root = crate::auth::enable(&mut auth).await;
    crate::auth::user_with(
        &mut auth,
        &root,
        "ops",
        "ops/",
        meta_proto::etcd::authpb::permission::Type::Readwrite,
    )
    .await;
    let post = |authorization: Option<String>| {
        let http = http.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&http).await.unwrap();
            let body = r#"{"enabled": true}"#;
            let header = authorization
                .map(|a| format!("Authorization: {a}\r\n"))
                .unwrap_or_default();
            let request = format!(
                "POST /maintenance HTTP/1.1\r\nHost: {http}\r\n{header}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        }
    };
    let basic = |credentials: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    };
    for (authorization, code) in [
        (None, "401"),
        (Some(basic("root:wrong")), "401"),
        (Some("Bearer forged".to_string()), "401"),
        (Some(basic("ops:pw")), "403"),
    ] {
        let answer = post(authorization.clone()).await;
        assert_eq!(
            answer.split(' ').nth(1),
            Some(code),
            "{authorization:?}: {answer}"
        );
    }
    let (_, maintenance) = get_json(http, "/maintenance").await;
    assert_eq!(
        maintenance["maintenance"], false,
        "no refused POST changed anything"
    );
    let answer = post(Some(basic(&format!("root:{}", crate::auth::ROOT_PASSWORD)))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = post(Some(format!("Bearer {root}"))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, maintenance) = get_json(http, "/maintenance").await;
    assert_eq!(maintenance["maintenance"], true);
    server.shutdown().await;
}
