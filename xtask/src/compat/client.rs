//! The Rust `etcd-client` crate through the same operations as the etcdctl script: each
//! check asserts what etcd answers (values, counts, order, errors by their text), run
//! against meta-srv and, when installed, against etcd itself.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions,
};
use sha2::{Digest, Sha256};

/// How long one check may take.
const CHECK_DEADLINE: Duration = Duration::from_secs(10);

/// Failed checks of one system, printed as they run.
struct Checks<'a> {
    system: &'a str,
    failures: usize,
}

impl Checks<'_> {
    async fn run(&mut self, what: &str, check: impl Future<Output = anyhow::Result<()>>) {
        let outcome = tokio::time::timeout(CHECK_DEADLINE, check)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {CHECK_DEADLINE:?}")));
        match outcome {
            Ok(()) => println!("  ok    {:>7}  etcd-client {what}", self.system),
            Err(e) => {
                self.failures += 1;
                println!("  FAIL  {:>7}  etcd-client {what}: {e:#}", self.system);
            }
        }
    }
}

/// `result` is etcd's refusal with exactly this text.
fn refused<T: std::fmt::Debug>(
    result: Result<T, etcd_client::Error>,
    want: &str,
) -> anyhow::Result<()> {
    match result {
        Err(etcd_client::Error::GRpcStatus(status)) if status.message() == want => Ok(()),
        other => bail!("want the refusal {want:?}, got {other:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs every check against `endpoint`; returns how many failed.
pub async fn run(system: &str, endpoint: &str) -> anyhow::Result<usize> {
    let mut client = Client::connect([format!("http://{endpoint}")], None)
        .await
        .with_context(|| format!("{system}: connecting"))?;
    let mut checks = Checks {
        system,
        failures: 0,
    };
    let c = &mut client;
    // Keys live under their own prefix: the etcdctl script ran before on this server.
    let mut first = 0;
    checks
        .run("put and get", async {
            let put = c.put("rc/a", "1", None).await?;
            first = put.header().context("a header")?.revision();
            c.put("rc/b", "2", None).await?;
            let got = c.get("rc/a", None).await?;
            ensure!(got.kvs().len() == 1 && got.kvs()[0].value() == b"1");
            Ok(())
        })
        .await;
    checks
        .run(
            "get --prefix --limit, --keys-only, --count-only, --sort-by",
            async {
                let limited = c
                    .get("rc/", Some(GetOptions::new().with_prefix().with_limit(1)))
                    .await?;
                ensure!(limited.kvs().len() == 1 && limited.more() && limited.count() == 2);
                let keys = c
                    .get(
                        "rc/",
                        Some(GetOptions::new().with_prefix().with_keys_only()),
                    )
                    .await?;
                ensure!(keys.kvs().iter().all(|kv| kv.value().is_empty()));
                let counted = c
                    .get(
                        "rc/",
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await?;
                ensure!(counted.kvs().is_empty() && counted.count() == 2);
                let sorted = c
                    .get(
                        "rc/",
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_sort(SortTarget::Value, SortOrder::Descend),
                        ),
                    )
                    .await?;
                let order: Vec<String> = sorted.kvs().iter().map(|kv| text(kv.key())).collect();
                ensure!(order == ["rc/b", "rc/a"], "{order:?}");
                Ok(())
            },
        )
        .await;
    checks
        .run("get --rev, put --prev-kv, del", async {
            let put = c
                .put("rc/a", "3", Some(PutOptions::new().with_prev_key()))
                .await?;
            ensure!(put.prev_key().is_some_and(|kv| kv.value() == b"1"));
            let old = c
                .get("rc/a", Some(GetOptions::new().with_revision(first)))
                .await?;
            ensure!(old.kvs()[0].value() == b"1");
            let deleted = c
                .delete("rc/a", Some(DeleteOptions::new().with_prev_key()))
                .await?;
            ensure!(deleted.deleted() == 1 && deleted.prev_kvs()[0].value() == b"3");
            ensure!(c.delete("rc/zz", None).await?.deleted() == 0);
            Ok(())
        })
        .await;
    checks
        .run("txn, both branches", async {
            for (expected, succeeded, value) in [("2", true, "3"), ("9", false, "4")] {
                let txn = Txn::new()
                    .when([Compare::value("rc/b", CompareOp::Equal, expected)])
                    .and_then([TxnOp::put("rc/c", "3", None)])
                    .or_else([TxnOp::put("rc/c", "4", None)]);
                ensure!(c.txn(txn).await?.succeeded() == succeeded);
                ensure!(c.get("rc/c", None).await?.kvs()[0].value() == value.as_bytes());
            }
            Ok(())
        })
        .await;
    checks
        .run("watch --prefix --rev --prev-kv", async {
            let from = c
                .put("rc/w/1", "x", None)
                .await?
                .header()
                .context("header")?
                .revision();
            c.put("rc/w/1", "z", None).await?;
            let mut stream = c
                .watch(
                    "rc/w/",
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(from)
                            .with_prev_key(),
                    ),
                )
                .await?;
            let mut seen = Vec::new();
            while seen.len() < 2 {
                let message = stream.message().await?.context("the stream ended")?;
                for event in message.events() {
                    ensure!(event.event_type() == EventType::Put);
                    let kv = event.kv().context("an event's key")?;
                    let prev = event.prev_kv().map(|p| text(p.value()));
                    seen.push((text(kv.value()), prev));
                }
            }
            ensure!(
                seen == [("x".into(), None), ("z".into(), Some("x".into()))],
                "{seen:?}"
            );
            Ok(())
        })
        .await;
    checks
        .run(
            "lease grant, put --lease, timetolive --keys, keep-alive, list, revoke",
            async {
                let id = c.lease_grant(30, None).await?.id();
                c.put("rc/k", "v", Some(PutOptions::new().with_lease(id)))
                    .await?;
                let ttl = c
                    .lease_time_to_live(
                        id,
                        Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
                    )
                    .await?;
                ensure!(ttl.granted_ttl() == 30 && ttl.keys() == [b"rc/k".to_vec()]);
                let (mut keeper, mut answers) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                let answer = answers.message().await?.context("a keep-alive answer")?;
                ensure!(answer.id() == id && answer.ttl() == 30);
                ensure!(c.leases().await?.leases().iter().any(|l| l.id() == id));
                c.lease_revoke(id).await?;
                ensure!(c.get("rc/k", None).await?.kvs().is_empty());
                refused(
                    c.lease_revoke(123).await,
                    "etcdserver: requested lease not found",
                )
            },
        )
        .await;
    checks
        .run("compaction, then a read below it", async {
            let now = c
                .put("rc/d", "1", None)
                .await?
                .header()
                .context("header")?
                .revision();
            c.compact(now, None).await?;
            refused(
                c.get("rc/b", Some(GetOptions::new().with_revision(first)))
                    .await,
                "etcdserver: mvcc: required revision has been compacted",
            )
        })
        .await;
    checks
        .run("lock and unlock (the Lock service)", async {
            let lease = c.lease_grant(30, None).await?.id();
            let locked = c
                .lock(
                    "rc/lock",
                    Some(etcd_client::LockOptions::new().with_lease(lease)),
                )
                .await?;
            ensure!(locked.key().starts_with(b"rc/lock/"), "{:?}", locked.key());
            ensure!(c.get(locked.key(), None).await?.count() == 1);
            c.unlock(locked.key()).await?;
            ensure!(c.get(locked.key(), None).await?.count() == 0);
            c.lease_revoke(lease).await?;
            Ok(())
        })
        .await;
    checks
        .run(
            "campaign, leader, proclaim, resign (the Election service)",
            async {
                let lease = c.lease_grant(30, None).await?.id();
                let won = c.campaign("rc/elect", "p1", lease).await?;
                let leader = won.leader().context("a leader key")?.clone();
                let now = c.leader("rc/elect").await?;
                ensure!(now.kv().is_some_and(|kv| kv.value() == b"p1"));
                c.proclaim(
                    "p2",
                    Some(etcd_client::ProclaimOptions::new().with_leader(leader.clone())),
                )
                .await?;
                ensure!(
                    c.leader("rc/elect")
                        .await?
                        .kv()
                        .is_some_and(|kv| kv.value() == b"p2")
                );
                c.resign(Some(etcd_client::ResignOptions::new().with_leader(leader)))
                    .await?;
                refused(c.leader("rc/elect").await, "election: no leader")?;
                c.lease_revoke(lease).await?;
                Ok(())
            },
        )
        .await;
    let mut me = 0;
    checks
        .run("status, alarm list, defrag, hashkv", async {
            let status = c.status().await?;
            ensure!(!status.version().is_empty() && status.leader() != 0);
            me = status.header().context("header")?.member_id();
            ensure!(status.leader() == me, "one member leads itself");
            let alarms = c
                .alarm(
                    etcd_client::AlarmAction::Get,
                    etcd_client::AlarmType::None,
                    None,
                )
                .await?;
            ensure!(alarms.alarms().is_empty());
            c.defragment().await?;
            c.hash_kv(0).await?;
            Ok(())
        })
        .await;
    checks
        .run("member list", async {
            // Adding and removing members is left to the etcdctl script: against etcd
            // 3.4 a learner added through etcd-client could not be removed by its id.
            let listed = c.member_list().await?;
            ensure!(listed.members().len() == 1 && !listed.members()[0].is_learner());
            Ok(())
        })
        .await;
    checks
        .run("move-leader to itself", async {
            c.move_leader(me).await?;
            Ok(())
        })
        .await;
    checks
        .run("snapshot: size % 512 == 32, ends with its SHA-256", async {
            let mut stream = c.snapshot().await?;
            let mut file = Vec::new();
            while let Some(chunk) = stream.message().await? {
                file.extend_from_slice(chunk.blob());
            }
            ensure!(file.len() % 512 == 32, "{} bytes", file.len());
            let (body, digest) = file.split_at(file.len() - 32);
            ensure!(Sha256::digest(body).as_slice() == digest, "digest");
            Ok(())
        })
        .await;
    checks
        .run("put of an empty key", async {
            refused(
                c.put("", "v", None).await,
                "etcdserver: key is not provided",
            )
        })
        .await;
    Ok(checks.failures)
}
