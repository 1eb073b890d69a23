//! Three real `meta-srv` processes: the leader is killed with SIGKILL while a client
//! writes, restarted, and every acknowledged write is then readable on every member.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common_meta::kv::{KvBackend, PutRequest, RangeRequest};
use meta_client::{MetaClient, MetaClientOptions};

use crate::support::{ServerProcess, check, meta_srv_command_on, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);

/// Three loopback ports that were free a moment ago (members must know each other's
/// addresses before any of them starts, so they cannot use port 0).
pub fn free_ports() -> Vec<u16> {
    let listeners: Vec<_> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub(crate) struct ProcessCluster {
    dirs: Vec<tempfile::TempDir>,
    pub(crate) addrs: Vec<String>,
    initial: String,
    pub(crate) procs: Vec<Option<ServerProcess>>,
    /// Extra settings every member starts with.
    config: Option<std::path::PathBuf>,
}

impl ProcessCluster {
    pub(crate) fn start() -> ProcessCluster {
        Self::start_with_config(None)
    }

    fn start_with_config(config: Option<&str>) -> ProcessCluster {
        let addrs: Vec<String> = free_ports()
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let initial = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = ProcessCluster {
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            addrs,
            initial,
            procs: vec![None, None, None],
            config: None,
        };
        if let Some(text) = config {
            let path = cluster.dirs[0].path().join("extra.toml");
            std::fs::write(&path, text).unwrap();
            cluster.config = Some(path);
        }
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let mut command = meta_srv_command_on(self.dirs[i].path(), &self.addrs[i]);
        command
            .args(["--node-id", &(i + 1).to_string()])
            .args(["--initial-cluster", &self.initial]);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        self.procs[i] = Some(ServerProcess::spawn(command));
    }

    fn client(&self, i: usize) -> MetaClient {
        MetaClient::new(&[&self.addrs[i]], MetaClientOptions::default()).unwrap()
    }

    /// The member every live member agrees leads.
    pub(crate) async fn leader(&self) -> usize {
        wait_until(DEADLINE, || async {
            let mut seen = BTreeSet::new();
            for i in (0..3).filter(|&i| self.procs[i].is_some()) {
                match self.client(i).status().await {
                    Ok(s) => seen.insert(s.leader_id),
                    Err(_) => seen.insert(0),
                };
            }
            // Agreed, and a live member: right after a kill the others still name the
            // dead leader for a moment.
            match seen.iter().copied().collect::<Vec<_>>()[..] {
                [leader] if leader != 0 && self.procs[leader as usize - 1].is_some() => {
                    Ok(leader as usize - 1)
                }
                _ => Err(format!("no agreed leader: {seen:?}")),
            }
        })
        .await
    }

    /// Waits until the member `client` talks to (member `name`) has applied `index`.
    async fn wait_applied(&self, client: &MetaClient, name: &str, index: u64) {
        wait_until(DEADLINE, || async {
            let applied = client.status().await.map_or(0, |s| s.applied_index);
            check(applied >= index, || {
                format!("member {name} is at {applied}, not {index}")
            })
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9_of_the_leader() {
    let mut cluster = ProcessCluster::start();
    let first = cluster.leader().await;

    tracing::info!("--- a client writes through all three endpoints");
    let options = MetaClientOptions {
        deadline: Duration::from_secs(20),
        ..MetaClientOptions::default()
    };
    let client = Arc::new(MetaClient::new(&cluster.addrs, options).unwrap());
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (client, acked) = (client.clone(), acked.clone());
        tokio::spawn(async move {
            for i in 0..600u32 {
                let key = format!("k/{i:04}");
                // An error here is an unknown outcome: only successes count as acked.
                if client.put(PutRequest::new(key.as_str(), "v")).await.is_ok() {
                    acked.lock().unwrap().push(key);
                }
            }
        })
    };
    wait_until(DEADLINE, || async {
        let acked = acked.lock().unwrap().len();
        check(acked >= 150, || {
            format!("writes did not start: {acked} acked")
        })
    })
    .await;

    tracing::info!(
        "--- the leader (member {}) is killed with SIGKILL",
        first + 1
    );
    cluster.procs[first].take().unwrap().kill9();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 300,
        "writes continued under the new leader: {}",
        acked.len()
    );

    tracing::info!("--- it restarts; every member converges on every acked write");
    cluster.spawn(first);
    let leader = cluster.leader().await;
    let commit = cluster.client(leader).status().await.unwrap().commit_index;
    for i in 0..3 {
        let member = cluster.client(i);
        cluster
            .wait_applied(&member, &(i + 1).to_string(), commit)
            .await;
        let local = member
            .range_serializable(RangeRequest::prefix("k/"))
            .await
            .unwrap();
        let present: BTreeSet<Vec<u8>> = local.kvs.into_iter().map(|kv| kv.key).collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|k| !present.contains(k.as_bytes()))
            .collect();
        assert!(
            missing.is_empty(),
            "member {} lost acked writes: {missing:?}",
            i + 1
        );
    }
}

/// The longest a raft election timeout lasts with the default settings (10 ticks of
/// 100 ms, randomised up to twice that).
const ELECTION_TIMEOUT_MAX: Duration = Duration::from_secs(2);

/// How a restarted follower catches up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CatchUp {
    /// From the leader's log (it kept every entry the follower missed).
    Log,
    /// By a snapshot (the leader compacted past the follower's last entry).
    Snapshot,
}

/// A follower is killed, `writes` more keys are written, and it restarts while clients
/// read (and write a little): nobody waits longer than an election timeout, the leader
/// keeps its term, and the follower ends with every write.
async fn restart_a_follower_under_reads(catch_up: CatchUp, writes: u32) {
    let config = match catch_up {
        CatchUp::Log => None,
        CatchUp::Snapshot => Some("[raft]\ncompact_after = 200\nkeep_entries = 20\n"),
    };
    let mut cluster = ProcessCluster::start_with_config(config);
    let leader = cluster.leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let client = Arc::new(MetaClient::new(&cluster.addrs, MetaClientOptions::default()).unwrap());
    for i in 0..20 {
        client
            .put(PutRequest::new(format!("r/{i:04}"), "v"))
            .await
            .unwrap();
    }

    tracing::info!("--- a follower is killed; the others write on past the compaction point");
    cluster.procs[follower].take().unwrap().kill9();
    for i in 20..writes {
        client
            .put(PutRequest::new(format!("r/{i:04}"), "v"))
            .await
            .unwrap();
    }
    let before = cluster.client(leader).status().await.unwrap();

    tracing::info!("--- under a read-heavy load, the follower restarts and catches up");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut last = std::time::Instant::now();
            let mut longest = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let done = if n.is_multiple_of(10) {
                    client
                        .put(PutRequest::new(format!("w/{n}"), "v"))
                        .await
                        .map(drop)
                } else {
                    client
                        .get(format!("r/{:04}", n % u64::from(writes)).as_bytes())
                        .await
                        .map(drop)
                };
                if done.is_ok() {
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
            }
            (longest.max(last.elapsed()), n)
        })
    };
    cluster.spawn(follower);
    let member = cluster.client(follower);
    let commit = cluster.client(leader).status().await.unwrap().commit_index;
    cluster
        .wait_applied(&member, &(follower + 1).to_string(), commit)
        .await;
    // Keep the load on a little after the catch-up, when the stall used to come.
    let settle = std::time::Instant::now() + ELECTION_TIMEOUT_MAX;
    wait_until(DEADLINE, || async {
        check(std::time::Instant::now() >= settle, || "settling".into())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (longest, ops) = load.await.unwrap();

    let after = cluster.client(leader).status().await.unwrap();
    assert_eq!(
        (after.leader_id, after.term),
        (before.leader_id, before.term),
        "no leader change"
    );
    assert_eq!(
        (after.version, after.cluster_version),
        (
            meta_srv::data_dir::FORMAT_VERSION,
            meta_srv::data_dir::FORMAT_VERSION
        ),
        "every voter said its version in its raft batches"
    );
    assert!(
        longest < ELECTION_TIMEOUT_MAX,
        "no client waited longer than an election timeout: {longest:?} over {ops} operations"
    );
    let status = member.status().await.unwrap();
    assert_eq!(
        status.first_index > 20,
        catch_up == CatchUp::Snapshot,
        "a snapshot was installed only when needed: {status:?}"
    );
    let local = member
        .range_serializable(RangeRequest::prefix("r/"))
        .await
        .unwrap();
    assert_eq!(
        local.count,
        i64::from(writes),
        "the follower has every write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restarted_under_reads_catches_up_from_the_log_without_stalling_anyone() {
    // Thousands of entries behind: the leader must not read them all per heartbeat.
    restart_a_follower_under_reads(CatchUp::Log, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restarted_under_reads_catches_up_by_snapshot_without_stalling_anyone() {
    restart_a_follower_under_reads(CatchUp::Snapshot, 600).await;
}

fn metactl(endpoints: &[String], args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_metactl"));
    command
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(args)
        .env_remove("METACTL_ENDPOINTS");
    let (status, out, err) = crate::support::run_bounded(command, DEADLINE);
    (status.code(), out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_is_promoted_leads_and_another_is_removed() {
    let mut cluster = ProcessCluster::start();
    let leader = cluster.leader().await;
    let client = MetaClient::new(&cluster.addrs, MetaClientOptions::default()).unwrap();
    for i in 0..30 {
        client
            .put(PutRequest::new(format!("j/{i:02}"), "v"))
            .await
            .unwrap();
    }

    tracing::info!("--- metactl adds member 4 as a learner; it starts with --join");
    let addr4 = format!("127.0.0.1:{}", free_ports()[0]);
    let (code, out, err) = metactl(&cluster.addrs, &["member", "add", "4", &addr4]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("4 {addr4} learner")), "{out}");
    let dir4 = tempfile::tempdir().unwrap();
    let mut command = meta_srv_command_on(dir4.path(), &addr4);
    command.args(["--node-id", "4", "--join", &cluster.addrs[leader]]);
    let _member4 = ServerProcess::spawn(command);
    let four = MetaClient::new(&[&addr4], MetaClientOptions::default()).unwrap();
    let commit = cluster.client(leader).status().await.unwrap().commit_index;
    cluster.wait_applied(&four, "4", commit).await;
    let local = four
        .range_serializable(RangeRequest::prefix("j/"))
        .await
        .unwrap();
    assert_eq!(local.count, 30, "the learner has the whole log");

    tracing::info!("--- promoted, it takes over leadership");
    let (code, out, err) = metactl(&cluster.addrs, &["member", "promote", "4"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("4 {addr4} voter")), "{out}");
    let (code, out, err) = metactl(&cluster.addrs, &["leader", "transfer", "4"]);
    assert_eq!(
        (code, out.trim()),
        (Some(0), "member 4 is the leader"),
        "{err}"
    );
    assert_eq!(four.status().await.unwrap().role, "leader");

    tracing::info!("--- a member is removed; writes go on through the rest");
    let (code, out, err) = metactl(
        &cluster.addrs,
        &["member", "remove", "1", "--output", "json"],
    );
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = json["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2, 3, 4]);
    cluster.procs[0].take().unwrap().kill9();
    let all = vec![
        cluster.addrs[1].clone(),
        cluster.addrs[2].clone(),
        addr4.clone(),
    ];
    let rest = MetaClient::new(&all, MetaClientOptions::default()).unwrap();
    rest.put(PutRequest::new("j/after", "v")).await.unwrap();

    let (code, _, err) = metactl(&all, &["member", "promote", "2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("member 2 is not a learner"), "{err}");
}

/// Stats of a datanode with a fixed number of regions.
struct FixedStats(usize);

#[async_trait::async_trait]
impl meta_client::StatsProvider for FixedStats {
    async fn stats(&self) -> Vec<meta_proto::v1::RegionStat> {
        (0..self.0 as u64)
            .map(|id| meta_proto::v1::RegionStat {
                region_id: id,
                ..Default::default()
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_task_finds_the_leader_and_follows_a_new_one() {
    let mut cluster = ProcessCluster::start_with_config(Some("heartbeat_interval_ms = 100\n"));
    let first = cluster.leader().await;
    let follower = (0..3).find(|&i| i != first).unwrap();

    tracing::info!("--- a datanode that only knows a follower heartbeats to the leader");
    let client =
        MetaClient::new(&[&cluster.addrs[follower]], MetaClientOptions::default()).unwrap();
    let identity = meta_client::NodeIdentity {
        id: 42,
        role: meta_proto::v1::NodeRole::Datanode,
        addr: "10.1.1.42:4001".to_string(),
        version: "0.1.0".to_string(),
        labels: Default::default(),
        start_time_ms: 1,
        join_token: String::new(),
    };
    let task = meta_client::HeartbeatTask::start(
        client,
        identity,
        Arc::new(FixedStats(5)),
        Arc::new(crate::heartbeat::Recorder::default()),
    );
    let mut state = task.state();
    let leader_addr = cluster.addrs[first].clone();
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| {
            s.connected_to.as_deref() == Some(leader_addr.as_str()) && s.answered >= 3
        }),
    )
    .await
    .expect("beating to the leader in time")
    .unwrap();
    let nodes = cluster.client(first).nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (nodes[0].node_id, nodes[0].liveness(), nodes[0].region_count),
        (42, meta_proto::v1::Liveness::Alive, 5)
    );

    tracing::info!("--- the leader is killed; the task moves to the next leader by itself");
    cluster.procs[first].take().unwrap().kill9();
    let second = cluster.leader().await;
    let second_addr = cluster.addrs[second].clone();
    let before = state.borrow().answered;
    tokio::time::timeout(
        DEADLINE,
        state.wait_for(|s| {
            s.connected_to.as_deref() == Some(second_addr.as_str()) && s.answered >= before + 3
        }),
    )
    .await
    .expect("beating to the new leader in time")
    .unwrap();
    let nodes = cluster.client(second).nodes().await.unwrap();
    assert_eq!(
        (nodes[0].node_id, nodes[0].liveness(), nodes[0].region_count),
        (42, meta_proto::v1::Liveness::Alive, 5)
    );
    drop(task);
}
