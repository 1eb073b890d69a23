//! Join tokens: admitted once, refused when missing, forged, unregistered, expired or
//! reused; the node a token admitted may come back with it.

use super::*;

/// Waits until the wall clock is past `at_ms` (ms since the epoch).
async fn wait_past(at_ms: u64) {
    wait_until(Duration::from_secs(10), || async {
        check(unix_ms() > at_ms, || {
            "the clock did not advance".to_string()
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_admit_once_and_refuse_bad_expired_and_reused_ones() {
    let server = crate::in_process::start_with(|c| c.cluster_secret = SECRET.to_string()).await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let signer = JoinTokenSigner::new(SECRET.as_bytes()).unwrap();
    // Makes a token valid for `ttl_ms` and registers it, as `metactl token create`.
    let create = |node: u64, ttl_ms: u64| {
        let (signer, client) = (signer.clone(), client.clone());
        async move {
            let token = signer.mint(node, unix_ms() + ttl_ms).unwrap();
            // Retried while the fresh server has not yet published its leadership.
            let (_, expires) = wait_until(Duration::from_secs(20), || async {
                client
                    .register_join_token(&token)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            (token, expires)
        }
    };
    let (token, _) = create(1, 600_000).await;
    let (good, good_answers, _) = register(
        &server.grpc,
        with_token(handshake(1, pb::NodeRole::Datanode, "h:1"), &token),
    )
    .await;

    let (for_node_2, _) = create(2, 600_000).await;
    let (short_lived, expires) = create(3, 1_000).await;
    wait_past(expires).await;
    let (spent, _) = create(4, 600_000).await;
    // Tokens not made with the cluster's secret, or already expired, are not taken.
    let foreign = JoinTokenSigner::new(b"some other cluster's secret").unwrap();
    let err = client
        .register_join_token(&foreign.mint(6, unix_ms() + 600_000).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not valid for this cluster"),
        "{err}"
    );
    let err = client
        .register_join_token(&signer.mint(6, unix_ms() - 1).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already expired"), "{err}");
    let unregistered = signer.mint(6, unix_ms() + 600_000).unwrap();
    {
        // Node 4 joins, is decommissioned and removed; its token is spent for good.
        let (_tx, _answers, _) = register(
            &server.grpc,
            with_token(handshake(4, pb::NodeRole::Datanode, "h:4"), &spent),
        )
        .await;
    }
    for state in [
        pb::NodeState::Active,
        pb::NodeState::Draining,
        pb::NodeState::Decommissioned,
    ] {
        client.set_node_state(4, state).await.unwrap();
    }
    client.remove_node(4).await.unwrap();

    // The MAC's last hex digit changed (to another digit, whatever it was).
    let last = if token.ends_with('0') { "1" } else { "0" };
    let forged = format!("{}{last}", &token[..token.len() - 1]);
    // Each case: node id, token, and what the refusal says.
    let cases = [
        (5, String::new(), "metactl token create --node 5"),
        (5, "not-a-token".to_string(), "not valid for this cluster"),
        (1, forged, "not valid for this cluster"),
        (5, for_node_2.clone(), "is for node 2, not node 5"),
        (6, unregistered, "not registered with this cluster"),
        (3, short_lived, "expired"),
        (4, spent, "already used"),
    ];
    for (node, token, want) in cases {
        let (tx, mut answers) = open(&server.grpc).await;
        tx.send(with_token(
            handshake(node, pb::NodeRole::Datanode, "h:x"),
            &token,
        ))
        .await
        .unwrap();
        let status = answer(&mut answers).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{want}: {status:?}"
        );
        assert!(
            status.message().contains(want),
            "{:?} lacks {want:?}",
            status.message()
        );
    }
    let listed: Vec<u64> = client
        .nodes()
        .await
        .unwrap()
        .iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(listed, [1], "no refused node was registered");

    // Node 1 restarts with the token it joined with: still admitted.
    drop((good, good_answers));
    let (good, mut good_answers, _) = register(
        &server.grpc,
        with_token(handshake(1, pb::NodeRole::Datanode, "h:1b"), &token),
    )
    .await;
    good.send(stats(2)).await.unwrap();
    answer(&mut good_answers).await.expect("node 1 beats on");
    server.shutdown().await;
}
