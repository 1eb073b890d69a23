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

fn revision_of(json: &str) -> i64 {
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    value["revision"].as_i64().unwrap()
}

#[test]
fn kv_watch_prints_changes_as_they_happen_and_history_reads_and_compaction_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let ep = server.grpc.clone();
    let json = |args: &[&str]| {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let (code, out, err) = metactl(&ep, &all);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        out
    };
    let r1 = revision_of(&json(&["kv", "put", "h", "1"]));
    let r2 = revision_of(&json(&["kv", "put", "h", "2"]));
    assert_eq!(
        metactl(&ep, &["kv", "get", "h", "--rev", &r1.to_string()]).1,
        "1\n"
    );
    assert_eq!(metactl(&ep, &["kv", "get", "h"]).1, "2\n");

    // Another terminal watches from the next revision on while these writes happen.
    let from = r2 + 1;
    let watcher = {
        let mut command = Command::new(env!("CARGO_BIN_EXE_metactl"));
        command
            .args(["--endpoints", &ep, "kv", "watch", "w/", "--prefix"])
            .args(["--rev", &from.to_string(), "--count", "3"])
            .env_remove("METACTL_ENDPOINTS");
        std::thread::spawn(move || run_bounded(command, DEADLINE))
    };
    metactl(&ep, &["kv", "put", "w/a", "1"]);
    metactl(&ep, &["kv", "put", "w/b", "two words"]);
    metactl(&ep, &["kv", "del", "w/a"]);
    let (status, out, err) = watcher.join().unwrap();
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!(
            "PUT w/a 1 {}\nPUT w/b two words {}\nDELETE w/a {}\n",
            from,
            from + 1,
            from + 2
        )
    );

    // Compaction: reads and watches below it fail with one line naming it.
    assert_eq!(
        metactl(&ep, &["kv", "compact", &r2.to_string()]),
        (Some(0), format!("compacted at {r2}\n"), String::new())
    );
    let (r1, r2) = (r1.to_string(), r2.to_string());
    for args in [
        vec!["kv", "get", "h", "--rev", &r1],
        vec!["kv", "compact", &r2],
        vec!["kv", "watch", "h", "--rev", &r1, "--count", "1"],
    ] {
        let (code, out, err) = metactl(&ep, &args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("compacted"), "{args:?}: {err}");
    }
    let future = (r2.parse::<i64>().unwrap() + 1000).to_string();
    let (code, _, err) = metactl(&ep, &["kv", "get", "h", "--rev", &future]);
    assert_eq!(code, Some(1));
    assert!(err.contains("future revision"), "{err}");
}

