//! DDL that cannot be carried out: bad input refused before anything runs, datanodes
//! that die or refuse (the create rolls back and leaves nothing), and no datanode at
//! all.

use super::*;

fn code_of(err: &common_meta::Error) -> &'static str {
    match err {
        common_meta::Error::InvalidArgument { .. } | common_meta::Error::InvalidName { .. } => {
            "invalid"
        }
        common_meta::Error::NotFound { .. } => "not_found",
        common_meta::Error::AlreadyExists { .. } => "exists",
        common_meta::Error::FailedPrecondition { .. } => "precondition",
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ddl_is_refused_with_the_reason_and_writes_nothing() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let client = client(&endpoints);

    // No datanode yet: nothing to place regions on.
    let err = client
        .create_table(&table("lonely", 1), false)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "precondition", "{err}");
    assert!(
        err.to_string().contains("no datanode can take regions"),
        "{err}"
    );

    let sim = datanodes(&endpoints, 2).await;
    let long = "x".repeat(256);
    type Change = Box<dyn Fn(&mut TableInfo)>;
    let cases: Vec<(&str, &str, Change)> = vec![
        (
            "invalid",
            "must not contain '/'",
            Box::new(|t| t.name = "a/b".into()),
        ),
        (
            "invalid",
            "at most 255 bytes",
            Box::new(move |t| t.name = long.clone()),
        ),
        (
            "invalid",
            "must not be empty",
            Box::new(|t| t.name = String::new()),
        ),
        (
            "not_found",
            "schema greptime.nope",
            Box::new(|t| t.schema = "nope".into()),
        ),
        (
            "not_found",
            "schema other.public",
            Box::new(|t| t.catalog = "other".into()),
        ),
        (
            "invalid",
            "appears twice",
            Box::new(|t| {
                let again = t.columns[0].clone();
                t.columns.push(again);
            }),
        ),
        ("invalid", "0 regions", Box::new(|t| t.regions = 0)),
        ("invalid", "1025 regions", Box::new(|t| t.regions = 1025)),
        (
            "invalid",
            "so an alter can compare and replace it",
            Box::new(|t| t.columns[2].default = Some("v".repeat(2 * 1024 * 1024))),
        ),
        (
            "invalid",
            "followers must be a number",
            Box::new(|t| {
                t.options.insert("followers".into(), "two".into());
            }),
        ),
        (
            "precondition",
            "need 4 datanodes",
            Box::new(|t| {
                t.options.insert("followers".into(), "3".into());
            }),
        ),
    ];
    for (code, reason, change) in cases {
        let mut bad = table("bad", 2);
        change(&mut bad);
        let err = client.create_table(&bad, false).await.unwrap_err();
        assert_eq!(code_of(&err), code, "{reason}: {err}");
        assert!(err.to_string().contains(reason), "{reason}: {err}");
    }

    client.create_table(&table("t", 1), false).await.unwrap();
    let err = client
        .create_table(&table("t", 1), false)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), "exists", "{err}");
    for (what, err) in [
        (
            "drop",
            client
                .drop_table("greptime", "public", "nope", false)
                .await
                .unwrap_err(),
        ),
        (
            "truncate",
            client
                .truncate_table("greptime", "public", "nope")
                .await
                .unwrap_err(),
        ),
        (
            "rename",
            client
                .rename_table("greptime", "public", "nope", "x")
                .await
                .unwrap_err(),
        ),
        (
            "drop db",
            client
                .drop_database("greptime", "nope", false)
                .await
                .unwrap_err(),
        ),
        (
            "table",
            client
                .table("greptime", "public", "nope")
                .await
                .unwrap_err(),
        ),
        (
            "db in",
            client
                .create_database("nope", "x", [], false)
                .await
                .unwrap_err(),
        ),
    ] {
        assert_eq!(code_of(&err), "not_found", "{what}: {err}");
    }
    client
        .drop_table("greptime", "public", "nope", true)
        .await
        .unwrap();
    let err = client
        .rename_table("greptime", "public", "t", "t")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already has that name"), "{err}");
    let err = client.drop_database("", "public", false).await.unwrap_err();
    assert!(err.to_string().contains("cannot be dropped"), "{err}");

    let alter = |t: pb::AlterTableTask| {
        let client = client.clone();
        async move { client.alter_table(t).await.unwrap_err() }
    };
    let add = |table: &str, json: &str| pb::AlterTableTask {
        table: table.into(),
        add_columns_json: vec![json.into()],
        ..Default::default()
    };
    let err = alter(add("t", r#"{"name":"host","data_type":"string"}"#)).await;
    assert!(err.to_string().contains("\"host\" exists already"), "{err}");
    let err = alter(add("t", "{not json")).await;
    assert!(
        err.to_string()
            .contains("add_columns_json is not valid JSON"),
        "{err}"
    );
    let err = alter(pb::AlterTableTask {
        table: "t".into(),
        ..Default::default()
    })
    .await;
    assert!(err.to_string().contains("changes nothing"), "{err}");
    // Altering a dropped table: it is not there.
    client
        .drop_table("greptime", "public", "t", false)
        .await
        .unwrap();
    let err = alter(add("t", r#"{"name":"z","data_type":"string"}"#)).await;
    assert_eq!(code_of(&err), "not_found", "{err}");

    let err = client.alloc_ids("a/b", 1).await.unwrap_err();
    assert_eq!(code_of(&err), "invalid", "{err}");
    let err = client.alloc_ids("seq", 0).await.unwrap_err();
    assert!(err.to_string().contains("ask for 1 to"), "{err}");

    // None of it left a trace.
    assert!(
        client
            .list_tables("greptime", "public")
            .await
            .unwrap()
            .is_empty()
    );
    check_consistent(&client, &sim).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_that_dies_or_refuses_rolls_the_create_back() {
    let server = server().await;
    let endpoints = vec![server.grpc.clone()];
    let mut sim = datanodes(&endpoints, 3).await;
    let client = client(&endpoints);

    // An alter one node refuses: nothing is committed, and every node is asked to go
    // back to the stored schema (one more alter each, the refuser's refused too).
    let refuser = sim.node_ids()[1];
    let id = client
        .create_table(&table("altered", 3), false)
        .await
        .unwrap();
    let asked = |sim: &Simulator| -> Vec<u64> {
        sim.node_ids()
            .iter()
            .map(|n| sim.region_requests(*n))
            .collect()
    };
    let before = asked(&sim);
    sim.refuse_regions(refuser, true);
    let err = client
        .alter_table(pb::AlterTableTask {
            table: "altered".into(),
            add_columns_json: vec![r#"{"name":"z","data_type":"string"}"#.into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("datanode {refuser} refused to alter")),
        "{err}"
    );
    assert_eq!(client.table_info(id).await.unwrap().version, 0);
    let after = asked(&sim);
    for (i, node) in sim.node_ids().iter().enumerate() {
        assert_eq!(
            after[i] - before[i],
            2,
            "node {node}: {before:?} -> {after:?}"
        );
    }
    client
        .drop_table("greptime", "public", "altered", false)
        .await
        .unwrap();

    // One node refuses a create: the others' regions are dropped again, no key is
    // written.
    sim.refuse_regions(refuser, true);
    let err = client
        .create_table(&table("refused", 3), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, common_meta::Error::FailedPrecondition { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("datanode {refuser} refused")),
        "{err}"
    );
    assert!(matches!(
        client
            .table("greptime", "public", "refused")
            .await
            .unwrap_err(),
        common_meta::Error::NotFound { .. }
    ));
    check_consistent(&client, &sim).await.unwrap();
    sim.refuse_regions(refuser, false);

    // One node dies (its stream ends): the create waits for it to come back until the
    // leader's detector calls it failed, then fails and rolls back.
    let dead = sim.node_ids()[2];
    assert!(sim.kill(dead));
    wait_until(Duration::from_secs(10), || async {
        check(sim.connected() == 2, || {
            format!("{} connected", sim.connected())
        })
    })
    .await;
    let err = client
        .create_table(&table("doomed", 3), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, common_meta::Error::FailedPrecondition { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("could not create after 3 attempts"),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("datanode {dead}")),
        "{err}"
    );
    check_consistent(&client, &sim).await.unwrap();
    let held: usize = sim.node_ids().iter().map(|n| sim.regions(*n).len()).sum();
    assert_eq!(
        held, 0,
        "the live nodes' regions were dropped in the rollback"
    );

    // Once the detector calls it failed, new tables avoid it.
    wait_until(Duration::from_secs(30), || async {
        let views = client.nodes().await.map_err(|e| e.to_string())?;
        let liveness = views.iter().find(|v| v.node_id == dead).map(|v| v.liveness);
        check(liveness == Some(pb::Liveness::Failed as i32), || {
            format!("node {dead} is {liveness:?}")
        })
    })
    .await;
    let id = client
        .create_table(&table("survivor", 4), false)
        .await
        .unwrap();
    let route = client.table_route(id).await.unwrap();
    assert!(
        route
            .regions
            .iter()
            .all(|r| r.leader.as_ref().unwrap().id != dead)
    );
    check_consistent(&client, &sim).await.unwrap();
    server.shutdown().await;
}
