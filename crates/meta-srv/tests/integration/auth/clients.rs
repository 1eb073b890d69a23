//! metactl's user, role and auth commands, and tokens verified on every member.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metactl_manages_users_and_roles_and_acts_as_a_user() {
    let server = start().await;
    let ep = server.grpc.clone();
    let ok = |(code, out, err): (Option<i32>, String, String)| {
        assert_eq!(code, Some(0), "stdout {out} stderr {err}");
        out
    };
    let root_with_password = format!("root:{ROOT_PASSWORD}");
    ok(metactl_async(&ep, &["user", "add", &root_with_password]).await);
    ok(metactl_async(&ep, &["user", "grant-role", "root", "root"]).await);
    ok(metactl_async(&ep, &["user", "add", "dev", "--new-password", "pw"]).await);
    ok(metactl_async(&ep, &["role", "add", "dev"]).await);
    ok(metactl_async(
        &ep,
        &[
            "role",
            "grant-permission",
            "dev",
            "readwrite",
            "dev/",
            "--prefix",
        ],
    )
    .await);
    ok(metactl_async(&ep, &["user", "grant-role", "dev", "dev"]).await);
    ok(metactl_async(&ep, &["auth", "enable"]).await);
    let status = ok(metactl_async(&ep, &["auth", "status", "--user", "dev:pw"]).await);
    assert!(status.starts_with("auth enabled"), "{status}");

    // Without a user, with a wrong password, outside the grant: one line, exit 1.
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "dev/a", "1"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("authenticate") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) =
        metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev:bad"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("authentication failed"), "{err}");
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "x", "1", "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("permission denied"), "{err}");
    let (code, _, err) = metactl_async(&ep, &["user", "list", "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1), "listing users is root's: {err}");
    let (code, _, err) = metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("needs a password"), "{err}");

    ok(metactl_async(&ep, &["kv", "put", "dev/a", "1", "--user", "dev:pw"]).await);
    let got = ok(metactl_async(&ep, &["kv", "get", "dev/a", "--user", "dev:pw"]).await);
    assert!(got.contains('1'), "{got}");
    let root = format!("root:{ROOT_PASSWORD}");
    // A snapshot is root's.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    let file = file.to_str().unwrap();
    let (code, _, err) = metactl_async(&ep, &["snapshot", "save", file, "--user", "dev:pw"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("permission denied"), "{err}");
    ok(metactl_async(&ep, &["snapshot", "save", file, "--user", &root]).await);
    assert!(std::fs::metadata(file).unwrap().len() > 0);
    let users = ok(metactl_async(&ep, &["user", "list", "--user", &root]).await);
    assert_eq!(users.lines().collect::<Vec<_>>(), ["dev", "root"]);
    let perms = ok(metactl_async(&ep, &["role", "get", "dev", "--user", "dev:pw"]).await);
    assert!(perms.contains("readwrite [dev/, dev0)"), "{perms}");
    ok(metactl_async(&ep, &["auth", "disable", "--user", &root]).await);
    ok(metactl_async(&ep, &["kv", "put", "x", "1"]).await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_replicated_and_tokens_verify_on_every_member() {
    let members = start_three(|_| {}).await;
    let leader = leader_of(&members).await;
    let follower = (leader + 1) % 3;
    // Changes sent to a follower run at the leader.
    let mut at_follower = auth_client(&members[follower].grpc).await;
    let root = enable(&mut at_follower).await;
    user_with(
        &mut at_follower,
        &root,
        "app",
        "app/",
        authpb::permission::Type::Readwrite,
    )
    .await;
    // A token from one member verifies on every other (one secret, replicated).
    let mut at_leader = auth_client(&members[leader].grpc).await;
    let app = token(&mut at_leader, "app", "pw").await;
    for m in &members {
        let mut kv = KvClient::connect(format!("http://{}", m.grpc))
            .await
            .unwrap();
        let key = format!("app/{}", m.grpc);
        kv.put(as_user(put(&key), &app)).await.unwrap();
        let (code, _) = refused(kv.put(as_user(put("elsewhere"), &app)).await);
        assert_eq!(code, Code::PermissionDenied);
    }
    for m in members {
        m.shutdown().await;
    }
}