#[test]
fn lease_commands_grant_attach_inspect_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let ep = server.grpc.as_str();
    let (code, out, err) = metactl(ep, &["lease", "grant", "60"]);
    assert_eq!(code, Some(0), "{err}");
    let id = out.trim().to_string();
    assert!(id.parse::<i64>().unwrap() > 0, "{out}");
    assert_eq!(
        metactl(ep, &["kv", "put", "session/a", "x", "--lease", &id]),
        (Some(0), "OK\n".into(), String::new())
    );
    let (code, out, _) = metactl(ep, &["lease", "ttl", &id, "--keys"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("of its 60 s TTL; keys: [session/a]"), "{out}");
    let (code, out, _) = metactl(ep, &["lease", "keep-alive", &id, "--once"]);
    assert_eq!(
        (code, out),
        (Some(0), format!("lease {id} kept alive with TTL 60\n"))
    );
    let (_, out, _) = metactl(ep, &["lease", "list"]);
    assert!(out.lines().any(|l| l == id), "{out}");
    assert_eq!(
        metactl(ep, &["lease", "revoke", &id]),
        (Some(0), format!("lease {id} revoked\n"), String::new())
    );
    let (code, _, err) = metactl(ep, &["kv", "get", "session/a"]);
    assert_eq!(code, Some(1), "the attached key went with the lease");
    assert_eq!(err, "not found: session/a\n");

    // Bad input: one line each, exit 1.
    for (args, says) in [
        (
            vec!["kv", "put", "k", "v", "--lease", "12345"],
            "lease 12345 not found",
        ),
        (vec!["lease", "revoke", &id], "not found"),
        (vec!["lease", "keep-alive", &id, "--once"], "not found"),
        (vec!["lease", "ttl", &id], "not found: lease"),
        (vec!["lease", "grant", "-5"], "negative"),
        (vec!["lease", "grant", "99999999999"], "too large"),
    ] {
        let (code, out, err) = metactl(ep, &args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
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

/// `metactl` off the async test's threads (it is a blocking child process).
pub(crate) async fn metactl_async(endpoint: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let endpoint = endpoint.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        metactl(&endpoint, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_creates_a_database_and_a_table_sees_its_route_and_drops_it() {
    let server = crate::ddl::server().await;
    let ep = server.grpc.clone();
    let sim = crate::ddl::datanodes(std::slice::from_ref(&ep), 3).await;

    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "stdout {out:?} stderr {err:?}");
        out
    };
    let out = ok(metactl_async(&ep, &["db", "list"]).await);
    assert_eq!(
        out, "greptime.public\n",
        "the default schema exists from the start"
    );
    let out = ok(metactl_async(&ep, &["db", "create", "metrics", "--option", "ttl=7d"]).await);
    assert_eq!(out, "database greptime.metrics created\n");

    let out = ok(metactl_async(
        &ep,
        &["table", "create", "greptime.metrics.cpu", "--regions", "3"],
    )
    .await);
    assert!(
        out.starts_with("table greptime.metrics.cpu created with id 1024"),
        "{out}"
    );
    let out = ok(metactl_async(&ep, &["table", "route", "greptime.metrics.cpu"]).await);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[1].starts_with("1024.0 leader "), "{out}");
    assert!(lines[1].ends_with(" serving"), "{out}");
    let leaders: std::collections::BTreeSet<&str> = lines[1..]
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap())
        .collect();
    assert_eq!(leaders.len(), 3, "one region per datanode: {out}");

    let out = ok(metactl_async(&ep, &["--output", "json", "table", "show", "metrics.cpu"]).await);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["info"]["id"], 1024);
    assert_eq!(json["info"]["columns"][1]["name"], "ts");
    assert_eq!(json["route"]["regions"].as_array().unwrap().len(), 3);

    let out = ok(metactl_async(
        &ep,
        &[
            "table",
            "alter",
            "metrics.cpu",
            "--add-column",
            "region:string:tag",
        ],
    )
    .await);
    assert_eq!(out, "table greptime.metrics.cpu altered (version 1)\n");
    let out = ok(metactl_async(&ep, &["table", "list", "metrics"]).await);
    assert_eq!(out, "1024 greptime.metrics.cpu regions 3\n");

    // A schema file gives the columns.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schema.json");
    std::fs::write(
        &file,
        r#"{"columns":[{"name":"ts","data_type":"timestamp_ms","semantic_type":"timestamp"}],"time_index":"ts"}"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let out = ok(metactl_async(&ep, &["table", "create", "events", "--schema-file", file]).await);
    assert!(
        out.starts_with("table greptime.public.events created"),
        "{out}"
    );

    // Bad input: one line on stderr, exit 1, nothing created.
    for (args, says) in [
        (vec!["table", "create", "a.b.c.d"], "is not a table name"),
        (
            vec!["table", "create", "nope.t"],
            "schema greptime.nope not found",
        ),
        (vec!["table", "create", "t", "--regions", "0"], "0 regions"),
        (vec!["table", "create", "metrics.cpu"], "already exists"),
        (
            vec!["table", "alter", "cpu", "--add-column", "x"],
            "is not NAME:TYPE",
        ),
        (vec!["table", "drop", "metrics.nope"], "not found"),
        (vec!["db", "drop", "public"], "cannot be dropped"),
        (
            vec!["db", "create", "x", "--option", "ttl"],
            "is not KEY=VALUE",
        ),
    ] {
        let (code, out, err) = metactl_async(&ep, &args).await;
        assert_eq!(code, Some(1), "{args:?}: {out} {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }

    // The HTTP view agrees.
    let body = |response: String| response.split("\r\n\r\n").nth(1).unwrap().to_string();
    let response = crate::in_process::http_get(&server.http, "/tables?schema=metrics").await;
    let tables: serde_json::Value = serde_json::from_str(&body(response)).unwrap();
    assert_eq!(tables[0]["name"], "cpu");
    let response = crate::in_process::http_get(&server.http, "/tables/1024/route").await;
    let route: serde_json::Value = serde_json::from_str(&body(response)).unwrap();
    let missing = crate::in_process::http_get(&server.http, "/tables/99/route").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert_eq!(route["regions"].as_array().unwrap().len(), 3);

    ok(metactl_async(&ep, &["table", "drop", "metrics.cpu"]).await);
    ok(metactl_async(&ep, &["db", "drop", "metrics"]).await);
    let out = ok(metactl_async(&ep, &["table", "list"]).await);
    assert!(
        out.contains("greptime.public.events") && !out.contains("cpu"),
        "{out}"
    );
    let client = crate::ddl::client(std::slice::from_ref(&ep));
    crate::ddl::check_consistent(&client, &sim).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_user_kills_a_datanode_and_watches_its_regions_move() {
    let server = crate::regions::server(|_| {}).await;
    let ep = server.grpc.clone();
    let mut sim = crate::regions::writers(std::slice::from_ref(&ep), 3).await;
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "stdout {out:?} stderr {err:?}");
        out
    };
    ok(metactl_async(&ep, &["table", "create", "cpu", "--regions", "3"]).await);
    let leader_of = |out: &str, region: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(&format!("{region} ")))
            .and_then(|l| l.split(' ').nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {region} in {out}"))
    };
    let out = ok(metactl_async(&ep, &["table", "route", "cpu"]).await);
    let victim = leader_of(&out, "1024.0");
    sim.kill(victim);
    crate::support::wait_until(Duration::from_secs(60), || async {
        let out = ok(metactl_async(&ep, &["table", "route", "cpu"]).await);
        let now = leader_of(&out, "1024.0");
        crate::support::check(now != victim, || format!("still on {victim}: {out}"))
    })
    .await;
    let out = ok(metactl_async(&ep, &["region", "show", "1024.0"]).await);
    assert!(out.contains("(serving)"), "{out}");
    let out = ok(metactl_async(&ep, &["table", "route", "cpu"]).await);
    let now = leader_of(&out, "1024.0");
    let to = sim
        .node_ids()
        .into_iter()
        .find(|n| *n != victim && *n != now)
        .unwrap()
        .to_string();
    let out = ok(metactl_async(&ep, &["region", "migrate", "1024.0", "--to", &to]).await);
    assert!(
        out.starts_with(&format!("region 1024.0 is led by datanode {to}")),
        "{out}"
    );

    let out = ok(metactl_async(&ep, &["maintenance", "on"]).await);
    assert!(out.starts_with("maintenance on\nfailover on"), "{out}");
    let out = ok(metactl_async(&ep, &["--output", "json", "maintenance", "status"]).await);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (json["maintenance"].as_bool(), json["balancer"].as_bool()),
        (Some(true), Some(false))
    );
    let out = ok(metactl_async(&ep, &["maintenance", "off"]).await);
    assert!(out.starts_with("maintenance off"), "{out}");
    let out = ok(metactl_async(&ep, &["balance", "status"]).await);
    assert!(out.contains("balancer off"), "{out}");

    for (args, says) in [
        (vec!["region", "show", "cpu"], "is not a region"),
        (vec!["region", "show", "1024.9"], "not found"),
        (
            vec!["region", "migrate", "1024.0", "--to", "99"],
            "datanode 99",
        ),
        (
            vec!["region", "migrate", "1024.0", "--to", &to],
            "already led by",
        ),
        (vec!["node", "drain", "77"], "not found"),
    ] {
        let (code, out, err) = metactl_async(&ep, &args).await;
        assert_eq!(code, Some(1), "{args:?}: {out} {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    crate::regions::history_clean(&sim);
}

#[test]
fn tso_prints_consecutive_timestamps_with_their_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path());
    let ep = server.grpc.as_str();
    let (code, out, err) = metactl(ep, &["tso", "--count", "3"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3, "{out}");
    let stamps: Vec<u64> = lines.iter().map(|l| l[0].parse().unwrap()).collect();
    assert_eq!(stamps, [stamps[0], stamps[0] + 1, stamps[0] + 2]);
    assert!(
        lines
            .iter()
            .all(|l| l[1].ends_with('Z') && l[1].len() == 24),
        "{out}"
    );
    assert_eq!(
        lines[2][2].parse::<u64>().unwrap(),
        stamps[2] & ((1 << 18) - 1)
    );

    let (code, out, _) = metactl(ep, &["--output", "json", "tso"]);
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(json[0]["timestamp"].as_u64().unwrap() > stamps[2]);
    assert_eq!(
        json[0]["physical_ms"].as_u64().unwrap(),
        json[0]["timestamp"].as_u64().unwrap() >> 18
    );

    let (code, _, err) = metactl(ep, &["tso", "--count", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("1 to 10000"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}
