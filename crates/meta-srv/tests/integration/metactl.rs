//! The `metactl` binary against a real server.

use std::process::Command;
use std::time::Duration;

use crate::support::{ServerProcess, run_bounded};

const DEADLINE: Duration = Duration::from_secs(30);

fn metactl(endpoint: &str, args: &[&str]) -> (Option<i32>, String, String) {
    metactl_with(endpoint, args, &[])
}

/// `metactl` with extra environment variables.
fn metactl_with(
    endpoint: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_metactl"));
    command
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .env_remove("METACTL_ENDPOINTS")
        .env_remove("METASRV_CLUSTER_SECRET")
        .envs(env.iter().copied());
    let (status, out, err) = run_bounded(command, DEADLINE);
    (status.code(), out, err)
}

#[test]
fn kv_commands_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let ep = server.grpc.as_str();

    assert_eq!(
        metactl(ep, &["kv", "put", "a", "1"]),
        (Some(0), "OK\n".into(), String::new())
    );
    assert_eq!(
        metactl(ep, &["kv", "get", "a"]),
        (Some(0), "1\n".into(), String::new())
    );
    metactl(ep, &["kv", "put", "app/x", "hello world"]);
    metactl(ep, &["kv", "put", "app/y", "2"]);

    let (code, out, _) = metactl(ep, &["kv", "range", "app/"]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "app/x hello world\napp/y 2\n")
    );
    let (_, out, _) = metactl(ep, &["kv", "range", "app/", "--limit", "1"]);
    assert_eq!(out, "app/x hello world\n");

    let (code, out, _) = metactl(ep, &["--output", "json", "kv", "get", "app/y"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["value"], "2");
    assert_eq!(json["version"], 1);
    assert_eq!(json["create_revision"], 3);

    let (_, out, _) = metactl(ep, &["kv", "range", "", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["count"], 3, "an empty prefix lists every key");

    let (_, out, _) = metactl(ep, &["kv", "get", "app/y", "--serializable"]);
    assert_eq!(
        out, "2\n",
        "a serializable read sees the write too on a single member"
    );

    let (code, out, _) = metactl(ep, &["status", "--output", "json"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["role"], "leader");
    assert_eq!(json["member_id"], 1);
    assert_eq!(json["leader_id"], 1);
    assert_eq!(json["members"][0]["addr"], ep);
    assert!(json["applied_index"].as_u64().unwrap() >= 4);
    let (_, out, _) = metactl(ep, &["status"]);
    assert!(out.contains("member:   1 (leader)"), "{out}");

    let (code, out, _) = metactl(ep, &["procedure", "list", "--output", "json"]);
    assert_eq!(code, Some(0), "the leader runs a procedure manager");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["procedures"], serde_json::json!([]));
    let (code, _, err) = metactl(ep, &["procedure", "show", "nope"]);
    assert_eq!(
        (code, err.as_str()),
        (Some(1), "not found: procedure nope\n")
    );

    assert_eq!(metactl(ep, &["kv", "del", "a"]).1, "1\n");
    let (code, out, err) = metactl(ep, &["kv", "get", "a"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (Some(1), "", "not found: a\n")
    );
    assert_eq!(metactl(ep, &["kv", "del", "a"]).1, "0\n");
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let long_key = "k".repeat(9000);
    let (code, _, err) = metactl(&server.grpc, &["kv", "put", &long_key, "v"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: invalid argument: key of 9000 bytes exceeds max_key_bytes (8192)"),
        "{err}"
    );

    let (code, _, err) = metactl(&server.grpc, &["kv", "frobnicate"]);
    assert_eq!(code, Some(2), "usage error");
    assert_eq!(err.lines().count(), 1, "{err}");

    drop(server);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, _, err) = metactl(&dead, &["kv", "get", "a"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: unavailable"), "{err}");
}

#[test]
fn token_create_prints_a_token_for_the_node() {
    let dir = tempfile::tempdir().unwrap();
    const SECRET: &str = "a secret of at least sixteen bytes";
    let mut command = crate::support::meta_srv_command(dir.path());
    command.env("METASRV_CLUSTER_SECRET", SECRET);
    let server = ServerProcess::spawn(command);
    let ep = server.grpc.as_str();
    let with_secret = [("METASRV_CLUSTER_SECRET", SECRET)];
    let metactl = |ep: &str, args: &[&str]| metactl_with(ep, args, &with_secret);

    let (code, _, err) = metactl_with(ep, &["token", "create", "--node", "7"], &[]);
    assert_eq!((code, err.lines().count()), (Some(2), 1), "{err}");
    assert!(
        err.contains("--cluster-secret"),
        "the secret is required: {err}"
    );
    let (code, _, err) = metactl_with(
        ep,
        &["token", "create", "--node", "7"],
        &[("METASRV_CLUSTER_SECRET", "another cluster's secret")],
    );
    assert_eq!((code, err.lines().count()), (Some(1), 1), "{err}");
    assert!(err.contains("not valid for this cluster"), "{err}");

    let (code, out, err) = metactl(ep, &["token", "create", "--node", "7", "--ttl", "10m"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("mjt1.7."), "{out}");

    let (code, out, _) = metactl(ep, &["--output", "json", "token", "create", "--node", "8"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["node_id"], 8);
    assert!(json["token"].as_str().unwrap().starts_with("mjt1.8."));
    let now_ms = common_meta::time::unix_ms();
    let expires = json["expires_at_ms"].as_u64().unwrap();
    assert!(
        expires > now_ms && expires <= now_ms + 600_000,
        "default ttl 10m: {expires}"
    );

    let (code, _, err) = metactl(ep, &["token", "create", "--node", "7", "--ttl", "5y"]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown unit"), "{err}");
    let (code, _, err) = metactl(ep, &["token", "create", "--node", "0"]);
    assert_eq!((code, err.lines().count()), (Some(1), 1), "{err}");
    assert!(err.contains("node ids start at 1"), "{err}");
    drop(server);

    let plain = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(plain.path());
    let (code, _, err) = metactl(&server.grpc, &["token", "create", "--node", "7"]);
    assert_eq!((code, err.lines().count()), (Some(1), 1), "{err}");
    assert!(err.contains("join tokens are off"), "{err}");
}
